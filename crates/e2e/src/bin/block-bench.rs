//! Disk image throughput through the `block` crate, on the host (no VM): qcow2 against raw,
//! and against `qemu-img bench` on the same image with the same access pattern (queue depth
//! 1, writeback cache, as a block device worker issues requests).
//!
//! `block-bench [--dir DIR] [--size MIB] [--runs N]`; prints one line per workload and a
//! summary of the ratios. Absolute numbers depend on the host; the ratios are the point.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use block::Format;
use vm_memory::VolatileSlice;

const MIB: u64 = 1 << 20;
/// Step between 4 KiB requests: a prime number of 4 KiB blocks, so the offsets (taken modulo
/// the image size, as qemu-img bench does) spread over the whole image.
const STRIDE: u64 = 4096 * 7919;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    kind: Kind,
    request: u64,
    step: u64,
    /// Bytes transferred.
    total: u64,
    /// Whether the qcow2 image is fully allocated first (otherwise it is fresh).
    allocated: bool,
}

fn workloads(size: u64) -> Vec<Workload> {
    let w = |name, kind, request, step, total, allocated| Workload {
        name,
        kind,
        request,
        step,
        total,
        allocated,
    };
    vec![
        w("seq-read-1m/allocated", Kind::Read, MIB, MIB, size, true),
        w("seq-write-1m/allocated", Kind::Write, MIB, MIB, size, true),
        w(
            "4k-read/allocated",
            Kind::Read,
            4096,
            STRIDE,
            size / 8,
            true,
        ),
        w(
            "4k-write/allocated",
            Kind::Write,
            4096,
            STRIDE,
            size / 8,
            true,
        ),
        w("seq-read-1m/unallocated", Kind::Read, MIB, MIB, size, false),
        w(
            "seq-write-1m/unallocated",
            Kind::Write,
            MIB,
            MIB,
            size,
            false,
        ),
        w(
            "4k-write/unallocated",
            Kind::Write,
            4096,
            STRIDE,
            size / 64,
            false,
        ),
    ]
}

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes the image for a workload: raw (fully written, or sparse) or qcow2 (fully written
/// with qemu-img convert, or fresh).
fn prepare(dir: &Path, format: Format, size: u64, allocated: bool) -> Result<PathBuf, String> {
    let raw_full = dir.join("full.raw");
    if !raw_full.exists() {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&raw_full, data).map_err(|e| e.to_string())?;
    }
    let path = dir.join(format!("bench.{}", format.name()));
    let _ = std::fs::remove_file(&path);
    let (p, raw) = (
        path.to_str().unwrap_or_default(),
        raw_full.to_str().unwrap_or_default(),
    );
    match (format, allocated) {
        (Format::Raw, true) => {
            std::fs::copy(&raw_full, &path).map_err(|e| e.to_string())?;
        }
        (Format::Raw, false) => {
            std::fs::File::create(&path)
                .and_then(|f| f.set_len(size))
                .map_err(|e| e.to_string())?;
        }
        (Format::Qcow2, true) => {
            sh("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", raw, p])?;
        }
        (Format::Qcow2, false) => {
            sh(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", p, &size.to_string()],
            )?;
        }
    }
    sh("sync", &[])?;
    Ok(path)
}

/// Runs a workload through the block crate; returns MiB/s.
fn run_ferro(path: &Path, w: &Workload) -> Result<f64, String> {
    let mut image = block::open(path, w.kind == Kind::Read, None).map_err(|e| e.to_string())?;
    let size = image.size();
    let mut buffer = vec![0x5au8; w.request as usize];
    let count = w.total / w.request;
    let start = Instant::now();
    let mut offset = 0u64;
    for _ in 0..count {
        let slice = [VolatileSlice::from(&mut buffer[..])];
        match w.kind {
            Kind::Read => image.read_at(offset, &slice),
            Kind::Write => image.write_at(offset, &slice),
        }
        .map_err(|e| format!("at {offset:#x}: {e}"))?;
        offset = (offset + w.step) % size;
    }
    image.flush().map_err(|e| e.to_string())?;
    Ok(w.total as f64 / MIB as f64 / start.elapsed().as_secs_f64())
}

/// Runs the same workload with `qemu-img bench`; returns MiB/s.
fn run_qemu_img(path: &Path, format: Format, w: &Workload) -> Result<f64, String> {
    let count = (w.total / w.request).to_string();
    let (request, step) = (w.request.to_string(), w.step.to_string());
    let mut args = vec![
        "bench",
        "-q",
        "-f",
        format.name(),
        "-t",
        "writeback",
        "-d",
        "1",
    ];
    args.extend(["-c", &count, "-s", &request, "-S", &step]);
    if w.kind == Kind::Write {
        args.push("-w");
    }
    let p = path.to_str().unwrap_or_default();
    args.push(p);
    let start = Instant::now();
    sh("qemu-img", &args)?;
    Ok(w.total as f64 / MIB as f64 / start.elapsed().as_secs_f64())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Row {
    name: &'static str,
    raw: f64,
    qcow2: f64,
    qemu_img: f64,
}

fn bench(dir: &Path, size: u64, runs: usize) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for w in workloads(size) {
        let (mut raw, mut qcow2, mut qemu_img) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let path = prepare(dir, Format::Raw, size, w.allocated)?;
            raw.push(run_ferro(&path, &w)?);
            let path = prepare(dir, Format::Qcow2, size, w.allocated)?;
            qcow2.push(run_ferro(&path, &w)?);
            let path = prepare(dir, Format::Qcow2, size, w.allocated)?;
            qemu_img.push(run_qemu_img(&path, Format::Qcow2, &w)?);
        }
        let row = Row {
            name: w.name,
            raw: median(raw),
            qcow2: median(qcow2),
            qemu_img: median(qemu_img),
        };
        println!(
            "{:<26} raw {:>8.1} MiB/s  qcow2 {:>8.1} MiB/s  qemu-img-bench {:>8.1} MiB/s  qcow2/raw {:.2}  qcow2/qemu-img {:.2}",
            row.name,
            row.raw,
            row.qcow2,
            row.qemu_img,
            row.qcow2 / row.raw,
            row.qcow2 / row.qemu_img
        );
        rows.push(row);
    }
    Ok(rows)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let dir = value("--dir").map_or_else(
        || std::env::temp_dir().join("ferro-block-bench"),
        PathBuf::from,
    );
    let size = value("--size")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1024)
        * MIB;
    let runs = value("--runs").and_then(|s| s.parse().ok()).unwrap_or(3);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("block-bench: {}: {e}", dir.display());
        std::process::exit(1);
    }
    println!(
        "block crate vs raw vs qemu-img bench: {} MiB images in {}, QD1, writeback cache, median of {runs} runs",
        size / MIB,
        dir.display()
    );
    let result = bench(&dir, size, runs);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        eprintln!("block-bench: {e}");
        std::process::exit(1);
    }
}
