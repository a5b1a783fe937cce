//! `key=value,key=value` option strings, as QEMU and Cloud Hypervisor take them for devices
//! (`--disk path=a.img,readonly=on`). A literal comma in a value is written `,,`.

use std::collections::BTreeMap;

/// Why an option string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("expected key=value, got {0:?}")]
    NotKeyValue(String),
    #[error("unknown option {key:?} (known: {known})")]
    Unknown { key: String, known: String },
    #[error("option {0:?} is given twice")]
    Duplicate(String),
    #[error("missing option {0:?}")]
    Missing(&'static str),
    #[error("option {key}: expected on or off, got {value:?}")]
    NotBool { key: String, value: String },
    #[error("option {key}: {message}")]
    Invalid { key: String, message: String },
}

/// Parsed options; every key must be taken, or [`Options::finish`] complains.
#[derive(Debug)]
pub struct Options {
    values: BTreeMap<String, String>,
    known: &'static [&'static str],
}

/// Writes `value` for an option string (a comma becomes `,,`).
pub fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn split_unescaped(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                current.push(',');
            }
            ',' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts
}

impl Options {
    /// Parses `text`, accepting only the keys in `known`.
    pub fn parse(text: &str, known: &'static [&'static str]) -> Result<Self, OptionError> {
        let mut values = BTreeMap::new();
        for part in split_unescaped(text) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| OptionError::NotKeyValue(part.clone()))?;
            if !known.contains(&key) {
                return Err(OptionError::Unknown {
                    key: key.to_string(),
                    known: known.join(", "),
                });
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(OptionError::Duplicate(key.to_string()));
            }
        }
        Ok(Options { values, known })
    }

    pub fn take(&mut self, key: &'static str) -> Option<String> {
        debug_assert!(self.known.contains(&key));
        self.values.remove(key)
    }

    pub fn required(&mut self, key: &'static str) -> Result<String, OptionError> {
        self.take(key).ok_or(OptionError::Missing(key))
    }

    /// `on`/`off` (also `true`/`false`, `yes`/`no`, `1`/`0`); absent is `default`.
    pub fn flag(&mut self, key: &'static str, default: bool) -> Result<bool, OptionError> {
        match self.take(key) {
            None => Ok(default),
            Some(value) => match value.as_str() {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => Err(OptionError::NotBool {
                    key: key.to_string(),
                    value,
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &[&str] = &["path", "readonly", "serial"];

    #[test]
    fn parses_and_takes_values() {
        let mut o = Options::parse("path=/a,,b.img,readonly=on", KEYS).unwrap();
        assert_eq!(o.required("path").unwrap(), "/a,b.img");
        assert!(o.flag("readonly", false).unwrap());
        assert!(!o.flag("serial", false).unwrap());
        assert_eq!(o.required("serial"), Err(OptionError::Missing("serial")));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            Options::parse("path", KEYS),
            Err(OptionError::NotKeyValue(_))
        ));
        assert!(matches!(
            Options::parse("size=1", KEYS),
            Err(OptionError::Unknown { .. })
        ));
        assert!(matches!(
            Options::parse("path=a,path=b", KEYS),
            Err(OptionError::Duplicate(_))
        ));
        let mut o = Options::parse("readonly=maybe", KEYS).unwrap();
        assert!(matches!(
            o.flag("readonly", false),
            Err(OptionError::NotBool { .. })
        ));
    }
}
