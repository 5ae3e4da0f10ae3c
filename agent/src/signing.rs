//! Release signatures on the agent: the pinned public keys, the checks an update's
//! signature document must pass (before the download, and again over the downloaded
//! bytes), and the last installed release counter kept in the state directory. The
//! document format and the signed bytes are `protocol::release_signature`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ed25519_dalek::{Signature, VerifyingKey};
use protocol::release_signature::{ReleaseSignature, SignedRelease, key_id};

/// The last installed release counter, as decimal text.
const COUNTER_FILE: &str = "release-counter";

/// The keys this agent trusts: the pinned one and, while keys are rotated, a second.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReleaseKeys {
    pub(crate) primary: VerifyingKey,
    pub(crate) secondary: Option<VerifyingKey>,
}

impl ReleaseKeys {
    fn iter(&self) -> impl Iterator<Item = &VerifyingKey> {
        std::iter::once(&self.primary).chain(self.secondary.as_ref())
    }

    fn ids(&self) -> String {
        self.iter()
            .map(|key| key_id(key.as_bytes()))
            .collect::<Vec<_>>()
            .join(" and ")
    }
}

/// Parses a hex ed25519 public key.
pub(crate) fn parse_public_key(text: &str) -> anyhow::Result<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("a public key must be 32 hex-encoded bytes (the .pub file of `drover keygen`)")?;
    VerifyingKey::from_bytes(&bytes).context("not a valid ed25519 public key")
}

/// What a signature must match besides the keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected<'a> {
    /// The version the update installs.
    pub(crate) version: &'a str,
    /// This agent's platform.
    pub(crate) os: &'a str,
    pub(crate) arch: &'a str,
    /// The version this agent runs.
    pub(crate) running: &'a str,
    /// The counter of the last signed build installed, if any.
    pub(crate) last_counter: Option<u64>,
}

/// Checks an update's signature document; `Err` is the refusal to report. The digest
/// is checked against the bytes later, by `check_digest`.
pub(crate) fn check(
    keys: &ReleaseKeys,
    document: Option<&str>,
    expected: &Expected<'_>,
) -> Result<SignedRelease, String> {
    let release = verified(keys, document)?;
    check_platform(&release, expected.version, expected.os, expected.arch)?;
    if let Some(last) = expected.last_counter
        && release.counter <= last
    {
        return Err(format!(
            "release counter {} is not above {last}, the last one installed: a replayed or superseded signature",
            release.counter
        ));
    }
    let forward = match (
        semver::Version::parse(&release.version),
        semver::Version::parse(expected.running),
    ) {
        (Ok(target), Ok(running)) => target > running,
        (Err(_), _) => return Err(format!("version {:?} is not semver", release.version)),
        (Ok(_), Err(_)) => true,
    };
    if !forward && !release.rollback {
        return Err(format!(
            "{} does not move forward from {} and its signature is not a rollback signature",
            release.version, expected.running
        ));
    }
    // Without the running build's counter, an old rollback signature replayed by the
    // server could not be told from a new one: no way down until the counter is known.
    if !forward && expected.last_counter.is_none() {
        return Err(format!(
            "{} is older than {}, and this agent does not know the release counter of the build it runs, so it cannot tell a new rollback signature from a replayed one (install with scripts/install.sh --public-key, or run `drover-agent record-release`)",
            release.version, expected.running
        ));
    }
    Ok(release)
}

/// Parses a signature document and verifies it with one of the trusted keys.
fn verified(keys: &ReleaseKeys, document: Option<&str>) -> Result<SignedRelease, String> {
    let document = document
        .ok_or("unsigned build: this agent installs only builds signed with its release key")?;
    let parsed = ReleaseSignature::parse(document)
        .map_err(|err| format!("the update's signature cannot be read: {err}"))?;
    let release = parsed.release;
    let key = keys
        .iter()
        .find(|key| key_id(key.as_bytes()) == release.key_id)
        .ok_or_else(|| {
            format!(
                "signed with key {}, which this agent does not trust (it trusts {})",
                release.key_id,
                keys.ids()
            )
        })?;
    let signature: [u8; 64] = hex::decode(&parsed.signature)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or("the update's signature is not 64 hex-encoded bytes")?;
    key.verify_strict(&release.message(), &Signature::from_bytes(&signature))
        .map_err(|_| {
            format!(
                "bad signature: key {} did not sign these release facts (altered or forged)",
                release.key_id
            )
        })?;
    Ok(release)
}

