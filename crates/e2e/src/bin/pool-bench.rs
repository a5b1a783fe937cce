//! `pool-bench` (tools/bench pool): what storage pool operations cost, on this host (no KVM):
//! a full clone of a 1 GiB raw volume (a quarter of it written, the rest holes) through the
//! daemon against `cp --sparse=always` and `qemu-img convert -O raw` of the same file (each
//! as it returns, and followed by `sync --data` to count the time to storage), and the
//! creation of a linked clone (through the API, and through the CLI with its process start).
//! Targets: the full clone no slower than either; a linked clone under 50 ms.
//!
//! `POOL_BENCH_RUNS` (default 5) sets the rounds; `POOL_BENCH_MIB` (default 1024) and `POOL_BENCH_STRIDE` (default 4: every 4th MiB written)
//! change the volume, e.g. to copy more than the host's dirty page cache limit holds;
//! `POOL_BENCH_FORMAT=qcow2` clones a qcow2 volume (made from the raw one by qemu-img) instead,
//! against `qemu-img convert -O qcow2`.

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use e2e::daemon::Daemon;
use e2e::median;

/// The volume: its size and the MiB stride of its written data.
#[derive(Clone, Copy)]
struct Shape {
    size_mib: u64,
    stride: usize,
}

fn env_or(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{name}={v:?} is not a positive number")),
        Err(_) => Ok(default),
    }
}
/// Rounds unless `POOL_BENCH_RUNS` says otherwise.
const RUNS: u64 = 5;

fn run<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    program: &str,
    args: &[S],
) -> Result<(), String> {
    let status = Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("{program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{program} {args:?}: {status}"))
    }
}

