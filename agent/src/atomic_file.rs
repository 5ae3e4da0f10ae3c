//! Crash-safe file replacement: temporary file in the same directory, fsync, rename,
//! fsync of the directory. A kill at any moment leaves the old content or the new.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Replaces `path` with `contents` (mode 0600, as tempfile creates files).
pub(crate) fn write(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("while creating a file in {}", dir.display()))?;
    file.write_all(contents)?;
    file.as_file().sync_all()?;
    file.persist(path)
        .with_context(|| format!("while writing {}", path.display()))?;
    sync_dir(dir)
}

/// Makes renames and removals in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("while syncing {}", dir.display()))
}
