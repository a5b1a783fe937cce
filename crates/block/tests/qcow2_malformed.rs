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
    // L1 entry 0 -> an L2 table far beyond the end of the file: refused on open, read-only
    // too, since the L1 table is checked then.
    patch(
        &path,
        layout.l1_entry,
        &((1u64 << 63) | (1 << 40)).to_be_bytes(),
    );
    let message = open_error(&path);
    assert!(
        message.contains("an L2 table at offset 0x10000000000 is past the end of the file"),
        "{message}"
    );
    assert!(open(&path, true, None).is_err());
    let mut buf = vec![0u8; 4096];
    // A data cluster that is not aligned.
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

/// A qemu-img image with data in two L2 tables and a snapshot: every kind of metadata.
fn full_image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    create_qcow2(&path, "64k", 1 << 30);
    qemu_io(
        &path,
        "qcow2",
        &["write -P 0x11 0 1M", "write -P 0x22 600M 64k"],
    );
    qemu_img(&["snapshot", "-c", "before", path.to_str().unwrap()]);
    qemu_io(&path, "qcow2", &["write -P 0x33 0 64k"]);
    assert_clean(&path);
    path
}

/// The damaged image is refused by every open, read-only ones too (the daemon's upload
/// check and `ferro img info` use those), with an error naming what is wrong.
fn assert_refused(path: &Path, expected: &str) {
    let message = open_error(path);
    assert!(message.contains(expected), "{message}");
    assert!(message.contains("ferro img check"), "{message}");
    assert!(open(path, true, None).is_err(), "read-only open");
    assert!(block::manage::info(path, None).is_err(), "info");
}

#[test]
fn an_image_whose_header_is_counted_free_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for maker in ["ferro", "qemu-img"] {
        let path = dir.path().join(format!("{maker}.qcow2"));
        if maker == "ferro" {
            create(dir.path(), "ferro.qcow2", 4 * MIB, None);
        } else {
            create_qcow2(&path, "64k", 4 * MIB);
        }
        let image = Qcow2File::read(&path);
        image.set_refcount(0, 0);
        let damaged = std::fs::read(&path).unwrap();
        // Before the fix the first guest write took cluster 0: the header.
        assert_refused(
            &path,
            "the header at offset 0x0 is marked free (refcount 0)",
        );
        assert!(open_error(&path).contains("ferro img check --repair"));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            damaged,
            "a refused open writes nothing"
        );
    }
}

#[test]
fn metadata_counted_free_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    type Locate = fn(&Qcow2File) -> u64;
    let cases: &[(&str, Locate, &str)] = &[
        ("l1", |f| f.l1_offset, "the L1 table"),
        ("refcount-table", |f| f.refcount_table, "the refcount table"),
        (
            "refcount-block",
            |f| f.refcount_block(0),
            "a refcount block",
        ),
        ("l2", |f| f.l2_table(1), "an L2 table"),
        (
            "snapshot-table",
            |f| f.snapshots_offset,
            "the snapshot table",
        ),
        (
            "snapshot-l1",
            |f| f.first_snapshot_l1(),
            "the L1 table of snapshot #0",
        ),
    ];
    for (name, locate, what) in cases {
        let path = full_image(dir.path(), &format!("{name}.qcow2"));
        let image = Qcow2File::read(&path);
        let offset = locate(&image);
        image.set_refcount(offset, 0);
        assert_refused(
            &path,
            &format!("{what} at offset {offset:#x} is marked free"),
        );
        assert!(open_error(&path).contains("--repair"));
    }
}

#[test]
fn overlapping_tables_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    type Damage = fn(&Qcow2File);
    let cases: &[(&str, Damage, &str)] = &[
        (
            "l1-on-refcount-table",
            |f| f.set_u64(40, f.refcount_table),
            "the refcount table and the L1 table overlap",
        ),
        (
            "l2-on-refcount-block",
            |f| f.set_u64(f.l1_offset + 8, (1 << 63) | f.refcount_block(0)),
            "a refcount block and an L2 table overlap",
        ),
        (
            "l2-twice",
            |f| f.set_u64(f.l1_offset + 8, f.l1_entry(0)),
            "an L2 table and an L2 table overlap",
        ),
        (
            "l2-on-snapshot-table",
            |f| f.set_u64(f.l1_offset + 8, (1 << 63) | f.snapshots_offset),
            "the snapshot table and an L2 table overlap",
        ),
        (
            "snapshot-l1-on-active-l1",
            |f| f.set_u64(f.snapshots_offset, f.l1_offset),
            "the L1 table and the L1 table of snapshot #0 overlap",
        ),
        (
            "snapshot-table-on-header",
            |f| f.set_u64(64, 0),
            "the header and the snapshot table overlap",
        ),
        (
            "refcount-table-on-header",
            |f| f.set_u64(48, 0),
            "the header and the refcount table overlap",
        ),
    ];
    for (name, damage, expected) in cases {
        let path = full_image(dir.path(), &format!("{name}.qcow2"));
        damage(&Qcow2File::read(&path));
        assert_refused(&path, expected);
    }
}

#[test]
fn an_owned_flag_on_a_shared_l2_table_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = full_image(dir.path(), "shared.qcow2");
    let image = Qcow2File::read(&path);
    // L2 table 1 is shared with the snapshot (refcount 2): writing it in place would change
    // the snapshot.
    assert_eq!(image.refcount(image.l2_table(1)), 2);
    image.set_u64(image.l1_offset + 8, image.l1_entry(1) | (1 << 63));
    assert_refused(&path, "is shared (refcount 2) but flagged as owned");
}

#[test]
fn a_write_over_metadata_fails_and_marks_the_image_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = full_image(dir.path(), "over.qcow2");
    let image = Qcow2File::read(&path);
    // Guest cluster 1 (in the table L1 entry 0 owns) claims the L1 table as its data cluster.
    let l2 = image.l2_table(0);
    image.set_u64(l2 + 8, (1 << 63) | image.l1_offset);
    image.set_refcount(image.l1_offset, 2);
    let l1_before = image.bytes_at(image.l1_offset, 65536);
    let mut disk = open(&path, false, None).unwrap();
    let mut buf = vec![0xffu8; 4096];
    let err = disk
        .write_at(65536, &[VolatileSlice::from(&mut buf[..])])
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("refusing to write guest data")
            && message.contains("the L1 table is there")
            && message.contains("marked corrupt"),
        "{message}"
    );
    // Nothing more is written, not even to clusters that are fine.
    assert!(disk
        .write_at(0, &[VolatileSlice::from(&mut buf[..])])
        .is_err());
    assert!(disk.flush().is_err());
    drop(disk);
    assert_eq!(image.bytes_at(image.l1_offset, 65536), l1_before);
    assert_ne!(image.u64_at(72) & 2, 0, "the corrupt bit is set");
    assert!(open_error(&path).contains("marked corrupt"));
    // Read-only use goes on.
    let mut disk = open(&path, true, None).unwrap();
    let mut first = vec![0u8; 65536];
    disk.read_at(0, &[VolatileSlice::from(&mut first[..])])
        .unwrap();
    assert_eq!(first, vec![0x33u8; 65536]);
    drop(disk);
    let report = check_report(&path);
    assert!(report["corruptions"].as_u64().unwrap() > 0, "{report}");
}
