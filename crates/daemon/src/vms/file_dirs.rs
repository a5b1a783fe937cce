//! Where the files a VM definition names may be: under the directories the daemon was given
//! (`ferro daemon --file-dir`, `/var/lib/ferro` by default) or a pool's directory. The VMM
//! opens them as the daemon's user, so without this, anyone who may define a VM could read
//! any file on the host (`kernel = "/etc/shadow"`, then `ferro vm console`).
//!
//! Paths are compared after resolving symbolic links and `..`, at define and again at start.
//!
//! Threading: none; called with the VM table unlocked.

use std::path::{Path, PathBuf};

/// The directories given to the daemon.
#[derive(Debug, Clone)]
pub struct FileDirs {
    dirs: Vec<PathBuf>,
}

/// The default of `ferro daemon --file-dir`.
pub const DEFAULT_FILE_DIR: &str = "/var/lib/ferro";

impl FileDirs {
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        FileDirs { dirs }
    }

    /// Checks that `path` (the VM's `what`: kernel, initrd, disk...) lies under one of the
    /// daemon's directories or of `pool_dirs`.
    pub fn check(&self, what: &str, path: &Path, pool_dirs: &[PathBuf]) -> Result<(), String> {
        let resolved = path
            .canonicalize()
            .map_err(|e| format!("the {what} {}: {e}", path.display()))?;
        let inside = self
            .dirs
            .iter()
            .chain(pool_dirs)
            .filter_map(|dir| dir.canonicalize().ok())
            .any(|dir| resolved.starts_with(dir));
        if inside {
            return Ok(());
        }
        let given: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        Err(format!(
            "the {what} {} is outside the directories VM files may be in ({} and the pools' \
             directories): move it into one, or start the daemon with --file-dir DIR",
            path.display(),
            given.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, FileDirs, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("images");
        let pool = root.path().join("pool");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&pool).unwrap();
        std::fs::write(allowed.join("kernel"), b"k").unwrap();
        std::fs::write(pool.join("disk.raw"), b"d").unwrap();
        std::fs::write(root.path().join("secret"), b"s").unwrap();
        (root, FileDirs::new(vec![allowed]), pool)
    }

    #[test]
    fn files_under_a_given_directory_or_a_pool_are_allowed() {
        let (root, dirs, pool) = setup();
        let kernel = root.path().join("images/kernel");
        dirs.check("kernel", &kernel, &[]).unwrap();
        dirs.check("disk", &pool.join("disk.raw"), std::slice::from_ref(&pool))
            .unwrap();
    }

    #[test]
    fn a_file_elsewhere_is_refused_with_what_to_do() {
        let (root, dirs, pool) = setup();
        let secret = root.path().join("secret");
        let err = dirs.check("kernel", &secret, &[pool]).unwrap_err();
        assert!(err.contains("outside the directories"), "{err}");
        assert!(err.contains("--file-dir DIR"), "{err}");
        assert!(err.contains(&secret.display().to_string()), "{err}");
    }

    #[test]
    fn dot_dot_and_symbolic_links_do_not_lead_out() {
        let (root, dirs, _) = setup();
        let escape = root.path().join("images/../secret");
        assert!(dirs.check("kernel", &escape, &[]).is_err());
        let link = root.path().join("images/link");
        std::os::unix::fs::symlink(root.path().join("secret"), &link).unwrap();
        assert!(dirs.check("kernel", &link, &[]).is_err());
    }

    #[test]
    fn a_sibling_whose_name_starts_alike_is_not_inside() {
        let (root, dirs, _) = setup();
        let sibling = root.path().join("images-other");
        std::fs::create_dir(&sibling).unwrap();
        std::fs::write(sibling.join("kernel"), b"k").unwrap();
        assert!(dirs.check("kernel", &sibling.join("kernel"), &[]).is_err());
    }
}
