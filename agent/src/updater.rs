//! Applying one update inside the worker: journal every step, download (from the
//! offered mirror while it serves the right bytes, else from the server), verify,
//! install, then hand over to the supervisor for the restart into the new version. The
//! installed executable is untouched until the build is verified. Without a mirror, the
//! server's delta from the running build, or else its compressed copy, is fetched when
//! offered, checked, applied or decompressed, and verified as the build. A refusal or
//! failure is an `UpdateError`, whose kind decides the failure class reported to the
//! server; a mirror's failure, or the delta's or the compressed copy's, is none: the
//! next form of the build (the compressed copy, then the build itself) is fetched
//! instead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::{
    CompressedBuild, DeltaBuild, FailureClass, MirrorFailure, Transfer, TransferKind,
    TransferSource, Update, UpdateOutcome, UpdateProgress, UpdateResult, UpdateStage,
};
use tokio::sync::mpsc;

use crate::decompress::{self, DecompressError};
use crate::journal::{self, Journal, Step};
use crate::signing::{self, ReleaseKeys};
use crate::{download, install, machine};

/// Progress goes to the server at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The largest build an agent downloads: a size from the network never decides how
/// much disk it claims.
pub(crate) const MAX_BUILD_BYTES: u64 = 4 << 30;
/// The longest task id taken: it names files in the staging area.
const MAX_TASK_ID: usize = 128;

/// What the updater tells the session.
#[derive(Debug)]
pub(crate) enum Event {
    Progress(UpdateProgress),
    /// A final outcome; once sent, the journal is cleared.
    Finished(UpdateResult),
    /// The new executable is installed: exit so the supervisor starts it.
    Restart,
}

/// Why an update was refused or did not install. The kind, never the message, says
/// whose fault it was.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpdateError {
    /// Refused by rule: not newer and not a rollback, or not a version at all.
    #[error("{0}")]
    Declined(String),
    #[error("download failed: {0}")]
    Download(#[from] download::FetchError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The agent's own files: the journal, the release counter, the staged download.
    #[error("{0:#}")]
    State(anyhow::Error),
    /// Placing the verified build at `<exe>.next`.
    #[error("install failed: {0:#}")]
    Install(anyhow::Error),
}

impl UpdateError {
    pub(crate) fn class(&self) -> FailureClass {
        match self {
            UpdateError::Declined(_) => FailureClass::Transient,
            UpdateError::Download(err) => err.class(),
            UpdateError::Verify(_) => FailureClass::Build,
            UpdateError::State(_) | UpdateError::Install(_) => FailureClass::Environment,
        }
    }
}

/// The build is not what the update promised: its bytes or its signature. Always the
/// build's fault, whether found before the download or after.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VerifyError {
    #[error("checksum mismatch: the update says {expected}, the download hashes to {actual}")]
    Digest { expected: String, actual: String },
    /// Unsigned while this agent pins keys, unreadable, untrusted, forged, for another
    /// build, replayed, or not covering these bytes.
    #[error("{0}")]
    Signature(String),
}

pub(crate) struct Updater {
    pub(crate) state_dir: PathBuf,
    /// The executable to replace.
    pub(crate) exe: PathBuf,
    /// With keys, only builds signed by one of them are installed.
    pub(crate) public_key: Option<ReleaseKeys>,
    pub(crate) http: download::Client,
    /// The version this process runs.
    pub(crate) running: String,
}

/// An update's fields from the network, within what the agent acts on.
fn check_bounds(update: &Update) -> Result<(), String> {
    if update.task_id.is_empty() || update.task_id.len() > MAX_TASK_ID {
        return Err(format!(
            "a task id of {} bytes is not one this agent takes (1 to {MAX_TASK_ID})",
            update.task_id.len()
        ));
    }
    if update.size == 0 || update.size > MAX_BUILD_BYTES {
        return Err(format!(
            "a build of {} bytes is not one this agent downloads (1 to {MAX_BUILD_BYTES})",
            update.size
        ));
    }
    if !is_sha256(&update.sha256) {
        return Err("the update's sha256 is not 64 hex digits".into());
    }
    if !is_http_url(&update.url) {
        return Err("the update's url is not an http:// or https:// URL".into());
    }
    Ok(())
}

