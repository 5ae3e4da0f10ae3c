//! Applying one update inside the worker: journal every step, download, verify, install,
//! then hand over to the supervisor for the restart into the new version. The installed
//! executable is untouched until the build is verified.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ed25519_dalek::{Signature, VerifyingKey};
use protocol::{Update, UpdateOutcome, UpdateProgress, UpdateResult, UpdateStage};
use tokio::sync::mpsc;

use crate::journal::{self, Journal, Step};
use crate::{download, install};

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
    pub(crate) public_key: Option<VerifyingKey>,
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
        if self.public_key.is_some() && update.signature.is_none() {
            return Err(
                "this agent requires signed builds and the update carries no signature".into(),
            );
        }
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

    /// The digest always; the signature when this agent has a public key.
    async fn verify(&self, journal: &Journal, part: &std::path::Path) -> anyhow::Result<()> {
        let path = part.to_owned();
        let digest = tokio::task::spawn_blocking(move || install::sha256_file(&path)).await??;
        if digest != journal.sha256 {
            anyhow::bail!(
                "checksum mismatch: the update says {}, the download hashes to {digest}",
                journal.sha256
            );
        }
        if let Some(key) = self.public_key {
            let signature = journal
                .signature
                .as_deref()
                .context("the update carries no signature")?;
            let signature: [u8; 64] = hex::decode(signature.trim())
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .context("the update's signature is not 64 hex-encoded bytes")?;
            let bytes = tokio::fs::read(part).await?;
            key.verify_strict(&bytes, &Signature::from_bytes(&signature))
                .map_err(|_| {
                    anyhow::anyhow!("bad signature: the build was not signed by this agent's key")
                })?;
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

/// Parses a hex ed25519 public key.
pub(crate) fn parse_public_key(text: &str) -> anyhow::Result<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("the public key must be 32 hex-encoded bytes")?;
    VerifyingKey::from_bytes(&bytes).context("not a valid ed25519 public key")
}
