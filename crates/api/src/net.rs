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

/// What a NIC is plugged into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicAttachment {
    /// A TAP device of the host (created by the VMM if it does not exist).
    Tap(String),
    /// One of the daemon's virtual networks: the daemon makes the NIC's TAP device
    /// ([`crate::tap_names::network_tap_name`]) when the VM starts.
    Network(String),
}

/// A virtio-net interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NetRepr", into = "NetRepr")]
pub struct NetConfig {
    pub attachment: NicAttachment,
    /// Guest MAC address; random (locally administered) when absent (the daemon picks one
    /// when the VM is defined).
    pub mac: Option<MacAddress>,
    /// Receive/transmit queue pairs (1 to [`MAX_NET_QUEUE_PAIRS`]); when absent, one per vCPU
    /// if the TAP device is multi-queue or new, else one.
    pub queue_pairs: Option<u16>,
}

/// [`NetConfig`] as written: `tap` and `network` side by side, exactly one of them set.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<MacAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queue_pairs: Option<u16>,
}

impl TryFrom<NetRepr> for NetConfig {
    type Error = String;

    fn try_from(repr: NetRepr) -> Result<Self, String> {
        let attachment = match (repr.tap, repr.network) {
            (Some(tap), None) => NicAttachment::Tap(tap),
            (None, Some(network)) => NicAttachment::Network(network),
            _ => return Err("a NIC has either a tap or a network: give exactly one".into()),
        };
        Ok(NetConfig {
            attachment,
            mac: repr.mac,
            queue_pairs: repr.queue_pairs,
        })
    }
}

impl From<NetConfig> for NetRepr {
    fn from(net: NetConfig) -> Self {
        let (tap, network) = match net.attachment {
            NicAttachment::Tap(tap) => (Some(tap), None),
            NicAttachment::Network(network) => (None, Some(network)),
        };
        NetRepr {
            tap,
            network,
            mac: net.mac,
            queue_pairs: net.queue_pairs,
        }
    }
}

/// Most queue pairs of a NIC (virtio-net offers no more).
pub const MAX_NET_QUEUE_PAIRS: u16 = 64;

/// Checks a Linux interface name (1 to 15 bytes, no '/', ':' or whitespace): the one check
/// the VMM, the daemon and the CLI share.
pub use host_sys::ifname::valid as valid_interface_name;

impl NetConfig {
    /// A NIC on the TAP device `tap`, everything else unset.
    pub fn on_tap(tap: impl Into<String>) -> Self {
        NetConfig {
            attachment: NicAttachment::Tap(tap.into()),
            mac: None,
            queue_pairs: None,
        }
    }

    /// The host TAP device, if the NIC names one (not a network).
    pub fn tap(&self) -> Option<&str> {
        match &self.attachment {
            NicAttachment::Tap(tap) => Some(tap),
            NicAttachment::Network(_) => None,
        }
    }

    /// The virtual network, if the NIC is on one.
    pub fn network(&self) -> Option<&str> {
        match &self.attachment {
            NicAttachment::Network(network) => Some(network),
            NicAttachment::Tap(_) => None,
        }
    }

    /// The NIC's own rules (part of [`crate::VmConfig::validate`], the one check).
    pub(crate) fn check(&self) -> Result<(), OptionError> {
        match &self.attachment {
            NicAttachment::Tap(tap) if !valid_interface_name(tap) => {
                return Err(OptionError::Invalid {
                    key: "tap".into(),
                    message: format!(
                        "{tap:?} is not a valid interface name (1 to 15 characters, no '/', \
                         ':' or spaces)"
                    ),
                })
            }
            NicAttachment::Network(network) => {
                crate::names::check_name(network).map_err(|e| OptionError::Invalid {
                    key: "network".into(),
                    message: e.replace("VM name", "network name"),
                })?
            }
            NicAttachment::Tap(_) => {}
        }
        match self.queue_pairs {
            Some(pairs) if !(1..=MAX_NET_QUEUE_PAIRS).contains(&pairs) => {
                Err(OptionError::Invalid {
                    key: "queue_pairs".into(),
                    message: format!("{pairs} is not between 1 and {MAX_NET_QUEUE_PAIRS}"),
                })
            }
            _ => Ok(()),
        }
    }

    /// The `--net` option string that parses back into this interface.
    pub fn to_option_string(&self) -> String {
        let mut text = match &self.attachment {
            NicAttachment::Tap(tap) => format!("tap={tap}"),
            NicAttachment::Network(network) => format!("network={network}"),
        };
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

    /// `tap=NAME|network=NAME[,mac=MAC][,queue_pairs=N]`; checked with the rest of the VM by
    /// [`crate::VmConfig::validate`].
    fn from_str(s: &str) -> Result<Self, OptionError> {
        let mut o = Options::parse(s, &["tap", "network", "mac", "queue_pairs"])?;
        let attachment = match (o.take("tap"), o.take("network")) {
            (Some(tap), None) => NicAttachment::Tap(tap),
            (None, Some(network)) => NicAttachment::Network(network),
            (Some(_), Some(_)) => {
                return Err(OptionError::Invalid {
                    key: "network".into(),
                    message: "a NIC has a tap or a network, not both".into(),
                })
            }
            (None, None) => return Err(OptionError::Missing("tap")),
        };
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
        Ok(NetConfig {
            attachment,
            mac,
            queue_pairs,
        })
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
            "network=lab,mac=52:54:00:12:34:56",
        ] {
            let net: NetConfig = text.parse().unwrap();
            assert_eq!(net.to_option_string(), text);
        }
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
        assert_eq!(n.tap(), Some("tap0"));
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:00:00:01");
        n.check().unwrap();
        assert!("tap=t,mac=nope".parse::<NetConfig>().is_err());
        assert!("mac=52:54:00:00:00:01".parse::<NetConfig>().is_err());
        assert!("tap=t,network=n".parse::<NetConfig>().is_err());
        assert_eq!(n.queue_pairs, None);
        let mq: NetConfig = "tap=t,queue_pairs=2".parse().unwrap();
        assert_eq!(mq.queue_pairs, Some(2));
        assert!("tap=t,queue_pairs=x".parse::<NetConfig>().is_err());
        for bad in [
            "tap=",
            "tap=../x",
            "network=a/b",
            "tap=t,queue_pairs=0",
            "tap=t,queue_pairs=65",
        ] {
            let net: NetConfig = bad.parse().unwrap();
            assert!(net.check().is_err(), "{bad}");
        }
    }

    /// The JSON and TOML shape is the flat one definitions have always had.
    #[test]
    fn serde_shape_is_flat_with_exactly_one_attachment() {
        let json = r#"{"network":"lab","mac":"52:54:00:12:34:56"}"#;
        let nic: NetConfig = serde_json::from_str(json).unwrap();
        assert_eq!(nic.network(), Some("lab"));
        assert_eq!(serde_json::to_string(&nic).unwrap(), json);
        // `mac: null` is what the VMM wrote before attachments were an enum.
        let old: NetConfig = serde_json::from_str(r#"{"tap":"t0","mac":null}"#).unwrap();
        assert_eq!(old, NetConfig::on_tap("t0"));
        for bad in [
            r#"{"mac":"52:54:00:12:34:56"}"#,
            r#"{"tap":"t","network":"n"}"#,
        ] {
            let err = serde_json::from_str::<NetConfig>(bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("either a tap or a network"), "{bad}: {err}");
        }
    }
}