/// An `http://` or `https://` URL (the scheme in any case).
fn is_http_url(url: &str) -> bool {
    ["http://", "https://"].iter().any(|scheme| {
        url.get(..scheme.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(scheme))
    })
}

/// The update's mirror, if it offers one this agent can fetch from; one that is not an
/// http(s) URL is passed over for the server's own URL.
fn usable_mirror(update: &Update) -> Option<String> {
    let mirror = update.mirror_url.as_deref()?;
    if is_http_url(mirror) {
        return Some(mirror.to_owned());
    }
    tracing::warn!(task = %update.task_id, "the update's mirror is not an http:// or https:// URL; downloading from the server");
    None
}

/// The update's compressed copy, if it offers one this agent reads; a copy out of bounds
/// is passed over for the build itself.
fn usable_compressed(update: &Update) -> Option<CompressedBuild> {
    let offer = update.compressed.as_ref()?;
    let usable = offer.encoding == protocol::ENCODING_ZSTD
        && fetchable(&offer.url, offer.size, &offer.sha256);
    if !usable {
        tracing::warn!(task = %update.task_id, "the update's compressed copy is not one this agent reads; downloading the build");
        return None;
    }
    Some(CompressedBuild {
        sha256: offer.sha256.to_ascii_lowercase(),
        ..offer.clone()
    })
}

