//! A qcow2 image is hostile input: its header, extensions, L1/L2 tables, refcounts,
//! compressed clusters and snapshot table come from whoever made the file. Opening it and
//! reading, writing, discarding and using snapshots must never panic, hang or allocate
//! absurd amounts; errors are fine.
#![no_main]

use std::io::Write;

use block::qcow2::Qcow2Image;
use block::DiskImage;
use libfuzzer_sys::fuzz_target;
use vm_memory::VolatileSlice;

fn image_file(data: &[u8]) -> Option<std::fs::File> {
    // SAFETY: memfd_create with a static NUL-terminated name has no memory-safety
    // preconditions; the returned descriptor is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"qcow2".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.write_all(data).ok()?;
    Some(file)
}

/// A few accesses spread over the disk: start, middle, end.
fn exercise(image: &mut Qcow2Image, seed: u8) {
    let size = image.size();
    let mut buf = vec![seed; 8192];
    for offset in [0, size / 2, size.saturating_sub(8192)] {
        let offset = offset & !511;
        let len = (size - offset).min(8192) as usize;
        let _ = image.read_at(offset, &[VolatileSlice::from(&mut buf[..len])]);
        let _ = image.write_at(offset, &[VolatileSlice::from(&mut buf[..len.min(1536)])]);
        let _ = image.write_zeroes(offset, len as u64, true);
        let _ = image.read_at(offset, &[VolatileSlice::from(&mut buf[..len])]);
    }
    let _ = image.discard(0, size.min(1 << 20));
    let _ = image.flush();
}

fuzz_target!(|data: &[u8]| {
    let Some(file) = image_file(data) else {
        return;
    };
    let Ok(writer) = file.try_clone() else {
        return;
    };
    // Read-only first (what a backing file sees), then writable.
    if let Ok(mut image) = Qcow2Image::open(file, false, None) {
        let mut buf = vec![0u8; 4096];
        let len = image.size().min(4096) as usize;
        let _ = image.read_at(0, &[VolatileSlice::from(&mut buf[..len])]);
        let _ = image.snapshots();
    }
    let Ok(mut image) = Qcow2Image::open(writer, true, None) else {
        return;
    };
    exercise(&mut image, data.first().copied().unwrap_or(0));
    if let Ok(snapshots) = image.snapshots() {
        if let Some(first) = snapshots.first() {
            let _ = image.apply_snapshot(&first.name.clone());
        }
    }
    if image.create_snapshot("fuzz").is_ok() {
        exercise(&mut image, 0x5a);
        let _ = image.apply_snapshot("fuzz");
        let _ = image.delete_snapshot("fuzz");
    }
    let _ = image.resize(image.size() + (1 << 20));
});
