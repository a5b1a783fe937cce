//! Tests of creating, applying and deleting snapshots, and of reading and writing an image's
//! snapshot table (the entry format is tested in `snapshot_table`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::*;
use crate::qcow2::read_header;
use crate::qcow2::snapshot_table::tests::sample;
use crate::qcow2::testing::{
    check_clean, host_of, new_image, read, read_u64, refcount, reopen, write,
};
use crate::DiskImage;

#[test]
fn a_snapshot_table_beyond_the_limits_or_the_file_is_an_error() {
    let (file, mut image) = new_image(12, 1 << 20);
    image.header.nb_snapshots = header::MAX_SNAPSHOTS + 1;
    assert!(image.snapshots().is_err());
    image.header.nb_snapshots = 1;
    image.header.snapshots_offset = file.metadata().unwrap().len() + 4096;
    let err = image.snapshots().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}

#[test]
fn snapshot_table_entries_round_trip() {
    let (_file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[3u8; 4096]).unwrap();
    let made = image.create_snapshot("first").unwrap();
    image.create_snapshot("second").unwrap();
    let (snapshots, len) = image.read_snapshot_table().unwrap();
    assert_eq!(snapshots.len(), 2);
    assert_eq!(snapshots[0], made);
    assert_eq!(
        (snapshots[0].id.as_str(), snapshots[1].id.as_str()),
        ("1", "2")
    );
    let bytes = table_bytes(&snapshots, 3).unwrap();
    assert_eq!(bytes.len() as u64, len);
    let (parsed, parsed_len) = parse_table(&bytes, 2, 4096).unwrap();
    assert_eq!((parsed, parsed_len), (snapshots, len));
}

#[test]
fn a_snapshot_shares_every_cluster_of_the_disk() {
    let (file, mut image) = new_image(12, 4 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    write(&mut image, 2 << 20, &[2u8; 4096]).unwrap();
    let made = image.create_snapshot("s").unwrap();
    assert_eq!(made.l1_size as usize, image.l1.len());
    assert_eq!(made.disk_size, Some(4 << 20));
    for (i, entry) in image.l1.clone().into_iter().enumerate() {
        let copy = read_u64(&file, made.l1_table_offset + i as u64 * 8);
        assert_eq!(copy & OFFSET_MASK, entry & OFFSET_MASK);
        assert_eq!(entry & COPIED, 0, "the active L1 shares table {i}");
        assert_eq!(refcount(&mut image, entry & OFFSET_MASK), 2);
    }
    for guest in [0, 2 << 20] {
        let host = host_of(&mut image, guest);
        assert_eq!(refcount(&mut image, host), 2);
        assert_eq!(
            image.mapping(guest).unwrap(),
            Mapping::Data { host, owned: false }
        );
    }
    assert_eq!(refcount(&mut image, made.l1_table_offset), 1);
    drop(image);
    check_clean(&file);
}

#[test]
fn applying_a_snapshot_brings_back_its_contents_and_keeps_it() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    image.create_snapshot("s").unwrap();
    write(&mut image, 0, &[2u8; 100]).unwrap();
    write(&mut image, 8192, &[3u8; 4096]).unwrap();
    image.apply_snapshot("s").unwrap();
    assert_eq!(read(&mut image, 0, 4096), vec![1u8; 4096]);
    assert_eq!(read(&mut image, 8192, 4096), vec![0u8; 4096]);
    write(&mut image, 0, &[4u8; 4096]).unwrap();
    image.apply_snapshot("1").unwrap(); // by id
    assert_eq!(read(&mut image, 0, 4096), vec![1u8; 4096]);
    assert_eq!(image.snapshots().unwrap().len(), 1);
    drop(image);
    check_clean(&file);
    let mut image = reopen(&file);
    assert_eq!(read(&mut image, 0, 4096), vec![1u8; 4096]);
}

#[test]
fn applying_a_snapshot_taken_before_a_resize_restores_the_size() {
    let (file, mut image) = new_image(12, 1 << 20);
    image.create_snapshot("small").unwrap();
    image.resize(8 << 20).unwrap();
    write(&mut image, 7 << 20, &[1u8; 512]).unwrap();
    image.apply_snapshot("small").unwrap();
    assert_eq!(image.size(), 1 << 20);
    assert_eq!(read_header(&file).unwrap().size, 1 << 20);
    drop(image);
    check_clean(&file);
}

#[test]
fn deleting_a_snapshot_frees_what_only_it_used() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 8192]).unwrap();
    let snapshot = image.create_snapshot("s").unwrap();
    let old = host_of(&mut image, 0);
    let kept = host_of(&mut image, 4096);
    write(&mut image, 0, &[2u8; 4096]).unwrap();
    image.flush().unwrap();
    assert_eq!(refcount(&mut image, old), 1, "the snapshot's alone");
    image.delete_snapshot("s").unwrap();
    assert!(image.snapshots().unwrap().is_empty());
    assert_eq!(refcount(&mut image, old), 0);
    assert_eq!(refcount(&mut image, snapshot.l1_table_offset), 0);
    assert_eq!(refcount(&mut image, kept), 1);
    // Owned again: the next write goes in place.
    assert_eq!(
        image.mapping(4096).unwrap(),
        Mapping::Data {
            host: kept,
            owned: true
        }
    );
    assert_ne!(image.l1[0] & COPIED, 0);
    assert_eq!(read(&mut image, 0, 8192)[..4096], [2u8; 4096]);
    drop(image);
    check_clean(&file);
}

