//! Session claims: which node holds each agent's session. Every session start claims
//! its agent for this node and every end releases it; one writer task writes them in
//! the order they came, whatever queued meanwhile in one transaction. A fleet coming
//! back after a restart would otherwise queue one commit per agent behind the database's
//! writer. A session waits for its claim to be written before it welcomes its agent, so
//! a welcomed agent reads online on every node; nothing waits for a release. The other
//! nodes hear a batch's claims in one signal, and the dashboard hears of each agent once
//! its row says where it is.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::{mpsc, oneshot};

use crate::clock::now_ms;
use crate::events::Events;
use crate::nodes::Signal;
use crate::session::Registry;
use crate::store::{SessionChange, Store};

/// Changes waiting for the writer; beyond it a session waits for room.
const QUEUE_CAPACITY: usize = 65_536;
/// At most this many changes in one transaction.
const MAX_BATCH: usize = 2_000;
/// A batch that fails (a lost connection, a deadlock the database broke) is written
/// again, up to this many times in all, waiting 0.2, 0.4, 0.8 s... between: a claim
/// left unwritten would show a connected agent offline until it reconnects.
const ATTEMPTS: u32 = 5;

enum Request {
    /// A change, and who waits until it is written.
    Change(SessionChange, Option<oneshot::Sender<()>>),
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

/// Where sessions send their claims and releases.
#[derive(Clone)]
pub(crate) struct Claims {
    requests: mpsc::Sender<Request>,
}

/// The last claim's moment on this node: every claim gets a later one, so a session's
/// claim identifies it and an older session's release cannot undo a newer claim.
static LAST_CLAIM: AtomicI64 = AtomicI64::new(0);

fn claim_moment() -> i64 {
    let now = now_ms();
    let previous = LAST_CLAIM
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(now);
    now.max(previous + 1)
}

impl Claims {
    /// Starts the writer for node `node_id`.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        node_id: Arc<str>,
        registry: Arc<Registry>,
        events: Events,
    ) -> Claims {
        let (requests, queue) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(write(store, node_id, registry, events, queue));
        Claims { requests }
    }

    /// Claims the agent's session for this node and waits until the claim is written,
    /// so an agent is online everywhere before it is welcomed; returns the claim's
    /// moment, which `release` needs.
    pub(crate) async fn claim(&self, agent_id: &str) -> i64 {
        let at_ms = claim_moment();
        let (done, written) = oneshot::channel();
        let claim = SessionChange::Claim {
            agent_id: agent_id.to_owned(),
            at_ms,
        };
        self.send(Request::Change(claim, Some(done))).await;
        let _ = written.await;
        at_ms
    }

    /// Releases the session claimed at `claimed_at_ms`, unless a newer claim replaced it.
    pub(crate) async fn release(&self, agent_id: &str, claimed_at_ms: i64) {
        let release = SessionChange::Release {
            agent_id: agent_id.to_owned(),
            claimed_at_ms,
        };
        self.send(Request::Change(release, None)).await;
    }

    /// Waits until everything sent before it is written (at shutdown).
    pub(crate) async fn flush(&self) {
        let (done, written) = oneshot::channel();
        self.send(Request::Flush(done)).await;
        let _ = written.await;
    }

    async fn send(&self, request: Request) {
        // The writer runs as long as the runtime does.
        let _ = self.requests.send(request).await;
    }
}

async fn write(
    store: Arc<dyn Store>,
    node_id: Arc<str>,
    registry: Arc<Registry>,
    events: Events,
    mut queue: mpsc::Receiver<Request>,
) {
    let mut requests = Vec::with_capacity(MAX_BATCH);
    let mut changes = Vec::with_capacity(MAX_BATCH);
    let mut waiting = Vec::new();
    // The first change after a quiet spell is written at once; what queues while a
    // batch is written goes in the next.
    while queue.recv_many(&mut requests, MAX_BATCH).await > 0 {
        for request in requests.drain(..) {
            match request {
                Request::Change(change, done) => {
                    changes.push(change);
                    waiting.extend(done);
                }
                Request::Flush(done) => waiting.push(done),
            }
        }
        if !changes.is_empty() {
            record(store.as_ref(), &node_id, &changes).await;
            let mut claimed = Vec::new();
            for change in changes.drain(..) {
                match change {
                    SessionChange::Claim { agent_id, .. } => {
                        events.agent(&agent_id);
                        claimed.push(agent_id);
                    }
                    SessionChange::Release { agent_id, .. } => events.agent(&agent_id),
                }
            }
            if !claimed.is_empty() {
                registry.signal_other_nodes(Signal::Claimed(claimed));
            }
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

async fn record(store: &dyn Store, node_id: &str, changes: &[SessionChange]) {
    for attempt in 1..=ATTEMPTS {
        let Err(err) = store.record_sessions(node_id, changes).await else {
            return;
        };
        if attempt == ATTEMPTS {
            tracing::warn!(%err, changes = changes.len(), "could not record the sessions");
            return;
        }
        tracing::warn!(%err, changes = changes.len(), attempt, "could not record the sessions; trying again");
        tokio::time::sleep(std::time::Duration::from_millis(100 << attempt)).await;
    }
}
