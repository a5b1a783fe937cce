//! Users and groups: looking a group up by name and giving a file to a group. Any thread
//! (getgrnam_r keeps its data in the caller's buffer).

use std::ffi::CString;
use std::io;
use std::path::Path;

/// A group lookup or ownership change that failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("group name {0:?} holds a NUL byte")]
    BadName(String),
    #[error("cannot look up group {name}")]
    Lookup {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot give {path} to group {gid}")]
    Chown {
        path: String,
        gid: u32,
        #[source]
        source: io::Error,
    },
}

/// The id of group `name`; None when there is no such group.
pub fn group_id(name: &str) -> Result<Option<u32>, UserError> {
    let c_name = CString::new(name).map_err(|_| UserError::BadName(name.to_string()))?;
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: group is plain data (integers and pointers), filled by getgrnam_r below.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: a NUL-terminated name, and `group`, `buf` (of the length passed) and `found`
        // as out-parameters, all living across the call; the strings it writes point into `buf`,
        // of which only gr_gid (a plain integer) is read.
        let ret = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        match ret {
            0 if found.is_null() => return Ok(None),
            0 => return Ok(Some(group.gr_gid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            _ => {
                return Err(UserError::Lookup {
                    name: name.to_string(),
                    source: io::Error::from_raw_os_error(ret),
                })
            }
        }
    }
}

/// Gives `path` to group `gid`, keeping its owner.
pub fn set_group(path: &Path, gid: u32) -> Result<(), UserError> {
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| UserError::Chown {
        path: path.display().to_string(),
        gid,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn root_is_group_zero_and_nonsense_is_no_group() {
        assert_eq!(group_id("root").unwrap(), Some(0));
        assert_eq!(group_id("ferro-no-such-group").unwrap(), None);
        assert!(matches!(group_id("a\0b"), Err(UserError::BadName(_))));
    }

    #[test]
    fn a_file_changes_group_and_keeps_its_owner() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let before = file.path().metadata().unwrap();
        set_group(file.path(), before.gid()).unwrap();
        let after = file.path().metadata().unwrap();
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        let err = set_group(Path::new("/nonexistent/x"), 0).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x"), "{err}");
    }
}
