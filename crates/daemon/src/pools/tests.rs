//! Tests of pools and their volumes (create, list, resize, delete, uploads, formats,
//! snapshots, backing chains), and the helpers the clone tests share.

use std::path::Path;

use api::pool_api::{PoolDefinition, VolumeClone, VolumeCreate, VolumeInfo};
use block::manage;
use block::Format;

use super::*;
use crate::failure::{Failure, Kind};

pub(super) fn setup() -> (tempfile::TempDir, Pools) {
    let dir = tempfile::tempdir().unwrap();
    let pools = Pools::open(dir.path().join("pools")).unwrap();
    let definition = PoolDefinition {
        name: "p".into(),
        path: dir.path().join("images"),
        autostart: false,
    };
    pools.define(definition).unwrap();
    pools.start("p").unwrap();
    (dir, pools)
}

pub(super) fn create(
    pools: &Pools,
    name: &str,
    size: Option<&str>,
    format: &str,
    backing: Option<&str>,
) -> Result<VolumeInfo, Failure> {
    pools.create_volume(
        "p",
        &VolumeCreate {
            name: name.into(),
            size: size.map(|s| s.parse().unwrap()),
            format: Some(format.into()),
            backing: backing.map(String::from),
        },
    )
}

/// Opens a volume's image as a VM would: with its recorded format.
pub(super) fn open_volume(path: &Path, read_only: bool) -> Box<dyn block::DiskImage> {
    let format = volume_format::format_of(path).unwrap();
    block::open(path, read_only, Some(format)).unwrap()
}

pub(super) fn write(path: &Path, offset: u64, data: &[u8]) {
    let mut image = open_volume(path, false);
    let mut copy = data.to_vec();
    image
        .write_at(offset, &[vm_memory::VolatileSlice::from(&mut copy[..])])
        .unwrap();
    image.flush().unwrap();
}

pub(super) fn read(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut image = open_volume(path, true);
    let mut buf = vec![0u8; len];
    image
        .read_at(offset, &[vm_memory::VolatileSlice::from(&mut buf[..])])
        .unwrap();
    buf
}

/// A qcow2 image (1 MiB) naming `backing` (of `format`, or none) as its backing file: the
/// bytes a hostile guest or uploader would write.
pub(super) fn qcow2_naming(path: &Path, backing: &str, format: Option<&str>) {
    let file = std::fs::File::create_new(path).unwrap();
    let options = block::qcow2::CreateOptions {
        size: 1 << 20,
        cluster_bits: 16,
        backing: Some((backing.to_string(), format.map(String::from))),
    };
    block::qcow2::create(&file, &options).unwrap();
}

/// Uploads the file at `from` as volume `name` (which exists) of pool `p`.
pub(super) fn upload(
    pools: &Pools,
    name: &str,
    from: &Path,
    format: Option<Format>,
) -> Result<VolumeInfo, Failure> {
    let len = std::fs::metadata(from).unwrap().len();
    let target = pools.upload_target("p", name, len).unwrap();
    std::fs::copy(from, &target).unwrap();
    pools.finish_upload("p", name, &target, format, |_| None)
}

#[test]
fn a_guest_cannot_make_its_raw_volume_a_window_on_host_files() {
    let (dir, pools) = setup();
    let volume = create(&pools, "v.raw", Some("1M"), "raw", None).unwrap();
    let evil = dir.path().join("evil.qcow2");
    qcow2_naming(&evil, "/etc/passwd", Some("raw"));
    // The guest writes that header over the start of its raw disk.
    let header = std::fs::read(&evil).unwrap();
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(&volume.path)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&disk, &header, 0).unwrap();
    // Every later use takes the volume as the raw disk it was made as.
    let info = pools.volume("p", "v.raw").unwrap();
    assert_eq!((info.format.as_str(), info.backing), ("raw", None));
    assert_eq!(pools.volume_for_vm("p", "v.raw").unwrap().format, "raw");
    let full = VolumeClone {
        name: "copy.raw".into(),
        linked: false,
    };
    let copy = pools.clone_volume("p", "v.raw", &full).unwrap();
    assert_eq!(copy.format, "raw");
    assert_eq!(
        read(&copy.path, 0, 4),
        b"QFI\xfb",
        "the guest's bytes, as data"
    );
    pools.resize_volume("p", "v.raw", 2 << 20).unwrap();
    assert_eq!(std::fs::metadata(&volume.path).unwrap().len(), 2 << 20);
    // Even after a daemon restart.
    let again = Pools::open(dir.path().join("pools")).unwrap();
    again.start("p").unwrap();
    assert_eq!(again.volume("p", "v.raw").unwrap().format, "raw");
}

