//! Definition files as people write them (TOML): VMs, pools and networks. Parsed here, in the
//! crate every side shares, so the CLI checks a file before sending it without linking the
//! daemon, and the daemon reads its own files with the same rules. No I/O: text in, value out.

use serde::de::DeserializeOwned;

use crate::daemon_api::VmDefinition;
use crate::net_api::NetworkDefinition;
use crate::pool_api::PoolDefinition;

/// Reads TOML into `T`; the message is TOML's own (it names unknown fields and bad values).
fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.message().to_string())
}

/// Parses a VM definition file and checks it; the message names what is wrong.
pub fn parse_vm(text: &str) -> Result<VmDefinition, String> {
    let definition: VmDefinition = from_toml(text)?;
    definition.validate()?;
    Ok(definition)
}

/// Parses a VM definition the daemon stored (a `path` disk may lack its format: see
/// [`VmDefinition::validate_stored`]).
pub fn parse_stored_vm(text: &str) -> Result<VmDefinition, String> {
    let definition: VmDefinition = from_toml(text)?;
    definition.validate_stored()?;
    Ok(definition)
}

/// Parses a pool definition file and checks it.
pub fn parse_pool(text: &str) -> Result<PoolDefinition, String> {
    let definition: PoolDefinition = from_toml(text)?;
    definition.validate()?;
    Ok(definition)
}

/// Parses a network definition file and checks it.
pub fn parse_network(text: &str) -> Result<NetworkDefinition, String> {
    let definition: NetworkDefinition = from_toml(text)?;
    definition.validate()?;
    Ok(definition)
}

/// A VM definition as a file [`parse_vm`] reads back to the same definition.
pub fn vm_to_toml(definition: &VmDefinition) -> Result<String, String> {
    toml::to_string_pretty(definition).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_definition_survives_a_round_trip_through_its_file() {
        let text = r#"
            name = "web1"
            cpus = 2
            memory = "1G"
            kernel = "/boot/vmlinuz"
            cmdline = "console=ttyS0"
            rng = true
            autostart = true
            [[disks]]
            path = "/images/web1.qcow2"
            format = "qcow2"
            [[disks]]
            volume = "default/data.raw"
            readonly = true
            [[nets]]
            network = "default"
            mac = "52:54:00:12:34:56"
            [[nets]]
            tap = "tap7"
        "#;
        let definition = parse_vm(text).unwrap();
        let dumped = vm_to_toml(&definition).unwrap();
        assert_eq!(parse_vm(&dumped).unwrap(), definition, "{dumped}");
        let with_id = VmDefinition {
            id: Some(7),
            ..definition
        };
        assert_eq!(parse_vm(&vm_to_toml(&with_id).unwrap()).unwrap(), with_id);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let err = parse_vm("name = \"x\"\nkernel = \"/k\"\ncpu = 2\n").unwrap_err();
        assert!(err.contains("unknown field `cpu`"), "{err}");
        let err = parse_vm("name = \"x\"\nkernel = \"k\"\n").unwrap_err();
        assert!(err.contains("absolute"), "{err}");
        // A stored definition from before disk formats were required still reads.
        let old = "name = \"x\"\nkernel = \"/k\"\n[[disks]]\npath = \"/d\"\n";
        assert!(parse_vm(old).unwrap_err().contains("needs a format"));
        parse_stored_vm(old).unwrap();
        let err = parse_pool("name = \"p\"\n").unwrap_err();
        assert!(err.contains("path"), "{err}");
        let err =
            parse_network("name = \"n\"\nmode = \"nat\"\nbridge = \"b\"\nbogus = 1\n").unwrap_err();
        assert!(err.contains("unknown field `bogus`"), "{err}");
    }
}
