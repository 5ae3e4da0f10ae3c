//! Several server nodes on one database. Each node heartbeats in the `nodes` table and
//! marks the sessions it holds, so any node can tell which agents are online (a node
//! that dies stops heartbeating and its agents read as offline within `NODE_LEASE`).
//! Actions reach agents wherever they are connected: signals go out through the store
//! (PostgreSQL LISTEN/NOTIFY; nothing with SQLite's single node), carry only ids, and
//! the receiving node re-reads state from the database.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::AppState;
use crate::clock::now_ms;
use crate::session::Outbound;
use crate::store::StoreResult;

/// How often a node records that it is alive.
const NODE_BEAT: Duration = Duration::from_secs(5);
/// A node silent for longer than this is dead, and its agents offline.
pub(crate) const NODE_LEASE: Duration = Duration::from_secs(15);

/// Agents named in one message: ids are 36 characters, and a PostgreSQL notification
/// holds under 8,000 bytes.
const AGENTS_PER_MESSAGE: usize = 150;

/// What one node asks of the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Re-read these agents and decide again (an operator acted on them).
    Refresh(Vec<String>),
    /// Re-read blocks, halts, the update switch and the builds, and check every agent.
    CheckAll,
    /// Re-read the blocked versions only: a rollback blocked one, and tells what it
    /// moves with one `CheckAll` once its rollout is written.
    Blocked,
    /// These agents' sessions are now held by the sending node; close any other.
    Claimed(Vec<String>),
}

impl Signal {
    fn encode(&self, node: &str) -> String {
        match self {
            Signal::Refresh(agents) => format!("{node} refresh {}", agents.join(",")),
            Signal::CheckAll => format!("{node} check"),
            Signal::Blocked => format!("{node} blocked"),
            Signal::Claimed(agents) => format!("{node} claimed {}", agents.join(",")),
        }
    }

    /// The sending node and the signal; `None` for a message this version does not know.
    fn decode(message: &str) -> Option<(&str, Signal)> {
        let mut parts = message.split(' ');
        let node = parts.next()?;
        let list = |agents: &str| agents.split(',').map(str::to_owned).collect();
        let signal = match (parts.next()?, parts.next(), parts.next()) {
            ("refresh", Some(agents), None) => Signal::Refresh(list(agents)),
            ("check", None, None) => Signal::CheckAll,
            ("blocked", None, None) => Signal::Blocked,
            ("claimed", Some(agents), None) => Signal::Claimed(list(agents)),
            _ => return None,
        };
        Some((node, signal))
    }

    fn kind(&self) -> &'static str {
        match self {
            Signal::Refresh(_) => "refresh",
            Signal::CheckAll => "check_all",
            Signal::Blocked => "blocked",
            Signal::Claimed(_) => "claimed",
        }
    }
}

/// Signals waiting to go out, folded as they are posted: one `CheckAll` (or, without
/// one, one `Blocked`: a `CheckAll` re-reads the blocks too), ahead of each agent once
/// per kind, in the order first posted. The queue so never holds more than the
/// fleet's agents twice over, however fast signals come (a connect storm claims
/// thousands of sessions at once), and posting never waits.
#[derive(Default)]
pub(crate) struct Outbox {
    pending: Mutex<Pending>,
    posted: Notify,
}

#[derive(Default)]
struct Pending {
    check_all: bool,
    blocked: bool,
    refresh: Folded,
    claimed: Folded,
}

/// Agent ids in the order first added, each once.
#[derive(Default)]
struct Folded {
    order: Vec<String>,
    seen: HashSet<String>,
}

impl Folded {
    fn extend(&mut self, agents: Vec<String>) {
        for agent in agents {
            if self.seen.insert(agent.clone()) {
                self.order.push(agent);
            }
        }
    }

    /// The agents in messages that fit.
    fn take(&mut self, signal: fn(Vec<String>) -> Signal) -> Vec<Signal> {
        self.seen.clear();
        std::mem::take(&mut self.order)
            .chunks(AGENTS_PER_MESSAGE)
            .map(|chunk| signal(chunk.to_vec()))
            .collect()
    }
}

impl Outbox {
    pub(crate) fn post(&self, signal: Signal) {
        {
            let mut pending = self.lock();
            match signal {
                Signal::Refresh(agents) => pending.refresh.extend(agents),
                Signal::Claimed(agents) => pending.claimed.extend(agents),
                Signal::CheckAll => pending.check_all = true,
                Signal::Blocked => pending.blocked = true,
            }
        }
        self.posted.notify_one();
    }