/// SHA-256 as 64 hex digits (either case).
fn is_sha256(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A download offered beside the build (a compressed copy, a delta) within what the
/// agent fetches: an http(s) URL, 1 byte to `MAX_BUILD_BYTES`, a SHA-256 to check.
fn fetchable(url: &str, size: u64, sha256: &str) -> bool {
    is_http_url(url) && size > 0 && size <= MAX_BUILD_BYTES && is_sha256(sha256)
}

/// The update's delta, if it offers one this agent reads; a delta out of bounds is
/// passed over for the compressed copy or the build.
fn usable_delta(update: &Update) -> Option<DeltaBuild> {
    let offer = update.delta.as_ref()?;
    let usable = offer.encoding == protocol::ENCODING_ZSTD_PATCH
        && fetchable(&offer.url, offer.size, &offer.sha256)
        && is_sha256(&offer.base_sha256);
    if !usable {
        tracing::warn!(task = %update.task_id, "the update's delta is not one this agent reads; downloading the build");
        return None;
    }
    Some(DeltaBuild {
        sha256: offer.sha256.to_ascii_lowercase(),
        base_sha256: offer.base_sha256.to_ascii_lowercase(),
        ..offer.clone()
    })
}

/// A form of the build the server offers besides the build itself, which the agent
/// turns back into the build.
enum Form {
    Compressed(CompressedBuild),
    Delta(DeltaBuild),
}

impl Form {
    /// Its URL, size and SHA-256.
    fn offer(&self) -> (&str, u64, &str) {
        match self {
            Form::Compressed(copy) => (&copy.url, copy.size, &copy.sha256),
            Form::Delta(delta) => (&delta.url, delta.size, &delta.sha256),
        }
    }

    /// Where it is downloaded to, before it is turned into the build's `.part`.
    fn staged(&self, state_dir: &std::path::Path, task_id: &str) -> PathBuf {
        match self {
            Form::Compressed(_) => journal::compressed_path(state_dir, task_id),
            Form::Delta(_) => journal::delta_path(state_dir, task_id),
        }
    }
}

/// The transfer of a build from the server: its compressed copy or the build itself.
fn from_server(kind: TransferKind, bytes: u64) -> Transfer {
    Transfer {
        source: TransferSource::Server,
        fallback: None,
        fallback_error: None,
        kind,
        bytes: Some(bytes),
    }
}

/// Why a delta or compressed copy was given up on; the next form is fetched instead.
struct CopyFailed(String);

impl Updater {
    /// Decides whether to take on an update and journals it. `Err` carries the reason
    /// to report as a failure.
    pub(crate) fn accept(&self, update: &Update) -> Result<Journal, UpdateError> {
        check_bounds(update).map_err(UpdateError::Declined)?;
        let target = semver::Version::parse(&update.version).map_err(|e| {
            UpdateError::Declined(format!("version {:?} is not semver: {e}", update.version))
        })?;
        let newer = semver::Version::parse(&self.running).map_or(true, |running| target > running);
        if !newer && !update.rollback {
            return Err(UpdateError::Declined(format!(
                "refusing {} over {}: not newer, and not a rollback",
                update.version, self.running
            )));
        }
        // Refused before a byte is downloaded; the bytes are checked after.
        let counter = match &self.public_key {
            Some(keys) => Some(
                self.check_signature(keys, &update.version, update.signature.as_deref())?
                    .counter,
            ),
            None => None,
        };
        let mirror = usable_mirror(update);
        // A mirror keeps to the build itself: it holds no compressed copies or deltas.
        let compressed = mirror
            .is_none()
            .then(|| usable_compressed(update))
            .flatten();
        let delta = mirror.is_none().then(|| usable_delta(update)).flatten();
        let journal = Journal {
            task_id: update.task_id.clone(),
            version: update.version.clone(),
            previous_version: self.running.clone(),
            url: update.url.clone(),
            mirror_url: mirror.clone(),
            // Without a mirror the source is known now; with one, once it served the
            // build or was given up on.
            transfer: mirror.is_none().then(|| match (&delta, &compressed) {
                (Some(delta), _) => from_server(TransferKind::Delta, delta.size),
                (None, Some(copy)) => from_server(TransferKind::Compressed, copy.size),
                (None, None) => from_server(TransferKind::Full, update.size),
            }),
            compressed,
            delta,
            sha256: update.sha256.to_ascii_lowercase(),
            size: update.size,
            signature: update.signature.clone(),
            rollback: update.rollback,
            step: Step::Downloading,
            reason: None,
            failure_class: None,
            counter,
        };
        journal::clear_staging(&self.state_dir);
        journal::save(&self.state_dir, &journal)
            .map_err(|e| UpdateError::State(e.context("cannot journal the update")))?;
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
                progress(
                    &events,
                    &journal,
                    UpdateStage::Restarting,
                    journal.size,
                    journal.size,
                );
                let _ = events.send(Event::Restart).await;
            }
            Err(err) => {
                let (reason, class) = (err.to_string(), err.class());
                tracing::error!(task = %journal.task_id, version = %journal.version, %reason, class = class.as_str(), "update failed; the installed agent is unchanged");
                journal::clear_staging(&self.state_dir);
                if let Err(err) = journal.end(&self.state_dir, Step::Failed, &reason, class) {
                    tracing::error!(error = %format!("{err:#}"), "could not journal the failure");
                }
                let _ = events
                    .send(Event::Finished(UpdateResult {
                        task_id: journal.task_id.clone(),
                        outcome: UpdateOutcome::Failed,
                        version: self.running.clone(),
                        error: Some(reason),
                        failure_class: Some(class),
                        transfer: journal.transfer.clone(),
                    }))
                    .await;
            }
        }
    }

    async fn download_and_install(
        &self,
        journal: &mut Journal,
        events: &mpsc::Sender<Event>,
    ) -> Result<(), UpdateError> {
        let journaled =
            |e: anyhow::Error| UpdateError::State(e.context("cannot journal the update"));
        let part = journal::partial_path(&self.state_dir, &journal.task_id);
        let verified = journal::verified_path(&self.state_dir, &journal.task_id);
        if journal.step == Step::Downloading {
            let digest = self.fetch_build(journal, events, &part).await?;
            self.verify_signature(journal, &digest).inspect_err(|_| {
                let _ = std::fs::remove_file(&part);
            })?;
            crate::platform::durable::rename(&part, &verified)
                .context("could not keep the verified download")
                .map_err(UpdateError::State)?;
            journal
                .advance(&self.state_dir, Step::Verified)
                .map_err(journaled)?;
        }
        progress(
            events,
            journal,
            UpdateStage::Installing,
            journal.size,
            journal.size,
        );
        journal
            .advance(&self.state_dir, Step::Installing)
            .map_err(journaled)?;
        install::stage(&self.exe, &verified).map_err(UpdateError::Install)?;
        journal
            .advance(&self.state_dir, Step::Probation)
            .map_err(journaled)?;
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
    ) -> Result<protocol::release_signature::SignedRelease, UpdateError> {
        let last_counter = signing::last_counter(&self.state_dir).map_err(UpdateError::State)?;
        let expected = signing::Expected {
            version,
            os: machine::os(),
            arch: machine::arch(),
            running: &self.running,
            last_counter,
        };
        signing::check(keys, document, &expected)
            .map_err(|reason| VerifyError::Signature(reason).into())
    }

    /// Brings the build into `part` and answers its digest, checked: from the offered
    /// mirror while it serves the right bytes, else from the server. A mirror that fails
    /// in any way (unreachable, an error status, a stall, wrong bytes) is given up on,
    /// and why is journaled and reported; only the server's bytes can fail the build.
    async fn fetch_build(
        &self,
        journal: &mut Journal,
        events: &mpsc::Sender<Event>,
        part: &std::path::Path,
    ) -> Result<String, UpdateError> {
        if let Some(mirror) = journal.mirror_url.clone()
            && journal.transfer.is_none()
        {
            let fetched = self
                .fetch_from(
                    &mirror,
                    download::MIRROR,
                    journal,
                    journal.size,
                    events,
                    part,
                )
                .await;
            let failure = match fetched {
                Ok(()) => match self.check_digest(journal, events, part).await {
                    Ok(digest) => {
                        journal.transfer = Some(Transfer {
                            source: TransferSource::Mirror,
                            fallback: None,
                            fallback_error: None,
                            kind: TransferKind::Full,
                            bytes: Some(journal.size),
                        });
                        return Ok(digest);
                    }
                    Err(UpdateError::Verify(err)) => (MirrorFailure::WrongBytes, err.to_string()),
                    Err(err) => return Err(err),
                },
                Err(err) => match err.mirror_failure() {
                    Some(failure) => (failure, err.to_string()),
                    None => return Err(err.into()),
                },
            };
            self.fall_back(journal, events, part, failure)?;
        }
        // The delta, then the compressed copy, each while the journal says it is the one
        // being fetched; a failed one hands over to the next.
        loop {
            let kind = journal.transfer.as_ref().map(|t| t.kind);
            let form = match (kind, &journal.delta, &journal.compressed) {
                (Some(TransferKind::Delta), Some(delta), _) => Form::Delta(delta.clone()),
                (Some(TransferKind::Compressed), _, Some(copy)) => Form::Compressed(copy.clone()),
                _ => break,
            };
            match self.fetch_form(journal, events, &form, part).await? {
                Ok(digest) => return Ok(digest),
                Err(CopyFailed(reason)) => {
                    self.give_up_form(journal, events, &form, part, &reason)?
                }
            }
        }
        self.fetch_from(
            &journal.url.clone(),
            download::SERVER,
            journal,
            journal.size,
            events,
            part,
        )
        .await?;
        self.check_digest(journal, events, part).await
    }

    /// Brings the build into `part` from the server's compressed copy, or its delta and
    /// this agent's executable, and answers its digest, checked. The outer error fails
    /// the update (this machine's trouble, or a signature that does not hold); a
    /// `CopyFailed` says why the form is not to be trusted or could not be had, and the
    /// next form is fetched instead.
    async fn fetch_form(
        &self,
        journal: &Journal,
        events: &mpsc::Sender<Event>,
        form: &Form,
        part: &std::path::Path,
    ) -> Result<Result<String, CopyFailed>, UpdateError> {
        let (url, size, sha256) = form.offer();
        let staged = form.staged(&self.state_dir, &journal.task_id);
        // A delta for another build than this agent's is not worth a byte.
        if let Form::Delta(delta) = form
            && let Err(failed) = self.runs_base(&delta.base_sha256).await?
        {
            return Ok(Err(failed));
        }
        let fetched = self
            .fetch_from(url, download::SERVER, journal, size, events, &staged)
            .await;
        match fetched {
            Ok(()) => {}
            Err(err) if err.class() == FailureClass::Environment => return Err(err.into()),
            Err(err) => return Ok(Err(CopyFailed(err.to_string()))),
        }
        progress(events, journal, UpdateStage::Verifying, size, size);
        let digest = hash_file(&staged).await?;
        if digest != sha256 {
            return Ok(Err(CopyFailed(format!(
                "the download hashes to {digest}, not {sha256}"
            ))));
        }
        // Room for the build and its installed copy, beside the download.
        download::check_space(part, journal.size, 0)?;
        let (from, to, size) = (staged.clone(), part.to_owned(), journal.size);
        // The executable was checked to be the delta's base before the download; if it
        // changed since, the rebuilt build's digest below says so.
        let exe = matches!(form, Form::Delta(_)).then(|| self.exe.clone());
        let rebuilt = tokio::task::spawn_blocking(move || match exe {
            None => decompress::decompress_limited(&from, &to, size),
            Some(exe) => decompress::patch_limited(&from, &exe, &to, size),
        })
        .await
        .map_err(|e| UpdateError::State(e.into()))?;
        match rebuilt {
            Ok(()) => {}
            Err(DecompressError::Io(err)) => {
                return Err(UpdateError::State(
                    anyhow::Error::from(err).context("could not decompress the download"),
                ));
            }
            Err(err) => return Ok(Err(CopyFailed(err.to_string()))),
        }
        match self.check_digest(journal, events, part).await {
            Ok(digest) => {
                let _ = std::fs::remove_file(&staged);
                Ok(Ok(digest))
            }
            // The form is not of the build the update names: the build itself decides.
            Err(UpdateError::Verify(err)) => Ok(Err(CopyFailed(err.to_string()))),
            Err(err) => Err(err),
        }
    }

    /// Whether this agent's executable hashes to `sha256`, the build a delta starts
    /// from; why not, if not.
    async fn runs_base(&self, sha256: &str) -> Result<Result<(), CopyFailed>, UpdateError> {
        let exe = self.exe.clone();
        let hashed = tokio::task::spawn_blocking(move || install::sha256_file(&exe))
            .await
            .map_err(|e| UpdateError::State(e.into()))?;
        Ok(match hashed {
            Ok(digest) if digest == sha256 => Ok(()),
            Ok(digest) => Err(CopyFailed(format!(
                "this agent's executable hashes to {digest}, not to the delta's base {sha256}"
            ))),
            Err(err) => Err(CopyFailed(format!(
                "cannot read this agent's executable: {err:#}"
            ))),
        })
    }

    /// Gives up on a form of the build: after a delta, the compressed copy if offered is
    /// fetched from now on; else the build itself.
    fn give_up_form(
        &self,
        journal: &mut Journal,
        events: &mpsc::Sender<Event>,
        form: &Form,
        part: &std::path::Path,
        reason: &str,
    ) -> Result<(), UpdateError> {
        let next = match (form, &journal.compressed) {
            (Form::Delta(_), Some(copy)) => {
                tracing::warn!(task = %journal.task_id, %reason, "the delta failed; downloading the compressed copy");
                from_server(TransferKind::Compressed, copy.size)
            }
            (Form::Delta(_), None) => {
                tracing::warn!(task = %journal.task_id, %reason, "the delta failed; downloading the build itself");
                from_server(TransferKind::Full, journal.size)
            }
            (Form::Compressed(_), _) => {
                tracing::warn!(task = %journal.task_id, %reason, "the compressed copy failed; downloading the build itself");
                from_server(TransferKind::Full, journal.size)
            }
        };
        let staged = form.staged(&self.state_dir, &journal.task_id);
        self.download_instead(journal, events, &[&staged, part], next)
    }

    /// Gives up on the mirror: the server is the source from now on.
    fn fall_back(
        &self,
        journal: &mut Journal,
        events: &mpsc::Sender<Event>,
        part: &std::path::Path,
        (failure, error): (MirrorFailure, String),
    ) -> Result<(), UpdateError> {
        tracing::warn!(task = %journal.task_id, mirror = journal.mirror_url.as_deref().unwrap_or(""), reason = failure.as_str(), %error, "the mirror failed; downloading from the server");
        let next = Transfer {
            source: TransferSource::Server,
            fallback: Some(failure),
            fallback_error: Some(error),
            kind: TransferKind::Full,
            bytes: Some(journal.size),
        };
        self.download_instead(journal, events, &[part], next)
    }

    /// Starts a download over as `next` says: the given-up download's files go, then the
    /// journal records `next` (in that order, so nothing of theirs is ever resumed as
    /// what comes next).
    fn download_instead(
        &self,
        journal: &mut Journal,
        events: &mpsc::Sender<Event>,
        given_up: &[&std::path::Path],
        next: Transfer,
    ) -> Result<(), UpdateError> {
        for file in given_up {
            match std::fs::remove_file(file) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(UpdateError::State(
                        anyhow::Error::from(err).context("could not remove the given-up download"),
                    ));
                }
            }
        }
        let total = next.bytes.unwrap_or(journal.size);
        journal.transfer = Some(next);
        journal
            .advance(&self.state_dir, Step::Downloading)
            .map_err(|e| UpdateError::State(e.context("cannot journal the fallback")))?;
        progress(events, journal, UpdateStage::Downloading, 0, total);
        Ok(())
    }

    /// Downloads `size` bytes from `url` into `part`, resuming what it holds.
    async fn fetch_from(
        &self,
        url: &str,
        patience: download::Patience,
        journal: &Journal,
        size: u64,
        events: &mpsc::Sender<Event>,
        part: &std::path::Path,
    ) -> Result<(), download::FetchError> {
        let mut last = Instant::now() - PROGRESS_EVERY;
        download::fetch(&self.http, url, size, part, patience, |done| {
            if last.elapsed() >= PROGRESS_EVERY || done == size {
                last = Instant::now();
                progress(events, journal, UpdateStage::Downloading, done, size);
            }
        })
        .await
    }

    /// The download's digest against the update's; a mismatch removes the download.
    async fn check_digest(
        &self,
        journal: &Journal,
        events: &mpsc::Sender<Event>,
        part: &std::path::Path,
    ) -> Result<String, UpdateError> {
        progress(
            events,
            journal,
            UpdateStage::Verifying,
            journal.size,
            journal.size,
        );
        let digest = hash_file(part).await?;
        if digest != journal.sha256 {
            let _ = std::fs::remove_file(part);
            return Err(VerifyError::Digest {
                expected: journal.sha256.clone(),
                actual: digest,
            }
            .into());
        }
        Ok(digest)
    }

    /// When this agent has keys: the signature again (a resumed download was accepted
    /// by an earlier process) and that it covers these bytes (`digest`, checked).
    fn verify_signature(&self, journal: &Journal, digest: &str) -> Result<(), UpdateError> {
        if let Some(keys) = &self.public_key {
            let release =
                self.check_signature(keys, &journal.version, journal.signature.as_deref())?;
            signing::check_digest(&release, digest).map_err(VerifyError::Signature)?;
            tracing::info!(version = %journal.version, "signature verified");
        }
        Ok(())
    }
}

