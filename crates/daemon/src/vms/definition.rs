//! A VM definition as the VM registry keeps it (`vms/NAME.toml`): how it is read back (as
//! stored, where a `path` disk may lack the format older daemons did not require) and brought
//! up to date once on load.
//!
//! Threading: none; called while the registry is opened.

use std::fs;

use api::daemon_api::VmDefinition;

use crate::registry::Definition;

impl Definition for VmDefinition {
    const KIND: &'static str = "VM";
    const ACTIVE: &'static str = "running";
    const STOP_FIRST: &'static str = "destroy or shut it down first";
    fn name(&self) -> &str {
        &self.name
    }
    fn set_autostart(&mut self, enabled: bool) {
        self.autostart = enabled;
    }
    fn parse(text: &str) -> Result<Self, String> {
        api::definition_file::parse_stored_vm(text)
    }
    fn upgrade(&mut self) -> bool {
        record_disk_formats(self)
    }
}

/// Gives the `path` disks of a definition written before formats were required the format
/// their images have now, where a guest's writes could not have made it (raw, or qcow2 with
/// no backing file), recorded in the definition and kept from then on; returns whether any
/// disk changed. A disk that looks like anything else (a qcow2 image naming a backing file,
/// which its guest may have written) keeps no format, and its VM cannot start until its
/// definition gives one.
fn record_disk_formats(definition: &mut VmDefinition) -> bool {
    let mut changed = false;
    for disk in &mut definition.config.disks {
        let Some(path) = disk.path().filter(|_| disk.format.is_none()) else {
            continue;
        };
        let probed = fs::File::open(path)
            .map_err(|e| format!("cannot be read ({e})"))
            .and_then(|file| crate::pools::volume_format::trusted_probe(&file));
        match probed {
            Ok(format) => {
                tracing::warn!(
                    "VM {}: disk {} had no format; probed once as {} and recorded in its \
                     definition",
                    definition.name,
                    path.display(),
                    format.name()
                );
                disk.format = Some(format.name().to_string());
                changed = true;
            }
            Err(looks) => tracing::error!(
                "VM {}: disk {} has no format and {looks}: it cannot start until its \
                 definition says format = \"raw\" or \"qcow2\"",
                definition.name,
                path.display()
            ),
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::registry::Registry;

    type Vms = Registry<VmDefinition, ()>;

    fn definition(name: &str) -> VmDefinition {
        api::definition_file::parse_vm(&format!("name = \"{name}\"\nkernel = \"/boot/vmlinuz\"\n"))
            .unwrap()
    }

    #[test]
    fn definitions_round_trip_through_toml_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut vms = Vms::open(dir.path().to_path_buf()).unwrap();
        let mut def = definition("web1");
        let disk: api::DiskConfig = "path=/var/lib/ferro/web1.qcow2,format=qcow2"
            .parse()
            .unwrap();
        def.config.disks.push(disk);
        def.autostart = true;
        vms.define(def.clone(), |_| Ok(())).unwrap();
        vms.define(definition("db"), |_| Ok(())).unwrap();
        let loaded = Vms::open(dir.path().to_path_buf()).unwrap();
        assert_eq!(loaded.entries().len(), 2);
        assert_eq!(loaded.get("web1").unwrap().definition, def);
        vms.undefine("db").unwrap();
        let loaded = Vms::open(dir.path().to_path_buf()).unwrap();
        assert_eq!(loaded.entries().keys().collect::<Vec<_>>(), ["web1"]);
    }

    /// A 1 MiB qcow2 image at `path`, naming `backing` (raw) if given.
    fn qcow2(path: &Path, backing: Option<&str>) {
        let file = fs::File::create(path).unwrap();
        let options = block::qcow2::CreateOptions {
            size: 1 << 20,
            cluster_bits: 16,
            backing: backing.map(|b| (b.to_string(), Some("raw".to_string()))),
        };
        block::qcow2::create(&file, &options).unwrap();
    }

    #[test]
    fn an_old_definition_gets_its_disk_formats_once_where_no_guest_could_fake_them() {
        let dir = tempfile::tempdir().unwrap();
        let vms_dir = dir.path().join("vms");
        fs::create_dir(&vms_dir).unwrap();
        let raw = dir.path().join("a.raw");
        let alone = dir.path().join("b.qcow2");
        let overlay = dir.path().join("c.qcow2");
        let missing = dir.path().join("d.img");
        fs::write(&raw, vec![0u8; 4096]).unwrap();
        qcow2(&alone, None);
        qcow2(&overlay, Some("a.raw"));
        let mut text = "name = \"old\"\nkernel = \"/k\"\n".to_string();
        for disk in [&raw, &alone, &overlay, &missing] {
            text += &format!("[[disks]]\npath = {disk:?}\n");
        }
        let file = vms_dir.join("old.toml");
        fs::write(&file, text).unwrap();
        let loaded = Vms::open(vms_dir.clone()).unwrap();
        let old = &loaded.get("old").unwrap().definition;
        let formats: Vec<_> = old.config.disks.iter().map(|d| d.format.clone()).collect();
        // An overlay (maybe a guest's header in a raw disk) and an unreadable disk stay
        // without: the VM is kept, and cannot start until its definition says.
        assert_eq!(
            formats,
            [Some("raw".into()), Some("qcow2".into()), None, None]
        );
        let unset: Vec<_> = old.disks_without_format().collect();
        assert_eq!(unset, [overlay.as_path(), missing.as_path()]);
        // Recorded in the file: what the guest writes later changes nothing.
        qcow2(&raw, Some("b.qcow2"));
        let loaded = Vms::open(vms_dir).unwrap();
        let old = &loaded.get("old").unwrap().definition;
        assert_eq!(old.config.disks[0].format.as_deref(), Some("raw"));
        let saved = fs::read_to_string(&file).unwrap();
        assert!(saved.contains(r#"format = "raw""#), "{saved}");
    }

    #[test]
    fn bad_files_and_misnamed_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("bad.toml"),
            "name = \"bad\"\nkernal = \"/k\"\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("other.toml"),
            "name = \"x\"\nkernel = \"/k\"\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("good.toml"),
            "name = \"good\"\nkernel = \"/k\"\n",
        )
        .unwrap();
        let loaded = Vms::open(dir.path().to_path_buf()).unwrap();
        assert_eq!(loaded.entries().keys().collect::<Vec<_>>(), ["good"]);
        // Skipped, not removed: the operator can fix them.
        assert!(dir.path().join("bad.toml").exists());
        assert!(dir.path().join("other.toml").exists());
    }

    #[test]
    fn a_running_vm_is_refused_in_the_vms_own_words() {
        let dir = tempfile::tempdir().unwrap();
        let mut vms = Vms::open(dir.path().to_path_buf()).unwrap();
        vms.define(definition("web"), |_| Ok(())).unwrap();
        vms.inactive("web").unwrap().active = true;
        let message = |e: crate::failure::Failure| e.message;
        assert_eq!(
            message(vms.inactive("web").unwrap_err()),
            "VM web is already running"
        );
        assert_eq!(
            message(vms.undefine("web").unwrap_err()),
            "VM web is running; destroy or shut it down first"
        );
        vms.active("web").unwrap().active = false;
        assert_eq!(
            message(vms.active("web").unwrap_err()),
            "VM web is not running"
        );
        assert_eq!(
            message(vms.get("nope").unwrap_err()),
            "no VM named \"nope\""
        );
    }
}
