//! dnsmasq's log under a flood of DHCP messages, on this host's kernel inside a network
//! namespace of the test's thread (skipped without root, nft or dnsmasq).

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest_log::LogLimits;

use super::dnsmasq::*;
use crate::networks::netlink;
use crate::networks::{host_side, parse_network_definition, Networks};

/// A BOOTP DHCPDISCOVER from `mac`, asking for a broadcast answer.
fn discover(mac: [u8; 6], xid: u32) -> Vec<u8> {
    let mut packet = vec![0u8; 300];
    packet[..4].copy_from_slice(&[1, 1, 6, 0]); // request, Ethernet, 6-byte address
    packet[4..8].copy_from_slice(&xid.to_be_bytes());
    packet[10] = 0x80; // broadcast flag
    packet[28..34].copy_from_slice(&mac);
    packet[236..240].copy_from_slice(&[99, 130, 83, 99]); // magic cookie
    packet[240..244].copy_from_slice(&[53, 1, 1, 255]); // DHCPDISCOVER, end
    packet
}

/// Broadcasts from `socket` leave through `device` (this namespace has no default route).
fn bind_to_device(socket: &UdpSocket, device: &str) {
    host_sys::socket::bind_to_device(socket, device).unwrap();
}

fn files_on_disk(files: &DnsmasqFiles) -> Vec<(PathBuf, u64)> {
    (0..=LOG_LIMITS.backups + 1)
        .map(|n| match n {
            0 => files.log(),
            n => guest_log::backup_path(&files.log(), n),
        })
        .filter_map(|path| Some((path.clone(), std::fs::metadata(&path).ok()?.len())))
        .collect()
}

const LOG_LIMITS: LogLimits = LogLimits {
    max_bytes: 64 << 10,
    backups: 3,
};
/// What dnsmasq may write between two checks here (50 DISCOVERs, two lines each, and
/// those still queued in its socket).
const SLACK: u64 = 64 << 10;

/// What a flood did.
struct Flood {
    sent: u32,
    elapsed: Duration,
    /// Bytes dnsmasq wrote (at least: lines between a size check and a rotation are not
    /// counted).
    written: u64,
    rotations: u32,
    /// Most bytes the log and its backups held at a check.
    peak: u64,
    on_disk: Vec<(PathBuf, u64)>,
    /// [`Networks::rotate_dnsmasq_logs`] rotated a log at the default cap.
    daemon_rotated: bool,
    /// dnsmasq logged a message sent after the flood.
    logs_on: bool,
}

