//! One dnsmasq per nat or isolated network, as libvirt runs it: DHCP on the network's bridge
//! (the definition's fixed hosts, and the VMs attached with the addresses reserved for them)
//! and DNS for their names under the network's domain.
//!
//! dnsmasq reads each field of a DHCP host line by its look: a field with ':' is a MAC,
//! `id:`/`set:`/`tag:`, one that parses as an address is the address, digits with an optional
//! s/m/h/d/w suffix are a lease time, `infinite` and `ignore` are keywords, the rest a name.
//! So every field is written so it can be read one way only: MACs and addresses as Ferro
//! formats them, and the name, which must be a DNS host name (letters, digits, inner '-',
//! not all digits), in double quotes: dnsmasq hides what is quoted from its field tests, so
//! `"5m"` or `"ignore"` is a name. A VM whose name cannot be a DNS name gets its address by
//! MAC, with no name. Names the guests send are ignored (`dhcp-ignore-names`): DNS names are
//! the daemon's to give.
//!
//! Its files live in `<state-dir>/networks/NAME.run/`: the configuration, the DHCP hosts file
//! (re-read on SIGHUP when VMs come and go), the leases, the pid file and the log (which
//! guests' DHCP traffic fills: [`rotate_log`] keeps it to a size). dnsmasq runs as a
//! daemon of its own, so it outlives a daemon restart; it is found again through its pid file,
//! checked against the process's command line so a recycled pid is never taken for it.
//!
//! Threading: blocking calls, made under the networks' lock.

use std::fs::OpenOptions;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::net_api::{dns_host_name, Lease, NetworkDefinition, NetworkMode, Subnet};
use guest_log::LogLimits;

use super::ports::Port;

/// How long a DHCP lease lasts.
const LEASE_TIME: &str = "1h";
/// How long dnsmasq may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the daemon checks dnsmasq's log against its cap. A guest flooding DHCP makes
/// dnsmasq log about 3 MB/s (measured): the log overshoots its cap by at most that much.
pub const LOG_CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DnsmasqError {
    #[error("cannot run {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error("dnsmasq refused to start: {0}")]
    Failed(String),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("dnsmasq (pid {0}) did not stop")]
    StillRunning(u32),
}

/// The files of one network's dnsmasq.
#[derive(Debug, Clone)]
pub struct DnsmasqFiles {
    dir: PathBuf,
}

impl DnsmasqFiles {
    /// The files under `dir` (the network's runtime directory).
    pub fn new(dir: PathBuf) -> Self {
        DnsmasqFiles { dir }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("dnsmasq.conf")
    }

    pub fn hosts(&self) -> PathBuf {
        self.dir.join("dhcp-hosts")
    }

    pub fn leases(&self) -> PathBuf {
        self.dir.join("leases")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("dnsmasq.pid")
    }

    /// dnsmasq's log (DHCP transactions, DNS setup, errors).
    pub fn log(&self) -> PathBuf {
        self.dir.join("dnsmasq.log")
    }
}

