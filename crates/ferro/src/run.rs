//! `ferro run`: one VM in the foreground with its serial console on the terminal.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use api::{ByteSize, VmConfig};
use clap::Args;

use crate::error_chain;

const RUN_HELP: &str = "\
Console:
  The guest's serial console (ttyS0), or hvc0 with --console hvc, is connected to this terminal. When stdin is a
  terminal it is put in raw mode and Ctrl-A starts an escape sequence:
    Ctrl-A x        quit (stops the VM at once)
    Ctrl-A h        help
    Ctrl-A Ctrl-A   send Ctrl-A to the guest
  With pipes, input and output pass through unchanged.

Exit codes:
  0    the guest powered off (or rebooted with --no-reboot), Ctrl-A x, or an API stop
  1    the VMM failed while setting up or running the VM (e.g. the API socket is in use)
  2    invalid command line or configuration (e.g. zero CPUs, too little or too much memory)
  3    the kernel, initramfs or a disk image is missing, unreadable or unusable
       (e.g. not a bootable Linux image, or a disk locked by another VM)
  4    /dev/kvm is missing, not accessible, or lacks a capability Ferro needs
  5    the guest triple-faulted (registers are printed)
  6    KVM could not run the guest: internal error, entry failure or unexpected exit
       (registers are printed)
  128+N  stopped by signal N (SIGINT, SIGTERM or SIGHUP)
  killed by SIGSYS (31): a thread made a system call outside its seccomp filter; the line
       before says which call and which thread (with --seccomp kill, the default)

Confinement:
  Every VMM thread runs under a seccomp filter of its own kind (vCPU, device worker, I/O pool,
  API, console, main), installed before the guest runs: see --seccomp.";

/// The flags that describe the VM itself, which `--config` replaces.
const VM_FLAGS: &[&str] = &[
    "kernel",
    "initrd",
    "cmdline",
    "cpus",
    "memory",
    "no_reboot",
    "rng",
    "disk",
    "net",
    "console",
];

/// Boot a Linux kernel in a VM, console on this terminal.
#[derive(Debug, Args)]
#[command(after_help = RUN_HELP)]
pub struct RunArgs {
    /// The whole VM as a file: JSON, or TOML when the name ends in .toml. Its fields are the
    /// flags' (kernel, initrd, cmdline, cpus, memory, no_reboot, rng, rng_bytes_per_sec,
    /// rng_period_ms, console, disks, nets; see the README); relative paths are from the
    /// current directory. Replaces the flags that describe the VM, and combines with the
    /// others (--api-socket, --console-socket, --console-log, --log-file, --exit-report).
    #[arg(long, value_name = "FILE", conflicts_with_all = VM_FLAGS)]
    config: Option<PathBuf>,

    /// Linux kernel: a bzImage, or an uncompressed ELF vmlinux with a PVH entry point.
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    kernel: Option<PathBuf>,

    /// Initramfs to load with the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = api::DEFAULT_CMDLINE)]
    cmdline: String,

    /// Number of vCPUs (1 to 64).
    #[arg(long, value_name = "N", default_value_t = api::DEFAULT_CPUS)]
    cpus: u32,

    /// Guest memory, e.g. 512M or 4G (a bare number is in MiB); at least 128M.
    #[arg(long, value_name = "SIZE", default_value_t = api::DEFAULT_MEMORY)]
    memory: ByteSize,

    /// Exit when the guest reboots instead of booting it again.
    #[arg(long)]
    no_reboot: bool,

