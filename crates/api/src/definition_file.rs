//! Definition files as people write them (TOML): VMs, pools and networks. Parsed here, in the
//! crate every side shares, so the CLI checks a file before sending it without linking the
//! daemon, and the daemon reads its own files with the same rules. No I/O: text in, value out.

use serde::de::DeserializeOwned;

use crate::net_api::NetworkDefinition;
use crate::pool_api::PoolDefinition;
use crate::vm_config::VmConfig;
use crate::vm_definition::VmDefinition;

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

/// Reads a VM's config written as TOML (`ferro run --config vm.toml`; JSON has the same
/// fields). Not checked here: the VMM checks it with the rest of the VM
/// ([`crate::VmConfig::into_runnable`]).
pub fn parse_vm_config(text: &str) -> Result<VmConfig, String> {
    from_toml(text)
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

    /// A definition the daemon stored (or a person wrote) before definitions embedded the
    /// VM's config reads, and `vm dump` writes it back field for field.
    #[test]
    fn todays_stored_definitions_still_load_and_dump_the_same() {
        let stored = r#"name = "web1"
id = 4
cpus = 2
memory = "1G"
kernel = "/boot/vmlinuz"
initrd = "/boot/initrd.img"
cmdline = "console=ttyS0 quiet"
rng = true
rng_bytes_per_sec = 4096
console = "serial"
autostart = true

[[disks]]
path = "/images/web1.qcow2"
readonly = false
format = "qcow2"
num_queues = 2

[[disks]]
volume = "default/data.raw"
readonly = true
serial = "data"

[[nets]]
network = "default"
mac = "52:54:00:12:34:56"

[[nets]]
tap = "tap7"
queue_pairs = 2
"#;
        let definition = parse_stored_vm(stored).unwrap();
        assert_eq!(definition.id, Some(4));
        assert_eq!(
            definition.config.disks[1].volume_ref(),
            Some(("default", "data.raw"))
        );
        assert_eq!(definition.config.nets[0].network(), Some("default"));
        assert_eq!(definition.config.rng_bytes_per_sec, Some(4096));
        assert_eq!(vm_to_toml(&definition).unwrap(), stored);
    }

    #[test]
    fn run_configs_read_as_json_or_toml() {
        let json = r#"{"kernel": "/k", "cpus": 2, "disks": [{"path": "d.raw", "format": "raw"}]}"#;
        let toml = "kernel = \"/k\"\ncpus = 2\n[[disks]]\npath = \"d.raw\"\nformat = \"raw\"\n";
        let config: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(parse_vm_config(toml).unwrap(), config);
        assert_eq!(config.disks[0].path(), Some(std::path::Path::new("d.raw")));
        let err = parse_vm_config("kernel = \"/k\"\ncpu = 2\n").unwrap_err();
        assert!(err.contains("unknown field `cpu`"), "{err}");
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
