//! The bookkeeping every defined resource with an active state shares (VMs, pools and
//! networks): a table of definitions kept as `<dir>/NAME.toml`, loaded at start, and the
//! checks and messages of define, update, undefine, start, stop and autostart, so each
//! resource says them the same way ("no pool named ...", "network lab is not active", "VM web
//! is already running"). What starting or stopping does, and what else a definition must not
//! clash with, stay with the resource.
//!
//! Threading: none of its own; each resource keeps its registry behind its own mutex.

use std::collections::btree_map::Entry as Slot;
use std::collections::BTreeMap;
use std::path::PathBuf;

use api::net_api::NetworkDefinition;
use api::pool_api::PoolDefinition;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::failure::{chain, Failure};
use crate::fs::{write_atomic, DirError};

/// A definition a [`Registry`] keeps.
pub trait Definition: Clone + Serialize + DeserializeOwned {
    /// What the resource is called in messages ("pool", "network", "VM").
    const KIND: &'static str;
    /// What an active one is said to be ("active", "running").
    const ACTIVE: &'static str = "active";
    /// What to do before an active one can be undefined.
    const STOP_FIRST: &'static str = "stop it first";
    fn name(&self) -> &str;
    fn set_autostart(&mut self, enabled: bool);
    /// Reads a definition file, with the same checks as a definition sent to the API.
    fn parse(text: &str) -> Result<Self, String>;
    /// Brings a definition read from its file up to date (what older daemons did not
    /// record); returns whether it changed, so that the file is written again.
    fn upgrade(&mut self) -> bool {
        false
    }
}

impl Definition for PoolDefinition {
    const KIND: &'static str = "pool";
    fn name(&self) -> &str {
        &self.name
    }
    fn set_autostart(&mut self, enabled: bool) {
        self.autostart = enabled;
    }
    fn parse(text: &str) -> Result<Self, String> {
        api::definition_file::parse_pool(text)
    }
}

impl Definition for NetworkDefinition {
    const KIND: &'static str = "network";
    fn name(&self) -> &str {
        &self.name
    }
    fn set_autostart(&mut self, enabled: bool) {
        self.autostart = enabled;
    }
    fn parse(text: &str) -> Result<Self, String> {
        api::definition_file::parse_network(text)
    }
}

/// One resource: its definition, whether it is active, and what the daemon keeps for it
/// while it runs (`R`).
#[derive(Debug)]
pub struct Entry<D, R> {
    pub definition: D,
    pub active: bool,
    pub record: R,
}

/// The defined resources of one kind, by name.
#[derive(Debug)]
pub struct Registry<D, R> {
    dir: PathBuf,
    entries: BTreeMap<String, Entry<D, R>>,
}

