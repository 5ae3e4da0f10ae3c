//! The dashboard's live feed: small notes that something changed, published through
//! one broadcast hub and served as server-sent events by `api::events`. A note carries
//! only ids; the page re-reads what it concerns through the REST API, so a missed or
//! repeated note costs at most a re-fetch.

use serde::Serialize;
use tokio::sync::broadcast;

/// Notes kept for a slow subscriber before it is told to re-read everything.
const BACKLOG: usize = 1024;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    /// An agent connected, disconnected, or an operator changed it.
    Agent,
    /// An update task was created or moved.
    Task,
    /// A rollout was promoted, rolled back, halted, resumed or unblocked.
    Rollout,
    /// The offered builds changed.
    Release,
    /// A server-wide setting, or a site's or client's channel, changed.
    Settings,
    /// An entry was added to the audit log.
    Audit,
    /// The subscriber missed notes: re-read everything.
    Resync,
}

/// One note: `{"kind": "task", "id": "<task id>", "agent": "<agent id>", "rollout":
/// "<rollout id>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Event {
    pub(crate) kind: Kind,
    /// The agent's or task's id, the version, or the setting; null when it is everything.
    pub(crate) id: Option<String>,
    /// For a task, its agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) agent: Option<String>,
    /// For a task, its rollout: the dashboard re-reads only that one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rollout: Option<String>,
}

impl Event {
    pub(crate) fn resync() -> Event {
        Event {
            kind: Kind::Resync,
            id: None,
            agent: None,
            rollout: None,
        }
    }
}

/// The hub: publishing never blocks and never fails, with or without subscribers.
#[derive(Debug, Clone)]
pub(crate) struct Events {
    sender: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            sender: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Events {
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    fn publish(&self, kind: Kind, id: Option<&str>, agent: Option<&str>) {
        self.send(Event {
            kind,
            id: id.map(str::to_owned),
            agent: agent.map(str::to_owned),
            rollout: None,
        });
    }

    fn send(&self, event: Event) {
        // An error only means nobody is listening.
        let _ = self.sender.send(event);
    }

    pub(crate) fn agent(&self, agent_id: &str) {
        self.publish(Kind::Agent, Some(agent_id), None);
    }

    pub(crate) fn task(&self, task_id: &str, agent_id: &str, rollout_id: Option<&str>) {
        self.send(Event {
            kind: Kind::Task,
            id: Some(task_id.to_owned()),
            agent: Some(agent_id.to_owned()),
            rollout: rollout_id.map(str::to_owned),
        });
    }

    /// `None` when any rollout may have changed (another node acted).
    pub(crate) fn rollout(&self, version: Option<&str>) {
        self.publish(Kind::Rollout, version, None);
    }

    pub(crate) fn release(&self) {
        self.publish(Kind::Release, None, None);
    }

    pub(crate) fn settings(&self, what: Option<&str>) {
        self.publish(Kind::Settings, what, None);
    }

    /// `action` is the entry's action, such as `rollout.promote`.
    pub(crate) fn audit(&self, action: &str) {
        self.publish(Kind::Audit, Some(action), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_serialize_small_and_reach_every_subscriber() {
        let events = Events::default();
        events.agent("nobody listens yet");
        let mut first = events.subscribe();
        let mut second = events.subscribe();
        events.task("t-1", "a-1", Some("r-1"));
        events.task("t-2", "a-1", None);
        events.rollout(Some("1.4.2"));
        events.release();
        let expected = [
            r#"{"kind":"task","id":"t-1","agent":"a-1","rollout":"r-1"}"#,
            r#"{"kind":"task","id":"t-2","agent":"a-1"}"#,
            r#"{"kind":"rollout","id":"1.4.2"}"#,
            r#"{"kind":"release","id":null}"#,
        ];
        for want in expected {
            for receiver in [&mut first, &mut second] {
                let event = receiver.try_recv().unwrap();
                assert_eq!(serde_json::to_string(&event).unwrap(), want);
            }
        }
        assert!(first.try_recv().is_err());
    }
}
