//! Networks on this host's kernel, each test in a network namespace of its own thread: bridges,
//! TAP devices, nftables and dnsmasq for real. Guests are stood in for by veth pairs whose far
//! end lives in a namespace of its own (held by a sleeping `unshare` process), where busybox's
//! udhcpc, ping, nslookup and nc act as the guest. Skipped without root, nft or dnsmasq (and
//! busybox, unshare and nsenter for the guest tests).

use std::net::UdpSocket;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::*;
use crate::failure::Kind;
use crate::networks::netlink;

fn in_network_namespace(test: impl FnOnce() + Send + 'static) {
    if Tools::find().is_err() {
        eprintln!("skipped: nft or dnsmasq is not installed");
        return;
    }
    netlink::in_new_netns(test);
}

fn definition(name: &str, mode: &str, bridge: &str, subnet: &str) -> NetworkDefinition {
    parse_network_definition(&format!(
        "name = \"{name}\"\nmode = \"{mode}\"\nbridge = \"{bridge}\"\nsubnet = \"{subnet}\"\n"
    ))
    .unwrap()
}

fn open(dir: &Path) -> Networks {
    Networks::open(dir.join("networks"), dir.join("sys")).unwrap()
}

/// Stops what the networks under a test's directory run when the test ends, passed or failed
/// (dnsmasq would outlive a failed test): a fresh `Networks` on the directory removes every
/// port and stops every active network.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let networks = open(&self.0);
        networks.forget_all_but(&[]);
        for info in networks.list() {
            if info.state == NetworkState::Active {
                let _ = networks.stop(&info.definition.name);
            }
        }
    }
}

fn nic(network: &str, mac: &str, tap: &str, name: &str) -> NetworkNic {
    NetworkNic {
        network: network.into(),
        mac: mac.parse().unwrap(),
        tap: tap.into(),
        dns_name: Some(name.into()),
    }
}

