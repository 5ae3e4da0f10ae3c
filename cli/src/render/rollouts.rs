//! Rollout records: the listing, one rollout in detail (waves, failures, timeline), its
//! agents by stage, and the line printed after pausing, resuming, advancing or aborting
//! one. Every count shown is one the server sent; none is added up here.

use serde::Deserialize;

use super::{or_dash, plain_table, plural, shorten};

/// GATE and STATE cells longer than this are cut, so one long reason does not widen the
/// table; the full reason is printed below it.
const CELL_WIDTH: usize = 40;

/// How many characters of a random (uuid) rollout id the tables show, at least.
const SHORT_ID: usize = 8;

#[derive(Debug, Deserialize)]
pub(crate) struct Platform {
    os: String,
    arch: String,
}

/// Whether a beta version may be promoted to stable, and why.
#[derive(Debug, Deserialize)]
pub(crate) struct Gate {
    pub(super) pass: bool,
    pub(super) reason: String,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct SkippedBy {
    pub(super) paused: u64,
    pub(super) declines_updates: u64,
    pub(super) updates_off: u64,
}

/// Ended tasks by failure class.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Failures {
    build: u64,
    environment: u64,
    transient: u64,
}

/// Targets by stage (they add up to `targeted`), and failures by class.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Counts {
    targeted: u64,
    waiting: u64,
    queued: u64,
    /// In a started wave, waiting for their maintenance window.
    #[serde(default)]
    outside_window: u64,
    downloading: u64,
    installing: u64,
    /// Restarted into the new build, proving itself.
    #[serde(default)]
    probation: u64,
    succeeded: u64,
    settled: u64,
    failed: u64,
    rolled_back: u64,
    cancelled: u64,
    skipped: u64,
    skipped_by: SkippedBy,
    failures: Failures,
    recent_build_failures: u64,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Wave {
    index: usize,
    share: String,
    size: u64,
    state: String,
    started_at: Option<String>,
    bake_until: Option<String>,
    counts: Counts,
}