#[test]
fn an_upload_is_recorded_as_the_uploader_said_or_as_it_came() {
    let (dir, pools) = setup();
    create(&pools, "v", Some("1M"), "raw", None).unwrap();
    let qcow2 = dir.path().join("plain.qcow2");
    let file = std::fs::File::create_new(&qcow2).unwrap();
    let options = block::qcow2::CreateOptions {
        size: 1 << 20,
        cluster_bits: 16,
        backing: None,
    };
    block::qcow2::create(&file, &options).unwrap();
    // Said raw: raw, whatever it looks like.
    assert_eq!(
        upload(&pools, "v", &qcow2, Some(Format::Raw))
            .unwrap()
            .format,
        "raw"
    );
    // Not said: probed now, before any guest saw it, and kept.
    assert_eq!(upload(&pools, "v", &qcow2, None).unwrap().format, "qcow2");
    // Said qcow2, but it is not: refused, and the volume is left as it was.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![1u8; 4096]).unwrap();
    let err = upload(&pools, "v", &junk, Some(Format::Qcow2)).unwrap_err();
    assert_eq!(err.kind, Kind::Invalid, "{}", err.message);
    assert_eq!(pools.volume("p", "v").unwrap().format, "qcow2");
}

#[test]
fn an_uploaded_overlay_keeps_its_backing_in_the_pool() {
    let (dir, pools) = setup();
    create(&pools, "base.raw", Some("1M"), "raw", None).unwrap();
    create(&pools, "top", Some("1M"), "raw", None).unwrap();
    let images = dir.path().join("images");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, vec![9u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink(&secret, images.join("link")).unwrap();
    let refused = [
        (
            secret.to_str().unwrap(),
            Some("raw"),
            "not a volume of pool p",
        ),
        ("../secret", Some("raw"), "not a volume of pool p"),
        ("link", Some("raw"), "not a volume of pool p"),
        ("/dev/zero", Some("raw"), "not a volume of pool p"),
        (
            "base.raw",
            Some("qcow2"),
            "named as qcow2, but volume base.raw is raw",
        ),
        ("base.raw", None, "without its format"),
        ("top", Some("raw"), "itself"),
    ];
    for (i, (backing, format, why)) in refused.into_iter().enumerate() {
        let overlay = dir.path().join(format!("overlay{i}.qcow2"));
        qcow2_naming(&overlay, backing, format);
        let err = upload(&pools, "top", &overlay, Some(Format::Qcow2)).unwrap_err();
        assert_eq!(err.kind, Kind::Invalid, "{backing}: {}", err.message);
        assert!(err.message.contains(why), "{backing}: {}", err.message);
        assert_eq!(pools.volume("p", "top").unwrap().format, "raw");
    }
    // A backing file named as the volume of the pool it is, with its format: fine, once
    // the uploader says it is qcow2 (a guest's raw disk, downloaded, can look like this).
    let overlay = dir.path().join("good.qcow2");
    qcow2_naming(&overlay, "base.raw", Some("raw"));
    let err = upload(&pools, "top", &overlay, None).unwrap_err();
    assert!(
        err.message.contains("say its format with --format"),
        "{}",
        err.message
    );
    let top = upload(&pools, "top", &overlay, Some(Format::Qcow2)).unwrap();
    assert_eq!(
        (top.format.as_str(), top.backing.as_deref()),
        ("qcow2", Some("base.raw"))
    );
    assert!(pools.volume_for_vm("p", "top").is_ok());
}

#[test]
fn a_volume_in_use_or_busy_is_not_replaced() {
    let (dir, pools) = setup();
    create(&pools, "base.raw", Some("1M"), "raw", None).unwrap();
    create(&pools, "top.qcow2", None, "qcow2", Some("base.raw")).unwrap();
    let new = dir.path().join("new.raw");
    std::fs::write(&new, vec![5u8; 1 << 20]).unwrap();
    // The backing of an overlay: replacing it would change the overlay's contents.
    let err = upload(&pools, "base.raw", &new, Some(Format::Raw)).unwrap_err();
    assert!(
        err.message.contains("is the backing of top.qcow2"),
        "{}",
        err.message
    );
    // A disk of a VM that runs.
    let len = 1 << 20;
    let target = pools.upload_target("p", "top.qcow2", len).unwrap();
    std::fs::copy(&new, &target).unwrap();
    let err = pools
        .finish_upload("p", "top.qcow2", &target, Some(Format::Raw), |_| {
            Some("web".into())
        })
        .unwrap_err();
    assert!(err.message.contains("VM web is running"), "{}", err.message);
    assert!(!target.exists(), "the refused upload is removed");
    // Another operation on the same volume under way.
    let claim = pools.claim("p", "top.qcow2").unwrap();
    let err = upload(&pools, "top.qcow2", &new, Some(Format::Raw)).unwrap_err();
    assert_eq!(err.kind, Kind::Conflict);
    assert!(err.message.contains("busy"), "{}", err.message);
    let err = pools.stop("p").unwrap_err();
    assert!(err.message.contains("under way"), "{}", err.message);
    drop(claim);
    assert_eq!(
        upload(&pools, "top.qcow2", &new, Some(Format::Raw))
            .unwrap()
            .format,
        "raw"
    );
}

#[test]
fn a_volume_whose_chain_leaves_the_pool_is_refused_to_vms_and_clones() {
    let (dir, pools) = setup();
    let images = dir.path().join("images");
    std::fs::write(dir.path().join("secret"), vec![9u8; 1 << 20]).unwrap();
    // Put in the pool directory by hand (or by an older Ferro).
    qcow2_naming(&images.join("old.qcow2"), "../secret", Some("raw"));
    // Never recorded, and a guest could have written that header: not trusted.
    let err = pools.volume_for_vm("p", "old.qcow2").unwrap_err();
    assert!(
        err.message.contains("no recorded format"),
        "{}",
        err.message
    );
    assert_eq!(pools.volume("p", "old.qcow2").unwrap().format, "unknown");
    assert!(pools
        .volumes("p")
        .unwrap()
        .iter()
        .any(|v| v.name == "old.qcow2"));
    // Confirmed by an administrator, its chain still has to stay in the pool.
    pools
        .set_format("p", "old.qcow2", "qcow2", |_| None)
        .unwrap();
    let err = pools.volume_for_vm("p", "old.qcow2").unwrap_err();
    assert!(
        err.message.contains("not a volume of pool p"),
        "{}",
        err.message
    );
    let full = VolumeClone {
        name: "copy".into(),
        linked: false,
    };
    assert!(pools.clone_volume("p", "old.qcow2", &full).is_err());
    let linked = VolumeClone {
        name: "linked".into(),
        linked: true,
    };
    assert!(pools.clone_volume("p", "old.qcow2", &linked).is_err());
    assert!(!images.join("copy").exists() && !images.join("linked").exists());
}

#[test]
fn pools_report_space_and_refuse_bad_changes() {
    let (dir, pools) = setup();
    let info = pools.info("p").unwrap();
    assert_eq!(info.state, PoolState::Active);
    assert!(info.capacity_bytes > 0 && info.available_bytes > 0);
    let same_dir = PoolDefinition {
        name: "q".into(),
        path: dir.path().join("images"),
        autostart: false,
    };
    assert_eq!(pools.define(same_dir).unwrap_err().kind, Kind::Conflict);
    assert_eq!(pools.undefine("p").unwrap_err().kind, Kind::Conflict);
    pools.set_autostart("p", true).unwrap();
    // A new daemon finds the pool, started because of autostart.
    let again = Pools::open(dir.path().join("pools")).unwrap();
    assert_eq!(again.info("p").unwrap().state, PoolState::Active);
    pools.stop("p").unwrap();
    assert_eq!(pools.volumes("p").unwrap_err().kind, Kind::Conflict);
    pools.undefine("p").unwrap();
    assert_eq!(pools.info("p").unwrap_err().kind, Kind::NotFound);
}

#[test]
fn volumes_are_created_listed_resized_and_deleted() {
    let (_dir, pools) = setup();
    let disk = create(&pools, "disk.qcow2", Some("64M"), "qcow2", None).unwrap();
    assert_eq!(
        (disk.format.as_str(), disk.capacity_bytes),
        ("qcow2", 64 << 20)
    );
    let raw = create(&pools, "data.raw", Some("16M"), "raw", None).unwrap();
    assert_eq!(raw.format, "raw");
    assert!(raw.allocation_bytes < 16 << 20, "raw volumes are sparse");
    let names: Vec<String> = pools
        .volumes("p")
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["data.raw", "disk.qcow2"]);
    assert_eq!(
        create(&pools, "disk.qcow2", Some("1M"), "qcow2", None)
            .unwrap_err()
            .kind,
        Kind::Conflict
    );
    assert_eq!(
        pools
            .resize_volume("p", "disk.qcow2", 128 << 20)
            .unwrap()
            .capacity_bytes,
        128 << 20
    );
    assert!(
        pools.resize_volume("p", "disk.qcow2", 1 << 20).is_err(),
        "shrinking"
    );
    let in_use = |path: &Path| path.ends_with("data.raw").then(|| "web1".to_string());
    let refused = pools.delete_volume("p", "data.raw", in_use).unwrap_err();
    assert!(refused.message.contains("disk of VM web1"), "{refused:?}");
    pools.delete_volume("p", "disk.qcow2", |_| None).unwrap();
    assert_eq!(
        pools.volume("p", "disk.qcow2").unwrap_err().kind,
        Kind::NotFound
    );
    assert_eq!(pools.info("p").unwrap().volumes, 1);
}

