//! Several server nodes on one database. Each node heartbeats in the `nodes` table and
//! marks the sessions it holds, so any node can tell which agents are online (a node
//! that dies stops heartbeating and its agents read as offline within `NODE_LEASE`).
//! Actions reach agents wherever they are connected: signals go out through the store
//! (PostgreSQL LISTEN/NOTIFY; nothing with SQLite's single node), carry only ids, and
//! the receiving node re-reads state from the database.

use std::time::Duration;

use tokio::sync::mpsc;

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
    /// These agents' sessions are now held by the sending node; close any other.
    Claimed(Vec<String>),
}

impl Signal {
    fn encode(&self, node: &str) -> String {
        match self {
            Signal::Refresh(agents) => format!("{node} refresh {}", agents.join(",")),
            Signal::CheckAll => format!("{node} check"),
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
            ("claimed", Some(agents), None) => Signal::Claimed(list(agents)),
            _ => return None,
        };
        Some((node, signal))
    }

    fn kind(&self) -> &'static str {
        match self {
            Signal::Refresh(_) => "refresh",
            Signal::CheckAll => "check_all",
            Signal::Claimed(_) => "claimed",
        }
    }
}

/// The signals queued while the last one was sent, as few messages as say the same:
/// one `CheckAll`, and the agents of every `Refresh` and every `Claimed` together (a
/// connect storm claims thousands of sessions at once), in batches that fit a message.
fn coalesce(queued: Vec<Signal>) -> Vec<Signal> {
    let (mut refresh, mut claimed, mut check_all) = (Vec::new(), Vec::new(), false);
    for signal in queued {
        match signal {
            Signal::Refresh(agents) => refresh.extend(agents),
            Signal::Claimed(agents) => claimed.extend(agents),
            Signal::CheckAll => check_all = true,
        }
    }
    let mut out: Vec<Signal> = check_all.then_some(Signal::CheckAll).into_iter().collect();
    out.extend(
        refresh
            .chunks(AGENTS_PER_MESSAGE)
            .map(|c| Signal::Refresh(c.to_vec())),
    );
    out.extend(
        claimed
            .chunks(AGENTS_PER_MESSAGE)
            .map(|c| Signal::Claimed(c.to_vec())),
    );
    out
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
    let (signals, mut outgoing) = mpsc::unbounded_channel::<Signal>();
    state.registry.reach_other_nodes(signals);
    let sender = state.clone();
    tokio::spawn(async move {
        while let Some(first) = outgoing.recv().await {
            let mut queued = vec![first];
            while let Ok(more) = outgoing.try_recv() {
                queued.push(more);
            }
            for signal in coalesce(queued) {
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
                // Whatever was said while the connection was down is lost: re-read all.
                Ok(None) => {
                    tracing::warn!("reconnected to the other nodes; re-reading state");
                    act(&state, Signal::CheckAll).await;
                    state.registry.broadcast_here(|| Outbound::Refresh);
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
        Signal::CheckAll => 1,
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
            if let Err(err) = state.reload_shared_state().await {
                tracing::warn!(%err, "could not re-read state another node changed");
            }
            state.releases.rescan().await;
            state.registry.broadcast_here(|| Outbound::Check);
        }
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
    fn queued_signals_go_out_as_few_messages_that_fit() {
        let ids: Vec<String> = (0..400).map(|n| format!("{n:036}")).collect();
        let mut queued: Vec<Signal> = ids
            .iter()
            .map(|id| Signal::Claimed(vec![id.clone()]))
            .collect();
        queued.insert(10, Signal::CheckAll);
        queued.insert(20, Signal::Refresh(vec!["r-1".into()]));
        queued.push(Signal::CheckAll);
        let out = coalesce(queued);
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
    }

    #[test]
    fn a_node_is_live_within_its_lease() {
        assert!(is_live(Some(1_000), 1_000 + 15_000));
        assert!(!is_live(Some(1_000), 1_000 + 15_001));
        assert!(!is_live(None, 0));
    }
}