    /// Add a virtio-rng device (entropy from the host's getrandom), optionally with its rate
    /// limit: --rng bytes_per_sec=N[,period_ms=M]. The guest gets at most N bytes a second
    /// (default 262144, 256 KiB), handed out every M ms (1 to 60000, default 100); each request
    /// counts as at least 64 bytes. Requests past the budget wait for the next period, so a
    /// guest reading /dev/hwrng in a loop cannot keep a host core busy.
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "")]
    rng: Option<api::RngOptions>,

    /// Add a virtio-blk disk:
    /// path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID][,backing_dir=DIR][,num_queues=N].
    /// Give format: without it the image is probed from its first bytes (with a warning: a
    /// guest decides a raw disk's first bytes), and a probed raw disk refuses guest writes that
    /// would make it look like another format. A qcow2 image's backing files must name their
    /// format and lie in the image's own directory (not below it), or under backing_dir. Repeat for
    /// more disks; they appear as /dev/vda, /dev/vdb... in that order.
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<api::DiskConfig>,

    /// Add a virtio-net interface on a TAP device: tap=NAME[,mac=MAC][,queue_pairs=N]. The TAP
    /// device is created (multi-queue, removed on exit) if it does not exist. One queue pair
    /// per vCPU unless queue_pairs says otherwise (one on a single-queue TAP). Repeat for more
    /// interfaces.
    #[arg(long, value_name = "OPTIONS")]
    net: Vec<api::NetConfig>,

    /// Which guest device this terminal is: `serial` (ttyS0) or `hvc` (virtio-console, hvc0;
    /// pass console=hvc0 in --cmdline).
    #[arg(long, value_name = "DEVICE", default_value_t)]
    console: api::ConsoleKind,

    /// Serve the VM's control API (HTTP/1.1 + JSON, see docs/api/vmm.openapi.json) on this
    /// Unix socket: info, counters, pause, resume, power button, reset, stop.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,

    /// Serve the console on this Unix socket instead of the terminal: clients see the guest's
    /// output live and type to it (`ferro vm console` is such a client).
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,

    /// Append the guest's console output to this file instead of the terminal.
    #[arg(long, value_name = "PATH")]
    console_log: Option<PathBuf>,

    /// Write the VMM's log (warnings and errors; more with -v or FERRO_LOG) to this file instead
    /// of stderr, and point stderr at it too. It is rotated at 2 MiB, three old files kept
    /// (PATH.1 is the newest), so a guest cannot fill the disk through it. The daemon runs
    /// every VMM with run/NAME/vmm.log here.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,

    /// When the VMM exits, write how the VM ended (exit code, outcome, error) to this file as
    /// JSON, for supervisors that cannot wait for the process.
    #[arg(long, value_name = "PATH")]
    exit_report: Option<PathBuf>,

    /// Allow core dumps. Off by default: a VMM's core holds its guest's memory. Either way
    /// the VMM also runs with a bound on open files and on how large a file it writes may
    /// grow (the images' virtual sizes twice over, plus 1 GiB; a write past it is an I/O
    /// error for the guest, not the VMM's end).
    #[arg(long)]
    core_dumps: bool,

    /// What a system call outside a thread's seccomp filter does: `kill` reports the call
    /// and the thread, then the VMM dies of SIGSYS; `log` lets it through and the kernel logs
    /// it (audit type 1326, in `dmesg`; for finding what a filter lacks); `off` installs no
    /// filter (not for guests you do not trust).
    #[arg(
        long,
        value_name = "MODE",
        default_value = "kill",
        env = "FERRO_SECCOMP"
    )]
    seccomp: SeccompArg,

    /// Test aid: have this fault on purpose, to see the tools that find faults find it.
    /// `mute-serial-irq`: COM1's interrupt never reaches the guest, so its serial output
    /// stalls as with a lost interrupt (`ferro vm diagnose` then shows the THR-empty interrupt
    /// pending). `forbidden-syscall`: at the guest's first port write its vCPU thread makes a
    /// system call its seccomp filter does not allow, so the VMM dies of SIGSYS with a report
    /// naming it. Repeat for more, or list them in FERRO_FAULT (comma-separated), which a
    /// daemon's VMMs inherit from it.
    #[arg(long, value_name = "FAULT", env = "FERRO_FAULT", value_delimiter = ',')]
    fault: Vec<Fault>,
}