/// `nft list table FAMILY NAME`, or "" when it does not exist.
fn nft_table(family: &str, table: &str) -> String {
    let out = Command::new("nft")
        .args(["list", "table", family, table])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `command` (split at spaces) in the test thread's namespace; its exit status.
fn run(command: &str) -> std::process::ExitStatus {
    let mut words = command.split_whitespace();
    Command::new(words.next().unwrap())
        .args(words)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
}

fn guest_tools_missing() -> bool {
    let missing = [
        "busybox true",
        "unshare --version",
        "nsenter --version",
        "ip -V",
    ]
    .iter()
    .any(|c| {
        !Command::new("sh")
            .args(["-c", &format!("{c} >/dev/null 2>&1")])
            .status()
            .is_ok_and(|s| s.success())
    });
    if missing {
        eprintln!("skipped: busybox, unshare, nsenter or ip is missing");
    }
    missing
}

#[test]
fn a_nat_network_runs_stops_and_is_found_again() {
    in_network_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let _cleanup = Cleanup(dir.path().to_path_buf());
        let networks = open(dir.path());
        networks
            .define(definition("lab", "nat", "ferrotest0", "10.66.0.0/24"))
            .unwrap();
        let info = networks.start("lab").unwrap();
        assert_eq!(info.state, NetworkState::Active);
        let tools = Tools::find().unwrap();
        let table = firewall::table_name("lab");
        assert!(firewall::exists_in(&tools.nft, "ip", &table));
        assert!(firewall::exists_in(&tools.nft, "netdev", &table));
        let files = dnsmasq::DnsmasqFiles::new(networks.run_dir("lab"));
        let pid = dnsmasq::running(&files).expect("dnsmasq runs");
        assert_eq!(
            netlink::ipv4_addresses("ferrotest0").unwrap(),
            [("10.66.0.1".parse().unwrap(), 24)]
        );
        assert_eq!(networks.start("lab").unwrap_err().kind, Kind::Conflict);

        // A VM's NIC: a TAP on the bridge, its MAC, reserved address and name handed to
        // dnsmasq, and a filter chain of its own.
        let nic = nic("lab", "52:54:00:00:00:42", "fvtest0", "vm1");
        networks.attach("vm1", std::slice::from_ref(&nic)).unwrap();
        assert_eq!(
            netlink::master_of("fvtest0").unwrap(),
            netlink::link_index("ferrotest0").unwrap()
        );
        let hosts = std::fs::read_to_string(files.hosts()).unwrap();
        let (mac, rest) = hosts.split_once(',').unwrap();
        assert_eq!(mac, "52:54:00:00:00:42");
        assert!(
            rest.starts_with("10.66.0.") && rest.ends_with(",\"vm1\"\n"),
            "{hosts}"
        );
        let port_rules = nft_table("netdev", &table);
        assert!(
            port_rules
                .contains("chain port_fvtest0 {\n\t\ttype filter hook ingress device \"fvtest0\""),
            "{port_rules}"
        );
        assert!(port_rules.contains("ether saddr != 52:54:00:00:00:42 counter packets"));
        // Another NIC with the same MAC on the network is refused.
        let twin = nic_with_tap(&nic, "fvtest1");
        let err = networks.attach("vm2", &[twin]).unwrap_err();
        assert!(
            err.message.contains("already on network lab (VM vm1)"),
            "{err:?}"
        );
        assert_eq!(netlink::link_index("fvtest1").unwrap(), None);
        // A VM whose name differs only in case, or is reserved, runs without a DNS name.
        for (vm, mac) in [("VM1", "52:54:00:00:00:43"), ("wpad", "52:54:00:00:00:44")] {
            networks
                .attach(vm, &[self::nic("lab", mac, "fvtest1", vm)])
                .unwrap();
            let record = ports::load(&networks.run_dir("lab"));
            let port = record.ports.iter().find(|p| p.vm == vm).unwrap();
            assert_eq!(port.dns_name, None, "{vm}");
            let hosts = std::fs::read_to_string(files.hosts()).unwrap();
            assert!(hosts.contains(mac) && !hosts.contains(&format!("\"{vm}\"")));
            networks.detach(vm);
        }
        // The ids in recorded TAP names are not given to new VMs.
        networks
            .attach(
                "vm7",
                &[self::nic("lab", "52:54:00:00:00:47", "fv7n0", "vm7")],
            )
            .unwrap();
        assert_eq!(networks.recorded_tap_ids(), [7].into());
        networks.detach("vm7");
        assert!(networks.recorded_tap_ids().is_empty());
        let err = networks.stop("lab").unwrap_err();
        assert!(err.message.contains("has running VMs: vm1"), "{err:?}");
        let missing = NetworkNic {
            network: "nope".into(),
            ..nic.clone()
        };
        assert!(networks.attach("vm2", &[missing]).is_err());
        assert_eq!(
            networks.claim_on("fvtest0").as_deref(),
            Some("the TAP device of VM vm1 on network lab")
        );
        assert_eq!(
            networks.claim_on("ferrotest0").as_deref(),
            Some("the bridge of network lab")
        );

        // A new daemon: the same bridge, tables, ports and dnsmasq, nothing twice.
        drop(networks);
        let networks = open(dir.path());
        networks.resume();
        networks.reattach("vm1", &[]);
        assert_eq!(dnsmasq::running(&files), Some(pid));
        assert!(firewall::exists_in(&tools.nft, "ip", &table));
        assert_eq!(nft_table("netdev", &table), port_rules);
        assert_eq!(std::fs::read_to_string(files.hosts()).unwrap(), hosts);
        assert_eq!(networks.info("lab").unwrap().state, NetworkState::Active);
        assert_eq!(netlink::ipv4_addresses("ferrotest0").unwrap().len(), 1);

        networks.detach("vm1");
        assert_eq!(netlink::link_index("fvtest0").unwrap(), None);
        assert_eq!(std::fs::read_to_string(files.hosts()).unwrap(), "");
        assert!(!nft_table("netdev", &table).contains("fvtest0"));
        networks.stop("lab").unwrap();
        assert_eq!(netlink::link_index("ferrotest0").unwrap(), None);
        assert!(!firewall::exists_in(&tools.nft, "ip", &table));
        assert!(!firewall::exists_in(&tools.nft, "netdev", &table));
        assert_eq!(dnsmasq::running(&files), None);
        assert!(networks.leases("lab").unwrap().is_empty());
        networks.undefine("lab").unwrap();
    });
}