/// Seconds `work` takes.
fn timed(work: impl FnOnce() -> Result<(), String>) -> Result<f64, String> {
    let start = Instant::now();
    work()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Writes pseudo-random data into every `shape.stride`th MiB of the raw image at `path`.
fn fill(path: &Path, shape: Shape) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut chunk = vec![0u8; 1 << 20];
    for mib in (0..shape.size_mib).step_by(shape.stride) {
        for b in chunk.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
        }
        file.write_all_at(&chunk, mib << 20)
            .map_err(|e| e.to_string())?;
    }
    file.sync_all().map_err(|e| e.to_string())
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("pool-bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<(), String> {
    let shape = Shape {
        size_mib: env_or("POOL_BENCH_MIB", 1024)?,
        stride: env_or("POOL_BENCH_STRIDE", 4)? as usize,
    };
    let runs = env_or("POOL_BENCH_RUNS", RUNS)?.max(1);
    let size_mib = shape.size_mib;
    let d = Daemon::start("poolbench")?;
    let images = d.start_pool("bench")?;
    d.ok(&[
        "vol",
        "create",
        "base.raw",
        "--pool",
        "bench",
        "--size",
        &format!("{size_mib}M"),
        "--format",
        "raw",
    ])?;
    fill(&images.join("base.raw"), shape)?;
    let format = std::env::var("POOL_BENCH_FORMAT").unwrap_or_else(|_| "raw".into());
    let (source, copy_name) = match format.as_str() {
        "raw" => ("base.raw", "copy.raw"),
        "qcow2" => {
            let raw = images.join("base.raw").display().to_string();
            let qcow2 = images.join("base.qcow2").display().to_string();
            run("qemu-img", &["convert", "-O", "qcow2", &raw, &qcow2])?;
            ("base.qcow2", "copy.qcow2")
        }
        other => return Err(format!("POOL_BENCH_FORMAT={other:?}: raw or qcow2")),
    };
    let base = images.join(source);
    let written = size_mib.div_ceil(shape.stride as u64);
    println!(
        "full clone of a {size_mib} MiB {format} volume ({written} MiB written), {runs} runs, medians"
    );
    let base_str = base.display().to_string();
    let target = images.join(copy_name).display().to_string();
    let copy = |args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend([base_str.clone(), target.clone()]);
        all
    };
    // (label, whether the data is on storage when it returns, the copy). The daemon answers
    // once the copy is complete and syncs it in the background (a host crash before then
    // marks the volume incomplete), as cp and qemu-img's default (cache=unsafe) leave it to
    // the kernel; the "+ sync" forms wait for storage.
    type Copy<'a> = Box<dyn Fn() -> Result<(), String> + 'a>;
    let ferro_clone = || {
        d.ok(&["vol", "clone", source, copy_name, "--pool", "bench"])
            .map(drop)
    };
    let contenders: [(&str, bool, Copy); 6] = [
        ("ferro vol clone", false, Box::new(ferro_clone)),
        (
            "ferro vol clone + sync --data",
            true,
            Box::new(|| {
                ferro_clone()?;
                run("sync", &["--data", &target])
            }),
        ),
        (
            "cp --sparse=always",
            false,
            Box::new(|| run("cp", &copy(&["--sparse=always"]))),
        ),
        (
            "cp --sparse=always + sync --data",
            true,
            Box::new(|| {
                run("cp", &copy(&["--sparse=always"]))?;
                run("sync", &["--data", &target])
            }),
        ),
        (
            "qemu-img convert",
            false,
            Box::new(|| run("qemu-img", &copy(&["convert", "-O", &format]))),
        ),
        (
            "qemu-img convert -t writeback",
            true,
            Box::new(|| {
                run(
                    "qemu-img",
                    &copy(&["convert", "-t", "writeback", "-O", &format]),
                )
            }),
        ),
    ];
    let mut times = vec![Vec::new(); contenders.len()];
    for round in 0..runs {
        // Each round starts with the next contender, so none always follows the same one
        // (the removal of a synced copy has the file system discard its blocks meanwhile).
        for k in 0..contenders.len() {
            let i = (round as usize + k) % contenders.len();
            // Each starts with no dirty pages left by the one before.
            run::<&str>("sync", &[])?;
            times[i].push(timed(&contenders[i].2)?);
            let _ = std::fs::remove_file(&target);
        }
        std::io::stdout().flush().map_err(|e| e.to_string())?;
    }
    // Like with like: each is set against Ferro's clone of the same durability.
    let (ferro, ferro_synced) = (median(&times[0]), median(&times[1]));
    for ((label, durable, _), times) in contenders.iter().zip(&times) {
        let t = median(times);
        let (synced, ferro) = match durable {
            true => ("synced", ferro_synced),
            false => ("not synced", ferro),
        };
        println!(
            "  {label:<34} {t:.3} s ({synced}), ferro/this {:.2}",
            ferro / t
        );
    }
    println!("target: ferro/cp and ferro/qemu-img convert <= 1.0");

    let mut api = Vec::new();
    let mut cli = Vec::new();
    let client = http_unix::Client::new(d.socket(), None);
    for i in 0..runs {
        let name = format!("linked{i}.qcow2");
        let body = format!("{{\"name\": \"{name}\", \"linked\": true}}");
        api.push(timed(|| {
            let response = client
                .request(
                    "POST",
                    &api::pool_api::paths::volume_action("bench", "base.raw", "clone"),
                    Some(body.as_bytes()),
                )
                .map_err(|e| e.to_string())?;
            if response.status == 201 {
                Ok(())
            } else {
                Err(response.text())
            }
        })?);
        let name = format!("cli{i}.qcow2");
        cli.push(timed(|| {
            d.ok(&[
                "vol", "clone", "base.raw", &name, "--pool", "bench", "--linked",
            ])
            .map(drop)
        })?);
    }
    println!(
        "linked clone: {:.1} ms through the API, {:.1} ms through the CLI (target < 50 ms)",
        median(&api) * 1000.0,
        median(&cli) * 1000.0
    );
    Ok(())
}
