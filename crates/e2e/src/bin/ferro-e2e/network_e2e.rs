//! Virtual networks with real guests: two VMs whose root file systems are linked clones of one
//! pool volume (the default guest's files, uploaded), on a nat network, get DHCP leases (listed
//! by `ferro net leases`), resolve each other's names through the network's DNS and ping each
//! other and the bridge; a VM on an isolated network reaches its own bridge but nothing behind
//! the host. A hostile guest on the nat network, started first, gets nothing through once it
//! takes another address or MAC, and then runs a DHCP server of its own: the well-behaved VMs
//! started after it still get their leases (and DNS) from the network, and the bridge's filter
//! counted what it dropped. A daemon restart with both networks up duplicates nothing and the
//! VMs stay connected; a network with VMs on it cannot be stopped; stopping the VMs removes
//! their TAP devices and stopping the networks removes the rest.

use std::path::Path;
use std::time::Duration;

use api::daemon_api::{DomainState, VmDetails};
use api::net_api::Lease;
use e2e::daemon::Daemon;

use crate::{check, images, TestResult};

const NAT_BRIDGE: &str = "ferrolab0";
const ISOLATED_BRIDGE: &str = "ferroiso0";
/// How long a guest may take from start to its network checks.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(180);

/// The guest side, handed over gzipped and base64-encoded on the kernel command line. `$1` is
/// the VM's role: `peer NAME` pings NAME by its DNS name; `iso ADDRESS` expects ADDRESS
/// (behind the host) to be unreachable; `spoof -` pings the bridge, then tries another address
/// and another MAC (each must get nothing through), then serves DHCP itself.
const GUEST_SCRIPT: &str = r#"
# Root is the VM's own clone: what it writes there nobody else sees.
grep -q ' / ext4' /proc/mounts || { echo NET-FAIL no root disk; exit 1; }
echo "$(hostname)" > /written-by-$(hostname); sync
ip link set eth0 up
# Nested under emulation, with other guests booting, a reply can take seconds: retry.
for try in 1 2 3 4 5 6; do
    udhcpc -i eth0 -n -q -t 20 -T 3 -A 1 2>&1 | grep -v discover
    ip addr show eth0 | grep -q "inet " && break
done
ip addr show eth0 | grep -q "inet " || { echo NET-FAIL dhcp; exit 1; }
echo "NET-LEASE $(ip addr show eth0 | awk '/inet /{print $2}')"
gw=$(ip route | awk '/^default/{print $3}')
if [ "$1" = peer ]; then
    addr=
    i=0
    while [ -z "$addr" ] && [ $i -lt 150 ]; do
        addr=$(nslookup "$2.lab.test" "$gw" 2>/dev/null | awk '/^Name:/{n=1} n && /^Address/{print $2; exit}')
        [ -z "$addr" ] && sleep 1
        i=$((i+1))
    done
    [ -n "$addr" ] || { echo NET-FAIL dns; exit 1; }
    echo "NET-RESOLVED $2 $addr"
    ping -c 3 -W 3 "$addr" >/dev/null && echo NET-PEER-PING-OK
    ping -c 2 -W 3 "$gw" >/dev/null && echo NET-GW-PING-OK
    echo "NET-FILES $(ls /written-by-* | tr '\n' ' ')NET-END"
    while true; do
        ping -c 1 -W 2 "$addr" >/dev/null && echo NET-PEER-ALIVE
        sleep 1
    done
