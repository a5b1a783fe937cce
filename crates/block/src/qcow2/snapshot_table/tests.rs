//! Tests of the snapshot table format: entries round-trip, older and hostile tables.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

/// A plausible version 3 entry, for tests here and of the snapshot operations.
pub(crate) fn sample(id: &str, name: &str) -> Snapshot {
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
