//! Identifiers and ordered counters.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} characters long, the limit is {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} contains {ch:?} at position {pos}; allowed are {allowed}")]
    BadChar {
        what: &'static str,
        ch: char,
        pos: usize,
        allowed: &'static str,
    },
    #[error("{what} {id:?} is only dots, which reads as a path component in URLs and file names")]
    OnlyDots { what: &'static str, id: String },
}

fn validate(
    s: &str,
    what: &'static str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if let Some((pos, ch)) = s.chars().enumerate().find(|(_, c)| !ok(*c)) {
        return Err(IdError::BadChar {
            what,
            ch,
            pos,
            allowed,
        });
    }
    if s.len() > max {
        return Err(IdError::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    // `.` and `..` (and any run of dots) would name a directory in a URL
    // path or a file name: ambiguous everywhere ids are used.
    if s.chars().all(|c| c == '.') {
        return Err(IdError::OnlyDots {
            what,
            id: s.to_string(),
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr, $allowed:literal, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Maximum length in characters.
            pub const MAX_LEN: usize = $max;

            /// Validates and wraps `s`.
            ///
            /// # Errors
            /// When `s` is empty, too long or has a character outside the allowed set.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate(&s, $what, $max, $allowed, $ok)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

fn device_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

fn region_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

string_id!(
    /// A device's identity: 1–128 characters of `[A-Za-z0-9._:-]`, case-sensitive.
    /// It is also the MQTT client id and username, so it never contains `/`, `+` or `#`.
    DeviceId, "device_id", 128, "[A-Za-z0-9._:-]", device_char
);

string_id!(
    /// A region's name (`eu-west`, `a`): 1–64 characters of `[A-Za-z0-9._-]`.
    Region, "region", 64, "[A-Za-z0-9._-]", region_char
);

macro_rules! counter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            pub const ZERO: Self = Self(0);

            pub fn get(self) -> u64 {
                self.0
            }

            /// The next value; saturates instead of wrapping.
            #[must_use]
            pub fn next(self) -> Self {
                Self(self.0.saturating_add(1))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map(Self)
            }
        }
    };
}

counter!(
    /// The fencing epoch: raised by one on every promotion (compare-and-set), so
    /// a hub that sees a higher epoch than its own knows it has been replaced.
    Epoch
);
counter!(
    /// A record's position in one partition of the event log; dense from 0 and
    /// identical in both regions for the replicated prefix.
    Offset
);
counter!(
    /// A device's message sequence number, strictly increasing per device and
    /// persisted by the agent so it never repeats after a reboot.
    Mid
);

/// A partition of the event log, `0..P`.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_accepts_the_documented_alphabet() {
        for ok in ["a", "dev-1", "A.b_c:d-e", &"x".repeat(128)] {
            assert!(DeviceId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn device_id_rejects_with_a_precise_reason() {
        assert_eq!(
            DeviceId::new("").unwrap_err(),
            IdError::Empty { what: "device_id" }
        );
        assert!(matches!(
            DeviceId::new("x".repeat(129)).unwrap_err(),
            IdError::TooLong { len: 129, .. }
        ));
        for (bad, ch, pos) in [
            ("a/b", '/', 1),
            ("+", '+', 0),
            ("ab#", '#', 2),
            ("é", 'é', 0),
        ] {
            assert_eq!(
                DeviceId::new(bad).unwrap_err(),
                IdError::BadChar {
                    what: "device_id",
                    ch,
                    pos,
                    allowed: "[A-Za-z0-9._:-]"
                },
                "{bad}"
            );
        }
        for dots in [".", "..", "..."] {
            let e = DeviceId::new(dots).unwrap_err();
            assert!(matches!(e, IdError::OnlyDots { .. }), "{dots}: {e}");
            assert!(Region::new(dots).is_err(), "{dots}");
        }
        assert!(DeviceId::new(".a").is_ok() && DeviceId::new("a..b").is_ok());
        let msg = DeviceId::new("a b").unwrap_err().to_string();
        assert_eq!(
            msg,
            "device_id contains ' ' at position 1; allowed are [A-Za-z0-9._:-]"
        );
    }

    #[test]
    fn ids_deserialize_through_validation() {
        assert!(serde_json::from_str::<DeviceId>("\"ok\"").is_ok());
        let err = serde_json::from_str::<DeviceId>("\"no/way\"").unwrap_err();
        assert!(err.to_string().contains("'/'"), "{err}");
        assert!(serde_json::from_str::<Region>("\"a:b\"").is_err());
    }

    #[test]
    fn counters_order_and_serialize_as_numbers() {
        assert!(Epoch(2) > Epoch(1));
        assert_eq!(serde_json::to_string(&Offset(7)).unwrap(), "7");
        assert_eq!(Mid(u64::MAX).next(), Mid(u64::MAX));
    }
}
