//! Crash-safe file replacement: temporary file in the same directory, fsync, rename,
//! fsync of the directory (a write-through move on Windows). A kill at any moment leaves the old content or the new, and
//! a failed write (a full disk, say) leaves the old content and no temporary file.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Replaces `path` with `contents`, readable by the agent only (mode 0600, as tempfile
/// creates files; on Windows an ACL of its own, set before a byte is written).
pub(crate) fn write(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = parent(path);
    // Dropped on every error path, which removes the temporary file.
    let mut file = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("while creating a file in {}", dir.display()))?;
    crate::platform::permissions::restrict_file(file.path())
        .with_context(|| format!("while restricting {}", file.path().display()))?;
    file.write_all(contents)
        .and_then(|()| file.as_file().sync_all())
        .with_context(|| format!("while writing {}", file.path().display()))?;
    // Dropping the temporary path on an error removes the file.
    let temporary = file.into_temp_path();
    crate::platform::durable::rename(&temporary, path)
        .with_context(|| format!("while writing {}", path.display()))?;
    let _ = temporary.keep();
    sync_dir(dir)
}

/// Makes renames, creations and removals in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    crate::platform::durable::sync_dir(dir)
        .with_context(|| format!("while syncing {}", dir.display()))
}

/// The directory holding `path`; `.` for a bare file name.
pub(crate) fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_the_content_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, b"one").unwrap();
        write(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_content_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A rename cannot replace a non-empty directory: the last step fails.
        let path = dir.path().join("state.json");
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("old"), b"old").unwrap();
        let err = write(&path, b"new").unwrap_err();
        assert!(format!("{err:#}").contains("while writing"), "{err:#}");
        assert_eq!(std::fs::read(path.join("old")).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = write(&dir.path().join("gone/state.json"), b"x").unwrap_err();
        assert!(
            format!("{err:#}").contains("while creating a file in"),
            "{err:#}"
        );
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(parent(Path::new("state.json")), Path::new("."));
        assert_eq!(parent(Path::new("/var/lib/x.json")), Path::new("/var/lib"));
    }
}
