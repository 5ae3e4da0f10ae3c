//! Installing a new build without ever leaving a broken executable where the service
//! manager looks for one. The executable (`<exe>`, what the service manager starts,
//! which runs the supervisor) is not touched while a new build is on probation: the new
//! build waits as `<exe>.next` and runs from there. Only once it has proved itself is it
//! promoted over `<exe>` (`platform::durable::replace_running_executable`), the previous
//! one kept as `<exe>.prev`. A power cut at any moment therefore boots the old, proven
//! supervisor, which resumes the probation. Where replacing `<exe>` leaves a moment
//! without one (Windows), the service manager is pointed at `<exe>.next` for that time
//! (`service::start_from`).

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::atomic_file::{parent, sync_dir};
use crate::platform::{durable, permissions};

pub(crate) fn previous_path(exe: &Path) -> PathBuf {
    with_suffix(exe, ".prev")
}

/// Where a new build runs from during its probation.
pub(crate) fn next_path(exe: &Path) -> PathBuf {
    with_suffix(exe, ".next")
}

/// Where `<exe>.next` goes once promoted, on Windows, where it may still be running.
fn retired_path(exe: &Path) -> PathBuf {
    with_suffix(exe, ".retired")
}

/// The installed executable for the one running: the new supervisor a service manager
/// started from `<exe>.next` (Windows, handed over to) installs itself as `<exe>`.
pub(crate) fn installed_path(running: PathBuf) -> PathBuf {
    match running.to_str().and_then(|path| path.strip_suffix(".next")) {
        Some(installed) => PathBuf::from(installed),
        None => running,
    }
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

/// Places the verified build at `<exe>.next`, executable, durably. On failure (a full
/// disk, say) the half-written copy is removed and the executable is untouched.
pub(crate) fn stage(exe: &Path, verified: &Path) -> anyhow::Result<()> {
    let next = next_path(exe);
    let incoming = with_suffix(exe, ".next.tmp");
    let copied = copy_durably(verified, &incoming);
    if copied.is_err() {
        if let Err(err) = std::fs::remove_file(&incoming)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!(%err, "could not remove {}", incoming.display());
        }
        return copied;
    }
    durable::rename(&incoming, &next)
        .with_context(|| format!("while placing {}", next.display()))?;
    sync_dir(parent(exe))
}

/// Copies `from` to `to`, executable, and flushes the copy to disk.
fn copy_durably(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .and_then(|_| permissions::make_executable(to))
        .and_then(|()| durable::sync_file(to))
        .with_context(|| format!("while copying the new build to {}", to.display()))
}

/// Makes the proven `<exe>.next` the executable, keeping the current one as
/// `<exe>.prev`. Idempotent: after a completed promotion there is no `<exe>.next`.
/// Meanwhile the service manager, if it starts this agent, starts `<exe>.next`, which
/// exists until `<exe>` holds the same build.
pub(crate) fn promote(exe: &Path) -> anyhow::Result<()> {
    let next = next_path(exe);
    if !next.exists() {
        return Ok(());
    }
    let pointed = crate::service::start_from(&next)?;
    durable::replace_running_executable(&next, exe, &previous_path(exe))
        .with_context(|| format!("while installing {}", exe.display()))?;
    sync_dir(parent(exe))?;
    if pointed {
        crate::service::start_from(exe)?;
    }
    durable::finish_replacing(&next, &retired_path(exe))
        .with_context(|| format!("while retiring {}", next.display()))?;
    sync_dir(parent(exe))
}

/// Removes what an earlier promotion left because it was running then.
pub(crate) fn sweep(exe: &Path) {
    let _ = std::fs::remove_file(retired_path(exe));
}

/// Drops a build that failed its probation; the executable was never touched.
pub(crate) fn discard(exe: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(next_path(exe)) {
        Ok(()) => sync_dir(parent(exe)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_leaves_the_executable_alone_and_promotion_keeps_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("drover-agent");
        let verified = dir.path().join("verified");
        std::fs::write(&exe, b"old").unwrap();
        std::fs::write(&verified, b"new").unwrap();

        stage(&exe, &verified).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"old");
        assert_eq!(std::fs::read(next_path(&exe)).unwrap(), b"new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(next_path(&exe))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755);
        }

        promote(&exe).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"new");
        assert_eq!(std::fs::read(previous_path(&exe)).unwrap(), b"old");
        assert!(!next_path(&exe).exists());
        promote(&exe).unwrap();
        assert_eq!(
            std::fs::read(&exe).unwrap(),
            b"new",
            "promotion is idempotent"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_full_disk_while_staging_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("drover-agent");
        let verified = dir.path().join("verified");
        std::fs::write(&exe, b"old").unwrap();
        std::fs::write(&verified, b"new").unwrap();
        // Every write to /dev/full fails with ENOSPC, as on a full disk.
        std::os::unix::fs::symlink("/dev/full", with_suffix(&exe, ".next.tmp")).unwrap();

        let err = format!("{:#}", stage(&exe, &verified).unwrap_err());
        assert!(err.contains("No space left on device"), "{err}");
        assert!(err.contains("while copying the new build"), "{err}");
        assert_eq!(std::fs::read(&exe).unwrap(), b"old");
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(left, ["drover-agent", "verified"]);
    }

    #[test]
    fn a_discarded_build_leaves_the_executable_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("drover-agent");
        std::fs::write(&exe, b"old").unwrap();
        std::fs::write(next_path(&exe), b"bad").unwrap();
        discard(&exe).unwrap();
        discard(&exe).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"old");
        assert!(!next_path(&exe).exists());
    }

    #[test]
    fn a_supervisor_started_from_the_next_build_installs_itself_as_the_executable() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["drover-agent.exe", "drover-agent"] {
            let exe = dir.path().join(name);
            assert_eq!(installed_path(next_path(&exe)), exe);
            assert_eq!(installed_path(exe.clone()), exe);
        }
    }

    /// Windows replaces the running executable with a copy; a kill between its two
    /// moves leaves no executable, and promoting again completes it, keeping the old
    /// build as the previous one.
    #[test]
    fn a_promotion_interrupted_between_its_moves_completes() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("drover-agent");
        std::fs::write(previous_path(&exe), b"old").unwrap();
        std::fs::write(next_path(&exe), b"new").unwrap();
        if cfg!(windows) {
            // The first move done, the copy written, the second move not.
            std::fs::write(with_suffix(&exe, ".incoming"), b"new").unwrap();
        } else {
            // Unix never leaves this state (one rename), but recovers from it alike.
            std::fs::write(&exe, b"old").unwrap();
        }
        promote(&exe).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), b"new");
        assert_eq!(std::fs::read(previous_path(&exe)).unwrap(), b"old");
        assert!(!next_path(&exe).exists());
        sweep(&exe);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["drover-agent", "drover-agent.prev"]);
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