fn nic_with_tap(nic: &NetworkNic, tap: &str) -> NetworkNic {
    NetworkNic {
        tap: tap.into(),
        ..nic.clone()
    }
}

/// Starting a VM whose TAP name some other interface has leaves that interface alone (the
/// start is refused), and a VM's end removes only the TAP device the daemon made, not a link
/// that took its name since.
#[test]
fn links_the_daemon_did_not_make_are_left_alone() {
    in_network_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let _cleanup = Cleanup(dir.path().to_path_buf());
        let networks = open(dir.path());
        networks
            .define(definition("own", "isolated", "ferrotest5", "10.65.0.0/24"))
            .unwrap();
        networks.start("own").unwrap();
        assert!(run("ip link add fvtest5 type bridge").success());
        let foreign = netlink::link_index("fvtest5").unwrap().unwrap();
        let squatted = nic("own", "52:54:00:65:00:01", "fvtest5", "a");
        let err = networks.attach("a", &[squatted]).unwrap_err();
        assert_eq!(err.kind, Kind::Conflict);
        assert!(
            err.message.contains("the daemon did not make it"),
            "{err:?}"
        );
        assert_eq!(netlink::link_index("fvtest5").unwrap(), Some(foreign));
        assert_eq!(netlink::master_of("fvtest5").unwrap(), None);

        // The TAP of a running VM is replaced behind the daemon's back: its end leaves the
        // newcomer alone.
        let own = nic("own", "52:54:00:65:00:02", "fvtest6", "b");
        networks.attach("b", &[own]).unwrap();
        let made = netlink::link_index("fvtest6").unwrap().unwrap();
        netlink::delete_link("fvtest6").unwrap();
        assert!(run("ip link add fvtest6 type bridge").success());
        let newcomer = netlink::link_index("fvtest6").unwrap().unwrap();
        assert_ne!(made, newcomer);
        networks.detach("b");
        assert_eq!(netlink::link_index("fvtest6").unwrap(), Some(newcomer));
        networks.stop("own").unwrap();
        assert_eq!(netlink::link_index("fvtest5").unwrap(), Some(foreign));
    });
}

/// A VM an older daemon started (its TAP under the old hash name, no record of ports) is
/// adopted: its TAP recorded with its index, filtered and given its DHCP entry; a recorded VM
/// that no longer runs loses its TAP device.
#[test]
fn tap_devices_of_older_and_vanished_runs_are_sorted_out() {
    in_network_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let _cleanup = Cleanup(dir.path().to_path_buf());
        let networks = open(dir.path());
        networks
            .define(definition("old", "nat", "ferrotest3", "10.64.0.0/24"))
            .unwrap();
        networks.start("old").unwrap();
        let legacy = api::daemon_api::legacy_network_tap_name("web", 0);
        let index = netlink::create_tap(&legacy).unwrap();
        host_side::ensure_on_bridge(&legacy, "ferrotest3").unwrap();
        let nic = nic("old", "52:54:00:64:00:01", &legacy, "web");
        networks.reattach("web", std::slice::from_ref(&nic));
        assert_eq!(
            networks.claim_on(&legacy).as_deref(),
            Some("the TAP device of VM web on network old")
        );
        let record = ports::load(&networks.run_dir("old"));
        assert_eq!(record.ports.len(), 1);
        assert_eq!(
            (record.ports[0].tap.as_str(), record.ports[0].ifindex),
            (legacy.as_str(), index)
        );
        let table = firewall::table_name("old");
        assert!(nft_table("netdev", &table).contains(&format!("device \"{legacy}\"")));
        let files = dnsmasq::DnsmasqFiles::new(networks.run_dir("old"));
        let hosts = std::fs::read_to_string(files.hosts()).unwrap();
        assert!(
            hosts.starts_with("52:54:00:64:00:01,10.64.0.") && hosts.ends_with(",\"web\"\n"),
            "{hosts}"
        );
        // Reattached again (another restart): nothing twice.
        networks.reattach("web", std::slice::from_ref(&nic));
        assert_eq!(ports::load(&networks.run_dir("old")).ports.len(), 1);

        // A VM recorded on the network that runs no more (its daemon went before it did).
        networks
            .attach(
                "gone",
                &[nic_with_tap(
                    &self::nic("old", "52:54:00:64:00:02", "fvtest9", "gone"),
                    "fvtest9",
                )],
            )
            .unwrap();
        networks.forget_all_but(&["web".to_string()]);
        assert_eq!(netlink::link_index("fvtest9").unwrap(), None);
        assert_eq!(netlink::link_index(&legacy).unwrap(), Some(index));
        networks.detach("web");
        assert_eq!(netlink::link_index(&legacy).unwrap(), None);
        networks.stop("old").unwrap();
    });
}

