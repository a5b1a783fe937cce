//! Tests of clones: linked and full, the copy plans, holes and data, and a clone cut short
//! by a crash.

use super::*;
use crate::failure::Kind;
use crate::pools::tests::{create, open_volume, qcow2_naming, read, setup, write};

#[test]
fn a_clone_reads_the_format_of_the_file_it_copies() {
    let (dir, pools) = setup();
    let source = create(&pools, "src", Some("1M"), "raw", None).unwrap();
    // Replaced behind the daemon's back by a qcow2 naming another volume: the record of
    // the old file does not apply to it, and the new one is not trusted.
    create(&pools, "other", Some("1M"), "raw", None).unwrap();
    let evil = dir.path().join("evil");
    qcow2_naming(&evil, "other", Some("raw"));
    std::fs::rename(&evil, &source.path).unwrap();
    let full = VolumeClone {
        name: "copy".into(),
        linked: false,
    };
    let err = pools.clone_volume("p", "src", &full).unwrap_err();
    assert!(
        err.message.contains("no recorded format"),
        "{}",
        err.message
    );
}

#[test]
fn linked_clones_share_a_base_full_clones_stand_alone() {
    let (_dir, pools) = setup();
    let base = create(&pools, "base.raw", Some("8M"), "raw", None).unwrap();
    write(&base.path, 4096, b"base data");
    let a = pools
        .clone_volume(
            "p",
            "base.raw",
            &VolumeClone {
                name: "a.qcow2".into(),
                linked: true,
            },
        )
        .unwrap();
    let b = pools
        .clone_volume(
            "p",
            "base.raw",
            &VolumeClone {
                name: "b.qcow2".into(),
                linked: true,
            },
        )
        .unwrap();
    assert_eq!(a.backing.as_deref(), Some("base.raw"));
    assert_eq!(a.capacity_bytes, 8 << 20);
    write(&a.path, 4096, b"only in a");
    assert_eq!(read(&a.path, 4096, 9), b"only in a");
    assert_eq!(read(&b.path, 4096, 9), b"base data");
    assert_eq!(read(&base.path, 4096, 9), b"base data");
    let refused = pools.delete_volume("p", "base.raw", |_| None).unwrap_err();
    assert!(
        refused.message.contains("backing of a.qcow2"),
        "{refused:?}"
    );

    assert_eq!(
        lock_source(&a).unwrap().plan,
        CopyPlan::Image {
            format: Format::Qcow2,
            size: 8 << 20
        },
        "an overlay is flattened"
    );
    let full = pools
        .clone_volume(
            "p",
            "a.qcow2",
            &VolumeClone {
                name: "full.qcow2".into(),
                linked: false,
            },
        )
        .unwrap();
    assert_eq!(full.backing, None);
    assert_eq!(read(&full.path, 4096, 9), b"only in a");
    assert!(
        full.allocation_bytes < 2 << 20,
        "zero chunks stay unallocated"
    );
    pools.delete_volume("p", "a.qcow2", |_| None).unwrap();
    assert_eq!(
        read(&full.path, 4096, 9),
        b"only in a",
        "the copy needs nothing of its source"
    );
}

#[test]
fn a_standalone_qcow2_volume_is_copied_as_it_is_snapshots_and_all() {
    let (_dir, pools) = setup();
    let disk = create(&pools, "d.qcow2", Some("4M"), "qcow2", None).unwrap();
    write(&disk.path, 0, b"before");
    let taken = manage::SnapshotOp::Create("s1".into());
    pools.snapshots("p", "d.qcow2", &taken).unwrap();
    write(&disk.path, 0, b"after!");
    let len = std::fs::metadata(&disk.path).unwrap().len();
    assert_eq!(
        lock_source(&disk).unwrap().plan,
        CopyPlan::File {
            format: Format::Qcow2,
            len
        }
    );
    let full = VolumeClone {
        name: "c.qcow2".into(),
        linked: false,
    };
    let copy = pools.clone_volume("p", "d.qcow2", &full).unwrap();
    assert_eq!(
        (copy.format.as_str(), copy.capacity_bytes),
        ("qcow2", 4 << 20)
    );
    assert_eq!(read(&copy.path, 0, 6), b"after!");
    let revert = manage::SnapshotOp::Apply("s1".into());
    pools.snapshots("p", "c.qcow2", &revert).unwrap();
    assert_eq!(read(&copy.path, 0, 6), b"before");
    assert_eq!(read(&disk.path, 0, 6), b"after!", "the source is its own");

    // Dirty (refcounts not written back): copied through the format, so the copy is
    // clean and usable.
    let dirty = pools.volume("p", "d.qcow2").unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&dirty.path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &1u64.to_be_bytes(), 72).unwrap();
    assert!(matches!(
        lock_source(&dirty).unwrap().plan,
        CopyPlan::Image { .. }
    ));
    let full = VolumeClone {
        name: "clean.qcow2".into(),
        linked: false,
    };
    let clean = pools.clone_volume("p", "d.qcow2", &full).unwrap();
    assert_eq!(read(&clean.path, 0, 6), b"after!");
    assert!(
        block::open(&clean.path, false, Some(Format::Qcow2)).is_ok(),
        "opens for writing"
    );
}

