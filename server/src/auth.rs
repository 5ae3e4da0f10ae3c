//! Secrets and tokens: generation, hashing (only hashes are stored) and the bearer check
//! for the REST API.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A new random secret with a readable prefix, e.g. `drv_adm_3f9c...`.
pub(crate) fn generate_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// SHA-256 hex of a token or agent secret. The inputs are long random strings, so a fast
/// hash is enough: there is nothing to brute-force.
pub(crate) fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Compares two hashes without an early exit.
pub(crate) fn hashes_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_unique_and_prefixed() {
        let a = generate_secret("drv_adm_");
        let b = generate_secret("drv_adm_");
        assert_ne!(a, b);
        assert!(a.starts_with("drv_adm_"));
        assert_eq!(a.len(), "drv_adm_".len() + 48);
    }

    #[test]
    fn hashes_compare() {
        let h = hash_secret("x");
        assert!(hashes_equal(&h, &hash_secret("x")));
        assert!(!hashes_equal(&h, &hash_secret("y")));
        assert!(!hashes_equal(&h, &h[1..]));
    }
}