/// A stand-in guest: a network namespace of its own, held by a sleeping process, with the far
/// end of a veth pair whose near end is a port of the network's bridge.
struct Guest {
    holder: Child,
    dev: String,
    script: std::path::PathBuf,
}

impl Guest {
    /// Guest `vm` with `mac` on `network` (a VM whose name is `vm`), as the `index`th guest.
    fn new(networks: &Networks, network: &str, vm: &str, mac: &str, index: u8) -> Guest {
        let guest = Guest::unrecorded(mac, index);
        networks
            .join_link(vm, &nic(network, mac, &format!("fvp{index}"), vm))
            .unwrap();
        guest
    }

    /// A guest with `mac` whose near end is on `bridge`, a bridge the daemon does not manage.
    fn on_bridge(bridge: &str, mac: &str, index: u8) -> Guest {
        let guest = Guest::unrecorded(mac, index);
        host_side::ensure_on_bridge(&format!("fvp{index}"), bridge).unwrap();
        guest
    }

    /// The guest's namespace and veth pair (near end `fvpINDEX`, on no bridge yet).
    fn unrecorded(mac: &str, index: u8) -> Guest {
        let holder = Command::new("unshare")
            .args(["-n", "sleep", "600"])
            .spawn()
            .unwrap();
        let (dev, port) = (format!("fvg{index}"), format!("fvp{index}"));
        let pid = holder.id();
        let script =
            std::env::temp_dir().join(format!("ferro-udhcpc-{}-{index}", std::process::id()));
        std::fs::write(
            &script,
            "#!/bin/sh\ncase \"$1\" in bound|renew)\n\
             ip addr flush dev \"$interface\"\nip addr add \"$ip/${mask:-24}\" dev \"$interface\"\n\
             echo \"lease $ip router $router server $serverid\";;\nesac\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // The holder's namespace exists once unshare has run: wait until it is not ours.
        let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .as_ref()
            == Some(&ours)
        {
            assert!(std::time::Instant::now() < deadline, "unshare did not run");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let link = format!("ip link add {dev} address {mac} type veth peer name {port}");
        assert!(run(&link).success());
        assert!(run(&format!("ip link set {dev} netns {pid}")).success());
        let guest = Guest {
            holder,
            dev: dev.clone(),
            script,
        };
        assert!(
            guest
                .run(&format!("ip link set lo up; ip link set {dev} up"))
                .0
        );
        guest
    }

    /// Runs `command` with sh in the guest's namespace: (success, stdout and stderr).
    fn run(&self, command: &str) -> (bool, String) {
        let out = Command::new("nsenter")
            .args([
                "-t",
                &self.holder.id().to_string(),
                "-n",
                "--",
                "sh",
                "-c",
                command,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// DHCP: the lease line the event script printed ("lease IP router R server S").
    fn dhcp(&self) -> String {
        let (_, out) = self.run(&format!(
            "busybox udhcpc -i {} -f -q -n -t 4 -T 2 -s {}",
            self.dev,
            self.script.display()
        ));
        out.lines()
            .find(|l| l.starts_with("lease "))
            .unwrap_or_default()
            .to_string()
    }

    /// Runs `f` on a thread in the guest's namespace (sockets it makes stay there).
    fn in_namespace<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let namespace = std::fs::File::open(format!("/proc/{}/ns/net", self.holder.id())).unwrap();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    host_sys::netns::enter_net(&namespace).unwrap();
                    f()
                })
                .join()
                .unwrap()
        })
    }

    fn pings(&self, address: &str) -> bool {
        self.run(&format!("busybox ping -c 1 -W 1 {address}")).0
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = std::fs::remove_file(&self.script);
    }
}