/// `--seccomp`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SeccompArg {
    Kill,
    Log,
    Off,
}

impl From<SeccompArg> for sandbox::SeccompMode {
    fn from(arg: SeccompArg) -> Self {
        match arg {
            SeccompArg::Kill => sandbox::SeccompMode::Kill,
            SeccompArg::Log => sandbox::SeccompMode::Log,
            SeccompArg::Off => sandbox::SeccompMode::Off,
        }
    }
}

/// The faults `--fault` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Fault {
    MuteSerialIrq,
    ForbiddenSyscall,
}

/// How `ferro run` is wired to the outside, apart from the VM itself.
struct Wiring {
    api_socket: Option<PathBuf>,
    faults: vmm::Faults,
    console: vmm::ConsoleHubConfig,
    exit_report: Option<PathBuf>,
    seccomp: sandbox::SeccompMode,
    core_dumps: bool,
}

impl RunArgs {
    /// Where the log goes, if not to stderr.
    pub fn log_file(&self) -> Option<&std::path::Path> {
        self.log_file.as_deref()
    }

    /// The VM these arguments describe: the `--config` file, or the flags.
    fn vm_config(&mut self) -> Result<VmConfig, String> {
        if let Some(path) = &self.config {
            return read_config(path);
        }
        let Some(kernel) = self.kernel.take() else {
            return Err("give --kernel PATH, or the whole VM with --config FILE".into());
        };
        Ok(VmConfig {
            kernel,
            initrd: self.initrd.take(),
            cmdline: std::mem::take(&mut self.cmdline),
            cpus: self.cpus,
            memory: self.memory,
            no_reboot: self.no_reboot,
            rng: self.rng.is_some(),
            rng_bytes_per_sec: self.rng.and_then(|o| o.bytes_per_sec),
            rng_period_ms: self.rng.and_then(|o| o.period_ms),
            disks: std::mem::take(&mut self.disk),
            console: self.console,
            nets: std::mem::take(&mut self.net),
        })
    }

    /// The VM, checked once ([`VmConfig::into_runnable`]), and how the VMM is wired.
    fn into_parts(mut self) -> (Result<api::RunnableConfig, String>, Wiring) {
        let config = self
            .vm_config()
            .and_then(|config| config.into_runnable().map_err(|e| error_chain(&e)));
        let wiring = Wiring {
            api_socket: self.api_socket,
            faults: vmm::Faults {
                mute_serial_irq: self.fault.contains(&Fault::MuteSerialIrq),
                forbidden_syscall: self.fault.contains(&Fault::ForbiddenSyscall),
            },
            console: vmm::ConsoleHubConfig {
                socket: self.console_socket,
                log: self.console_log,
            },
            exit_report: self.exit_report,
            seccomp: self.seccomp.into(),
            core_dumps: self.core_dumps,
        };
        (config, wiring)
    }
}

/// Reads a `--config` file: TOML if its name ends in .toml, else JSON.
fn read_config(path: &Path) -> Result<VmConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the VM config {}: {e}", path.display()))?;
    let parsed = if path.extension().is_some_and(|ext| ext == "toml") {
        api::definition_file::parse_vm_config(&text)
    } else {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| {
        format!(
            "{}: {e} (see `ferro run --help` and the README's \"ferro run --config\")",
            path.display()
        )
    })
}

