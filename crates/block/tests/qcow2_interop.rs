//! qcow2 images against the reference implementation: images made by `qemu-img` are read and
//! written by Ferro and stay valid for `qemu-img check`, and the contents match a raw image
//! that saw the same operations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use block::{open, Format};
use common::*;

const MIB: u64 = 1 << 20;

fn parse_size(s: &str) -> u64 {
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().unwrap();
    match unit {
        "k" => n << 10,
        "M" => n << 20,
        _ => panic!("size {s}"),
    }
}

struct Case {
    cluster: &'static str,
    compat: &'static str,
    backing: bool,
}

/// A raw base with recognizable contents in most of its clusters.
fn make_base(dir: &Path, size: u64) -> PathBuf {
    let base = dir.join("base.raw");
    let mut bytes = pattern(0xba5e, size);
    // Leave holes so that backing reads of zeroes are covered too.
    for hole in bytes.chunks_mut(3 * 65536).step_by(2) {
        hole[..65536].fill(0);
    }
    std::fs::write(&base, &bytes).unwrap();
    base
}

/// Runs `ops` random operations on a qcow2 image made by qemu-img for `case` and on a raw copy
/// of what it should contain, then checks and compares them with qemu-img.
fn exercise(case: &Case, ops: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size = 48 * MIB;
    let image = dir.path().join("disk.qcow2");
    let raw = dir.path().join("disk.raw");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    let options = format!("cluster_size={},compat={}", case.cluster, case.compat);
    args.extend(["-o", &options]);
    let base;
    if case.backing {
        base = make_base(dir.path(), size);
        std::fs::copy(&base, &raw).unwrap();
        args.extend(["-b", "base.raw", "-F", "raw"]);
    } else {
        std::fs::File::create(&raw).unwrap().set_len(size).unwrap();
    }
    let image_arg = image.to_str().unwrap().to_string();
    args.push(&image_arg);
    let size_arg = size.to_string();
    if !case.backing {
        args.push(&size_arg);
    }
    qemu_img(&args);

    let mut qcow = open(&image, false, None).unwrap();
    let mut reference = open(&raw, false, Some(Format::Raw)).unwrap();
    assert_eq!(qcow.size(), size);
    // Version 2 images with a backing file cannot express zero clusters: a discard there
    // leaves the old data, which raw would not.
    let mix = OpMix {
        discards: !(case.compat == "0.10" && case.backing),
        max_len: 512 * 1024,
        discard_align: parse_size(case.cluster),
    };
    let mut rng = Rng::new(seed);
    for _ in 0..ops {
        let op = random_op(&mut rng, size, mix);
        apply(qcow.as_mut(), op).unwrap();
        apply(reference.as_mut(), op).unwrap();
    }
    qcow.flush().unwrap();
    assert_same(&read_all(qcow.as_mut()), &read_all(reference.as_mut()));
    drop((qcow, reference));
    assert_clean(&image);
    assert_identical(&image, "qcow2", &raw, "raw");
}

#[test]
fn qemu_img_images_64k_clusters() {
    for compat in ["1.1", "0.10"] {
        for backing in [false, true] {
            exercise(
                &Case {
                    cluster: "64k",
                    compat,
                    backing,
                },
                600,
                1 + backing as u64,
            );
        }
    }
}

#[test]
fn qemu_img_images_2m_clusters() {
    for compat in ["1.1", "0.10"] {
        for backing in [false, true] {
            exercise(
                &Case {
                    cluster: "2M",
                    compat,
                    backing,
                },
                300,
                7 + backing as u64,
            );
        }
    }
}

#[test]
fn thousands_of_random_operations_on_4k_clusters_match_raw() {
    // Small clusters make the refcount table and L2 tables grow as the image fills.
    exercise(
        &Case {
            cluster: "4k",
            compat: "1.1",
            backing: true,
        },
        4000,
        42,
    );
    exercise(
        &Case {
            cluster: "4k",
            compat: "1.1",
            backing: false,
        },
        4000,
        43,
    );
}