/// VM names dnsmasq would read as a keyword or a lease time if they were not quoted get their
/// lease and their DNS name, from the first DISCOVER.
#[test]
fn hostile_names_get_their_lease_and_dns_name() {
    if guest_tools_missing() {
        return;
    }
    in_network_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let _cleanup = Cleanup(dir.path().to_path_buf());
        let networks = open(dir.path());
        networks
            .define(definition("dhcp", "nat", "ferrotest2", "10.68.0.0/24"))
            .unwrap();
        networks.start("dhcp").unwrap();
        let ignore = Guest::new(&networks, "dhcp", "ignore", "52:54:00:68:00:07", 0);
        let minutes = Guest::new(&networks, "dhcp", "5m", "52:54:00:68:00:08", 1);
        // One DISCOVER, two seconds to answer it: an OFFER held back for an address check
        // (dnsmasq's ping takes 3 s) fails this.
        let one_try = |g: &Guest| {
            g.run(&format!(
                "busybox udhcpc -i {} -f -q -n -B -t 1 -T 2 -s {}",
                g.dev,
                g.script.display()
            ))
        };
        let answered = [one_try(&ignore), one_try(&minutes)];
        let resolved = ignore.run("busybox nslookup 5m.dhcp.ferro 10.68.0.1").1;
        let leases = networks.leases("dhcp").unwrap();
        // Stopped before any assertion: dnsmasq would outlive a failed test.
        drop((ignore, minutes));
        networks.detach("ignore");
        networks.detach("5m");
        networks.stop("dhcp").unwrap();
        assert!(
            answered.iter().all(|(ok, _)| *ok),
            "no lease for one DISCOVER: {answered:?}"
        );
        let named: Vec<(String, Option<String>)> = leases
            .iter()
            .map(|l| (l.mac.to_string(), l.hostname.clone()))
            .collect();
        assert!(
            named.contains(&("52:54:00:68:00:07".into(), Some("ignore".into()))),
            "{leases:?}"
        );
        assert!(
            named.contains(&("52:54:00:68:00:08".into(), Some("5m".into()))),
            "{leases:?}"
        );
        let five_m = leases
            .iter()
            .find(|l| l.hostname.as_deref() == Some("5m"))
            .unwrap();
        assert!(resolved.contains(&five_m.ip.to_string()), "{resolved}");
        // A 5-minute lease would expire well within the hour dnsmasq gives.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(five_m.expires > now + 1800, "{five_m:?}");
    });
}

/// The bridge's filter: a guest that takes another address or MAC, or plays DHCP server, gets
/// nothing through, while a well-behaved guest gets its lease, DNS and pings; guests reach the
/// host only for DHCP, DNS and ping.
#[test]
fn a_guest_may_send_only_its_own_mac_and_address() {
    if guest_tools_missing() {
        return;
    }
    in_network_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let _cleanup = Cleanup(dir.path().to_path_buf());
        let networks = open(dir.path());
        networks
            .define(definition("guard", "nat", "ferrotest4", "10.69.0.0/24"))
            .unwrap();
        networks.start("guard").unwrap();
        let good = Guest::new(&networks, "guard", "good", "52:54:00:69:00:01", 2);
        let evil = Guest::new(&networks, "guard", "evil", "52:54:00:69:00:02", 3);
        let host_service = std::net::TcpListener::bind("10.69.0.1:5555").unwrap();
        host_service.set_nonblocking(true).unwrap();
        let mut failed = check_spoofing(&good, &evil);
        if host_service.accept().is_ok() {
            failed += "a guest reached a host service other than DHCP, DNS and ping\n";
        }
        drop((good, evil));
        networks.detach("good");
        networks.detach("evil");
        networks.stop("guard").unwrap();
        assert_eq!(failed, "", "{failed}");
    });
}

