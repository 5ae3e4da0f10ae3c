//! Rollouts: how far each version has gone on each platform, whether it may be promoted,
//! and the lines printed after promoting, rolling back, unblocking or resuming one.

use serde::Deserialize;

use super::{plain_table, plural, shorten};

/// GATE cells longer than this are cut, so one long reason does not widen the table.
const GATE_WIDTH: usize = 40;

#[derive(Debug, Deserialize)]
pub(crate) struct Rollout {
    version: String,
    os: String,
    arch: String,
    state: String,
    targeted: u64,
    succeeded: u64,
    failed: u64,
    rolled_back: u64,
    timed_out: u64,
    running: u64,
    success_rate: Option<f64>,
    gate: Gate,
    stale_stable: bool,
    stable_lag_seconds: Option<f64>,
    halt_reason: Option<String>,
}

/// Whether a beta version may be promoted to stable, and why.
#[derive(Debug, Deserialize)]
pub(crate) struct Gate {
    pass: bool,
    reason: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Promoted {
    version: String,
    promoted: Vec<String>,
    gate: Gate,
    forced: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RolledBack {
    version: String,
    agents_rolled_back: usize,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Unblocked {
    version: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Resumed {
    version: String,
    resumed: usize,
}

impl Rollout {
    fn platform(&self) -> String {
        format!("{}/{}", self.os, self.arch)
    }
}

/// Rounded down, so a rate just under a gate's threshold never prints as meeting it; the
/// small nudge keeps 0.29 (28.999… once multiplied) from printing as 28%.
fn percent(rate: Option<f64>) -> String {
    rate.map_or("-".to_owned(), |rate| {
        format!("{}%", (rate * 100.0 + 1e-9).floor())
    })
}

/// `3 days`, or `5 hours` when under a day.
fn lag(seconds: f64) -> String {
    let hours = (seconds / 3600.0).floor() as usize;
    if hours < 24 {
        plural(hours, "hour")
    } else {
        plural(hours / 24, "day")
    }
}

/// The table, then a line for each stable channel left behind and each halted rollout,
/// each naming the command that acts on it.
pub(crate) fn rollouts_view(rollouts: &[Rollout]) -> String {
    let table = plain_table(
        [
            "VERSION", "PLATFORM", "STATE", "PROGRESS", "FAILED", "RUNNING", "SUCCESS", "GATE",
        ],
        rollouts.iter().map(|r| {
            let gate = if r.gate.pass {
                "pass".to_owned()
            } else {
                shorten(&format!("blocked: {}", r.gate.reason), GATE_WIDTH)
            };
            [
                r.version.clone(),
                r.platform(),
                r.state.clone(),
                format!("{}/{} ok", r.succeeded, r.targeted),
                (r.failed + r.rolled_back + r.timed_out).to_string(),
                r.running.to_string(),
                percent(r.success_rate),
                gate,
            ]
        }),
    );
    let mut text = format!("{table}\n");
    for r in rollouts {
        if r.stale_stable {
            let behind = r
                .stable_lag_seconds
                .map_or(String::new(), |seconds| format!("{} ", lag(seconds)));
            text.push_str(&format!(
                "WARNING: stable for {} is {behind}behind beta {v} (drover promote {v})\n",
                r.platform(),
                v = r.version,
            ));
        }
        if r.state == "halted" {
            let reason = r.halt_reason.as_deref().unwrap_or("no reason given");
            text.push_str(&format!(
                "HALTED: {v} {}: {reason} (drover resume {v} to continue)\n",
                r.platform(),
                v = r.version,
            ));
        }
    }
    text
}

pub(crate) fn promoted_line(answer: &Promoted) -> String {
    let forced = if answer.forced { " (forced)" } else { "" };
    format!(
        "promoted {} to stable ({}); gate: {}{forced}\n",
        answer.version,
        plural(answer.promoted.len(), "build"),
        answer.gate.reason
    )
}

pub(crate) fn rolled_back_line(answer: &RolledBack) -> String {
    let verb = if answer.agents_rolled_back == 1 {
        "is"
    } else {
        "are"
    };
    format!(
        "rolled back {}: blocked, {} {verb} being moved off it\n",
        answer.version,
        plural(answer.agents_rolled_back, "agent")
    )
}

pub(crate) fn unblocked_line(answer: &Unblocked) -> String {
    format!("{} is offered again\n", answer.version)
}

pub(crate) fn resumed_line(answer: &Resumed) -> String {
    format!(
        "resumed {} ({})\n",
        answer.version,
        plural(answer.resumed, "halted rollout")
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::render::tests::parse;

    fn rollout_json(version: &str, state: &str, counts: [u64; 6], rate: Option<f64>) -> Value {
        let [targeted, succeeded, failed, rolled_back, timed_out, running] = counts;
        json!({
            "version": version, "os": "linux", "arch": "amd64", "state": state,
            "targeted": targeted, "dispatched": targeted, "in_progress": running,
            "succeeded": succeeded, "failed": failed, "rolled_back": rolled_back,
            "timed_out": timed_out, "running": running, "success_rate": rate,
            "gate": {"pass": true, "reason": "48 of 50 succeeded"},
            "stale_stable": false, "stable_lag_seconds": null, "halt_reason": null,
            "first_seen": "2026-11-20T09:00:00Z", "promoted_at": null
        })
    }

    #[test]
    fn table_shows_progress_failures_success_and_gate() {
        let mut blocked = rollout_json("1.4.0", "beta", [40, 12, 2, 1, 1, 3], Some(0.7999));
        blocked["gate"] = json!({"pass": false,
            "reason": "success rate 80% is under the 95% needed to promote"});
        let fresh = rollout_json("1.5.0", "beta", [10, 0, 0, 0, 0, 0], None);
        let text = rollouts_view(&parse::<Vec<Rollout>>(json!([blocked, fresh])));
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        for column in [
            "PLATFORM", "PROGRESS", "FAILED", "RUNNING", "SUCCESS", "GATE",
        ] {
            assert!(lines[0].contains(column), "missing {column}");
        }
        assert!(lines[1].contains("linux/amd64") && lines[1].contains("12/40 ok"));
        assert!(lines[1].contains(" 4 ") && lines[1].contains(" 3 "));
        assert!(lines[1].contains(" 79% "));
        assert!(lines[1].ends_with("blocked: success rate 80% is under the…"));
        assert!(lines[2].contains("0/10 ok") && lines[2].contains(" - "));
        assert!(lines[2].ends_with("pass"));
        assert_eq!(lines.len(), 3, "no warnings expected:\n{text}");
    }

    #[test]
    fn success_percent_rounds_down() {
        for (rate, expected) in [
            (None, "-"),
            (Some(1.0), "100%"),
            (Some(0.949_99), "94%"),
            (Some(0.29), "29%"),
            (Some(0.0), "0%"),
        ] {
            assert_eq!(percent(rate), expected, "{rate:?}");
        }
    }

    #[test]
    fn stale_stable_and_halted_rollouts_get_a_line_each() {
        let mut stale = rollout_json("1.4.0", "beta", [40, 40, 0, 0, 0, 0], Some(1.0));
        stale["stale_stable"] = json!(true);
        stale["stable_lag_seconds"] = json!(3 * 86_400 + 7_200);
        let mut recent = rollout_json("1.4.1", "beta", [4, 4, 0, 0, 0, 0], Some(1.0));
        recent["stale_stable"] = json!(true);
        recent["stable_lag_seconds"] = json!(5 * 3600 + 59);
        recent["os"] = json!("windows");
        let mut halted = rollout_json("1.3.9", "halted", [40, 10, 8, 0, 0, 0], Some(0.55));
        halted["halt_reason"] = json!("8 failures in the first 18 updates");
        let rollouts: Vec<Rollout> = parse(json!([stale, recent, halted]));
        let text = rollouts_view(&rollouts);
        let tail: Vec<&str> = text.lines().skip(4).collect();
        assert_eq!(
            tail,
            [
                "WARNING: stable for linux/amd64 is 3 days behind beta 1.4.0 (drover promote 1.4.0)",
                "WARNING: stable for windows/amd64 is 5 hours behind beta 1.4.1 (drover promote 1.4.1)",
                "HALTED: 1.3.9 linux/amd64: 8 failures in the first 18 updates (drover resume 1.3.9 to continue)",
            ]
        );
    }

    #[test]
    fn action_lines_say_what_happened() {
        let promoted = json!({"version": "1.4.0", "promoted": ["a", "b"],
            "gate": {"pass": true, "reason": "40 of 40 succeeded"}, "forced": false});
        assert_eq!(
            promoted_line(&parse(promoted)),
            "promoted 1.4.0 to stable (2 builds); gate: 40 of 40 succeeded\n"
        );
        let forced = json!({"version": "1.4.0", "promoted": ["a"],
            "gate": {"pass": false, "reason": "only 3 updates so far"}, "forced": true});
        assert_eq!(
            promoted_line(&parse(forced)),
            "promoted 1.4.0 to stable (1 build); gate: only 3 updates so far (forced)\n"
        );
        for (agents, expected) in [
            (
                1,
                "rolled back 1.4.0: blocked, 1 agent is being moved off it\n",
            ),
            (
                7,
                "rolled back 1.4.0: blocked, 7 agents are being moved off it\n",
            ),
        ] {
            let answer = json!({"version": "1.4.0", "blocked": true, "agents_rolled_back": agents});
            assert_eq!(rolled_back_line(&parse(answer)), expected);
        }
        let unblocked = json!({"version": "1.4.0", "blocked": false});
        assert_eq!(
            unblocked_line(&parse(unblocked)),
            "1.4.0 is offered again\n"
        );
        let resumed = json!({"version": "1.4.0", "resumed": 2});
        assert_eq!(
            resumed_line(&parse(resumed)),
            "resumed 1.4.0 (2 halted rollouts)\n"
        );
    }
}
