//! Release signatures: the `<build>.sig` document an offline key holder writes with
//! `drover sign`, which the server passes to agents unchanged in `update.signature`.
//! This module owns the document's format and the exact bytes that are signed, so the
//! signer and every verifier agree on them; it does no cryptography itself.
//!
//! A document (format 1) is UTF-8 text, one `key: value` per line:
//!
//! ```text
//! drover-signature 1
//! key-id: 3d4017c3e843895a
//! version: 1.2.0
//! os: linux
//! arch: amd64
//! counter: 7
//! rollback: false
//! sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
//! signature: <128 lower-case hex digits: the ed25519 signature>
//! ```
//!
//! The signature is over [`SignedRelease::message`]: the document's lines from the
//! header to `sha256`, in exactly that order and spelling, each ending in `\n`.

use std::fmt::Write as _;

/// The first line of a format-1 document.
pub const HEADER: &str = "drover-signature 1";

/// How many leading bytes of a public key make its key id (as hex).
const KEY_ID_BYTES: usize = 8;

/// The signed facts about one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRelease {
    /// [`key_id`] of the signing key: tells a verifier which of its keys to try.
    pub key_id: String,
    /// Semver of the build, as in its file name.
    pub version: String,
    pub os: String,
    pub arch: String,
    /// The release counter: every signature the key holder makes gets a larger one, and
    /// an agent never installs a counter at or below the last it installed.
    pub counter: u64,
    /// The key holder allows this build to replace a newer version (an operator's
    /// rollback, signed with a new counter).
    pub rollback: bool,
    /// Lower-case hex SHA-256 of the build's bytes.
    pub sha256: String,
}

/// A parsed `.sig` document: the signed facts and the signature over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseSignature {
    pub release: SignedRelease,
    /// Lower-case hex of the 64-byte ed25519 signature over `release.message()`.
    pub signature: String,
}

