//! The daemon's state directory for VMs: the directory of their definitions (`vms/NAME.toml`,
//! kept by the VM [`crate::registry::Registry`]), console logs (`logs/NAME.console.log`) and
//! one runtime directory per running VM (`run/NAME/`: the VMM's API and console sockets, its
//! stderr, its process record and exit report).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Failures of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the state directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The layout of the state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Creates the directories that are missing.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let store = Store {
            root: root.to_path_buf(),
        };
        // Console logs and runtime sockets are the daemon's user's alone.
        for (dir, mode) in [
            (store.vms_dir(), 0o755),
            (store.logs_dir(), 0o700),
            (store.run_root(), 0o700),
        ] {
            fs::create_dir_all(&dir)
                .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(mode)))
                .map_err(|source| StoreError::Dir { path: dir, source })?;
        }
        Ok(store)
    }

    /// Where the VM definitions are kept, one `NAME.toml` each.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    fn run_root(&self) -> PathBuf {
        self.root.join("run")
    }

    pub fn definition_path(&self, name: &str) -> PathBuf {
        self.vms_dir().join(format!("{name}.toml"))
    }

    pub fn console_log(&self, name: &str) -> PathBuf {
        self.logs_dir().join(format!("{name}.console.log"))
    }

    /// The runtime directory of VM `name`.
    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.run_root().join(name)
    }

    /// Names of the VMs with a runtime directory.
    pub fn run_dirs(&self) -> Vec<String> {
        list_names(&self.run_root())
    }
}

/// The entries of `dir` that are VM names, sorted.
fn list_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| api::daemon_api::check_name(name).is_ok())
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_and_runtime_directories_are_the_daemons_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mode = |path: PathBuf| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.vms_dir()), 0o755);
        assert_eq!(mode(store.logs_dir()), 0o700);
        assert_eq!(mode(store.run_root()), 0o700);
        fs::create_dir(store.run_dir("web")).unwrap();
        fs::create_dir(store.run_dir("not a name")).unwrap();
        assert_eq!(store.run_dirs(), ["web"]);
    }
}