elif [ "$1" = spoof ]; then
    ping -c 2 -W 3 "$gw" >/dev/null && echo NET-SPOOF-GOOD-OK
    mine=$(ip addr show eth0 | awk '/inet /{print $2}')
    mac=$(cat /sys/class/net/eth0/address)
    readdress() { ip addr flush dev eth0; ip addr add "$1" dev eth0; ip route replace default via "$gw"; }
    readdress 10.70.0.250/24
    if ping -c 2 -W 2 "$gw" >/dev/null; then echo NET-SPOOF-IP-LEAK; else echo NET-SPOOF-IP-BLOCKED; fi
    readdress "$mine"
    remac() { ip link set eth0 down; ip link set eth0 address "$1"; ip link set eth0 up; ip neigh flush dev eth0; readdress "$mine"; }
    remac 52:54:00:66:66:66
    if ping -c 2 -W 2 "$gw" >/dev/null; then echo NET-SPOOF-MAC-LEAK; else echo NET-SPOOF-MAC-BLOCKED; fi
    remac "$mac"
    ping -c 2 -W 3 "$gw" >/dev/null && echo NET-SPOOF-BACK-OK
    printf 'start 10.70.0.200\nend 10.70.0.210\ninterface eth0\nopt router 10.70.0.66\nopt dns 10.70.0.66\nlease_file /tmp/rogue.leases\n' > /tmp/rogue.conf
    touch /tmp/rogue.leases
    udhcpd -f /tmp/rogue.conf &
    sleep 1
    echo NET-ROGUE-DHCP-RUNNING
    while true; do sleep 10; done
else
    ping -c 2 -W 3 "$gw" >/dev/null && echo NET-ISO-GW-OK
    if ping -c 3 -W 2 "$2" >/dev/null; then echo NET-ISO-LEAK; else echo NET-ISO-BLOCKED; fi
    while true; do sleep 10; done
fi
exit 0
"#;

fn vm_details(d: &Daemon, name: &str) -> Result<VmDetails, String> {
    let out = d.ok(&["vm", "info", name, "--json"])?;
    serde_json::from_str(&out).map_err(|e| format!("vm info: {e}: {out}"))
}

fn leases(d: &Daemon, network: &str) -> Result<Vec<Lease>, String> {
    let out = d.ok(&["net", "leases", network, "--json"])?;
    serde_json::from_str(&out).map_err(|e| format!("net leases: {e}: {out}"))
}

fn define_network(d: &Daemon, text: &str, name: &str) -> Result<(), String> {
    let path = d.state_dir().join(format!("net-{name}.toml"));
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    d.ok(&["net", "define", &path.display().to_string()])?;
    Ok(())
}

/// How many of the daemon's bridges, dnsmasq processes and nft tables (ip and netdev) of
/// `network` exist.
fn host_objects(network: &str, bridge: &str) -> (usize, usize, usize) {
    let bridges = usize::from(Path::new("/sys/class/net").join(bridge).exists());
    let needle = format!("networks/{network}.run/dnsmasq.conf");
    let dnsmasqs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(&needle))
        .count();
    let tables = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| {
                    let l = l.trim();
                    l == format!("table ip ferro-{network}")
                        || l == format!("table netdev ferro-{network}")
                })
                .count()
        })
        .unwrap_or(0);
    (bridges, dnsmasqs, tables)
}

/// [`host_objects`] of the test's nat and isolated networks.
fn both_networks_on_host() -> [(usize, usize, usize); 2] {
    [
        host_objects("lab", NAT_BRIDGE),
        host_objects("iso", ISOLATED_BRIDGE),
    ]
}

/// Standard base64 of `data`.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The guest script as a command line can carry it (no quotes, under the 2 KiB limit).
fn packed_script() -> Result<String, String> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(GUEST_SCRIPT.as_bytes())
        .map_err(|e| e.to_string())?;
    Ok(base64(&gz.finish().map_err(|e| e.to_string())?))
}

/// Defines VM `name` booting from its clone `p/NAME.qcow2`, with one NIC on `network`.
fn define_vm(d: &Daemon, name: &str, network: &str, role: &str, arg: &str) -> Result<(), String> {
    let images = images().map_err(|e| format!("{e:?}"))?;
    let command = format!(
        "hostname {name}; echo {} | base64 -d | gunzip > /tmp/net.sh; sh /tmp/net.sh {role} {arg}",
        packed_script()?
    );
    let path = d.state_dir().join(format!("vm-{name}.toml"));
    let text = format!(
        "name = \"{name}\"\nmemory = \"256M\"\nkernel = \"{}\"\ninitrd = \"{}\"\n\
         cmdline = 'console=ttyS0 quiet ferro.root=/dev/vda ferro.run=\"{command}\"'\n\
         [[disks]]\nvolume = \"p/{name}.qcow2\"\n[[nets]]\nnetwork = \"{network}\"\n",
        images.kernel.display(),
        images.initrd.display()
    );
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    d.ok(&["vm", "define", &path.display().to_string()])?;
    Ok(())
}

