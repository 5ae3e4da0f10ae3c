//! Durable renames. On Unix a rename is made durable by an fsync of its directory
//! (`sync_dir`); Windows has no directory fsync, so a rename there is
//! `MoveFileExW(MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH)`, which returns once
//! the move is on disk, and `sync_dir` has nothing left to do. File contents are flushed
//! by `File::sync_all` on both (fsync, or `FlushFileBuffers`).

use std::io;
use std::path::Path;

pub(crate) use imp::{finish_replacing, rename, replace_running_executable, sync_dir};

/// Flushes a file's contents to disk. Opened for writing: `FlushFileBuffers` refuses a
/// read-only handle.
pub(crate) fn sync_file(path: &Path) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .sync_all()
}

#[cfg(unix)]
mod imp {
    use super::*;

    /// Atomically replaces `to` with `from`; durable once `sync_dir` of the directory
    /// returns.
    pub(crate) fn rename(from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    /// Makes renames, creations and removals in `dir` durable.
    pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir).and_then(|d| d.sync_all())
    }

    /// Puts `new` in the place of the executable `exe` (which may be running), keeping
    /// the current one as `previous`. `previous` first becomes a second name of the
    /// current executable (a hard link, or a copy), then one atomic rename puts `new` in
    /// place: a kill leaves the old executable or the new one.
    pub(crate) fn replace_running_executable(
        new: &Path,
        exe: &Path,
        previous: &Path,
    ) -> io::Result<()> {
        let mut staging = previous.as_os_str().to_owned();
        staging.push(".tmp");
        let staging = std::path::PathBuf::from(staging);
        let _ = std::fs::remove_file(&staging);
        if std::fs::hard_link(exe, &staging).is_err() {
            // Filesystems without hard links get a copy.
            let copied = std::fs::copy(exe, &staging).and_then(|_| super::sync_file(&staging));
            if copied.is_err() {
                let _ = std::fs::remove_file(&staging);
            }
            copied?;
        }
        std::fs::rename(&staging, previous)?;
        std::fs::rename(new, exe)
    }

    /// Nothing is left: the rename consumed `new`.
    pub(crate) fn finish_replacing(_new: &Path, _retired: &Path) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(windows)]
#[allow(unsafe_code)]
mod imp {
    use std::os::windows::ffi::OsStrExt;

    use windows_sys::Win32::Storage::FileSystem::{
        MOVEFILE_REPLACE_EXISTING, MOVEFILE_WRITE_THROUGH, MoveFileExW,
    };

    use super::*;

    fn wide(path: &Path) -> Vec<u16> {
        path.as_os_str().encode_wide().chain(Some(0)).collect()
    }

    /// Atomically replaces `to` with `from`, on disk when this returns.
    pub(crate) fn rename(from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (wide(from), wide(to));
        // SAFETY: both are NUL-terminated UTF-16 strings that outlive the call.
        let moved = unsafe {
            MoveFileExW(
                from.as_ptr(),
                to.as_ptr(),
                MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH,
            )
        };
        if moved == 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Nothing to do: every rename is write-through, and NTFS journals creations and
    /// removals (a removal lost to a power cut only leaves a file the journal handles).
    pub(crate) fn sync_dir(_dir: &Path) -> io::Result<()> {
        Ok(())
    }

    /// Puts a copy of `new` in the place of the running executable `exe`. Windows cannot
    /// replace or delete a running image, but it can rename it: the copy is written and
    /// flushed beside `exe`, the running `exe` moves aside to `previous` (replacing the
    /// copy kept there), then the copy moves in, both moves write-through. `new` stays
    /// until `finish_replacing`, so that whatever the service manager starts meanwhile
    /// (`service::start_from`) exists at every moment. Idempotent: when `exe` already
    /// holds `new`'s bytes nothing moves, and when a kill left no `exe` between the two
    /// moves, `previous` is kept and the copy moves in.
    pub(crate) fn replace_running_executable(
        new: &Path,
        exe: &Path,
        previous: &Path,
    ) -> io::Result<()> {
        let digest = |path: &Path| crate::install::sha256_file(path).ok();
        if exe.exists() && digest(exe).is_some_and(|held| Some(held) == digest(new)) {
            return Ok(());
        }
        let mut incoming = exe.as_os_str().to_owned();
        incoming.push(".incoming");
        let incoming = std::path::PathBuf::from(incoming);
        let copied = std::fs::copy(new, &incoming).and_then(|_| super::sync_file(&incoming));
        if copied.is_err() {
            let _ = std::fs::remove_file(&incoming);
        }
        copied?;
        if exe.exists() {
            rename(exe, previous)?;
        }
        if let Err(err) = rename(&incoming, exe) {
            // Put the old executable back rather than leave none.
            let _ = rename(previous, exe);
            return Err(err);
        }
        Ok(())
    }

    /// Moves `new` (which may be running: the new supervisor starts from it) out of the
    /// way to `retired`, and removes that if nothing runs it; the supervisor removes it
    /// at its next start otherwise.
    pub(crate) fn finish_replacing(new: &Path, retired: &Path) -> io::Result<()> {
        match rename(new, retired) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err),
        }
        let _ = std::fs::remove_file(retired);
        Ok(())
    }
}
