//! The report of a system call outside a thread's filter. Under `kill`, the filter traps the
//! call (SIGSYS) instead of killing outright, so that this handler can say which call and which
//! thread kind: one line on stderr (the VMM's log) and, if a supervisor asked for one, the exit
//! report, written into a file opened at setup. Then the process dies of SIGSYS.
//!
//! The handler runs on the offending thread, under its filter, so it only uses calls every
//! filter allows (`write`, `pwrite64`, `getpid`, `gettid`, `tgkill`) and allocates nothing.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::syscall_names::NAMES;
use crate::ThreadKind;

/// The exit report's descriptor, or -1.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: i32 = 1;

thread_local! {
    /// The kind this thread was confined as, by its index in [`ThreadKind::ALL`].
    static CONFINED_AS: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Records what the calling thread is confined as, for the report.
pub(crate) fn set_current_kind(kind: ThreadKind) {
    CONFINED_AS.with(|k| k.set(Some(kind)));
}

/// The report also goes to this file (empty, opened for writing), as [`api`]'s exit report
/// JSON; the descriptor must stay open for the process's life.
pub fn report_to(fd: RawFd) {
    REPORT_FD.store(fd, Ordering::Release);
}

/// `siginfo_t` as the kernel fills it for SIGSYS (`_sigsys` in the union), x86_64.
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: usize,
    syscall: i32,
    arch: u32,
}

/// Installs the SIGSYS handler, once per process, before any filter traps.
pub(crate) fn install_handler() -> io::Result<()> {
    // SAFETY: sigaction with a zeroed struct plus handler and flags is the documented way to
    // install a handler; `on_sigsys` has the SA_SIGINFO signature and only makes
    // async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo; for SIGSYS its union holds
    // `_sigsys`, which `SigsysInfo` lays out.
    let info = unsafe { &*info.cast::<SigsysInfo>() };
    if info.code != SYS_SECCOMP {
        return;
    }
    let kind = CONFINED_AS.with(Cell::get);
    let mut message = Line::default();
    describe(&mut message, kind, info.syscall);
    let mut line = Line::default();
    line.push("ferro: error: ");
    line.push_bytes(message.bytes());
    line.push("\n");
    write_all(2, line.bytes(), None);
    let fd = REPORT_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let mut json = Line::default();
        json.push("{\"code\":159,\"outcome\":\"error\",\"error\":\"");
        json.push_bytes(message.bytes());
        json.push("\"}\n");
        write_all(fd, json.bytes(), Some(0));
    }
    // SA_RESETHAND made SIGSYS's action the default (dump and die); it is blocked while this
    // handler runs and arrives as soon as it returns.
    // SAFETY: getpid and gettid take no arguments; tgkill sends a signal to this thread.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
    }
}

/// Says which call broke which filter. Shared with the tests.
pub(crate) fn describe(line: &mut Line, kind: Option<ThreadKind>, syscall: i32) {
    line.push("seccomp: the ");
    line.push(kind.map_or("unconfined", ThreadKind::name));
    line.push(" thread made system call ");
    let name = usize::try_from(syscall)
        .ok()
        .and_then(|n| NAMES.get(n))
        .filter(|name| !name.is_empty());
    match name {
        Some(name) => {
            line.push(name);
            line.push(" (");
            line.push_number(syscall);
            line.push(")");
        }
        None => line.push_number(syscall),
    }
    line.push(", which its filter does not allow; the VMM was killed (SIGSYS)");
}

fn write_all(fd: RawFd, bytes: &[u8], offset: Option<i64>) {
    let mut done = 0;
    while done < bytes.len() {
        let rest = &bytes[done..];
        // SAFETY: `rest` is valid for reads of its length for the call's duration.
        let n = unsafe {
            match offset {
                Some(at) => libc::pwrite(fd, rest.as_ptr().cast(), rest.len(), at + done as i64),
                None => libc::write(fd, rest.as_ptr().cast(), rest.len()),
            }
        };
        match usize::try_from(n) {
            Ok(n) if n > 0 => done += n,
            _ => return,
        }
    }
}

/// A line built without allocating (the handler may not): what does not fit is cut.
pub(crate) struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    pub(crate) fn push(&mut self, text: &str) {
        self.push_bytes(text.as_bytes());
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i32) {
        if n < 0 {
            self.push("-");
        }
        let mut digits = [0u8; 10];
        let mut value = n.unsigned_abs();
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push_bytes(&digits[at..]);
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(kind: Option<ThreadKind>, syscall: i32) -> String {
        let mut line = Line::default();
        describe(&mut line, kind, syscall);
        String::from_utf8(line.bytes().to_vec()).unwrap()
    }

    #[test]
    fn the_report_names_the_call_and_the_thread_kind() {
        assert_eq!(
            described(Some(ThreadKind::Vcpu), libc::SYS_socket as i32),
            "seccomp: the vcpu thread made system call socket (41), which its filter does not \
             allow; the VMM was killed (SIGSYS)"
        );
    }

    #[test]
    fn an_unknown_number_is_printed_as_is() {
        let text = described(None, 100_000);
        assert!(
            text.contains("the unconfined thread made system call 100000,"),
            "{text}"
        );
        let text = described(Some(ThreadKind::Api), -7);
        assert!(text.contains("system call -7,"), "{text}");
    }

    #[test]
    fn a_long_line_is_cut_not_overrun() {
        let mut line = Line::default();
        for _ in 0..100 {
            line.push("0123456789");
        }
        assert_eq!(line.bytes().len(), 256);
    }
}
