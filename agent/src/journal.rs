//! The update journal: `update.json` in the state directory records which step of an
//! update the agent reached, so that whatever kills it, the next start knows whether to
//! resume, finish, undo or report. Written atomically at every step. A final step keeps
//! the failure class, so a result reported after a restart says whose fault it was.

use std::path::{Path, PathBuf};

use anyhow::Context;
use protocol::{CompressedBuild, DeltaBuild, FailureClass, Transfer};
use serde::{Deserialize, Serialize};

const FILE: &str = "update.json";

/// Steps in the order an update goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Step {
    /// Bytes are arriving in `staging/<task>.part`; resumable.
    Downloading,
    /// `staging/<task>.verified` holds the checked build.
    Verified,
    /// The new build is being placed at `<exe>.next`; the executable is untouched.
    Installing,
    /// The new build is at `<exe>.next` and runs from there on probation.
    Probation,
    /// The new version's worker connected and heartbeated; its supervisor has yet to
    /// take over. Nothing is reported yet.
    Committed,
    /// The old supervisor has handed over to the new build's supervisor (exec, Unix),
    /// which takes over by promoting itself; if it stops first, the old one, started
    /// again, reverts.
    HandOver,
    /// The new executable is in place and its supervisor runs: the update is done, to be
    /// reported, then cleared.
    Promoted,
    /// Not installed; `reason` says why. Reported, then cleared.
    Failed,
    /// Installed, did not prove itself, and the previous executable is back.
    Reverted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Journal {
    pub(crate) task_id: String,
    pub(crate) version: String,
    pub(crate) previous_version: String,
    pub(crate) url: String,
    /// The same build on a mirror, tried first.
    #[serde(default)]
    pub(crate) mirror_url: Option<String>,
    /// How the build reaches the agent: unknown while the mirror is being tried; the
    /// server (with why the mirror was given up) or the mirror once decided. From the
    /// server, `kind` says whether the delta (resumed at `staging/<task>.delta.part`),
    /// the compressed copy (at `staging/<task>.zst.part`) or, once those were given up
    /// on, the build is being fetched.
    #[serde(default)]
    pub(crate) transfer: Option<Transfer>,
    /// The server's compressed copy of the build, when the update offered one this
    /// agent reads and no mirror.
    #[serde(default)]
    pub(crate) compressed: Option<CompressedBuild>,
    /// A delta from the build this agent runs, when the update offered one this agent
    /// reads and no mirror.
    #[serde(default)]
    pub(crate) delta: Option<DeltaBuild>,
    pub(crate) sha256: String,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) signature: Option<String>,
    #[serde(default)]
    pub(crate) rollback: bool,
    pub(crate) step: Step,
    #[serde(default)]
    pub(crate) reason: Option<String>,
    /// The class of a `Failed` or `Reverted` update; absent from journals written
    /// before classes existed.
    #[serde(default)]
    pub(crate) failure_class: Option<FailureClass>,
    /// The release counter of a verified signature; recorded as the last installed once
    /// the build has passed probation.
    #[serde(default)]
    pub(crate) counter: Option<u64>,
}

impl Journal {
    /// Records a new step durably.
    pub(crate) fn advance(&mut self, state_dir: &Path, step: Step) -> anyhow::Result<()> {
        self.step = step;
        save(state_dir, self)
    }

    /// Ends the update with a failure still to be reported.
    pub(crate) fn end(
        &mut self,
        state_dir: &Path,
        step: Step,
        reason: &str,
        class: FailureClass,
    ) -> anyhow::Result<()> {
        self.reason = Some(reason.to_owned());
        self.failure_class = Some(class);
        self.advance(state_dir, step)
    }
}

pub(crate) fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

pub(crate) fn staging_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("staging")
}

pub(crate) fn partial_path(state_dir: &Path, task_id: &str) -> PathBuf {
    staging_dir(state_dir).join(format!("{}.part", file_safe(task_id)))
}

