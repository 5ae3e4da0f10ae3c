//! What the version-keyed rollout actions answer (promote, rollback, unblock, resume of
//! every rollout of a version) and the lines printed for them.

use serde::Deserialize;

use super::plural;
use super::rollouts::{
    Gate, Rollout, SkippedBy, plan_line, rollout_state_line, short_id, skipped_reasons,
};

/// `POST /api/v1/rollouts/{version}/promote`.
#[derive(Debug, Deserialize)]
pub(crate) struct Promoted {
    version: String,
    promoted: Vec<String>,
    gate: Gate,
    forced: bool,
    /// Older servers do not say; for them every promote changed something.
    #[serde(default)]
    unchanged: bool,
    rollout: Rollout,
}

/// `POST /api/v1/rollouts/{version}/rollback`.
#[derive(Debug, Deserialize)]
pub(crate) struct RolledBack {
    version: String,
    rollout: Option<Rollout>,
    targeted: u64,
    skipped: SkippedBy,
    offline: u64,
    no_build: Vec<String>,
    cancelled: u64,
    agents_rolled_back: u64,
    #[serde(default)]
    unchanged: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Unblocked {
    version: String,
}

/// `POST /api/v1/rollouts/{version}/resume`: how many rollouts of the version resumed.
#[derive(Debug, Deserialize)]
pub(crate) struct Resumed {
    version: String,
    resumed: u64,
}

/// A resume answers the rollout when given an id, and a count when given a version.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum ResumeAnswer {
    Rollout(Box<Rollout>),
    Version(Resumed),
}