#[test]
fn names_never_leave_the_pool_and_space_is_checked() {
    let (_dir, pools) = setup();
    std::os::unix::fs::symlink("/etc/hostname", _dir.path().join("images/link")).unwrap();
    assert_eq!(pools.volume("p", "link").unwrap_err().kind, Kind::NotFound);
    for bad in ["../escape", "a/b", ".hidden", "", "/etc/passwd"] {
        let err = create(&pools, bad, Some("1M"), "qcow2", None).unwrap_err();
        assert_eq!(err.kind, Kind::Invalid, "{bad:?}");
        assert!(pools.volume("p", bad).is_err());
    }
    let err = create(&pools, "huge", Some("1000T"), "qcow2", None).unwrap_err();
    assert_eq!(err.kind, Kind::Conflict);
    assert!(err.message.contains("free"), "{err:?}");
    assert_eq!(
        create(&pools, "x", Some("1M"), "vmdk", None)
            .unwrap_err()
            .kind,
        Kind::Invalid
    );
}

#[test]
fn snapshots_revert_a_volume() {
    let (_dir, pools) = setup();
    let disk = create(&pools, "d.qcow2", Some("4M"), "qcow2", None).unwrap();
    write(&disk.path, 0, b"before");
    let create_op = manage::SnapshotOp::Create("s1".into());
    let taken = pools.snapshots("p", "d.qcow2", &create_op).unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (taken[0].name.as_str(), taken[0].size_bytes),
        ("s1", 4 << 20)
    );
    write(&disk.path, 0, b"after!");
    let revert = manage::SnapshotOp::Apply("s1".into());
    pools.snapshots("p", "d.qcow2", &revert).unwrap();
    assert_eq!(read(&disk.path, 0, 6), b"before");
    let missing = pools.snapshots("p", "d.qcow2", &manage::SnapshotOp::Apply("x".into()));
    assert_eq!(missing.unwrap_err().kind, Kind::NotFound);
    let bad = pools.snapshots("p", "d.qcow2", &manage::SnapshotOp::Create(String::new()));
    assert_eq!(bad.unwrap_err().kind, Kind::Invalid);
    let delete = manage::SnapshotOp::Delete("s1".into());
    assert!(pools.snapshots("p", "d.qcow2", &delete).unwrap().is_empty());
}

