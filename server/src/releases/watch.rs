//! Keeps the current `ReleaseIndex` fresh: rescans on filesystem events (debounced), on a
//! fallback timer and on request. Nothing outside this file sees `notify`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{ReleaseIndex, ScanOptions, Scanner};

#[derive(Debug, Clone, Copy)]
pub(crate) struct WatchOptions {
    /// Quiet time after the last filesystem event before rescanning, so a copy in
    /// progress is scanned once it stops rather than on every write.
    pub(crate) debounce: Duration,
    /// Rescan at least this often: network filesystems send no events.
    pub(crate) fallback_every: Duration,
}

impl Default for WatchOptions {
    fn default() -> WatchOptions {
        WatchOptions {
            debounce: Duration::from_millis(300),
            fallback_every: Duration::from_secs(60),
        }
    }
}

type Reply = oneshot::Sender<Arc<ReleaseIndex>>;

/// A handle on the current release index, kept fresh by a background task.
#[derive(Clone)]
pub(crate) struct Releases {
    index: watch::Receiver<Arc<ReleaseIndex>>,
    rescans: mpsc::Sender<Reply>,
}

impl Releases {
    /// Scans once, then keeps the index fresh until `shutdown` fires. If the directory
    /// cannot be watched, logs a warning and relies on the fallback timer.
    pub(crate) async fn start(
        dir: PathBuf,
        scan: ScanOptions,
        watch: WatchOptions,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Releases> {
        Releases::start_with(dir, scan, watch, shutdown, true).await
    }

    async fn start_with(
        dir: PathBuf,
        scan: ScanOptions,
        options: WatchOptions,
        shutdown: CancellationToken,
        use_events: bool,
    ) -> anyhow::Result<Releases> {
        let events = Arc::new(Notify::new());
        // Watching starts before the first scan, so no change can fall between the two.
        let watcher = if use_events {
            watch_directory(&dir, &events, options.fallback_every)
        } else {
            None
        };
        let scanner = Arc::new(Mutex::new(Scanner::new(dir, scan)));
        let first = scan_blocking(&scanner)
            .await
            .context("while scanning the downloads directory")?;
        log_changes(&ReleaseIndex::default(), &first);

        let (index_tx, index_rx) = watch::channel(Arc::new(first));
        let (rescan_tx, rescan_rx) = mpsc::channel(16);
        let task = WatchTask {
            scanner,
            index: index_tx,
            requests: rescan_rx,
            events,
            options,
            shutdown,
            _watcher: watcher,
        };
        tokio::spawn(task.run());
        Ok(Releases {
            index: index_rx,
            rescans: rescan_tx,
        })
    }

    pub(crate) fn current(&self) -> Arc<ReleaseIndex> {
        self.index.borrow().clone()
    }

    /// Rescans now and returns the new index. After shutdown, returns the last index.
    pub(crate) async fn rescan(&self) -> Arc<ReleaseIndex> {
        let (reply, answer) = oneshot::channel();
        if self.rescans.send(reply).await.is_ok()
            && let Ok(index) = answer.await
        {
            return index;
        }
        self.current()
    }

    /// Fires whenever a scan produced an index different from the previous one; ends
    /// once the watcher has stopped.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<ReleaseIndex>> {
        let mut receiver = self.index.clone();
        receiver.mark_unchanged();
        receiver
    }
}

struct WatchTask {
    scanner: Arc<Mutex<Scanner>>,
    index: watch::Sender<Arc<ReleaseIndex>>,
    requests: mpsc::Receiver<Reply>,
    events: Arc<Notify>,
    options: WatchOptions,
    shutdown: CancellationToken,
    /// Events stop when this is dropped.
    _watcher: Option<RecommendedWatcher>,
}

