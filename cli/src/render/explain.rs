//! `explain`: why an agent is or is not being updated. Older servers answer without the
//! channel trace, the candidates and the next step, so each is printed only when present.

use serde::Deserialize;

use super::{Task, or_dash, plain_table};

#[derive(Debug, Deserialize)]
pub(crate) struct Explanation {
    agent_id: String,
    version: String,
    channel: String,
    channel_source: String,
    #[serde(default)]
    channel_trace: Vec<TraceStep>,
    decision: String,
    offer: Option<String>,
    reason: String,
    candidates: Option<Vec<Candidate>>,
    active_task: Option<Task>,
    next: Option<String>,
}

/// One level of the channel hierarchy (agent, site, client, default) and what it sets.
#[derive(Debug, Deserialize)]
pub(crate) struct TraceStep {
    level: String,
    channel: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Candidate {
    version: String,
    channel: String,
    offered: bool,
    reason: Option<String>,
}

pub(crate) fn explanation(e: &Explanation) -> String {
    let mut text = format!(
        "agent {} runs {} on channel {} (from {})\n",
        e.agent_id, e.version, e.channel, e.channel_source
    );
    for step in &e.channel_trace {
        let decides = if step.level == e.channel_source {
            " <- decides"
        } else {
            ""
        };
        let channel = or_dash(step.channel.as_deref());
        text.push_str(&format!("  {}: {channel}{decides}\n", step.level));
    }
    let decision = match (e.decision.as_str(), &e.offer) {
        ("offer", Some(version)) => format!("offer {version}"),
        (decision, _) => format!("{decision}: {}", e.reason),
    };
    text.push_str(&format!("decision: {decision}\n"));
    if let Some(task) = &e.active_task {
        text.push_str(&format!(
            "active task: {} {} → {} {}\n",
            task.id, task.from_version, task.to_version, task.status
        ));
    }
    match &e.candidates {
        Some(candidates) if candidates.is_empty() => text.push_str("no candidate builds\n"),
        Some(candidates) => {
            let table = plain_table(
                ["VERSION", "CHANNEL", "OFFERED", "WHY NOT"],
                candidates.iter().map(|c| {
                    [
                        c.version.clone(),
                        c.channel.clone(),
                        if c.offered { "yes" } else { "no" }.to_owned(),
                        or_dash(c.reason.as_deref()),
                    ]
                }),
            );
            text.push_str(&format!("{table}\n"));
        }
        None => {}
    }
    if let Some(next) = &e.next {
        text.push_str(&format!("next: {next}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::render::tests::parse;

    #[test]
    fn explanation_marks_the_deciding_level_and_lists_candidates() {
        let answer: Explanation = parse(json!({
            "agent_id": "a1", "version": "1.3.0", "channel": "beta", "channel_source": "site",
            "channel_trace": [
                {"level": "agent", "channel": null},
                {"level": "site", "channel": "beta"},
                {"level": "client", "channel": "stable"},
                {"level": "default", "channel": "stable"},
            ],
            "decision": "offer", "offer": "1.4.0",
            "reason": "1.4.0 is due and is sent at the next heartbeat",
            "candidates": [
                {"version": "1.4.0", "channel": "beta", "file": "f1", "offered": true, "reason": null},
                {"version": "1.3.9", "channel": "beta", "file": "f2", "offered": false,
                 "reason": "blocked"},
            ],
            "active_task": null,
            "next": "the agent is sent 1.4.0 at its next heartbeat"
        }));
        let text = explanation(&answer);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert_eq!(
            lines[..6],
            [
                "agent a1 runs 1.3.0 on channel beta (from site)",
                "  agent: -",
                "  site: beta <- decides",
                "  client: stable",
                "  default: stable",
                "decision: offer 1.4.0",
            ]
        );
        assert!(lines[6].contains("OFFERED") && lines[6].contains("WHY NOT"));
        assert!(lines[7].contains("1.4.0") && lines[7].contains("yes"));
        assert!(lines[8].contains("no") && lines[8].ends_with("blocked"));
        assert_eq!(
            lines[9],
            "next: the agent is sent 1.4.0 at its next heartbeat"
        );
    }

    #[test]
    fn explanation_from_an_older_server_shows_what_it_has() {
        let answer: Explanation = parse(json!({
            "agent_id": "a1", "version": "1.3.0", "channel": "stable",
            "channel_source": "default", "decision": "hold", "offer": null,
            "reason": "task t1 to 1.4.0 is downloading",
            "active_task": {
                "id": "t1", "agent_id": "a1", "from_version": "1.3.0", "to_version": "1.4.0",
                "kind": "automatic", "status": "downloading", "attempts": 1, "error": null,
                "bytes_done": 10, "bytes_total": 100, "created_at": "2026-11-25T12:00:00Z"
            }
        }));
        assert_eq!(
            explanation(&answer),
            "agent a1 runs 1.3.0 on channel stable (from default)\n\
             decision: hold: task t1 to 1.4.0 is downloading\n\
             active task: t1 1.3.0 → 1.4.0 downloading\n"
        );
    }
}
