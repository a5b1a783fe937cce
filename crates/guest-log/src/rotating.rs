//! Log files a guest can make grow, kept to a size: [`RotatingLog`] appends and rolls over to
//! `PATH.1`, `PATH.2`, ... (as libvirt's virtlogd does with console logs); [`SharedLog`] is one
//! shared between threads, as the VMM's log writer; [`shift_backups`] and [`move_log`] are the
//! renames for a file another process writes (dnsmasq's log) or one kept after the VMM ends.
//!
//! Threading: a `RotatingLog` belongs to one thread; a `SharedLog` locks it for each write
//! (callers are rate-limited before they get here).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// How big a log may grow and how many rotated files are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Size at which the file is rotated.
    pub max_bytes: u64,
    /// Rotated files kept beside the current one (`PATH.1` is the newest).
    pub backups: u32,
}

impl LogLimits {
    /// What Ferro keeps of every log a guest can fill (console, VMM, dnsmasq): 2 MiB files,
    /// three old ones, so at most 8 MiB each.
    pub const DEFAULT: LogLimits = LogLimits {
        max_bytes: 2 << 20,
        backups: 3,
    };

    /// The most the files of one log hold on disk (the current one and the backups), when
    /// every write is smaller than `max_bytes`.
    pub fn total_bytes(&self) -> u64 {
        self.max_bytes * (u64::from(self.backups) + 1)
    }
}

/// `PATH.n`.
pub fn backup_path(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Renames `path` to `path.1`, after moving the older backups up one (the oldest of `backups`
/// is overwritten). Missing backups are skipped.
pub fn shift_backups(path: &Path, backups: u32) -> io::Result<()> {
    for n in (1..backups).rev() {
        let _ = std::fs::rename(backup_path(path, n), backup_path(path, n + 1));
    }
    if backups == 0 {
        return std::fs::remove_file(path);
    }
    std::fs::rename(path, backup_path(path, 1))
}

/// Moves the log `from` and its backups to `to` (and `to.1`, ...), replacing what `to` had.
pub fn move_log(from: &Path, to: &Path, backups: u32) -> io::Result<()> {
    for n in 1..=backups {
        let _ = std::fs::remove_file(backup_path(to, n));
        let _ = std::fs::rename(backup_path(from, n), backup_path(to, n));
    }
    std::fs::rename(from, to)
}

/// An append-only log file that rolls over when it grows past its limit.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
    limits: LogLimits,
    /// The process's stderr follows the current file (see [`RotatingLog::take_stderr`]).
    stderr: bool,
}

impl RotatingLog {
    /// Opens (or creates) `path` for appending; a file already at its limit is rotated.
    pub fn open(path: &Path, limits: LogLimits) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        let mut log = RotatingLog {
            path: path.to_path_buf(),
            file,
            size,
            limits,
            stderr: false,
        };
        if size >= limits.max_bytes {
            log.rotate()?;
        }
        Ok(log)
    }

    /// Points this process's stderr at the current file, now and after every rotation, so
    /// what is printed there (a panic, the last error) lands in the log too, appended.
    pub fn take_stderr(&mut self) -> io::Result<()> {
        self.stderr = true;
        redirect_stderr(&self.file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `buf`, rotating first if it would not fit. A `buf` larger than the limit is
    /// written whole, into a file of its own.
    pub fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + buf.len() as u64 > self.limits.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        shift_backups(&self.path, self.limits.backups)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        if self.stderr {
            redirect_stderr(&self.file)?;
        }
        Ok(())
    }
}

/// Points descriptor 2 at `file`, replacing it atomically (so writes never miss).
fn redirect_stderr(file: &File) -> io::Result<()> {
    host_sys::file::redirect_stderr(file)
}

/// A [`RotatingLog`] written by several threads; [`SharedLog::writer`] hands out writers
/// (a tracing subscriber's `with_writer(move || log.writer())`).
#[derive(Debug, Clone)]
pub struct SharedLog(Arc<Mutex<RotatingLog>>);

impl SharedLog {
    pub fn new(log: RotatingLog) -> Self {
        SharedLog(Arc::new(Mutex::new(log)))
    }

    pub fn writer(&self) -> SharedLogWriter {
        SharedLogWriter(self.0.clone())
    }
}

/// Appends each write to the shared log (a tracing event is one write).
#[derive(Debug)]
pub struct SharedLogWriter(Arc<Mutex<RotatingLog>>);

impl Write for SharedLogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        log.append(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_rotates_and_keeps_three_backups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"an old boot at the limit\n").unwrap();
        let limits = LogLimits {
            max_bytes: 16,
            backups: 3,
        };
        let mut log = RotatingLog::open(&path, limits).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"", "rotated when opened");
        for i in 0..6u8 {
            log.append(&[b'0' + i; 10]).unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), [b'5'; 10]);
        assert_eq!(std::fs::read(backup_path(&path, 1)).unwrap(), [b'4'; 10]);
        assert_eq!(std::fs::read(backup_path(&path, 3)).unwrap(), [b'2'; 10]);
        assert!(
            !backup_path(&path, 4).exists(),
            "only three backups are kept"
        );
    }

    #[test]
    fn a_flood_through_shared_writers_stays_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.log");
        let limits = LogLimits {
            max_bytes: 64 << 10,
            backups: 3,
        };
        let log = SharedLog::new(RotatingLog::open(&path, limits).unwrap());
        std::thread::scope(|s| {
            for t in 0..4 {
                let mut writer = log.writer();
                s.spawn(move || {
                    for i in 0..20_000 {
                        let line = format!("thread {t} line {i}: something the guest did\n");
                        writer.write_all(line.as_bytes()).unwrap();
                    }
                });
            }
        });
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(
            on_disk <= limits.total_bytes(),
            "{on_disk} bytes on disk for a cap of {}",
            limits.total_bytes()
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
        // Whole lines only, the newest in the current file.
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.ends_with("line 19999: something the guest did\n"));
        assert!(current.lines().all(|l| l.starts_with("thread ")));
    }

    #[test]
    fn a_log_and_its_backups_move_together() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("run.log");
        let to = dir.path().join("kept.log");
        std::fs::write(&from, "now").unwrap();
        std::fs::write(backup_path(&from, 1), "before").unwrap();
        std::fs::write(backup_path(&to, 2), "an older run").unwrap();
        move_log(&from, &to, 3).unwrap();
        assert_eq!(std::fs::read_to_string(&to).unwrap(), "now");
        assert_eq!(
            std::fs::read_to_string(backup_path(&to, 1)).unwrap(),
            "before"
        );
        assert!(
            !backup_path(&to, 2).exists(),
            "the older run's backup is gone"
        );
        assert!(!from.exists());
    }
}
