//! Byte sizes as users write them: `512M`, `2G`, `1536MiB`. A bare number is MiB for memory
//! (as QEMU's `-m` reads it) and bytes for images and volumes (as qemu-img and virsh read it):
//! [`ByteSize::parse_disk_size`], and [`disk_size`] for the API's volume sizes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseSizeError {
    #[error("empty size")]
    Empty,
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix")]
    Invalid(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

impl ByteSize {
    pub const KIB: u64 = 1 << 10;
    pub const MIB: u64 = 1 << 20;
    pub const GIB: u64 = 1 << 30;
    pub const TIB: u64 = 1 << 40;

    pub fn mib(n: u64) -> Self {
        ByteSize(n * Self::MIB)
    }

    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl ByteSize {
    /// Parses a disk size as qemu-img reads one: like [`FromStr`], but a bare number is in
    /// bytes.
    pub fn parse_disk_size(s: &str) -> Result<Self, ParseSizeError> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(ByteSize)
                .map_err(|_| ParseSizeError::Overflow(s.to_string()));
        }
        s.parse()
    }
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ParseSizeError::Empty);
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, suffix) = s.split_at(split);
        let invalid = || ParseSizeError::Invalid(s.to_string());
        let number: u64 = digits.parse().map_err(|_| invalid())?;
        let unit = match suffix.trim().to_ascii_lowercase().as_str() {
            "" | "m" | "mb" | "mib" => Self::MIB,
            "b" => 1,
            "k" | "kb" | "kib" => Self::KIB,
            "g" | "gb" | "gib" => Self::GIB,
            "t" | "tb" | "tib" => Self::TIB,
            _ => return Err(invalid()),
        };
        number
            .checked_mul(unit)
            .map(ByteSize)
            .ok_or_else(|| ParseSizeError::Overflow(s.to_string()))
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly (`512M`, `1536M`, `2G`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, suffix) in [
            (Self::TIB, "T"),
            (Self::GIB, "G"),
            (Self::MIB, "M"),
            (Self::KIB, "K"),
        ] {
            if self.0 >= unit && self.0.is_multiple_of(unit) {
                return write!(f, "{}{suffix}", self.0 / unit);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Serde `deserialize_with` for image and volume sizes: a bare number is bytes.
pub mod disk_size {
    use super::ByteSize;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        let text = String::deserialize(deserializer)?;
        ByteSize::parse_disk_size(&text).map_err(serde::de::Error::custom)
    }

    /// The same for an optional size.
    pub mod option {
        use super::ByteSize;
        use serde::{Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<ByteSize>, D::Error> {
            Option::<String>::deserialize(deserializer)?
                .map(|text| ByteSize::parse_disk_size(&text).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_sizes_read_bare_numbers_as_bytes() {
        assert_eq!(ByteSize::parse_disk_size("1048576"), Ok(ByteSize(1 << 20)));
        assert_eq!(ByteSize::parse_disk_size("10G"), Ok(ByteSize(10 << 30)));
        assert!(ByteSize::parse_disk_size("99999999999999999999999").is_err());
        assert!(ByteSize::parse_disk_size("-1").is_err());
    }

    #[test]
    fn parses_suffixes_and_bare_mebibytes() {
        let cases = [
            ("512M", 512 << 20),
            ("512", 512 << 20),
            ("2G", 2 << 30),
            ("2gib", 2 << 30),
            ("1536 MiB", 1536 << 20),
            ("64K", 64 << 10),
            ("1T", 1 << 40),
            ("4096B", 4096),
        ];
        for (text, bytes) in cases {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn rejects_garbage_and_overflow() {
        assert_eq!("".parse::<ByteSize>(), Err(ParseSizeError::Empty));
        assert!(matches!(
            "12Q".parse::<ByteSize>(),
            Err(ParseSizeError::Invalid(_))
        ));
        assert!(matches!(
            "-1G".parse::<ByteSize>(),
            Err(ParseSizeError::Invalid(_))
        ));
        assert!(matches!(
            "G".parse::<ByteSize>(),
            Err(ParseSizeError::Invalid(_))
        ));
        assert!(matches!(
            "1.5G".parse::<ByteSize>(),
            Err(ParseSizeError::Invalid(_))
        ));
        assert!(matches!(
            "99999999999T".parse::<ByteSize>(),
            Err(ParseSizeError::Overflow(_))
        ));
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(ByteSize(512 << 20).to_string(), "512M");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536M");
        assert_eq!(ByteSize(2 << 30).to_string(), "2G");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn volume_sizes_in_requests_read_bare_numbers_as_bytes() {
        #[derive(serde::Deserialize)]
        struct Request {
            #[serde(with = "disk_size")]
            size: ByteSize,
            #[serde(default, with = "disk_size::option")]
            other: Option<ByteSize>,
        }
        let r: Request = serde_json::from_str(r#"{"size": "1048576", "other": "2G"}"#).unwrap();
        assert_eq!(
            (r.size, r.other),
            (ByteSize(1 << 20), Some(ByteSize(2 << 30)))
        );
        let r: Request = serde_json::from_str(r#"{"size": "512M"}"#).unwrap();
        assert_eq!((r.size, r.other), (ByteSize(512 << 20), None));
        assert!(serde_json::from_str::<Request>(r#"{"size": "x"}"#).is_err());
    }

    #[test]
    fn serializes_as_a_string() {
        let json = serde_json::to_string(&ByteSize(2 << 30)).unwrap();
        assert_eq!(json, "\"2G\"");
        let back: ByteSize = serde_json::from_str("\"768M\"").unwrap();
        assert_eq!(back, ByteSize(768 << 20));
        assert!(serde_json::from_str::<ByteSize>("\"lots\"").is_err());
    }
}
