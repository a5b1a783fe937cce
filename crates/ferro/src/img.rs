//! `ferro img`: create, describe, grow, snapshot and check disk images (raw and qcow2), with
//! the flags qemu-img users know.

use std::path::PathBuf;
use std::process::ExitCode;

use api::image::{FormatSpecific, ImageInfo, Qcow2Details, SnapshotInfo};
use api::ByteSize;
use block::manage::{self, ManageError, NewImage, SnapshotOp};
use block::qcow2::{CheckReport, ProblemKind as CheckProblem, Snapshot};
use block::Format;
use clap::{Args, Subcommand};

use crate::error_chain;

/// Create and manage disk images.
#[derive(Debug, Args)]
pub struct ImgArgs {
    #[command(subcommand)]
    command: ImgCommand,
}

#[derive(Debug, Subcommand)]
enum ImgCommand {
    /// Create an image (thin: it grows as the guest writes).
    Create(CreateArgs),
    /// Show an image's format, sizes, backing file and snapshots.
    Info(InfoArgs),
    /// Grow an image (shrinking is refused: it would lose data).
    Resize(ResizeArgs),
    /// Manage internal snapshots of a qcow2 image that no VM is using.
    Snapshot(SnapshotArgs),
    /// Check a qcow2 image for corruptions and leaked clusters (as `qemu-img check`).
    ///
    /// Exit status: 0 clean, 2 corruptions found, 3 only leaked clusters found, 1 the check
    /// could not run, 63 a raw image (nothing to check).
    Check(CheckArgs),
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
}

fn parse_size(s: &str) -> Result<u64, String> {
    ByteSize::parse_disk_size(s)
        .map(ByteSize::bytes)
        .map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', long, value_name = "FORMAT", default_value = "qcow2", value_parser = parse_format)]
    format: Format,
    /// Backing file (a linked clone: reads come from it until written). A relative name is
    /// relative to the new image's directory. Needs --backing-format.
    #[arg(short = 'b', long, value_name = "FILE", requires = "backing_format")]
    backing: Option<String>,
    /// Format of the backing file, raw or qcow2, recorded in the new image (never guessed from
    /// the backing file: a guest may have written its first bytes).
    #[arg(short = 'F', long, value_name = "FORMAT", value_parser = parse_format)]
    backing_format: Option<Format>,
    /// qcow2 cluster size, 4K to 2M.
    #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_size)]
    cluster_size: u64,
    /// The image file to create (it must not exist).
    file: PathBuf,
    /// Virtual size, e.g. 20G (a bare number is in bytes); defaults to the backing file's.
    #[arg(value_parser = parse_size)]
    size: Option<u64>,
}

#[derive(Debug, Args)]
struct InfoArgs {
    /// Print JSON (keys as `qemu-img info --output=json`).
    #[arg(long)]
    json: bool,
    /// The image's format, raw or qcow2 (probed from its first bytes when omitted).
    #[arg(short = 'f', long, value_name = "FORMAT", value_parser = parse_format)]
    format: Option<Format>,
    /// The image file.
    file: PathBuf,
}

