//! Unit tests of the qcow2 core on images in temporary files: allocation, refcount updates,
//! the L2 cache, the snapshot table, and writes that would land on metadata.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::metadata::Structure;
use super::testing::{check_clean, new_image, read, read_bytes, refcount, reopen, write};
use super::*;

#[test]
fn a_guest_write_into_a_data_cluster_that_is_metadata_is_refused() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    drop(image);
    // Point guest cluster 1's L2 entry at the refcount block, flagged as owned.
    let image = reopen(&file);
    let l2 = image.l1[0] & OFFSET_MASK;
    let block = image.refcounts.table_entry(0);
    drop(image);
    file.write_all_at(&(block | COPIED).to_be_bytes(), l2 + 8)
        .unwrap();
    let block_before = read_bytes(&file, block, 4096);
    let mut image = reopen(&file);
    let err = write(&mut image, 4096 + 512, &[9u8; 512]).unwrap_err();
    assert!(err.to_string().contains("a refcount block"), "{err}");
    assert!(
        write(&mut image, 0, &[2u8; 512]).is_err(),
        "later writes fail too"
    );
    assert_eq!(
        read(&mut image, 0, 4096),
        vec![1u8; 4096],
        "reads still work"
    );
    drop(image);
    assert_eq!(read_bytes(&file, block, 4096), block_before);
}

#[test]
fn writes_through_an_l2_table_that_points_at_itself_are_refused() {
    let (file, mut image) = new_image(12, 1 << 20);
    write(&mut image, 0, &[1u8; 4096]).unwrap();
    let l2 = image.l1[0] & OFFSET_MASK;
    drop(image);
    file.write_all_at(&(l2 | COPIED).to_be_bytes(), l2 + 16)
        .unwrap();
    let l2_before = read_bytes(&file, l2, 4096);
    let mut image = reopen(&file);
    let err = write(&mut image, 2 * 4096, &[0xffu8; 4096]).unwrap_err();
    assert!(err.to_string().contains("an L2 table"), "{err}");
    drop(image);
    assert_eq!(read_bytes(&file, l2, 4096), l2_before);
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
    let bytes: Vec<u8> = snapshots
        .iter()
        .flat_map(|s| s.to_bytes(3).unwrap())
        .collect();
    assert_eq!(bytes.len() as u64, len);
    let (parsed, parsed_len) = snapshot::parse_table(&bytes, 2, 4096).unwrap();
    assert_eq!((parsed, parsed_len), (snapshots, len));
    // Truncated tables and absurd entries are errors.
    assert!(snapshot::parse_table(&bytes[..50], 2, 4096).is_err());
    let mut bad = bytes.clone();
    bad[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(snapshot::parse_table(&bad, 2, 4096).is_err());
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
