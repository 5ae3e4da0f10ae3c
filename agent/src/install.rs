//! Replacing the agent's executable. At every instant the executable path holds a complete
//! binary, old or new: the previous one is hard-linked aside (`<exe>.prev`) before the
//! new one is renamed over it, and a revert renames `<exe>.prev` back.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::atomic_file::sync_dir;

pub(crate) fn previous_path(exe: &Path) -> PathBuf {
    with_suffix(exe, ".prev")
}

fn incoming_path(exe: &Path) -> PathBuf {
    with_suffix(exe, ".new")
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Lower-case hex SHA-256 of a file, read in chunks.
pub(crate) fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("while opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Installs `verified` as `exe`, keeping the current executable as `<exe>.prev`.
pub(crate) fn install(exe: &Path, verified: &Path) -> anyhow::Result<()> {
    let dir = exe.parent().unwrap_or(Path::new("."));
    keep_previous(exe)?;
    let incoming = incoming_path(exe);
    std::fs::copy(verified, &incoming)
        .with_context(|| format!("while copying the new build to {}", incoming.display()))?;
    std::fs::set_permissions(&incoming, std::fs::Permissions::from_mode(0o755))?;
    std::fs::File::open(&incoming)?.sync_all()?;
    std::fs::rename(&incoming, exe)
        .with_context(|| format!("while installing {}", exe.display()))?;
    sync_dir(dir)
}

/// `<exe>.prev` becomes a second name of the current executable, replacing any older one.
fn keep_previous(exe: &Path) -> anyhow::Result<()> {
    let previous = previous_path(exe);
    let staging = with_suffix(exe, ".prev.tmp");
    let _ = std::fs::remove_file(&staging);
    if std::fs::hard_link(exe, &staging).is_err() {
        // Filesystems without hard links get a copy.
        std::fs::copy(exe, &staging)
            .with_context(|| format!("while keeping a copy of {}", exe.display()))?;
        std::fs::File::open(&staging)?.sync_all()?;
    }
    std::fs::rename(&staging, &previous)
        .with_context(|| format!("while keeping {}", previous.display()))?;
    Ok(())
}

/// Puts `<exe>.prev` back in place of the executable.
pub(crate) fn revert(exe: &Path) -> anyhow::Result<()> {
    let previous = previous_path(exe);
    std::fs::rename(&previous, exe).with_context(|| {
        format!(
            "while restoring {} from {}",
            exe.display(),
            previous.display()
        )
    })?;
    sync_dir(exe.parent().unwrap_or(Path::new(".")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_keeps_the_previous_binary_and_revert_restores_it() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("drover-agent");
        let staged = dir.path().join("staged");
        std::fs::write(&exe, b"old").unwrap();
        std::fs::write(&staged, b"new").unwrap();

        install(&exe, &staged).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"new");
        assert_eq!(std::fs::read(previous_path(&exe)).unwrap(), b"old");
        let mode = std::fs::metadata(&exe).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(!incoming_path(&exe).exists());

        revert(&exe).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"old");
        assert!(!previous_path(&exe).exists());
    }

    #[test]
    fn hashes_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(
            sha256_file(&file).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
