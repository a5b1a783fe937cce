//! Helpers shared by the block integration tests: a seeded generator, random disk operations
//! applied to images and to a model, and `qemu-img` (Debian's qemu-utils) as the reference.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use block::DiskImage;
use vm_memory::VolatileSlice;

/// xorshift64*: small, seeded, reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One disk operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Writes `len` bytes of a pattern derived from `seed`.
    Write {
        offset: u64,
        len: u64,
        seed: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

/// Which operations a sequence may contain.
#[derive(Debug, Clone, Copy)]
pub struct OpMix {
    pub discards: bool,
    /// Discards are rounded inward to this (a qcow2 cluster): discarding part of a cluster
    /// leaves it as it was, while raw files read zeroes.
    pub discard_align: u64,
    /// Largest transfer.
    pub max_len: u64,
}

/// A random operation on a disk of `size` bytes, 512-byte aligned.
pub fn random_op(rng: &mut Rng, size: u64, mix: OpMix) -> Op {
    let sectors = size / 512;
    let max = (mix.max_len / 512).max(1);
    // Mostly small writes, some large, some zeroing/discards.
    let len_sectors = match rng.below(4) {
        0 => 1 + rng.below(max),
        _ => 1 + rng.below(max.min(16)),
    };
    let offset_sector = rng.below(sectors - len_sectors.min(sectors - 1));
    let offset = offset_sector * 512;
    let len = len_sectors.min(sectors - offset_sector) * 512;
    match rng.below(20) {
        0..=13 => Op::Write {
            offset,
            len,
            seed: rng.next(),
        },
        14..=16 => Op::WriteZeroes { offset, len },
        17..=18 if mix.discards => {
            let start = offset.next_multiple_of(mix.discard_align);
            let end = (offset + len) / mix.discard_align * mix.discard_align;
            if start < end {
                Op::Discard {
                    offset: start,
                    len: end - start,
                }
            } else {
                Op::Flush
            }
        }
        _ => Op::Flush,
    }
}

/// The bytes an `Op::Write` writes.
pub fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// Applies `op` to an image, splitting write buffers in two to exercise vectored paths.
pub fn apply(image: &mut dyn DiskImage, op: Op) -> std::io::Result<()> {
    match op {
        Op::Write { offset, len, seed } => {
            let mut data = pattern(seed, len);
            let split = (len / 2) as usize;
            let (a, b) = data.split_at_mut(split);
            image.write_at(offset, &[VolatileSlice::from(a), VolatileSlice::from(b)])
        }
        Op::WriteZeroes { offset, len } => image.write_zeroes(offset, len, true),
        Op::Discard { offset, len } => image.discard(offset, len),
        Op::Flush => image.flush(),
    }
}

/// Applies `op` to a byte model in which discarded ranges read as zeroes.
pub fn apply_to_model(model: &mut [u8], op: Op) {
    match op {
        Op::Write { offset, len, seed } => {
            model[offset as usize..(offset + len) as usize].copy_from_slice(&pattern(seed, len));
        }
        Op::WriteZeroes { offset, len } | Op::Discard { offset, len } => {
            model[offset as usize..(offset + len) as usize].fill(0);
        }
        Op::Flush => {}
    }
}

/// Reads a whole image.
pub fn read_all(image: &mut dyn DiskImage) -> Vec<u8> {
    let mut out = vec![0u8; image.size() as usize];
    for chunk in out.chunks_mut(1 << 20).enumerate() {
        let (i, buf) = chunk;
        image
            .read_at((i as u64) << 20, &[VolatileSlice::from(buf)])
            .unwrap();
    }
    out
}

/// Runs `qemu-img` and returns its stdout; panics with its stderr on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian package qemu-utils) is needed by these tests");
    assert!(
        output.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Creates an empty qcow2 image of `size` bytes with `cluster_size` (as qemu-img's option
/// takes it, e.g. "4k") at `path`.
pub fn create_qcow2(path: &std::path::Path, cluster_size: &str, size: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster_size}"),
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
}

/// Runs `qemu-io` commands on an image.
pub fn qemu_io(path: &Path, format: &str, commands: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg(format);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let output = cmd
        .arg(path)
        .output()
        .expect("qemu-io (Debian package qemu-utils) is needed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !stdout.contains("failed"),
        "qemu-io {commands:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `qemu-img check` as JSON.
pub fn check_report(path: &Path) -> serde_json::Value {
    let output = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img is needed");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn count(report: &serde_json::Value, key: &str) -> u64 {
    report.get(key).and_then(|v| v.as_u64()).unwrap_or(0)
}

/// Asserts `qemu-img check` finds neither corruption nor leaks.
pub fn assert_clean(path: &Path) {
    let report = check_report(path);
    assert_eq!(count(&report, "corruptions"), 0, "{report}");
    assert_eq!(count(&report, "leaks"), 0, "{report}");
    assert_eq!(count(&report, "check-errors"), 0, "{report}");
}

/// Asserts `qemu-img check` finds no corruption (leaks are allowed).
pub fn assert_not_corrupt(path: &Path) {
    let report = check_report(path);
    assert_eq!(count(&report, "corruptions"), 0, "{report}");
    assert_eq!(count(&report, "check-errors"), 0, "{report}");
}

/// Asserts `qemu-img compare` finds the two images identical.
pub fn assert_identical(a: &Path, a_format: &str, b: &Path, b_format: &str) {
    let out = qemu_img(&[
        "compare",
        "-f",
        a_format,
        "-F",
        b_format,
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert!(out.contains("Images are identical"), "{out}");
}

/// `qemu-img info` as JSON.
pub fn info(path: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

/// Asserts two disk contents are equal, reporting the first difference rather than the bytes.
#[track_caller]
pub fn assert_same(actual: &[u8], expected: &[u8]) {
    assert_eq!(actual.len(), expected.len(), "sizes differ");
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        let end = (at + 16).min(actual.len());
        panic!(
            "contents differ from byte {at:#x}: {:02x?} instead of {:02x?}",
            &actual[at..end],
            &expected[at..end]
        );
    }
}

/// A qcow2 file's metadata as found on disk (16-bit refcounts), for tests that damage it.
pub struct Qcow2File {
    pub path: std::path::PathBuf,
    pub cluster_bits: u32,
    pub l1_offset: u64,
    pub refcount_table: u64,
    pub snapshots_offset: u64,
}

impl Qcow2File {
    pub fn read(path: &Path) -> Self {
        let mut f = Qcow2File {
            path: path.to_path_buf(),
            cluster_bits: 0,
            l1_offset: 0,
            refcount_table: 0,
            snapshots_offset: 0,
        };
        f.cluster_bits = f.u32_at(20);
        f.l1_offset = f.u64_at(40);
        f.refcount_table = f.u64_at(48);
        f.snapshots_offset = f.u64_at(64);
        assert_eq!(f.u32_at(96), 4, "16-bit refcounts expected");
        f
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn bytes_at(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        let file = std::fs::File::open(&self.path).unwrap();
        file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    pub fn u32_at(&self, offset: u64) -> u32 {
        u32::from_be_bytes(self.bytes_at(offset, 4).try_into().unwrap())
    }

    pub fn u64_at(&self, offset: u64) -> u64 {
        u64::from_be_bytes(self.bytes_at(offset, 8).try_into().unwrap())
    }

    pub fn patch(&self, offset: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap();
        file.write_all_at(bytes, offset).unwrap();
    }

    pub fn set_u64(&self, offset: u64, value: u64) {
        self.patch(offset, &value.to_be_bytes());
    }

    /// Offset of refcount block `index`.
    pub fn refcount_block(&self, index: u64) -> u64 {
        self.u64_at(self.refcount_table + index * 8)
    }

    /// Where the refcount of the cluster at byte `offset` is stored.
    fn refcount_at(&self, offset: u64) -> u64 {
        let cluster = offset >> self.cluster_bits;
        let per_block = self.cluster_size() / 2;
        self.refcount_block(cluster / per_block) + cluster % per_block * 2
    }

    pub fn refcount(&self, offset: u64) -> u16 {
        u16::from_be_bytes(
            self.bytes_at(self.refcount_at(offset), 2)
                .try_into()
                .unwrap(),
        )
    }

    pub fn set_refcount(&self, offset: u64, value: u16) {
        self.patch(self.refcount_at(offset), &value.to_be_bytes());
    }

    /// Active L1 entry `index`, as stored (flags included).
    pub fn l1_entry(&self, index: u64) -> u64 {
        self.u64_at(self.l1_offset + index * 8)
    }

    /// Offset of the L2 table of active L1 entry `index`.
    pub fn l2_table(&self, index: u64) -> u64 {
        self.l1_entry(index) & 0x00ff_ffff_ffff_fe00
    }

    /// Offset of the first snapshot's L1 table.
    pub fn first_snapshot_l1(&self) -> u64 {
        self.u64_at(self.snapshots_offset)
    }
}