impl WatchTask {
    async fn run(mut self) {
        let every = self.options.fallback_every;
        let mut fallback = tokio::time::interval_at(Instant::now() + every, every);
        fallback.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut quiet_until: Option<Instant> = None;
        let mut accepting = true;
        loop {
            let mut waiting = Vec::new();
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                // Every handle and subscriber is gone: nobody would see another scan.
                () = self.index.closed() => break,
                () = self.events.notified() => {
                    quiet_until = Some(Instant::now() + self.options.debounce);
                    continue;
                }
                () = tokio::time::sleep_until(quiet_until.unwrap_or_else(Instant::now)),
                    if quiet_until.is_some() => {}
                _ = fallback.tick() => {}
                request = self.requests.recv(), if accepting => match request {
                    Some(reply) => waiting.push(reply),
                    None => {
                        accepting = false;
                        continue;
                    }
                },
            }
            // Requests queued meanwhile are answered by this one scan.
            while let Ok(reply) = self.requests.try_recv() {
                waiting.push(reply);
            }
            // Events arriving during the scan re-arm the debounce through the stored
            // permit of `notified`, so clearing it loses nothing.
            quiet_until = None;
            fallback.reset();

            let scanned = tokio::select! {
                () = self.shutdown.cancelled() => break,
                scanned = scan_blocking(&self.scanner) => scanned,
            };
            match scanned {
                Ok(next) => self.publish(next),
                Err(err) => tracing::error!("{err:#}"),
            }
            let current = self.index.borrow().clone();
            for reply in waiting {
                let _ = reply.send(current.clone());
            }
        }
    }

    /// Sends only a changed index, so subscribers are not woken for nothing.
    fn publish(&self, next: ReleaseIndex) {
        let previous = self.index.borrow().clone();
        if *previous == next {
            return;
        }
        log_changes(&previous, &next);
        self.index.send_replace(Arc::new(next));
    }
}

async fn scan_blocking(scanner: &Arc<Mutex<Scanner>>) -> anyhow::Result<ReleaseIndex> {
    let scanner = scanner.clone();
    tokio::task::spawn_blocking(move || {
        // A panicked scan leaves nothing half-done that the next scan relies on.
        scanner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .scan()
    })
    .await
    .context("scanning the downloads directory failed")
}

fn watch_directory(
    dir: &Path,
    events: &Arc<Notify>,
    fallback_every: Duration,
) -> Option<RecommendedWatcher> {
    let events = events.clone();
    let handler = move |event: notify::Result<notify::Event>| {
        // An error may mean lost events: rescanning is the safe answer.
        if event.as_ref().map_or(true, is_relevant) {
            events.notify_one();
        }
    };
    let watcher = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match watcher {
        Ok(watcher) => Some(watcher),
        Err(err) => {
            tracing::warn!(
                "cannot watch {} for new builds ({err}); rescanning every {} instead",
                dir.display(),
                humantime::format_duration(fallback_every)
            );
            None
        }
    }
}

fn is_relevant(event: &notify::Event) -> bool {
    // The scanner's own reads raise open and close events; rescanning on those would
    // never stop. A close after writing does mark a finished file.
    if let EventKind::Access(kind) = event.kind
        && kind != AccessKind::Close(AccessMode::Write)
    {
        return false;
    }
    event.need_rescan() || event.paths.is_empty() || event.paths.iter().any(|path| !is_hidden(path))
}

/// Hidden files (temporary copies among them) are never listed, so they need no scan.
fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|name| name.as_encoded_bytes().starts_with(b"."))
}

