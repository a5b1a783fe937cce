//! The host's network interfaces as the daemon's virtual networks need them, through rtnetlink:
//! bridges and persistent TAP devices (create, delete, up/down, bridge membership) and IPv4
//! addresses (add one; list them, to check a new subnet against the host's).
//!
//! The daemon removes only links it made: creation is exclusive (an interface of that name,
//! whoever made it, is an error) and returns the new link's index, which the caller records;
//! removal goes by that index, and only while the link still has the recorded name
//! ([`delete_link_at`]), so a link someone else made under a name the daemon once used is
//! never taken for its own.
//!
//! Blocking: every call opens its own NETLINK_ROUTE socket, sends its requests and waits for the
//! kernel's answers. The daemon calls these from its blocking tasks, never on the runtime's
//! thread. Everything acts in the calling thread's network namespace.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Why an operation on the host's interfaces failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NetlinkError {
    #[error("invalid interface name {0:?} (1 to 15 bytes, no '/', ':' or whitespace)")]
    InvalidName(String),
    /// `op` names the operation: "create bridge", "bring up", "delete"...
    #[error("cannot {op} {ifname}")]
    Link {
        op: &'static str,
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot add {ifname} to bridge {bridge}")]
    SetMaster {
        ifname: String,
        bridge: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot add address {address}/{prefix_len} to {ifname}")]
    AddAddress {
        ifname: String,
        address: Ipv4Addr,
        prefix_len: u8,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the host's IPv4 addresses")]
    ListAddresses(#[source] io::Error),
    #[error("an interface named {0} already exists")]
    Exists(String),
}

impl NetlinkError {
    #[cfg(test)]
    /// The errno behind the failure, if the kernel (or a system call) gave one.
    pub(crate) fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetlinkError::InvalidName(_) | NetlinkError::Exists(_) => None,
            NetlinkError::Link { source, .. }
            | NetlinkError::SetMaster { source, .. }
            | NetlinkError::AddAddress { source, .. }
            | NetlinkError::ListAddresses(source) => source.raw_os_error(),
        }
    }
}

type Result<T> = std::result::Result<T, NetlinkError>;

/// The index of interface `name`, or `None` if there is no such interface.
pub(crate) fn link_index(name: &str) -> Result<Option<u32>> {
    check_name(name)?;
    match with_socket(|nl| nl.index(name)) {
        Ok(index) => Ok(Some(index)),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(link_error("look up", name, source)),
    }
}

/// The index of the bridge (master) interface `name` is attached to, if any.
pub(crate) fn master_of(name: &str) -> Result<Option<u32>> {
    check_name(name)?;
    let link = with_socket(|nl| nl.get_link(name))
        .map_err(|source| link_error("look up the bridge of", name, source))?;
    Ok(link
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::Controller(index) => Some(*index),
            _ => None,
        }))
}

/// Creates bridge `name` (down, no address) with MAC address `mac`, fixed so that it does not
/// follow the lowest MAC of its ports as they come and go; fails if an interface of that name
/// exists.
pub(crate) fn create_bridge(name: &str, mac: [u8; 6]) -> Result<()> {
    check_name(name)?;
    let mut link = named_link(name);
    link.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Bridge,
        )]));
    link.attributes.push(LinkAttribute::Address(mac.to_vec()));
    let message = RouteNetlinkMessage::NewLink(link);
    with_socket(|nl| nl.request(message, NLM_F_CREATE | NLM_F_EXCL).map(drop))
        .map_err(|source| link_error("create bridge", name, source))
}

/// Brings interface `name` up.
pub(crate) fn set_up(name: &str) -> Result<()> {
    check_name(name)?;
    with_socket(|nl| nl.set_flag_up(name, true))
        .map_err(|source| link_error("bring up", name, source))
}

#[cfg(test)]
/// Brings interface `name` down.
pub(crate) fn set_down(name: &str) -> Result<()> {
    check_name(name)?;
    with_socket(|nl| nl.set_flag_up(name, false))
        .map_err(|source| link_error("bring down", name, source))
}