/// The signature must be for `version` on this platform.
fn check_platform(
    release: &SignedRelease,
    version: &str,
    os: &str,
    arch: &str,
) -> Result<(), String> {
    if release.version != version {
        return Err(format!(
            "the signature is for version {}, the build is {version}",
            release.version
        ));
    }
    if (release.os.as_str(), release.arch.as_str()) != (os, arch) {
        return Err(format!(
            "the signature is for {}/{}, this agent runs on {os}/{arch}",
            release.os, release.arch
        ));
    }
    Ok(())
}

/// A build being installed, as `record_release` checks it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InstalledBuild<'a> {
    pub(crate) version: &'a str,
    /// This machine's platform.
    pub(crate) os: &'a str,
    pub(crate) arch: &'a str,
    /// SHA-256 of the build's bytes, hex.
    pub(crate) digest: &'a str,
}

/// At install: checks the installed build's signature document against the build and
/// records its counter, so the agent knows from its first start which signatures are
/// replays. A build older than one this state directory already recorded is refused
/// (a downgrade at install).
pub(crate) fn record_release(
    keys: &ReleaseKeys,
    state_dir: &Path,
    document: &str,
    build: &InstalledBuild<'_>,
) -> anyhow::Result<u64> {
    let version = build.version;
    let release = verified(keys, Some(document))
        .and_then(|release| {
            check_platform(&release, version, build.os, build.arch).map(|()| release)
        })
        .and_then(|release| check_digest(&release, build.digest).map(|()| release))
        .map_err(anyhow::Error::msg)?;
    if let Some(last) = last_counter(state_dir)?
        && release.counter < last
    {
        anyhow::bail!(
            "this machine already ran a build signed with release counter {last}; {version} carries {}: an older build is not installed over it",
            release.counter
        );
    }
    record_counter(state_dir, release.counter)?;
    Ok(release.counter)
}

/// The downloaded bytes must be the signed ones.
pub(crate) fn check_digest(release: &SignedRelease, digest: &str) -> Result<(), String> {
    if release.sha256.eq_ignore_ascii_case(digest) {
        Ok(())
    } else {
        Err(format!(
            "the build hashes to {digest}, the signature is for {}: not the signed bytes",
            release.sha256
        ))
    }
}

fn counter_path(state_dir: &Path) -> PathBuf {
    state_dir.join(COUNTER_FILE)
}

/// The counter of the last signed build installed; `None` before the first. A file that
/// cannot be read is an error, never a fresh start: that would re-admit old signatures.
pub(crate) fn last_counter(state_dir: &Path) -> anyhow::Result<Option<u64>> {
    let path = counter_path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(err).with_context(|| format!("while reading {}", path.display()));
        }
    };
    let counter = text.trim().parse::<u64>().with_context(|| {
        format!(
            "{} does not hold a release counter ({:?}); signed updates are refused until it holds the last installed counter",
            path.display(),
            text.chars().take(40).collect::<String>()
        )
    })?;
    Ok(Some(counter))
}

/// Records `counter` as installed (crash-safe); a smaller one than the stored counter
/// changes nothing.
pub(crate) fn record_counter(state_dir: &Path, counter: u64) -> anyhow::Result<()> {
    if last_counter(state_dir)?.is_some_and(|last| last >= counter) {
        return Ok(());
    }
    crate::atomic_file::write(&counter_path(state_dir), format!("{counter}\n").as_bytes())
}

