//! One dnsmasq per nat or isolated network, as libvirt runs it: DHCP on the network's bridge
//! (its range, the definition's fixed hosts, and the names of the VMs attached) and DNS for
//! those names under the network's domain.
//!
//! Its files live in `<state-dir>/networks/NAME.run/`: the configuration, the DHCP hosts file
//! (re-read on SIGHUP when VMs come and go), the leases and the pid file. dnsmasq runs as a
//! daemon of its own, so it outlives a daemon restart; it is found again through its pid file,
//! checked against the process's command line so a recycled pid is never taken for it.
//!
//! Threading: blocking calls, made under the networks' lock.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::net::MacAddress;
use api::net_api::{Lease, NetworkDefinition, Subnet};

/// How long a DHCP lease lasts.
const LEASE_TIME: &str = "1h";
/// How long dnsmasq may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

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
        format!("dhcp-leasefile={}", files.leases().display()),
        format!("domain={domain}"),
        format!("local=/{domain}/"),
        // The VMs' names come from the DHCP hosts, not from the host's /etc/hosts.
        "no-hosts".into(),
        "domain-needed".into(),
        "expand-hosts".into(),
    ];
    lines.join("\n") + "\n"
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

/// The DHCP hosts file: the definition's fixed hosts (MAC, address, name), then the attached
/// VMs (MAC and name: an address from the range, and a DNS name).
pub fn hosts_file(definition: &NetworkDefinition, vms: &[(MacAddress, String)]) -> String {
    let mut text = String::new();
    for host in &definition.hosts {
        text += &format!("{},{},{}\n", host.mac, host.ip, host.name);
    }
    for (mac, name) in vms {
        if definition.hosts.iter().all(|h| h.mac != *mac) {
            text += &format!("{mac},{name}\n");
        }
    }
    text
}

/// Writes `text` to `path` (whole file, replacing it atomically).
pub fn write(path: &Path, text: &str) -> Result<(), DnsmasqError> {
    crate::store::atomic_write(path, text.as_bytes()).map_err(|e| DnsmasqError::Write {
        path: path.to_path_buf(),
        source: io::Error::other(crate::error::chain(&e)),
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

fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill() takes no memory; the pid was checked to be this network's dnsmasq.
    unsafe { libc::kill(pid, signal) };
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
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert_eq!(netmask(20), Ipv4Addr::new(255, 255, 240, 0));
    }

    #[test]
    fn hosts_file_lists_fixed_hosts_then_vms() {
        let d = definition();
        let vms = [
            ("52:54:00:00:00:02".parse().unwrap(), "vm-a".to_string()),
            // A VM on a fixed host's MAC keeps the fixed entry.
            ("52:54:00:00:00:01".parse().unwrap(), "vm-b".to_string()),
        ];
        assert_eq!(
            hosts_file(&d, &vms),
            "52:54:00:00:00:01,192.168.122.10,web\n52:54:00:00:00:02,vm-a\n"
        );
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