/// Why a `.sig` document cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureFormatError {
    #[error(
        "a bare hex signature in the old format; sign the build again with `drover sign` to get a signature document"
    )]
    Legacy,
    #[error("not a signature document: it should start with {HEADER:?}")]
    NotADocument,
    #[error("signature document format {0:?} is not supported (this side reads {HEADER:?})")]
    UnsupportedFormat(String),
    #[error("line {line} is not `key: value`")]
    BadLine { line: usize },
    #[error("unknown field {0:?}")]
    UnknownField(String),
    #[error("field {0:?} appears twice")]
    Duplicate(String),
    #[error("field {0:?} is missing")]
    Missing(&'static str),
    #[error("{field} {value:?} is not {expected}")]
    Invalid {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
}

const FIELDS: [&str; 8] = [
    "key-id",
    "version",
    "os",
    "arch",
    "counter",
    "rollback",
    "sha256",
    "signature",
];

/// The key id of an ed25519 public key: its first 8 bytes in lower-case hex. It only
/// picks which configured key to verify with; the verification uses the whole key.
pub fn key_id(public_key: &[u8; 32]) -> String {
    lower_hex(&public_key[..KEY_ID_BYTES])
}

impl SignedRelease {
    /// The exact bytes that are signed and verified.
    pub fn message(&self) -> Vec<u8> {
        let mut text = String::new();
        let _ = writeln!(text, "{HEADER}");
        let _ = writeln!(text, "key-id: {}", self.key_id);
        let _ = writeln!(text, "version: {}", self.version);
        let _ = writeln!(text, "os: {}", self.os);
        let _ = writeln!(text, "arch: {}", self.arch);
        let _ = writeln!(text, "counter: {}", self.counter);
        let _ = writeln!(text, "rollback: {}", self.rollback);
        let _ = writeln!(text, "sha256: {}", self.sha256);
        text.into_bytes()
    }
}

impl ReleaseSignature {
    /// The document as `drover sign` writes it.
    pub fn render(&self) -> String {
        let mut text = String::from_utf8(self.release.message()).expect("the message is text");
        let _ = writeln!(text, "signature: {}", self.signature);
        text
    }

    /// Reads a document. Lines may end in `\r\n` and carry surrounding blanks; blank
    /// lines are ignored; fields may come in any order, each exactly once. Hex is read in
    /// either case and kept in lower case, so `release.message()` is canonical whatever
    /// the document's spelling.
    pub fn parse(text: &str) -> Result<ReleaseSignature, SignatureFormatError> {
        let trimmed = text.trim();
        if trimmed.len() == 128 && trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SignatureFormatError::Legacy);
        }
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(number, line)| (number + 1, line.trim()))
            .filter(|(_, line)| !line.is_empty());
        let header = lines.next().map(|(_, line)| line).unwrap_or_default();
        if header != HEADER {
            return Err(match header.strip_prefix("drover-signature ") {
                Some(format) => SignatureFormatError::UnsupportedFormat(format.trim().to_owned()),
                None => SignatureFormatError::NotADocument,
            });
        }
        let mut values: [Option<&str>; FIELDS.len()] = [None; FIELDS.len()];
        for (line, text) in lines {
            let (key, value) = text
                .split_once(':')
                .ok_or(SignatureFormatError::BadLine { line })?;
            let (key, value) = (key.trim(), value.trim());
            let slot = FIELDS
                .iter()
                .position(|field| *field == key)
                .ok_or_else(|| SignatureFormatError::UnknownField(key.to_owned()))?;
            if values[slot].replace(value).is_some() {
                return Err(SignatureFormatError::Duplicate(key.to_owned()));
            }
        }
        let field =
            |index: usize| values[index].ok_or(SignatureFormatError::Missing(FIELDS[index]));
        let release = SignedRelease {
            key_id: hex_field("key-id", field(0)?, KEY_ID_BYTES)?,
            version: token_field("version", field(1)?, "a version", |c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+')
            })?,
            os: token_field("os", field(2)?, "an os name", |c| {
                c.is_ascii_lowercase() || c.is_ascii_digit()
            })?,
            arch: token_field("arch", field(3)?, "an arch name", |c| {
                c.is_ascii_lowercase() || c.is_ascii_digit()
            })?,
            counter: counter_field(field(4)?)?,
            rollback: match field(5)? {
                "true" => true,
                "false" => false,
                other => return Err(invalid("rollback", other, "true or false")),
            },
            sha256: hex_field("sha256", field(6)?, 32)?,
        };
        Ok(ReleaseSignature {
            release,
            signature: hex_field("signature", field(7)?, 64)?,
        })
    }
}

fn invalid(field: &'static str, value: &str, expected: &'static str) -> SignatureFormatError {
    SignatureFormatError::Invalid {
        field,
        value: value.chars().take(200).collect(),
        expected,
    }
}

/// `bytes` bytes as hex, returned in lower case.
fn hex_field(
    field: &'static str,
    value: &str,
    bytes: usize,
) -> Result<String, SignatureFormatError> {
    let expected = match bytes {
        8 => "16 hex digits",
        32 => "64 hex digits",
        _ => "128 hex digits",
    };
    if value.len() == bytes * 2 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(invalid(field, value, expected))
    }
}

fn token_field(
    field: &'static str,
    value: &str,
    expected: &'static str,
    allowed: impl Fn(char) -> bool,
) -> Result<String, SignatureFormatError> {
    if !value.is_empty() && value.len() <= 128 && value.chars().all(allowed) {
        Ok(value.to_owned())
    } else {
        Err(invalid(field, value, expected))
    }
}

/// Decimal digits only (no sign, no leading zeros), within u64.
fn counter_field(value: &str) -> Result<u64, SignatureFormatError> {
    let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    let canonical = value == "0" || !value.starts_with('0');
    match value.parse::<u64>() {
        Ok(counter) if digits && canonical => Ok(counter),
        _ => Err(invalid("counter", value, "a whole number below 2^64")),
    }
}