/// Called once a signed build has passed probation. A failure is logged, not raised:
/// the build is proven either way, and only the replay protection is weaker until the
/// next signed update records its counter.
pub(crate) fn record_installed(state_dir: &Path, counter: Option<u64>) {
    let Some(counter) = counter else {
        return;
    };
    match record_counter(state_dir, counter) {
        Ok(()) => tracing::info!(counter, "recorded the installed release counter"),
        Err(err) => {
            tracing::error!(counter, error = %format!("{err:#}"), "could not record the installed release counter")
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use ed25519_dalek::{Signer, SigningKey};

    use super::*;

    pub(crate) const DIGEST: &str =
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    pub(crate) fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    pub(crate) fn keys() -> ReleaseKeys {
        ReleaseKeys {
            primary: key(1).verifying_key(),
            secondary: None,
        }
    }

    pub(crate) fn release(version: &str, counter: u64, rollback: bool) -> SignedRelease {
        SignedRelease {
            key_id: key_id(key(1).verifying_key().as_bytes()),
            version: version.into(),
            os: "linux".into(),
            arch: "amd64".into(),
            counter,
            rollback,
            sha256: DIGEST.into(),
        }
    }

    pub(crate) fn sign_with(signer: &SigningKey, release: SignedRelease) -> String {
        let signature = hex::encode(signer.sign(&release.message()).to_bytes());
        ReleaseSignature { release, signature }.render()
    }

    pub(crate) fn signed(version: &str, counter: u64, rollback: bool) -> String {
        sign_with(&key(1), release(version, counter, rollback))
    }

    const EXPECTED: Expected<'static> = Expected {
        version: "1.2.0",
        os: "linux",
        arch: "amd64",
        running: "1.1.0",
        last_counter: Some(5),
    };

    #[test]
    fn a_well_signed_update_passes() {
        let release = check(&keys(), Some(&signed("1.2.0", 6, false)), &EXPECTED).unwrap();
        assert_eq!(release.counter, 6);
        assert_eq!(check_digest(&release, &DIGEST.to_ascii_uppercase()), Ok(()));
        let first = Expected {
            last_counter: None,
            ..EXPECTED
        };
        assert!(check(&keys(), Some(&signed("1.2.0", 1, false)), &first).is_ok());
    }

    #[test]
    fn each_refusal_says_why() {
        let stranger = key(9);
        let mut other_platform = release("1.2.0", 6, false);
        other_platform.arch = "arm64".into();
        let other_version = release("1.3.0", 6, false);
        // A document whose facts were edited after signing: here the arch, as a server
        // would to pass an arm64 signature off as an amd64 one.
        let edited = sign_with(&key(1), other_platform.clone()).replace("arm64", "amd64");
        let mut by_stranger = release("1.2.0", 6, false);
        by_stranger.key_id = key_id(stranger.verifying_key().as_bytes());
        // A stranger claiming the trusted key id.
        let forged = sign_with(&stranger, release("1.2.0", 6, false));

        let cases: Vec<(Option<String>, Expected<'_>, &str)> = vec![
            (None, EXPECTED, "unsigned build"),
            (Some("ab".repeat(64)), EXPECTED, "old format"),
            (Some("garbage".into()), EXPECTED, "cannot be read"),
            (
                Some(sign_with(&stranger, by_stranger)),
                EXPECTED,
                "does not trust",
            ),
            (Some(forged), EXPECTED, "bad signature"),
            (Some(edited), EXPECTED, "bad signature"),
            (
                Some(sign_with(&key(1), other_platform)),
                EXPECTED,
                "is for linux/arm64, this agent runs on linux/amd64",
            ),
            (
                Some(sign_with(&key(1), other_version)),
                EXPECTED,
                "is for version 1.3.0, the build is 1.2.0",
            ),
            (
                Some(signed("1.2.0", 5, false)),
                EXPECTED,
                "counter 5 is not above 5",
            ),
            (
                Some(signed("1.2.0", 2, true)),
                EXPECTED,
                "counter 2 is not above 5",
            ),
            (
                Some(signed("1.0.0", 6, false)),
                Expected {
                    version: "1.0.0",
                    ..EXPECTED
                },
                "not a rollback signature",
            ),
            (
                Some(signed("1.1.0", 6, false)),
                Expected {
                    version: "1.1.0",
                    ..EXPECTED
                },
                "not a rollback signature",
            ),
        ];
        for (document, expected, reason) in cases {
            let err = check(&keys(), document.as_deref(), &expected).unwrap_err();
            assert!(err.contains(reason), "{document:?}: {err}");
        }
    }

    #[test]
    fn a_rollback_signature_with_a_new_counter_allows_a_downgrade() {
        let expected = Expected {
            version: "1.0.0",
            ..EXPECTED
        };
        let release = check(&keys(), Some(&signed("1.0.0", 6, true)), &expected).unwrap();
        assert!(release.rollback);
    }

    #[test]
    fn without_a_known_counter_no_signature_leads_down() {
        let unknown = Expected {
            version: "1.0.0",
            last_counter: None,
            ..EXPECTED
        };
        let err = check(&keys(), Some(&signed("1.0.0", 99, true)), &unknown).unwrap_err();
        assert!(err.contains("does not know the release counter"), "{err}");
        // Forward is as before, rollback-signed or not.
        let forward = Expected {
            last_counter: None,
            ..EXPECTED
        };
        assert!(check(&keys(), Some(&signed("1.2.0", 3, true)), &forward).is_ok());
    }

    #[test]
    fn an_installed_build_records_its_counter_and_no_older_one_is_installed_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let build = InstalledBuild {
            version: "1.2.0",
            os: "linux",
            arch: "amd64",
            digest: DIGEST,
        };
        let document = signed("1.2.0", 16, false);
        assert_eq!(
            record_release(&keys(), dir.path(), &document, &build).unwrap(),
            16
        );
        assert_eq!(last_counter(dir.path()).unwrap(), Some(16));
        // The same build again (a reinstall) is fine.
        record_release(&keys(), dir.path(), &document, &build).unwrap();

        let refusals = [
            (
                signed("1.1.0", 15, false),
                "1.1.0",
                DIGEST,
                "an older build",
            ),
            (
                signed("1.2.0", 16, false),
                "1.3.0",
                DIGEST,
                "the build is 1.3.0",
            ),
            (
                signed("1.2.0", 17, false),
                "1.2.0",
                &"00".repeat(32)[..],
                "not the signed bytes",
            ),
            (
                sign_with(&key(9), release("1.2.0", 17, false)),
                "1.2.0",
                DIGEST,
                "bad signature",
            ),
        ];
        for (document, version, digest, reason) in refusals {
            let build = InstalledBuild {
                version,
                digest,
                ..build
            };
            let err = format!(
                "{:#}",
                record_release(&keys(), dir.path(), &document, &build).unwrap_err()
            );
            assert!(err.contains(reason), "{version}: {err}");
            assert_eq!(last_counter(dir.path()).unwrap(), Some(16), "untouched");
        }
    }

    #[test]
    fn the_second_key_is_trusted_too() {
        let rotating = ReleaseKeys {
            primary: key(1).verifying_key(),
            secondary: Some(key(2).verifying_key()),
        };
        let mut by_new_key = release("1.2.0", 6, false);
        by_new_key.key_id = key_id(key(2).verifying_key().as_bytes());
        let document = sign_with(&key(2), by_new_key);
        assert!(check(&rotating, Some(&document), &EXPECTED).is_ok());
        let err = check(&keys(), Some(&document), &EXPECTED).unwrap_err();
        assert!(err.contains("does not trust"), "{err}");
    }

    #[test]
    fn other_bytes_than_the_signed_ones_are_refused() {
        let release = release("1.2.0", 6, false);
        let err = check_digest(&release, &"00".repeat(32)).unwrap_err();
        assert!(err.contains("not the signed bytes"), "{err}");
    }

    #[test]
    fn the_counter_only_grows_and_a_damaged_file_refuses_rather_than_resets() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(last_counter(dir.path()).unwrap(), None);
        record_counter(dir.path(), 4).unwrap();
        record_counter(dir.path(), 2).unwrap();
        assert_eq!(last_counter(dir.path()).unwrap(), Some(4));
        record_installed(dir.path(), Some(7));
        record_installed(dir.path(), None);
        assert_eq!(last_counter(dir.path()).unwrap(), Some(7));

        std::fs::write(counter_path(dir.path()), "seven").unwrap();
        let err = format!("{:#}", last_counter(dir.path()).unwrap_err());
        assert!(err.contains("does not hold a release counter"), "{err}");
        assert!(record_counter(dir.path(), 9).is_err());
        assert_eq!(
            std::fs::read_to_string(counter_path(dir.path())).unwrap(),
            "seven"
        );
    }

    /// PROTOCOL.md's example document is a real one: someone writing an agent from the
    /// document alone can test against it.
    #[test]
    fn the_example_in_the_protocol_document_verifies() {
        let text = include_str!("../../PROTOCOL.md");
        let section = &text[text.find("### 8.1").unwrap()..];
        let document = section.split("```").nth(1).unwrap().trim_start();
        let public = "00dbbd052e6070035ba04df19ed35951931387141fd49da4c6a70f81f0c705d7";
        assert!(section.contains(public));
        let keys = ReleaseKeys {
            primary: parse_public_key(public).unwrap(),
            secondary: None,
        };
        let expected = Expected {
            version: "1.0.0",
            os: "linux",
            arch: "amd64",
            running: "0.9.0",
            last_counter: Some(2),
        };
        let release = check(&keys, Some(document), &expected).unwrap();
        assert_eq!(release.counter, 3);
        let message = String::from_utf8(release.message()).unwrap();
        assert!(document.starts_with(&message), "{document}");
    }

    #[test]
    fn public_keys_parse_from_hex() {
        let hex = hex::encode(key(1).verifying_key().as_bytes());
        assert_eq!(
            parse_public_key(&format!(" {hex}\n")).unwrap(),
            key(1).verifying_key()
        );
        assert!(parse_public_key("abcd").is_err());
    }
}