/// `GET /api/v1/rollouts` is an array of these.
#[derive(Debug, Deserialize)]
pub(crate) struct Rollout {
    id: String,
    pub(super) version: String,
    kind: String,
    state: String,
    reason: Option<String>,
    platforms: Vec<Platform>,
    #[serde(flatten)]
    counts: Counts,
    current_wave: usize,
    pub(super) waves: Vec<Wave>,
    gate: Option<Gate>,
    stale_stable: bool,
    stable_lag_seconds: Option<i64>,
    started_by: String,
    created_at: String,
    updated_at: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct TimelineEntry {
    at: String,
    state: String,
    actor: String,
    detail: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct PlanWave {
    bake_seconds: i64,
    max_failure_rate: f64,
    min_finished: u64,
    max_failures: Option<u64>,
    min_success_share: f64,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Plan {
    waves: Vec<PlanWave>,
}

/// `GET /api/v1/rollouts/{id}`.
#[derive(Debug, Deserialize)]
pub(crate) struct RolloutDetail {
    #[serde(flatten)]
    rollout: Rollout,
    timeline: Vec<TimelineEntry>,
    plan: Plan,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RolloutAgent {
    agent_id: String,
    hostname: String,
    version: String,
    wave: usize,
    stage: String,
    task_id: Option<String>,
    status: Option<String>,
    failure_class: Option<String>,
    error: Option<String>,
}

/// `GET /api/v1/rollouts/{id}/agents`: one page of the agents matching the filters.
#[derive(Debug, Deserialize)]
pub(crate) struct RolloutAgents {
    total: usize,
    agents: Vec<RolloutAgent>,
}

impl Rollout {
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    fn platforms(&self) -> String {
        if self.platforms.is_empty() {
            return "-".to_owned();
        }
        let names: Vec<String> = self
            .platforms
            .iter()
            .map(|p| format!("{}/{}", p.os, p.arch))
            .collect();
        names.join(", ")
    }

    /// `halted: 3 build failures in wave 1`, or just the state when it has no reason.
    fn state_and_reason(&self) -> String {
        match &self.reason {
            Some(reason) if !reason.is_empty() => format!("{}: {reason}", self.state),
            _ => self.state.clone(),
        }
    }

    /// `2/4`: the wave started last, counted from 1, of how many.
    fn wave_position(&self) -> String {
        if self.waves.is_empty() {
            return "-".to_owned();
        }
        format!("{}/{}", self.current_wave + 1, self.waves.len())
    }

    fn progress(&self) -> String {
        format!("{}/{}", self.counts.succeeded, self.counts.targeted)
    }

    fn gate_cell(&self) -> String {
        match &self.gate {
            None => "-".to_owned(),
            Some(gate) if gate.pass => "pass".to_owned(),
            Some(gate) => shorten(&format!("blocked: {}", gate.reason), CELL_WIDTH),
        }
    }
}

/// Whether `id` looks like a random rollout id (a uuid); other ids, such as
/// `beta-1.4.0-linux-amd64`, are readable and shown whole.
fn is_random_id(id: &str) -> bool {
    id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// The ids as the tables show them: random ids cut to their first `SHORT_ID`
/// characters, or more where two of them would read the same.
pub(crate) fn short_ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let ids: Vec<&str> = ids.into_iter().collect();
    let random: Vec<&str> = ids.iter().copied().filter(|id| is_random_id(id)).collect();
    let mut len = SHORT_ID;
    while len < 36 {
        let mut prefixes: Vec<&str> = random.iter().map(|id| &id[..len]).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        if prefixes.len() == random.len() {
            break;
        }
        len += 1;
    }
    ids.iter()
        .map(|id| {
            if is_random_id(id) {
                id[..len].to_owned()
            } else {
                (*id).to_owned()
            }
        })
        .collect()
}

/// The id one rollout is shown by on its own.
pub(crate) fn short_id(id: &str) -> String {
    short_ids([id]).remove(0)
}

/// `2026-11-25 12:00:00` from RFC 3339 (UTC); anything else as it came.
fn short_time(at: &str) -> String {
    match (at.get(..10), at.get(10..11), at.get(11..19)) {
        (Some(date), Some("T"), Some(time)) => format!("{date} {time}"),
        _ => at.to_owned(),
    }
}

/// `10m`, `1h30m`, `45s`; `-` for none.
fn duration_text(seconds: i64) -> String {
    if seconds <= 0 {
        return "-".to_owned();
    }
    let (hours, minutes, secs) = (seconds / 3600, seconds % 3600 / 60, seconds % 60);
    let mut text = String::new();
    for (value, unit) in [(hours, "h"), (minutes, "m"), (secs, "s")] {
        if value > 0 {
            text.push_str(&format!("{value}{unit}"));
        }
    }
    text
}

/// `10%`, `2.5%`.
fn rate_text(rate: f64) -> String {
    let percent = rate * 100.0;
    if (percent - percent.round()).abs() < 1e-6 {
        format!("{}%", percent.round())
    } else {
        format!("{percent:.1}%")
    }
}

/// `3 days`, or `5 hours` when under a day.
fn lag(seconds: i64) -> String {
    let hours = usize::try_from(seconds / 3600).unwrap_or(0);
    if hours < 24 {
        plural(hours, "hour")
    } else {
        plural(hours / 24, "day")
    }
}

/// The stages that hold any target, in the order an update goes through them:
/// `12 succeeded (10 settled), 1 failed, 4 queued`; `no agents` when there are none.
fn stages(counts: &Counts) -> String {
    let settled = if counts.settled > 0 {
        format!(" ({} settled)", counts.settled)
    } else {
        String::new()
    };
    let parts: Vec<String> = [
        (counts.succeeded, "succeeded", settled.as_str()),
        (counts.failed, "failed", ""),
        (counts.rolled_back, "rolled back", ""),
        (counts.probation, "on probation", ""),
        (counts.installing, "installing", ""),
        (counts.downloading, "downloading", ""),
        (counts.queued, "queued", ""),
        (counts.outside_window, "outside their window", ""),
        (counts.waiting, "waiting", ""),
        (counts.cancelled, "cancelled", ""),
        (counts.skipped, "skipped", ""),
    ]
    .into_iter()
    .filter(|(count, _, _)| *count > 0)
    .map(|(count, stage, extra)| format!("{count} {stage}{extra}"))
    .collect();
    if parts.is_empty() {
        "no agents".to_owned()
    } else {
        parts.join(", ")
    }
}

/// `2`, or `2 (environment 1, transient 3)` when other classes have failures too.
fn failed_cell(failures: &Failures) -> String {
    let others: Vec<String> = [
        (failures.environment, "environment"),
        (failures.transient, "transient"),
    ]
    .into_iter()
    .filter(|(count, _)| *count > 0)
    .map(|(count, class)| format!("{class} {count}"))
    .collect();
    if others.is_empty() {
        failures.build.to_string()
    } else {
        format!("{} ({})", failures.build, others.join(", "))
    }
}

/// `1 paused, 2 decline updates`; empty when nothing was skipped for a reason.
pub(super) fn skipped_reasons(skipped: &SkippedBy) -> String {
    let parts: Vec<String> = [
        (skipped.paused, "paused"),
        (skipped.declines_updates, "declining updates"),
        (skipped.updates_off, "updates off server-wide"),
    ]
    .into_iter()
    .filter(|(count, _)| *count > 0)
    .map(|(count, reason)| format!("{count} {reason}"))
    .collect();
    parts.join(", ")
}

/// The table, newest first, then a line for each stable channel left behind and each
/// halted rollout, naming the command that acts on it.
pub(crate) fn rollouts_view(rollouts: &[Rollout]) -> String {
    if rollouts.is_empty() {
        return "no rollouts\n".to_owned();
    }
    let ids = short_ids(rollouts.iter().map(|r| r.id.as_str()));
    let table = plain_table(
        [
            "ID",
            "VERSION",
            "KIND",
            "STATE",
            "PLATFORMS",
            "WAVE",
            "PROGRESS",
            "FAILED",
            "GATE",
        ],
        rollouts.iter().zip(&ids).map(|(r, id)| {
            [
                id.clone(),
                r.version.clone(),
                r.kind.clone(),
                shorten(&r.state_and_reason(), CELL_WIDTH),
                r.platforms(),
                r.wave_position(),
                r.progress(),
                failed_cell(&r.counts.failures),
                r.gate_cell(),
            ]
        }),
    );
    let mut text = format!("{table}\n");
    for (r, id) in rollouts.iter().zip(&ids) {
        if r.stale_stable {
            let behind = r
                .stable_lag_seconds
                .map_or(String::new(), |seconds| format!("{} ", lag(seconds)));
            text.push_str(&format!(
                "WARNING: stable for {} is {behind}behind beta {v} (drover promote {v})\n",
                r.platforms(),
                v = r.version,
            ));
        }
        if r.state == "halted" {
            let reason = r.reason.as_deref().unwrap_or("no reason given");
            text.push_str(&format!(
                "HALTED: {} ({} {}): {reason} (drover rollout resume {id} to continue)\n",
                id, r.version, r.kind,
            ));
        }
    }
    text
}

fn field(name: &str, value: impl std::fmt::Display) -> String {
    format!("{:<11}{value}\n", format!("{name}:"))
}

/// `>10% of 5 ended`, and `or >3` when the wave also has a count limit.
fn halt_threshold(plan: &PlanWave) -> String {
    let mut text = format!(
        ">{} of {}+ ended",
        rate_text(plan.max_failure_rate),
        plan.min_finished
    );
    if let Some(max) = plan.max_failures {
        text.push_str(&format!(" or >{max}"));
    }
    text
}

/// `drover rollout ID`: the header, the waves with their plan, failures by class,
/// skips by reason, and the timeline.
pub(crate) fn rollout_view(detail: &RolloutDetail) -> String {
    let r = &detail.rollout;
    let counts = &r.counts;
    let mut text = field("rollout", &r.id);
    text.push_str(&field("version", format!("{} ({})", r.version, r.kind)));
    text.push_str(&field("state", r.state_and_reason()));
    text.push_str(&field("platforms", r.platforms()));
    text.push_str(&field(
        "started",
        format!("{} UTC by {}", short_time(&r.created_at), r.started_by),
    ));
    text.push_str(&field(
        "updated",
        format!("{} UTC", short_time(&r.updated_at)),
    ));
    if let Some(gate) = &r.gate {
        let verdict = if gate.pass { "pass" } else { "blocked" };
        text.push_str(&field("gate", format!("{verdict}: {}", gate.reason)));
    }
    if r.stale_stable {
        let behind = r.stable_lag_seconds.map_or(String::new(), |s| lag(s) + " ");
        text.push_str(&field(
            "stable",
            format!("{behind}behind this beta (drover promote {})", r.version),
        ));
    }
    text.push_str(&field(
        "wave",
        format!(
            "{} ({} planned)",
            r.wave_position(),
            plural(r.waves.len(), "wave")
        ),
    ));
    text.push_str(&field(
        "targets",
        format!("{}: {}", counts.targeted, stages(counts)),
    ));
    let failures = &counts.failures;
    text.push_str(&field(
        "failures",
        format!(
            "build {} ({} since the last resume), environment {}, transient {} (ended tasks)",
            failures.build, counts.recent_build_failures, failures.environment, failures.transient
        ),
    ));
    if counts.skipped > 0 {
        let reasons = skipped_reasons(&counts.skipped_by);
        let reasons = if reasons.is_empty() {
            String::new()
        } else {
            format!(": {reasons}")
        };
        text.push_str(&field("skipped", format!("{}{reasons}", counts.skipped)));
    }
    if !r.waves.is_empty() {
        let waves = plain_table(
            [
                "WAVE",
                "SHARE",
                "SIZE",
                "STATE",
                "STARTED",
                "BAKE UNTIL",
                "BAKE",
                "HALTS AT",
                "PASSES AT",
                "TARGETS",
            ],
            r.waves.iter().map(|wave| {
                let plan = detail.plan.waves.get(wave.index);
                [
                    (wave.index + 1).to_string(),
                    wave.share.clone(),
                    wave.size.to_string(),
                    wave.state.clone(),
                    wave.started_at.as_deref().map_or("-".into(), short_time),
                    wave.bake_until.as_deref().map_or("-".into(), short_time),
                    plan.map_or("-".into(), |p| duration_text(p.bake_seconds)),
                    plan.map_or("-".into(), halt_threshold),
                    plan.map_or("-".into(), |p| {
                        format!("{} succeeded", rate_text(p.min_success_share))
                    }),
                    stages(&wave.counts),
                ]
            }),
        );
        text.push_str(&format!("\n{waves}\n"));
    }
    if detail.timeline.is_empty() {
        text.push_str("\nno timeline entries\n");
    } else {
        let timeline = plain_table(
            ["TIME (UTC)", "STATE", "ACTOR", "DETAIL"],
            detail.timeline.iter().map(|e| {
                [
                    short_time(&e.at),
                    e.state.clone(),
                    e.actor.clone(),
                    or_dash(e.detail.as_deref()),
                ]
            }),
        );
        text.push_str(&format!("\n{timeline}\n"));
    }
    text
}

/// `drover rollout agents`: one page of agents; `offset` is where the page starts, so
/// the footer can say where the next one does.
pub(crate) fn rollout_agents_view(page: &RolloutAgents, offset: usize) -> String {
    let mut text = if page.agents.is_empty() {
        "no agents match\n".to_owned()
    } else {
        let table = plain_table(
            [
                "AGENT", "HOSTNAME", "VERSION", "WAVE", "STAGE", "TASK", "STATUS", "ERROR",
            ],
            page.agents.iter().map(|a| {
                let status = match (&a.status, &a.failure_class) {
                    (Some(status), Some(class)) => format!("{status} ({class})"),
                    (Some(status), None) => status.clone(),
                    (None, _) => "-".to_owned(),
                };
                [
                    a.agent_id.clone(),
                    a.hostname.clone(),
                    a.version.clone(),
                    (a.wave + 1).to_string(),
                    a.stage.replace('_', " "),
                    or_dash(a.task_id.as_deref()),
                    status,
                    or_dash(a.error.as_deref()),
                ]
            }),
        );
        format!("{table}\n")
    };
    let shown = page.agents.len();
    if shown > 0 {
        text.push_str(&format!(
            "{}–{} of {}",
            offset + 1,
            offset + shown,
            plural(page.total, "agent")
        ));
    } else {
        text.push_str(&plural(page.total, "agent"));
    }
    if offset + shown < page.total && shown > 0 {
        text.push_str(&format!("; more with --offset {}", offset + shown));
    }
    text.push('\n');
    text
}

/// After pause, resume, advance or abort: `rollout 3f2a9c1e (1.4.0 promote): paused,
/// wave 2/4, 12/40 succeeded`.
pub(crate) fn rollout_state_line(rollout: &Rollout) -> String {
    format!(
        "rollout {} ({} {}): {}, wave {}, {} succeeded\n",
        short_id(&rollout.id),
        rollout.version,
        rollout.kind,
        rollout.state_and_reason(),
        rollout.wave_position(),
        rollout.progress(),
    )
}

/// The plan a rollout started with: `rollout 3f2a9c1e: waves 1% → 10% → 100%, 10 agents
/// in wave 1 of 1000 targeted`.
pub(crate) fn plan_line(rollout: &Rollout) -> String {
    let shares: Vec<&str> = rollout.waves.iter().map(|w| w.share.as_str()).collect();
    let first = rollout.waves.first().map_or(0, |w| w.size);
    format!(
        "rollout {}: waves {}, {} in wave 1 of {} targeted\n",
        short_id(&rollout.id),
        shares.join(" → "),
        plural(usize::try_from(first).unwrap_or(usize::MAX), "agent"),
        rollout.counts.targeted,
    )
}

/// After `drover rollout create`.
pub(crate) fn created_view(rollout: &Rollout) -> String {
    format!(
        "started a {} rollout of {} on {}\n{}",
        rollout.kind,
        rollout.version,
        rollout.platforms(),
        plan_line(rollout)
    )
}

#[cfg(test)]
pub(super) mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::render::tests::parse;

    /// Stage counts in the server's shape; `stages` are `(stage, agents)` pairs and
    /// `targeted` is their sum, as the server's invariant has it.
    pub(crate) fn counts_json(stages: &[(&str, u64)]) -> Value {
        let mut counts = json!({
            "targeted": 0, "waiting": 0, "queued": 0, "downloading": 0, "installing": 0,
            "in_progress": 0, "succeeded": 0, "settled": 0, "failed": 0, "rolled_back": 0,
            "cancelled": 0, "skipped": 0,
            "skipped_by": {"paused": 0, "declines_updates": 0, "updates_off": 0},
            "failures": {"build": 0, "environment": 0, "transient": 0},
            "recent_build_failures": 0
        });
        let mut targeted = 0;
        for (stage, agents) in stages {
            counts[*stage] = json!(agents);
            targeted += agents;
        }
        counts["targeted"] = json!(targeted);
        counts["in_progress"] =
            json!(counts["downloading"].as_u64().unwrap() + counts["installing"].as_u64().unwrap());
        counts
    }

    pub(crate) fn rollout_json(id: &str, version: &str, kind: &str, state: &str) -> Value {
        let wave = |index: usize, share: &str, size: u64, state: &str, stages: &[(&str, u64)]| {
            json!({
                "index": index, "share": share, "size": size, "state": state,
                "started_at": if state == "pending" { Value::Null } else {
                    json!("2026-11-25T12:00:00.000Z") },
                "passed_at": null, "bake_until": null, "counts": counts_json(stages)
            })
        };
        let mut rollout = json!({
            "id": id, "version": version, "kind": kind, "state": state, "reason": null,
            "platforms": [{"os": "linux", "arch": "amd64"}, {"os": "windows", "arch": "amd64"}],
            "current_wave": 1,
            "waves": [
                wave(0, "1%", 1, "passed", &[("succeeded", 1)]),
                wave(1, "10%", 9, "running", &[("succeeded", 4), ("failed", 2), ("downloading", 3)]),
                wave(2, "50%", 40, "pending", &[("waiting", 40)]),
                wave(3, "100%", 50, "pending", &[("waiting", 50)]),
            ],
            "gate": null, "stale_stable": false, "stable_lag_seconds": null,
            "started_by": "operator:alice",
            "created_at": "2026-11-25T11:59:00.123Z", "updated_at": "2026-11-25T12:05:00.000Z"
        });
        let total = counts_json(&[
            ("succeeded", 5),
            ("failed", 2),
            ("downloading", 3),
            ("waiting", 90),
        ]);
        for (key, value) in total.as_object().unwrap() {
            rollout[key] = value.clone();
        }
        rollout
    }

    const UUID_A: &str = "3f2a9c1e-0000-4000-8000-000000000001";
    const UUID_B: &str = "3f2a9c1e-7000-4000-8000-000000000002";
    const UUID_C: &str = "b71d04aa-0000-4000-8000-000000000003";

    #[test]
    fn random_ids_are_cut_to_a_prefix_that_stays_unique() {
        assert_eq!(short_ids([UUID_C]), ["b71d04aa"]);
        assert_eq!(
            short_ids([UUID_A, UUID_B, UUID_C, "beta-1.4.0-linux-amd64"]),
            [
                "3f2a9c1e-0",
                "3f2a9c1e-7",
                "b71d04aa-0",
                "beta-1.4.0-linux-amd64"
            ]
        );
        assert_eq!(
            short_id("promote-1.4.0-linux-amd64"),
            "promote-1.4.0-linux-amd64"
        );
    }

    #[test]
    fn listing_shows_one_row_per_rollout_with_the_servers_numbers() {
        let mut promote = rollout_json(UUID_C, "1.4.0", "promote", "running");
        promote["failures"] = json!({"build": 2, "environment": 1, "transient": 3});
        let mut beta = rollout_json("beta-1.5.0-linux-amd64", "1.5.0", "beta", "completed");
        beta["gate"] = json!({"pass": false,
            "reason": "2 beta successes on linux/amd64, 3 needed to promote"});
        beta["current_wave"] = json!(0);
        beta["waves"] = json!([beta["waves"][0].clone()]);
        let text = rollouts_view(&parse::<Vec<Rollout>>(json!([promote, beta])));
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for column in [
            "ID",
            "VERSION",
            "KIND",
            "STATE",
            "PLATFORMS",
            "WAVE",
            "PROGRESS",
            "FAILED",
            "GATE",
        ] {
            assert!(lines[0].contains(column), "missing {column}");
        }
        let promote = lines[1];
        assert!(promote.starts_with("b71d04aa ") && !promote.contains(UUID_C));
        assert!(promote.contains(" promote ") && promote.contains(" running "));
        assert!(promote.contains("linux/amd64, windows/amd64"));
        assert!(promote.contains(" 2/4 "), "{promote}");
        assert!(promote.contains(" 5/100 "), "{promote}");
        assert!(
            promote.contains(" 2 (environment 1, transient 3) "),
            "{promote}"
        );
        assert!(promote.ends_with(" -"), "no gate on a promote: {promote}");
        let beta = lines[2];
        assert!(beta.starts_with("beta-1.5.0-linux-amd64 "));
        assert!(beta.contains(" 1/1 ") && beta.contains(" 0 "), "{beta}");
        assert!(beta.ends_with("blocked: 2 beta successes on linux/amd6…"));
        assert_eq!(lines.len(), 3, "no warnings expected:\n{text}");
    }

    #[test]
    fn no_rollouts_says_so() {
        assert_eq!(rollouts_view(&[]), "no rollouts\n");
    }

    #[test]
    fn halted_and_stale_rollouts_get_a_line_naming_the_command() {
        let mut halted = rollout_json(UUID_A, "1.3.9", "promote", "halted");
        halted["reason"] = json!("3 build failures in wave 2 (over 10% of 5)");
        let mut stale = rollout_json("beta-1.4.0-linux-amd64", "1.4.0", "beta", "completed");
        stale["platforms"] = json!([{"os": "linux", "arch": "amd64"}]);
        stale["gate"] = json!({"pass": true, "reason": "5 of 5 succeeded"});
        stale["stale_stable"] = json!(true);
        stale["stable_lag_seconds"] = json!(3 * 86_400 + 7_200);
        let text = rollouts_view(&parse::<Vec<Rollout>>(json!([halted, stale])));
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert!(lines[1].contains("halted: 3 build failures in wave 2 (ove…"));
        assert!(lines[2].ends_with(" pass"));
        assert_eq!(
            &lines[3..],
            [
                "HALTED: 3f2a9c1e (1.3.9 promote): 3 build failures in wave 2 (over 10% of 5) \
                 (drover rollout resume 3f2a9c1e to continue)",
                "WARNING: stable for linux/amd64 is 3 days behind beta 1.4.0 (drover promote 1.4.0)",
            ]
        );
    }

    fn detail_json() -> Value {
        let mut detail = rollout_json(UUID_A, "1.4.0", "promote", "halted");
        detail["reason"] = json!("2 build failures in wave 2");
        detail["failures"] = json!({"build": 2, "environment": 1, "transient": 0});
        detail["recent_build_failures"] = json!(2);
        detail["skipped"] = json!(3);
        detail["targeted"] = json!(103);
        detail["skipped_by"] = json!({"paused": 2, "declines_updates": 1, "updates_off": 0});
        detail["settled"] = json!(4);
        detail["waves"][0]["bake_until"] = json!("2026-11-25T12:10:00.000Z");
        detail["waves"][1]["state"] = json!("halted");
        detail["timeline"] = json!([
            {"at": "2026-11-25T11:59:00.123Z", "state": "running", "actor": "operator:alice",
             "detail": "promoted: 5 of 5 succeeded"},
            {"at": "2026-11-25T12:05:00.000Z", "state": "halted", "actor": "server",
             "detail": null},
        ]);
        let plan_wave = |bake: i64| {
            json!({"share": "x", "bake_seconds": bake, "max_failure_rate": 0.1,
                "min_finished": 5, "max_failures": null, "min_success_share": 0.9})
        };
        detail["plan"] = json!({"waves": [plan_wave(600), plan_wave(5400), plan_wave(45),
            plan_wave(0)]});
        detail["plan"]["waves"][1]["max_failures"] = json!(3);
        detail["plan"]["waves"][1]["max_failure_rate"] = json!(0.025);
        detail
    }

    #[test]
    fn detail_shows_header_counts_failures_and_skips() {
        let text = rollout_view(&parse(detail_json()));
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(lines[0], format!("rollout:   {UUID_A}"));
        for expected in [
            "version:   1.4.0 (promote)",
            "state:     halted: 2 build failures in wave 2",
            "platforms: linux/amd64, windows/amd64",
            "started:   2026-11-25 11:59:00 UTC by operator:alice",
            "updated:   2026-11-25 12:05:00 UTC",
            "wave:      2/4 (4 waves planned)",
            "targets:   103: 5 succeeded (4 settled), 2 failed, 3 downloading, 90 waiting, \
             3 skipped",
            "failures:  build 2 (2 since the last resume), environment 1, transient 0 \
             (ended tasks)",
            "skipped:   3: 2 paused, 1 declining updates",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{text}");
        }
        assert!(!text.contains("gate:"), "a promote has no gate");
    }

    #[test]
    fn detail_lists_each_wave_with_its_plan() {
        let text = rollout_view(&parse(detail_json()));
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let header = lines.iter().position(|l| l.starts_with("WAVE")).unwrap();
        for column in [
            "SHARE",
            "SIZE",
            "STARTED",
            "BAKE UNTIL",
            "HALTS AT",
            "TARGETS",
        ] {
            assert!(lines[header].contains(column), "missing {column}");
        }
        let first = lines[header + 1];
        assert!(first.starts_with("1 ") && first.contains(" 1% "), "{first}");
        assert!(first.contains(" passed ") && first.contains("2026-11-25 12:10:00"));
        assert!(first.contains(" 10m ") && first.contains(">10% of 5+ ended"));
        assert!(first.contains("90% succeeded") && first.ends_with("1 succeeded"));
        let second = lines[header + 2];
        assert!(
            second.starts_with("2 ") && second.contains(" halted "),
            "{second}"
        );
        assert!(second.contains(" 1h30m ") && second.contains(">2.5% of 5+ ended or >3"));
        assert!(second.ends_with("4 succeeded, 2 failed, 3 downloading"));
        let third = lines[header + 3];
        assert!(
            third.contains(" pending ") && third.contains(" 45s "),
            "{third}"
        );
        assert!(third.ends_with("40 waiting"));
        assert!(lines[header + 4].contains(" 100% ") && lines[header + 4].contains(" - "));
    }

    #[test]
    fn detail_ends_with_the_timeline() {
        let text = rollout_view(&parse(detail_json()));
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let header = lines.iter().position(|l| l.starts_with("TIME")).unwrap();
        assert!(lines[header].contains("ACTOR") && lines[header].contains("DETAIL"));
        assert!(lines[header + 1].starts_with("2026-11-25 11:59:00 "));
        assert!(lines[header + 1].ends_with("operator:alice  promoted: 5 of 5 succeeded"));
        assert!(lines[header + 2].contains("halted") && lines[header + 2].ends_with(" -"));
        assert_eq!(lines.len(), header + 3);

        let mut beta = detail_json();
        beta["kind"] = json!("beta");
        beta["gate"] = json!({"pass": false, "reason": "1 beta success, 3 needed"});
        beta["timeline"] = json!([]);
        let text = rollout_view(&parse(beta));
        assert!(text.contains("\ngate:      blocked: 1 beta success, 3 needed\n"));
        assert!(text.ends_with("\nno timeline entries\n"));
    }

    #[test]
    fn agents_page_shows_stage_status_and_class_with_a_paging_hint() {
        let page: RolloutAgents = parse(json!({"total": 7, "agents": [
            {"agent_id": "a1", "hostname": "till-01", "version": "1.3.0", "wave": 1,
             "stage": "rolled_back", "task_id": "t1", "status": "rolled_back",
             "failure_class": "build", "error": "probation failed"},
            {"agent_id": "a2", "hostname": "till-02", "version": "1.3.0", "wave": 2,
             "stage": "waiting", "task_id": null, "status": null, "failure_class": null,
             "error": null},
        ]}));
        let text = rollout_agents_view(&page, 2);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert!(lines[0].starts_with("AGENT") && lines[0].contains("STAGE"));
        assert!(lines[1].contains("till-01") && lines[1].contains(" 2 "));
        assert!(lines[1].contains("rolled back") && lines[1].contains("rolled_back (build)"));
        assert!(lines[1].ends_with("probation failed"));
        assert!(lines[2].contains(" 3 ") && lines[2].contains("waiting"));
        assert_eq!(lines[3], "3–4 of 7 agents; more with --offset 4");

        let last: RolloutAgents = parse(json!({"total": 1, "agents": [
            {"agent_id": "a1", "hostname": "h", "version": "1.4.0", "wave": 0,
             "stage": "succeeded", "task_id": "t1", "status": "succeeded",
             "failure_class": null, "error": null}]}));
        assert!(rollout_agents_view(&last, 0).ends_with("\n1–1 of 1 agent\n"));
        let none: RolloutAgents = parse(json!({"total": 0, "agents": []}));
        assert_eq!(rollout_agents_view(&none, 0), "no agents match\n0 agents\n");
    }

    #[test]
    fn state_line_names_the_rollout_and_where_it_stands() {
        let paused: Rollout = parse(rollout_json(UUID_A, "1.4.0", "promote", "paused"));
        assert_eq!(
            rollout_state_line(&paused),
            "rollout 3f2a9c1e (1.4.0 promote): paused, wave 2/4, 5/100 succeeded\n"
        );
        let mut aborted = rollout_json("targeted-x", "1.4.1", "targeted", "aborted");
        aborted["reason"] = json!("aborted by operator:alice");
        aborted["waves"] = json!([]);
        assert_eq!(
            rollout_state_line(&parse(aborted)),
            "rollout targeted-x (1.4.1 targeted): aborted: aborted by operator:alice, wave -, \
             5/100 succeeded\n"
        );
    }

    #[test]
    fn durations_and_rates_read_naturally() {
        for (seconds, expected) in [(0, "-"), (45, "45s"), (600, "10m"), (5400, "1h30m")] {
            assert_eq!(duration_text(seconds), expected);
        }
        for (rate, expected) in [(0.1, "10%"), (0.025, "2.5%"), (1.0, "100%"), (0.9, "90%")] {
            assert_eq!(rate_text(rate), expected);
        }
        assert_eq!(
            short_time("2026-11-25T12:00:00.000Z"),
            "2026-11-25 12:00:00"
        );
        assert_eq!(short_time("yesterday"), "yesterday");
    }

    #[test]
    fn plan_and_created_lines_name_the_waves_and_the_first_wave() {
        let rollout: Rollout = parse(rollout_json(UUID_A, "1.4.1", "targeted", "running"));
        assert_eq!(
            plan_line(&rollout),
            "rollout 3f2a9c1e: waves 1% → 10% → 50% → 100%, 1 agent in wave 1 of 100 targeted\n"
        );
        assert_eq!(
            created_view(&rollout),
            format!(
                "started a targeted rollout of 1.4.1 on linux/amd64, windows/amd64\n{}",
                plan_line(&rollout)
            )
        );
    }
}
