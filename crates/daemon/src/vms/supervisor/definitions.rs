//! VM definitions: define (a new VM gets an id and its NICs MACs; an existing one's new
//! definition is taken at once or held as pending while it runs), undefine, autostart, and
//! the checks that a NIC's TAP name is not another's.
//!
//! Threading: called from the API's tasks; the VM table's lock is held across a check and
//! the change it guards, and the definition file is written under it.

use std::collections::{BTreeMap, BTreeSet};

use api::daemon_api::{VmDefinition, VmDetails};
use api::net_api::NetworkMode;

use crate::failure::Failure;

use super::{Supervisor, VmEntry, VmTable};

impl Supervisor {
    /// One line for each NIC of `definition` on a nat or isolated network where the VM gets an
    /// address but no DNS name, its name not being one (definitions from before names were
    /// checked).
    pub(super) fn nameless_nics(&self, definition: &VmDefinition) -> Vec<String> {
        if definition.dns_name().is_some() {
            return Vec::new();
        }
        definition
            .config
            .nets
            .iter()
            .enumerate()
            .filter_map(|(index, nic)| {
                let network = nic.network()?;
                let mode = self.networks.mode_of(network)?;
                (mode != NetworkMode::Bridge).then(|| {
                    format!(
                        "NIC {index} on network {network}: the VM's name {:?} is not a DNS name \
                         (letters, digits, inner '-', at most 63, not all digits), so DHCP gives \
                         it an address but DNS no name",
                        definition.name
                    )
                })
            })
            .collect()
    }

    /// Refuses NICs that would take what belongs to others (see the module's text); `others`
    /// are the VMs whose `tap =` devices count as taken.
    pub(super) fn check_nic_claims<'a>(
        &self,
        definition: &VmDefinition,
        others: impl Iterator<Item = &'a VmEntry>,
    ) -> Result<(), String> {
        let taken: BTreeMap<&str, &str> = others
            .filter(|other| other.definition.name != definition.name)
            .flat_map(|other| {
                let name = other.definition.name.as_str();
                other
                    .definitions()
                    .flat_map(|definition| definition.config.nets.iter())
                    .filter_map(move |nic| Some((nic.tap()?, name)))
            })
            .collect();
        for tap in definition.config.nets.iter().filter_map(|nic| nic.tap()) {
            api::daemon_api::check_own_tap_name(tap)?;
            if let Some(owner) = taken.get(tap) {
                return Err(format!(
                    "the TAP device {tap} belongs to VM {owner}; give this NIC another tap"
                ));
            }
            if let Some(claim) = self.networks.claim_on(tap) {
                return Err(format!("{tap} is {claim}; give this NIC another tap"));
            }
        }
        Ok(())
    }

    /// Defines a new VM, or updates an existing one's definition (see the module's text);
    /// the answer says which (`true`: created).
    pub fn define(&self, mut definition: VmDefinition) -> Result<(VmDetails, bool), Failure> {
        definition.validate().map_err(Failure::invalid)?;
        // Ids are the daemon's to give.
        definition.id = None;
        let name = definition.name.clone();
        let exists = self.lock().entries().contains_key(&name);
        // An update waits for no other operation on the VM (a start would race it).
        let busy = exists.then(|| self.begin(&name, "define")).transpose()?;
        let previous = busy
            .as_ref()
            .and_then(|_| self.lock().get(&name).ok().map(|e| e.definition.clone()));
        self.prepare_nics(&mut definition, previous.as_ref())?;
        // The files it names exist (the id, not given yet, does not matter here).
        let placeholder = VmDefinition {
            id: Some(0),
            ..definition.clone()
        };
        self.resolve(&placeholder)
            .and_then(|config| self.check_files(&config))
            .map_err(Failure::invalid)?;
        let created = match previous {
            Some(previous) => {
                definition.id = previous.id;
                self.update_definition(definition)?;
                false
            }
            None => {
                self.add_definition(definition)?;
                true
            }
        };
        drop(busy);
        let detail = (!created).then(|| "updated".to_string());
        self.emit(&name, "defined", detail);
        Ok((self.details(&name)?, created))
    }

    /// Checks the NICs' networks and gives each NIC without a MAC one: the MAC of the NIC at
    /// the same place in `previous` (an update keeps the guest's addresses), or a random one.
    pub(super) fn prepare_nics(
        &self,
        definition: &mut VmDefinition,
        previous: Option<&VmDefinition>,
    ) -> Result<(), Failure> {
        let dns_name = definition.dns_name().map(str::to_string);
        for (index, nic) in definition.config.nets.iter_mut().enumerate() {
            if let Some(network) = nic.network() {
                let mode = self.networks.mode_of(network).ok_or_else(|| {
                    Failure::invalid(format!("there is no network named {network:?}"))
                })?;
                if mode != NetworkMode::Bridge && dns_name.is_none() {
                    return Err(Failure::invalid(format!(
                        "the VM name {:?} cannot be its DNS name on network {network}: use letters, \
                         digits and inner '-' (at most 63, not all digits)",
                        definition.name
                    )));
                }
            }
            // A fixed MAC keeps the guest's DHCP lease and DNS name across starts.
            let kept = previous
                .and_then(|p| p.config.nets.get(index))
                .and_then(|old| old.mac);
            if nic.mac.is_none() {
                nic.mac = Some(kept.unwrap_or_else(api::net::MacAddress::random));
            }
        }
        Ok(())
    }

    /// Stores a new VM's definition with a fresh id.
    pub(super) fn add_definition(&self, mut definition: VmDefinition) -> Result<(), Failure> {
        let mut vms = self.lock();
        if vms.entries().contains_key(&definition.name) {
            return Err(Failure::conflict(format!(
                "a VM named {} was defined at the same time; try again",
                definition.name
            )));
        }
        self.check_nic_claims(&definition, vms.entries().values())
            .map_err(Failure::conflict)?;
        // Ids whose TAP names are still recorded (a device that could not be removed)
        // are not given again.
        let mut used: BTreeSet<u32> = self.networks.recorded_tap_ids();
        used.extend(vms.entries().values().filter_map(|e| e.definition.id));
        definition.id = Some(
            free_id(&used)
                .ok_or_else(|| Failure::conflict("every VM id is taken; undefine a VM first"))?,
        );
        vms.define(definition, |_| Ok(()))?;
        Ok(())
    }

    /// Stores an existing VM's new definition: in effect at once when the VM is not running,
    /// pending until its VMM ends when it is.
    pub(super) fn update_definition(&self, definition: VmDefinition) -> Result<(), Failure> {
        let mut vms = self.lock();
        self.check_nic_claims(&definition, vms.entries().values())
            .map_err(Failure::conflict)?;
        let current = vms.get(&definition.name)?.current().clone();
        let entry = vms.replace(definition)?;
        if entry.record.runtime.is_some() {
            entry.record.running = (current != entry.definition).then_some(current);
        }
        Ok(())
    }

    pub fn undefine(&self, name: &str) -> Result<(), Failure> {
        let busy = self.begin(name, "undefine")?;
        self.lock().undefine(name)?;
        drop(busy);
        self.emit(name, "undefined", None);
        Ok(())
    }

    pub fn set_autostart(&self, name: &str, enabled: bool) -> Result<VmDetails, Failure> {
        let busy = self.begin(name, "autostart")?;
        {
            let mut vms = self.lock();
            let entry = vms.set_autostart(name, enabled)?;
            if let Some(running) = &mut entry.record.running {
                running.autostart = enabled;
            }
        }
        drop(busy);
        self.details(name)
    }
}