/// Where the compressed copy is downloaded to, before it is decompressed into the
/// `partial_path`.
pub(crate) fn compressed_path(state_dir: &Path, task_id: &str) -> PathBuf {
    staging_dir(state_dir).join(format!("{}.zst.part", file_safe(task_id)))
}

/// Where the delta is downloaded to, before it is applied into the `partial_path`.
pub(crate) fn delta_path(state_dir: &Path, task_id: &str) -> PathBuf {
    staging_dir(state_dir).join(format!("{}.delta.part", file_safe(task_id)))
}

pub(crate) fn verified_path(state_dir: &Path, task_id: &str) -> PathBuf {
    staging_dir(state_dir).join(format!("{}.verified", file_safe(task_id)))
}

/// Task ids come from the server; keep them from naming paths elsewhere.
fn file_safe(task_id: &str) -> String {
    task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The journal, or `None` when no update is under way. An unreadable journal is moved
/// aside rather than trusted; the installed executable is always startable regardless.
pub(crate) fn load(state_dir: &Path) -> anyhow::Result<Option<Journal>> {
    let path = path(state_dir);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("while reading {}", path.display())),
    };
    match serde_json::from_slice(&text) {
        Ok(journal) => Ok(Some(journal)),
        Err(err) => {
            let aside = path.with_extension("json.corrupt");
            tracing::error!(%err, "the update journal is unreadable; moving it to {}", aside.display());
            crate::platform::durable::rename(&path, &aside)?;
            crate::atomic_file::sync_dir(state_dir)?;
            Ok(None)
        }
    }
}

/// Writes the journal durably. A step records what already happened in the staging
/// area (`Verified`: the download was renamed there), so that directory is synced
/// first: the journal never points at a file a power cut could take back.
pub(crate) fn save(state_dir: &Path, journal: &Journal) -> anyhow::Result<()> {
    let staging = staging_dir(state_dir);
    if staging.is_dir() {
        crate::atomic_file::sync_dir(&staging)?;
    }
    let text = serde_json::to_vec_pretty(journal)?;
    crate::atomic_file::write(&path(state_dir), &text)
}

/// Clears the staging area and then the journal once an outcome is reported: the staged
/// bytes serve nothing once the outcome is known, and with the journal gone last, no
/// journal means no staging area left behind.
pub(crate) fn clear(state_dir: &Path) -> anyhow::Result<()> {
    clear_staging(state_dir);
    match std::fs::remove_file(path(state_dir)) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err.into()),
    }
    crate::atomic_file::sync_dir(state_dir)?;
    Ok(())
}

/// Builds (by SHA-256) whose supervisor did not take over on this machine: they are
/// refused if offered again, one per line of `rejected-builds`.
const REJECTED: &str = "rejected-builds";

/// Remembers a build whose supervisor did not take over.
pub(crate) fn reject_build(state_dir: &Path, sha256: &str) -> anyhow::Result<()> {
    let path = state_dir.join(REJECTED);
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    if !text.lines().any(|line| line == sha256) {
        text.push_str(sha256);
        text.push('\n');
        crate::atomic_file::write(&path, text.as_bytes())?;
    }
    Ok(())
}

/// Whether this build's supervisor did not take over here before.
pub(crate) fn is_rejected(state_dir: &Path, sha256: &str) -> bool {
    std::fs::read_to_string(state_dir.join(REJECTED))
        .map(|text| text.lines().any(|line| line.eq_ignore_ascii_case(sha256)))
        .unwrap_or(false)
}

/// Removes staged downloads; best effort, as leftovers only cost disk space.
pub(crate) fn clear_staging(state_dir: &Path) {
    let _ = std::fs::remove_dir_all(staging_dir(state_dir));
}