/// Attaches interface `link` to bridge `bridge`.
pub(crate) fn set_master(link: &str, bridge: &str) -> Result<()> {
    check_name(link)?;
    check_name(bridge)?;
    with_socket(|nl| {
        let bridge_index = nl.index(bridge)?;
        let mut message = named_link(link);
        message
            .attributes
            .push(LinkAttribute::Controller(bridge_index));
        nl.request(RouteNetlinkMessage::SetLink(message), 0)
            .map(drop)
    })
    .map_err(|source| NetlinkError::SetMaster {
        ifname: link.to_string(),
        bridge: bridge.to_string(),
        source,
    })
}

/// Adds `address/prefix_len` to interface `name`, with the subnet's broadcast address. The
/// address being there already (same prefix length) is success.
pub(crate) fn add_ipv4_address(name: &str, address: Ipv4Addr, prefix_len: u8) -> Result<()> {
    check_name(name)?;
    let error = |source| NetlinkError::AddAddress {
        ifname: name.to_string(),
        address,
        prefix_len,
        source,
    };
    if prefix_len > 32 {
        let reason = "the prefix length is over 32";
        return Err(error(io::Error::new(io::ErrorKind::InvalidInput, reason)));
    }
    let result = with_socket(|nl| {
        let message = ipv4_address_message(nl.index(name)?, address, prefix_len);
        let flags = NLM_F_CREATE | NLM_F_EXCL;
        nl.request(RouteNetlinkMessage::NewAddress(message), flags)
            .map(drop)
    });
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        result => result.map_err(error),
    }
}

#[cfg(test)]
/// The IPv4 addresses of interface `name`, with their prefix lengths.
pub(crate) fn ipv4_addresses(name: &str) -> Result<Vec<(Ipv4Addr, u8)>> {
    check_name(name)?;
    with_socket(|nl| {
        let index = nl.index(name)?;
        let all = nl.ipv4_addresses()?;
        Ok(all
            .into_iter()
            .filter(|a| a.index == index)
            .map(|a| (a.address, a.prefix_len))
            .collect())
    })
    .map_err(|source| link_error("list the addresses of", name, source))
}

/// Every IPv4 address on the host: interface name, address, prefix length.
pub(crate) fn all_ipv4_addresses() -> Result<Vec<(String, Ipv4Addr, u8)>> {
    let (names, addresses) = with_socket(|nl| Ok((nl.link_names()?, nl.ipv4_addresses()?)))
        .map_err(NetlinkError::ListAddresses)?;
    Ok(addresses
        .into_iter()
        .filter_map(|a| {
            // An interface created between the two dumps has no name in `names`; the label
            // (for IPv4, the interface's name unless an alias was given) stands in.
            let ifname = names.get(&a.index).cloned().or(a.label)?;
            Some((ifname, a.address, a.prefix_len))
        })
        .collect())
}

/// Deletes interface `name`, whatever it is; it being gone already is success. Only for links
/// of networks started by daemons that recorded no index (see [`delete_link_at`]).
pub(crate) fn delete_link(name: &str) -> Result<()> {
    check_name(name)?;
    let message = RouteNetlinkMessage::DelLink(named_link(name));
    match with_socket(|nl| nl.request(message, 0).map(drop)) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        result => result.map_err(|source| link_error("delete", name, source)),
    }
}

/// What [`delete_link_at`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Removal {
    Deleted,
    /// No link has the index any more.
    Gone,
    /// The index now names another link (renamed, or the index was reused): left alone.
    NotOurs(String),
}

/// Deletes the link with index `index` if it is still called `name`: the link the caller made
/// and recorded, and no other.
pub(crate) fn delete_link_at(index: u32, name: &str) -> Result<Removal> {
    check_name(name)?;
    let current = match link_at(index)? {
        None => return Ok(Removal::Gone),
        Some(link) => link,
    };
    if current.name != name {
        return Ok(Removal::NotOurs(current.name));
    }
    let mut link = LinkMessage::default();
    link.header.index = index;
    match with_socket(|nl| nl.request(RouteNetlinkMessage::DelLink(link), 0).map(drop)) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(Removal::Gone),
        Ok(()) => Ok(Removal::Deleted),
        Err(source) => Err(link_error("delete", name, source)),
    }
}

/// A link as the daemon's ownership checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkIdentity {
    pub index: u32,
    pub name: String,
    /// A TUN/TAP device.
    pub tun: bool,
}

