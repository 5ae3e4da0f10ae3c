//! The supervisor: `drover-agent run` is a small long-lived process that starts the
//! worker (`drover-agent worker`, which holds the session), restarts it when it exits,
//! and watches a new build through its probation. The new build runs from `<exe>.next`;
//! one whose worker crashes or cannot reach the server is discarded. Once its worker has
//! connected and heartbeated, the supervisor hands over to the new build's supervisor
//! (exec in place on Unix, keeping the PID; a service restart into `<exe>.next` on
//! Windows): that one must take over (read the journal, promote itself to `<exe>`, start
//! its worker), or the old supervisor, started again from the untouched `<exe>` by the
//! service manager (on Windows by the hand-over's watcher), reverts the build.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use protocol::FailureClass;
use tokio::process::{Child, ChildStdin, Command};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::journal::{self, Journal, Step};
use crate::{install, signing};

/// Exit status with which a worker asks to be restarted at once (a new version is
/// installed and waits for its probation).
pub(crate) const RESTART_STATUS: i32 = 75;
/// Tells the worker which executable to replace (its own path can read as deleted once
/// replaced).
pub(crate) const EXE_ENV: &str = "DROVER_AGENT_EXE";
const WORKER_PID_FILE: &str = "worker.pid";
/// `{"pid": ..., "version": ...}` of the running supervisor, for tooling and tests.
const SUPERVISOR_FILE: &str = "supervisor.json";
const PROBATION_POLL: Duration = Duration::from_millis(100);
/// Held locked by the running supervisor: one supervisor a state directory.
const LOCK_FILE: &str = "supervisor.lock";

pub(crate) struct Supervisor {
    pub(crate) state_dir: PathBuf,
    pub(crate) exe: PathBuf,
    /// Arguments for the worker after `worker`.
    pub(crate) worker_args: Vec<String>,
    pub(crate) probation: Duration,
}

enum Probation {
    Passed,
    Failed(String),
}

/// What the supervisor does after bringing the journal to a consistent point.
#[derive(Debug)]
pub(crate) enum Recovered {
    /// Start the worker from the executable.
    Start,
    /// A new build is (again) on probation: start its worker from `<exe>.next`.
    Probation(Journal),
    /// The new build's worker passed its probation: hand over to its supervisor.
    HandOver(Journal),
}

/// How a hand-over ended for this supervisor.
enum HandedOver {
    /// This process goes on supervising: the new build is promoted in place, or was
    /// reverted.
    Continue,
    /// The service restarts into the new supervisor: this one stops.
    Stop,
}

