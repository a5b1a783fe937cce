//! Logging a guest can drive, bounded in rate and size, so a hostile guest cannot fill the
//! host's disk through the VMM's or dnsmasq's logs.
//!
//! - `guest_error!`, `guest_warn!`, `guest_info!`, `guest_debug!`, `guest_trace!`: `tracing`'s
//!   macros for events a guest can cause (a bad register write, a malformed request, an I/O
//!   error of its disk). Each call site logs at most [`LINES_PER_WINDOW`] lines per
//!   [`WINDOW_MS`]; the first line after some were dropped carries `dropped=N`. The budget is
//!   only spent on lines the subscriber wants, and checking it takes no lock.
//! - [`RotatingLog`] and friends ([`rotating`]): log files capped by size.
//!
//! Events a guest cannot repeat at will (setup, the host's own failures) use `tracing`
//! directly.
//!
//! Threading: the macros run on any thread (vCPU, device workers); see [`limit`] and
//! [`rotating`].

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

pub mod limit;
pub mod rotating;

pub use limit::{now_ms, Admit, CallSiteLimit, LINES_PER_WINDOW, WINDOW_MS};
pub use rotating::{
    backup_path, move_log, shift_backups, LogLimits, RotatingLog, SharedLog, SharedLogWriter,
};

#[doc(hidden)]
pub mod __private {
    pub use tracing;
}

/// A `tracing` event at `$level`, rate-limited per call site (see the crate documentation).
#[doc(hidden)]
#[macro_export]
macro_rules! __guest_event {
    ($level:expr, $($arg:tt)+) => {{
        if $crate::__private::tracing::enabled!($level) {
            static LIMIT: $crate::CallSiteLimit = $crate::CallSiteLimit::new();
            match LIMIT.admit($crate::now_ms()) {
                $crate::Admit::Log { dropped: 0 } => {
                    $crate::__private::tracing::event!($level, $($arg)+)
                }
                $crate::Admit::Log { dropped } => {
                    $crate::__private::tracing::event!($level, dropped, $($arg)+)
                }
                $crate::Admit::Drop => {}
            }
        }
    }};
}

/// `tracing::error!` for events a guest can cause, rate-limited per call site.
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => { $crate::__guest_event!($crate::__private::tracing::Level::ERROR, $($arg)+) };
}

/// `tracing::warn!` for events a guest can cause, rate-limited per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => { $crate::__guest_event!($crate::__private::tracing::Level::WARN, $($arg)+) };
}

/// `tracing::info!` for events a guest can cause, rate-limited per call site.
#[macro_export]
macro_rules! guest_info {
    ($($arg:tt)+) => { $crate::__guest_event!($crate::__private::tracing::Level::INFO, $($arg)+) };
}

/// `tracing::debug!` for events a guest can cause, rate-limited per call site.
#[macro_export]
macro_rules! guest_debug {
    ($($arg:tt)+) => { $crate::__guest_event!($crate::__private::tracing::Level::DEBUG, $($arg)+) };
}

/// `tracing::trace!` for events a guest can cause, rate-limited per call site.
#[macro_export]
macro_rules! guest_trace {
    ($($arg:tt)+) => { $crate::__guest_event!($crate::__private::tracing::Level::TRACE, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use crate::limit::fake_clock;
    use crate::{LINES_PER_WINDOW, WINDOW_MS};

    /// What a subscriber at `level` prints while `f` runs on this thread.
    fn captured(level: tracing::Level, f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(level)
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_string).collect()
    }

    fn bad_status(old: u8, new: u8) {
        guest_warn!("driver tried to clear status bits ({old:#x} -> {new:#x})");
    }

    #[test]
    fn a_burst_of_1000_gives_the_budget_then_a_line_with_the_dropped_count() {
        fake_clock::set(1_000);
        let lines = captured(tracing::Level::WARN, || {
            for i in 0..1000 {
                bad_status(0xf, i as u8);
            }
        });
        assert_eq!(lines.len(), LINES_PER_WINDOW as usize, "{lines:#?}");
        assert!(lines[0].starts_with(" WARN driver tried to clear status bits (0xf -> 0x0)"));
        // The window passes: lines flow again and the first says how many were dropped.
        fake_clock::set(1_000 + WINDOW_MS);
        let lines = captured(tracing::Level::WARN, || {
            bad_status(0xf, 0x1);
            bad_status(0xf, 0x2);
        });
        assert_eq!(
            lines,
            [
                " WARN driver tried to clear status bits (0xf -> 0x1) dropped=990",
                " WARN driver tried to clear status bits (0xf -> 0x2)",
            ]
        );
    }

    #[test]
    fn call_sites_have_budgets_of_their_own_and_fields_pass_through() {
        fake_clock::set(0);
        let lines = captured(tracing::Level::DEBUG, || {
            for _ in 0..100 {
                guest_error!(device = 3, "first");
                guest_debug!("second {}", 2);
            }
        });
        let count = |text: &str| lines.iter().filter(|l| l.contains(text)).count();
        assert_eq!(count("ERROR first device=3"), LINES_PER_WINDOW as usize);
        assert_eq!(count("DEBUG second 2"), LINES_PER_WINDOW as usize);
    }

    #[test]
    fn lines_the_subscriber_does_not_want_spend_no_budget() {
        fake_clock::set(0);
        let site = |n: u32| {
            for _ in 0..n {
                guest_info!("hidden unless -v");
            }
        };
        assert!(captured(tracing::Level::WARN, || site(100)).is_empty());
        let lines = captured(tracing::Level::INFO, || site(3));
        assert_eq!(lines, [" INFO hidden unless -v"; 3], "no dropped= either");
    }
}