impl LinkIdentity {
    fn from_message(link: LinkMessage) -> Self {
        let mut name = String::new();
        let mut tun = false;
        for attribute in link.attributes {
            match attribute {
                LinkAttribute::IfName(n) => name = n,
                LinkAttribute::LinkInfo(infos) => {
                    tun |= infos.contains(&LinkInfo::Kind(InfoKind::Tun));
                }
                _ => {}
            }
        }
        LinkIdentity {
            index: link.header.index,
            name,
            tun,
        }
    }
}

/// The link named `name`, if there is one.
pub(crate) fn link_named(name: &str) -> Result<Option<LinkIdentity>> {
    check_name(name)?;
    match with_socket(|nl| nl.get_link(name)) {
        Ok(link) => Ok(Some(LinkIdentity::from_message(link))),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(link_error("look up", name, source)),
    }
}

/// The link with index `index`, if there is one.
pub(crate) fn link_at(index: u32) -> Result<Option<LinkIdentity>> {
    let mut request = LinkMessage::default();
    request.header.index = index;
    let reply = with_socket(|nl| {
        nl.request(RouteNetlinkMessage::GetLink(request), 0)?
            .into_iter()
            .find_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no link in the reply"))
    });
    match reply {
        Ok(link) => Ok(Some(LinkIdentity::from_message(link))),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
        Err(source) => Err(link_error("look up", &format!("link #{index}"), source)),
    }
}

/// Creates persistent multi-queue TAP device `name` (down, not in a bridge), whose users open
/// it with a virtio-net header on every packet; returns its index. An interface of that name
/// that exists already, whoever made it, is [`NetlinkError::Exists`]: it is never taken over.
pub(crate) fn create_tap(name: &str) -> Result<u32> {
    check_name(name)?;
    // Exclusive: an interface of that name (EBUSY) is never taken over. Multi-queue, so the
    // VMM can give the NIC a queue pair per vCPU.
    match host_sys::tap::create_persistent(name, true) {
        Err(e) if e.os_error() == Some(libc::EBUSY) => {
            return Err(NetlinkError::Exists(name.to_string()))
        }
        result => result.map_err(|e| link_error("create TAP device", name, io::Error::other(e)))?,
    }
    match link_named(name)? {
        Some(link) if link.tun => Ok(link.index),
        _ => Err(link_error(
            "find the new TAP device",
            name,
            io::Error::from_raw_os_error(libc::ENODEV),
        )),
    }
}

fn link_error(op: &'static str, ifname: &str, source: io::Error) -> NetlinkError {
    NetlinkError::Link {
        op,
        ifname: ifname.to_string(),
        source,
    }
}

/// Checks a Linux interface name the way the kernel does (`dev_valid_name`).
fn check_name(name: &str) -> Result<()> {
    if host_sys::ifname::valid(name) {
        Ok(())
    } else {
        Err(NetlinkError::InvalidName(name.to_string()))
    }
}

/// A link message that names its interface (index 0: the kernel looks the name up).
fn named_link(name: &str) -> LinkMessage {
    let mut link = LinkMessage::default();
    link.attributes
        .push(LinkAttribute::IfName(name.to_string()));
    link
}

fn ipv4_address_message(index: u32, address: Ipv4Addr, prefix_len: u8) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.prefix_len = prefix_len;
    message.header.index = index;
    message.attributes = vec![
        AddressAttribute::Local(IpAddr::V4(address)),
        AddressAttribute::Address(IpAddr::V4(address)),
    ];
    // /31 and /32 have no broadcast address (RFC 3021).
    if prefix_len <= 30 {
        let host_bits = u32::MAX >> prefix_len;
        let broadcast = Ipv4Addr::from(u32::from(address) | host_bits);
        message
            .attributes
            .push(AddressAttribute::Broadcast(broadcast));
    }
    message
}

/// Opens a socket, runs `f` with it, closes it.
fn with_socket<T>(f: impl FnOnce(&mut Rtnl) -> io::Result<T>) -> io::Result<T> {
    f(&mut Rtnl::open()?)
}

/// One IPv4 address from an address dump.
#[derive(Debug)]
struct HostAddress {
    index: u32,
    address: Ipv4Addr,
    prefix_len: u8,
    label: Option<String>,
}