#[test]
fn an_upload_replaces_an_incomplete_volume_and_its_record() {
    let (_dir, pools) = setup();
    let volume = create(&pools, "v.raw", Some("1M"), "raw", None).unwrap();
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&volume.path).unwrap());
    let record = volume.path.with_file_name(".v.raw.incomplete");
    std::fs::write(&record, format!("{inode}\n")).unwrap();
    assert!(pools.volume("p", "v.raw").unwrap().incomplete);
    let upload = pools.upload_target("p", "v.raw", 1 << 20).unwrap();
    std::fs::write(&upload, vec![3u8; 1 << 20]).unwrap();
    let replaced = pools
        .finish_upload("p", "v.raw", &upload, None, |_| None)
        .unwrap();
    assert!(!replaced.incomplete);
    assert!(
        !record.exists(),
        "a reused inode cannot bring the mark back"
    );
}

#[test]
fn starting_a_pool_removes_what_a_dead_daemon_left_half_done() {
    let (dir_guard, pools) = setup();
    let volume = create(&pools, "v.raw", Some("1M"), "raw", None).unwrap();
    let dir = volume.path.parent().unwrap().to_path_buf();
    let leftover = dir.join(".w.raw.clone-4194305-3.part");
    std::fs::write(&leftover, b"half").unwrap();
    assert_eq!(pools.volumes("p").unwrap().len(), 1, "never listed");
    pools.stop("p").unwrap();
    pools.start("p").unwrap();
    assert!(!leftover.exists());
    assert!(volume.path.exists());

    // A daemon restart activates autostart pools: the same cleanup.
    pools.set_autostart("p", true).unwrap();
    std::fs::write(&leftover, b"half").unwrap();
    let reopened = Pools::open(dir_guard.path().join("pools")).unwrap();
    assert_eq!(reopened.volumes("p").unwrap().len(), 1);
    assert!(!leftover.exists());
}