/// The smallest id (from 1) not in `used`.
pub(super) fn free_id(used: &BTreeSet<u32>) -> Option<u32> {
    (1..=u32::MAX).find(|id| !used.contains(id))
}

/// Gives an id to each loaded definition without one (older than ids) or with one another
/// definition has (an edited file), and stores it.
pub(super) fn give_ids(vms: &mut VmTable, recorded: BTreeSet<u32>) {
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for entry in vms.entries().values() {
        match entry.definition.id {
            Some(id) if used.insert(id) => {}
            _ => missing.push(entry.definition.clone()),
        }
    }
    // Recorded TAP names of VMs no longer defined keep their ids from new definitions.
    used.extend(recorded);
    for mut definition in missing {
        let Some(id) = free_id(&used) else {
            tracing::error!("no VM id left for {}", definition.name);
            continue;
        };
        used.insert(id);
        definition.id = Some(id);
        tracing::info!("VM {} gets id {id}", definition.name);
        let name = definition.name.clone();
        if let Err(e) = vms.replace(definition) {
            tracing::error!("VM {name}: cannot store its id: {}", e.message);
        }
    }
}

/// Definitions from before `tap =` was checked may share a TAP device: they still load, and
/// only one of them can run at a time.
pub(super) fn warn_of_shared_taps(vms: &VmTable) {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for definition in vms.entries().values().map(|e| &e.definition) {
        for tap in definition.config.nets.iter().filter_map(|n| n.tap()) {
            if let Some(first) = seen.insert(tap, &definition.name) {
                tracing::warn!(
                    "VMs {first} and {} both name the TAP device {tap}: only one of them can run at a time",
                    definition.name
                );
            }
        }
    }
}