/// dnsmasq's configuration for a nat or isolated network on `subnet`.
pub fn config(definition: &NetworkDefinition, subnet: Subnet, files: &DnsmasqFiles) -> String {
    let (start, end) = definition
        .dhcp_range()
        .ok()
        .flatten()
        .unwrap_or((subnet.gateway(), subnet.last_host()));
    let domain = definition.domain();
    let lines = [
        format!(
            "# Written by the Ferro daemon for network {}.",
            definition.name
        ),
        "strict-order".into(),
        "bind-dynamic".into(),
        "except-interface=lo".into(),
        format!("interface={}", definition.bridge),
        format!("pid-file={}", files.pid_file().display()),
        format!("log-facility={}", files.log().display()),
        format!(
            "dhcp-range={start},{end},{},{LEASE_TIME}",
            netmask(subnet.prefix)
        ),
        "dhcp-no-override".into(),
        "dhcp-authoritative".into(),
        // dnsmasq would ping each new address and hold the first OFFER for 3 s (a VM's boot
        // waited that long for its lease). Only this dnsmasq hands out addresses on the bridge,
        // and its lease file outlives restarts, so the check guards nothing here.
        "no-ping".into(),
        format!("dhcp-lease-max={}", u32::from(end) - u32::from(start) + 1),
        format!("dhcp-hostsfile={}", files.hosts().display()),
        "dhcp-ignore-names".into(),
        // Leases by MAC alone: a guest sending another VM's client identifier must not take
        // over (or release) that VM's lease.
        "dhcp-ignore-clid".into(),
        format!("dhcp-leasefile={}", files.leases().display()),
        format!("domain={domain}"),
        format!("local=/{domain}/"),
        // The VMs' names come from the DHCP hosts, not from the host's /etc/hosts.
        "no-hosts".into(),
        "domain-needed".into(),
        "expand-hosts".into(),
    ];
    let mut text = lines.join("\n") + "\n";
    if definition.mode == NetworkMode::Isolated {
        // No upstream servers: an isolated network's guests resolve each other's names and
        // nothing else, so DNS queries cannot carry data out of the network.
        text += "no-resolv\nno-poll\n";
    }
    text
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

/// The DHCP hosts file: the definition's fixed hosts (MAC, address, name), then the VMs'
/// ports (MAC, reserved address, name if the VM has one); see the module's text for why each
/// field cannot be misread.
pub fn hosts_file(definition: &NetworkDefinition, ports: &[Port]) -> String {
    let mut text = String::new();
    let mut names = Vec::new();
    for host in &definition.hosts {
        text += &host_line(&host.mac.to_string(), Some(host.ip), Some(&host.name));
        names.push(host.name.as_str());
    }
    for port in ports {
        if definition.hosts.iter().all(|h| h.mac != port.mac) {
            // The last guard (see [`name_free`]): a port's name is checked when it joins.
            let name = port
                .dns_name
                .as_deref()
                .filter(|name| name_free(name, names.iter().copied()));
            text += &host_line(&port.mac.to_string(), port.ip, name);
            names.extend(name);
        }
    }
    text
}

/// Names no VM gets: the ones other machines look up to configure themselves (a web proxy by
/// WPAD, an IPv6 tunnel by ISATAP) or that mean this machine.
const RESERVED_NAMES: [&str; 3] = ["wpad", "isatap", "localhost"];

/// Whether a VM may have DNS name `name` on a network whose hosts and VMs have `taken`: not
/// reserved, and no other has it in any case (DNS names are case-insensitive, so "Web" would
/// answer for "web").
pub fn name_free<'a>(name: &str, mut taken: impl Iterator<Item = &'a str>) -> bool {
    !RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(name))
        && !taken.any(|t| t.eq_ignore_ascii_case(name))
}

/// One DHCP host line. A name that could be misread even in quotes (a quote, a comma, a
/// control character) is left out; names are checked long before, this is the last guard.
fn host_line(mac: &str, ip: Option<Ipv4Addr>, name: Option<&str>) -> String {
    let mut line = mac.to_string();
    if let Some(ip) = ip {
        line += &format!(",{ip}");
    }
    // Fixed hosts of older definitions may have all-digit names, which quoting keeps names.
    let quotable = |n: &str| {
        dns_host_name(n)
            || (!n.is_empty() && n.len() <= 63 && n.chars().all(|c| c.is_ascii_digit()))
    };
    if let Some(name) = name.filter(|n| quotable(n)) {
        line += &format!(",\"{name}\"");
    }
    line + "\n"
}

/// Writes `text` to `path` (whole file, replacing it atomically).
pub fn write(path: &Path, text: &str) -> Result<(), DnsmasqError> {
    crate::fs::write_atomic(path, text.as_bytes()).map_err(|e| DnsmasqError::Write {
        path: e.path,
        source: e.source,
    })
}

