//! `qcow2::check` against `qemu-img check`: damage done to qemu-img's images is found and
//! counted as qemu-img counts it, and what `--repair` leaves passes `qemu-img check`, keeps the
//! guest's data and takes writes again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use block::qcow2::{self, CheckReport, ProblemKind};
use common::*;

/// A qemu-img image with data in two L2 tables, a compressed cluster and a snapshot.
fn image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    create_qcow2(&path, "64k", 1 << 30);
    qemu_io(
        &path,
        "qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 600M 64k",
            "write -c -P 0x44 2M 64k",
        ],
    );
    qemu_img(&["snapshot", "-c", "before", path.to_str().unwrap()]);
    qemu_io(&path, "qcow2", &["write -P 0x33 0 64k"]);
    assert_clean(&path);
    path
}

/// What the guest reads from [`image`].
fn assert_data_intact(path: &Path) {
    qemu_io(
        path,
        "qcow2",
        &[
            "read -P 0x33 0 64k",
            "read -P 0x11 64k 960k",
            "read -P 0x22 600M 64k",
            "read -P 0x44 2M 64k",
        ],
    );
}

fn run_check(path: &Path, repair: bool) -> CheckReport {
    let file = OpenOptions::new()
        .read(true)
        .write(repair)
        .open(path)
        .unwrap();
    qcow2::check(&file, repair).unwrap()
}

fn qemu_counts(path: &Path) -> (u64, u64) {
    let report = check_report(path);
    let count = |key: &str| report.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    (count("corruptions"), count("leaks"))
}

type Damage = fn(&Qcow2File);

/// Damage qemu-img's check and Ferro's count alike, all of which a repair fixes.
fn repairable_damage() -> Vec<(&'static str, Damage)> {
    vec![
        ("header counted free", |f| f.set_refcount(0, 0)),
        ("L1 table counted free", |f| f.set_refcount(f.l1_offset, 0)),
        ("L2 table counted free", |f| {
            f.set_refcount(f.l2_table(0), 0)
        }),
        ("refcount block counted free", |f| {
            f.set_refcount(f.refcount_block(0), 0)
        }),
        ("snapshot L1 table counted free", |f| {
            f.set_refcount(f.first_snapshot_l1(), 0)
        }),
        ("data cluster counted twice", |f| {
            let data = f.u64_at(f.l2_table(0)) & 0x00ff_ffff_ffff_fe00;
            f.set_refcount(data, 2);
        }),
        ("cluster past the data leaked", |f| {
            let len = std::fs::metadata(&f.path).unwrap().len();
            let end = len.next_multiple_of(f.cluster_size());
            File::options()
                .write(true)
                .open(&f.path)
                .unwrap()
                .set_len(end + f.cluster_size())
                .unwrap();
            f.set_refcount(end, 1);
        }),
        ("COPIED flag missing on an L1 entry", |f| {
            f.set_u64(f.l1_offset, f.l1_entry(0) & !(1 << 63))
        }),
        ("COPIED flag on a shared L2 table", |f| {
            f.set_u64(f.l1_offset + 8, f.l1_entry(1) | (1 << 63))
        }),
        ("a whole refcount block lost", |f| {
            f.set_u64(f.refcount_table, 0);
        }),
    ]
}

#[test]
fn damage_is_counted_as_qemu_img_counts_it() {
    let dir = tempfile::tempdir().unwrap();
    let clean = image(dir.path(), "clean.qcow2");
    let report = run_check(&clean, false);
    assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:#?}");
    let theirs = check_report(&clean);
    assert_eq!(report.allocated_clusters, theirs["allocated-clusters"]);
    assert_eq!(report.image_end_offset, theirs["image-end-offset"]);
    assert_eq!(report.total_clusters, theirs["total-clusters"]);
    for (i, (what, damage)) in repairable_damage().into_iter().enumerate() {
        let path = image(dir.path(), &format!("{i}.qcow2"));
        damage(&Qcow2File::read(&path));
        let report = run_check(&path, false);
        let ours = (report.corruptions, report.leaks);
        assert_ne!(ours, (0, 0), "{what}: nothing found");
        assert_eq!(ours, qemu_counts(&path), "{what}: {:#?}", report.problems);
        assert!(report.problems.iter().all(|p| p.repairable), "{what}");
    }
}