impl HostAddress {
    fn from_message(message: AddressMessage) -> Option<Self> {
        let mut local = None;
        let mut peer = None;
        let mut label = None;
        for attribute in message.attributes {
            match attribute {
                AddressAttribute::Local(IpAddr::V4(a)) => local = Some(a),
                AddressAttribute::Address(IpAddr::V4(a)) => peer = Some(a),
                AddressAttribute::Label(l) => label = Some(l),
                _ => {}
            }
        }
        Some(HostAddress {
            index: message.header.index,
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on a
            // point-to-point link and the same elsewhere, where IFA_LOCAL may be missing.
            address: local.or(peer)?,
            prefix_len: message.header.prefix_len,
            label,
        })
    }
}

/// A NETLINK_ROUTE socket, talking to the kernel of the thread's network namespace.
#[derive(Debug)]
struct Rtnl {
    socket: Socket,
    sequence: u32,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl {
            socket,
            sequence: 0,
        })
    }

    /// The interface `name` (RTM_GETLINK by name); ENODEV if there is none.
    fn get_link(&mut self, name: &str) -> io::Result<LinkMessage> {
        let request = RouteNetlinkMessage::GetLink(named_link(name));
        self.request(request, 0)?
            .into_iter()
            .find_map(|reply| match reply {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no link in the reply"))
    }

    fn index(&mut self, name: &str) -> io::Result<u32> {
        Ok(self.get_link(name)?.header.index)
    }

    fn set_flag_up(&mut self, name: &str, up: bool) -> io::Result<()> {
        let mut link = named_link(name);
        link.header.change_mask = LinkFlags::Up;
        if up {
            link.header.flags = LinkFlags::Up;
        }
        self.request(RouteNetlinkMessage::SetLink(link), 0)
            .map(drop)
    }

    /// Every interface's name, by index.
    fn link_names(&mut self) -> io::Result<HashMap<u32, String>> {
        let request = RouteNetlinkMessage::GetLink(LinkMessage::default());
        let mut names = HashMap::new();
        for reply in self.dump(request)? {
            let RouteNetlinkMessage::NewLink(link) = reply else {
                continue;
            };
            let name = link.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(name) => Some(name),
                _ => None,
            });
            if let Some(name) = name {
                names.insert(link.header.index, name);
            }
        }
        Ok(names)
    }

    fn ipv4_addresses(&mut self) -> io::Result<Vec<HostAddress>> {
        let mut request = AddressMessage::default();
        request.header.family = AddressFamily::Inet;
        let replies = self.dump(RouteNetlinkMessage::GetAddress(request))?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                RouteNetlinkMessage::NewAddress(a) if a.header.family == AddressFamily::Inet => {
                    HostAddress::from_message(a)
                }
                _ => None,
            })
            .collect())
    }

    /// Sends a request asking for an acknowledgement; the replies before it.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.exchange(message, NLM_F_REQUEST | NLM_F_ACK | flags)
    }

    /// Sends a dump request; the replies up to its end.
    fn dump(&mut self, message: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.exchange(message, NLM_F_REQUEST | NLM_F_DUMP)
    }

    fn exchange(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;
        self.replies()
    }

    /// Reads the replies to the last request, up to its acknowledgement, error or end of dump.
    fn replies(&self) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut replies = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut rest = datagram.as_slice();
            while !rest.is_empty() {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                // Messages in a datagram start on 4-byte boundaries; the length is at least
                // a header's (checked by `deserialize`), so this progresses.
                let length = (message.header.length as usize).next_multiple_of(4);
                rest = rest.get(length..).unwrap_or_default();
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(reply) => replies.push(reply),
                    NetlinkPayload::Error(error) if error.code.is_some() => {
                        return Err(error.to_io())
                    }
                    NetlinkPayload::Error(_) => return Ok(replies),
                    NetlinkPayload::Done(done) if done.code < 0 => {
                        return Err(io::Error::from_raw_os_error(-done.code))
                    }
                    NetlinkPayload::Done(_) => return Ok(replies),
                    _ => {}
                }
            }
        }
    }
}

