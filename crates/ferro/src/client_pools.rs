//! `ferro pool ...` and `ferro vol ...`: storage pools and volumes through the daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::daemon_api::AutostartRequest;
use api::pool_api::{
    paths, CloneEvent, PoolInfo, SnapshotCreate, VolumeClone, VolumeCreate, VolumeInfo,
    VolumeResize, VolumeSnapshot,
};
use api::ByteSize;
use clap::{Args, Subcommand};
use http_unix::Client;

use crate::client::{
    call, client, decode, exit_codes, finish, human, print_json, DaemonSocket, Failure, Outcome,
    CLIENT_HELP,
};

/// Manage storage pools (directories of disk images).
#[derive(Debug, Args)]
#[command(after_help = CLIENT_HELP)]
pub struct PoolArgs {
    #[command(flatten)]
    daemon: DaemonSocket,
    #[command(subcommand)]
    command: PoolCommand,
}

/// Exit codes of a pool command that names a pool.
fn pool_codes() -> String {
    exit_codes("pool", true, true)
}

/// Exit codes of a volume command.
fn vol_codes() -> String {
    exit_codes("pool or volume", true, true)
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Add a pool from a definition file (TOML: name, path, autostart).
    #[command(after_help = exit_codes("pool", false, true))]
    Define {
        /// The definition file.
        file: PathBuf,
    },
    /// Remove an inactive pool's definition (its files stay).
    #[command(after_help = pool_codes())]
    Undefine {
        /// The pool.
        name: String,
    },
    /// List the pools with capacity, allocation and free space.
    #[command(after_help = exit_codes("pool", false, false))]
    List(Json),
    /// Show a pool.
    #[command(after_help = exit_codes("pool", true, false))]
    Info {
        /// The pool.
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Activate a pool (its directory is created if missing).
    #[command(after_help = pool_codes())]
    Start {
        /// The pool.
        name: String,
    },
    /// Deactivate a pool.
    #[command(after_help = pool_codes())]
    Stop {
        /// The pool.
        name: String,
    },
    /// Start the pool with the daemon (--disable to stop doing so).
    #[command(after_help = pool_codes())]
    Autostart {
        /// The pool.
        name: String,
        /// Do not start it with the daemon any more.
        #[arg(long)]
        disable: bool,
    },
}

#[derive(Debug, Args)]
struct Json {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Manage volumes (disk images) in storage pools.
#[derive(Debug, Args)]
#[command(after_help = CLIENT_HELP)]
pub struct VolArgs {
    #[command(flatten)]
    daemon: DaemonSocket,
    #[command(subcommand)]
    command: VolCommand,
}

#[derive(Debug, Subcommand)]
enum VolCommand {
    /// Create a volume (thin qcow2 by default).
    #[command(after_help = vol_codes())]
    Create {
        /// The new volume's name (its file name in the pool's directory).
        name: String,
        /// The pool to create it in.
        #[arg(long)]
        pool: String,
        /// Virtual size, e.g. 10G (a bare number is bytes, as qemu-img reads it); taken from
        /// --backing when absent.
        #[arg(long, value_parser = parse_size)]
        size: Option<ByteSize>,
        /// qcow2 or raw.
        #[arg(long, value_parser = ["raw", "qcow2"])]
        format: Option<String>,
        /// A volume of the same pool the new one is an overlay of.
        #[arg(long)]
        backing: Option<String>,
    },
    /// Copy a volume: a full, standalone copy (with progress), or with --linked a qcow2
    /// overlay on it.
    #[command(after_help = vol_codes())]
    Clone {
        /// The volume to copy.
        source: String,
        /// The new volume.
        name: String,
        /// The pool of both.
        #[arg(long)]
        pool: String,
        /// Make a thin qcow2 overlay on the source instead of a copy.
        #[arg(long)]
        linked: bool,
        /// Print the progress stream as JSON lines on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume (shrinking is refused), as `img resize` grows an image.
    #[command(after_help = vol_codes())]
    Resize {
        /// The volume.
        name: String,
        /// New virtual size (e.g. 40G; a bare number is bytes), or +SIZE to grow by that much.
        #[arg(allow_hyphen_values = true)]
        size: String,
        /// The pool holding the volume.
        #[arg(long)]
        pool: String,
    },
    /// Record a volume's format: for a volume whose format was never recorded (made by an
    /// older Ferro, or copied into the pool directory by hand) and that looks like something a
    /// guest could have written (a qcow2 image naming a backing file), or one recorded wrongly.
    /// Refused while a VM runs with it.
    #[command(after_help = vol_codes())]
    SetFormat {
        /// The volume.
        name: String,
        /// Its format: raw or qcow2.
        #[arg(value_parser = ["raw", "qcow2"])]
        format: String,
        /// The pool holding the volume.
        #[arg(long)]
        pool: String,
    },
    /// Delete a volume (refused while a VM or another volume uses it).
    #[command(after_help = vol_codes())]
    Delete {
        /// The volume.
        name: String,
        /// The pool holding the volume.
        #[arg(long)]
        pool: String,
    },
    /// List a pool's volumes.
    #[command(after_help = exit_codes("pool", true, true))]
    List {
        /// The pool.
        #[arg(long)]
        pool: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a volume.
    #[command(after_help = exit_codes("pool or volume", true, true))]
    Info {
        /// The volume.
        name: String,
        /// The pool holding the volume.
        #[arg(long)]
        pool: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replace a volume's content with a local image file (raw or qcow2), streamed. The
    /// volume takes the format given with --format, or, without it, the one the file's first
    /// bytes show now (recorded, never guessed again). A qcow2 file's backing file must be a
    /// volume of the same pool, named with its format.
    #[command(after_help = vol_codes())]
    Upload(UploadArgs),
    /// Save a volume's image file to a local file, streamed.
    #[command(after_help = vol_codes())]
    Download(Transfer),
    /// Internal snapshots of a qcow2 volume (changes refused while a running VM writes it).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    ByteSize::parse_disk_size(s).map_err(|e| e.to_string())
}

/// A volume and a local file to move data between.
#[derive(Debug, Args)]
struct Transfer {
    /// The volume.
    name: String,
    /// The local file.
    file: PathBuf,
    /// The pool holding the volume.
    #[arg(long)]
    pool: String,
    /// Print progress as JSON lines ({"bytes": N, "total": N}) on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct UploadArgs {
    #[command(flatten)]
    transfer: Transfer,
    /// The file's format: raw or qcow2 (probed from its first bytes when omitted).
    #[arg(long, value_name = "FORMAT", value_parser = ["raw", "qcow2"])]
    format: Option<String>,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot.
    #[command(after_help = vol_codes())]
    Create {
        /// The qcow2 volume.
        volume: String,
        /// The snapshot's name.
        snapshot: String,
        /// The pool holding the volume.
        #[arg(long)]
        pool: String,
    },
    /// List the snapshots.
    #[command(after_help = vol_codes())]
    List {
        /// The qcow2 volume.
        volume: String,
        /// The pool holding the volume.
        #[arg(long)]
        pool: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Bring the volume back to a snapshot (what was written since is lost).
    #[command(after_help = vol_codes())]
    Revert {
        /// The qcow2 volume.
        volume: String,
        /// The snapshot to go back to.
        snapshot: String,
        /// The pool holding the volume.
        #[arg(long)]
        pool: String,
    },
    /// Delete a snapshot.
    #[command(after_help = vol_codes())]
    Delete {
        /// The qcow2 volume.
        volume: String,
        /// The snapshot to delete.
        snapshot: String,
        /// The pool holding the volume.
        #[arg(long)]
        pool: String,
    },
}

fn snapshot_command(c: &Client, command: SnapshotCommand) -> Outcome {
    match command {
        SnapshotCommand::Create {
            volume,
            snapshot,
            pool,
        } => {
            let request = SnapshotCreate {
                name: snapshot.clone(),
            };
            call(
                c,
                "POST",
                &paths::snapshots(&pool, &volume),
                Some(body(&request)?),
            )?;
            println!("snapshot {snapshot} of volume {volume} created");
        }
        SnapshotCommand::List { volume, pool, json } => {
            let snapshots: Vec<VolumeSnapshot> =
                decode(&call(c, "GET", &paths::snapshots(&pool, &volume), None)?)?;
            if json {
                return print_json(&snapshots);
            }
            println!("{:<4} {:<24} {:>12}  DATE (UNIX)", "ID", "NAME", "SIZE");
            for s in &snapshots {
                println!(
                    "{:<4} {:<24} {:>12}  {}",
                    s.id,
                    s.name,
                    human(s.size_bytes),
                    s.date
                );
            }
        }
        SnapshotCommand::Revert {
            volume,
            snapshot,
            pool,
        } => {
            let path = format!("{}/revert", paths::snapshot(&pool, &volume, &snapshot));
            call(c, "POST", &path, None)?;
            println!("volume {volume} reverted to snapshot {snapshot}");
        }
        SnapshotCommand::Delete {
            volume,
            snapshot,
            pool,
        } => {
            call(
                c,
                "DELETE",
                &paths::snapshot(&pool, &volume, &snapshot),
                None,
            )?;
            println!("snapshot {snapshot} of volume {volume} deleted");
        }
    }
    Ok(())
}

fn body(value: &impl serde::Serialize) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(value).map_err(|e| Failure(1, e.to_string()))
}

pub fn pool(args: PoolArgs) -> ExitCode {
    let c = client(&args.daemon, Some(Duration::from_secs(120)));
    finish(pool_command(&c, args.command))
}

fn pool_command(c: &Client, command: PoolCommand) -> Outcome {
    match command {
        PoolCommand::Define { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Failure(2, format!("cannot read {}: {e}", file.display())))?;
            let definition = api::definition_file::parse_pool(&text)
                .map_err(|e| Failure(2, format!("{}: {e}", file.display())))?;
            call(c, "POST", paths::POOLS, Some(body(&definition)?))?;
            println!("pool {} defined", definition.name);
        }
        PoolCommand::Undefine { name } => {
            call(c, "DELETE", &paths::pool(&name), None)?;
            println!("pool {name} undefined");
        }
        PoolCommand::List(flag) => {
            let pools: Vec<PoolInfo> = decode(&call(c, "GET", paths::POOLS, None)?)?;
            if flag.json {
                return print_json(&pools);
            }
            println!(
                "{:<16} {:<9} {:>10} {:>10} {:>10}  PATH",
                "NAME", "STATE", "CAPACITY", "ALLOCATED", "AVAILABLE"
            );
            for p in &pools {
                println!(
                    "{:<16} {:<9} {:>10} {:>10} {:>10}  {}",
                    p.definition.name,
                    format!("{:?}", p.state).to_lowercase(),
                    human(p.capacity_bytes),
                    human(p.allocation_bytes),
                    human(p.available_bytes),
                    p.definition.path.display()
                );
            }
        }
        PoolCommand::Info { name, json } => {
            let info: PoolInfo = decode(&call(c, "GET", &paths::pool(&name), None)?)?;
            if json {
                return print_json(&info);
            }
            println!("Name:       {}", info.definition.name);
            println!("Path:       {}", info.definition.path.display());
            println!("State:      {}", format!("{:?}", info.state).to_lowercase());
            println!(
                "Autostart:  {}",
                if info.definition.autostart {
                    "yes"
                } else {
                    "no"
                }
            );
            println!("Capacity:   {}", human(info.capacity_bytes));
            println!("Allocation: {}", human(info.allocation_bytes));
            println!("Available:  {}", human(info.available_bytes));
            println!("Volumes:    {}", info.volumes);
        }
        PoolCommand::Start { name } => {
            call(c, "POST", &paths::pool_action(&name, "start"), None)?;
            println!("pool {name} started");
        }
        PoolCommand::Stop { name } => {
            call(c, "POST", &paths::pool_action(&name, "stop"), None)?;
            println!("pool {name} stopped");
        }
        PoolCommand::Autostart { name, disable } => {
            let request = AutostartRequest { enabled: !disable };
            call(
                c,
                "PUT",
                &paths::pool_action(&name, "autostart"),
                Some(body(&request)?),
            )?;
            println!(
                "pool {name} {} with the daemon",
                if disable {
                    "will not start"
                } else {
                    "will start"
                }
            );
        }
    }
    Ok(())
}

pub fn vol(args: VolArgs) -> ExitCode {
    // A full clone copies data: give it time.
    let c = client(&args.daemon, Some(Duration::from_secs(3600)));
    finish(vol_command(&c, args.command))
}

fn print_volume(v: &VolumeInfo) {
    println!("Name:       {}", v.name);
    println!("Pool:       {}", v.pool);
    println!("Path:       {}", v.path.display());
    match v.format.as_str() {
        "unknown" => println!(
            "Format:     unknown (never recorded, and it may be a guest's work: set it with \
             `ferro vol set-format {} raw|qcow2 --pool {}`)",
            v.name, v.pool
        ),
        format => println!("Format:     {format}"),
    }
    println!("Capacity:   {}", human(v.capacity_bytes));
    println!("Allocation: {}", human(v.allocation_bytes));
    if let Some(backing) = &v.backing {
        println!("Backing:    {backing}");
    }
    if v.incomplete {
        println!("State:      incomplete (the host went down before its clone was on storage)");
    }
}

fn vol_command(c: &Client, command: VolCommand) -> Outcome {
    match command {
        VolCommand::Create {
            name,
            pool,
            size,
            format,
            backing,
        } => {
            let request = VolumeCreate {
                name: name.clone(),
                size,
                format,
                backing,
            };
            call(c, "POST", &paths::volumes(&pool), Some(body(&request)?))?;
            println!("volume {name} created in pool {pool}");
        }
        VolCommand::Clone {
            source,
            name,
            pool,
            linked,
            json,
        } => {
            let request = VolumeClone {
                name: name.clone(),
                linked,
            };
            let path = paths::volume_action(&pool, &source, "clone");
            if linked {
                call(c, "POST", &path, Some(body(&request)?))?;
                println!("volume {name} created in pool {pool} (linked clone of {source})");
            } else {
                full_clone(
                    c,
                    &format!("{path}?progress=ndjson"),
                    &body(&request)?,
                    json,
                )?;
                if !json {
                    println!("volume {name} created in pool {pool} (copy of {source})");
                }
            }
        }
        VolCommand::Resize { name, size, pool } => {
            let size = resize_target(c, &pool, &name, &size)?;
            call(
                c,
                "POST",
                &paths::volume_action(&pool, &name, "resize"),
                Some(body(&VolumeResize { size })?),
            )?;
            println!("volume {name} resized to {}", human(size.bytes()));
        }
        VolCommand::SetFormat { name, format, pool } => {
            call(
                c,
                "PUT",
                &paths::volume_action(&pool, &name, "format"),
                Some(body(&api::pool_api::VolumeFormat {
                    format: format.clone(),
                })?),
            )?;
            println!("volume {name} of pool {pool} is {format}");
        }
        VolCommand::Delete { name, pool } => {
            call(c, "DELETE", &paths::volume(&pool, &name), None)?;
            println!("volume {name} deleted from pool {pool}");
        }
        VolCommand::List { pool, json } => {
            let volumes: Vec<VolumeInfo> = decode(&call(c, "GET", &paths::volumes(&pool), None)?)?;
            if json {
                return print_json(&volumes);
            }
            println!(
                "{:<24} {:<6} {:>10} {:>10}  BACKING",
                "NAME", "FORMAT", "CAPACITY", "ALLOCATED"
            );
            for v in &volumes {
                println!(
                    "{:<24} {:<6} {:>10} {:>10}  {}",
                    v.name,
                    v.format,
                    human(v.capacity_bytes),
                    human(v.allocation_bytes),
                    v.backing.as_deref().unwrap_or("-")
                );
                if v.incomplete {
                    println!("  ^ incomplete: may miss data; delete it and clone it again");
                }
            }
        }
        VolCommand::Info { name, pool, json } => {
            let volume: VolumeInfo = decode(&call(c, "GET", &paths::volume(&pool, &name), None)?)?;
            if json {
                return print_json(&volume);
            }
            print_volume(&volume);
        }
        VolCommand::Snapshot(command) => return snapshot_command(c, command),
        VolCommand::Upload(u) => upload(c, &u.transfer, u.format.as_deref())?,
        VolCommand::Download(t) => download(c, &t.pool, &t.name, &t.file, t.json)?,
    }
    Ok(())
}

/// The size `vol resize` asks for: SIZE, or the volume's size now plus SIZE for +SIZE (the
/// rules of `img resize`).
fn resize_target(c: &Client, pool: &str, name: &str, size: &str) -> Result<ByteSize, Failure> {
    let invalid = |e: String| Failure(2, format!("invalid size {size:?}: {e}"));
    match size.strip_prefix('+') {
        Some(delta) => {
            let delta = parse_size(delta).map_err(invalid)?;
            let volume: VolumeInfo = decode(&call(c, "GET", &paths::volume(pool, name), None)?)?;
            volume
                .capacity_bytes
                .checked_add(delta.bytes())
                .map(ByteSize)
                .ok_or_else(|| invalid("too large".into()))
        }
        None if size.starts_with('-') => Err(Failure(
            2,
            "shrinking a volume is not supported (it would lose data)".into(),
        )),
        None => parse_size(size).map_err(invalid),
    }
}

/// Progress of a transfer: a bar on a terminal's stderr, or JSON lines on stdout.
struct Progress {
    json: bool,
    tty: bool,
    total: u64,
    shown: Option<u64>,
}

impl Progress {
    fn new(json: bool, total: u64) -> Self {
        use std::io::IsTerminal;
        Progress {
            json,
            tty: std::io::stderr().is_terminal(),
            total,
            shown: None,
        }
    }

    fn update(&mut self, bytes: u64) {
        let percent = (bytes * 100).checked_div(self.total).unwrap_or(100);
        if self.shown == Some(percent) && bytes != self.total {
            return;
        }
        self.shown = Some(percent);
        if self.json {
            println!("{{\"bytes\": {bytes}, \"total\": {}}}", self.total);
        } else if self.tty {
            let filled = (percent / 5) as usize;
            eprint!(
                "\r[{}{}] {percent:>3}% {} / {}",
                "#".repeat(filled),
                " ".repeat(20 - filled),
                human(bytes),
                human(self.total)
            );
            if bytes == self.total {
                eprintln!();
            }
        }
    }
}

/// A full clone, following its progress stream.
fn full_clone(c: &Client, path: &str, request: &[u8], json: bool) -> Outcome {
    let (status, stream) = c
        .stream_with_body("POST", path, request)
        .map_err(|e| Failure(5, crate::error_chain(&e)))?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stream));
    if status != 200 {
        let text: Vec<String> = lines.map_while(Result::ok).collect();
        let message = serde_json::from_str::<api::vmm_api::ErrorBody>(&text.join("\n"))
            .map(|b| b.error)
            .unwrap_or_else(|_| text.join("\n"));
        return Err(Failure(crate::client::exit_code_for(status), message));
    }
    let mut progress: Option<Progress> = None;
    for line in lines.by_ref() {
        let line = line.map_err(|e| Failure(5, format!("the daemon went away: {e}")))?;
        if json {
            println!("{line}");
        }
        match serde_json::from_str::<CloneEvent>(&line) {
            Ok(CloneEvent::Progress { bytes, total }) => {
                if !json {
                    progress
                        .get_or_insert_with(|| Progress::new(false, total))
                        .update(bytes);
                }
            }
            Ok(CloneEvent::Done { .. }) => return Ok(()),
            Ok(CloneEvent::Failed { error, status }) => {
                return Err(Failure(crate::client::exit_code_for(status), error))
            }
            Err(e) => {
                return Err(Failure(
                    1,
                    format!("unexpected answer from the daemon: {e}"),
                ))
            }
        }
    }
    Err(Failure(
        5,
        "the daemon ended the clone without a result".into(),
    ))
}

fn upload(c: &Client, transfer: &Transfer, format: Option<&str>) -> Outcome {
    let Transfer {
        name,
        file,
        pool,
        json,
    } = transfer;
    let json = *json;
    let mut path = paths::volume_action(pool, name, "data");
    if let Some(format) = format {
        path += &format!("?format={format}");
    }
    let mut source = std::fs::File::open(file)
        .map_err(|e| Failure(2, format!("cannot read {}: {e}", file.display())))?;
    let len = source
        .metadata()
        .map_err(|e| Failure(2, e.to_string()))?
        .len();
    let mut progress = Progress::new(json, len);
    let response = c
        .upload("PUT", &path, &mut source, len, &mut |n| progress.update(n))
        .map_err(|e| Failure(5, crate::error_chain(&e)))?;
    if response.status != 200 {
        let message = serde_json::from_slice::<api::vmm_api::ErrorBody>(&response.body)
            .map(|b| b.error)
            .unwrap_or_else(|_| response.text());
        return Err(Failure(
            crate::client::exit_code_for(response.status),
            message,
        ));
    }
    if !json {
        println!("volume {name} of pool {pool} now holds {}", file.display());
    }
    Ok(())
}

fn download(c: &Client, pool: &str, name: &str, file: &PathBuf, json: bool) -> Outcome {
    let (status, len, mut body) = c
        .download("GET", &paths::volume_action(pool, name, "data"))
        .map_err(|e| Failure(5, crate::error_chain(&e)))?;
    if status != 200 {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut body, &mut text);
        let message = serde_json::from_str::<api::vmm_api::ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or(text);
        return Err(Failure(crate::client::exit_code_for(status), message));
    }
    let total = len.unwrap_or(0);
    let mut progress = Progress::new(json, total);
    let partial = file.with_extension("part");
    let mut out = std::fs::File::create(&partial)
        .map_err(|e| Failure(2, format!("cannot write {}: {e}", partial.display())))?;
    let mut buf = vec![0u8; 256 << 10];
    let mut received = 0u64;
    let copied = (|| -> std::io::Result<()> {
        loop {
            let n = std::io::Read::read(&mut body, &mut buf)?;
            if n == 0 {
                break;
            }
            std::io::Write::write_all(&mut out, &buf[..n])?;
            received += n as u64;
            progress.update(received);
        }
        out.sync_data()
    })();
    if let Err(e) = copied.and_then(|()| {
        if len.is_some_and(|len| len != received) {
            return Err(std::io::Error::other(format!(
                "the daemon sent {received} of {total} bytes"
            )));
        }
        std::fs::rename(&partial, file)
    }) {
        let _ = std::fs::remove_file(&partial);
        return Err(Failure(1, format!("download failed: {e}")));
    }
    if !json {
        // Its format goes with it: an upload must say it again.
        let format = call(c, "GET", &paths::volume(pool, name), None)
            .and_then(|b| decode::<VolumeInfo>(&b))
            .map(|v| v.format)
            .unwrap_or_else(|_| "raw|qcow2".into());
        println!(
            "volume {name} of pool {pool} ({format}) saved to {}; upload it with --format {format}",
            file.display()
        );
    }
    Ok(())
}