#[test]
fn repaired_images_pass_qemu_img_check_and_keep_their_data() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, damage)) in repairable_damage().into_iter().enumerate() {
        let path = image(dir.path(), &format!("{i}.qcow2"));
        damage(&Qcow2File::read(&path));
        let found = run_check(&path, false);
        let report = run_check(&path, true);
        assert_eq!(
            (report.corruptions, report.leaks),
            (0, 0),
            "{what}: {:#?}",
            report.problems
        );
        assert_eq!(
            (report.corruptions_fixed, report.leaks_fixed),
            (found.corruptions, found.leaks),
            "{what}"
        );
        assert!(!report.repairs.is_empty(), "{what}");
        assert_clean(&path);
        assert_data_intact(&path);
        // Ferro opens it again and its writes keep it clean.
        let mut disk = block::open(&path, false, None).unwrap();
        apply(
            disk.as_mut(),
            Op::Write {
                offset: 5 << 20,
                len: 3 << 20,
                seed: 9,
            },
        )
        .unwrap();
        drop(disk);
        assert_clean(&path);
        assert_data_intact(&path);
        // A second repair finds nothing to do.
        let again = run_check(&path, true);
        assert!(again.repairs.is_empty(), "{what}: {:?}", again.repairs);
    }
}

#[test]
fn a_dirty_image_is_repaired_and_its_dirty_bit_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "dirty.qcow2");
    let f = Qcow2File::read(&path);
    f.set_u64(72, 1); // dirty: refcounts may be stale
    let data = f.u64_at(f.l2_table(0) + 16) & 0x00ff_ffff_ffff_fe00;
    f.set_refcount(data, 0);
    assert!(block::open(&path, false, None).is_err());
    // A read-only open trusts no refcount of a dirty image, so it works.
    drop(block::open(&path, true, None).unwrap());
    let report = run_check(&path, true);
    assert_eq!((report.corruptions, report.leaks), (0, 0));
    assert!(
        report.repairs.iter().any(|r| r.contains("dirty")),
        "{:?}",
        report.repairs
    );
    assert_eq!(f.u64_at(72), 0);
    assert_clean(&path);
    drop(block::open(&path, false, None).unwrap());
}

#[test]
fn structural_damage_is_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "overlap.qcow2");
    let f = Qcow2File::read(&path);
    // Guest data on the active L1 table, counted as in use.
    f.set_u64(f.l2_table(0) + 8, (1 << 63) | f.l1_offset);
    f.set_refcount(f.l1_offset, 2);
    let theirs = qemu_counts(&path);
    assert!(theirs.0 > 0, "qemu-img sees a corruption: {theirs:?}");
    let report = run_check(&path, false);
    let problem = report
        .problems
        .iter()
        .find(|p| p.message.contains("is on the L1 table"))
        .unwrap_or_else(|| panic!("{:#?}", report.problems));
    assert_eq!(problem.kind, ProblemKind::Corruption);
    assert!(!problem.repairable);
    let repaired = run_check(&path, true);
    assert!(repaired.corruptions > 0);
    // Overlapping tables too.
    let path = image(dir.path(), "tables.qcow2");
    let f = Qcow2File::read(&path);
    f.set_u64(f.l1_offset + 8, (1 << 63) | f.refcount_block(0));
    let report = run_check(&path, false);
    assert!(
        report.problems.iter().any(|p| p
            .message
            .contains("a refcount block and an L2 table overlap")),
        "{:#?}",
        report.problems
    );
    assert!(qemu_counts(&path).0 > 0);
    let before = std::fs::read(&path).unwrap();
    let repaired = run_check(&path, true);
    // The rebuilt refcounts live elsewhere, but the L2 table's entries are still garbage.
    assert!(repaired.corruptions > 0, "{:#?}", repaired.problems);
    assert!(qemu_counts(&path).0 > 0);
    // The tables are left as they were; only the header's refcount table fields changed.
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after[..48], before[..48]);
    assert_eq!(after[60..65536], before[60..65536]);
    let l1 = f.l1_offset as usize;
    assert_eq!(after[l1..l1 + 65536], before[l1..l1 + 65536]);
}

#[test]
fn a_snapshot_table_that_cannot_be_read_stops_a_repair() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "snapshots.qcow2");
    let f = Qcow2File::read(&path);
    f.set_refcount(f.l1_offset, 0);
    // The entry's L1 table offset is no longer aligned: the table cannot be used, and a
    // rebuild without its references would free the snapshot's clusters.
    f.set_u64(f.snapshots_offset, f.first_snapshot_l1() + 8);
    let before = std::fs::read(&path).unwrap();
    let report = run_check(&path, false);
    assert!(report.corruptions > 0);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let err = qcow2::check(&file, true).unwrap_err();
    assert!(err.to_string().contains("cannot repair"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
