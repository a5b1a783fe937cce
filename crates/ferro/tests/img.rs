//! `ferro img` as users run it, checked against qemu-img (Debian's qemu-utils): what Ferro
//! creates, qemu-img reads as asked; what qemu-img makes, Ferro describes and snapshots.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn run(program: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (qemu-img comes from Debian's qemu-utils)"))
}

fn ok(program: &str, args: &[&str], dir: &Path) -> String {
    let out = run(program, args, dir);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const FERRO: &str = env!("CARGO_BIN_EXE_ferro");

fn ferro(args: &[&str], dir: &Path) -> String {
    ok(FERRO, args, dir)
}

fn qemu_info(file: &str, dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok("qemu-img", &["info", "--output=json", file], dir)).unwrap()
}

fn assert_checks_clean(file: &str, dir: &Path) {
    let out = ok("qemu-img", &["check", file], dir);
    assert!(out.contains("No errors were found"), "{out}");
    assert!(!out.contains("leaked"), "{out}");
}

#[test]
fn created_images_are_what_qemu_img_reads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ferro(&["img", "create", "-f", "raw", "base.raw", "64M"], d);
    assert_eq!(
        std::fs::metadata(d.join("base.raw")).unwrap().len(),
        64 << 20
    );
    for (cluster, expected) in [("4K", 4096), ("64K", 65536), ("2M", 2 << 20)] {
        let name = format!("plain-{cluster}.qcow2");
        ferro(
            &["img", "create", "--cluster-size", cluster, &name, "10G"],
            d,
        );
        let info = qemu_info(&name, d);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 10u64 << 30);
        assert_eq!(info["cluster-size"], expected);
        assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
        assert_checks_clean(&name, d);
    }
    // A linked clone takes its size from the base.
    ferro(
        &[
            "img",
            "create",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "clone.qcow2",
        ],
        d,
    );
    let info = qemu_info("clone.qcow2", d);
    assert_eq!(info["virtual-size"], 64u64 << 20);
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_checks_clean("clone.qcow2", d);
    // The format of the base is detected when not given; a chain of clones works.
    ferro(
        &[
            "img",
            "create",
            "--backing",
            "clone.qcow2",
            "--backing-format",
            "qcow2",
            "clone2.qcow2",
            "128M",
        ],
        d,
    );
    let info = qemu_info("clone2.qcow2", d);
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 128u64 << 20);
    ok("qemu-io", &["-c", "write -P 0x42 0 1M", "clone2.qcow2"], d);
    assert_checks_clean("clone2.qcow2", d);
}

#[test]
fn info_describes_qemu_img_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "raw", "base.img", "32M"],
        d,
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=128k,compat=0.10",
            "-b",
            "base.img",
            "-F",
            "raw",
            "v2.qcow2",
        ],
        d,
    );
    ok(
        "qemu-img",
        &["snapshot", "-c", "clean-install", "v2.qcow2"],
        d,
    );
    let ours: serde_json::Value =
        serde_json::from_str(&ferro(&["img", "info", "--json", "v2.qcow2"], d)).unwrap();
    let theirs = qemu_info("v2.qcow2", d);
    for key in [
        "format",
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    assert_eq!(ours["format-specific"]["data"]["compat"], "0.10");
    assert_eq!(ours["snapshots"][0]["name"], "clean-install");
    assert_eq!(
        ours["snapshots"][0]["date-sec"],
        theirs["snapshots"][0]["date-sec"]
    );
    let text = ferro(&["img", "info", "v2.qcow2"], d);
    assert!(
        text.contains("virtual size: 32 MiB (33554432 bytes)"),
        "{text}"
    );
    assert!(text.contains("clean-install"), "{text}");
    let raw: serde_json::Value =
        serde_json::from_str(&ferro(&["img", "info", "--json", "base.img"], d)).unwrap();
    assert_eq!(raw["format"], "raw");
    assert_eq!(raw["virtual-size"], 32u64 << 20);
}