#[test]
fn data_written_by_qemu_reads_back_and_survives_ferro_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
        "16M",
    ]);
    qemu_io(
        &image,
        "qcow2",
        &[
            "write -P 0xab 0 1M",
            "write -z 1M 1M",
            "write -P 0xcd 3M 64k",
            "write -P 0xef 15M 1M",
        ],
    );
    let mut disk = open(&image, false, None).unwrap();
    let bytes = read_all(disk.as_mut());
    assert!(bytes[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(bytes[MIB as usize..3 * MIB as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(bytes[3 * MIB as usize..(3 * MIB + 65536) as usize]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(bytes[15 * MIB as usize..].iter().all(|&b| b == 0xef));
    // Overwrite part of QEMU's data and of its zero cluster.
    apply(
        disk.as_mut(),
        Op::Write {
            offset: 4096,
            len: 8192,
            seed: 5,
        },
    )
    .unwrap();
    apply(
        disk.as_mut(),
        Op::Write {
            offset: MIB + 512,
            len: 512,
            seed: 6,
        },
    )
    .unwrap();
    drop(disk);
    assert_clean(&image);
    qemu_io(
        &image,
        "qcow2",
        &[
            "read -P 0xab 0 4k",
            "read -P 0xab 12k 1012k",
            "read -P 0 1M 512",
        ],
    );
}

#[test]
fn compressed_clusters_read_and_copy_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let size = 8 * MIB;
    let mut bytes = vec![0u8; size as usize];
    // Compressible text, so qemu-img really stores compressed clusters.
    for (i, chunk) in bytes.chunks_mut(64).enumerate() {
        let line = format!("line {i:08} of a compressible disk image{:.<40}\n", "");
        chunk.copy_from_slice(&line.as_bytes()[..64]);
    }
    std::fs::write(&raw, &bytes).unwrap();
    let image = dir.path().join("compressed.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let report = check_report(&image);
    let compressed = report["compressed-clusters"].as_u64().unwrap_or(0);
    assert!(
        compressed >= 64,
        "qemu-img stored too few compressed clusters: {report}"
    );

    let mut disk = open(&image, false, None).unwrap();
    assert_same(&read_all(disk.as_mut()), &bytes);
    let op = Op::Write {
        offset: 70000,
        len: 4096,
        seed: 9,
    };
    apply(disk.as_mut(), op).unwrap();
    apply_to_model(&mut bytes, op);
    apply(
        disk.as_mut(),
        Op::WriteZeroes {
            offset: 2 * MIB,
            len: 2 * MIB,
        },
    )
    .unwrap();
    apply_to_model(
        &mut bytes,
        Op::WriteZeroes {
            offset: 2 * MIB,
            len: 2 * MIB,
        },
    );
    assert_same(&read_all(disk.as_mut()), &bytes);
    drop(disk);
    assert_clean(&image);
    std::fs::write(&raw, &bytes).unwrap();
    assert_identical(&image, "qcow2", &raw, "raw");
}

#[test]
fn backing_chains_of_qcow2_and_raw_images() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let base = make_base(dir.path(), size);
    let mut model = std::fs::read(&base).unwrap();
    let mut previous = ("base.raw".to_string(), "raw");
    // base.raw <- l1.qcow2 <- l2.qcow2 <- l3.qcow2, each layer written by QEMU.
    for layer in 1..=3u64 {
        let name = format!("l{layer}.qcow2");
        let path = dir.path().join(&name);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &previous.0,
            "-F",
            previous.1,
            path.to_str().unwrap(),
        ]);
        let at = layer * MIB + 4096 * layer;
        qemu_io(
            &path,
            "qcow2",
            &[&format!("write -P {} {at} 100k", 0x10 * layer)],
        );
        model[at as usize..(at + 100 * 1024) as usize].fill(0x10 * layer as u8);
        previous = (name, "qcow2");
    }
    let top = dir.path().join("l3.qcow2");
    let mut disk = open(&top, false, None).unwrap();
    assert_same(&read_all(disk.as_mut()), &model);
    let base_before = std::fs::read(&base).unwrap();
    let mut rng = Rng::new(77);
    for _ in 0..300 {
        let op = random_op(
            &mut rng,
            size,
            OpMix {
                discards: true,
                max_len: 256 * 1024,
                discard_align: 65536,
            },
        );
        apply(disk.as_mut(), op).unwrap();
        apply_to_model(&mut model, op);
    }
    assert_same(&read_all(disk.as_mut()), &model);
    drop(disk);
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "the base changed"
    );
    for layer in 1..=3 {
        assert_clean(&dir.path().join(format!("l{layer}.qcow2")));
    }
    let raw = dir.path().join("expected.raw");
    std::fs::write(&raw, &model).unwrap();
    assert_identical(&top, "qcow2", &raw, "raw");
}

