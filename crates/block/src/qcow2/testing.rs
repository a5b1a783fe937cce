//! Helpers shared by the qcow2 unit tests: images in temporary files, and byte-level access to
//! them behind the image's back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::VolatileSlice;

use super::{check, create, CreateOptions, Mapping, Qcow2Image};
use crate::mem::MemoryImage;
use crate::DiskImage;

/// A new empty image of `size` bytes with clusters of 2^`cluster_bits` bytes, open for
/// writing, and a second handle on its file.
pub fn new_image(cluster_bits: u32, size: u64) -> (File, Qcow2Image) {
    let file = new_file(cluster_bits, size);
    let image = reopen(&file);
    (file, image)
}

/// A new empty image file (not opened).
pub fn new_file(cluster_bits: u32, size: u64) -> File {
    let file = tempfile::tempfile().unwrap();
    let options = CreateOptions {
        size,
        cluster_bits,
        backing: None,
    };
    create(&file, &options).unwrap();
    file
}

/// An image over `backing` (held in memory), as `open` would give it.
pub fn new_overlay(cluster_bits: u32, size: u64, backing: &[u8]) -> (File, Qcow2Image) {
    let file = new_file(cluster_bits, size);
    let backing = MemoryImage {
        bytes: backing.to_vec(),
    };
    let image = Qcow2Image::open(file.try_clone().unwrap(), true, Some(Box::new(backing))).unwrap();
    (file, image)
}

pub fn reopen(file: &File) -> Qcow2Image {
    Qcow2Image::open(file.try_clone().unwrap(), true, None).unwrap()
}

pub fn read_bytes(file: &File, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

pub fn read_u64(file: &File, offset: u64) -> u64 {
    u64::from_be_bytes(read_bytes(file, offset, 8).try_into().unwrap())
}

pub fn write(image: &mut Qcow2Image, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
    let mut data = bytes.to_vec();
    image.write_at(offset, &[VolatileSlice::from(&mut data[..])])
}

pub fn try_read(image: &mut Qcow2Image, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut data = vec![0u8; len];
    image.read_at(offset, &[VolatileSlice::from(&mut data[..])])?;
    Ok(data)
}

pub fn read(image: &mut Qcow2Image, offset: u64, len: usize) -> Vec<u8> {
    try_read(image, offset, len).unwrap()
}

/// The refcount of the cluster at host offset `offset`.
pub fn refcount(image: &mut Qcow2Image, offset: u64) -> u64 {
    let cluster = offset >> image.header.cluster_bits;
    image.refcounts.get(&image.file, cluster).unwrap()
}

/// Where guest offset `guest`'s data is, for a cluster that has some.
pub fn host_of(image: &mut Qcow2Image, guest: u64) -> u64 {
    match image.mapping(guest).unwrap() {
        Mapping::Data { host, .. } => host,
        other => panic!("guest {guest:#x} is {other:?}"),
    }
}

/// The on-disk L2 entry for guest offset `guest` (0 when its L1 entry on disk is empty).
pub fn l2_entry_on_disk(file: &File, image: &Qcow2Image, guest: u64) -> u64 {
    let (l1_index, l2_index) = image.indices(guest);
    let l1_entry = read_u64(file, image.header.l1_table_offset + l1_index as u64 * 8);
    let table = l1_entry & super::OFFSET_MASK;
    if table == 0 {
        return 0;
    }
    read_u64(file, table + l2_index as u64 * 8)
}

/// Checks the image offline: no corruption, no leaked cluster.
pub fn check_clean(file: &File) {
    let report = check(file, false).unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:#?}",
        report.problems
    );
}