#[cfg(test)]
pub(crate) fn sample(step: Step) -> Journal {
    Journal {
        task_id: "task-1".into(),
        version: "1.1.0".into(),
        previous_version: "1.0.0".into(),
        url: "http://127.0.0.1:1/downloads/drover-agent-linux-amd64-1.1.0".into(),
        mirror_url: None,
        transfer: None,
        compressed: None,
        delta: None,
        sha256: "00".repeat(32),
        size: 3,
        signature: None,
        rollback: false,
        step,
        reason: None,
        failure_class: None,
        counter: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejected_build_is_remembered_once() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_rejected(dir.path(), "ab12"));
        reject_build(dir.path(), "ab12").unwrap();
        reject_build(dir.path(), "ab12").unwrap();
        reject_build(dir.path(), "cd34").unwrap();
        assert!(is_rejected(dir.path(), "AB12"));
        assert!(!is_rejected(dir.path(), "ef56"));
        let text = std::fs::read_to_string(dir.path().join(REJECTED)).unwrap();
        assert_eq!(text, "ab12\ncd34\n");
    }

    #[test]
    fn round_trips_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let mut journal = sample(Step::Downloading);
        save(dir.path(), &journal).unwrap();
        journal
            .end(
                dir.path(),
                Step::Failed,
                "disk full",
                FailureClass::Environment,
            )
            .unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(
            (loaded.step, loaded.reason.as_deref(), loaded.failure_class),
            (
                Step::Failed,
                Some("disk full"),
                Some(FailureClass::Environment)
            )
        );
        std::fs::create_dir_all(staging_dir(dir.path())).unwrap();
        std::fs::write(partial_path(dir.path(), "task-1"), b"abc").unwrap();
        clear(dir.path()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        assert!(!staging_dir(dir.path()).exists());
    }

    #[test]
    fn every_failure_class_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        for (step, class, text) in [
            (Step::Failed, FailureClass::Build, "\"build\""),
            (Step::Failed, FailureClass::Environment, "\"environment\""),
            (Step::Failed, FailureClass::Transient, "\"transient\""),
            (Step::Reverted, FailureClass::Build, "\"build\""),
        ] {
            let mut journal = sample(Step::Downloading);
            journal.end(dir.path(), step, "why", class).unwrap();
            let saved = std::fs::read_to_string(path(dir.path())).unwrap();
            assert!(saved.contains(text), "{saved}");
            let loaded = load(dir.path()).unwrap().unwrap();
            assert_eq!((loaded.step, loaded.failure_class), (step, Some(class)));
        }
    }

    #[test]
    fn a_journal_from_before_failure_classes_loads() {
        let dir = tempfile::tempdir().unwrap();
        // As an agent without failure classes wrote it.
        let old = r#"{
  "task_id": "task-1",
  "version": "1.1.0",
  "previous_version": "1.0.0",
  "url": "http://127.0.0.1:1/downloads/drover-agent-linux-amd64-1.1.0",
  "sha256": "0000000000000000000000000000000000000000000000000000000000000000",
  "size": 3,
  "signature": null,
  "rollback": false,
  "step": "failed",
  "reason": "download failed: the server answered 404 Not Found",
  "counter": null
}"#;
        std::fs::write(path(dir.path()), old).unwrap();
        let loaded = load(dir.path())
            .unwrap()
            .expect("an old journal is not moved aside");
        assert_eq!(loaded.step, Step::Failed);
        assert_eq!(loaded.failure_class, None);
        assert_eq!(
            loaded.reason.as_deref(),
            Some("download failed: the server answered 404 Not Found")
        );
    }

    #[test]
    fn a_corrupt_journal_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(path(dir.path()), b"{\"task_id\": ").unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        assert!(dir.path().join("update.json.corrupt").exists());
    }

    #[test]
    fn task_ids_cannot_escape_the_staging_directory() {
        let dir = Path::new("/state");
        assert_eq!(
            partial_path(dir, "../../etc/passwd"),
            Path::new("/state/staging/______etc_passwd.part")
        );
    }
}
