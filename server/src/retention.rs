//! Retention: finished tasks, audit entries and adoption snapshots older than their
//! configured ages, and the rows of nodes long gone, are deleted in small batches with a
//! pause between them, so sessions and heartbeats never wait long on the database. A
//! closed rollout's counts are frozen into its summary before its tasks and targets go,
//! so its record keeps saying what happened. Build failures are kept: they keep a
//! version off the agent it failed on.

use std::time::Duration;

use crate::AppState;
use crate::clock::now_ms;
use crate::store::StoreResult;

/// Rows deleted per statement.
const BATCH: i64 = 500;
/// The pause between batches: other writers go first.
const PAUSE: Duration = Duration::from_millis(20);
/// A node not heard from for this long is gone for good.
const DEAD_NODE_MS: i64 = 24 * 3600 * 1000;

/// How long each kind of row is kept; `None` keeps it forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub tasks: Option<Duration>,
    pub audit: Option<Duration>,
    pub snapshots: Option<Duration>,
    /// How often pruning runs.
    pub every: Duration,
}

impl Default for Retention {
    fn default() -> Retention {
        const DAY: u64 = 24 * 3600;
        Retention {
            tasks: Some(Duration::from_secs(90 * DAY)),
            audit: Some(Duration::from_secs(365 * DAY)),
            snapshots: Some(Duration::from_secs(365 * DAY)),
            every: Duration::from_secs(3600),
        }
    }
}

/// What one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Pruned {
    pub(crate) summarized: u64,
    pub(crate) tasks: u64,
    pub(crate) targets: u64,
    pub(crate) audit: u64,
    pub(crate) snapshots: u64,
    pub(crate) nodes: u64,
}

/// Prunes every `retention.every` until shutdown.
pub(crate) async fn run(state: AppState) {
    let mut ticker = tokio::time::interval(state.settings.retention.every);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        match prune(&state).await {
            Ok(pruned) if pruned != Pruned::default() => {
                tracing::info!(
                    summarized = pruned.summarized,
                    tasks = pruned.tasks,
                    targets = pruned.targets,
                    audit = pruned.audit,
                    snapshots = pruned.snapshots,
                    nodes = pruned.nodes,
                    "pruned rows past their retention"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(%err, "pruning failed; it is tried again later"),
        }
    }
}

fn cutoff(now: i64, age: Duration) -> i64 {
    now.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
}

/// Runs `batch` until it deletes fewer rows than a batch, pausing between batches.
async fn in_batches<F, Fut>(mut batch: F) -> StoreResult<u64>
where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = StoreResult<u64>>,
{
    let mut total = 0;
    loop {
        let deleted = batch(BATCH).await?;
        total += deleted;
        if deleted < u64::try_from(BATCH).unwrap_or(0) {
            return Ok(total);
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// One pass over every kind of row.
pub(crate) async fn prune(state: &AppState) -> StoreResult<Pruned> {
    let retention = state.settings.retention;
    let store = &state.store;
    let now = now_ms();
    let mut pruned = Pruned::default();
    if let Some(age) = retention.tasks {
        let before = cutoff(now, age);
        for rollout in store.rollouts_to_summarize(before).await? {
            let health = crate::conductor::health(state, &rollout, |_| true).await?;
            let summary = serde_json::to_string(&health.waves).unwrap_or_default();
            store.set_rollout_summary(&rollout.id, &summary).await?;
            pruned.summarized += 1;
        }
        pruned.tasks = in_batches(|n| store.prune_tasks(before, n)).await?;
        pruned.targets = in_batches(|n| store.prune_rollout_targets(n)).await?;
    }
    if let Some(age) = retention.audit {
        let before = cutoff(now, age);
        pruned.audit = in_batches(|n| store.prune_audit(before, n)).await?;
    }
    if let Some(age) = retention.snapshots {
        let before = cutoff(now, age);
        pruned.snapshots = in_batches(|n| store.prune_snapshots(before, n)).await?;
    }
    pruned.nodes = store.prune_nodes(now - DEAD_NODE_MS).await?;
    Ok(pruned)
}
