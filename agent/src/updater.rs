//! Applying one update inside the worker: journal every step, download, verify, install,
//! then hand over to the supervisor for the restart into the new version. The installed
//! executable is untouched until the build is verified.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::{Update, UpdateOutcome, UpdateProgress, UpdateResult, UpdateStage};
use tokio::sync::mpsc;

use crate::journal::{self, Journal, Step};
use crate::signing::{self, ReleaseKeys};
use crate::{download, install, machine};

/// Progress goes to the server at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What the updater tells the session.
#[derive(Debug)]
pub(crate) enum Event {
    Progress(UpdateProgress),
    /// A final outcome; once sent, the journal is cleared.
    Finished(UpdateResult),
    /// The new executable is installed: exit so the supervisor starts it.
    Restart,
}

pub(crate) struct Updater {
    pub(crate) state_dir: PathBuf,
    /// The executable to replace.
    pub(crate) exe: PathBuf,
    /// With keys, only builds signed by one of them are installed.
    pub(crate) public_key: Option<ReleaseKeys>,
    pub(crate) http: reqwest::Client,
    /// The version this process runs.
    pub(crate) running: String,
}

impl Updater {
    /// Decides whether to take on an update and journals it. `Err` carries the reason
    /// to report as a failure.
    pub(crate) fn accept(&self, update: &Update) -> Result<Journal, String> {
        let target = semver::Version::parse(&update.version)
            .map_err(|e| format!("version {:?} is not semver: {e}", update.version))?;
        let newer = semver::Version::parse(&self.running).map_or(true, |running| target > running);
        if !newer && !update.rollback {
            return Err(format!(
                "refusing {} over {}: not newer, and not a rollback",
                update.version, self.running
            ));
        }
        // Refused before a byte is downloaded; the bytes are checked after.
        let counter = match &self.public_key {
            Some(keys) => Some(
                self.check_signature(keys, &update.version, update.signature.as_deref())?
                    .counter,
            ),
            None => None,
        };
        let journal = Journal {
            task_id: update.task_id.clone(),
            version: update.version.clone(),
            previous_version: self.running.clone(),
            url: update.url.clone(),
            sha256: update.sha256.to_ascii_lowercase(),
            size: update.size,
            signature: update.signature.clone(),
            rollback: update.rollback,
            step: Step::Downloading,
            reason: None,
            counter,
        };
        journal::clear_staging(&self.state_dir);
        journal::save(&self.state_dir, &journal)
            .map_err(|e| format!("cannot journal the update: {e:#}"))?;
        Ok(journal)
    }

    /// Carries an update from its journaled step to installed (then `Restart`) or failed.
    pub(crate) async fn apply(self: Arc<Self>, mut journal: Journal, events: mpsc::Sender<Event>) {
        let outcome = match journal.step {
            Step::Downloading | Step::Verified => {
                self.download_and_install(&mut journal, &events).await
            }
            _ => return,
        };
        match outcome {
            Ok(()) => {
                progress(&events, &journal, UpdateStage::Restarting, journal.size);
                let _ = events.send(Event::Restart).await;
            }
            Err(reason) => {
                let reason = format!("{reason:#}");
                tracing::error!(task = %journal.task_id, version = %journal.version, %reason, "update failed; the installed agent is unchanged");
                journal::clear_staging(&self.state_dir);
                if let Err(err) = journal.end(&self.state_dir, Step::Failed, &reason) {
                    tracing::error!(error = %format!("{err:#}"), "could not journal the failure");
                }
                let _ = events
                    .send(Event::Finished(UpdateResult {
                        task_id: journal.task_id.clone(),
                        outcome: UpdateOutcome::Failed,
                        version: self.running.clone(),
                        error: Some(reason),
                        failure_class: None,
                    }))
                    .await;
            }
        }
    }

    async fn download_and_install(
        &self,
        journal: &mut Journal,
        events: &mpsc::Sender<Event>,
    ) -> anyhow::Result<()> {
        let part = journal::partial_path(&self.state_dir, &journal.task_id);
        let verified = journal::verified_path(&self.state_dir, &journal.task_id);
        if journal.step == Step::Downloading {
            let mut last = Instant::now() - PROGRESS_EVERY;
            download::fetch(&self.http, &journal.url, journal.size, &part, |done| {
                if last.elapsed() >= PROGRESS_EVERY || done == journal.size {
                    last = Instant::now();
                    progress(events, journal, UpdateStage::Downloading, done);
                }
            })
            .await
            .context("download failed")?;
            progress(events, journal, UpdateStage::Verifying, journal.size);
            self.verify(journal, &part).await.inspect_err(|_| {
                let _ = std::fs::remove_file(&part);
            })?;
            std::fs::rename(&part, &verified)?;
            journal.advance(&self.state_dir, Step::Verified)?;
        }
        progress(events, journal, UpdateStage::Installing, journal.size);
        journal.advance(&self.state_dir, Step::Installing)?;
        install::stage(&self.exe, &verified).context("install failed")?;
        journal.advance(&self.state_dir, Step::Probation)?;
        tracing::info!(task = %journal.task_id, version = %journal.version, "installed; restarting into the new version for its probation");
        Ok(())
    }