fn wait_running(d: &Daemon, name: &str) -> Result<(), String> {
    let details = vm_details(d, name)?;
    match details.state {
        DomainState::Running => Ok(()),
        other => Err(format!("{name} is {other}: {:?}", details.reason)),
    }
}

pub fn nat_and_isolated_networks() -> TestResult {
    let mut d = Daemon::start("net")?;
    define_network(
        &d,
        &format!("name = \"lab\"\nmode = \"nat\"\nbridge = \"{NAT_BRIDGE}\"\nsubnet = \"10.70.0.0/24\"\ndomain = \"lab.test\"\n"),
        "lab",
    )?;
    define_network(
        &d,
        &format!("name = \"iso\"\nmode = \"isolated\"\nbridge = \"{ISOLATED_BRIDGE}\"\nsubnet = \"10.71.0.0/24\"\n"),
        "iso",
    )?;
    // Bad input: a subnet overlapping another network's, a bridge the host has.
    let overlap = d.state_dir().join("net-bad.toml");
    std::fs::write(
        &overlap,
        "name = \"bad\"\nmode = \"nat\"\nbridge = \"ferrobad0\"\nsubnet = \"10.70.0.128/25\"\n",
    )
    .map_err(|e| e.to_string())?;
    let out = d.cli(&["net", "define", &overlap.display().to_string()])?;
    check(out.code != 0 && out.stderr.contains("overlaps"), || {
        format!("overlapping subnet accepted: {out:?}")
    })?;
    d.ok(&["net", "start", "lab"])?;
    d.ok(&["net", "start", "iso"])?;
    std::fs::write(
        &overlap,
        format!("name = \"bad\"\nmode = \"nat\"\nbridge = \"{NAT_BRIDGE}\"\nsubnet = \"10.72.0.0/24\"\n"),
    )
    .map_err(|e| e.to_string())?;
    let out = d.cli(&["net", "define", &overlap.display().to_string()])?;
    check(out.code != 0, || {
        format!("a second user of {NAT_BRIDGE} accepted: {out:?}")
    })?;

    let dir = d.start_pool("p")?;
    let rootfs = images()?.rootfs;
    let size = std::fs::metadata(&rootfs).map_err(|e| e.to_string())?.len();
    d.ok(&[
        "vol",
        "create",
        "base.raw",
        "--pool",
        "p",
        "--size",
        &format!("{}K", size.div_ceil(1024)),
        "--format",
        "raw",
    ])?;
    d.ok(&[
        "vol",
        "upload",
        "base.raw",
        &rootfs.display().to_string(),
        "--pool",
        "p",
        "--format",
        "raw",
    ])?;
    let base_before = std::fs::read(dir.join("base.raw")).map_err(|e| e.to_string())?;
    for vm in ["va", "vb", "vc"] {
        d.ok(&[
            "vol",
            "clone",
            "base.raw",
            &format!("{vm}.qcow2"),
            "--pool",
            "p",
            "--linked",
        ])?;
    }
    // The hostile guest first: its DHCP server runs before the others ask for leases.
    d.ok(&[
        "vol", "clone", "base.raw", "vd.qcow2", "--pool", "p", "--linked",
    ])?;
    define_vm(&d, "vd", "lab", "spoof", "-")?;
    d.ok(&["vm", "start", "vd"])?;
    d.wait_for_console("vd", "NET-SPOOF-GOOD-OK", 1, NETWORK_TIMEOUT)
        .map_err(|e| format!("{e}\n{}", lab_state(&d)))?;
    d.wait_for_console("vd", "NET-ROGUE-DHCP-RUNNING", 1, Duration::from_secs(90))?;
    let spoofer = std::fs::read_to_string(d.console_log_path("vd")).unwrap_or_default();
    for blocked in [
        "NET-SPOOF-IP-BLOCKED",
        "NET-SPOOF-MAC-BLOCKED",
        "NET-SPOOF-BACK-OK",
    ] {
        check(spoofer.contains(blocked), || {
            format!("the spoofing guest did not print {blocked}:\n{spoofer}")
        })?;
    }

    define_vm(&d, "va", "lab", "peer", "vb")?;
    define_vm(&d, "vb", "lab", "peer", "va")?;
    d.ok(&["vm", "start", "va"])?;
    d.ok(&["vm", "start", "vb"])?;
    for (vm, peer) in [("va", "vb"), ("vb", "va")] {
        d.wait_for_console(vm, "NET-PEER-PING-OK", 1, NETWORK_TIMEOUT)
            .map_err(|e| format!("{e}\n(peer {peer})\n{}", lab_state(&d)))?;
        d.wait_for_console(vm, "NET-GW-PING-OK", 1, Duration::from_secs(30))?;
        // Both wrote before their DHCP; each sees only its own file.
        d.wait_for_console(vm, "NET-END", 1, Duration::from_secs(30))?;
        let log = std::fs::read_to_string(d.console_log_path(vm)).unwrap_or_default();
        let files = log
            .lines()
            .find_map(|l| l.strip_prefix("NET-FILES ")?.split("NET-END").next())
            .unwrap_or_default()
            .trim()
            .to_string();
        check(files == format!("/written-by-{vm}"), || {
            format!("{vm} sees {files:?} on its root file system")
        })?;
    }
    check_filter_counted(&d, "vd")?;
    let lab_leases = leases(&d, "lab")?;
    let mut va_ip = None;
    for vm in ["va", "vb"] {
        let mac = vm_details(&d, vm)?.definition.config.nets[0].mac;
        let lease = lab_leases.iter().find(|l| Some(l.mac) == mac);
        check(lease.is_some(), || {
            format!("no lease for {vm} ({mac:?}) in {lab_leases:?}")
        })?;
        if vm == "va" {
            va_ip = lease.map(|l| l.ip.to_string());
        }
    }
    let table = d.ok(&["net", "leases", "lab"])?;
    check(table.contains("va") && table.contains("10.70.0."), || {
        format!("net leases table: {table}")
    })?;

    // Isolated: its own bridge answers, va (behind the host) does not.
    let va_ip = va_ip.ok_or("no address for va")?;
    define_vm(&d, "vc", "iso", "iso", &va_ip)?;
    d.ok(&["vm", "start", "vc"])?;
    d.wait_for_console("vc", "NET-ISO-GW-OK", 1, NETWORK_TIMEOUT)?;
    d.wait_for_console("vc", "NET-ISO-BLOCKED", 1, Duration::from_secs(60))?;

    // A daemon restart finds everything again: nothing twice, the VMs still talk.
    let before = both_networks_on_host();
    check(before == [(1, 1, 2), (1, 1, 2)], || {
        format!("bridges, dnsmasqs, tables before the restart: {before:?}")
    })?;
    let alive_before = std::fs::read_to_string(d.console_log_path("va"))
        .unwrap_or_default()
        .matches("NET-PEER-ALIVE")
        .count();
    d.restart()?;
    let after = both_networks_on_host();
    check(after == before, || {
        format!("after the restart: {after:?}, before: {before:?}")
    })?;
    for vm in ["va", "vb", "vc", "vd"] {
        wait_running(&d, vm)?;
    }
    d.wait_for_console(
        "va",
        "NET-PEER-ALIVE",
        alive_before + 3,
        Duration::from_secs(60),
    )?;

    let out = d.cli(&["net", "stop", "lab"])?;
    check(out.code != 0 && out.stderr.contains("running VMs"), || {
        format!("stopping a network in use: {out:?}")
    })?;
    let mut taps = Vec::new();
    for vm in ["va", "vb", "vd"] {
        let id = vm_details(&d, vm)?
            .definition
            .id
            .ok_or("a VM without an id")?;
        taps.push(api::daemon_api::network_tap_name(id, 0));
    }
    for tap in &taps {
        let master = std::fs::read_link(format!("/sys/class/net/{tap}/master"))
            .map_err(|e| format!("{tap}: {e}"))?;
        check(master.ends_with(NAT_BRIDGE), || {
            format!("{tap} is on {master:?}")
        })?;
    }
    for vm in ["va", "vb", "vc", "vd"] {
        d.ok(&["vm", "destroy", vm])?;
    }
    for tap in &taps {
        check(!Path::new("/sys/class/net").join(tap).exists(), || {
            format!("{tap} is left after its VM stopped")
        })?;
    }
    d.ok(&["net", "stop", "lab"])?;
    d.ok(&["net", "stop", "iso"])?;
    let gone = both_networks_on_host();
    check(gone == [(0, 0, 0), (0, 0, 0)], || {
        format!("left after stopping the networks: {gone:?}")
    })?;
    let base = std::fs::read(dir.join("base.raw")).map_err(|e| e.to_string())?;
    check(base == base_before, || {
        "a VM's write reached the base volume".into()
    })?;
    Ok(())
}