impl Supervisor {
    pub(crate) async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let version = crate::version::current();
        tracing::info!(version, "supervisor started");
        crate::platform::permissions::create_private_dir(&self.state_dir).with_context(|| {
            format!(
                "while creating the state directory {}",
                self.state_dir.display()
            )
        })?;
        let _lock = lock(&self.state_dir)?;
        let about = serde_json::json!({"pid": std::process::id(), "version": version});
        let _ = crate::atomic_file::write(
            &self.state_dir.join(SUPERVISOR_FILE),
            about.to_string().as_bytes(),
        );
        install::sweep(&self.exe);
        let mut crashes = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            let on_probation = match recover(&self.state_dir, &self.exe, version)? {
                Recovered::Start => None,
                Recovered::Probation(journal) => Some(journal),
                Recovered::HandOver(journal) => match self.hand_over(journal)? {
                    HandedOver::Continue => continue,
                    HandedOver::Stop => return Ok(()),
                },
            };
            let program = match on_probation {
                Some(_) => install::next_path(&self.exe),
                None => self.exe.clone(),
            };
            let (mut worker, _lifeline) = match self.spawn(&program) {
                Ok(started) => started,
                Err(err) if let Some(journal) = on_probation => {
                    // A build that cannot even start (not a program for this system,
                    // say) fails its probation; it must not stop the supervisor.
                    self.revert(journal, &format!("{err:#}"))?;
                    continue;
                }
                Err(err) => return Err(err),
            };
            release_start_up_pages("supervisor");
            if let Some(journal) = on_probation {
                tracing::info!(version = %journal.version, "new version on probation for {}s", self.probation.as_secs());
                match self.watch_probation(&mut worker, &shutdown).await {
                    None => return stop(worker).await,
                    Some(Probation::Passed) => match journal::load(&self.state_dir)? {
                        Some(_) => {
                            tracing::info!(version = %journal.version, "new version passed probation; handing over to its supervisor");
                            // The new supervisor starts its own worker; `recover` finds the
                            // committed journal and hands over, as after a restart here.
                            let _ = worker.kill().await;
                            continue;
                        }
                        None => {
                            // A build from before the hand-over reported and cleared its
                            // journal itself: it is promoted in place, as then, and its
                            // supervisor runs from the next start.
                            signing::record_installed(&self.state_dir, journal.counter);
                            install::promote(&self.exe)?;
                            tracing::info!(version = %journal.version, "new version passed probation and is installed");
                        }
                    },
                    Some(Probation::Failed(reason)) => {
                        let _ = worker.kill().await;
                        self.revert(journal, &reason)?;
                        continue;
                    }
                }
            }
            tokio::select! {
                status = worker.wait() => {
                    let status = status.context("while waiting for the worker")?;
                    if status.code() == Some(RESTART_STATUS) {
                        crashes.reset();
                        continue;
                    }
                    let delay = crashes.next_delay(&mut rand::rng());
                    tracing::error!(%status, delay_ms = delay.as_millis() as u64, "worker exited; restarting it");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = shutdown.cancelled() => return Ok(()),
                    }
                }
                () = shutdown.cancelled() => return stop(worker).await,
            }
        }
    }

    /// Starts a worker. The returned pipe must live as long as the worker should: the
    /// worker stops when it closes (and `Child::wait` would close it if left inside).
    fn spawn(&self, program: &Path) -> anyhow::Result<(Child, Option<ChildStdin>)> {
        let mut child = Command::new(program)
            .arg("worker")
            .args(&self.worker_args)
            .env(EXE_ENV, &self.exe)
            // The worker exits when this pipe closes, so it never outlives its supervisor.
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("while starting {}", program.display()))?;
        if let Some(pid) = child.id() {
            // Whole or absent, never a torn number; losing it only costs tooling a lookup.
            let pid_file = self.state_dir.join(WORKER_PID_FILE);
            let _ = crate::atomic_file::write(&pid_file, pid.to_string().as_bytes());
        }
        let lifeline = child.stdin.take();
        Ok((child, lifeline))
    }

    /// Hands over to the new build's supervisor. On Unix it execs `<exe>.next run ...` in
    /// this process, keeping the PID the service manager watches; that supervisor takes
    /// over in `recover` (promotes itself, starts its worker), and if it stops first, this
    /// old one, started again from the untouched `<exe>`, reverts the build. Returns only
    /// if the exec fails, after reverting. A Windows service restarts into `<exe>.next`
    /// instead (`service::restart_into`), and this supervisor stops. Run in a Windows
    /// console, where no service manager restarts anything, the new executable is
    /// promoted in place and its supervisor runs from the next start.
    fn hand_over(&self, mut journal: Journal) -> anyhow::Result<HandedOver> {
        let next = install::next_path(&self.exe);
        if crate::platform::process::CAN_REPLACE_ITSELF {
            journal.advance(&self.state_dir, Step::HandOver)?;
            let mut args = vec!["run".to_owned()];
            args.extend(self.worker_args.iter().cloned());
            let err = crate::platform::process::replace_self(&next, &args, (EXE_ENV, &self.exe));
            self.revert(
                journal,
                &format!("the new version's supervisor could not start: {err}"),
            )?;
            return Ok(HandedOver::Continue);
        }
        if crate::service::running_as_service() {
            journal.advance(&self.state_dir, Step::HandOver)?;
            return match crate::service::restart_into(&next, &self.exe, &self.state_dir) {
                Ok(()) => {
                    tracing::info!(version = %journal.version, "the service restarts into the new version's supervisor");
                    Ok(HandedOver::Stop)
                }
                Err(err) => {
                    self.revert(
                        journal,
                        &format!("the new version's supervisor could not start: {err:#}"),
                    )?;
                    Ok(HandedOver::Continue)
                }
            };
        }
        signing::record_installed(&self.state_dir, journal.counter);
        install::promote(&self.exe)?;
        journal.advance(&self.state_dir, Step::Promoted)?;
        tracing::info!(version = %journal.version, "new version installed");
        Ok(HandedOver::Continue)
    }

    fn revert(&self, mut journal: Journal, reason: &str) -> anyhow::Result<()> {
        tracing::error!(version = %journal.version, %reason, "back to {}", journal.previous_version);
        // Whatever killed the probation, the new build did not prove itself.
        journal.end(&self.state_dir, Step::Reverted, reason, FailureClass::Build)?;
        install::discard(&self.exe)
    }

    /// Waits until the new version commits (it connected and heartbeated), exits, or
    /// runs out of time. `None` on shutdown.
    async fn watch_probation(
        &self,
        worker: &mut Child,
        shutdown: &CancellationToken,
    ) -> Option<Probation> {
        let deadline = tokio::time::Instant::now() + self.probation;
        loop {
            match journal::load(&self.state_dir) {
                Ok(None) => return Some(Probation::Passed),
                Ok(Some(journal)) if journal.step == Step::Committed => {
                    return Some(Probation::Passed);
                }
                Ok(Some(_)) | Err(_) => {}
            }
            tokio::select! {
                status = worker.wait() => {
                    // A worker that exits as it commits has still passed.
                    if let Ok(Some(journal)) = journal::load(&self.state_dir)
                        && journal.step == Step::Committed
                    {
                        return Some(Probation::Passed);
                    }
                    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                    return Some(Probation::Failed(format!("the new version exited ({status}) during probation")));
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Some(Probation::Failed(format!(
                        "the new version did not connect and heartbeat within {}s",
                        self.probation.as_secs()
                    )));
                }
                () = tokio::time::sleep(PROBATION_POLL) => {}
                () = shutdown.cancelled() => return None,
            }
        }
    }
}

