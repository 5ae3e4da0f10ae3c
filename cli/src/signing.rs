//! `drover keygen` and `drover sign`: the offline release key. Neither talks to a
//! server; the private key should live on a machine that has none. The signature
//! document's format and signed bytes are defined in `protocol::release_signature`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ed25519_dalek::{Signer, SigningKey};
use protocol::release_signature::{ReleaseSignature, SignedRelease, key_id};
use sha2::{Digest, Sha256};

const OSES: [&str; 3] = ["linux", "windows", "macos"];
const ARCHES: [&str; 2] = ["amd64", "arm64"];

/// What `keygen` made.
#[derive(Debug)]
pub(crate) struct NewKey {
    pub(crate) private: PathBuf,
    pub(crate) public: PathBuf,
    pub(crate) public_hex: String,
    pub(crate) key_id: String,
}

/// Writes a new private key to `private` (mode 0600) and its public key to
/// `<private>.pub`, refusing to replace either.
pub(crate) fn keygen(private: &Path) -> anyhow::Result<NewKey> {
    let public = public_path(private);
    for path in [private, public.as_path()] {
        if path.symlink_metadata().is_ok() {
            bail!(
                "{} already exists; a key is never overwritten (move it away first)",
                path.display()
            );
        }
    }
    let mut seed = [0u8; 32];
    rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut seed)
        .context("the operating system gave no random bytes")?;
    let key = SigningKey::from_bytes(&seed);
    let public_hex = hex::encode(key.verifying_key().as_bytes());
    let id = key_id(key.verifying_key().as_bytes());

    let text = format!(
        "# drover release signing key {id}: keep it offline; agents trust its public key\nprivate-key: {}\n",
        hex::encode(seed)
    );
    write_new(private, text.as_bytes(), 0o600)?;
    if let Err(err) = write_new(&public, format!("{public_hex}\n").as_bytes(), 0o644) {
        // No private key without its public half: that would only invite a second keygen.
        let _ = std::fs::remove_file(private);
        return Err(err);
    }
    Ok(NewKey {
        private: private.to_owned(),
        public,
        public_hex,
        key_id: id,
    })
}

/// Where `keygen` puts the public key of `private`.
pub(crate) fn public_path(private: &Path) -> PathBuf {
    let mut name = private.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Creates `path` with `contents`; fails if it exists.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("while creating {}", path.display()))?;
    file.write_all(contents)?;
    file.sync_all()
        .with_context(|| format!("while writing {}", path.display()))
}