/// The bridge's filter of `vm`'s NIC on the nat network counted drops of another source MAC,
/// of DHCP server traffic and of other addresses (the spoofing guest's attempts).
fn check_filter_counted(d: &Daemon, vm: &str) -> TestResult {
    let id = vm_details(d, vm)?
        .definition
        .id
        .ok_or("a VM without an id")?;
    let tap = api::daemon_api::network_tap_name(id, 0);
    let out = std::process::Command::new("nft")
        .args(["list", "table", "netdev", "ferro-lab"])
        .output()
        .map_err(|e| format!("nft: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // Each TAP has its own ingress chain, `port_fvNn0`, hooked on the device.
    let chain = format!("port_{tap}");
    if !text.contains(&format!("device \"{tap}\"")) {
        return Err(format!("no chain on device {tap} in:\n{text}").into());
    }
    // The chain's rules: its lines up to the one closing it (sets in rules have braces too).
    let rules: String = text
        .split(&format!("chain {chain} {{"))
        .nth(1)
        .ok_or_else(|| format!("no chain {chain} in:\n{text}"))?
        .lines()
        .take_while(|l| l.trim() != "}")
        .map(|l| format!("{l}\n"))
        .collect();
    let counted = |needle: &str| {
        rules
            .lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split("counter packets ").nth(1))
            .and_then(|n| n.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    for (what, needle) in [
        ("another MAC", "ether saddr !="),
        ("DHCP server traffic", "udp sport 67"),
    ] {
        check(counted(needle) > 0, || {
            format!("{vm}'s filter dropped no {what}:\n{rules}")
        })?;
    }
    // Another address: its ARP (another sender address) or its packets (the last rule).
    let last = rules
        .lines()
        .rev()
        .find(|l| l.contains("counter packets"))
        .and_then(|l| l.split("counter packets ").nth(1))
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    check(counted("ether type arp") + last > 0, || {
        format!("{vm}'s filter dropped nothing from another address:\n{rules}")
    })
}

/// What the nat network looks like on the host, for a failure's message: dnsmasq's log and
/// hosts, the nft rules with their counters, the bridge's ports.
fn lab_state(d: &Daemon) -> String {
    let run = d.state_dir().join("networks/lab.run");
    let read = |name: &str| std::fs::read_to_string(run.join(name)).unwrap_or_default();
    let command = |program: &str, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_else(|e| format!("{program}: {e}"))
    };
    format!(
        "dnsmasq said:\n{}\ndhcp-hosts:\n{}\nports.json:\n{}\nnft:\n{}\nlinks:\n{}",
        read("dnsmasq.log"),
        read("dhcp-hosts"),
        read("ports.json"),
        command("nft", &["list", "ruleset"]),
        std::fs::read_dir(format!("/sys/class/net/{NAT_BRIDGE}/brif"))
            .map(|ports| ports
                .flatten()
                .map(|p| p.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_else(|e| e.to_string()),
    )
}