impl<D: Definition, R: Default> Registry<D, R> {
    /// Loads every `*.toml` definition under `dir` (made if missing), each inactive with a
    /// default record; a file that does not parse is logged and skipped.
    pub fn open(dir: PathBuf) -> Result<Self, DirError> {
        crate::fs::create_dir(&dir)?;
        let mut registry = Registry {
            dir,
            entries: BTreeMap::new(),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&registry.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        for path in files {
            match load::<D>(&path) {
                Ok((definition, upgraded)) => {
                    if upgraded {
                        if let Err(e) = registry.save(&definition) {
                            tracing::error!("{} {}: {}", D::KIND, definition.name(), e.message);
                        }
                    }
                    registry.insert(definition);
                }
                Err(e) => tracing::error!("skipping {} {}: {e}", D::KIND, path.display()),
            }
        }
        Ok(registry)
    }

    fn insert(&mut self, definition: D) -> &mut Entry<D, R> {
        let entry = Entry {
            definition,
            active: false,
            record: R::default(),
        };
        match self.entries.entry(entry.definition.name().to_string()) {
            Slot::Occupied(mut slot) => {
                slot.insert(entry);
                slot.into_mut()
            }
            Slot::Vacant(slot) => slot.insert(entry),
        }
    }

    /// Adds a new, inactive definition and saves it. A taken name is refused first, then
    /// whatever `check` (the resource's own rules against the others) refuses.
    pub fn define(
        &mut self,
        definition: D,
        check: impl FnOnce(&Self) -> Result<(), Failure>,
    ) -> Result<&Entry<D, R>, Failure> {
        let name = definition.name().to_string();
        if self.entries.contains_key(&name) {
            return Err(Failure::conflict(format!(
                "a {} named {name} already exists",
                D::KIND
            )));
        }
        check(self)?;
        self.save(&definition)?;
        Ok(self.insert(definition))
    }

    /// Saves and takes a new definition of an existing `name`; the entry keeps its state and
    /// record (what the change means for an active one is the resource's to say).
    pub fn replace(&mut self, definition: D) -> Result<&mut Entry<D, R>, Failure> {
        self.get(definition.name())?;
        self.save(&definition)?;
        let entry = self.get_mut(definition.name())?;
        entry.definition = definition;
        Ok(entry)
    }

    /// Removes an inactive definition, its file first.
    pub fn undefine(&mut self, name: &str) -> Result<Entry<D, R>, Failure> {
        if self.get(name)?.active {
            return Err(Failure::conflict(format!(
                "{} {name} is {}; {}",
                D::KIND,
                D::ACTIVE,
                D::STOP_FIRST
            )));
        }
        let path = self.path(name);
        std::fs::remove_file(&path)
            .map_err(|e| Failure::internal(format!("cannot remove {}: {e}", path.display())))?;
        self.entries
            .remove(name)
            .ok_or_else(|| not_found::<D>(name))
    }

    /// Saves and takes the new autostart setting of `name`.
    pub fn set_autostart(
        &mut self,
        name: &str,
        enabled: bool,
    ) -> Result<&mut Entry<D, R>, Failure> {
        let mut definition = self.get(name)?.definition.clone();
        definition.set_autostart(enabled);
        self.save(&definition)?;
        let entry = self.get_mut(name)?;
        entry.definition = definition;
        Ok(entry)
    }

    /// The entry of `name`, inactive, to be started: refused when it is active already.
    pub fn inactive(&mut self, name: &str) -> Result<&mut Entry<D, R>, Failure> {
        let entry = self.get_mut(name)?;
        if entry.active {
            return Err(Failure::conflict(format!(
                "{} {name} is already {}",
                D::KIND,
                D::ACTIVE
            )));
        }
        Ok(entry)
    }

    /// The entry of `name`, active, to be stopped: refused when it is not.
    pub fn active(&mut self, name: &str) -> Result<&mut Entry<D, R>, Failure> {
        let entry = self.get_mut(name)?;
        if !entry.active {
            return Err(Failure::conflict(format!(
                "{} {name} is not {}",
                D::KIND,
                D::ACTIVE
            )));
        }
        Ok(entry)
    }

    pub fn get(&self, name: &str) -> Result<&Entry<D, R>, Failure> {
        self.entries.get(name).ok_or_else(|| not_found::<D>(name))
    }

    pub fn get_mut(&mut self, name: &str) -> Result<&mut Entry<D, R>, Failure> {
        self.entries
            .get_mut(name)
            .ok_or_else(|| not_found::<D>(name))
    }

    /// Every entry, by name.
    pub fn entries(&self) -> &BTreeMap<String, Entry<D, R>> {
        &self.entries
    }

    /// Every entry, by name, to change their state and records (a definition is added or
    /// removed only through [`Self::define`] and [`Self::undefine`], which keep the files).
    pub fn entries_mut(&mut self) -> &mut BTreeMap<String, Entry<D, R>> {
        &mut self.entries
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.toml"))
    }

    fn save(&self, definition: &D) -> Result<(), Failure> {
        let text =
            toml::to_string_pretty(definition).map_err(|e| Failure::internal(e.to_string()))?;
        write_atomic(&self.path(definition.name()), text.as_bytes())
            .map_err(|e| Failure::internal(chain(&e)))
    }
}

/// Reads the definition file `path`, upgraded; the name inside must be the file's.
fn load<D: Definition>(path: &std::path::Path) -> Result<(D, bool), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut definition = D::parse(&text)?;
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if definition.name() != stem {
        return Err(format!("names the {} {:?}", D::KIND, definition.name()));
    }
    let upgraded = definition.upgrade();
    Ok((definition, upgraded))
}

/// The answer about a name nothing of kind `D` has.
pub fn not_found<D: Definition>(name: &str) -> Failure {
    Failure::not_found(format!("no {} named {name:?}", D::KIND))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Kind;

    fn pool(name: &str) -> PoolDefinition {
        api::definition_file::parse_pool(&format!("name = \"{name}\"\npath = \"/srv/{name}\"\n"))
            .unwrap()
    }

    type Pools = Registry<PoolDefinition, ()>;

    #[test]
    fn definitions_survive_a_reopen_with_their_autostart() {
        let dir = tempfile::tempdir().unwrap();
        let mut pools = Pools::open(dir.path().join("pools")).unwrap();
        pools.define(pool("a"), |_| Ok(())).unwrap();
        pools.define(pool("b"), |_| Ok(())).unwrap();
        pools.set_autostart("b", true).unwrap();
        std::fs::write(dir.path().join("pools/broken.toml"), "name = 3").unwrap();
        let again = Pools::open(dir.path().join("pools")).unwrap();
        let names: Vec<&String> = again.entries().keys().collect();
        assert_eq!(names, ["a", "b"]);
        assert!(!again.get("a").unwrap().definition.autostart);
        assert!(again.get("b").unwrap().definition.autostart);
        assert!(again.entries().values().all(|e| !e.active));
    }

    #[test]
    fn each_step_is_refused_in_the_wrong_state_with_the_kinds_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut pools = Pools::open(dir.path().to_path_buf()).unwrap();
        pools.define(pool("a"), |_| Ok(())).unwrap();
        let err = pools.define(pool("a"), |_| Ok(())).unwrap_err();
        assert_eq!(err.message, "a pool named a already exists");
        let err = pools
            .define(pool("c"), |_| Err(Failure::conflict("clash")))
            .unwrap_err();
        assert_eq!(err.message, "clash");
        assert!(!dir.path().join("c.toml").exists());
        let err = pools.active("a").unwrap_err();
        assert_eq!(
            (err.kind, err.message.as_str()),
            (Kind::Conflict, "pool a is not active")
        );
        pools.inactive("a").unwrap().active = true;
        let err = pools.inactive("a").unwrap_err();
        assert_eq!(err.message, "pool a is already active");
        let err = pools.undefine("a").unwrap_err();
        assert_eq!(err.message, "pool a is active; stop it first");
        pools.active("a").unwrap().active = false;
        pools.undefine("a").unwrap();
        assert!(!dir.path().join("a.toml").exists());
        let err = pools.undefine("a").unwrap_err();
        assert_eq!(
            (err.kind, err.message.as_str()),
            (Kind::NotFound, "no pool named \"a\"")
        );
    }
}
