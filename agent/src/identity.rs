//! The agent's identity: the id and secret the server issued at enrollment, kept in
//! `identity.json` in the state directory (mode 0600). Updates never touch it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

const FILE: &str = "identity.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) agent_id: String,
    pub(crate) secret: String,
}

pub(crate) fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The stored identity, or `None` before the first enrollment. A file that exists but
/// cannot be read is an error, never silently replaced: that would orphan the record.
pub(crate) fn load(state_dir: &Path) -> anyhow::Result<Option<Identity>> {
    let path = path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("while reading {}", path.display())),
    };
    let identity = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a valid identity file; move it away to enroll again",
            path.display()
        )
    })?;
    Ok(Some(identity))
}

/// Stores the identity atomically and privately (0600), durably: the state directory's
/// own entry is synced too, as it may have been created just before enrollment.
pub(crate) fn save(state_dir: &Path, identity: &Identity) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec_pretty(identity)?;
    text.push(b'\n');
    crate::atomic_file::write(&path(state_dir), &text)?;
    let parent = crate::atomic_file::parent(state_dir);
    if let Err(err) = crate::atomic_file::sync_dir(parent) {
        // Unreadable parents exist (a locked-down /var/lib); the file itself is durable.
        tracing::warn!(error = %format!("{err:#}"), "the state directory's entry may not be durable yet");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_privately_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let identity = Identity {
            agent_id: "a-1".into(),
            secret: "s-1".into(),
        };
        save(dir.path(), &identity).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(identity));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), "{\"agent_id\": ").unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a valid identity file"),
            "{err:#}"
        );
    }
}
