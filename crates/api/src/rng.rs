//! How fast a guest may take entropy from its virtio-rng device, as users write it:
//! `ferro run --rng bytes_per_sec=N,period_ms=M`, or `rng_bytes_per_sec` and `rng_period_ms`
//! in a VM definition. Without a limit, a guest reading /dev/hwrng in a loop keeps a host core
//! busy; the default is far above what a guest's kernel asks for (a few dozen bytes now and
//! then).

use crate::options::{OptionError, Options};

/// Entropy a guest may take per second unless told otherwise.
pub const DEFAULT_RNG_BYTES_PER_SEC: u64 = 256 << 10;
/// How often the budget is handed out unless told otherwise (a tenth of the rate each time).
pub const DEFAULT_RNG_PERIOD_MS: u32 = 100;
/// Longest period.
pub const MAX_RNG_PERIOD_MS: u32 = 60_000;

/// The rate limit of virtio-rng; an absent value takes its default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RngOptions {
    pub bytes_per_sec: Option<u64>,
    pub period_ms: Option<u32>,
}

impl RngOptions {
    /// Bytes per second, the default applied.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec.unwrap_or(DEFAULT_RNG_BYTES_PER_SEC)
    }

    /// The period in milliseconds, the default applied.
    pub fn period_ms(&self) -> u32 {
        self.period_ms.unwrap_or(DEFAULT_RNG_PERIOD_MS)
    }

    /// Part of [`crate::VmConfig::validate`], the one check of a VM.
    pub(crate) fn validate(&self) -> Result<(), OptionError> {
        if self.bytes_per_sec == Some(0) {
            return Err(OptionError::Invalid {
                key: "bytes_per_sec".into(),
                message: "must be at least 1 (a large value allows more)".into(),
            });
        }
        if let Some(period) = self.period_ms {
            if !(1..=MAX_RNG_PERIOD_MS).contains(&period) {
                return Err(OptionError::Invalid {
                    key: "period_ms".into(),
                    message: format!("{period} is not between 1 and {MAX_RNG_PERIOD_MS}"),
                });
            }
        }
        Ok(())
    }

    /// The `--rng` option string that parses back into these options (empty for defaults).
    pub fn to_option_string(&self) -> String {
        let mut parts = Vec::new();
        if let Some(rate) = self.bytes_per_sec {
            parts.push(format!("bytes_per_sec={rate}"));
        }
        if let Some(period) = self.period_ms {
            parts.push(format!("period_ms={period}"));
        }
        parts.join(",")
    }
}

fn number<T: std::str::FromStr>(
    o: &mut Options,
    key: &'static str,
    what: &str,
) -> Result<Option<T>, OptionError> {
    match o.take(key) {
        None => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| OptionError::Invalid {
            key: key.into(),
            message: format!("{text:?} is not {what}"),
        }),
    }
}

impl std::str::FromStr for RngOptions {
    type Err = OptionError;

    /// `[bytes_per_sec=N][,period_ms=M]`; empty for the defaults.
    fn from_str(s: &str) -> Result<Self, OptionError> {
        if s.is_empty() {
            return Ok(RngOptions::default());
        }
        let mut o = Options::parse(s, &["bytes_per_sec", "period_ms"])?;
        let options = RngOptions {
            bytes_per_sec: number(&mut o, "bytes_per_sec", "a number of bytes")?,
            period_ms: number(&mut o, "period_ms", "a number of milliseconds")?,
        };
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_with_defaults_and_survive_the_option_string() {
        let defaults: RngOptions = "".parse().unwrap();
        assert_eq!(defaults, RngOptions::default());
        assert_eq!(
            (defaults.bytes_per_sec(), defaults.period_ms()),
            (256 << 10, 100)
        );
        assert_eq!(defaults.to_option_string(), "");
        let set: RngOptions = "bytes_per_sec=4096,period_ms=1000".parse().unwrap();
        assert_eq!((set.bytes_per_sec(), set.period_ms()), (4096, 1000));
        assert_eq!(set.to_option_string().parse::<RngOptions>().unwrap(), set);
        let rate: RngOptions = "bytes_per_sec=1".parse().unwrap();
        assert_eq!(rate.to_option_string(), "bytes_per_sec=1");
    }

    #[test]
    fn bad_options_say_which_and_why() {
        for (text, wanted) in [
            (
                "bytes_per_sec=0",
                "option bytes_per_sec: must be at least 1",
            ),
            ("bytes_per_sec=1M", "\"1M\" is not a number of bytes"),
            ("period_ms=0", "0 is not between 1 and 60000"),
            ("period_ms=60001", "60001 is not between 1 and 60000"),
            ("rate=5", "unknown option \"rate\""),
            ("on", "expected key=value"),
        ] {
            // Values are refused by the VM's one validation, which calls `validate`.
            let err = match text.parse::<RngOptions>() {
                Ok(options) => options.validate().unwrap_err(),
                Err(e) => e,
            };
            assert!(err.to_string().contains(wanted), "{text}: {err}");
        }
    }
}
