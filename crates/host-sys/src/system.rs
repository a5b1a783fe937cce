//! Host constants the kernel reports (sysconf): clock ticks and page size. Any thread.

/// Clock ticks per second, the unit of /proc CPU times.
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// The page size in bytes, the unit of /proc memory figures.
pub fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_what_linux_reports() {
        assert!(clock_ticks_per_second() >= 100);
        assert!(page_size().is_power_of_two() && page_size() >= 4096);
    }
}