fn count(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The files promoted, the gate's verdict, and the rollout that started.
pub(crate) fn promoted_view(answer: &Promoted) -> String {
    if answer.unchanged {
        return format!(
            "{} was promoted already; nothing changed\n{}",
            answer.version,
            plan_line(&answer.rollout)
        );
    }
    let files = if answer.promoted.is_empty() {
        format!(
            "{} is stable: no build of it was on beta still\n",
            answer.version
        )
    } else {
        format!(
            "promoted {} to stable ({}): {}\n",
            answer.version,
            plural(answer.promoted.len(), "build"),
            answer.promoted.join(", ")
        )
    };
    let verdict = if answer.gate.pass { "pass" } else { "blocked" };
    let forced = if answer.forced {
        " (forced past it)"
    } else {
        ""
    };
    format!(
        "{files}gate: {verdict}: {}{forced}\n{}",
        answer.gate.reason,
        plan_line(&answer.rollout)
    )
}

/// Everything the rollback answer counts, as the server counted it: the cancelled tasks,
/// the agents targeted and those skipped (and why), those offline, and those with no
/// build to go back to, by id.
pub(crate) fn rolled_back_view(answer: &RolledBack) -> String {
    if answer.unchanged {
        let under_way = match &answer.rollout {
            Some(rollout) => format!(
                "; its rollback rollout {} is under way",
                short_id(rollout.id())
            ),
            None => format!("; no agent runs {}", answer.version),
        };
        return format!(
            "{} was rolled back already; nothing changed{under_way}\n",
            answer.version
        );
    }
    let mut text = format!(
        "rolled back {}: blocked, {} to it cancelled\n",
        answer.version,
        plural(count(answer.cancelled), "unfinished task")
    );
    match &answer.rollout {
        Some(rollout) => {
            let mut line = format!(
                "rollout {}: {} targeted, {} can move now",
                short_id(rollout.id()),
                plural(count(answer.targeted), "agent"),
                answer.agents_rolled_back
            );
            let skipped = skipped_reasons(&answer.skipped);
            if !skipped.is_empty() {
                line.push_str(&format!(" (skipped: {skipped})"));
            }
            if answer.offline > 0 {
                line.push_str(&format!(
                    "; {} offline, moved when they reconnect",
                    answer.offline
                ));
            }
            text.push_str(&format!("{line}\n"));
        }
        None => text.push_str(&format!(
            "no rollback rollout: no agent running {} has a build to go back to\n",
            answer.version
        )),
    }
    if !answer.no_build.is_empty() {
        text.push_str(&format!(
            "no build to go back to for {}: {}\n",
            plural(answer.no_build.len(), "agent"),
            answer.no_build.join(", ")
        ));
    }
    text
}

pub(crate) fn unblocked_line(answer: &Unblocked) -> String {
    format!("{} is offered again\n", answer.version)
}

pub(crate) fn resume_view(answer: &ResumeAnswer) -> String {
    match answer {
        ResumeAnswer::Rollout(rollout) => rollout_state_line(rollout),
        ResumeAnswer::Version(resumed) => format!(
            "resumed {} of {}\n",
            plural(count(resumed.resumed), "paused or halted rollout"),
            resumed.version
        ),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::render::rollouts::tests::rollout_json;
    use crate::render::tests::parse;

    const ID: &str = "3f2a9c1e-0000-4000-8000-000000000001";

    #[test]
    fn promote_prints_files_gate_and_the_started_plan() {
        let answer = json!({"version": "1.4.0",
            "promoted": ["drover-agent-linux-amd64-1.4.0", "drover-agent-windows-amd64-1.4.0.exe"],
            "gate": {"pass": true, "reason": "5 of 5 beta agents succeeded"}, "forced": false,
            "rollout": rollout_json(ID, "1.4.0", "promote", "running")});
        assert_eq!(
            promoted_view(&parse(answer)),
            "promoted 1.4.0 to stable (2 builds): drover-agent-linux-amd64-1.4.0, \
             drover-agent-windows-amd64-1.4.0.exe\n\
             gate: pass: 5 of 5 beta agents succeeded\n\
             rollout 3f2a9c1e: waves 1% → 10% → 50% → 100%, 1 agent in wave 1 of 100 targeted\n"
        );
        let forced = json!({"version": "1.4.0", "promoted": [],
            "gate": {"pass": false, "reason": "1 beta success, 3 needed"}, "forced": true,
            "rollout": rollout_json(ID, "1.4.0", "promote", "running")});
        let text = promoted_view(&parse(forced));
        assert!(text.starts_with("1.4.0 is stable: no build of it was on beta still\n"));
        assert!(text.contains("\ngate: blocked: 1 beta success, 3 needed (forced past it)\n"));
    }

    #[test]
    fn a_repeated_promote_or_rollback_says_it_changed_nothing() {
        let promote = json!({"version": "1.4.0", "promoted": [],
            "gate": {"pass": true, "reason": "5 of 5 beta agents succeeded"}, "forced": false,
            "unchanged": true, "rollout": rollout_json(ID, "1.4.0", "promote", "running")});
        let text = promoted_view(&parse(promote));
        assert!(
            text.starts_with("1.4.0 was promoted already; nothing changed\nrollout 3f2a9c1e:"),
            "{text}"
        );
        let rollback = json!({"version": "1.4.0", "blocked": true,
            "rollout": rollout_json(ID, "1.3.0", "rollback", "running"),
            "targeted": 0, "skipped": {"paused": 0, "declines_updates": 0, "updates_off": 0},
            "offline": 0, "no_build": [], "cancelled": 0, "agents_rolled_back": 0,
            "unchanged": true});
        assert_eq!(
            rolled_back_view(&parse(rollback)),
            "1.4.0 was rolled back already; nothing changed; its rollback rollout 3f2a9c1e \
             is under way\n"
        );
    }

    #[test]
    fn rollback_says_whom_it_moves_skips_and_cannot_move() {
        let answer = json!({"version": "1.4.0", "blocked": true,
            "rollout": rollout_json(ID, "1.3.0", "rollback", "running"),
            "targeted": 12, "skipped": {"paused": 2, "declines_updates": 1, "updates_off": 0},
            "offline": 4, "no_build": ["a7", "a9"], "cancelled": 3, "agents_rolled_back": 9});
        assert_eq!(
            rolled_back_view(&parse(answer)),
            "rolled back 1.4.0: blocked, 3 unfinished tasks to it cancelled\n\
             rollout 3f2a9c1e: 12 agents targeted, 9 can move now (skipped: 2 paused, \
             1 declining updates); 4 offline, moved when they reconnect\n\
             no build to go back to for 2 agents: a7, a9\n"
        );
        let off = json!({"version": "1.4.0", "blocked": true,
            "rollout": rollout_json(ID, "1.3.0", "rollback", "running"),
            "targeted": 1, "skipped": {"paused": 0, "declines_updates": 0, "updates_off": 1},
            "offline": 0, "no_build": [], "cancelled": 1, "agents_rolled_back": 0});
        assert_eq!(
            rolled_back_view(&parse(off)),
            "rolled back 1.4.0: blocked, 1 unfinished task to it cancelled\n\
             rollout 3f2a9c1e: 1 agent targeted, 0 can move now (skipped: 1 updates off \
             server-wide)\n"
        );
        let nobody = json!({"version": "1.4.0", "blocked": true, "rollout": null,
            "targeted": 0, "skipped": {"paused": 0, "declines_updates": 0, "updates_off": 0},
            "offline": 0, "no_build": ["a1"], "cancelled": 0, "agents_rolled_back": 0});
        assert_eq!(
            rolled_back_view(&parse(nobody)),
            "rolled back 1.4.0: blocked, 0 unfinished tasks to it cancelled\n\
             no rollback rollout: no agent running 1.4.0 has a build to go back to\n\
             no build to go back to for 1 agent: a1\n"
        );
    }

    #[test]
    fn unblock_and_resume_lines_say_what_happened() {
        let unblocked = json!({"version": "1.4.0", "blocked": false});
        assert_eq!(
            unblocked_line(&parse(unblocked)),
            "1.4.0 is offered again\n"
        );
        let resumed = json!({"version": "1.4.0", "resumed": 2});
        assert_eq!(
            resume_view(&parse(resumed)),
            "resumed 2 paused or halted rollouts of 1.4.0\n"
        );
        let one = parse::<ResumeAnswer>(rollout_json(ID, "1.4.0", "promote", "running"));
        assert_eq!(
            resume_view(&one),
            "rollout 3f2a9c1e (1.4.0 promote): running, wave 2/4, 5/100 succeeded\n"
        );
    }
}