    /// Everything posted since the last call, as few messages as say the same; waits
    /// while there is nothing.
    async fn next(&self) -> Vec<Signal> {
        loop {
            let out = self.take();
            if !out.is_empty() {
                return out;
            }
            self.posted.notified().await;
        }
    }

    fn take(&self) -> Vec<Signal> {
        let mut pending = self.lock();
        let blocked = std::mem::take(&mut pending.blocked);
        let first = match std::mem::take(&mut pending.check_all) {
            true => Some(Signal::CheckAll),
            false => blocked.then_some(Signal::Blocked),
        };
        let mut out: Vec<Signal> = first.into_iter().collect();
        out.extend(pending.refresh.take(Signal::Refresh));
        out.extend(pending.claimed.take(Signal::Claimed));
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Every change to `Pending` is whole before the lock is released.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether an agent's node is alive: the agent is online somewhere.
pub(crate) fn is_live(node_last_beat_ms: Option<i64>, now_ms: i64) -> bool {
    node_last_beat_ms.is_some_and(|beat| beat >= live_since(now_ms))
}

/// The oldest node beat that still counts as alive at `now_ms`: what `is_live` asks,
/// for queries that count in the database.
pub(crate) fn live_since(now_ms: i64) -> i64 {
    let lease = i64::try_from(NODE_LEASE.as_millis()).unwrap_or(i64::MAX);
    now_ms.saturating_sub(lease)
}

/// Heartbeats this node, sends its signals, and acts on the other nodes'.
pub(crate) async fn start(state: AppState) -> StoreResult<()> {
    state
        .store
        .node_beat(&state.node_id, &state.settings.public_url, now_ms())
        .await?;
    tokio::spawn(beat(state.clone()));
    let Some(mut subscription) = state.store.subscribe().await? else {
        // The only node: every session recorded before this start died with the last
        // process, so nobody should read as online until they reconnect.
        return state.store.forget_sessions().await;
    };
    let outbox = Arc::new(Outbox::default());
    state.registry.reach_other_nodes(outbox.clone());
    let sender = state.clone();
    tokio::spawn(async move {
        loop {
            let signals = tokio::select! {
                signals = outbox.next() => signals,
                () = sender.shutdown.cancelled() => return,
            };
            for signal in signals {
                if let Err(err) = sender.store.publish(&signal.encode(&sender.node_id)).await {
                    tracing::warn!(%err, kind = signal.kind(), "could not signal the other nodes");
                }
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                message = subscription.next() => message,
                () = state.shutdown.cancelled() => return,
            };
            match message {
                Ok(Some(message)) => match Signal::decode(&message) {
                    Some((node, _)) if node == &*state.node_id => {}
                    Some((_, signal)) => act(&state, signal).await,
                    None => {
                        tracing::debug!(%message, "ignoring a signal this version does not know")
                    }
                },
                Ok(None) => {
                    tracing::warn!(
                        "reconnected to the other nodes; re-checking what may have been missed"
                    );
                    recheck_after_loss(&state).await;
                }
                Err(err) => {
                    tracing::warn!(%err, "lost the other nodes; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    Ok(())
}

async fn act(state: &AppState, signal: Signal) {
    let items = match &signal {
        Signal::Refresh(agents) | Signal::Claimed(agents) => agents.len(),
        Signal::CheckAll | Signal::Blocked => 1,
    };
    crate::metrics::COUNTERS.signal_received(signal.kind(), items);
    match signal {
        Signal::Refresh(agents) => {
            for agent in &agents {
                state.registry.send_here(agent, Outbound::Refresh);
                state.events.agent(agent);
            }
        }
        Signal::Claimed(agents) => {
            for agent in &agents {
                // Dashboards watching this node learn of the agent's new session
                // elsewhere.
                state.events.agent(agent);
                state.registry.send_here(
                    agent,
                    Outbound::Close(
                        protocol::RejectCode::Replaced,
                        "a newer session of this agent connected to another server".into(),
                    ),
                );
            }
        }
        Signal::CheckAll => {
            reread_shared_state(state).await;
            state.registry.broadcast_here(|| Outbound::Check);
        }
        Signal::Blocked => {
            if let Err(err) = state.reload_blocked_versions().await {
                tracing::warn!(%err, "could not re-read the versions another node blocked");
            }
        }
    }
}

/// Re-reads what every node shares (blocks, halts, the update switch, the builds).
async fn reread_shared_state(state: &AppState) {
    if let Err(err) = state.reload_shared_state().await {
        tracing::warn!(%err, "could not re-read state another node changed");
    }
    state.releases.rescan().await;
}

/// Whatever the other nodes said while this node could not hear them is lost. Re-read
/// what every node shares (blocks, halts, the update switch, the builds), and have each
/// session here decide again, re-reading its agent only when the database's rows differ
/// from what the session holds (`dispatch::stamp`): two queries for the node rather
/// than three for each of its sessions.
async fn recheck_after_loss(state: &AppState) {
    reread_shared_state(state).await;
    crate::metrics::Counters::bump(&crate::metrics::COUNTERS.fleet_checks);
    let (agents, tasks) = match state.store.held_by(&state.node_id).await {
        Ok(held) => held,
        Err(err) => {
            tracing::warn!(%err, "could not read this node's agents; re-reading each");
            state.registry.broadcast_here(|| Outbound::Refresh);
            return;
        }
    };
    let tasks: HashMap<&str, &str> = tasks
        .iter()
        .map(|(agent, task)| (agent.as_str(), task.as_str()))
        .collect();
    let stamps: HashMap<&str, u64> = agents
        .iter()
        .map(|record| {
            let settings = crate::dispatch::settings_stamp(record);
            let task = tasks.get(record.id.as_str()).copied();
            (record.id.as_str(), crate::dispatch::stamp(settings, task))
        })
        .collect();
    for agent in state.registry.agents_here() {
        // A session whose claim the rows do not show (just connected, or claimed
        // elsewhere meanwhile) re-reads.
        let request = match stamps.get(agent.as_str()) {
            Some(stamp) => Outbound::Verify(*stamp),
            None => Outbound::Refresh,
        };
        state.registry.send_here(&agent, request);
    }
}

async fn beat(state: AppState) {
    let mut ticker = tokio::time::interval(NODE_BEAT);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        if let Err(err) = state
            .store
            .node_beat(&state.node_id, &state.settings.public_url, now_ms())
            .await
        {
            tracing::warn!(%err, "could not record this node's heartbeat");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_round_trip_and_unknown_ones_are_ignored() {
        for signal in [
            Signal::Refresh(vec!["a-1".into()]),
            Signal::CheckAll,
            Signal::Blocked,
            Signal::Claimed(vec!["a-2".into(), "a-3".into()]),
        ] {
            let message = signal.encode("node-1");
            assert_eq!(Signal::decode(&message), Some(("node-1", signal)));
        }
        assert_eq!(Signal::decode("node-1 explode"), None);
        assert_eq!(Signal::decode("node-1 check extra"), None);
        assert_eq!(Signal::decode("node-1 claimed a b"), None);
        assert_eq!(Signal::decode(""), None);
    }

    #[test]
    fn posted_signals_fold_and_go_out_as_few_messages_that_fit() {
        let ids: Vec<String> = (0..400).map(|n| format!("{n:036}")).collect();
        let mut queued: Vec<Signal> = ids
            .iter()
            .map(|id| Signal::Claimed(vec![id.clone()]))
            .collect();
        queued.insert(10, Signal::CheckAll);
        queued.insert(15, Signal::Blocked);
        queued.insert(20, Signal::Refresh(vec!["r-1".into()]));
        queued.push(Signal::CheckAll);
        queued.push(Signal::Claimed(ids[..5].to_vec()));
        let outbox = Outbox::default();
        for signal in queued {
            outbox.post(signal);
        }
        let out = outbox.take();
        assert_eq!(out.len(), 1 + 1 + 3, "{out:?}");
        assert_eq!(out[0], Signal::CheckAll);
        assert_eq!(out[1], Signal::Refresh(vec!["r-1".into()]));
        let claimed: Vec<String> = out[2..]
            .iter()
            .flat_map(|s| match s {
                Signal::Claimed(agents) => agents.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(claimed, ids, "every agent once, in order");
        for signal in &out {
            assert!(signal.encode(&"n".repeat(36)).len() < 8_000);
        }
        assert!(outbox.take().is_empty(), "what went out is gone");
        // Without a `CheckAll` to re-read them, the blocks go ahead of the agents.
        outbox.post(Signal::Refresh(vec!["r-2".into()]));
        outbox.post(Signal::Blocked);
        outbox.post(Signal::Blocked);
        assert_eq!(
            outbox.take(),
            [Signal::Blocked, Signal::Refresh(vec!["r-2".into()])]
        );
        outbox.post(Signal::Claimed(ids[..1].to_vec()));
        assert_eq!(
            outbox.take(),
            [Signal::Claimed(ids[..1].to_vec())],
            "an agent sent before may be sent again"
        );
    }

    #[test]
    fn a_node_is_live_within_its_lease() {
        assert!(is_live(Some(1_000), 1_000 + 15_000));
        assert!(!is_live(Some(1_000), 1_000 + 15_001));
        assert!(!is_live(None, 0));
    }
}
