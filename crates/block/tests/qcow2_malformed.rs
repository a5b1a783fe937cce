//! Hostile and broken qcow2 images: each gets a clear error on open or on access, never a
//! panic, a hang or a huge allocation.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use block::qcow2::{self, CreateOptions};
use block::{open, OpenError};
use common::*;
use vm_memory::VolatileSlice;

const MIB: u64 = 1 << 20;

fn create(dir: &Path, name: &str, size: u64, backing: Option<(&str, &str)>) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create_new(&path).unwrap();
    let options = CreateOptions {
        size,
        backing: backing.map(|(b, f)| (b.to_string(), Some(f.to_string()))),
        ..CreateOptions::default()
    };
    qcow2::create(&file, &options).unwrap();
    path
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

/// Where the metadata of guest cluster 0 lives.
struct Layout {
    /// File offset of L1 entry 0.
    l1_entry: u64,
    /// File offset of the L2 entry for cluster 0.
    l2_entry: u64,
    /// Its data cluster.
    data: u64,
}

/// Writes 4 KiB at guest offset 0 and finds the metadata that maps it.
fn written_once(path: &Path) -> Layout {
    let mut disk = open(path, false, None).unwrap();
    apply(
        disk.as_mut(),
        Op::Write {
            offset: 0,
            len: 4096,
            seed: 1,
        },
    )
    .unwrap();
    drop(disk);
    let file = std::fs::File::open(path).unwrap();
    let entry_at = |offset: u64| {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, offset).unwrap();
        u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00
    };
    let l1_entry = qcow2::read_header(&file).unwrap().l1_table_offset;
    let l2_entry = entry_at(l1_entry);
    Layout {
        l1_entry,
        l2_entry,
        data: entry_at(l2_entry),
    }
}

fn open_error(path: &Path) -> String {
    match open(path, false, None) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message += &format!(": {s}");
                source = s.source();
            }
            message
        }
    }
}

#[test]
fn header_fields_out_of_range_are_refused_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, u64, &[u8], &str)] = &[
        ("version", 4, &9u32.to_be_bytes(), "version 9"),
        ("cluster bits", 20, &30u32.to_be_bytes(), "cluster size"),
        (
            "gigantic size",
            24,
            &(1u64 << 62).to_be_bytes(),
            "too large",
        ),
        ("huge L1", 36, &u32::MAX.to_be_bytes(), "L1 table"),
        (
            "unaligned L1",
            40,
            &0x10_0001u64.to_be_bytes(),
            "not aligned",
        ),
        (
            "L1 past the end",
            40,
            &(1u64 << 40).to_be_bytes(),
            "L1 table",
        ),
        (
            "huge refcount table",
            56,
            &u32::MAX.to_be_bytes(),
            "refcount table",
        ),
        (
            "unknown feature",
            72,
            &(1u64 << 40).to_be_bytes(),
            "incompatible features",
        ),
        ("refcount order", 96, &7u32.to_be_bytes(), "refcount order"),
        ("encrypted", 32, &1u32.to_be_bytes(), "encrypted"),
    ];
    for (what, offset, bytes, expected) in cases {
        let path = create(
            dir.path(),
            &format!("{}.qcow2", what.replace(' ', "-")),
            64 * MIB,
            None,
        );
        patch(&path, *offset, bytes);
        let message = open_error(&path);
        assert!(message.contains(expected), "{what}: {message}");
        assert!(
            message.contains("not a valid qcow2 image"),
            "{what}: {message}"
        );
    }
}

#[test]
fn truncated_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = create(dir.path(), "t.qcow2", 64 * MIB, None);
    for len in [0u64, 4, 50, 103, 65536 + 10] {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len).unwrap();
        drop(f);
        let result = open(&path, false, Some(block::Format::Qcow2));
        assert!(result.is_err(), "a {len}-byte file opened");
    }
}

#[test]
fn dirty_and_corrupt_images_are_not_written() {
    let dir = tempfile::tempdir().unwrap();
    for (bit, expected) in [(1u64, "dirty"), (2, "corrupt")] {
        let path = create(dir.path(), &format!("bit{bit}.qcow2"), 4 * MIB, None);
        patch(&path, 72, &bit.to_be_bytes());
        assert!(open_error(&path).contains(expected));
        // Read-only use is still possible.
        let mut disk = open(&path, true, None).unwrap();
        assert_eq!(read_all(disk.as_mut()).len(), 4 * MIB as usize);
    }
}

