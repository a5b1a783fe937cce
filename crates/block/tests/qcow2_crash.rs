//! Crash safety: a writer process is killed with SIGKILL at random points, 50 times, on the
//! same qcow2 overlay. After every kill `qemu-img check` must find no corruption (leaks are
//! allowed) and everything the writer flushed must read back; what it wrote after its last
//! flush may or may not have happened (table updates wait for flushes, as in QEMU).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const SIZE: u64 = 16 << 20;
const WRITER_ENV: &str = "FERRO_QCOW2_CRASH_WRITER";
const MIX: OpMix = OpMix {
    discards: true,
    max_len: 256 * 1024,
    discard_align: 16384,
};

/// The writer: runs when the parent test starts this binary with `WRITER_ENV` set; applies
/// seeded random operations until killed, reporting progress on stdout.
#[test]
#[ignore = "started by killed_writers_leave_no_corruption"]
fn crash_writer() {
    let Ok(spec) = std::env::var(WRITER_ENV) else {
        return;
    };
    let (path, seed) = spec.split_once(':').unwrap();
    let mut disk = block::open(Path::new(path), false, None).unwrap();
    let mut rng = Rng::new(seed.parse().unwrap());
    for i in 0u64.. {
        let op = random_op(&mut rng, SIZE, MIX);
        println!("start {i}");
        apply(disk.as_mut(), op).unwrap();
        if op == Op::Flush {
            println!("flushed {i}");
        }
    }
}

/// What the writer reported before it died.
struct Progress {
    /// The operation in flight (all before it returned).
    completed: u64,
    /// The last flush that returned.
    flushed: Option<u64>,
}

fn parse_progress(output: &str) -> Progress {
    let mut started = None;
    let mut flushed = None;
    for line in output.lines() {
        if let Some(i) = line.strip_prefix("start ") {
            started = Some(i.parse::<u64>().unwrap());
        } else if let Some(i) = line.strip_prefix("flushed ") {
            flushed = Some(i.parse::<u64>().unwrap());
        }
    }
    Progress {
        completed: started.unwrap_or(0),
        flushed,
    }
}

#[test]
fn killed_writers_leave_no_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, pattern(0xba5e, SIZE)).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        overlay.to_str().unwrap(),
    ]);
    let mut rng = Rng::new(2026);
    let mut total_ops = 0;
    let mut kills_after_flush = 0;
    for round in 0..50u64 {
        let before = read_all(block::open(&overlay, true, None).unwrap().as_mut());
        let seed = 1000 + round;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, format!("{}:{seed}", overlay.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The kill's delay counts from the end of the writer's first operation, not from its
        // process start nor its first line: a loaded machine (all tests at once) can make
        // either longer than the delay, and a writer killed before one operation completed
        // tests nothing.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut output = String::new();
        while !output.contains("start 1\n") {
            assert!(
                stdout.read_line(&mut output).unwrap() > 0,
                "the writer died: {output}"
            );
        }
        std::thread::sleep(Duration::from_millis(30 + rng.below(300)));
        child.kill().unwrap();
        child.wait().unwrap();
        stdout.read_to_string(&mut output).unwrap();
        let progress = parse_progress(&output);
        assert!(
            progress.completed > 0,
            "round {round}: the writer did nothing: {output}"
        );
        total_ops += progress.completed;
        kills_after_flush += u64::from(progress.flushed.is_some());

        assert_not_corrupt(&overlay);
        // Everything up to the last completed flush must be there; what came after (up to
        // the operation in flight) may or may not have reached the image.
        let mut model = before;
        let mut uncertain = Vec::new();
        let mut ops = Rng::new(seed);
        for i in 0..=progress.completed {
            let op = random_op(&mut ops, SIZE, MIX);
            if progress.flushed.is_some_and(|f| i <= f) {
                apply_to_model(&mut model, op);
            } else if let Op::Write { offset, len, .. }
            | Op::WriteZeroes { offset, len }
            | Op::Discard { offset, len } = op
            {
                uncertain.push(offset as usize..(offset + len) as usize);
            }
        }
        let mut actual = read_all(block::open(&overlay, false, None).unwrap().as_mut());
        for range in uncertain {
            actual[range.clone()].copy_from_slice(&model[range]);
        }
        assert_same(&actual, &model);
    }
    eprintln!("{total_ops} operations over 50 kills, {kills_after_flush} after at least one flush");
    assert!(kills_after_flush >= 40, "too few runs reached a flush");
}