/// A process past its start (the supervisor once its worker runs, the worker once
/// welcomed) gives back the pages of the executable that only its start needed
/// (`platform::memory`); `process` names it in the log line.
pub(crate) fn release_start_up_pages(process: &str) {
    let mappings = crate::platform::memory::release_start_up_pages();
    tracing::debug!(
        process,
        mappings_kib = mappings / 1024,
        "gave back the executable's start-up pages"
    );
}

/// Locks the state directory for this supervisor until the returned file closes (at
/// exit, or at the exec of a hand-over: the file does not survive it). A second
/// supervisor (a `run` by hand beside the service, a service manager starting one
/// twice) is refused rather than run a second session with the same identity.
fn lock(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = state_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("while opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            let running =
                std::fs::read_to_string(state_dir.join(SUPERVISOR_FILE)).unwrap_or_default();
            anyhow::bail!(
                "another supervisor runs with the state directory {} ({running}); stop it first",
                state_dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(err)) => {
            Err(err).with_context(|| format!("while locking {}", path.display()))
        }
    }
}

async fn stop(mut worker: Child) -> anyhow::Result<()> {
    // Safe at any moment: every step of an update is journaled.
    let _ = worker.kill().await;
    Ok(())
}

/// Brings an interrupted update to a consistent point before any worker starts, as the
/// supervisor of version `running` sees it.
pub(crate) fn recover(state_dir: &Path, exe: &Path, running: &str) -> anyhow::Result<Recovered> {
    let Some(mut journal) = journal::load(state_dir)? else {
        return Ok(Recovered::Start);
    };
    let next = install::next_path(exe);
    let next_is_target =
        || install::sha256_file(&next).ok().as_deref() == Some(journal.sha256.as_str());
    Ok(match journal.step {
        // The worker resumes these.
        Step::Downloading | Step::Verified => Recovered::Start,
        Step::Installing => {
            if !next_is_target() {
                let verified = journal::verified_path(state_dir, &journal.task_id);
                if install::sha256_file(&verified).ok().as_deref() != Some(journal.sha256.as_str())
                {
                    journal.end(
                        state_dir,
                        Step::Failed,
                        "install was interrupted and the staged build is gone",
                        FailureClass::Environment,
                    )?;
                    install::discard(exe)?;
                    return Ok(Recovered::Start);
                }
                if let Err(err) = install::stage(exe, &verified) {
                    // A full disk, say: the old executable starts; the update failed.
                    journal.end(
                        state_dir,
                        Step::Failed,
                        &format!("install failed: {err:#}"),
                        FailureClass::Environment,
                    )?;
                    return Ok(Recovered::Start);
                }
            }
            journal.advance(state_dir, Step::Probation)?;
            Recovered::Probation(journal)
        }
        Step::Probation if next_is_target() => Recovered::Probation(journal),
        Step::Probation => {
            journal.end(
                state_dir,
                Step::Failed,
                "the new build vanished during its probation",
                FailureClass::Environment,
            )?;
            Recovered::Start
        }
        // The worker passed; its supervisor has yet to take over.
        Step::Committed if next_is_target() => Recovered::HandOver(journal),
        // Promoted by a supervisor from before the hand-over, which does not clear the
        // journal: this is the new build, in place.
        Step::Committed if journal.version == running => {
            signing::record_installed(state_dir, journal.counter);
            journal.advance(state_dir, Step::Promoted)?;
            Recovered::Start
        }
        Step::Committed => {
            journal.end(
                state_dir,
                Step::Failed,
                "the new build vanished before its supervisor took over",
                FailureClass::Environment,
            )?;
            Recovered::Start
        }
        // This is the new build's supervisor, handed over to: it takes over.
        Step::HandOver if journal.version == running => {
            signing::record_installed(state_dir, journal.counter);
            install::promote(exe)?;
            journal.advance(state_dir, Step::Promoted)?;
            tracing::info!(version = %journal.version, "the new supervisor took over");
            Recovered::Start
        }
        // The old supervisor, started again: the new one did not take over.
        Step::HandOver => {
            tracing::error!(version = %journal.version, "the new version's supervisor did not take over; back to {}", journal.previous_version);
            // Refused if offered again: the server may have counted its worker's
            // heartbeat as a success already.
            journal::reject_build(state_dir, &journal.sha256)?;
            journal.end(
                state_dir,
                Step::Reverted,
                "the new version's supervisor did not take over",
                FailureClass::Build,
            )?;
            install::discard(exe)?;
            Recovered::Start
        }
        // In place, perhaps not yet promoted on disk; the worker reports it.
        Step::Promoted => {
            install::promote(exe)?;
            Recovered::Start
        }
        // Reported by the worker; the executable was never touched.
        Step::Failed | Step::Reverted => {
            install::discard(exe)?;
            Recovered::Start
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::sample;

    const NEW: &[u8] = b"new";
    const OLD: &[u8] = b"old";
    /// The versions of `journal::sample`.
    const NEW_VERSION: &str = "1.1.0";
    const OLD_VERSION: &str = "1.0.0";

    /// A state directory and executable as a kill at `step` leaves them: the executable
    /// always holds the old build; `<exe>.next` holds `next`, if anything.
    fn killed_at(
        step: Step,
        next: Option<&[u8]>,
        staged: bool,
    ) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(journal::staging_dir(&state)).unwrap();
        let exe = dir.path().join("drover-agent");
        std::fs::write(&exe, OLD).unwrap();
        if let Some(next) = next {
            std::fs::write(install::next_path(&exe), next).unwrap();
        }
        if staged {
            std::fs::write(journal::verified_path(&state, "task-1"), NEW).unwrap();
        }
        let mut journal = sample(step);
        journal.sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(NEW));
        journal::save(&state, &journal).unwrap();
        (dir, state, exe)
    }

    /// What `recover` decided, as a word.
    fn kind(recovered: &Recovered) -> &'static str {
        match recovered {
            Recovered::Start => "start",
            Recovered::Probation(_) => "probation",
            Recovered::HandOver(_) => "hand over",
        }
    }

    #[test]
    fn every_step_recovers_to_the_old_or_the_new_version() {
        // (step at the kill, <exe>.next, staged build present, version running) →
        // (what next, executable after, <exe>.next after, journal step after)
        type Case = (
            Step,
            Option<&'static [u8]>,
            bool,
            &'static str,
            &'static str,
            &'static [u8],
            bool,
            Step,
        );
        const OLD_V: &str = OLD_VERSION;
        const NEW_V: &str = NEW_VERSION;
        #[rustfmt::skip]
        let cases: [Case; 17] = [
            (Step::Downloading, None, false, OLD_V, "start", OLD, false, Step::Downloading),
            (Step::Verified, None, true, OLD_V, "start", OLD, false, Step::Verified),
            (Step::Installing, None, true, OLD_V, "probation", OLD, true, Step::Probation),
            (Step::Installing, Some(b"ne"), true, OLD_V, "probation", OLD, true, Step::Probation),
            (Step::Installing, Some(NEW), true, OLD_V, "probation", OLD, true, Step::Probation),
            (Step::Installing, None, false, OLD_V, "start", OLD, false, Step::Failed),
            (Step::Probation, Some(NEW), false, OLD_V, "probation", OLD, true, Step::Probation),
            (Step::Probation, None, false, OLD_V, "start", OLD, false, Step::Failed),
            // Passed; killed before the hand-over: hand over now.
            (Step::Committed, Some(NEW), false, OLD_V, "hand over", OLD, true, Step::Committed),
            (Step::Committed, None, false, OLD_V, "start", OLD, false, Step::Failed),
            (Step::Committed, None, false, NEW_V, "start", OLD, false, Step::Promoted),
            // The new supervisor, handed over to, takes over.
            (Step::HandOver, Some(NEW), false, NEW_V, "start", NEW, false, Step::Promoted),
            // The old supervisor, started again after the new one stopped, reverts.
            (Step::HandOver, Some(NEW), false, OLD_V, "start", OLD, false, Step::Reverted),
            // The new supervisor was killed after promoting, or in the middle of it.
            (Step::HandOver, None, false, NEW_V, "start", OLD, false, Step::Promoted),
            (Step::Promoted, Some(NEW), false, NEW_V, "start", NEW, false, Step::Promoted),
            (Step::Promoted, None, false, NEW_V, "start", OLD, false, Step::Promoted),
            (Step::Reverted, Some(NEW), false, OLD_V, "start", OLD, false, Step::Reverted),
        ];
        for (step, next, staged, running, what, exe_after, next_after, step_after) in cases {
            let (_dir, state, exe) = killed_at(step, next, staged);
            let result = recover(&state, &exe, running).unwrap();
            let label = format!("{step:?} with next {next:?}, staged {staged}, running {running}");
            assert_eq!(kind(&result), what, "{label}");
            assert_eq!(std::fs::read(&exe).unwrap(), exe_after, "{label}");
            assert_eq!(install::next_path(&exe).exists(), next_after, "{label}");
            if next_after {
                assert_eq!(
                    std::fs::read(install::next_path(&exe)).unwrap(),
                    NEW,
                    "{label}"
                );
            }
            assert_eq!(
                journal::load(&state).unwrap().unwrap().step,
                step_after,
                "{label}"
            );
        }
    }

    #[test]
    fn a_signed_update_records_its_release_counter_when_its_supervisor_takes_over() {
        let (_dir, state, exe) = killed_at(Step::HandOver, Some(NEW), false);
        let mut journal = journal::load(&state).unwrap().unwrap();
        journal.counter = Some(12);
        journal::save(&state, &journal).unwrap();
        signing::record_counter(&state, 11).unwrap();
        recover(&state, &exe, NEW_VERSION).unwrap();
        assert_eq!(std::fs::read(&exe).unwrap(), NEW);
        assert_eq!(signing::last_counter(&state).unwrap(), Some(12));

        // A build that never passed probation records nothing.
        let (_dir, state, exe) = killed_at(Step::Reverted, Some(NEW), false);
        let mut journal = journal::load(&state).unwrap().unwrap();
        journal.counter = Some(12);
        journal::save(&state, &journal).unwrap();
        recover(&state, &exe, OLD_VERSION).unwrap();
        assert_eq!(signing::last_counter(&state).unwrap(), None);
    }

    #[cfg(unix)]
    #[test]
    fn a_full_disk_while_finishing_an_install_starts_the_old_version() {
        let (_dir, state, exe) = killed_at(Step::Installing, None, true);
        // Every write to /dev/full fails with ENOSPC, as on a full disk.
        std::os::unix::fs::symlink(
            "/dev/full",
            install::next_path(&exe).with_extension("next.tmp"),
        )
        .unwrap();
        assert!(matches!(
            recover(&state, &exe, OLD_VERSION).unwrap(),
            Recovered::Start
        ));
        assert_eq!(std::fs::read(&exe).unwrap(), OLD);
        assert!(!install::next_path(&exe).exists());
        let journal = journal::load(&state).unwrap().unwrap();
        assert_eq!(journal.step, Step::Failed);
        assert_eq!(journal.failure_class, Some(FailureClass::Environment));
        let reason = journal.reason.unwrap();
        assert!(reason.contains("No space left on device"), "{reason}");
    }

    #[test]
    fn a_build_whose_supervisor_did_not_take_over_is_remembered() {
        let (_dir, state, exe) = killed_at(Step::HandOver, Some(NEW), false);
        let sha256 = journal::load(&state).unwrap().unwrap().sha256;
        recover(&state, &exe, OLD_VERSION).unwrap();
        assert!(journal::is_rejected(&state, &sha256));

        // Its own supervisor taking over rejects nothing.
        let (_dir, state, exe) = killed_at(Step::HandOver, Some(NEW), false);
        recover(&state, &exe, NEW_VERSION).unwrap();
        assert!(!journal::is_rejected(&state, &sha256));
    }

    #[test]
    fn one_supervisor_a_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        let err = format!("{:#}", lock(dir.path()).unwrap_err());
        assert!(err.contains("another supervisor runs"), "{err}");
        drop(held);
        lock(dir.path()).unwrap();
    }

    #[test]
    fn no_journal_means_nothing_to_recover() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("drover-agent");
        std::fs::write(&exe, OLD).unwrap();
        assert!(matches!(
            recover(dir.path(), &exe, OLD_VERSION).unwrap(),
            Recovered::Start
        ));
        assert_eq!(std::fs::read(&exe).unwrap(), OLD);
    }
}