#[test]
fn overlays_share_a_base_that_nobody_may_write() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 4 * MIB);
    for name in ["a.qcow2", "b.qcow2"] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            dir.path().join(name).to_str().unwrap(),
        ]);
    }
    let a = open(&dir.path().join("a.qcow2"), false, None).unwrap();
    let b = open(&dir.path().join("b.qcow2"), false, None).unwrap();
    assert!(matches!(
        open(&base, false, None),
        Err(block::OpenError::Locked { .. })
    ));
    assert!(matches!(
        open(&dir.path().join("a.qcow2"), true, None),
        Err(block::OpenError::Locked { .. })
    ));
    drop((a, b));
    open(&base, false, None).unwrap();
}

/// Host extents `qemu-img map` reports for data in `[start, end)` of the guest.
fn data_extents(path: &Path, start: u64, end: u64) -> Vec<(u64, u64, u64)> {
    let map: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", path.to_str().unwrap()])).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| {
            let (at, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            (at, len, e["offset"].as_u64().unwrap())
        })
        .filter(|&(at, len, _)| at < end && at + len > start)
        .collect()
}

#[test]
fn a_long_write_takes_consecutive_new_clusters_around_owned_ones() {
    // 4 KiB clusters, so a 3 MiB write crosses refcount blocks (2048 clusters each) and L2
    // tables (512 entries each).
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let size = 64 * MIB;
    create_qcow2(&image, "4k", size);
    let mut model = vec![0u8; size as usize];
    let mut qcow = open(&image, false, None).unwrap();
    let ops = [
        Op::Write {
            offset: 10 * 4096,
            len: 4096,
            seed: 1,
        },
        // A partial cluster first, then whole ones around cluster 10, then a partial one.
        Op::Write {
            offset: 512,
            len: 3 * MIB,
            seed: 2,
        },
        // Whole clusters again over what is now owned: rewritten in place.
        Op::Write {
            offset: MIB,
            len: MIB,
            seed: 3,
        },
    ];
    for op in ops {
        apply(qcow.as_mut(), op).unwrap();
        apply_to_model(&mut model, op);
    }
    qcow.flush().unwrap();
    assert_same(&read_all(qcow.as_mut()), &model);
    drop(qcow);
    assert_clean(&image);
    let extents = data_extents(&image, 0, 3 * MIB + 4096);
    // Cluster 0 (partial), cluster 10 (written first), clusters 1..10 and 11.. in runs.
    assert!(
        extents.len() <= 6,
        "whole clusters were not allocated in runs: {extents:?}"
    );
}

#[test]
fn an_image_written_without_barriers_is_whole_and_clean_once_flushed() {
    // 4 KiB clusters over 64 MiB: the writes outgrow the L2 cache, so tables are written
    // back (unordered) while the writes go on, not only at the flush.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("copy.qcow2");
    let size = 64 * MIB;
    create_qcow2(&image, "4k", size);
    let mut model = vec![0u8; size as usize];
    let mut qcow = open(&image, false, None).unwrap();
    qcow.skip_barriers();
    let mut rng = Rng::new(11);
    for _ in 0..300 {
        let mix = OpMix {
            discards: false,
            discard_align: 4096,
            max_len: 256 << 10,
        };
        let op = random_op(&mut rng, size, mix);
        apply(qcow.as_mut(), op).unwrap();
        apply_to_model(&mut model, op);
    }
    qcow.flush().unwrap();
    drop(qcow);
    assert_clean(&image);
    let mut reopened = open(&image, true, None).unwrap();
    assert_same(&read_all(reopened.as_mut()), &model);
}