#[test]
fn a_qcow2_file_of_any_length_is_copied() {
    // qemu-img does not pad its files to 512 bytes, as Ferro's own images are.
    let (_dir, pools) = setup();
    let raw = create(&pools, "r.raw", Some("1M"), "raw", None).unwrap();
    let made = raw.path.with_file_name("q.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&made)
        .arg("1G")
        .status()
        .unwrap();
    assert!(status.success());
    let len = std::fs::metadata(&made).unwrap().len();
    assert_ne!(len % 512, 0, "the case this test is for");
    let full = VolumeClone {
        name: "copy.qcow2".into(),
        linked: false,
    };
    let copy = pools.clone_volume("p", "q.qcow2", &full).unwrap();
    assert_eq!(copy.capacity_bytes, 1 << 30);
    assert_eq!(std::fs::metadata(&copy.path).unwrap().len(), len);
}

#[test]
fn a_full_copy_of_a_raw_volume_keeps_data_and_holes() {
    let (_dir, pools) = setup();
    let base = create(&pools, "base.raw", Some("8M"), "raw", None).unwrap();
    write(&base.path, 4096, b"first");
    write(&base.path, 6 << 20, b"second");
    let clone = VolumeClone {
        name: "copy.raw".into(),
        linked: false,
    };
    let copy = pools.clone_volume("p", "base.raw", &clone).unwrap();
    assert_eq!(
        (copy.format.as_str(), copy.capacity_bytes),
        ("raw", 8 << 20)
    );
    assert_eq!(read(&copy.path, 4096, 5), b"first");
    assert_eq!(read(&copy.path, 6 << 20, 6), b"second");
    assert_eq!(read(&copy.path, 1 << 20, 4), [0; 4]);
    assert!(
        copy.allocation_bytes < 1 << 20,
        "holes stay holes: {copy:?}"
    );
}
/// Hidden files but the volumes' format records.
fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with('.') && !n.ends_with(".format"))
        .collect()
}

#[test]
fn zero_detection_sees_any_byte_anywhere() {
    let mut bytes = vec![0u8; 3 * 4096 + 100];
    assert!(is_all_zero(&bytes) && is_all_zero(&[]));
    for at in [0, 4095, 4096, bytes.len() - 1] {
        bytes[at] = 1;
        assert!(!is_all_zero(&bytes), "byte {at}");
        bytes[at] = 0;
    }
}

#[test]
fn a_full_clone_appears_whole_or_not_at_all() {
    let (_dir, pools) = setup();
    let base = create(&pools, "base.raw", Some("24M"), "raw", None).unwrap();
    write(&base.path, 0, &[7u8; 20 << 20]);
    let dir = base.path.parent().unwrap().to_path_buf();
    let target = dir.join("copy.raw");
    let clone = VolumeClone {
        name: "copy.raw".into(),
        linked: false,
    };
    let mut calls = 0;
    pools
        .clone_volume_with_progress("p", "base.raw", &clone, &mut |_, _| {
            calls += 1;
            assert!(!target.exists(), "visible before the copy is done");
            let mut hidden = hidden_files(&dir);
            hidden.sort();
            assert_eq!(hidden.len(), 2, "a hidden copy and its record: {hidden:?}");
            assert!(hidden[0].ends_with(".part") && hidden[1].ends_with(".unsynced"));
        })
        .unwrap();
    assert!(calls > 1);
    pools.finish_write_back();
    assert!(hidden_files(&dir).is_empty());
    assert_eq!(read(&target, (20 << 20) - 1, 1), [7]);

    // A source a VM writes cannot be copied: nothing is left behind.
    let writer = open_volume(&base.path, false);
    let clone = VolumeClone {
        name: "second.raw".into(),
        linked: false,
    };
    let err = pools.clone_volume("p", "base.raw", &clone).unwrap_err();
    assert_eq!(err.kind, Kind::Conflict, "{err:?}");
    drop(writer);
    assert!(!dir.join("second.raw").exists());
    assert!(hidden_files(&dir).is_empty());
}

#[test]
fn a_volume_whose_clone_a_host_crash_cut_short_is_reported_and_refused() {
    let (_dir, pools) = setup();
    let volume = create(&pools, "v.raw", Some("1M"), "raw", None).unwrap();
    let dir = volume.path.parent().unwrap().to_path_buf();
    // What a daemon of another boot left: its clone's record, never retired.
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&volume.path).unwrap());
    std::fs::write(
        dir.join(".v.raw.wb-4194305-0.unsynced"),
        format!("an-earlier-boot {inode}\n"),
    )
    .unwrap();
    assert!(
        !pools.volume("p", "v.raw").unwrap().incomplete,
        "not yet recovered"
    );
    pools.stop("p").unwrap();
    pools.start("p").unwrap();

    let listed = pools.volumes("p").unwrap();
    assert!(listed[0].incomplete, "{listed:?}");
    let err = pools.volume_for_vm("p", "v.raw").unwrap_err();
    assert_eq!(err.kind, Kind::Conflict);
    assert!(err.message.contains("may miss data"), "{}", err.message);
    let full = VolumeClone {
        name: "copy.raw".into(),
        linked: false,
    };
    assert!(pools.clone_volume("p", "v.raw", &full).is_err());
    assert!(create(&pools, "over", None, "qcow2", Some("v.raw")).is_err());

    pools.delete_volume("p", "v.raw", |_| None).unwrap();
    assert!(
        hidden_files(&dir).is_empty(),
        "the record goes with the volume"
    );
    let again = create(&pools, "v.raw", Some("1M"), "raw", None).unwrap();
    assert!(!again.incomplete);
}