/// Starts dnsmasq on `files` (configuration and hosts written); returns its pid once it runs.
pub fn start(binary: &str, files: &DnsmasqFiles) -> Result<u32, DnsmasqError> {
    let _ = std::fs::remove_file(files.pid_file());
    // dnsmasq checks its configuration and binds its sockets before it forks: a parent that
    // exits 0 leaves a working server behind, and its stderr says what was wrong otherwise.
    let output = Command::new(binary)
        .arg(format!("--conf-file={}", files.config().display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| DnsmasqError::Spawn {
            binary: binary.into(),
            source,
        })?;
    if !output.status.success() {
        let message = String::from_utf8_lossy(&output.stderr).trim().to_string();
        return Err(DnsmasqError::Failed(if message.is_empty() {
            output.status.to_string()
        } else {
            message
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = running(files) {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            return Err(DnsmasqError::Failed("it wrote no pid file".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pid of this network's dnsmasq, if it runs.
pub fn running(files: &DnsmasqFiles) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(files.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = format!("--conf-file={}", files.config().display());
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == ours.as_bytes())
        .then_some(pid)
}

/// Makes dnsmasq re-read its hosts file.
pub fn reload(files: &DnsmasqFiles) {
    if let Some(pid) = running(files) {
        signal(pid, libc::SIGHUP);
    }
}

/// Stops this network's dnsmasq, if it runs.
pub fn stop(files: &DnsmasqFiles) -> Result<(), DnsmasqError> {
    let Some(pid) = running(files) else {
        return Ok(());
    };
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while running(files).is_some() {
        if Instant::now() > deadline {
            return Err(DnsmasqError::StillRunning(pid));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(files.pid_file());
    Ok(())
}

/// Rolls dnsmasq's log over once it has reached `limits.max_bytes` (the daemon checks every
/// [`LOG_CHECK_INTERVAL`]): the log becomes `dnsmasq.log.1` (older ones move up, `limits.backups` are kept), a
/// new one is created for dnsmasq, and SIGUSR2 makes dnsmasq reopen it. Returns whether it
/// rotated.
///
/// dnsmasq logs every DHCP message a guest sends, so a guest decides how fast this file grows;
/// it writes the file itself (synchronously, appending), and reopens it on SIGUSR2 as its
/// unprivileged user, who cannot create files here: the new file is made for it, owned and
/// mode as the old one.
pub fn rotate_log(files: &DnsmasqFiles, limits: LogLimits) -> Result<bool, DnsmasqError> {
    let log = files.log();
    let Ok(old) = std::fs::metadata(&log) else {
        return Ok(false);
    };
    if old.len() < limits.max_bytes {
        return Ok(false);
    }
    // Not running: nothing writes the file; a started dnsmasq appends to it.
    let Some(pid) = running(files) else {
        return Ok(false);
    };
    let write_error = |source| DnsmasqError::Write {
        path: log.clone(),
        source,
    };
    guest_log::shift_backups(&log, limits.backups).map_err(write_error)?;
    let new = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(old.mode() & 0o777)
        .open(&log)
        .map_err(write_error)?;
    std::os::unix::fs::fchown(&new, Some(old.uid()), Some(old.gid())).map_err(write_error)?;
    signal(pid, libc::SIGUSR2);
    Ok(true)
}

fn signal(pid: u32, signal: libc::c_int) {
    // The pid was checked to be this network's dnsmasq; one that is gone needs no signal.
    let _ = host_sys::signal::kill(pid, signal);
}

/// The leases in a dnsmasq lease file (`EXPIRY MAC IP HOSTNAME CLIENT-ID` lines; `*` for no
/// hostname). Lines that do not parse are skipped.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let expires = fields.next()?.parse().ok()?;
            let mac = fields.next()?.parse().ok()?;
            let ip = fields.next()?.parse().ok()?;
            let hostname = fields.next().filter(|h| *h != "*").map(str::to_string);
            Some(Lease {
                mac,
                ip,
                hostname,
                expires,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::net_api::StaticHost;

    fn definition() -> NetworkDefinition {
        let text = "name = \"default\"\nmode = \"nat\"\nbridge = \"ferro0\"\n\
                    subnet = \"192.168.122.0/24\"\ndomain = \"lab.example\"\n";
        let mut d: NetworkDefinition = toml::from_str(text).unwrap();
        d.hosts.push(StaticHost {
            mac: "52:54:00:00:00:01".parse().unwrap(),
            ip: "192.168.122.10".parse().unwrap(),
            name: "web".into(),
        });
        d
    }

    #[test]
    fn configuration_serves_the_bridge_range_and_domain() {
        let d = definition();
        let files = DnsmasqFiles::new("/var/lib/ferro/networks/default.run".into());
        let text = config(&d, d.subnet().unwrap().unwrap(), &files);
        for line in [
            "interface=ferro0",
            "dhcp-range=192.168.122.2,192.168.122.254,255.255.255.0,1h",
            "dhcp-lease-max=253",
            "domain=lab.example",
            "local=/lab.example/",
            "dhcp-hostsfile=/var/lib/ferro/networks/default.run/dhcp-hosts",
            "dhcp-leasefile=/var/lib/ferro/networks/default.run/leases",
            "pid-file=/var/lib/ferro/networks/default.run/dnsmasq.pid",
            "no-ping",
            "dhcp-ignore-clid",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        // A nat network forwards other names upstream; an isolated one has no upstream.
        assert!(!text.contains("no-resolv"));
        let mut isolated = d.clone();
        isolated.mode = NetworkMode::Isolated;
        let text = config(&isolated, d.subnet().unwrap().unwrap(), &files);
        assert!(text.lines().any(|l| l == "no-resolv"), "{text}");
        assert!(!text.contains("server="), "{text}");
        assert_eq!(netmask(20), Ipv4Addr::new(255, 255, 240, 0));
    }

    fn port(mac: &str, ip: &str, name: Option<&str>) -> Port {
        Port {
            vm: name.unwrap_or("x").into(),
            tap: "fv1n0".into(),
            ifindex: 1,
            mac: mac.parse().unwrap(),
            ip: Some(ip.parse().unwrap()),
            dns_name: name.map(str::to_string),
        }
    }

    #[test]
    fn hosts_file_lists_fixed_hosts_then_vms() {
        let d = definition();
        let ports = [
            port("52:54:00:00:00:02", "192.168.122.50", Some("vm-a")),
            // A VM on a fixed host's MAC keeps the fixed entry.
            port("52:54:00:00:00:01", "192.168.122.10", Some("vm-b")),
            // A VM whose name cannot be a DNS name: an address, no name.
            port("52:54:00:00:00:03", "192.168.122.51", None),
        ];
        assert_eq!(
            hosts_file(&d, &ports),
            "52:54:00:00:00:01,192.168.122.10,\"web\"\n\
             52:54:00:00:00:02,192.168.122.50,\"vm-a\"\n\
             52:54:00:00:00:03,192.168.122.51\n"
        );
    }

    /// A VM cannot take a name another host or VM of the network has, in any case, nor a
    /// name other guests look up to configure themselves: it gets its address without it.
    #[test]
    fn taken_and_reserved_names_are_left_out() {
        let d = definition();
        let ports = [
            port("52:54:00:00:00:02", "192.168.122.50", Some("vm-a")),
            port("52:54:00:00:00:03", "192.168.122.51", Some("WEB")),
            port("52:54:00:00:00:04", "192.168.122.52", Some("VM-A")),
            port("52:54:00:00:00:05", "192.168.122.53", Some("wpad")),
            port("52:54:00:00:00:06", "192.168.122.54", Some("ISATAP")),
            port("52:54:00:00:00:07", "192.168.122.55", Some("localhost")),
        ];
        assert_eq!(
            hosts_file(&d, &ports),
            "52:54:00:00:00:01,192.168.122.10,\"web\"\n\
             52:54:00:00:00:02,192.168.122.50,\"vm-a\"\n\
             52:54:00:00:00:03,192.168.122.51\n\
             52:54:00:00:00:04,192.168.122.52\n\
             52:54:00:00:00:05,192.168.122.53\n\
             52:54:00:00:00:06,192.168.122.54\n\
             52:54:00:00:00:07,192.168.122.55\n"
        );
        assert!(name_free("vm-b", ["web", "vm-a"].into_iter()));
        assert!(!name_free("Vm-A", ["web", "vm-a"].into_iter()));
    }

    /// Names dnsmasq would read as a lease time, a keyword, a tag, an address or a client id
    /// if written bare: valid DNS names are quoted, the rest never reach the file.
    #[test]
    fn hostile_names_are_quoted_or_left_out() {
        let d = definition();
        for name in ["ignore", "infinite", "5m", "1h", "30s", "2d", "1w", "a-1"] {
            let line = hosts_file(
                &d,
                &[port("52:54:00:00:00:09", "192.168.122.60", Some(name))],
            );
            let expected = format!(
                "52:54:00:00:00:01,192.168.122.10,\"web\"\n52:54:00:00:00:09,192.168.122.60,\"{name}\"\n"
            );
            assert_eq!(line, expected, "{name}");
        }
        for name in [
            "10.0.0.1", "set:x", "tag:x", "id:", "id:*", "a,b", "x\"y", "a\nb", "-a", "",
        ] {
            let line = hosts_file(
                &d,
                &[port("52:54:00:00:00:09", "192.168.122.60", Some(name))],
            );
            assert!(
                line.ends_with("\n52:54:00:00:00:09,192.168.122.60\n"),
                "{name:?}: {line:?}"
            );
        }
    }

    #[test]
    fn leases_parse_and_junk_is_skipped() {
        let text = "1700000000 52:54:00:aa:bb:cc 192.168.122.57 vm-a 01:52:54:00:aa:bb:cc\n\
                    0 52:54:00:aa:bb:cd 192.168.122.58 * *\n\
                    garbage line\n";
        let leases = parse_leases(text);
        assert_eq!(leases.len(), 2);
        assert_eq!(leases[0].hostname.as_deref(), Some("vm-a"));
        assert_eq!(leases[0].expires, 1_700_000_000);
        assert_eq!(leases[1].ip, Ipv4Addr::new(192, 168, 122, 58));
        assert_eq!(leases[1].hostname, None);
    }

    #[test]
    fn a_stale_pid_file_is_not_a_running_dnsmasq() {
        let dir = tempfile::tempdir().unwrap();
        let files = DnsmasqFiles::new(dir.path().into());
        assert_eq!(running(&files), None);
        // Our own pid: alive, but not a dnsmasq on this configuration.
        std::fs::write(files.pid_file(), format!("{}\n", std::process::id())).unwrap();
        assert_eq!(running(&files), None);
        stop(&files).unwrap();
    }
}