#[test]
fn tables_pointing_outside_the_file_give_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = create(dir.path(), "l2.qcow2", 4 * MIB, None);
    let layout = written_once(&path);
    // L1 entry 0 -> an L2 table far beyond the end of the file.
    patch(
        &path,
        layout.l1_entry,
        &((1u64 << 63) | (1 << 40)).to_be_bytes(),
    );
    let mut disk = open(&path, false, None).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = disk
        .read_at(0, &[VolatileSlice::from(&mut buf[..])])
        .unwrap_err();
    assert!(err.to_string().contains("L2 table"), "{err}");
    assert!(disk
        .write_at(0, &[VolatileSlice::from(&mut buf[..])])
        .is_err());
    // A data cluster that is not aligned.
    drop(disk);
    let path = create(dir.path(), "data.qcow2", 4 * MIB, None);
    let layout = written_once(&path);
    patch(
        &path,
        layout.l2_entry,
        &((1u64 << 63) | 0x1234_0200).to_be_bytes(),
    );
    let mut disk = open(&path, false, None).unwrap();
    let err = disk
        .read_at(0, &[VolatileSlice::from(&mut buf[..])])
        .unwrap_err();
    assert!(err.to_string().contains("unaligned"), "{err}");
}

#[test]
fn garbage_compressed_clusters_give_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = create(dir.path(), "c.qcow2", 4 * MIB, None);
    let layout = written_once(&path);
    // Compressed, pointing at the (random, not deflate) data cluster, with a maximal length.
    let entry = (1u64 << 62) | layout.data | (0xff << 54);
    patch(&path, layout.l2_entry, &entry.to_be_bytes());
    let mut disk = open(&path, true, None).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = disk
        .read_at(0, &[VolatileSlice::from(&mut buf[..])])
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("inflate") || message.contains("compressed"),
        "{message}"
    );
}

#[test]
fn backing_loops_and_endless_chains_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "self.qcow2", MIB, Some(("self.qcow2", "qcow2")));
    assert!(matches!(
        open(&d.join("self.qcow2"), false, None),
        Err(OpenError::BackingLoop { .. })
    ));
    create(d, "a.qcow2", MIB, Some(("b.qcow2", "qcow2")));
    create(d, "b.qcow2", MIB, Some(("c.qcow2", "qcow2")));
    create(d, "c.qcow2", MIB, Some(("a.qcow2", "qcow2")));
    assert!(matches!(
        open(&d.join("a.qcow2"), false, None),
        Err(OpenError::BackingLoop { .. })
    ));
    // A chain deeper than the limit.
    std::fs::write(d.join("layer0.raw"), vec![0u8; MIB as usize]).unwrap();
    let mut below = ("layer0.raw".to_string(), "raw");
    for i in 1..=block::MAX_CHAIN_DEPTH + 1 {
        let name = format!("layer{i}.qcow2");
        create(d, &name, MIB, Some((&below.0, below.1)));
        below = (name, "qcow2");
    }
    let top = d.join(&below.0);
    assert!(
        matches!(open(&top, false, None), Err(OpenError::ChainTooDeep { .. })),
        "{}",
        open_error(&top)
    );
    // One layer less is fine.
    let below_top = d.join(format!("layer{}.qcow2", block::MAX_CHAIN_DEPTH));
    open(&below_top, false, None).unwrap();
    // A missing backing file and an unknown backing format.
    create(d, "orphan.qcow2", MIB, Some(("missing.qcow2", "qcow2")));
    assert!(open_error(&d.join("orphan.qcow2")).contains("missing.qcow2"));
    create(d, "vmdk.qcow2", MIB, Some(("layer0.raw", "vmdk")));
    assert!(matches!(
        open(&d.join("vmdk.qcow2"), false, None),
        Err(OpenError::BackingFormat { .. })
    ));
}

#[test]
fn refcount_overflow_is_an_error_not_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one-bit.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=1",
        path.to_str().unwrap(),
        "4M",
    ]);
    qemu_io(&path, "qcow2", &["write -P 0x5a 0 1M"]);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut disk = qcow2::Qcow2Image::open(file, true, None).unwrap();
    let err = disk.create_snapshot("s").unwrap_err();
    assert!(err.to_string().contains("overflow"), "{err}");
    drop(disk);
    assert_not_corrupt(&path);
    qemu_io(&path, "qcow2", &["read -P 0x5a 0 1M"]);
}
