//! Facts about the machine the agent runs on: fingerprint, hostname, os and arch as the
//! server names them.

use sha2::{Digest, Sha256};

/// A stable fingerprint derived from the machine id. The id itself is hashed, since
/// machine ids are meant to stay private to the machine.
pub(crate) fn fingerprint() -> anyhow::Result<String> {
    Ok(fingerprint_of(&crate::platform::machine_id::read()?))
}

fn fingerprint_of(machine_id: &str) -> String {
    hex::encode(Sha256::digest(
        format!("drover-agent:{machine_id}").as_bytes(),
    ))
}

pub(crate) fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

pub(crate) fn os() -> &'static str {
    match std::env::consts::OS {
        "macos" => "macos",
        "windows" => "windows",
        _ => "linux",
    }
}

pub(crate) fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        "x86_64" => "amd64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_a_stable_hash_not_the_machine_id() {
        let a = fingerprint_of("0123456789abcdef");
        assert_eq!(a, fingerprint_of("0123456789abcdef"));
        assert_ne!(a, fingerprint_of("0123456789abcdee"));
        assert!(!a.contains("0123456789abcdef"));
        assert_eq!(a.len(), 64);
    }
}