#[test]
fn snapshot_names_must_be_new_and_not_empty() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    image.create_snapshot("s").unwrap();
    for name in ["", "s", "1"] {
        let err = image.create_snapshot(name).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{name:?}");
    }
    let err = image.apply_snapshot("nope").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    let err = image.delete_snapshot("nope").unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert_eq!(image.snapshots().unwrap().len(), 1);
    drop(image);
    check_clean(&file);
}

#[test]
fn a_name_too_long_for_the_table_changes_nothing() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    let long = "n".repeat(usize::from(u16::MAX) + 1);
    let err = image.create_snapshot(&long).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    assert!(image.snapshots().unwrap().is_empty());
    let host = host_of(&mut image, 0);
    assert_eq!(
        image.mapping(0).unwrap(),
        Mapping::Data { host, owned: true }
    );
    drop(image);
    check_clean(&file);
}

#[test]
fn a_table_too_large_to_read_back_is_refused_before_anything_changes() {
    let (file, mut image) = new_image(12, 1 << 20);
    let len = file.metadata().unwrap().len();
    // 1025 entries of about 64 KiB each: just over the 64 MiB readers accept.
    let name = "n".repeat(usize::from(u16::MAX));
    let huge: Vec<Snapshot> = (0..1025)
        .map(|i| Snapshot {
            l1_table_offset: 0,
            l1_size: 0,
            ..sample(&i.to_string(), &name)
        })
        .collect();
    let err = image.write_snapshot_table(&huge).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    assert_eq!(image.header.nb_snapshots, 0);
    assert_eq!(read_header(&file).unwrap().nb_snapshots, 0);
    assert_eq!(file.metadata().unwrap().len(), len, "nothing was written");
}

/// Rewrites the snapshot table in place as an older QEMU wrote it: 16 bytes of extra data per
/// entry instead of Ferro's 24, so it is shorter than Ferro would write it.
fn shrink_snapshot_extra_data(file: &File, image: &Qcow2Image) -> u64 {
    let (snapshots, _) = image.read_snapshot_table().unwrap();
    let mut raw = Vec::new();
    for snapshot in &snapshots {
        let full = snapshot.to_bytes(3).unwrap();
        let (id, name) = (snapshot.id.len(), snapshot.name.len());
        let mut entry = full[..40].to_vec();
        entry[36..40].copy_from_slice(&16u32.to_be_bytes());
        entry.extend_from_slice(&full[40..56]);
        entry.extend_from_slice(&full[64..64 + id + name]);
        entry.resize(entry.len().next_multiple_of(8), 0);
        raw.extend_from_slice(&entry);
    }
    file.write_all_at(&raw, image.header.snapshots_offset)
        .unwrap();
    raw.len() as u64
}

#[test]
fn replacing_a_snapshot_table_frees_exactly_the_clusters_it_used() {
    // 512-byte clusters; eight entries take 576 bytes as Ferro writes them, 512 as older
    // QEMUs did. The old table's length must come from the table, not from re-encoding it.
    let (file, mut image) = new_image(9, 1 << 20);
    for i in 0..8 {
        image.create_snapshot(&format!("s{i}")).unwrap();
    }
    let table = image.header.snapshots_offset;
    assert_eq!(refcount(&mut image, table + 512), 1, "a two-cluster table");
    let len = shrink_snapshot_extra_data(&file, &image);
    assert_eq!(len, 512);
    // Its second cluster is free now, and guest data takes it.
    image
        .refcounts
        .set_unchecked(&image.file, (table + 512) >> 9, 0)
        .unwrap();
    drop(image);
    check_clean(&file);
    // A guest write takes the lowest free clusters (for its data and its L2 table): that one.
    let mut image = reopen(&file);
    write(&mut image, 0, &[5u8; 512]).unwrap();
    image.flush().unwrap();
    assert_eq!(refcount(&mut image, table + 512), 1);
    image.delete_snapshot("s3").unwrap();
    assert_eq!(
        refcount(&mut image, table + 512),
        1,
        "the guest's cluster stays in use"
    );
    drop(image);
    check_clean(&file);
    let mut image = reopen(&file);
    assert_eq!(read(&mut image, 0, 512), vec![5u8; 512]);
}

#[test]
fn snapshots_are_recorded_as_metadata_and_forgotten_when_deleted() {
    let (_file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[3u8; 4096]).unwrap();
    let snapshot = image.create_snapshot("s").unwrap();
    let table = image.header.snapshots_offset;
    let map = image.refcounts.metadata();
    assert_eq!(
        map.find(map.clusters(table, 1)).map(|(what, _)| what),
        Some(Structure::SnapshotTable)
    );
    assert_eq!(
        map.find(map.clusters(snapshot.l1_table_offset, 1))
            .map(|(what, _)| what),
        Some(Structure::SnapshotL1 { index: 0 })
    );
    image.delete_snapshot("s").unwrap();
    let map = image.refcounts.metadata();
    assert_eq!(map.find(map.clusters(table, 1)), None);
    assert_eq!(map.find(map.clusters(snapshot.l1_table_offset, 1)), None);
}