/// The SHA-256 of a downloaded file, off the runtime.
async fn hash_file(path: &std::path::Path) -> Result<String, UpdateError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || install::sha256_file(&path))
        .await
        .map_err(anyhow::Error::from)
        .and_then(|hashed| hashed)
        .context("could not read the download")
        .map_err(UpdateError::State)
}

/// `done` of `total` bytes: of what crosses the wire while downloading.
fn progress(
    events: &mpsc::Sender<Event>,
    journal: &Journal,
    stage: UpdateStage,
    done: u64,
    total: u64,
) {
    // Progress is advisory: dropping one when the session is busy harms nothing.
    let _ = events.try_send(Event::Progress(UpdateProgress {
        task_id: journal.task_id.clone(),
        stage,
        bytes_done: done,
        bytes_total: total,
        transfer: journal.transfer.clone(),
    }));
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::signing::tests::{DIGEST, key, keys, release, sign_with};

    fn updater(state_dir: &std::path::Path) -> Updater {
        Updater {
            state_dir: state_dir.to_owned(),
            exe: state_dir.join("drover-agent"),
            public_key: Some(keys()),
            http: download::Client::new(None),
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
            mirror_url: None,
            compressed: None,
            delta: None,
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
            assert!(err.to_string().contains(reason), "{err}");
            assert_eq!(err.class(), FailureClass::Build, "{err}");
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

    #[test]
    fn every_update_error_has_its_class() {
        use download::FetchError;
        let cases = [
            (
                UpdateError::Declined("not newer".into()),
                FailureClass::Transient,
            ),
            (
                FetchError::Refused(reqwest::StatusCode::NOT_FOUND).into(),
                FailureClass::Transient,
            ),
            (
                FetchError::GaveUp {
                    attempts: 20,
                    last: download::Failure::Network("connection reset".into()),
                }
                .into(),
                FailureClass::Transient,
            ),
            (FetchError::TooLarge(3).into(), FailureClass::Build),
            (
                FetchError::NoSpace(std::io::Error::other("full")).into(),
                FailureClass::Environment,
            ),
            (
                VerifyError::Digest {
                    expected: "aa".into(),
                    actual: "bb".into(),
                }
                .into(),
                FailureClass::Build,
            ),
            (
                VerifyError::Signature("bad signature".into()).into(),
                FailureClass::Build,
            ),
            (
                UpdateError::State(anyhow::anyhow!("read-only file system")),
                FailureClass::Environment,
            ),
            (
                UpdateError::Install(anyhow::anyhow!("permission denied")),
                FailureClass::Environment,
            ),
        ];
        for (err, class) in cases {
            assert_eq!(err.class(), class, "{err}");
        }
    }

    #[test]
    fn refusals_before_the_download_are_classed_by_cause() {
        let dir = tempfile::tempdir().unwrap();
        let pinning = |pinned: bool| {
            let mut updater = updater(dir.path());
            if !pinned {
                updater.public_key = None;
            }
            updater
        };
        // (the agent pins keys, update, class of the refusal)
        let cases = [
            (false, update("1.0.0", None), FailureClass::Transient),
            (false, update("one", None), FailureClass::Transient),
            (true, update("1.2.0", None), FailureClass::Build),
            (
                true,
                update("1.2.0", Some(signed_here("1.3.0", 1))),
                FailureClass::Build,
            ),
        ];
        for (pinned, update, class) in cases {
            let err = pinning(pinned).accept(&update).unwrap_err();
            assert_eq!(err.class(), class, "{} : {err}", update.version);
        }
        // A release counter that cannot be read is this machine's problem.
        std::fs::write(dir.path().join("release-counter"), "garbage").unwrap();
        let err = updater(dir.path())
            .accept(&update("1.2.0", Some(signed_here("1.2.0", 6))))
            .unwrap_err();
        assert_eq!(err.class(), FailureClass::Environment, "{err}");
    }

    #[tokio::test]
    async fn bytes_that_fail_verification_are_a_build_failure() {
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("download.part");
        let mut journal = journal::sample(Step::Downloading);
        journal.sha256 = DIGEST.into();

        let (events, _received) = mpsc::channel(16);
        // Not the bytes the update names: removed.
        std::fs::write(&part, b"tset").unwrap();
        let err = updater(dir.path())
            .check_digest(&journal, &events, &part)
            .await
            .unwrap_err();
        assert!(!part.exists());
        assert!(
            matches!(err, UpdateError::Verify(VerifyError::Digest { .. })),
            "{err}"
        );
        assert_eq!(err.class(), FailureClass::Build);

        // The named bytes, but signed for others.
        std::fs::write(&part, b"test").unwrap();
        let mut facts = release("1.1.0", 1, false);
        (facts.os, facts.arch) = (machine::os().into(), machine::arch().into());
        facts.sha256 = "00".repeat(32);
        journal.signature = Some(sign_with(&key(1), facts));
        let mut on_old = updater(dir.path());
        on_old.running = "1.0.0".into();
        let digest = on_old.check_digest(&journal, &events, &part).await.unwrap();
        let err = on_old.verify_signature(&journal, &digest).unwrap_err();
        assert!(
            matches!(err, UpdateError::Verify(VerifyError::Signature(_))),
            "{err}"
        );
        assert_eq!(err.class(), FailureClass::Build);

        // A download that cannot be read is not the build's fault.
        let err = on_old
            .check_digest(&journal, &events, &dir.path().join("missing.part"))
            .await
            .unwrap_err();
        assert_eq!(err.class(), FailureClass::Environment, "{err}");
    }

    fn any_update() -> impl Strategy<Value = Update> {
        (
            prop_oneof![".{0,200}", "[a-z0-9-]{1,40}", "\\.\\./[./a-z]{0,20}"],
            prop_oneof!["[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}", ".{0,40}"],
            prop_oneof![
                Just("http://127.0.0.1:1/downloads/build".to_owned()),
                ".{0,80}",
                "(file|ftp|HTTP|https)://[ -~]{0,40}",
            ],
            prop_oneof![Just(DIGEST.to_owned()), "[0-9a-fA-F]{0,70}", ".{0,70}"],
            prop_oneof![
                any::<u64>(),
                0u64..10,
                Just(u64::MAX),
                Just(MAX_BUILD_BYTES + 1)
            ],
            proptest::option::of(".{0,300}"),
            any::<bool>(),
            any::<u64>(),
            proptest::option::of(prop_oneof![
                Just("http://mirror.example/build".to_owned()),
                ".{0,300}"
            ]),
            proptest::option::of((
                prop_oneof![Just("zstd".to_owned()), ".{0,10}"],
                prop_oneof![
                    Just("http://127.0.0.1:1/downloads/build.zst".to_owned()),
                    ".{0,80}"
                ],
                prop_oneof![any::<u64>(), Just(MAX_BUILD_BYTES + 1), 0u64..10],
                prop_oneof![Just(DIGEST.to_owned()), "[0-9a-fA-F]{0,70}"],
            )),
            proptest::option::of((
                prop_oneof![Just("zstd-patch".to_owned()), ".{0,10}"],
                prop_oneof![
                    Just("http://127.0.0.1:1/downloads/build.delta-from-1.0.0".to_owned()),
                    ".{0,80}"
                ],
                prop_oneof![any::<u64>(), Just(MAX_BUILD_BYTES + 1), 0u64..10],
                prop_oneof![Just(DIGEST.to_owned()), "[0-9a-fA-F]{0,70}"],
                prop_oneof![Just(DIGEST.to_owned()), ".{0,70}"],
            )),
        )
            .prop_map(
                |(
                    task_id,
                    version,
                    url,
                    sha256,
                    size,
                    signature,
                    rollback,
                    sent_at_ms,
                    mirror_url,
                    compressed,
                    delta,
                )| {
                    Update {
                        task_id,
                        version,
                        url,
                        sha256,
                        size,
                        signature,
                        rollback,
                        sent_at_ms,
                        mirror_url,
                        compressed: compressed.map(|(encoding, url, size, sha256)| {
                            CompressedBuild {
                                encoding,
                                url,
                                size,
                                sha256,
                            }
                        }),
                        delta: delta.map(|(encoding, url, size, sha256, base_sha256)| DeltaBuild {
                            encoding,
                            base_version: "1.0.0".into(),
                            base_sha256,
                            url,
                            size,
                            sha256,
                        }),
                    }
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Any `update` a server sends is accepted within bounds or refused with a
        /// reason: never a panic, a build size beyond the cap, or a path outside staging.
        #[test]
        fn no_update_message_panics_the_agent(update in any_update(), pinned in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            let mut updater = updater(dir.path());
            if !pinned {
                updater.public_key = None;
            }
            match updater.accept(&update) {
                Ok(journal) => {
                    prop_assert!(journal.size > 0 && journal.size <= MAX_BUILD_BYTES);
                    prop_assert_eq!(journal.sha256.len(), 64);
                    let staging = dir.path().join("staging");
                    prop_assert!(journal::partial_path(dir.path(), &journal.task_id).starts_with(&staging));
                    prop_assert!(journal::verified_path(dir.path(), &journal.task_id).starts_with(&staging));
                    prop_assert!(journal::compressed_path(dir.path(), &journal.task_id).starts_with(&staging));
                    prop_assert!(journal::delta_path(dir.path(), &journal.task_id).starts_with(&staging));
                    if let Some(copy) = &journal.compressed {
                        prop_assert!(copy.size > 0 && copy.size <= MAX_BUILD_BYTES);
                        prop_assert_eq!(copy.sha256.len(), 64);
                        prop_assert!(journal.mirror_url.is_none());
                    }
                    if let Some(delta) = &journal.delta {
                        prop_assert!(delta.size > 0 && delta.size <= MAX_BUILD_BYTES);
                        prop_assert_eq!(delta.sha256.len(), 64);
                        prop_assert_eq!(delta.base_sha256.len(), 64);
                        prop_assert!(journal.mirror_url.is_none());
                        prop_assert_eq!(journal.transfer.as_ref().map(|t| t.kind), Some(TransferKind::Delta));
                    }
                }
                Err(err) => prop_assert!(!err.to_string().trim().is_empty()),
            }
        }
    }
}
