//! The names of the TAP devices the daemon makes for NICs on its virtual networks: how they
//! are built from a VM's id, how older daemons built them, and the shape no user's `tap =` may
//! take. Pure functions; no I/O.

use crate::net::stable_hash;

/// The TAP device of NIC `index` of the VM with id `id` on a virtual network: `fvIDnINDEX`.
/// Ids are unique among defined VMs, so no two VMs ever share a name; at most 15 bytes (an
/// id has at most 10 digits, an index below [`MAX_NICS`] at most 2).
pub fn network_tap_name(id: u32, index: usize) -> String {
    format!("fv{id}n{index}")
}

/// The TAP name daemons before VM ids gave NIC `index` of VM `vm` (a 32-bit hash of the name,
/// which another name can be made to share): only to find the TAP devices of VMs such a
/// daemon started, which keep running across the upgrade.
pub fn legacy_network_tap_name(vm: &str, index: usize) -> String {
    format!("fv{:08x}n{index}", stable_hash(vm) as u32)
}

/// Refuses a NIC's `tap =` that has the shape of the daemon's own network TAP names (checked
/// by the daemon at define and start, not when a stored definition is read).
pub fn check_own_tap_name(tap: &str) -> Result<(), String> {
    if is_network_tap_name(tap) {
        return Err(format!(
            "the TAP name {tap:?} is reserved: names like fvNnI are the TAP devices the daemon \
             makes for NICs on networks; pick another name"
        ));
    }
    Ok(())
}

/// The VM id in a TAP name of [`network_tap_name`]'s shape.
pub fn network_tap_id(name: &str) -> Option<u32> {
    let (id, index) = name.strip_prefix("fv")?.split_once('n')?;
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    if !digits(id) || !digits(index) {
        return None;
    }
    id.parse().ok()
}

/// Whether `name` has the shape of a TAP device the daemon makes for a NIC on a network
/// (`fv`, hex digits, `n`, digits; today's and older names): such names are the daemon's only.
pub fn is_network_tap_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("fv") else {
        return false;
    };
    let Some((id, index)) = rest.split_once('n') else {
        return false;
    };
    !id.is_empty()
        && id.chars().all(|c| c.is_ascii_hexdigit())
        && !index.is_empty()
        && index.chars().all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_config::MAX_NICS;

    /// Names a 32-bit hash gave could be made to collide (a birthday search finds a pair
    /// in well under a second); names from ids cannot, and stay interface names.
    #[test]
    fn network_tap_names_are_unique_by_construction() {
        let mut seen = std::collections::HashMap::new();
        let collision = (0u32..1_000_000).find_map(|i| {
            let name = format!("vm{i}");
            let tap = legacy_network_tap_name(&name, 0);
            seen.insert(tap, name.clone()).map(|other| (other, name))
        });
        let (a, b) = collision.expect("a 32-bit hash collides within a million names");
        assert_eq!(
            legacy_network_tap_name(&a, 0),
            legacy_network_tap_name(&b, 0)
        );
        let mut names = std::collections::HashSet::new();
        for id in [1, 2, 10, 12, 123, u32::MAX] {
            for index in [0, 1, 2, 11, MAX_NICS - 1] {
                let tap = network_tap_name(id, index);
                assert!(crate::net::valid_interface_name(&tap), "{tap}");
                assert!(is_network_tap_name(&tap), "{tap}");
                assert!(names.insert(tap.clone()), "{tap} twice");
            }
        }
        assert_eq!(network_tap_name(7, 0), "fv7n0");
    }

    /// A NIC's own TAP may not look like the daemon's network TAPs (today's or older ones).
    #[test]
    fn network_tap_shapes_are_reserved() {
        for reserved in ["fv1n0", "fv4294967295n31", "fvdeadbeefn0", "fv0n12"] {
            assert!(check_own_tap_name(reserved).is_err(), "{reserved}");
        }
        for free in [
            "tap0",
            "fv",
            "fvn0",
            "fv1n",
            "fv1x0",
            "fvgn0",
            "fv1n0x",
            "web-fv1n0",
        ] {
            check_own_tap_name(free).unwrap();
        }
    }

    #[test]
    fn tap_names_give_their_vm_id() {
        assert_eq!(network_tap_id(&network_tap_name(42, 3)), Some(42));
        for name in [
            "fvtest0",
            "fv7n",
            "fvn0",
            "fv1an0",
            "tap0",
            "fv99999999999n0",
        ] {
            assert_eq!(network_tap_id(name), None, "{name}");
        }
    }
}
