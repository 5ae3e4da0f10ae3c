//! Heartbeat ingest: sessions hand heartbeats to one writer task, which folds them per
//! agent and writes each batch in a single transaction, instead of one per heartbeat.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::COUNTERS;
use crate::store::{HeartbeatRecord, Store};

const QUEUE_CAPACITY: usize = 65_536;

#[derive(Clone)]
pub(crate) struct HeartbeatSink {
    tx: mpsc::Sender<HeartbeatRecord>,
}

impl HeartbeatSink {
    /// Queues a heartbeat; waits only when the writer is a full queue behind.
    pub(crate) async fn record(&self, beat: HeartbeatRecord) {
        // The writer only stops at shutdown, when losing a last-seen update is harmless.
        let _ = self.tx.send(beat).await;
    }
}

/// Starts the writer. It flushes every `flush_every`, and once more when `shutdown` fires;
/// the returned handle finishes after that last flush.
pub(crate) fn start(
    store: Arc<dyn Store>,
    flush_every: Duration,
    shutdown: CancellationToken,
) -> (HeartbeatSink, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let task = tokio::spawn(fold_batches(store, rx, flush_every, shutdown));
    (HeartbeatSink { tx }, task)
}

/// Drains the queue without pause, folding heartbeats per agent, and hands a batch to
/// the database writer each tick. While a write is still running the batch keeps
/// folding, so a slow database costs only freshness, never the sessions' time.
async fn fold_batches(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<HeartbeatRecord>,
    flush_every: Duration,
    shutdown: CancellationToken,
) {
    let (batches, batches_rx) = mpsc::channel::<Vec<HeartbeatRecord>>(1);
    let writer = tokio::spawn(write_batches(store, batches_rx));
    let mut pending: HashMap<String, HeartbeatRecord> = HashMap::new();
    let mut ticker = tokio::time::interval(flush_every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buffer = Vec::with_capacity(1024);
    loop {
        tokio::select! {
            received = rx.recv_many(&mut buffer, 1024) => {
                if received == 0 {
                    break;
                }
                for beat in buffer.drain(..) {
                    fold(&mut pending, beat);
                }
            }
            _ = ticker.tick() => {
                if !pending.is_empty()
                    && let Ok(slot) = batches.try_reserve()
                {
                    slot.send(pending.drain().map(|(_, beat)| beat).collect());
                }
            }
            () = shutdown.cancelled() => break,
        }
    }
    while let Ok(beat) = rx.try_recv() {
        fold(&mut pending, beat);
    }
    if !pending.is_empty() {
        let _ = batches.send(pending.into_values().collect()).await;
    }
    drop(batches);
    let _ = writer.await;
}

async fn write_batches(store: Arc<dyn Store>, mut batches: mpsc::Receiver<Vec<HeartbeatRecord>>) {
    while let Some(batch) = batches.recv().await {
        match store.record_heartbeats(&batch).await {
            Ok(()) => {
                let oldest = batch.iter().map(|b| b.at_ms).min().unwrap_or(i64::MAX);
                let lag = crate::clock::now_ms().saturating_sub(oldest).max(0);
                COUNTERS
                    .heartbeat_write_lag_ms
                    .store(u64::try_from(lag).unwrap_or(0), Ordering::Relaxed);
            }
            Err(err) => {
                tracing::warn!(count = batch.len(), %err, "could not write heartbeats; they will be written on the next beat");
            }
        }
    }
}

/// Keeps only the newest heartbeat of each agent, and a secret any of them showed.
fn fold(pending: &mut HashMap<String, HeartbeatRecord>, mut beat: HeartbeatRecord) {
    match pending.get_mut(&beat.agent_id) {
        Some(existing) => {
            let shown = beat.shown_secret.take().or(existing.shown_secret.take());
            if existing.at_ms <= beat.at_ms {
                *existing = beat;
            }
            existing.shown_secret = shown;
        }
        None => {
            pending.insert(beat.agent_id.clone(), beat);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(agent: &str, version: &str, at_ms: i64) -> HeartbeatRecord {
        HeartbeatRecord {
            agent_id: agent.into(),
            version: version.into(),
            at_ms,
            shown_secret: None,
        }
    }

    #[test]
    fn folding_keeps_the_newest_beat_per_agent() {
        let mut pending = HashMap::new();
        for b in [
            beat("a", "1.0.0", 10),
            beat("b", "1.0.0", 11),
            beat("a", "1.1.0", 30),
            beat("a", "0.9.0", 20),
        ] {
            fold(&mut pending, b);
        }
        assert_eq!(pending.len(), 2);
        assert_eq!(pending["a"], beat("a", "1.1.0", 30));
        assert_eq!(pending["b"], beat("b", "1.0.0", 11));
    }

    #[test]
    fn folding_keeps_a_shown_secret_whichever_beat_showed_it() {
        let shown = |mut b: HeartbeatRecord| {
            b.shown_secret = Some("hash".into());
            b
        };
        for beats in [
            [shown(beat("a", "1.0.0", 10)), beat("a", "1.0.0", 20)],
            [beat("a", "1.0.0", 20), shown(beat("a", "1.0.0", 10))],
            [shown(beat("a", "1.0.0", 20)), beat("a", "1.0.0", 10)],
        ] {
            let mut pending = HashMap::new();
            for b in beats {
                fold(&mut pending, b);
            }
            assert_eq!(pending["a"], shown(beat("a", "1.0.0", 20)));
        }
    }
}