#[test]
fn resize_grows_raw_and_qcow2_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ferro(&["img", "create", "-f", "raw", "a.raw", "1G"], d);
    ferro(&["img", "resize", "a.raw", "+1G"], d);
    assert_eq!(std::fs::metadata(d.join("a.raw")).unwrap().len(), 2 << 30);
    // Small clusters make the L1 table outgrow its cluster.
    ferro(
        &["img", "create", "--cluster-size", "4K", "b.qcow2", "1G"],
        d,
    );
    ok("qemu-io", &["-c", "write -P 0x17 1020M 4M", "b.qcow2"], d);
    ferro(&["img", "resize", "b.qcow2", "300G"], d);
    assert_eq!(qemu_info("b.qcow2", d)["virtual-size"], 300u64 << 30);
    assert_checks_clean("b.qcow2", d);
    ok(
        "qemu-io",
        &[
            "-c",
            "read -P 0x17 1020M 4M",
            "-c",
            "write -P 0x18 299G 1M",
            "b.qcow2",
        ],
        d,
    );
    assert_checks_clean("b.qcow2", d);
    let out = run(FERRO, &["img", "resize", "b.qcow2", "1G"], d);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shrinking"));
}

#[test]
fn snapshots_through_the_cli_and_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ferro(&["img", "create", "disk.qcow2", "16M"], d);
    ok("qemu-io", &["-c", "write -P 0x01 0 1M", "disk.qcow2"], d);
    ferro(&["img", "snapshot", "--create", "one", "disk.qcow2"], d);
    ok("qemu-io", &["-c", "write -P 0x02 0 1M", "disk.qcow2"], d);
    ok("qemu-img", &["snapshot", "-c", "two", "disk.qcow2"], d);
    ok("qemu-io", &["-c", "write -P 0x03 0 1M", "disk.qcow2"], d);
    let list = ferro(&["img", "snapshot", "--list", "disk.qcow2"], d);
    assert!(list.contains(" one ") && list.contains(" two "), "{list}");
    ferro(&["img", "snapshot", "--apply", "one", "disk.qcow2"], d);
    ok("qemu-io", &["-c", "read -P 0x01 0 1M", "disk.qcow2"], d);
    ferro(&["img", "snapshot", "--apply", "two", "disk.qcow2"], d);
    ok("qemu-io", &["-c", "read -P 0x02 0 1M", "disk.qcow2"], d);
    ferro(&["img", "snapshot", "--delete", "one", "disk.qcow2"], d);
    let theirs = ok("qemu-img", &["snapshot", "-l", "disk.qcow2"], d);
    assert!(
        !theirs.contains(" one ") && theirs.contains(" two "),
        "{theirs}"
    );
    assert_checks_clean("disk.qcow2", d);
    let out = run(
        FERRO,
        &["img", "snapshot", "--apply", "one", "disk.qcow2"],
        d,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot named \"one\""));
}

#[test]
fn mistakes_get_one_line_errors_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ferro(&["img", "create", "keep.qcow2", "1G"], d);
    let before = std::fs::read(d.join("keep.qcow2")).unwrap();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["img", "create", "keep.qcow2", "2G"], 3, "already exists"),
        (&["img", "create", "new.qcow2"], 2, "size is needed"),
        (
            &[
                "img",
                "create",
                "-b",
                "missing.raw",
                "-F",
                "raw",
                "new.qcow2",
            ],
            3,
            "backing file",
        ),
        // A backing file's format is the user's to say, never guessed.
        (
            &["img", "create", "-b", "keep.qcow2", "new.qcow2"],
            2,
            "--backing-format",
        ),
        (
            &[
                "img",
                "create",
                "-f",
                "raw",
                "-b",
                "keep.qcow2",
                "-F",
                "qcow2",
                "new.raw",
            ],
            2,
            "backing",
        ),
        (
            &["img", "create", "--cluster-size", "3K", "new.qcow2", "1G"],
            2,
            "cluster size",
        ),
        (&["img", "create", "new.qcow2", "12X"], 2, "invalid"),
        (&["img", "info", "missing.qcow2"], 3, "missing.qcow2"),
        (&["img", "snapshot", "keep.qcow2"], 2, "required"),
        (&["img", "resize", "keep.qcow2", "-1G"], 2, "shrink"),
    ];
    for (args, code, expected) in cases {
        let out = run(FERRO, args, d);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(
            !d.join("new.qcow2").exists() && !d.join("new.raw").exists(),
            "{args:?} left a file"
        );
    }
    assert_eq!(std::fs::read(d.join("keep.qcow2")).unwrap(), before);
    // An image a VM holds is not modified, but can still be described.
    let held = block::open(&d.join("keep.qcow2"), false, None).unwrap();
    for args in [
        &["img", "snapshot", "-c", "x", "keep.qcow2"][..],
        &["img", "resize", "keep.qcow2", "2G"],
    ] {
        let out = run(FERRO, args, d);
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("in use"),
            "{args:?}"
        );
    }
    ferro(&["img", "info", "keep.qcow2"], d);
    drop(held);
    assert_eq!(std::fs::read(d.join("keep.qcow2")).unwrap(), before);
}