/// Runs `body` in a throwaway network namespace (the host's interfaces stay untouched), for
/// tests; skipped where that is not allowed.
#[cfg(test)]
pub(crate) use host_sys::netns::in_new_netns;

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 123, 0, 1);

    #[test]
    fn bridge_with_an_address_and_a_tap() {
        in_new_netns(|| {
            create_bridge("ferrobr0", [2, 0, 0, 0, 0, 1]).unwrap();
            set_up("ferrobr0").unwrap();
            add_ipv4_address("ferrobr0", ADDRESS, 24).unwrap();
            assert_eq!(ipv4_addresses("ferrobr0").unwrap(), [(ADDRESS, 24)]);
            add_ipv4_address("ferrobr0", ADDRESS, 24).unwrap();
            assert_eq!(ipv4_addresses("ferrobr0").unwrap(), [(ADDRESS, 24)]);
            let all = all_ipv4_addresses().unwrap();
            assert!(
                all.contains(&("ferrobr0".to_string(), ADDRESS, 24)),
                "{all:?}"
            );
            let bridge = link_index("ferrobr0").unwrap().unwrap();

            create_tap("ferrotap0").unwrap();
            assert_eq!(master_of("ferrotap0").unwrap(), None);
            set_master("ferrotap0", "ferrobr0").unwrap();
            set_up("ferrotap0").unwrap();
            assert_eq!(master_of("ferrotap0").unwrap(), Some(bridge));
            assert_eq!(master_of("ferrobr0").unwrap(), None);
            assert!(ipv4_addresses("ferrotap0").unwrap().is_empty());
            set_down("ferrotap0").unwrap();
            set_down("ferrobr0").unwrap();

            for name in ["ferrotap0", "ferrobr0"] {
                delete_link(name).unwrap();
                assert_eq!(link_index(name).unwrap(), None);
                delete_link(name).unwrap();
            }
        });
    }

    #[test]
    fn errors_name_the_interface() {
        in_new_netns(|| {
            create_bridge("ferrobr1", [2, 0, 0, 0, 0, 1]).unwrap();
            let error = create_bridge("ferrobr1", [2, 0, 0, 0, 0, 1]).unwrap_err();
            assert!(error.to_string().contains("ferrobr1"), "{error}");
            assert_eq!(error.raw_os_error(), Some(libc::EEXIST));

            let error = set_up("ferro-missing").unwrap_err();
            assert!(error.to_string().contains("ferro-missing"), "{error}");
            assert_eq!(error.raw_os_error(), Some(libc::ENODEV));
            let error = set_master("ferrobr1", "ferro-missing").unwrap_err();
            assert!(error.to_string().contains("ferro-missing"), "{error}");
            let error = add_ipv4_address("ferrobr1", ADDRESS, 33).unwrap_err();
            assert!(error.to_string().contains("ferrobr1"), "{error}");
            assert!(ipv4_addresses("ferro-missing").is_err());

            let long = "ferro-0123456789"; // 16 bytes: one too many
            assert!(matches!(
                create_tap(long),
                Err(NetlinkError::InvalidName(_))
            ));
            assert!(matches!(
                create_bridge(long, [2, 0, 0, 0, 0, 1]),
                Err(NetlinkError::InvalidName(_))
            ));
            assert!(matches!(
                link_index(long),
                Err(NetlinkError::InvalidName(_))
            ));
            assert!(matches!(create_tap(""), Err(NetlinkError::InvalidName(_))));
            create_tap("ferro-012345678").unwrap(); // 15 bytes: the longest name
            delete_link("ferro-012345678").unwrap();
            delete_link("ferrobr1").unwrap();
        });
    }

    #[test]
    fn broadcast_address_follows_the_prefix() {
        let broadcast = |prefix_len| {
            ipv4_address_message(1, ADDRESS, prefix_len)
                .attributes
                .into_iter()
                .find_map(|a| match a {
                    AddressAttribute::Broadcast(b) => Some(b),
                    _ => None,
                })
        };
        assert_eq!(broadcast(24), Some(Ipv4Addr::new(10, 123, 0, 255)));
        assert_eq!(broadcast(8), Some(Ipv4Addr::new(10, 255, 255, 255)));
        assert_eq!(broadcast(0), Some(Ipv4Addr::BROADCAST));
        assert_eq!(broadcast(31), None);
        assert_eq!(broadcast(32), None);
    }
}
