//! Network interface configuration.

use serde::{Deserialize, Serialize};

use crate::options::{OptionError, Options};

/// FNV-1a (64-bit) of `text`: the same on every host and run, for short names and addresses
/// derived from user-given names (TAP devices, nftables tables, bridge MACs).
pub fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// A random, locally administered, unicast address.
    pub fn random() -> Self {
        let mut bytes = [0u8; 6];
        if getrandom::fill(&mut bytes).is_err() {
            bytes = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        }
        bytes[0] = (bytes[0] & 0xfc) | 0x02;
        MacAddress(bytes)
    }
}

impl std::str::FromStr for MacAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let invalid =
            || format!("invalid MAC address {s:?} (expected six hex bytes like 52:54:00:12:34:56)");
        if parts.len() != 6 {
            return Err(invalid());
        }
        let mut bytes = [0u8; 6];
        for (byte, part) in bytes.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if bytes[0] & 1 != 0 {
            return Err(format!("{s} is a multicast address"));
        }
        Ok(MacAddress(bytes))
    }
}

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A virtio-net interface on a TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP device name (created if it does not exist).
    pub tap: String,
    /// Guest MAC address; random (locally administered) when absent.
    #[serde(default)]
    pub mac: Option<MacAddress>,
    /// Receive/transmit queue pairs (1 to [`MAX_NET_QUEUE_PAIRS`]); when absent, one per vCPU
    /// if the TAP device is multi-queue or new, else one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_pairs: Option<u16>,
}

/// Most queue pairs of a NIC (virtio-net offers no more).
pub const MAX_NET_QUEUE_PAIRS: u16 = 64;

/// Checks a NIC's queue pair count.
pub fn check_queue_pairs(pairs: u16) -> Result<(), String> {
    if (1..=MAX_NET_QUEUE_PAIRS).contains(&pairs) {
        Ok(())
    } else {
        Err(format!(
            "{pairs} is not between 1 and {MAX_NET_QUEUE_PAIRS} queue pairs"
        ))
    }
}

/// Checks a Linux interface name (1 to 15 bytes, no '/', ':' or whitespace): the one check
/// the VMM, the daemon and the CLI share.
pub use host_sys::ifname::valid as valid_interface_name;

impl NetConfig {
    pub fn validate(&self) -> Result<(), OptionError> {
        if !valid_interface_name(&self.tap) {
            return Err(OptionError::Invalid {
                key: "tap".into(),
                message: format!("{:?} is not a valid interface name (1 to 15 characters, no '/', ':' or spaces)", self.tap),
            });
        }
        if let Some(pairs) = self.queue_pairs {
            check_queue_pairs(pairs).map_err(|message| OptionError::Invalid {
                key: "queue_pairs".into(),
                message,
            })?;
        }
        Ok(())
    }
}

impl NetConfig {
    /// The `--net` option string that parses back into this interface.
    pub fn to_option_string(&self) -> String {
        let mut text = format!("tap={}", self.tap);
        if let Some(mac) = &self.mac {
            text += &format!(",mac={mac}");
        }
        if let Some(pairs) = self.queue_pairs {
            text += &format!(",queue_pairs={pairs}");
        }
        text
    }
}

impl std::str::FromStr for NetConfig {
    type Err = OptionError;

    /// `tap=NAME[,mac=MAC][,queue_pairs=N]`
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let mut o = Options::parse(s, &["tap", "mac", "queue_pairs"])?;
        let tap = o.required("tap")?;
        let mac = o
            .take("mac")
            .map(|m| m.parse::<MacAddress>())
            .transpose()
            .map_err(|message| OptionError::Invalid {
                key: "mac".into(),
                message,
            })?;
        let queue_pairs = match o.take("queue_pairs") {
            None => None,
            Some(text) => Some(text.parse().map_err(|_| OptionError::Invalid {
                key: "queue_pairs".into(),
                message: format!("{text:?} is not a number of queue pairs"),
            })?),
        };
        let net = NetConfig {
            tap,
            mac,
            queue_pairs,
        };
        net.validate()?;
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_strings_round_trip() {
        for text in [
            "tap=tap0",
            "tap=t1,mac=52:54:00:12:34:56",
            "tap=t2,queue_pairs=4",
        ] {
            let net: NetConfig = text.parse().unwrap();
            assert_eq!(net.to_option_string(), text);
        }
        let disk: crate::DiskConfig = "path=/a,,b.img,readonly=on,serial=x,,y,format=raw"
            .parse()
            .unwrap();
        assert_eq!(disk.path.to_str(), Some("/a,b.img"));
        assert_eq!(
            disk.to_option_string()
                .parse::<crate::DiskConfig>()
                .unwrap(),
            disk
        );
    }

    #[test]
    fn mac_addresses() {
        let mac: MacAddress = "52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
        assert!(
            "01:00:5e:00:00:01".parse::<MacAddress>().is_err(),
            "multicast"
        );
        assert!("52:54:00:ab:cd".parse::<MacAddress>().is_err());
        assert!("52:54:00:ab:cd:zz".parse::<MacAddress>().is_err());
        assert!("525:4:00:ab:cd:ef".parse::<MacAddress>().is_err());
        let random = MacAddress::random();
        assert_eq!(random.0[0] & 0x03, 0x02, "locally administered unicast");
    }

    #[test]
    fn net_options() {
        let n: NetConfig = "tap=tap0,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:00:00:01");
        assert!("tap=".parse::<NetConfig>().is_err());
        assert!("tap=../x".parse::<NetConfig>().is_err());
        assert!("tap=t,mac=nope".parse::<NetConfig>().is_err());
        assert!("mac=52:54:00:00:00:01".parse::<NetConfig>().is_err());
        assert_eq!(n.queue_pairs, None);
        let mq: NetConfig = "tap=t,queue_pairs=2".parse().unwrap();
        assert_eq!(mq.queue_pairs, Some(2));
        for bad in [
            "tap=t,queue_pairs=0",
            "tap=t,queue_pairs=65",
            "tap=t,queue_pairs=x",
        ] {
            let err = bad.parse::<NetConfig>().unwrap_err().to_string();
            assert!(err.contains("queue_pairs"), "{bad}: {err}");
        }
    }
}