/// Floods dnsmasq with DISCOVERs from a veth on its bridge, rotating its log as the daemon
/// does (more often: every 50 messages).
fn flood(networks: &Networks, files: &DnsmasqFiles) -> Flood {
    // A veth pair stands in for a VM's TAP; the "guest" end has an address to send from.
    let status = std::process::Command::new("ip")
        .args(["link", "add", "fvclient5", "type", "veth"])
        .args(["peer", "name", "fvport5"])
        .status()
        .unwrap();
    assert!(status.success());
    host_side::ensure_on_bridge("fvport5", "ferrotest5").unwrap();
    netlink::set_up("fvclient5").unwrap();
    netlink::set_up("fvport5").unwrap();
    netlink::add_ipv4_address("fvclient5", Ipv4Addr::new(10, 71, 0, 250), 24).unwrap();
    // The "guest" address is this namespace's too: the bridge must accept it.
    std::fs::write("/proc/sys/net/ipv4/conf/ferrotest5/accept_local", "1").unwrap();
    let socket = UdpSocket::bind((Ipv4Addr::new(10, 71, 0, 250), 68)).unwrap();
    socket.set_broadcast(true).unwrap();
    bind_to_device(&socket, "fvclient5");
    let send = |mac_end: u8, xid: u32| {
        let packet = discover([0x52, 0x54, 0, 0x71, 0, mac_end], xid);
        // Lost packets (a full socket buffer) only make the flood smaller.
        let _ = socket.send_to(&packet, (Ipv4Addr::BROADCAST, 67));
    };

    let start = Instant::now();
    let (mut sent, mut written, mut rotations, mut peak, mut last_size) = (0, 0, 0, 0, 0);
    while sent < 20_000 {
        for _ in 0..50 {
            send(7, sent);
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
        let size = std::fs::metadata(files.log()).map_or(0, |m| m.len());
        written += size.saturating_sub(last_size);
        last_size = size;
        if rotate_log(files, LOG_LIMITS).unwrap() {
            rotations += 1;
            last_size = 0;
        }
        peak = peak.max(files_on_disk(files).iter().map(|f| f.1).sum::<u64>());
    }
    let elapsed = start.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let on_disk = files_on_disk(files);
    // The daemon's periodic call rotates at the default cap.
    let mut log = OpenOptions::new().append(true).open(files.log()).unwrap();
    let filler = vec![b'.'; LogLimits::DEFAULT.max_bytes as usize];
    std::io::Write::write_all(&mut log, &filler).unwrap();
    networks.rotate_dnsmasq_logs();
    let backup = guest_log::backup_path(&files.log(), 1);
    let daemon_rotated = std::fs::read(backup).is_ok_and(|kept| kept.ends_with(&filler));
    // Sent again until seen: behind a flood on a loaded machine, dnsmasq's socket buffer
    // may be full, and UDP drops what does not fit.
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs_on = loop {
        send(8, 1);
        std::thread::sleep(Duration::from_millis(200));
        let text = std::fs::read_to_string(files.log()).unwrap_or_default();
        if text.contains("52:54:00:71:00:08") || Instant::now() > deadline {
            break text.contains("52:54:00:71:00:08");
        }
    };
    Flood {
        sent,
        elapsed,
        written,
        rotations,
        peak,
        on_disk,
        daemon_rotated,
        logs_on,
    }
}

#[test]
fn a_dhcp_flood_leaves_at_most_the_cap_on_disk_and_dnsmasq_logs_on() {
    if host_side::Tools::find().is_err() {
        eprintln!("skipped: nft or dnsmasq is not installed");
        return;
    }
    netlink::in_new_netns(|| {
        let dir = tempfile::tempdir().unwrap();
        let networks = Networks::open(dir.path().join("networks"), dir.path().join("sys")).unwrap();
        let text = "name = \"flood\"\nmode = \"isolated\"\nbridge = \"ferrotest5\"\n\
                    subnet = \"10.71.0.0/24\"\n";
        networks
            .define(parse_network_definition(text).unwrap())
            .unwrap();
        networks.start("flood").unwrap();
        let files = DnsmasqFiles::new(networks.run_dir("flood"));
        let flood =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| flood(&networks, &files)));
        // Stopped before any assertion: dnsmasq would outlive a failed test.
        networks.stop("flood").unwrap();
        let flood = flood.unwrap();
        eprintln!(
            "{} DISCOVERs in {:?}: dnsmasq wrote at least {} bytes, {} rotations, at most \
             {} bytes on disk",
            flood.sent, flood.elapsed, flood.written, flood.rotations, flood.peak
        );
        let cap = (LOG_LIMITS.max_bytes + SLACK) * (1 + u64::from(LOG_LIMITS.backups));
        assert!(flood.peak <= cap, "{} bytes on disk", flood.peak);
        let on_disk = &flood.on_disk;
        assert!(
            on_disk.len() <= 1 + LOG_LIMITS.backups as usize,
            "{on_disk:?}"
        );
        for (path, len) in on_disk {
            let most = LOG_LIMITS.max_bytes + SLACK;
            assert!(*len <= most, "{}: {len}", path.display());
        }
        assert!(
            flood.rotations >= 3,
            "the flood filled the log {} times",
            flood.rotations
        );
        assert!(flood.daemon_rotated, "the daemon's check rotates at 2 MiB");
        assert!(flood.logs_on, "dnsmasq logs into the file made for it");
    });
}