/// Each network's filter judges only its own ports: guests on two networks get their leases
/// side by side, and a bridge the daemon does not manage carries its traffic as before.
#[test]
fn networks_filter_only_their_own_ports() {
    if guest_tools_missing() {
        return;
    }
    in_network_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let _cleanup = Cleanup(dir.path().to_path_buf());
        let networks = open(dir.path());
        for (name, bridge, subnet) in [
            ("one", "ferrotest11", "10.62.0.0/24"),
            ("two", "ferrotest12", "10.63.0.0/24"),
        ] {
            networks
                .define(definition(name, "nat", bridge, subnet))
                .unwrap();
            networks.start(name).unwrap();
        }
        netlink::create_bridge("plainbr0", [2, 0, 0, 0, 0, 0x42]).unwrap();
        netlink::set_up("plainbr0").unwrap();
        let first = Guest::new(&networks, "one", "first", "52:54:00:62:00:01", 4);
        let second = Guest::new(&networks, "two", "second", "52:54:00:63:00:01", 5);
        let left = Guest::on_bridge("plainbr0", "52:54:00:77:00:01", 6);
        let right = Guest::on_bridge("plainbr0", "52:54:00:77:00:02", 7);
        let leases = [first.dhcp(), second.dhcp()];
        left.run(&format!("ip addr add 192.168.77.1/24 dev {}", left.dev));
        right.run(&format!("ip addr add 192.168.77.2/24 dev {}", right.dev));
        let plain = left.pings("192.168.77.2");
        drop((first, second, left, right));
        networks.detach("first");
        networks.detach("second");
        networks.stop("one").unwrap();
        networks.stop("two").unwrap();
        assert!(leases[0].contains("router 10.62.0.1"), "{leases:?}");
        assert!(leases[1].contains("router 10.63.0.1"), "{leases:?}");
        assert!(
            plain,
            "the daemon's filter stopped traffic on a bridge it does not manage"
        );
    });
}