fn lower_hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ReleaseSignature {
        ReleaseSignature {
            release: SignedRelease {
                key_id: "3d4017c3e843895a".into(),
                version: "1.2.0-beta.1".into(),
                os: "linux".into(),
                arch: "amd64".into(),
                counter: 7,
                rollback: false,
                sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            },
            signature: "ab".repeat(64),
        }
    }

    #[test]
    fn the_signed_message_is_fixed_text() {
        let message = String::from_utf8(sample().release.message()).unwrap();
        assert_eq!(
            message,
            "drover-signature 1\n\
             key-id: 3d4017c3e843895a\n\
             version: 1.2.0-beta.1\n\
             os: linux\n\
             arch: amd64\n\
             counter: 7\n\
             rollback: false\n\
             sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n"
        );
        let mut rollback = sample().release;
        rollback.rollback = true;
        assert_ne!(rollback.message(), sample().release.message());
    }

    #[test]
    fn documents_round_trip_and_are_read_tolerantly() {
        let document = sample().render();
        assert!(document.ends_with(&format!("signature: {}\n", "ab".repeat(64))));
        assert_eq!(ReleaseSignature::parse(&document), Ok(sample()));

        // Reordered, CRLF, blanks, upper-case hex: the same facts, the same message.
        let loose = format!(
            "\r\n{HEADER}\r\nsignature: {}\r\nsha256: {}\r\n  counter : 7\r\n\r\nrollback: false\r\nos: linux\r\narch: amd64\r\nversion: 1.2.0-beta.1\r\nkey-id: 3D4017C3E843895A\r\n",
            "AB".repeat(64),
            sample().release.sha256.to_ascii_uppercase(),
        );
        let parsed = ReleaseSignature::parse(&loose).unwrap();
        assert_eq!(parsed, sample());
        assert_eq!(parsed.release.message(), sample().release.message());
    }

    #[test]
    fn bad_documents_say_what_is_wrong() {
        let good = sample().render();
        let replace = |from: &str, to: &str| good.replace(from, to);
        let cases: Vec<(String, &str)> = vec![
            ("ab".repeat(64), "old format"),
            (format!("{}\n", "AB".repeat(64)), "old format"),
            (String::new(), "should start with"),
            ("hello".into(), "should start with"),
            (replace(HEADER, "drover-signature 2"), "format \"2\""),
            (replace("os: linux", "os linux"), "line 4 is not"),
            (
                good.clone() + "channel: beta\n",
                "unknown field \"channel\"",
            ),
            (good.clone() + "counter: 8\n", "\"counter\" appears twice"),
            (replace("arch: amd64\n", ""), "\"arch\" is missing"),
            (replace("counter: 7", "counter: -1"), "counter \"-1\""),
            (replace("counter: 7", "counter: 07"), "counter \"07\""),
            (replace("counter: 7", "counter: +7"), "counter \"+7\""),
            (
                replace("counter: 7", "counter: 18446744073709551616"),
                "below 2^64",
            ),
            (replace("rollback: false", "rollback: yes"), "true or false"),
            (replace("sha256: 9f", "sha256: "), "64 hex digits"),
            (replace("key-id: 3d", "key-id: zz"), "16 hex digits"),
            (replace("os: linux", "os: Linux"), "an os name"),
            (
                replace("version: 1.2.0-beta.1", "version: 1 2"),
                "a version",
            ),
            (
                replace(&"ab".repeat(64), &"ab".repeat(63)),
                "128 hex digits",
            ),
        ];
        for (text, expected) in cases {
            let err = ReleaseSignature::parse(&text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err:?}");
        }
    }

    #[test]
    fn key_ids_are_the_first_eight_bytes_in_hex() {
        let mut key = [0u8; 32];
        key[0] = 0x3d;
        key[7] = 0x5a;
        key[8] = 0xff;
        assert_eq!(key_id(&key), "3d0000000000005a");
    }
}
