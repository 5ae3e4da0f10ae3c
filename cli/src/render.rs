//! The server's answers as `drover` reads them, and the tables and lines it prints for
//! each. Renderers return text ending in a newline and never do I/O, so tests can read it.
//! Agents, releases and the hierarchy live here; rollout records, the version-keyed
//! rollout actions, the audit log, tokens and `explain` each have a submodule.

mod audit;
mod explain;
mod mirrors;
mod rollouts;
mod tokens;
mod versions;

use comfy_table::Table;
use serde::Deserialize;

pub(crate) use self::audit::{AuditPage, audit_view};
pub(crate) use self::explain::{Explanation, explanation};
pub(crate) use self::mirrors::{MirrorList, MirrorSet, mirror_line, mirrors_view};
pub(crate) use self::rollouts::{
    Rollout, RolloutAgents, RolloutDetail, created_view, rollout_agents_view, rollout_state_line,
    rollout_view, rollouts_view, short_id,
};
pub(crate) use self::tokens::{
    ApiToken, EnrollmentToken, ListedEnrollmentToken, NewApiToken, RevokedToken,
    enrollment_token_created, enrollment_token_revoked, enrollment_tokens_table, token_created,
    token_revoked, tokens_table,
};
pub(crate) use self::versions::{
    Promoted, ResumeAnswer, RolledBack, Unblocked, promoted_view, resume_view, rolled_back_view,
    unblocked_line,
};

#[derive(Debug, Deserialize)]
pub(crate) struct Agent {
    id: String,
    hostname: String,
    version: String,
    os: String,
    arch: String,
    site_id: String,
    channel: String,
    channel_source: String,
    online: bool,
    last_seen: String,
    paused: bool,
    auto_update: bool,
    /// Older servers do not send it.
    #[serde(default)]
    fingerprint_conflict: Option<FingerprintConflict>,
}

/// Enrollments refused because they carried this live agent's fingerprint.
#[derive(Debug, Deserialize)]
pub(crate) struct FingerprintConflict {
    last_at: String,
    attempts: i64,
    hostname: Option<String>,
}