/// Logs what an operator wants to know once: builds offered, withdrawn, newly skipped.
fn log_changes(previous: &ReleaseIndex, next: &ReleaseIndex) {
    let offered: BTreeMap<&str, _> = previous
        .releases
        .iter()
        .map(|r| (r.file.as_str(), (r.channel, r.sha256.as_str())))
        .collect();
    for release in &next.releases {
        if offered.get(release.file.as_str()) != Some(&(release.channel, release.sha256.as_str())) {
            tracing::info!("offering {} ({})", release.file, release.channel);
        }
    }
    for release in &previous.releases {
        if next.by_file(&release.file).is_none() {
            tracing::info!("no longer offering {}", release.file);
        }
    }
    let skipped: BTreeSet<(&str, &str)> = previous
        .skipped
        .iter()
        .map(|s| (s.file.as_str(), s.reason.as_str()))
        .collect();
    for skip in &next.skipped {
        if !skipped.contains(&(skip.file.as_str(), skip.reason.as_str())) {
            tracing::info!("skipping {}: {}", skip.file, skip.reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use sha2::{Digest, Sha256};

    use super::*;

    const BUILD: &str = "drover-agent-linux-amd64-1.0.0";
    const LONG: Duration = Duration::from_secs(3600);
    const PATIENCE: Duration = Duration::from_secs(3);

    fn publish(dir: &Path, name: &str, content: &str) {
        fs::write(dir.join(name), content).unwrap();
        let digest = hex::encode(Sha256::digest(content));
        fs::write(dir.join(format!("{name}.sha256")), digest).unwrap();
    }

    async fn start(
        dir: &Path,
        options: WatchOptions,
        use_events: bool,
    ) -> (Releases, CancellationToken) {
        let shutdown = CancellationToken::new();
        let releases = Releases::start_with(
            dir.to_path_buf(),
            ScanOptions::default(),
            options,
            shutdown.clone(),
            use_events,
        )
        .await
        .unwrap();
        (releases, shutdown)
    }

    async fn eventually_offered(releases: &Releases, file: &str) {
        let mut updates = releases.subscribe();
        let seen = tokio::time::timeout(
            PATIENCE,
            updates.wait_for(|index| index.by_file(file).is_some()),
        );
        assert!(
            seen.await.is_ok_and(|r| r.is_ok()),
            "{file} not offered within {PATIENCE:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn subscriber_sees_a_new_build_from_filesystem_events() {
        let dir = tempfile::tempdir().unwrap();
        let options = WatchOptions {
            debounce: Duration::from_millis(50),
            fallback_every: LONG,
        };
        let (releases, shutdown) = start(dir.path(), options, true).await;
        assert_eq!(*releases.current(), ReleaseIndex::default());

        publish(dir.path(), BUILD, "build");
        eventually_offered(&releases, BUILD).await;
        assert!(releases.current().by_file(BUILD).is_some());
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn rescan_reflects_a_change_made_just_before() {
        let dir = tempfile::tempdir().unwrap();
        let options = WatchOptions {
            debounce: LONG,
            fallback_every: LONG,
        };
        let (releases, shutdown) = start(dir.path(), options, true).await;
        let mut updates = releases.subscribe();

        publish(dir.path(), BUILD, "build");
        assert!(releases.rescan().await.by_file(BUILD).is_some());
        assert!(updates.has_changed().unwrap());
        updates.mark_unchanged();

        // Nothing changed, so nobody is woken.
        assert!(releases.rescan().await.by_file(BUILD).is_some());
        assert!(!updates.has_changed().unwrap());

        fs::remove_file(dir.path().join(BUILD)).unwrap();
        let index = releases.rescan().await;
        assert!(index.releases.is_empty());
        assert_eq!(index.skipped[0].reason, "sidecar without a build");
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn fallback_timer_alone_picks_up_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let options = WatchOptions {
            debounce: LONG,
            fallback_every: Duration::from_millis(200),
        };
        let (releases, shutdown) = start(dir.path(), options, false).await;
        publish(dir.path(), BUILD, "build");
        eventually_offered(&releases, BUILD).await;
        shutdown.cancel();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn stops_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        publish(dir.path(), BUILD, "build");
        let (releases, shutdown) = start(dir.path(), WatchOptions::default(), true).await;
        let mut updates = releases.subscribe();
        shutdown.cancel();

        let ended = tokio::time::timeout(PATIENCE, updates.changed()).await;
        assert!(ended.is_ok_and(|r| r.is_err()), "subscription did not end");
        // The last index stays available, and a rescan does not hang.
        assert!(releases.rescan().await.by_file(BUILD).is_some());
    }

    #[test]
    fn own_reads_and_hidden_files_do_not_trigger_scans() {
        use notify::event::{CreateKind, ModifyKind};

        let event = |kind, path: &str| notify::Event::new(kind).add_path(PathBuf::from(path));
        let cases = [
            (
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/d/build",
                false,
            ),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                "/d/build",
                false,
            ),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/d/build",
                true,
            ),
            (EventKind::Create(CreateKind::File), "/d/build", true),
            (
                EventKind::Create(CreateKind::File),
                "/d/.build.partial",
                false,
            ),
            (EventKind::Modify(ModifyKind::Any), "/d/build.channel", true),
        ];
        for (kind, path, relevant) in cases {
            assert_eq!(is_relevant(&event(kind, path)), relevant, "{kind:?} {path}");
        }
        assert!(is_relevant(&notify::Event::new(EventKind::Any)));
    }
}