pub fn run(args: RunArgs) -> ExitCode {
    let (config, wiring) = args.into_parts();
    // Opened now: the filters that come later allow writing to it, not opening it.
    let report_file = match wiring
        .exit_report
        .as_deref()
        .map(open_exit_report)
        .transpose()
    {
        Ok(file) => file,
        Err(message) => {
            eprintln!("ferro: error: {message}");
            return ExitCode::from(vmm::ExitCode::Usage as u8);
        }
    };
    if let Some(file) = &report_file {
        sandbox::report_to(std::os::fd::AsRawFd::as_raw_fd(file));
    }
    let (code, outcome, error) = match (config, choose_seccomp(wiring.seccomp)) {
        (Ok(config), Ok(())) => run_vm(&config, &wiring),
        (Err(message), _) => {
            eprintln!("ferro: error: {message}");
            (vmm::ExitCode::Usage as u8, "error", Some(message))
        }
        (_, Err(message)) => {
            eprintln!("ferro: error: {message}");
            (vmm::ExitCode::VmmError as u8, "error", Some(message))
        }
    };
    if let (Some(file), Some(path)) = (report_file, &wiring.exit_report) {
        let report = api::vmm_api::ExitReport {
            code: i32::from(code),
            outcome: outcome.into(),
            error,
        };
        if let Err(e) = write_exit_report(file, &report) {
            eprintln!("ferro: error: cannot write {}: {e}", path.display());
        }
    }
    ExitCode::from(code)
}

/// Creates (or empties) the exit report file, so that nothing is opened at exit.
fn open_exit_report(path: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("cannot create the exit report {}: {e}", path.display()))
}

fn write_exit_report(
    mut file: std::fs::File,
    report: &api::vmm_api::ExitReport,
) -> std::io::Result<()> {
    use std::io::Write;
    let bytes = serde_json::to_vec(report).map_err(std::io::Error::other)?;
    file.write_all(&bytes)
}

/// Sets the process's seccomp mode (before any thread starts), warning when it is off.
fn choose_seccomp(mode: sandbox::SeccompMode) -> Result<(), String> {
    if mode == sandbox::SeccompMode::Off {
        tracing::warn!(
            "--seccomp off: the VMM's threads run without system call filters; a guest that \
             takes over a device emulation thread can make any system call"
        );
    }
    sandbox::set_mode(mode).map_err(|e| error_chain(&e))
}

fn outcome_name(outcome: vmm::Outcome) -> &'static str {
    match outcome {
        vmm::Outcome::PoweredOff => "powered-off",
        vmm::Outcome::Rebooted => "rebooted",
        vmm::Outcome::Quit => "quit",
        vmm::Outcome::Stopped => "stopped",
        vmm::Outcome::Signal(_) => "signal",
    }
}