/// `GET /api/v1/agents/{id}`: the agent and its update tasks, newest first.
#[derive(Debug, Deserialize)]
pub(crate) struct AgentDetail {
    #[serde(flatten)]
    agent: Agent,
    tasks: Vec<Task>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Task {
    id: String,
    agent_id: String,
    from_version: String,
    to_version: String,
    kind: String,
    status: String,
    attempts: u32,
    error: Option<String>,
    bytes_done: u64,
    bytes_total: u64,
    created_at: String,
    #[serde(default)]
    rollout_id: Option<String>,
    #[serde(default)]
    wave: Option<u64>,
    #[serde(default)]
    failure_class: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct UpdateRequested {
    task: Task,
    pushed: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Release {
    version: String,
    os: String,
    arch: String,
    channel: String,
    sha256: String,
    size: u64,
    file: String,
    blocked: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Skipped {
    file: String,
    reason: String,
}

/// `GET /api/v1/releases?include=skipped` and `POST /api/v1/releases/rescan`.
#[derive(Debug, Deserialize)]
pub(crate) struct Listing {
    releases: Vec<Release>,
    skipped: Vec<Skipped>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChannelChanged {
    id: String,
    channel: Option<String>,
    agents_affected: usize,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Client {
    id: String,
    name: String,
    channel: Option<String>,
    #[serde(default)]
    maintenance_window: Option<MaintenanceWindow>,
    created_at: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Site {
    id: String,
    client_id: String,
    name: String,
    channel: Option<String>,
    #[serde(default)]
    maintenance_window: Option<MaintenanceWindow>,
    created_at: String,
}

/// A site's or client's maintenance window and where it stands now.
#[derive(Debug, Deserialize)]
pub(crate) struct MaintenanceWindow {
    days: Vec<String>,
    start: String,
    duration: String,
    time_zone: String,
    open: bool,
    until: String,
}

impl MaintenanceWindow {
    /// `mon,fri 02:00 for 3h Europe/Berlin (closed until 2026-12-01T01:00:00Z)`.
    fn describe(&self) -> String {
        let now = if self.open { "open" } else { "closed" };
        format!(
            "{} {} for {} {} ({now} until {})",
            self.days.join(","),
            self.start,
            self.duration,
            self.time_zone,
            self.until
        )
    }
}

fn window_or_dash(window: Option<&MaintenanceWindow>) -> String {
    window.map_or_else(|| "-".to_owned(), MaintenanceWindow::describe)
}

#[derive(Debug, Deserialize)]
pub(crate) struct WindowSet {
    id: String,
    maintenance_window: Option<MaintenanceWindow>,
    agents_affected: usize,
}

/// `kind` is what the window was set on: `site` or `client`.
pub(crate) fn window_line(kind: &str, set: &WindowSet) -> String {
    let what = match &set.maintenance_window {
        Some(window) => format!("maintenance window {}", window.describe()),
        None => "maintenance window cleared".to_owned(),
    };
    let affected = plural(set.agents_affected, "agent");
    format!("{kind} {}: {what} ({affected} affected)\n", set.id)
}

#[derive(Debug, Deserialize)]
pub(crate) struct UpdatesSwitch {
    enabled: bool,
}

fn plain_table<const N: usize>(
    header: [&str; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> Table {
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header(header);
    for row in rows {
        table.add_row(row.map(|cell| printable(&cell)));
    }
    table
}

/// Text from agents (hostnames, versions) with control characters shown as escapes, so
/// a hostile one cannot move the cursor, recolour or retitle an operator's terminal.
pub(crate) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `1 build`, `3 builds`.
fn plural(count: usize, word: &str) -> String {
    format!("{count} {word}{}", if count == 1 { "" } else { "s" })
}

fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

/// `text` cut to at most `max` characters, the cut marked with `…`.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let kept: String = text.chars().take(max - 1).collect();
    format!("{}…", kept.trim_end())
}

/// Decimal units, as download sizes are usually quoted.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KB", "MB", "GB", "TB", "PB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    // 999.95 would print as "1000.0", so it moves up a unit too.
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn update_mode(agent: &Agent) -> &'static str {
    match (agent.paused, agent.auto_update) {
        (true, _) => "paused",
        (false, false) => "off (agent)",
        (false, true) => "auto",
    }
}

fn presence(agent: &Agent) -> &'static str {
    if agent.online { "online" } else { "offline" }
}

pub(crate) fn agents_table(agents: &[Agent]) -> String {
    let table = plain_table(
        [
            "ID",
            "HOSTNAME",
            "VERSION",
            "PLATFORM",
            "CHANNEL",
            "STATUS",
            "LAST SEEN",
            "UPDATES",
        ],
        agents.iter().map(|agent| {
            [
                agent.id.clone(),
                agent.hostname.clone(),
                agent.version.clone(),
                format!("{}/{}", agent.os, agent.arch),
                format!("{} ({})", agent.channel, agent.channel_source),
                presence(agent).to_owned(),
                agent.last_seen.clone(),
                update_mode(agent).to_owned(),
            ]
        }),
    );
    let online = agents.iter().filter(|a| a.online).count();
    format!(
        "{table}\n{}, {online} online\n",
        plural(agents.len(), "agent")
    )
}

pub(crate) fn agent_details(detail: &AgentDetail) -> String {
    let agent = &detail.agent;
    let fields = [
        ("id", agent.id.clone()),
        ("hostname", agent.hostname.clone()),
        ("version", agent.version.clone()),
        ("platform", format!("{}/{}", agent.os, agent.arch)),
        ("site", agent.site_id.clone()),
        (
            "channel",
            format!("{} ({})", agent.channel, agent.channel_source),
        ),
        ("status", presence(agent).to_owned()),
        ("last seen", agent.last_seen.clone()),
        ("updates", update_mode(agent).to_owned()),
    ];
    let mut text: String = fields
        .iter()
        .map(|(key, value)| format!("{:<11}{}\n", format!("{key}:"), printable(value)))
        .collect();
    if let Some(conflict) = &agent.fingerprint_conflict {
        text.push_str(&printable(&format!(
            "conflict:  {} refused from another machine with this fingerprint{}, last at {} \
             (a clone needs its own machine id)",
            plural(
                usize::try_from(conflict.attempts).unwrap_or(0),
                "enrollment"
            ),
            conflict
                .hostname
                .as_deref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default(),
            conflict.last_at
        )));
        text.push('\n');
    }
    if detail.tasks.is_empty() {
        text.push_str("\nno update tasks\n");
        return text;
    }
    let tasks = plain_table(
        [
            "CREATED",
            "TASK",
            "FROM → TO",
            "KIND",
            "STATUS",
            "ROLLOUT",
            "ATTEMPTS",
            "PROGRESS",
            "ERROR",
        ],
        detail.tasks.iter().map(|task| {
            let status = match &task.failure_class {
                Some(class) => format!("{} ({class})", task.status),
                None => task.status.clone(),
            };
            // Tasks made before rollouts were records belong to none.
            let rollout = match (&task.rollout_id, task.wave) {
                (Some(id), Some(wave)) => format!("{} wave {}", short_id(id), wave + 1),
                (Some(id), None) => short_id(id),
                (None, _) => "-".to_owned(),
            };
            let progress = if task.bytes_total == 0 {
                "-".to_owned()
            } else {
                format!(
                    "{}/{}",
                    human_size(task.bytes_done),
                    human_size(task.bytes_total)
                )
            };
            [
                task.created_at.clone(),
                task.id.clone(),
                format!("{} → {}", task.from_version, task.to_version),
                task.kind.clone(),
                status,
                rollout,
                task.attempts.to_string(),
                progress,
                or_dash(task.error.as_deref()),
            ]
        }),
    );
    format!("{text}\n{tasks}\n")
}

pub(crate) fn paused_line(agent: &Agent) -> String {
    let state = if agent.paused { "paused" } else { "resumed" };
    format!("agent {} ({}): updates {state}\n", agent.hostname, agent.id)
}

pub(crate) fn update_line(answer: &UpdateRequested) -> String {
    let task = &answer.task;
    let delivery = if answer.pushed {
        "sent now"
    } else {
        "queued until the agent connects"
    };
    format!(
        "update to {} requested for agent {} (task {}): {delivery}\n",
        task.to_version, task.agent_id, task.id
    )
}

/// The releases table and its footer; with `skipped` (known only from
/// `?include=skipped` or a rescan), also the skipped files.
pub(crate) fn releases_view(releases: &[Release], skipped: Option<&[Skipped]>) -> String {
    let table = plain_table(
        [
            "VERSION", "PLATFORM", "CHANNEL", "SIZE", "SHA256", "FILE", "STATUS",
        ],
        releases.iter().map(|release| {
            [
                release.version.clone(),
                format!("{}/{}", release.os, release.arch),
                release.channel.clone(),
                human_size(release.size),
                release.sha256.chars().take(12).collect(),
                release.file.clone(),
                if release.blocked {
                    "blocked"
                } else {
                    "offered"
                }
                .to_owned(),
            ]
        }),
    );
    let blocked = releases.iter().filter(|r| r.blocked).count();
    let mut footer = format!("{} offered", plural(releases.len() - blocked, "build"));
    if blocked > 0 {
        footer.push_str(&format!(", {blocked} blocked"));
    }
    let mut text = format!("{table}\n");
    if let Some(skipped) = skipped {
        if !skipped.is_empty() {
            let files = plain_table(
                ["FILE", "REASON"],
                skipped.iter().map(|s| [s.file.clone(), s.reason.clone()]),
            );
            text.push_str(&format!("\nSkipped files\n{files}\n"));
        }
        footer.push_str(&format!(", {} skipped", plural(skipped.len(), "file")));
    }
    format!("{text}{footer}\n")
}

pub(crate) fn listing_view(listing: &Listing) -> String {
    releases_view(&listing.releases, Some(&listing.skipped))
}

/// `kind` is what the channel was set on: `agent`, `site` or `client`.
pub(crate) fn channel_line(kind: &str, change: &ChannelChanged) -> String {
    let what = match &change.channel {
        Some(channel) => format!("channel {channel}"),
        None => "channel cleared".to_owned(),
    };
    let affected = plural(change.agents_affected, "agent");
    format!("{kind} {}: {what} ({affected} affected)\n", change.id)
}

pub(crate) fn clients_table(clients: &[Client]) -> String {
    let table = plain_table(
        ["ID", "NAME", "CHANNEL", "MAINTENANCE WINDOW", "CREATED"],
        clients.iter().map(|c| {
            let channel = or_dash(c.channel.as_deref());
            let window = window_or_dash(c.maintenance_window.as_ref());
            [
                c.id.clone(),
                c.name.clone(),
                channel,
                window,
                c.created_at.clone(),
            ]
        }),
    );
    format!("{table}\n{}\n", plural(clients.len(), "client"))
}

pub(crate) fn sites_table(sites: &[Site]) -> String {
    let table = plain_table(
        [
            "ID",
            "CLIENT",
            "NAME",
            "CHANNEL",
            "MAINTENANCE WINDOW",
            "CREATED",
        ],
        sites.iter().map(|s| {
            let channel = or_dash(s.channel.as_deref());
            let window = window_or_dash(s.maintenance_window.as_ref());
            let created = s.created_at.clone();
            [
                s.id.clone(),
                s.client_id.clone(),
                s.name.clone(),
                channel,
                window,
                created,
            ]
        }),
    );
    format!("{table}\n{}\n", plural(sites.len(), "site"))
}

pub(crate) fn client_created(client: &Client) -> String {
    format!("client {} created: {}\n", client.name, client.id)
}

pub(crate) fn site_created(site: &Site) -> String {
    format!(
        "site {} created for client {}: {}\n",
        site.name, site.client_id, site.id
    )
}

pub(crate) fn updates_line(switch: &UpdatesSwitch) -> String {
    let state = if switch.enabled {
        "enabled"
    } else {
        "disabled"
    };
    format!("updates are {state} server-wide\n")
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    use super::*;

    pub(super) fn parse<T: DeserializeOwned>(value: Value) -> T {
        serde_json::from_value(value).expect("sample answer parses")
    }

    fn agent_json(
        id: &str,
        hostname: &str,
        online: bool,
        paused: bool,
        auto_update: bool,
    ) -> Value {
        json!({
            "id": id, "hostname": hostname, "version": "1.2.0", "os": "linux", "arch": "amd64",
            "site_id": "s1", "channel": "beta", "channel_source": "site", "online": online,
            "last_seen": "2026-11-25T12:00:00.000Z", "paused": paused, "auto_update": auto_update,
            "enrolled_at": "2026-11-01T09:00:00.000Z", "fingerprint": "f1"
        })
    }

    fn task_json(id: &str, status: &str, bytes: (u64, u64), error: Option<&str>) -> Value {
        json!({
            "id": id, "agent_id": "a1", "from_version": "1.1.0", "to_version": "1.2.0",
            "kind": "forced", "status": status, "attempts": 2, "error": error,
            "bytes_done": bytes.0, "bytes_total": bytes.1,
            "created_at": "2026-11-25T12:00:00.000Z", "updated_at": "2026-11-25T12:01:00.000Z"
        })
    }

    fn release_json(version: &str, size: u64, blocked: bool) -> Value {
        json!({
            "version": version, "os": "windows", "arch": "arm64", "channel": "stable",
            "sha256": "0123456789abcdef0123456789abcdef", "size": size,
            "file": format!("drover-agent-{version}-windows-arm64.exe"),
            "blocked": blocked, "signed": true
        })
    }

    #[test]
    fn table_shows_status_channel_and_update_mode() {
        let mut windows = agent_json("a2", "till-02", false, true, true);
        windows["os"] = json!("windows");
        windows["arch"] = json!("arm64");
        windows["channel"] = json!("stable");
        windows["channel_source"] = json!("default");
        let agents: Vec<Agent> = parse(json!([
            agent_json("a1", "till-01", true, false, false),
            windows
        ]));
        let text = agents_table(&agents);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("HOSTNAME"));
        assert!(lines[1].contains("till-01") && lines[1].contains("beta (site)"));
        assert!(lines[1].contains("online") && lines[1].contains("off (agent)"));
        assert!(lines[2].contains("windows/arm64") && lines[2].contains("offline"));
        assert!(lines[2].contains("stable (default)") && lines[2].contains("paused"));
        assert_eq!(lines.last(), Some(&"2 agents, 1 online"));
    }

    #[test]
    fn agent_details_list_fields_then_tasks() {
        let mut answer = agent_json("a1", "till-01", true, false, true);
        answer["tasks"] = json!([
            task_json("t2", "downloading", (1_000_000, 52_400_000), None),
            task_json("t1", "failed", (0, 0), Some("checksum mismatch")),
        ]);
        answer["tasks"][0]["rollout_id"] = json!("3f2a9c1e-0000-4000-8000-000000000001");
        answer["tasks"][0]["wave"] = json!(1);
        answer["tasks"][1]["failure_class"] = json!("build");
        let text = agent_details(&parse(answer));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "id:        a1");
        assert!(lines.contains(&"hostname:  till-01"));
        assert!(lines.contains(&"platform:  linux/amd64"));
        assert!(lines.contains(&"channel:   beta (site)"));
        assert!(lines.contains(&"updates:   auto"));
        let header = lines.iter().position(|l| l.contains("CREATED")).unwrap();
        for column in [
            "TASK",
            "FROM → TO",
            "KIND",
            "ROLLOUT",
            "ATTEMPTS",
            "PROGRESS",
            "ERROR",
        ] {
            assert!(lines[header].contains(column), "missing {column}");
        }
        let (newest, oldest) = (lines[header + 1], lines[header + 2]);
        assert!(newest.contains("t2") && newest.contains("1.1.0 → 1.2.0"));
        assert!(newest.contains("downloading") && newest.contains("1.0 MB/52.4 MB"));
        assert!(newest.contains(" 3f2a9c1e wave 2 "), "{newest}");
        assert!(oldest.contains("t1") && oldest.contains("failed (build)"));
        assert!(oldest.contains(" - "), "a task of no rollout: {oldest}");
        assert!(oldest.contains("checksum mismatch"));
    }

    #[test]
    fn agent_details_without_tasks_say_so() {
        let mut answer = agent_json("a1", "till-01", false, true, true);
        answer["tasks"] = json!([]);
        let text = agent_details(&parse(answer));
        assert!(text.contains("status:    offline\n"));
        assert!(text.contains("updates:   paused\n"));
        assert!(text.ends_with("\nno update tasks\n"));
    }

    #[test]
    fn agent_details_show_a_fingerprint_conflict() {
        let mut answer = agent_json("a1", "till-01", true, false, true);
        answer["tasks"] = json!([]);
        answer["fingerprint_conflict"] =
            json!({"last_at": "2026-11-29T08:00:00Z", "attempts": 3, "hostname": "till-01-clone"});
        let text = agent_details(&parse(answer));
        assert!(
            text.contains(
                "conflict:  3 enrollments refused from another machine with this fingerprint \
                 (till-01-clone), last at 2026-11-29T08:00:00Z (a clone needs its own machine id)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn pause_and_resume_lines_name_the_agent() {
        let paused: Agent = parse(agent_json("a1", "till-01", true, true, true));
        let resumed: Agent = parse(agent_json("a1", "till-01", true, false, true));
        assert_eq!(paused_line(&paused), "agent till-01 (a1): updates paused\n");
        assert_eq!(
            paused_line(&resumed),
            "agent till-01 (a1): updates resumed\n"
        );
    }

    #[test]
    fn update_line_says_sent_or_queued() {
        let task = task_json("t1", "queued", (0, 0), None);
        let sent: UpdateRequested = parse(json!({"task": task, "pushed": true}));
        let queued: UpdateRequested = parse(json!({"task": task, "pushed": false}));
        assert_eq!(
            update_line(&sent),
            "update to 1.2.0 requested for agent a1 (task t1): sent now\n"
        );
        assert_eq!(
            update_line(&queued),
            "update to 1.2.0 requested for agent a1 (task t1): queued until the agent connects\n"
        );
    }

    #[test]
    fn releases_table_shows_platform_size_hash_and_status() {
        let releases: Vec<Release> = parse(json!([
            release_json("1.2.0", 52_400_000, false),
            release_json("1.1.0", 1024, true),
            release_json("1.0.0", 512, false),
        ]));
        let text = releases_view(&releases, None);
        let lines: Vec<&str> = text.lines().collect();
        for column in [
            "VERSION", "PLATFORM", "CHANNEL", "SIZE", "SHA256", "FILE", "STATUS",
        ] {
            assert!(lines[0].contains(column), "missing {column}");
        }
        assert!(lines[1].contains("windows/arm64") && lines[1].contains("stable"));
        assert!(lines[1].contains("52.4 MB") && lines[1].contains("offered"));
        assert!(lines[1].contains("0123456789ab ") && !lines[1].contains("0123456789abc"));
        assert!(lines[1].contains("drover-agent-1.2.0-windows-arm64.exe"));
        assert!(lines[2].contains("1.0 KB") && lines[2].contains("blocked"));
        assert!(lines[3].contains("512 B") && lines[3].contains("offered"));
        assert_eq!(lines.last(), Some(&"2 builds offered, 1 blocked"));
        assert!(!text.contains("Skipped files"));
    }

    #[test]
    fn listing_shows_skipped_files_and_counts_them() {
        let listing: Listing = parse(json!({
            "releases": [release_json("1.2.0", 52_400_000, false)],
            "skipped": [
                {"file": "notes.txt", "reason": "not a drover-agent build"},
                {"file": "drover-agent-x-linux-amd64", "reason": "version \"x\" is not semver"},
            ]
        }));
        let text = listing_view(&listing);
        let lines: Vec<&str> = text.lines().collect();
        let heading = lines.iter().position(|l| *l == "Skipped files").unwrap();
        assert!(lines[heading + 1].contains("FILE") && lines[heading + 1].contains("REASON"));
        assert!(lines[heading + 2].contains("notes.txt"));
        assert!(lines[heading + 2].contains("not a drover-agent build"));
        assert_eq!(lines.last(), Some(&"1 build offered, 2 files skipped"));

        let clean: Listing = parse(json!({"releases": [], "skipped": []}));
        assert_eq!(
            listing_view(&clean).lines().last(),
            Some("0 builds offered, 0 files skipped")
        );
        assert!(!listing_view(&clean).contains("Skipped files"));
    }

    #[test]
    fn human_sizes_use_decimal_units() {
        let cases = [
            (0, "0 B"),
            (512, "512 B"),
            (999, "999 B"),
            (1000, "1.0 KB"),
            (1024, "1.0 KB"),
            (999_999, "1.0 MB"),
            (52_400_000, "52.4 MB"),
            (3_210_000_000, "3.2 GB"),
        ];
        for (bytes, expected) in cases {
            assert_eq!(human_size(bytes), expected, "{bytes} bytes");
        }
    }

    #[test]
    fn control_characters_from_agents_are_shown_escaped() {
        assert_eq!(printable("web-1"), "web-1");
        assert_eq!(printable("a\nb\u{1b}[31m"), "a\\u{a}b\\u{1b}[31m");
        let agents: Vec<Agent> = parse(json!([{
            "id": "a1", "site_id": "s1", "hostname": "evil\u{1b}]0;owned\u{7}", "version": "1.0.0",
            "os": "linux", "arch": "amd64", "channel": "stable", "channel_source": "default",
            "online": true, "paused": false, "auto_update": true, "last_seen": "x",
            "fingerprint": "f", "enrolled_at": "x"
        }]));
        let text = agents_table(&agents);
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        assert!(text.contains("evil\\u{1b}]0;owned\\u{7}"), "{text}");
    }

    #[test]
    fn shorten_cuts_long_text_with_an_ellipsis() {
        assert_eq!(shorten("pass", 10), "pass");
        assert_eq!(shorten("0123456789", 10), "0123456789");
        assert_eq!(shorten("01234 6789ab", 7), "01234…");
        assert_eq!(shorten("ééééé", 3), "éé…");
    }

    #[test]
    fn channel_lines_say_set_or_cleared() {
        let set: ChannelChanged =
            parse(json!({"id": "s1", "channel": "beta", "agents_affected": 3}));
        let cleared: ChannelChanged =
            parse(json!({"id": "a1", "channel": null, "agents_affected": 1}));
        assert_eq!(
            channel_line("site", &set),
            "site s1: channel beta (3 agents affected)\n"
        );
        assert_eq!(
            channel_line("agent", &cleared),
            "agent a1: channel cleared (1 agent affected)\n"
        );
    }

    #[test]
    fn clients_and_sites_tables_show_channel_or_dash() {
        let clients: Vec<Client> = parse(json!([
            {"id": "c1", "name": "Acme", "channel": "beta", "created_at": "2026-11-01"},
            {"id": "c2", "name": "Globex", "channel": null, "created_at": "2026-11-02"},
        ]));
        let text = clients_table(&clients);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("NAME") && lines[0].contains("CHANNEL"));
        assert!(lines[1].contains("Acme") && lines[1].contains("beta"));
        assert!(lines[2].contains("Globex") && lines[2].contains(" - "));
        assert_eq!(lines.last(), Some(&"2 clients"));

        let site = json!({"id": "s1", "client_id": "c1", "name": "Depot", "channel": null,
            "created_at": "2026-11-03"});
        let windowed = json!({"id": "s2", "client_id": "c1", "name": "Yard", "channel": null,
            "maintenance_window": {"days": ["mon", "fri"], "start": "02:00", "duration": "3h",
                "time_zone": "Europe/Berlin", "open": false, "until": "2026-12-04T01:00:00Z"},
            "created_at": "2026-11-03"});
        let text = sites_table(&parse::<Vec<Site>>(json!([site, windowed])));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("CLIENT") && lines[0].contains("MAINTENANCE WINDOW"));
        assert!(lines[1].contains("s1") && lines[1].contains("c1") && lines[1].contains("Depot"));
        assert!(
            lines[2]
                .contains("mon,fri 02:00 for 3h Europe/Berlin (closed until 2026-12-04T01:00:00Z)")
        );
        assert_eq!(lines.last(), Some(&"2 sites"));
        let text = sites_table(&parse::<Vec<Site>>(json!([site])));
        assert_eq!(text.lines().last(), Some("1 site"));
        assert_eq!(
            site_created(&parse(site)),
            "site Depot created for client c1: s1\n"
        );
    }

    #[test]
    fn window_lines_say_set_or_cleared() {
        let set: WindowSet = parse(json!({"id": "c1", "agents_affected": 4,
            "maintenance_window": {"days": ["sat"], "start": "22:00", "duration": "4h",
                "time_zone": "UTC", "open": true, "until": "2026-12-06T02:00:00Z"}}));
        assert_eq!(
            window_line("client", &set),
            "client c1: maintenance window sat 22:00 for 4h UTC (open until 2026-12-06T02:00:00Z) (4 agents affected)\n"
        );
        let cleared: WindowSet =
            parse(json!({"id": "s1", "maintenance_window": null, "agents_affected": 1}));
        assert_eq!(
            window_line("site", &cleared),
            "site s1: maintenance window cleared (1 agent affected)\n"
        );
    }

    #[test]
    fn created_client_line_names_it() {
        let client: Client =
            parse(json!({"id": "c1", "name": "Acme", "channel": null, "created_at": "x"}));
        assert_eq!(client_created(&client), "client Acme created: c1\n");
    }

    #[test]
    fn updates_line_says_enabled_or_disabled() {
        let on: UpdatesSwitch = parse(json!({"enabled": true}));
        let off: UpdatesSwitch = parse(json!({"enabled": false}));
        assert_eq!(updates_line(&on), "updates are enabled server-wide\n");
        assert_eq!(updates_line(&off), "updates are disabled server-wide\n");
    }
}
