//! `drover-agent status`: what the agent last knew, read from its state directory
//! without the server. The worker records its connection and its last update result in
//! `status.json` as they change (never per heartbeat); the identity, the supervisor's
//! version and the update journal are read from their own files.

use std::path::Path;

use protocol::UpdateResult;
use serde::{Deserialize, Serialize};

use crate::{atomic_file, identity, journal};

const FILE: &str = "status.json";
/// Written by the supervisor: `{"pid": ..., "version": ...}`.
const SUPERVISOR_FILE: &str = "supervisor.json";

/// What the worker records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Recorded {
    /// The server of the current or last session.
    pub(crate) server: Option<String>,
    pub(crate) connected: bool,
    /// When the session started or ended (ms since the epoch).
    pub(crate) since_ms: Option<i64>,
    /// Why the last session ended or could not start.
    pub(crate) last_error: Option<String>,
    pub(crate) last_result: Option<LastResult>,
    /// The channel the server last said the agent's updates come from, and when.
    #[serde(default)]
    pub(crate) channel: Option<String>,
    #[serde(default)]
    pub(crate) channel_heard_ms: Option<i64>,
}

/// The most characters of a channel name kept: the server's names are short words.
const CHANNEL_LIMIT: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LastResult {
    pub(crate) task_id: String,
    pub(crate) outcome: String,
    pub(crate) version: String,
    pub(crate) error: Option<String>,
    pub(crate) at_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn load(state_dir: &Path) -> Recorded {
    std::fs::read(state_dir.join(FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Changes the record; a failure to write is logged, never fatal.
fn record(state_dir: &Path, change: impl FnOnce(&mut Recorded)) {
    let mut recorded = load(state_dir);
    change(&mut recorded);
    let written = serde_json::to_vec(&recorded)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| atomic_file::write(&state_dir.join(FILE), &bytes));
    if let Err(err) = written {
        tracing::debug!(error = %format!("{err:#}"), "could not record the agent's status");
    }
}

pub(crate) fn connected(state_dir: &Path, server: &str) {
    record(state_dir, |r| {
        r.server = Some(server.to_owned());
        r.connected = true;
        r.since_ms = Some(now_ms());
        r.last_error = None;
    });
}

/// The server named the agent's channel (at the welcome, or when it changed). Kept to
/// printable characters: it is shown in a terminal.
pub(crate) fn channel(state_dir: &Path, channel: &str) {
    let channel: String = channel
        .chars()
        .filter(|c| !c.is_control())
        .take(CHANNEL_LIMIT)
        .collect();
    record(state_dir, |r| {
        r.channel = Some(channel);
        r.channel_heard_ms = Some(now_ms());
    });
}

pub(crate) fn disconnected(state_dir: &Path, reason: &str) {
    record(state_dir, |r| {
        if r.connected || r.since_ms.is_none() {
            r.since_ms = Some(now_ms());
        }
        r.connected = false;
        r.last_error = Some(reason.to_owned());
    });
}

pub(crate) fn result(state_dir: &Path, result: &UpdateResult) {
    record(state_dir, |r| {
        r.last_result = Some(LastResult {
            task_id: result.task_id.clone(),
            outcome: serde_json::to_value(result.outcome)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            version: result.version.clone(),
            error: result.error.clone(),
            at_ms: now_ms(),
        });
    });
}

/// Everything `drover-agent status` shows.
#[derive(Debug, Serialize)]
pub(crate) struct Status {
    pub(crate) state_dir: String,
    pub(crate) agent_id: Option<String>,
    /// The version the running supervisor reported, else this executable's.
    pub(crate) version: String,
    pub(crate) supervisor_pid: Option<u64>,
    /// Whether that supervisor still runs (where the system can tell); when it does not,
    /// `connected` is only what it last recorded.
    pub(crate) running: Option<bool>,
    #[serde(flatten)]
    pub(crate) recorded: Recorded,
    /// The update under way, from the journal: its version and step.
    pub(crate) update: Option<UpdateInProgress>,
}

#[derive(Debug, Serialize)]
pub(crate) struct UpdateInProgress {
    pub(crate) task_id: String,
    pub(crate) version: String,
    pub(crate) step: String,
}

pub(crate) fn read(state_dir: &Path) -> anyhow::Result<Status> {
    anyhow::ensure!(
        state_dir.is_dir(),
        "{} does not exist: no agent has run with this state directory (pass --state-dir)",
        state_dir.display()
    );
    let agent_id = identity::load(state_dir)?.map(|i| i.agent_id);
    let supervisor: Option<serde_json::Value> = std::fs::read(state_dir.join(SUPERVISOR_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let version = supervisor
        .as_ref()
        .and_then(|s| s["version"].as_str())
        .unwrap_or(crate::version::current())
        .to_owned();
    let update = journal::load(state_dir)?.map(|j| UpdateInProgress {
        task_id: j.task_id.clone(),
        version: j.version.clone(),
        step: serde_json::to_value(j.step)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
    });
    let supervisor_pid = supervisor.as_ref().and_then(|s| s["pid"].as_u64());
    Ok(Status {
        state_dir: state_dir.display().to_string(),
        agent_id,
        version,
        supervisor_pid,
        running: supervisor_pid.and_then(crate::platform::process::is_running),
        recorded: load(state_dir),
        update,
    })
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// The status as lines for a person.
pub(crate) fn render(status: &Status) -> String {
    let r = &status.recorded;
    let connection = match (r.connected, r.since_ms) {
        _ if status.running == Some(false) => format!(
            "not running (its supervisor, pid {}, is gone; last recorded: {})",
            status.supervisor_pid.unwrap_or_default(),
            if r.connected {
                "connected"
            } else {
                "not connected"
            }
        ),
        (true, Some(since)) => format!("connected since {}", rfc3339(since)),
        (false, Some(since)) => format!(
            "not connected since {}{}",
            rfc3339(since),
            r.last_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ),
        _ => "never connected".to_owned(),
    };
    let channel = match (&r.channel, r.channel_heard_ms) {
        (Some(channel), Some(at)) => format!("{channel} (as the server said at {})", rfc3339(at)),
        _ => "not known (no server has said yet)".to_owned(),
    };
    let update = status.update.as_ref().map_or("none".to_owned(), |u| {
        format!("{} to {} (task {})", u.step, u.version, u.task_id)
    });
    let last = r.last_result.as_ref().map_or("none".to_owned(), |l| {
        format!(
            "{} {} at {} (task {}){}",
            l.outcome,
            l.version,
            rfc3339(l.at_ms),
            l.task_id,
            l.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )
    });
    let rows = [
        (
            "agent",
            status
                .agent_id
                .clone()
                .unwrap_or_else(|| "not enrolled".into()),
        ),
        ("server", r.server.clone().unwrap_or_else(|| "-".into())),
        ("version", status.version.clone()),
        ("connection", connection),
        ("channel", channel),
        ("update", update),
        ("last result", last),
        ("state dir", status.state_dir.clone()),
    ];
    rows.iter()
        .map(|(key, value)| format!("{:<13}{value}\n", format!("{key}:")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{FailureClass, UpdateOutcome};

    #[test]
    fn the_worker_records_what_status_shows() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        let empty = read(state).unwrap();
        assert!(render(&empty).contains("connection:  never connected"));
        assert!(render(&empty).contains("channel:     not known"));

        connected(state, "https://drover.example.com");
        channel(state, "be\u{1b}[31mta");
        result(
            state,
            &UpdateResult {
                task_id: "t-1".into(),
                outcome: UpdateOutcome::RolledBack,
                version: "1.0.0".into(),
                error: Some("the new version exited during probation".into()),
                failure_class: Some(FailureClass::Build),
                transfer: None,
            },
        );
        disconnected(state, "server closed the connection");
        let status = read(state).unwrap();
        let text = render(&status);
        assert!(
            text.contains("server:      https://drover.example.com"),
            "{text}"
        );
        assert!(
            text.contains("connection:  not connected since ")
                && text.contains("(server closed the connection)"),
            "{text}"
        );
        assert!(
            text.contains("last result: rolled_back 1.0.0 at "),
            "{text}"
        );
        assert!(
            text.contains("channel:     be[31mta (as the server said at "),
            "{text}"
        );
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["channel"], "be[31mta");
        assert!(json["channel_heard_ms"].as_i64().is_some());
        assert_eq!(json["connected"], false);
        assert_eq!(json["last_result"]["task_id"], "t-1");
        assert!(json["agent_id"].is_null());
        assert!(read(&state.join("missing")).is_err());
    }
}