/// The checks of [`a_guest_may_send_only_its_own_mac_and_address`]: "" when all passed, else
/// what failed (collected, so the network is stopped before the test fails).
fn check_spoofing(good: &Guest, evil: &Guest) -> String {
    let mut failed = String::new();
    let mut expect = |ok: bool, what: &str| {
        if !ok {
            failed += what;
            failed += "\n";
        }
    };
    let good_lease = good.dhcp();
    let evil_lease = evil.dhcp();
    expect(
        good_lease.contains("router 10.69.0.1"),
        &format!("good's lease: {good_lease:?}"),
    );
    expect(
        evil_lease.contains("router 10.69.0.1"),
        &format!("evil's lease: {evil_lease:?}"),
    );
    let address = |lease: &str| {
        lease
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };
    let (good_ip, evil_ip) = (address(&good_lease), address(&evil_lease));
    expect(good.pings("10.69.0.1"), "good cannot ping the bridge");
    expect(
        evil.pings("10.69.0.1"),
        "evil cannot ping the bridge while well behaved",
    );
    expect(evil.pings(&good_ip), "the guests cannot ping each other");
    let (_, resolved) = good.run("busybox nslookup evil.guard.ferro 10.69.0.1");
    expect(
        resolved.contains(&evil_ip),
        &format!("DNS for evil: {resolved}"),
    );
    // The host's other services are out of reach.
    let _ = good.run("echo hi | busybox timeout 3 busybox nc -w 2 10.69.0.1 5555");

    // Another address: nothing gets through.
    let spoofed = "10.69.0.250";
    evil.run(&format!(
        "ip addr flush dev {0}; ip addr add {spoofed}/24 dev {0}",
        evil.dev
    ));
    expect(
        !evil.pings("10.69.0.1"),
        "a spoofed address reached the bridge",
    );
    expect(
        !evil.pings(&good_ip),
        "a spoofed address reached the other guest",
    );
    evil.run(&format!(
        "ip addr flush dev {0}; ip addr add {good_ip}/24 dev {0}",
        evil.dev
    ));
    expect(
        !evil.pings("10.69.0.1"),
        "good's address, taken by evil, reached the bridge",
    );
    evil.run(&format!(
        "ip addr flush dev {0}; ip addr add {evil_ip}/24 dev {0}",
        evil.dev
    ));
    expect(
        evil.pings("10.69.0.1"),
        "evil's own address no longer works",
    );

    // Another MAC: nothing gets through (its neighbours forgotten, so it must ARP).
    evil.run(&format!(
        "ip link set {0} down; ip link set {0} address 52:54:00:69:00:66; ip link set {0} up; \
         ip addr add {evil_ip}/24 dev {0} 2>/dev/null",
        evil.dev
    ));
    expect(!evil.pings("10.69.0.1"), "a spoofed MAC reached the bridge");
    expect(
        !evil.pings(&good_ip),
        "a spoofed MAC reached the other guest",
    );
    evil.run(&format!(
        "ip link set {0} down; ip link set {0} address 52:54:00:69:00:02; ip link set {0} up; \
         ip addr add {evil_ip}/24 dev {0} 2>/dev/null",
        evil.dev
    ));

    // The host's services through the TAP itself: a bridge hands a frame to a link-local
    // group address (here LLDP's) to the port device, not through the bridge, and the host
    // takes an IPv4 packet in it (TCP would not: the frame is not PACKET_HOST; UDP does).
    let host_udp = UdpSocket::bind("10.69.0.1:5556").unwrap();
    host_udp
        .set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .unwrap();
    evil.run(&format!(
        "ip neigh replace 10.69.0.1 lladdr 01:80:c2:00:00:0e dev {} nud permanent",
        evil.dev
    ));
    let sender = evil.in_namespace(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    for _ in 0..3 {
        let _ = sender.send_to(b"link-local", "10.69.0.1:5556");
    }
    let mut buffer = [0u8; 16];
    let received = host_udp.recv_from(&mut buffer);
    expect(
        received.is_err(),
        &format!("a guest reached a host UDP service through a link-local frame: {received:?}"),
    );
    evil.run(&format!("ip neigh del 10.69.0.1 dev {}", evil.dev));

    // A DHCP server: what it sends from port 67 never reaches the other guest.
    let client = good.in_namespace(|| UdpSocket::bind("0.0.0.0:68")).unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let server = evil.in_namespace(|| UdpSocket::bind("0.0.0.0:67")).unwrap();
    server.set_broadcast(true).unwrap();
    for _ in 0..5 {
        let _ = server.send_to(b"OFFER", (good_ip.as_str(), 68));
        let _ = server.send_to(b"OFFER", ("10.69.0.255", 68));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let received = client.recv_from(&mut buffer);
    expect(
        received.is_err(),
        &format!("a DHCP server reply from a guest reached another guest: {received:?}"),
    );
    // Nor from any other port: a client takes a BOOTREPLY to port 68 whatever its source.
    let rogue = evil
        .in_namespace(|| UdpSocket::bind("0.0.0.0:6767"))
        .unwrap();
    rogue.set_broadcast(true).unwrap();
    for _ in 0..5 {
        let _ = rogue.send_to(b"OFFER", (good_ip.as_str(), 68));
        let _ = rogue.send_to(b"OFFER", ("10.69.0.255", 68));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let received = client.recv_from(&mut buffer);
    expect(
        received.is_err(),
        &format!("a DHCP reply from a guest's port 6767 reached another guest: {received:?}"),
    );
    drop(client);
    // And the well-behaved guest still renews its lease.
    let again = good.dhcp();
    expect(
        address(&again) == good_ip,
        &format!("good's second lease: {again:?}"),
    );
    failed
}

#[test]
fn a_subnet_the_host_uses_is_refused_and_nothing_is_left_behind() {
    in_network_namespace(|| {
        let dir = tempfile::tempdir().unwrap();
        let _cleanup = Cleanup(dir.path().to_path_buf());
        let networks = open(dir.path());
        netlink::create_bridge("hostbr", [2, 0, 0, 0, 0, 9]).unwrap();
        netlink::add_ipv4_address("hostbr", "10.67.1.1".parse().unwrap(), 16).unwrap();
        networks
            .define(definition("lab", "isolated", "ferrotest1", "10.67.5.0/24"))
            .unwrap();
        let err = networks.start("lab").unwrap_err();
        assert_eq!(err.kind, Kind::Conflict);
        assert!(err.message.contains("hostbr has 10.67.1.1/16"), "{err:?}");
        assert_eq!(netlink::link_index("ferrotest1").unwrap(), None);
        assert_eq!(networks.info("lab").unwrap().state, NetworkState::Inactive);
        assert!(!networks.run_dir("lab").exists());
    });
}
