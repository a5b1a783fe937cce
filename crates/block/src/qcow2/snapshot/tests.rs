//! Tests of the snapshot table format (parsing untrusted tables, writing entries) and of
//! creating, applying and deleting snapshots.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::*;
use crate::qcow2::read_header;
use crate::qcow2::testing::{
    check_clean, host_of, new_image, read, read_u64, refcount, reopen, write,
};
use crate::DiskImage;

fn sample(id: &str, name: &str) -> Snapshot {
    Snapshot {
        id: id.into(),
        name: name.into(),
        l1_table_offset: 0x30000,
        l1_size: 3,
        date_sec: 1_700_000_000,
        date_nsec: 123_456,
        vm_clock_nsec: 789,
        vm_state_size: 0,
        disk_size: Some(1 << 30),
        extra_rest: Vec::new(),
        icount: None,
    }
}

fn table(snapshots: &[Snapshot], version: u32) -> Vec<u8> {
    snapshots
        .iter()
        .flat_map(|s| s.to_bytes(version).unwrap())
        .collect()
}

#[test]
fn entries_round_trip_through_the_table_format() {
    let mut wide = sample("12", "snäp ✓");
    wide.vm_state_size = 5 << 32;
    wide.icount = Some(42);
    wide.extra_rest = vec![1, 2, 3, 4, 5, 6, 7, 8];
    let snapshots = vec![sample("1", "a"), wide, sample("3", "")];
    for s in &snapshots {
        let bytes = s.to_bytes(3).unwrap();
        let unpadded = ENTRY_HEADER + EXTRA_LEN + s.extra_rest.len() + s.id.len() + s.name.len();
        assert_eq!(bytes.len(), unpadded.next_multiple_of(8), "{s:?}");
    }
    let raw = table(&snapshots, 3);
    let (parsed, len) = parse_table(&raw, 3, 65536).unwrap();
    assert_eq!(parsed, snapshots);
    assert_eq!(len, raw.len() as u64);
    // The 32-bit VM state size saturates; the 64-bit one in the extra data is exact.
    let second = &raw[snapshots[0].to_bytes(3).unwrap().len()..];
    assert_eq!(be32(second, 32), u32::MAX);
}

#[test]
fn version_2_entries_carry_no_extra_data() {
    let mut old = sample("1", "old");
    old.disk_size = None;
    old.vm_state_size = 4096;
    let bytes = old.to_bytes(2).unwrap();
    assert_eq!(be32(&bytes, 36), 0, "no extra data");
    assert_eq!(bytes.len(), (ENTRY_HEADER + 4).next_multiple_of(8));
    let (parsed, _) = parse_table(&bytes, 1, 512).unwrap();
    assert_eq!(parsed, [old]);
}

#[test]
fn short_extra_data_as_older_writers_left_it_parses() {
    let full = sample("1", "x").to_bytes(3).unwrap();
    for (extra, disk_size) in [(8usize, None), (16, Some(1u64 << 30))] {
        let mut entry = full[..ENTRY_HEADER].to_vec();
        entry[36..40].copy_from_slice(&(extra as u32).to_be_bytes());
        entry.extend_from_slice(&full[ENTRY_HEADER..ENTRY_HEADER + extra]);
        entry.extend_from_slice(b"1x");
        let (parsed, len) = parse_table(&entry, 1, 512).unwrap();
        assert_eq!(len, entry.len().next_multiple_of(8) as u64);
        assert_eq!((parsed[0].disk_size, parsed[0].icount), (disk_size, None));
        assert_eq!((parsed[0].id.as_str(), parsed[0].name.as_str()), ("1", "x"));
    }
}

#[test]
fn every_truncation_of_a_table_is_an_error() {
    // The last entry needs no padding: every strict prefix cuts into an entry.
    let snapshots = [sample("1", "first"), sample("2", "abcdefg")];
    let raw = table(&snapshots, 3);
    assert_eq!(raw.len() % 8, 0);
    for cut in 0..raw.len() {
        let err = parse_table(&raw[..cut], 2, 65536).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "cut at {cut}");
    }
    assert!(parse_table(&raw, 2, 65536).is_ok());
}

#[test]
fn hostile_counts_and_sizes_are_errors() {
    let one = sample("1", "s").to_bytes(3).unwrap();
    // A count far beyond the bytes there: an error at the first missing entry.
    let err = parse_table(&one, u32::MAX, 65536).unwrap_err();
    assert!(
        err.to_string()
            .contains("snapshot 1: the table is truncated"),
        "{err}"
    );
    let patched = |at: usize, bytes: &[u8]| {
        let mut raw = one.clone();
        raw[at..at + bytes.len()].copy_from_slice(bytes);
        raw.resize(raw.len() + 2048, 0);
        raw
    };
    let cases: [(Vec<u8>, &str); 5] = [
        (patched(36, &1025u32.to_be_bytes()), "too much extra data"),
        (patched(0, &0x30200u64.to_be_bytes()), "invalid L1 table"),
        (
            patched(8, &((header::MAX_L1_BYTES / 8 + 1) as u32).to_be_bytes()),
            "invalid L1 table",
        ),
        (patched(12, &u16::MAX.to_be_bytes()), "truncated"),
        (patched(14, &u16::MAX.to_be_bytes()), "truncated"),
    ];
    for (raw, expected) in cases {
        let err = parse_table(&raw, 1, 65536).unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
    }
    // The limits themselves are accepted.
    let mut raw = patched(36, &1024u32.to_be_bytes());
    raw.truncate(ENTRY_HEADER + 1024 + 2);
    let (parsed, _) = parse_table(&raw, 1, 65536).unwrap();
    assert_eq!(parsed[0].extra_rest.len(), 1024 - EXTRA_LEN);
    let raw = patched(8, &((header::MAX_L1_BYTES / 8) as u32).to_be_bytes());
    assert!(parse_table(&raw, 1, 65536).is_ok());
}

#[test]
fn names_that_are_not_utf8_are_read_not_refused() {
    let mut raw = sample("1", "ab").to_bytes(3).unwrap();
    let name = ENTRY_HEADER + EXTRA_LEN + 1;
    raw[name..name + 2].copy_from_slice(&[0xff, 0xfe]);
    let (parsed, _) = parse_table(&raw, 1, 65536).unwrap();
    assert_eq!(parsed[0].name, "\u{fffd}\u{fffd}");
}

#[test]
fn names_longer_than_the_format_allows_are_refused() {
    let long = "n".repeat(usize::from(u16::MAX) + 1);
    let err = sample("1", &long).to_bytes(3).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(sample("1", &long[1..]).to_bytes(3).is_ok());
}

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
    let bytes = table(&snapshots, 3);
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