/// Reads a private key file as `keygen` writes it: `#` comment lines and one
/// `private-key: <64 hex digits>` line (the label keeps a public key from passing as one).
pub(crate) fn read_private_key(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("while reading the key {}", path.display()))?;
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'));
    let seed: Option<[u8; 32]> = match (lines.next(), lines.next()) {
        (Some(line), None) => line
            .strip_prefix("private-key:")
            .and_then(|hex| hex::decode(hex.trim()).ok())
            .and_then(|b| b.try_into().ok()),
        _ => None,
    };
    let seed = seed.with_context(|| {
        format!(
            "{} is not a private key from `drover keygen` (a `private-key:` line of 64 hex digits)",
            path.display()
        )
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The parts of a build's file name.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BuildName {
    pub(crate) os: String,
    pub(crate) arch: String,
    pub(crate) version: String,
}

/// Splits `drover-agent-{os}-{arch}-{version}[.exe]`, as the server's scanner does.
pub(crate) fn parse_build_name(name: &str) -> anyhow::Result<BuildName> {
    let shape = "drover-agent-{os}-{arch}-{version}[.exe]";
    let rest = name
        .strip_prefix("drover-agent-")
        .with_context(|| format!("{name:?} is not a build name ({shape})"))?;
    let (rest, exe) = match rest.strip_suffix(".exe") {
        Some(rest) => (rest, true),
        None => (rest, false),
    };
    let (os, rest) = rest
        .split_once('-')
        .with_context(|| format!("{name:?} is not a build name ({shape})"))?;
    let (arch, version) = rest
        .split_once('-')
        .with_context(|| format!("{name:?} is not a build name ({shape})"))?;
    if !OSES.contains(&os) {
        bail!("{name:?}: unknown os {os:?} (linux, windows or macos)");
    }
    if !ARCHES.contains(&arch) {
        bail!("{name:?}: unknown arch {arch:?} (amd64 or arm64)");
    }
    semver::Version::parse(version)
        .with_context(|| format!("{name:?}: version {version:?} is not strict semver"))?;
    if exe && os != "windows" {
        bail!("{name:?}: the .exe suffix is only for windows builds");
    }
    Ok(BuildName {
        os: os.to_owned(),
        arch: arch.to_owned(),
        version: version.to_owned(),
    })
}

/// What `sign` wrote.
#[derive(Debug)]
pub(crate) struct Signed {
    pub(crate) path: PathBuf,
    pub(crate) document: ReleaseSignature,
}

/// Signs the build at `file` and writes `<file>.sig` (by rename, so the scanner never
/// reads half a document).
pub(crate) fn sign(
    file: &Path,
    key_file: &Path,
    counter: u64,
    rollback: bool,
) -> anyhow::Result<Signed> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", file.display()))?;
    let build = parse_build_name(name)?;
    let key = read_private_key(key_file)?;
    if counter == 0 {
        bail!("the release counter starts at 1");
    }
    let sig_path = file.with_file_name(format!("{name}.sig"));
    if let Ok(text) = std::fs::read_to_string(&sig_path)
        && let Ok(existing) = ReleaseSignature::parse(&text)
        && existing.release.counter >= counter
    {
        bail!(
            "{} already has counter {}; every signature needs a larger counter than any before it",
            sig_path.display(),
            existing.release.counter
        );
    }
    let release = SignedRelease {
        key_id: key_id(key.verifying_key().as_bytes()),
        version: build.version,
        os: build.os,
        arch: build.arch,
        counter,
        rollback,
        sha256: sha256_file(file)?,
    };
    let signature = hex::encode(key.sign(&release.message()).to_bytes());
    let document = ReleaseSignature { release, signature };

    let temporary = file.with_file_name(format!(".{name}.sig.tmp"));
    let write = || -> std::io::Result<()> {
        let mut out = File::create(&temporary)?;
        out.write_all(document.render().as_bytes())?;
        out.sync_all()?;
        std::fs::rename(&temporary, &sig_path)
    };
    write()
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&temporary);
        })
        .with_context(|| format!("while writing {}", sig_path.display()))?;
    Ok(Signed {
        path: sig_path,
        document,
    })
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("while opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 256 * 1024];
    loop {
        let read = file
            .read(&mut buffer)
            .with_context(|| format!("while reading {}", path.display()))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use ed25519_dalek::{Signature, VerifyingKey};

    use super::*;

    #[test]
    fn keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("release.key");
        let key = keygen(&private).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(key.public, dir.path().join("release.key.pub"));
        let public = std::fs::read_to_string(&key.public).unwrap();
        assert_eq!(public.trim(), key.public_hex);
        let signing = read_private_key(&private).unwrap();
        assert_eq!(
            hex::encode(signing.verifying_key().as_bytes()),
            key.public_hex
        );
        assert_eq!(key.key_id, key.public_hex[..16]);

        let before = std::fs::read(&private).unwrap();
        let err = keygen(&private).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&private).unwrap(), before);

        // A stray public key alone also stops it, and no private key is left behind.
        let other = dir.path().join("other.key");
        std::fs::write(public_path(&other), "x").unwrap();
        assert!(keygen(&other).is_err());
        assert!(!other.exists());
    }

    #[test]
    fn build_names_are_checked() {
        assert_eq!(
            parse_build_name("drover-agent-linux-arm64-1.2.0-rc.1").unwrap(),
            BuildName {
                os: "linux".into(),
                arch: "arm64".into(),
                version: "1.2.0-rc.1".into()
            }
        );
        assert_eq!(
            parse_build_name("drover-agent-windows-amd64-2.0.0.exe")
                .unwrap()
                .version,
            "2.0.0"
        );
        for (name, expected) in [
            ("agent", "not a build name"),
            ("drover-agent-linux", "not a build name"),
            ("drover-agent-solaris-amd64-1.0.0", "unknown os"),
            ("drover-agent-linux-x86-1.0.0", "unknown arch"),
            ("drover-agent-linux-amd64-v1.0", "not strict semver"),
            ("drover-agent-linux-amd64-1.0.0.exe", ".exe suffix"),
        ] {
            let err = parse_build_name(name).unwrap_err().to_string();
            assert!(err.contains(expected), "{name}: {err}");
        }
    }

    #[test]
    fn sign_writes_a_document_that_verifies_over_the_build() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("release.key");
        let key = keygen(&private).unwrap();
        let build = dir.path().join("drover-agent-linux-amd64-1.4.0");
        std::fs::write(&build, b"build bytes").unwrap();

        let signed = sign(&build, &private, 4, true).unwrap();
        assert_eq!(
            signed.path,
            dir.path().join("drover-agent-linux-amd64-1.4.0.sig")
        );
        let text = std::fs::read_to_string(&signed.path).unwrap();
        let document = ReleaseSignature::parse(&text).unwrap();
        assert_eq!(document, signed.document);
        let release = &document.release;
        assert_eq!(
            (
                release.version.as_str(),
                release.os.as_str(),
                release.arch.as_str()
            ),
            ("1.4.0", "linux", "amd64")
        );
        assert_eq!((release.counter, release.rollback), (4, true));
        assert_eq!(release.sha256, hex::encode(Sha256::digest(b"build bytes")));
        assert_eq!(release.key_id, key.key_id);
        let public: [u8; 32] = hex::decode(&key.public_hex).unwrap().try_into().unwrap();
        let signature: [u8; 64] = hex::decode(&document.signature)
            .unwrap()
            .try_into()
            .unwrap();
        VerifyingKey::from_bytes(&public)
            .unwrap()
            .verify_strict(&release.message(), &Signature::from_bytes(&signature))
            .unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // A counter must grow; re-signing with a larger one replaces the document.
        let err = sign(&build, &private, 4, false).unwrap_err().to_string();
        assert!(err.contains("already has counter 4"), "{err}");
        assert_eq!(std::fs::read_to_string(&signed.path).unwrap(), text);
        assert_eq!(
            sign(&build, &private, 5, false)
                .unwrap()
                .document
                .release
                .counter,
            5
        );
    }

    #[test]
    fn sign_refuses_bad_input_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("release.key");
        keygen(&private).unwrap();
        let misnamed = dir.path().join("agent-build");
        std::fs::write(&misnamed, b"x").unwrap();
        let build = dir.path().join("drover-agent-linux-amd64-1.0.0");
        std::fs::write(&build, b"x").unwrap();
        let not_a_key = dir.path().join("not-a-key");
        std::fs::write(&not_a_key, "hello\n").unwrap();

        for (file, key, counter, expected) in [
            (&misnamed, &private, 1, "not a build name"),
            (&build, &not_a_key, 1, "not a private key"),
            (&build, &public_path(&private), 1, "not a private key"),
            (&build, &private, 0, "starts at 1"),
            (
                &dir.path().join("drover-agent-linux-amd64-9.0.0"),
                &private,
                1,
                "while opening",
            ),
        ] {
            let err = format!("{:#}", sign(file, key, counter, false).unwrap_err());
            assert!(err.contains(expected), "{err}");
        }
        let sigs = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".sig")
            })
            .count();
        assert_eq!(sigs, 0);
    }
}
