//! Linux network interface names: the one check every crate uses, and whether one exists.
//! Pure functions; any thread.

/// Longest name the kernel takes (IFNAMSIZ less the terminating NUL).
pub const MAX_LEN: usize = libc::IFNAMSIZ - 1;

/// A name the kernel would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid interface name (1 to 15 characters, no '/', ':' or whitespace)")]
pub struct InvalidName(pub String);

/// Whether `name` is a valid interface name, by the kernel's rules (`dev_valid_name`).
pub fn valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_LEN
        && name != "."
        && name != ".."
        && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
}

/// [`valid`] as a Result that names the bad name.
pub fn check(name: &str) -> Result<(), InvalidName> {
    if valid(name) {
        Ok(())
    } else {
        Err(InvalidName(name.to_string()))
    }
}

/// Whether interface `name` exists in the calling thread's network namespace.
pub fn exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a NUL-terminated string that outlives the call, which only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernel_rules() {
        for good in ["tap0", "ferro-vm1-0", "a", "fifteen-chars-x"] {
            assert!(valid(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "sixteen-chars-xx",
            "../etc",
            "tap 0",
            "eth0:1",
            "a\tb",
        ] {
            assert!(!valid(bad), "{bad:?}");
        }
        assert_eq!(
            check("a/b").unwrap_err().to_string(),
            "\"a/b\" is not a valid interface name (1 to 15 characters, no '/', ':' or whitespace)"
        );
    }

    #[test]
    fn loopback_exists_and_nonsense_does_not() {
        assert!(exists("lo"));
        assert!(!exists("ferro-none9"));
        assert!(!exists("nul\0byte"));
    }
}