#[derive(Debug, Args)]
struct ResizeArgs {
    /// The image's format, raw or qcow2 (probed from its first bytes when omitted: give it
    /// for an image a guest has written, whose first bytes the guest chose).
    #[arg(short = 'f', long, value_name = "FORMAT", value_parser = parse_format)]
    format: Option<Format>,
    /// The image file.
    file: PathBuf,
    /// New size (e.g. 40G), or +SIZE to grow by that much.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("op").required(true)))]
struct SnapshotArgs {
    /// List the snapshots.
    #[arg(short = 'l', long, group = "op")]
    list: bool,
    /// Take a snapshot of the current contents.
    #[arg(short = 'c', long, value_name = "NAME", group = "op")]
    create: Option<String>,
    /// Revert the disk to a snapshot (by name or ID); the snapshot is kept.
    #[arg(short = 'a', long, value_name = "NAME", group = "op")]
    apply: Option<String>,
    /// Delete a snapshot (by name or ID).
    #[arg(short = 'd', long, value_name = "NAME", group = "op")]
    delete: Option<String>,
    /// The image's format (probed from its first bytes when omitted; snapshots need qcow2).
    #[arg(short = 'f', long, value_name = "FORMAT", value_parser = parse_format)]
    format: Option<Format>,
    /// The image file.
    file: PathBuf,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Repair what can be repaired, as `qemu-img check -r all`: rebuild the refcounts from the
    /// tables (leaked clusters, clusters counted as free while in use) and correct COPIED
    /// flags. The image must not be in use; overlapping tables and offsets outside the file
    /// are reported, not repaired.
    #[arg(long)]
    repair: bool,
    /// Print JSON (keys as `qemu-img check --output=json`); problems still go to stderr.
    #[arg(long)]
    json: bool,
    /// Format of the image, detected when omitted (give it for images a guest has written).
    #[arg(short = 'f', long, value_name = "FORMAT", value_parser = parse_format)]
    format: Option<Format>,
    /// The image file.
    file: PathBuf,
}

/// Exit codes: 0 success, 1 the operation failed, 2 invalid arguments, 3 the image is
/// missing, unreadable, invalid or locked.
fn fail(error: &ManageError) -> ExitCode {
    eprintln!("ferro: error: {}", error_chain(error));
    ExitCode::from(match error {
        ManageError::Usage(_) => 2,
        ManageError::Open(_) | ManageError::Exists { .. } | ManageError::Backing { .. } => 3,
        ManageError::Create { .. } | ManageError::Image { .. } => 1,
    })
}

pub fn img(args: ImgArgs) -> ExitCode {
    let result = match args.command {
        ImgCommand::Check(args) => return check(args),
        ImgCommand::Create(args) => create(args),
        ImgCommand::Info(args) => info(args),
        ImgCommand::Resize(args) => resize(args),
        ImgCommand::Snapshot(args) => snapshot(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn create(args: CreateArgs) -> Result<(), ManageError> {
    if args.backing_format.is_some() && args.backing.is_none() {
        return Err(ManageError::Usage(
            "--backing-format needs --backing".into(),
        ));
    }
    let new = NewImage {
        format: args.format,
        size: args.size,
        cluster_size: args.cluster_size,
        backing: args.backing,
        backing_format: args.backing_format,
    };
    manage::create(&args.file, &new)?;
    let info = manage::info(&args.file, Some(args.format))?;
    println!(
        "Created {} ({}, {})",
        args.file.display(),
        args.format.name(),
        human_size(info.virtual_size)
    );
    Ok(())
}

fn resize(args: ResizeArgs) -> Result<(), ManageError> {
    let usage = |e: String| ManageError::Usage(format!("invalid size {:?}: {e}", args.size));
    let size = match args.size.strip_prefix('+') {
        Some(delta) => {
            let delta = parse_size(delta).map_err(usage)?;
            manage::virtual_size(&args.file, args.format)?
                .checked_add(delta)
                .ok_or_else(|| usage("too large".into()))?
        }
        None if args.size.starts_with('-') => {
            return Err(ManageError::Usage("shrinking is not supported".into()));
        }
        None => parse_size(&args.size).map_err(usage)?,
    };
    manage::resize(&args.file, args.format, size)?;
    println!("Resized {} to {}", args.file.display(), human_size(size));
    Ok(())
}

fn snapshot(args: SnapshotArgs) -> Result<(), ManageError> {
    let op = match (args.create, args.apply, args.delete) {
        (Some(name), _, _) => SnapshotOp::Create(name),
        (_, Some(name), _) => SnapshotOp::Apply(name),
        (_, _, Some(name)) => SnapshotOp::Delete(name),
        _ => SnapshotOp::List,
    };
    let snapshots = manage::snapshot(&args.file, args.format, &op)?;
    if op == SnapshotOp::List {
        print!("{}", snapshot_table(&snapshots));
    }
    Ok(())
}

fn info(args: InfoArgs) -> Result<(), ManageError> {
    let info = describe(manage::info(&args.file, args.format)?);
    if args.json {
        let json = serde_json::to_string_pretty(&info)
            .map_err(|e| ManageError::Usage(format!("cannot print JSON: {e}")))?;
        println!("{json}");
    } else {
        print!("{}", human_info(&info));
    }
    Ok(())
}

fn describe(info: manage::ImageInfo) -> ImageInfo {
    let qcow2 = info.qcow2.as_ref();
    ImageInfo {
        filename: info.path.display().to_string(),
        format: info.format.name().to_string(),
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
        cluster_size: qcow2.map(|q| q.cluster_size),
        backing_filename: info.backing_file.clone(),
        full_backing_filename: info
            .full_backing_path
            .as_deref()
            .map(|p| p.display().to_string()),
        backing_filename_format: info.backing_format.clone(),
        dirty_flag: qcow2.map(|q| q.dirty),
        snapshots: qcow2.map_or_else(Vec::new, |q| {
            q.snapshots.iter().map(snapshot_info).collect()
        }),
        format_specific: qcow2.map(|q| {
            FormatSpecific::Qcow2(Qcow2Details {
                compat: if q.version >= 3 { "1.1" } else { "0.10" }.to_string(),
                lazy_refcounts: q.lazy_refcounts,
                refcount_bits: q.refcount_bits,
                corrupt: q.corrupt,
            })
        }),
    }
}

fn snapshot_info(s: &Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        id: s.id.clone(),
        name: s.name.clone(),
        vm_state_size: s.vm_state_size,
        date_sec: u64::from(s.date_sec),
        date_nsec: s.date_nsec,
        vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
        vm_clock_nsec: (s.vm_clock_nsec % 1_000_000_000) as u32,
    }
}

/// `10 GiB`, `1.5 MiB`, `512 B`.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    let number = format!("{value:.2}");
    let number = number.trim_end_matches('0').trim_end_matches('.');
    format!("{number} {}", UNITS[unit])
}

fn human_info(info: &ImageInfo) -> String {
    let mut out = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        info.filename,
        info.format,
        human_size(info.virtual_size),
        info.virtual_size,
        human_size(info.actual_size)
    );
    if let Some(cluster_size) = info.cluster_size {
        out += &format!("cluster_size: {cluster_size}\n");
    }
    if let Some(backing) = &info.backing_filename {
        let full = info.full_backing_filename.as_deref().unwrap_or(backing);
        out += &format!("backing file: {backing} (actual path: {full})\n");
    }
    if let Some(format) = &info.backing_filename_format {
        out += &format!("backing file format: {format}\n");
    }
    if !info.snapshots.is_empty() {
        out += "Snapshot list:\n";
        out += &snapshot_rows(&info.snapshots);
    }
    if let Some(FormatSpecific::Qcow2(q)) = &info.format_specific {
        out += &format!(
            "Format specific information:\n    compat: {}\n    lazy refcounts: {}\n    refcount bits: {}\n    corrupt: {}\n",
            q.compat, q.lazy_refcounts, q.refcount_bits, q.corrupt
        );
    }
    out
}

fn snapshot_table(snapshots: &[Snapshot]) -> String {
    let infos: Vec<SnapshotInfo> = snapshots.iter().map(snapshot_info).collect();
    if infos.is_empty() {
        return String::new();
    }
    snapshot_rows(&infos)
}

fn snapshot_rows(snapshots: &[SnapshotInfo]) -> String {
    let mut out = format!(
        "{:<4} {:<24} {:>10} {:<20}\n",
        "ID", "TAG", "VM SIZE", "DATE (UTC)"
    );
    for s in snapshots {
        out += &format!(
            "{:<4} {:<24} {:>10} {:<20}\n",
            s.id,
            s.name,
            human_size(s.vm_state_size),
            utc_date(s.date_sec)
        );
    }
    out
}

/// `YYYY-MM-DD hh:mm:ss` for seconds since the epoch (proleptic Gregorian, UTC).
fn utc_date(seconds: u64) -> String {
    let days = seconds / 86400;
    let rem = seconds % 86400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `ferro img check`: problems on stderr, the summary (or JSON) on stdout, and qemu-img's exit
/// codes.
fn check(args: CheckArgs) -> ExitCode {
    let report = match manage::check(&args.file, args.format, args.repair) {
        Ok(manage::CheckOutcome::Qcow2(report)) => report,
        Ok(manage::CheckOutcome::Raw) => {
            eprintln!(
                "ferro: {} is a raw image: it has no metadata to check",
                args.file.display()
            );
            return ExitCode::from(63);
        }
        Err(e) => {
            eprintln!("ferro: error: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    for problem in &report.problems {
        let kind = match problem.kind {
            CheckProblem::Corruption => "corruption",
            CheckProblem::Leak => "leak",
        };
        eprintln!("{kind}: {}", problem.message);
    }
    if report.unlisted > 0 {
        eprintln!("... and {} more problems", report.unlisted);
    }
    if args.json {
        println!("{}", check_json(&args.file, &report));
    } else {
        print!("{}", check_summary(&args.file, &report, args.repair));
    }
    ExitCode::from(match (report.corruptions, report.leaks) {
        (0, 0) => 0,
        (0, _) => 3,
        _ => 2,
    })
}

fn check_summary(file: &std::path::Path, r: &CheckReport, repaired: bool) -> String {
    let mut out = String::new();
    for line in &r.repairs {
        out += &format!("Repair: {line}\n");
    }
    if r.corruptions_fixed + r.leaks_fixed > 0 {
        out += &format!(
            "Repaired {} corruptions and {} leaked clusters.\n",
            r.corruptions_fixed, r.leaks_fixed
        );
    }
    if r.corruptions == 0 && r.leaks == 0 {
        out += "No inconsistencies found.\n";
    }
    if r.corruptions > 0 {
        out += &format!(
            "{} corruptions found: data may be lost, and writing to the image may destroy more.\n",
            r.corruptions
        );
    }
    if r.leaks > 0 {
        out += &format!(
            "{} leaked clusters found: they waste space but put no data at risk.\n",
            r.leaks
        );
    }
    let repairable = r.problems.iter().any(|p| p.repairable);
    if !repaired && repairable {
        out += &format!(
            "`ferro img check --repair {}` repairs the ones it can (the image must not be in use).\n",
            file.display()
        );
    }
    let percent = |n: u64| 100.0 * n as f64 / r.total_clusters.max(1) as f64;
    let of_allocated = |n: u64| 100.0 * n as f64 / r.allocated_clusters.max(1) as f64;
    out += &format!(
        "{}/{} clusters allocated ({:.2}%), {:.2}% of them fragmented, {:.2}% compressed\nImage end offset: {}\n",
        r.allocated_clusters,
        r.total_clusters,
        percent(r.allocated_clusters),
        of_allocated(r.fragmented_clusters),
        of_allocated(r.compressed_clusters),
        r.image_end_offset
    );
    out
}

fn check_json(file: &std::path::Path, r: &CheckReport) -> String {
    let problems: Vec<serde_json::Value> = r
        .problems
        .iter()
        .map(|p| {
            serde_json::json!({
                "kind": match p.kind {
                    CheckProblem::Corruption => "corruption",
                    CheckProblem::Leak => "leak",
                },
                "repairable": p.repairable,
                "message": p.message,
            })
        })
        .collect();
    let json = serde_json::json!({
        "filename": file.display().to_string(),
        "format": "qcow2",
        "check-errors": r.check_errors,
        "corruptions": r.corruptions,
        "leaks": r.leaks,
        "corruptions-fixed": r.corruptions_fixed,
        "leaks-fixed": r.leaks_fixed,
        "image-end-offset": r.image_end_offset,
        "total-clusters": r.total_clusters,
        "allocated-clusters": r.allocated_clusters,
        "fragmented-clusters": r.fragmented_clusters,
        "compressed-clusters": r.compressed_clusters,
        "problems": problems,
        "repairs": r.repairs,
    });
    serde_json::to_string_pretty(&json).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_dates_read_well() {
        assert_eq!(human_size(10 << 30), "10 GiB");
        assert_eq!(human_size(1536 << 10), "1.5 MiB");
        assert_eq!(human_size(196_608), "192 KiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(1_795_000_000), "2026-11-18 11:06:40");
    }
}