/// Sets the 16-bit refcount of cluster `cluster` of a qcow2 image with one refcount block.
fn set_refcount(path: &Path, cluster: u64, value: u16) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, 48).unwrap();
    let table = u64::from_be_bytes(b);
    file.read_exact_at(&mut b, table).unwrap();
    let block = u64::from_be_bytes(b);
    file.write_all_at(&value.to_be_bytes(), block + cluster * 2)
        .unwrap();
}

#[test]
fn check_finds_and_repairs_what_qemu_img_check_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ferro(&["img", "create", "disk.qcow2", "64M"], d);
    ok("qemu-io", &["-c", "write -P 0x5a 0 2M", "disk.qcow2"], d);
    let out = ferro(&["img", "check", "disk.qcow2"], d);
    assert!(out.contains("No inconsistencies found"), "{out}");
    // The header counted free: the image is refused, check says so and what to run.
    set_refcount(&d.join("disk.qcow2"), 0, 0);
    let refused = run(FERRO, &["img", "info", "disk.qcow2"], d);
    assert_eq!(refused.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("ferro img check --repair"));
    let out = run(FERRO, &["img", "check", "disk.qcow2"], d);
    assert_eq!(out.status.code(), Some(2));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("corruption: cluster 0: refcount 0, 1 references"),
        "{stderr}"
    );
    assert!(stdout.contains("1 corruptions found"), "{stdout}");
    assert!(
        stdout.contains("ferro img check --repair disk.qcow2"),
        "{stdout}"
    );
    let json = run(FERRO, &["img", "check", "--json", "disk.qcow2"], d);
    assert_eq!(json.status.code(), Some(2));
    let ours: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let theirs = run("qemu-img", &["check", "--output=json", "disk.qcow2"], d);
    assert_eq!(theirs.status.code(), Some(2));
    let theirs: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
    for key in [
        "corruptions",
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
    ] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    assert_eq!(ours["problems"][0]["repairable"], true);
    let out = ferro(&["img", "check", "--repair", "disk.qcow2"], d);
    assert!(out.contains("Repaired 1 corruptions"), "{out}");
    assert!(out.contains("No inconsistencies found"), "{out}");
    assert_checks_clean("disk.qcow2", d);
    ok("qemu-io", &["-c", "read -P 0x5a 0 2M", "disk.qcow2"], d);
    ferro(&["img", "info", "disk.qcow2"], d);
    // Leaks only: exit status 3, as qemu-img's.
    ferro(
        &["img", "create", "--cluster-size", "4K", "leak.qcow2", "1M"],
        d,
    );
    let path = d.join("leak.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(5 * 4096)
        .unwrap();
    set_refcount(&path, 4, 1);
    assert_eq!(
        run(FERRO, &["img", "check", "leak.qcow2"], d).status.code(),
        Some(3)
    );
    assert_eq!(
        run("qemu-img", &["check", "leak.qcow2"], d).status.code(),
        Some(3)
    );
    let json = run(
        FERRO,
        &["img", "check", "--repair", "--json", "leak.qcow2"],
        d,
    );
    assert_eq!(json.status.code(), Some(0));
    let ours: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        (ours["leaks"].as_u64(), ours["leaks-fixed"].as_u64()),
        (Some(0), Some(1))
    );
    assert_checks_clean("leak.qcow2", d);
    // Raw images have nothing to check; a missing file fails the check (1).
    ferro(&["img", "create", "-f", "raw", "disk.raw", "1M"], d);
    assert_eq!(
        run(FERRO, &["img", "check", "disk.raw"], d).status.code(),
        Some(63)
    );
    let missing = run(FERRO, &["img", "check", "missing.qcow2"], d);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("missing.qcow2"));
    // A repair needs the image not to be in use; a check does not modify it.
    let held = block::open(&d.join("disk.qcow2"), false, None).unwrap();
    let busy = run(FERRO, &["img", "check", "--repair", "disk.qcow2"], d);
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use"));
    drop(held);
}