/// Runs the VM (checked before the terminal is touched); returns the exit code, the
/// outcome's name and the error printed, if any.
fn run_vm(config: &api::RunnableConfig, wiring: &Wiring) -> (u8, &'static str, Option<String>) {
    let failed = |code: vmm::ExitCode, message: String| {
        eprintln!("ferro: error: {message}");
        (code as u8, "error", Some(message))
    };
    let hub = wiring.console.socket.is_some() || wiring.console.log.is_some();
    let console = if hub {
        vmm::ConsoleHub::start(&wiring.console).map(|(hub, console)| (Some(hub), console))
    } else {
        vmm::Console::stdio().map(|console| (None, console))
    };
    let (hub, mut console) = match console {
        Ok(console) => console,
        Err(e) => {
            return failed(
                vmm::ExitCode::VmmError,
                format!("cannot set up the console: {e}"),
            )
        }
    };
    let result = vmm::run(
        config,
        &mut console,
        wiring.api_socket.as_deref(),
        wiring.faults,
        wiring.core_dumps,
    );
    drop(console); // restores the terminal before anything is printed
    drop(hub);
    match result {
        Ok(outcome) => (outcome.exit_code() as u8, outcome_name(outcome), None),
        Err(e) => {
            let failure = failed(e.exit_code(), error_chain(&e));
            if let Some(registers) = e.guest_registers() {
                eprintln!("{registers}");
            }
            failure
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|c| c.run)
    }

    fn config_file(dir: &Path, name: &str, text: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    /// The flags build the same VmConfig a file with the same fields does.
    #[test]
    fn flags_and_config_files_describe_the_same_vm() {
        let dir = tempfile::tempdir().unwrap();
        let flags = parse(&[
            "--kernel=/k",
            "--cpus=2",
            "--memory=1G",
            "--rng=period_ms=50",
            "--disk=path=/d.qcow2,format=qcow2",
            "--net=tap=t0",
            "--console=hvc",
        ])
        .unwrap();
        let json = config_file(
            dir.path(),
            "vm.json",
            r#"{"kernel": "/k", "cpus": 2, "memory": "1G", "rng": true, "rng_period_ms": 50,
                "disks": [{"path": "/d.qcow2", "format": "qcow2"}], "nets": [{"tap": "t0"}],
                "console": "hvc"}"#,
        );
        let toml = config_file(
            dir.path(),
            "vm.toml",
            "kernel = \"/k\"\ncpus = 2\nmemory = \"1G\"\nrng = true\nrng_period_ms = 50\n\
             console = \"hvc\"\n[[disks]]\npath = \"/d.qcow2\"\nformat = \"qcow2\"\n\
             [[nets]]\ntap = \"t0\"\n",
        );
        let (from_flags, _) = flags.into_parts();
        let from_flags = from_flags.unwrap();
        for file in [json, toml] {
            let (from_file, _) = parse(&["--config", &file]).unwrap().into_parts();
            assert_eq!(from_file.unwrap(), from_flags, "{file}");
        }
    }

    #[test]
    fn config_conflicts_with_vm_flags_and_combines_with_process_options() {
        for flag in [
            "--kernel=/k",
            "--initrd=/i",
            "--cmdline=x",
            "--cpus=2",
            "--memory=1G",
            "--no-reboot",
            "--rng",
            "--disk=path=/d",
            "--net=tap=t0",
            "--console=hvc",
        ] {
            let err = parse(&["--config=/vm.json", flag]).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{flag}"
            );
        }
        let args = parse(&[
            "--config=/vm.json",
            "--api-socket=/a.sock",
            "--console-socket=/c.sock",
            "--console-log=/c.log",
            "--log-file=/v.log",
            "--exit-report=/e.json",
        ])
        .unwrap();
        assert_eq!(args.log_file(), Some(Path::new("/v.log")));
        let (_, wiring) = args.into_parts();
        assert_eq!(wiring.api_socket.as_deref(), Some(Path::new("/a.sock")));
        assert_eq!(wiring.exit_report.as_deref(), Some(Path::new("/e.json")));
        let err = parse(&[]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    /// One check for every way in; each error says what to change.
    #[test]
    fn bad_configs_are_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let refused = |args: &[&str]| parse(args).unwrap().into_parts().0.unwrap_err();
        let volume = config_file(
            dir.path(),
            "v.json",
            r#"{"kernel": "/k", "disks": [{"volume": "pool/v.qcow2"}]}"#,
        );
        assert_eq!(
            refused(&["--config", &volume]),
            "disk volume pool/v.qcow2 is resolved by the daemon: define the VM with `ferro vm \
             define`, or give a path to run it with `ferro run`"
        );
        assert!(refused(&["--kernel=/k", "--net=network=lab"]).contains("give a tap"));
        assert_eq!(
            refused(&["--kernel=/k", "--disk=path=/d,num_queues=0"]),
            "disk /d: option num_queues: 0 is not between 1 and 64"
        );
        let typo = config_file(dir.path(), "t.json", r#"{"kernel": "/k", "cpu": 2}"#);
        let err = refused(&["--config", &typo]);
        assert!(err.contains("unknown field `cpu`"), "{err}");
        assert!(err.contains("ferro run --config"), "{err}");
        let err = refused(&["--config", "/nonexistent/vm.json"]);
        assert!(
            err.starts_with("cannot read the VM config /nonexistent/vm.json"),
            "{err}"
        );
    }
}
