//! The testbed host's side of a network benchmark: the TAP device's drop counters, the
//! kernel's input backlog drops (`/proc/net/softnet_stat`) and the host's TCP retransmissions,
//! so a throughput collapse can be placed on the host, the device or the guest.

/// Counter names, in the order [`read`] returns them.
pub const NAMES: [&str; 5] = [
    "tap rx_dropped",
    "tap tx_dropped",
    "backlog drops",
    "host RetransSegs",
    "host TCPTimeouts",
];

fn sysfs(tap: &str, counter: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{counter}"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The second column of softnet_stat (packets dropped because a CPU's backlog was full),
/// summed over CPUs.
fn backlog_drops() -> u64 {
    let text = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|hex| u64::from_str_radix(hex, 16).ok())
        .sum()
}

/// A counter named `name` in the snmp-style file `path` (pairs of name and value lines).
fn snmp(path: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks_exact(2)
        .find_map(|pair| {
            let names = pair[0].split_whitespace();
            let values = pair[1].split_whitespace();
            names.zip(values).find(|(n, _)| *n == name).map(|(_, v)| v)
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The counters of NAMES now, for the TAP device `tap`.
pub fn read(tap: &str) -> [u64; NAMES.len()] {
    [
        sysfs(tap, "rx_dropped"),
        sysfs(tap, "tx_dropped"),
        backlog_drops(),
        snmp("/proc/net/snmp", "RetransSegs"),
        snmp("/proc/net/netstat", "TCPTimeouts"),
    ]
}

/// "name delta" for each counter that moved between two readings.
pub fn moved(before: &[u64; NAMES.len()], after: &[u64; NAMES.len()]) -> String {
    let moved: Vec<String> = NAMES
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a > b)
        .map(|(name, (b, a))| format!("{name} {}", a - b))
        .collect();
    if moved.is_empty() {
        "none".into()
    } else {
        moved.join(", ")
    }
}
