//! Internal snapshots, made and used by Ferro and by qemu-img interchangeably.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use block::qcow2::Qcow2Image;
use common::*;

const MIB: u64 = 1 << 20;

fn open_qcow2(path: &Path) -> Qcow2Image {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Qcow2Image::open(file, true, None).unwrap()
}

fn snapshot_names(path: &Path) -> Vec<String> {
    let out = qemu_img(&["snapshot", "-l", path.to_str().unwrap()]);
    out.lines()
        .skip_while(|l| !l.starts_with("ID"))
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect()
}

fn write_raw(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn random_writes(image: &mut dyn block::DiskImage, model: &mut [u8], seed: u64, ops: usize) {
    let mut rng = Rng::new(seed);
    let size = model.len() as u64;
    for _ in 0..ops {
        let op = random_op(
            &mut rng,
            size,
            OpMix {
                discards: true,
                max_len: 256 * 1024,
                discard_align: 65536,
            },
        );
        apply(image, op).unwrap();
        apply_to_model(model, op);
    }
}

#[test]
fn snapshots_made_by_qemu_img_are_listed_and_applied() {
    for compat in ["1.1", "0.10"] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.qcow2");
        let path = image.to_str().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            path,
            "8M",
        ]);
        qemu_io(
            &image,
            "qcow2",
            &["write -P 0x11 0 2M", "write -P 0x22 6M 1M"],
        );
        qemu_img(&["snapshot", "-c", "first", path]);
        qemu_io(
            &image,
            "qcow2",
            &["write -P 0x33 1M 2M", "write -z 6M 512k"],
        );
        qemu_img(&["snapshot", "-c", "second", path]);
        qemu_io(&image, "qcow2", &["write -P 0x44 0 8M"]);

        let mut disk = open_qcow2(&image);
        let names: Vec<_> = disk
            .snapshots()
            .unwrap()
            .into_iter()
            .map(|s| (s.id, s.name))
            .collect();
        assert_eq!(
            names,
            [("1".into(), "first".into()), ("2".into(), "second".into())]
        );
        disk.apply_snapshot("first").unwrap();
        let mut expected = vec![0u8; 8 * MIB as usize];
        expected[..2 * MIB as usize].fill(0x11);
        expected[6 * MIB as usize..7 * MIB as usize].fill(0x22);
        assert_same(&read_all(&mut disk), &expected);
        // Writing after the revert must not disturb the snapshots.
        apply(
            &mut disk,
            Op::Write {
                offset: 4096,
                len: 65536,
                seed: 3,
            },
        )
        .unwrap();
        drop(disk);
        assert_clean(&image);
        qemu_img(&["snapshot", "-a", "second", path]);
        qemu_io(
            &image,
            "qcow2",
            &[
                "read -P 0x11 0 1M",
                "read -P 0x33 1M 2M",
                "read -P 0 6M 512k",
                "read -P 0x22 6656k 512k",
            ],
        );
    }
}

#[test]
fn snapshots_made_by_ferro_are_used_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let path = image.to_str().unwrap();
    let size = 16 * MIB;
    qemu_img(&["create", "-q", "-f", "qcow2", path, &size.to_string()]);
    let mut model = vec![0u8; size as usize];
    let mut disk = open_qcow2(&image);
    random_writes(&mut disk, &mut model, 1, 300);
    disk.create_snapshot("before-upgrade").unwrap();
    let at_first = model.clone();
    random_writes(&mut disk, &mut model, 2, 300);
    disk.create_snapshot("after-upgrade").unwrap();
    let at_second = model.clone();
    random_writes(&mut disk, &mut model, 3, 300);
    assert_same(&read_all(&mut disk), &model);
    assert!(
        disk.create_snapshot("after-upgrade").is_err(),
        "duplicate names are refused"
    );
    drop(disk);
    assert_clean(&image);
    assert_eq!(snapshot_names(&image), ["before-upgrade", "after-upgrade"]);
    let info = info(&image);
    assert_eq!(info["snapshots"][0]["vm-state-size"], 0);

    // qemu-img reverts to Ferro's snapshots...
    qemu_img(&["snapshot", "-a", "before-upgrade", path]);
    assert_clean(&image);
    let expected = write_raw(dir.path(), "first.raw", &at_first);
    assert_identical(&image, "qcow2", &expected, "raw");
    qemu_img(&["snapshot", "-a", "after-upgrade", path]);
    let expected = write_raw(dir.path(), "second.raw", &at_second);
    assert_identical(&image, "qcow2", &expected, "raw");

    // ...and Ferro deletes one and reverts to the other.
    let mut disk = open_qcow2(&image);
    disk.delete_snapshot("after-upgrade").unwrap();
    disk.apply_snapshot("1").unwrap();
    assert_same(&read_all(&mut disk), &at_first);
    drop(disk);
    assert_clean(&image);
    assert_eq!(snapshot_names(&image), ["before-upgrade"]);
    let mut disk = open_qcow2(&image);
    disk.delete_snapshot("before-upgrade").unwrap();
    assert!(disk.apply_snapshot("before-upgrade").is_err());
    drop(disk);
    assert_clean(&image);
    assert!(snapshot_names(&image).is_empty());
}

#[test]
fn snapshots_interleaved_with_random_writes_keep_every_version() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let size = 8 * MIB;
    create_qcow2(&image, "4k", size);
    let mut model = vec![0u8; size as usize];
    let mut versions = Vec::new();
    let mut disk = open_qcow2(&image);
    for round in 0..6u64 {
        random_writes(&mut disk, &mut model, 100 + round, 200);
        let name = format!("round-{round}");
        disk.create_snapshot(&name).unwrap();
        versions.push((name, model.clone()));
    }
    // Delete every other snapshot, then visit the rest, newest first.
    for (name, _) in versions.iter().step_by(2) {
        disk.delete_snapshot(name).unwrap();
    }
    for (name, bytes) in versions.iter().skip(1).step_by(2).rev() {
        disk.apply_snapshot(name).unwrap();
        assert_same(&read_all(&mut disk), bytes);
        random_writes(&mut disk, &mut model, 7, 50);
    }
    drop(disk);
    assert_clean(&image);
}