    /// The update's signature document against this agent's keys, platform, running
    /// version and last installed counter.
    fn check_signature(
        &self,
        keys: &ReleaseKeys,
        version: &str,
        document: Option<&str>,
    ) -> Result<protocol::release_signature::SignedRelease, String> {
        let last_counter = signing::last_counter(&self.state_dir).map_err(|e| format!("{e:#}"))?;
        let expected = signing::Expected {
            version,
            os: machine::os(),
            arch: machine::arch(),
            running: &self.running,
            last_counter,
        };
        signing::check(keys, document, &expected)
    }

    /// The digest always; when this agent has keys, the signature again (a resumed
    /// download was accepted by an earlier process) and that it covers these bytes.
    async fn verify(&self, journal: &Journal, part: &std::path::Path) -> anyhow::Result<()> {
        let path = part.to_owned();
        let digest = tokio::task::spawn_blocking(move || install::sha256_file(&path)).await??;
        if digest != journal.sha256 {
            anyhow::bail!(
                "checksum mismatch: the update says {}, the download hashes to {digest}",
                journal.sha256
            );
        }
        if let Some(keys) = &self.public_key {
            self.check_signature(keys, &journal.version, journal.signature.as_deref())
                .and_then(|release| signing::check_digest(&release, &digest))
                .map_err(anyhow::Error::msg)?;
            tracing::info!(version = %journal.version, "signature verified");
        }
        Ok(())
    }
}

fn progress(events: &mpsc::Sender<Event>, journal: &Journal, stage: UpdateStage, done: u64) {
    // Progress is advisory: dropping one when the session is busy harms nothing.
    let _ = events.try_send(Event::Progress(UpdateProgress {
        task_id: journal.task_id.clone(),
        stage,
        bytes_done: done,
        bytes_total: journal.size,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::tests::{DIGEST, key, keys, release, sign_with};

    fn updater(state_dir: &std::path::Path) -> Updater {
        Updater {
            state_dir: state_dir.to_owned(),
            exe: state_dir.join("drover-agent"),
            public_key: Some(keys()),
            http: reqwest::Client::new(),
            running: "1.1.0".into(),
        }
    }

    fn update(version: &str, signature: Option<String>) -> Update {
        Update {
            task_id: "task-1".into(),
            version: version.into(),
            url: "http://127.0.0.1:1/downloads/build".into(),
            sha256: DIGEST.into(),
            size: 3,
            signature,
            rollback: false,
            sent_at_ms: 0,
        }
    }

    /// A document for this machine's platform.
    fn signed_here(version: &str, counter: u64) -> String {
        let mut facts = release(version, counter, false);
        facts.os = machine::os().into();
        facts.arch = machine::arch().into();
        sign_with(&key(1), facts)
    }

    #[test]
    fn a_refused_signature_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        signing::record_counter(dir.path(), 5).unwrap();
        for (signature, reason) in [
            (None, "unsigned build"),
            (Some(signed_here("1.2.0", 5)), "not above 5"),
        ] {
            let err = updater(dir.path())
                .accept(&update("1.2.0", signature))
                .unwrap_err();
            assert!(err.contains(reason), "{err}");
            assert_eq!(journal::load(dir.path()).unwrap(), None);
        }
        assert_eq!(signing::last_counter(dir.path()).unwrap(), Some(5));
    }

    #[test]
    fn an_accepted_signature_journals_its_counter_for_later() {
        let dir = tempfile::tempdir().unwrap();
        signing::record_counter(dir.path(), 5).unwrap();
        let journal = updater(dir.path())
            .accept(&update("1.2.0", Some(signed_here("1.2.0", 6))))
            .unwrap();
        assert_eq!(journal.counter, Some(6));
        assert_eq!(journal::load(dir.path()).unwrap(), Some(journal));
        // Only a build that passes probation moves the stored counter.
        assert_eq!(signing::last_counter(dir.path()).unwrap(), Some(5));
    }
}
