//! Rollout records in storage: the rollouts, their targets and waves, the timeline, and
//! the grouped counts their health is computed from. The SQL is the same on SQLite and
//! PostgreSQL, so `impl_rollout_store!` writes it once for each backend.

use async_trait::async_trait;

use super::queries::placeholders;
use super::{FailureClass, StoreError, StoreResult, TaskStatus};

/// What a rollout does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutKind {
    /// A build landed on beta: beta-channel agents.
    Beta,
    /// A build became stable: agents of every channel that run something older.
    Promote,
    /// A version was rolled back: agents running it go to the newest build left.
    Rollback,
    /// An operator chose agents and a version.
    Targeted,
}

impl RolloutKind {
    pub const ALL: [RolloutKind; 4] = [
        RolloutKind::Beta,
        RolloutKind::Promote,
        RolloutKind::Rollback,
        RolloutKind::Targeted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutKind::Beta => "beta",
            RolloutKind::Promote => "promote",
            RolloutKind::Rollback => "rollback",
            RolloutKind::Targeted => "targeted",
        }
    }

    pub fn parse(text: &str) -> Option<RolloutKind> {
        RolloutKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Its started waves are open to their agents.
    Running,
    /// Its current wave passed and bakes before the next starts.
    Waiting,
    Paused,
    /// A wave went over a failure threshold.
    Halted,
    Completed,
    Aborted,
    /// A newer rollout of the same kind took over its platforms.
    Superseded,
}

impl RolloutState {
    pub const ALL: [RolloutState; 7] = [
        RolloutState::Running,
        RolloutState::Waiting,
        RolloutState::Paused,
        RolloutState::Halted,
        RolloutState::Completed,
        RolloutState::Aborted,
        RolloutState::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Waiting => "waiting",
            RolloutState::Paused => "paused",
            RolloutState::Halted => "halted",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
            RolloutState::Superseded => "superseded",
        }
    }

    pub fn parse(text: &str) -> Option<RolloutState> {
        RolloutState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// The states that are not finished (`OPEN_STATES` in SQL).
    pub const OPEN: [RolloutState; 4] = [
        RolloutState::Running,
        RolloutState::Waiting,
        RolloutState::Paused,
        RolloutState::Halted,
    ];

    /// Not finished: it may still start agents, now or after an operator acts.
    pub fn is_open(self) -> bool {
        RolloutState::OPEN.contains(&self)
    }
}

/// SQL list of the open states.
pub(super) const OPEN_STATES: &str = "('running', 'waiting', 'paused', 'halted')";

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub id: String,
    pub version: String,
    pub kind: RolloutKind,
    /// (os, arch) pairs, sorted.
    pub platforms: Vec<(String, String)>,
    pub state: RolloutState,
    /// The plan as JSON (the rollouts module owns its shape).
    pub plan: String,
    pub current_wave: i64,
    pub resumed_at_ms: i64,
    pub reason: Option<String>,
    pub started_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Its counts, frozen (JSON) once it closed long enough ago for its tasks to be
    /// pruned; its counts are read from here from then on.
    pub summary: Option<String>,
}

#[derive(sqlx::FromRow)]
pub(super) struct RolloutRow {
    pub(super) id: String,
    pub(super) version: String,
    pub(super) kind: String,
    pub(super) platforms: String,
    pub(super) state: String,
    pub(super) plan: String,
    pub(super) current_wave: i64,
    pub(super) resumed_at: i64,
    pub(super) reason: Option<String>,
    pub(super) started_by: String,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) summary: Option<String>,
}

pub(super) const ROLLOUT_COLUMNS: &str = "id, version, kind, platforms, state, plan, current_wave, \
     resumed_at, reason, started_by, created_at, updated_at, summary";

pub(super) fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::Other(format!("unknown {what} {value:?} in the database"))
}

impl TryFrom<RolloutRow> for Rollout {
    type Error = StoreError;

    fn try_from(row: RolloutRow) -> StoreResult<Rollout> {
        Ok(Rollout {
            kind: RolloutKind::parse(&row.kind)
                .ok_or_else(|| corrupt("rollout kind", &row.kind))?,
            state: RolloutState::parse(&row.state)
                .ok_or_else(|| corrupt("rollout state", &row.state))?,
            platforms: parse_platforms(&row.platforms),
            id: row.id,
            version: row.version,
            plan: row.plan,
            current_wave: row.current_wave,
            resumed_at_ms: row.resumed_at,
            reason: row.reason,
            started_by: row.started_by,
            created_at_ms: row.created_at,
            updated_at_ms: row.updated_at,
            summary: row.summary,
        })
    }
}

pub(super) fn render_platforms(platforms: &[(String, String)]) -> String {
    let mut list: Vec<String> = platforms.iter().map(|(o, a)| format!("{o}/{a}")).collect();
    list.sort();
    list.dedup();
    list.join(",")
}

fn parse_platforms(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|p| p.split_once('/'))
        .map(|(o, a)| (o.to_owned(), a.to_owned()))
        .collect()
}

/// A rollout to create, with its targets already placed in waves.
#[derive(Debug, Clone)]
pub struct NewRollout<'a> {
    pub id: &'a str,
    pub version: &'a str,
    pub kind: RolloutKind,
    pub platforms: &'a [(String, String)],
    pub plan: &'a str,
    pub started_by: &'a str,
    /// What the timeline says about the start.
    pub detail: &'a str,
    pub targets: &'a [(String, usize)],
    /// Open rollouts this one takes over from: they become `superseded`.
    pub supersedes: &'a [String],
}

/// A state change, applied only if the rollout is in one of `from`.
#[derive(Debug, Clone)]
pub struct StateChange<'a> {
    pub id: &'a str,
    pub from: &'a [RolloutState],
    pub to: RolloutState,
    /// Kept as the rollout's reason (halted, aborted, superseded); `None` clears it.
    pub reason: Option<&'a str>,
    pub actor: &'a str,
    pub detail: Option<&'a str>,
    /// Build failures before now no longer count toward a halt.
    pub resume: bool,
}

impl<'a> StateChange<'a> {
    /// A change from one of `from` to `to`, with no reason, detail or resume.
    pub fn new(
        id: &'a str,
        from: &'a [RolloutState],
        to: RolloutState,
        actor: &'a str,
    ) -> StateChange<'a> {
        StateChange {
            id,
            from,
            to,
            reason: None,
            actor,
            detail: None,
            resume: false,
        }
    }
}

/// When a wave started and when it passed its thresholds.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WaveRow {
    pub wave: i64,
    pub started_at: i64,
    pub passed_at: Option<i64>,
}

/// One entry of a rollout's timeline.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RolloutEvent {
    pub id: i64,
    pub at: i64,
    pub state: String,
    pub actor: String,
    pub detail: Option<String>,
}

/// Targets of a rollout grouped by everything their stage and scope depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetGroup {
    pub wave: usize,
    pub os: String,
    pub arch: String,
    /// The channel the agents resolve to now.
    pub channel: String,
    pub paused: bool,
    pub auto_update: bool,
    /// Their newest task in this rollout.
    pub status: Option<TaskStatus>,
    pub class: Option<FailureClass>,
    /// Succeeded, and connected on the new version since before the success bake began.
    pub settled: bool,
    /// The maintenance window (JSON) of their site, or else of their client.
    pub window: Option<String>,
    pub agents: u64,
}

#[derive(sqlx::FromRow)]
pub(super) struct TargetGroupRow {
    pub(super) rollout_id: String,
    pub(super) t_wave: i64,
    pub(super) a_os: String,
    pub(super) a_arch: String,
    pub(super) ch: String,
    pub(super) is_paused: bool,
    pub(super) auto_upd: bool,
    pub(super) st: Option<String>,
    pub(super) cls: Option<String>,
    pub(super) settled: i64,
    pub(super) win: Option<String>,
    pub(super) agents: i64,
}

/// Ended tasks of one wave in one failure class, and how many ended since `since`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassRow {
    pub wave: usize,
    pub class: FailureClass,
    pub tasks: u64,
    pub recent: u64,
}

#[derive(sqlx::FromRow)]
pub(super) struct ClassRowRaw {
    pub(super) rollout_id: String,
    pub(super) wave: Option<i64>,
    pub(super) failure_class: String,
    pub(super) tasks: i64,
    pub(super) recent: i64,
}

/// One target of a rollout with its newest task in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutTarget {
    pub agent_id: String,
    pub hostname: String,
    pub version: String,
    pub wave: usize,
    pub paused: bool,
    pub auto_update: bool,
    pub task_id: Option<String>,
    pub status: Option<TaskStatus>,
    pub class: Option<FailureClass>,
    pub error: Option<String>,
    /// Where it stands (a stage's name), computed by `stage_sql`.
    pub stage: String,
}

/// What a target's stage depends on besides its own row: the rollout's current wave,
/// whether updates are on, and which maintenance windows (as stored) hold it now.
#[derive(Debug, Clone, Default)]
pub struct StageInputs {
    pub current_wave: i64,
    pub updates_enabled: bool,
    /// Empty when the rollout does not obey windows.
    pub closed_windows: Vec<String>,
}

/// Which targets of a rollout a page shows, by wave then agent id.
#[derive(Debug, Clone, Default)]
pub struct TargetPage<'a> {
    pub wave: Option<usize>,
    /// Only targets in this stage (its name).
    pub stage: Option<&'a str>,
    pub inputs: StageInputs,
    pub limit: i64,
    pub offset: i64,
}

#[derive(sqlx::FromRow)]
pub(super) struct RolloutTargetRow {
    pub(super) agent_id: String,
    pub(super) hostname: String,
    pub(super) version: String,
    pub(super) wave: i64,
    pub(super) paused: bool,
    pub(super) auto_update: bool,
    pub(super) task_id: Option<String>,
    pub(super) status: Option<String>,
    pub(super) failure_class: Option<String>,
    pub(super) error: Option<String>,
    pub(super) stage: String,
}

pub(super) fn task_status(text: Option<String>) -> StoreResult<Option<TaskStatus>> {
    text.map(|s| TaskStatus::parse(&s).ok_or_else(|| corrupt("task status", &s)))
        .transpose()
}

pub(super) fn failure_class(text: Option<String>) -> StoreResult<Option<FailureClass>> {
    text.map(|s| FailureClass::parse(&s).ok_or_else(|| corrupt("failure class", &s)))
        .transpose()
}

/// A target as the book reads it (`rollout_book`), with `BOOK_TARGET_COLUMNS`.
#[derive(Debug, sqlx::FromRow, serde::Deserialize)]
pub(super) struct BookTarget {
    pub(super) rollout_id: String,
    pub(super) agent_id: String,
    pub(super) wave: i64,
}

/// The columns of a `BookTarget` over `rollout_targets t`.
pub(super) const BOOK_TARGET_COLUMNS: &[(&str, &str)] = &[
    ("t.rollout_id", "rollout_id"),
    ("t.agent_id", "agent_id"),
    ("t.wave", "wave"),
];

pub(super) fn wave(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// Which rollouts a listing wants.
#[derive(Debug, Clone, Default)]
pub struct RolloutFilter<'a> {
    pub state: Option<RolloutState>,
    pub version: Option<&'a str>,
    pub limit: i64,
    pub offset: i64,
}

#[async_trait]
pub trait RolloutStore: Send + Sync {
    /// Creates a rollout with its targets and first wave, and supersedes the rollouts
    /// it takes over from, in one transaction.
    async fn create_rollout(&self, rollout: &NewRollout<'_>, now_ms: i64) -> StoreResult<Rollout>;

    async fn rollout(&self, id: &str) -> StoreResult<Rollout>;

    /// Newest first.
    async fn list_rollouts(&self, filter: &RolloutFilter<'_>) -> StoreResult<Vec<Rollout>>;

    /// Every rollout, and the targets of the open ones (rollout id, agent id, wave) but
    /// those of `known`, which the caller holds already (it has just written them).
    async fn rollout_book(
        &self,
        known: Option<&str>,
    ) -> StoreResult<(Vec<Rollout>, Vec<(String, String, usize)>)>;

    /// Adds an agent that became a target after the start; nothing if it is one.
    async fn add_rollout_target(
        &self,
        rollout_id: &str,
        agent_id: &str,
        wave: usize,
    ) -> StoreResult<()>;

    /// Applies a state change if the rollout is in one of its `from` states, and writes
    /// it to the timeline; false when it was not.
    async fn change_rollout_state(
        &self,
        change: &StateChange<'_>,
        now_ms: i64,
    ) -> StoreResult<bool>;

    /// Starts wave `next` if wave `next - 1` is the current one and the rollout is
    /// running or waiting; false otherwise (another node was first, or it changed).
    async fn start_wave(
        &self,
        id: &str,
        next: usize,
        actor: &str,
        now_ms: i64,
    ) -> StoreResult<bool>;

    /// Notes when a wave met its thresholds; false when it was noted already.
    async fn mark_wave_passed(&self, id: &str, wave: usize, now_ms: i64) -> StoreResult<bool>;

    /// The wave rows of each rollout in `ids`, with its id.
    async fn rollout_waves(&self, ids: &[&str]) -> StoreResult<Vec<(String, WaveRow)>>;

    /// Oldest first.
    async fn rollout_events(&self, id: &str) -> StoreResult<Vec<RolloutEvent>>;

    /// The targets of each rollout in `ids` grouped for counting, with its id; a success
    /// counts as settled when it finished, and the agent connected, no later than
    /// `settled_before_ms`.
    async fn rollout_target_groups(
        &self,
        ids: &[&str],
        settled_before_ms: i64,
    ) -> StoreResult<Vec<(String, TargetGroup)>>;

    /// Ended tasks of each rollout in `ids` by wave and failure class, with its id;
    /// `recent` counts those ended since the rollout last resumed.
    async fn rollout_class_rows(&self, ids: &[&str]) -> StoreResult<Vec<(String, ClassRow)>>;

    /// A page of targets with the task that says where each stands and its stage, by
    /// wave then agent id, and how many match before paging. Without a stage filter only
    /// the page's targets are looked at beyond the count.
    async fn rollout_targets_page(
        &self,
        id: &str,
        page: &TargetPage<'_>,
    ) -> StoreResult<(Vec<RolloutTarget>, i64)>;

    /// Closed rollouts (completed, aborted, superseded) without a summary that closed
    /// before `before_ms`: their counts must be frozen before their tasks are pruned.
    async fn rollouts_to_summarize(&self, before_ms: i64) -> StoreResult<Vec<Rollout>>;

    async fn set_rollout_summary(&self, id: &str, summary: &str) -> StoreResult<()>;

    /// Deletes at most `batch` targets of rollouts that have a summary; how many it
    /// deleted.
    async fn prune_rollout_targets(&self, batch: i64) -> StoreResult<u64>;
}

/// `INSERT` statements of targets hold this many rows each: 3 parameters a row, within
/// SQLite's limit of 32,766 a statement (PostgreSQL's is 65,535). Each statement joins
/// its rows to the agents, which PostgreSQL does by reading them all, so fewer, larger
/// statements read the fleet fewer times (BENCHMARKS.md, bench-nodes).
pub(super) const TARGETS_PER_STATEMENT: usize = 10_000;

/// The one statement that adds targets, around a `VALUES` list of (rollout id, agent
/// id, wave): it writes each target with the facts of its agent that it keeps (migration
/// 0015), so the row is written once (migration 0017), after the backend's
/// `TARGET_FACTS_LOCK` in the same transaction. A target that is there already stays as
/// it is. (`WHERE TRUE` keeps SQLite from reading `ON CONFLICT` as the join's.)
pub(super) const INSERT_TARGETS: (&str, &str) = (
    "INSERT INTO rollout_targets (rollout_id, agent_id, wave, os, arch, channel, paused, \
         auto_update, maintenance_window) \
     SELECT v.column1, v.column2, v.column3, f.os, f.arch, f.channel, f.paused, \
         f.auto_update, f.maintenance_window \
     FROM (",
    ") AS v JOIN rollout_target_agents f ON f.agent_id = v.column2 WHERE TRUE \
     ON CONFLICT DO NOTHING",
);

impl TryFrom<TargetGroupRow> for (String, TargetGroup) {
    type Error = StoreError;

    fn try_from(row: TargetGroupRow) -> StoreResult<(String, TargetGroup)> {
        let group = TargetGroup {
            wave: wave(row.t_wave),
            os: row.a_os,
            arch: row.a_arch,
            channel: row.ch,
            paused: row.is_paused,
            auto_update: row.auto_upd,
            status: task_status(row.st)?,
            class: failure_class(row.cls)?,
            settled: row.settled != 0,
            window: row.win,
            agents: u64::try_from(row.agents).unwrap_or(0),
        };
        Ok((row.rollout_id, group))
    }
}

impl TryFrom<ClassRowRaw> for (String, ClassRow) {
    type Error = StoreError;

    fn try_from(row: ClassRowRaw) -> StoreResult<(String, ClassRow)> {
        let class = ClassRow {
            wave: wave(row.wave.unwrap_or(0)),
            class: FailureClass::parse(&row.failure_class)
                .ok_or_else(|| corrupt("failure class", &row.failure_class))?,
            tasks: u64::try_from(row.tasks).unwrap_or(0),
            recent: u64::try_from(row.recent).unwrap_or(0),
        };
        Ok((row.rollout_id, class))
    }
}

impl TryFrom<RolloutTargetRow> for RolloutTarget {
    type Error = StoreError;

    fn try_from(row: RolloutTargetRow) -> StoreResult<RolloutTarget> {
        Ok(RolloutTarget {
            agent_id: row.agent_id,
            hostname: row.hostname,
            version: row.version,
            wave: wave(row.wave),
            paused: row.paused,
            auto_update: row.auto_update,
            task_id: row.task_id,
            status: task_status(row.status)?,
            class: failure_class(row.failure_class)?,
            error: row.error,
            stage: row.stage,
        })
    }
}

/// Converts every row, failing on the first that does not convert.
pub(super) fn convert<R, T: TryFrom<R, Error = StoreError>>(rows: Vec<R>) -> StoreResult<Vec<T>> {
    rows.into_iter().map(T::try_from).collect()
}

/// The task that says where a target of a rollout stands, kept on the target by the
/// triggers of migrations 0013 and 0017 from its one rule (the view
/// `rollout_target_tasks`: the target's build failure in the rollout if it has one, else
/// its newest task).
const NEWEST_TASK: &str = "LEFT JOIN update_tasks u ON u.id = t.task_id";

/// A target with the facts it keeps (migration 0015): what its stage is read from.
const TARGET_FACTS: &str = "rollout_id, agent_id, wave, task_id, task_status, task_class, \
     paused, auto_update, maintenance_window";

/// Some rollouts' targets grouped by what their stage and scope depend on, read from the
/// copies of those facts each target keeps (migration 0015), in the order of the index
/// `rollout_targets_facts` that covers them (`settled` 0); then, in the same statement
/// and so the same snapshot, how many of each group of successes settled (`settled` 1):
/// only those look at their task and agent. `split_settled` makes one of the two. `$1`
/// is the settled cutoff, the rollout ids follow.
pub(super) fn target_groups_sql(rollouts: usize) -> String {
    const GROUP: &str = "t.rollout_id, t.wave, t.os, t.arch, t.channel, t.paused, \
         t.auto_update, t.task_status, t.task_class, t.maintenance_window";
    const COLUMNS: &str = "t.rollout_id, t.wave AS t_wave, t.os AS a_os, t.arch AS a_arch, \
         t.channel AS ch, t.paused AS is_paused, t.auto_update AS auto_upd, \
         t.task_status AS st, t.task_class AS cls, t.maintenance_window AS win";
    let ids = placeholders(2, rollouts);
    format!(
        "SELECT {COLUMNS}, CAST(0 AS BIGINT) AS settled, COUNT(*) AS agents \
         FROM rollout_targets t WHERE t.rollout_id IN ({ids}) GROUP BY {GROUP} \
         UNION ALL \
         SELECT {COLUMNS}, CAST(1 AS BIGINT) AS settled, COUNT(*) AS agents \
         FROM rollout_targets t JOIN update_tasks u ON u.id = t.task_id \
             JOIN agents a ON a.id = t.agent_id \
         WHERE t.rollout_id IN ({ids}) AND t.task_status = 'succeeded' \
             AND u.finished_at <= $1 AND a.node_id IS NOT NULL AND a.connected_at <= $1 \
         GROUP BY {GROUP}"
    )
}

/// The groups of `target_groups_sql` as `TargetGroup`s: each count of settled successes
/// moves that many targets out of their group into a settled one.
pub(super) fn split_settled(rows: Vec<(String, TargetGroup)>) -> Vec<(String, TargetGroup)> {
    /// What makes a group, but whether it settled and its count.
    type Key<'a> = (
        usize,
        &'a str,
        &'a str,
        &'a str,
        bool,
        bool,
        Option<TaskStatus>,
        Option<FailureClass>,
        Option<&'a str>,
    );
    fn key(g: &TargetGroup) -> Key<'_> {
        (
            g.wave,
            &g.os,
            &g.arch,
            &g.channel,
            g.paused,
            g.auto_update,
            g.status,
            g.class,
            g.window.as_deref(),
        )
    }
    let (settled, mut groups): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(_, g)| g.settled);
    for (rollout, part) in settled {
        let whole = groups
            .iter_mut()
            .find(|(id, g)| *id == rollout && key(g) == key(&part));
        if let Some((_, whole)) = whole {
            whole.agents = whole.agents.saturating_sub(part.agents);
        }
        groups.push((rollout, part));
    }
    groups.retain(|(_, g)| g.agents > 0);
    groups
}

/// Ended tasks of some rollouts by wave and class, and how many ended since their
/// rollout last resumed.
pub(super) fn class_rows_sql(rollouts: usize) -> String {
    format!(
        "SELECT u.rollout_id, u.wave, u.failure_class, COUNT(*) AS tasks, \
             CAST(SUM(CASE WHEN u.finished_at >= r.resumed_at THEN 1 ELSE 0 END) AS BIGINT) \
                 AS recent \
         FROM update_tasks u JOIN rollouts r ON r.id = u.rollout_id \
         WHERE u.rollout_id IN ({}) AND u.failure_class IS NOT NULL \
         GROUP BY u.rollout_id, u.wave, u.failure_class",
        placeholders(1, rollouts)
    )
}

/// The wave rows of some rollouts.
pub(super) fn waves_sql(rollouts: usize) -> String {
    format!(
        "SELECT rollout_id, wave, started_at, passed_at FROM rollout_waves \
         WHERE rollout_id IN ({}) ORDER BY rollout_id, wave",
        placeholders(1, rollouts)
    )
}

/// The stage of a target as SQL, over the operands given as SQL expressions: its task's
/// `status` and failure `class` (NULL without a task), the agent's `paused` and
/// `auto_update`, whether updates are `enabled`, whether its wave has `started`, and
/// whether a closed maintenance window holds it (`outside`). It says what
/// `health::stage_of` says for every combination of facts (a test holds the two
/// together); `stage_of` counts the grouped rows, this pages and filters targets.
pub(crate) fn stage_sql(
    status: &str,
    class: &str,
    paused: &str,
    auto_update: &str,
    enabled: &str,
    started: &str,
    outside: &str,
) -> String {
    format!(
        "CASE WHEN {status} = 'queued' THEN 'queued' \
         WHEN {status} = 'installing' THEN 'installing' \
         WHEN {status} = 'restarting' THEN 'probation' \
         WHEN {status} IN ('dispatched', 'downloading', 'verifying') THEN 'downloading' \
         WHEN {status} = 'succeeded' THEN 'succeeded' \
         WHEN {status} = 'rolled_back' AND {class} = 'build' THEN 'rolled_back' \
         WHEN {status} IS NOT NULL AND {class} = 'build' THEN 'failed' \
         WHEN NOT ({enabled}) OR {paused} OR NOT ({auto_update}) THEN 'skipped' \
         WHEN {status} = 'cancelled' THEN 'cancelled' \
         WHEN NOT ({started}) THEN 'waiting' \
         WHEN {outside} THEN 'outside_window' \
         ELSE 'queued' END"
    )
}

/// A page of a rollout's targets and the count before paging; `$1` is the rollout, `$2`
/// the wave or NULL, `$3` updates enabled, `$4` the current wave, then the closed
/// windows, then the stage filter (if any), the limit and the offset, in that order.
pub(super) fn targets_page_sql(closed_windows: usize, stage_filter: bool) -> (String, String) {
    let mut n = 4;
    let mut next = || {
        n += 1;
        format!("${n}")
    };
    let outside = if closed_windows == 0 {
        "FALSE".to_owned()
    } else {
        let list: Vec<String> = (0..closed_windows).map(|_| next()).collect();
        format!("t.maintenance_window IN ({})", list.join(", "))
    };
    // Placed from the facts the target keeps, the ones its counts are grouped by.
    let stage = stage_sql(
        "t.task_status",
        "t.task_class",
        "t.paused",
        "t.auto_update",
        "$3",
        "t.wave <= $4",
        &outside,
    );
    let rows = |targets: &str| {
        format!(
            "SELECT t.agent_id, a.hostname, a.version, t.wave, t.paused, t.auto_update, \
                 u.id AS task_id, t.task_status AS status, t.task_class AS failure_class, \
                 u.error, {stage} AS stage \
             FROM {targets} t JOIN agents a ON a.id = t.agent_id {NEWEST_TASK} \
             WHERE t.rollout_id = $1 AND ($2 IS NULL OR t.wave = $2)"
        )
    };
    if stage_filter {
        let wanted = next();
        let (limit, offset) = (next(), next());
        let matching = format!(
            "SELECT * FROM ({}) x WHERE x.stage = {wanted}",
            rows("rollout_targets")
        );
        (
            format!("{matching} ORDER BY x.wave, x.agent_id LIMIT {limit} OFFSET {offset}"),
            format!("SELECT COUNT(*) FROM ({matching}) y"),
        )
    } else {
        let (limit, offset) = (next(), next());
        // Only the page's targets are joined with their tasks.
        let page = format!(
            "(SELECT {TARGET_FACTS} FROM rollout_targets \
              WHERE rollout_id = $1 AND ($2 IS NULL OR wave = $2) \
              ORDER BY wave, agent_id LIMIT {limit} OFFSET {offset})"
        );
        (
            format!("{} ORDER BY t.wave, t.agent_id", rows(&page)),
            "SELECT COUNT(*) FROM rollout_targets \
             WHERE rollout_id = $1 AND ($2 IS NULL OR wave = $2)"
                .to_owned(),
        )
    }
}

/// Implements `RolloutStore` for a backend with a `pool` field; `$db` is its
/// `sqlx::Database`. The same statements serve both databases.
macro_rules! impl_rollout_store {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::rollouts::RolloutStore for $store {
            async fn create_rollout(
                &self,
                new: &$crate::store::rollouts::NewRollout<'_>,
                now_ms: i64,
            ) -> $crate::store::StoreResult<$crate::store::rollouts::Rollout> {
                use $crate::store::rollouts as r;
                let platforms = r::render_platforms(new.platforms);
                let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                sqlx::query(
                    "INSERT INTO rollouts (id, version, kind, platforms, state, plan, \
                         current_wave, resumed_at, started_by, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, 'running', $5, 0, $6, $7, $6, $6)",
                )
                .bind(new.id)
                .bind(new.version)
                .bind(new.kind.as_str())
                .bind(&platforms)
                .bind(new.plan)
                .bind(now_ms)
                .bind(new.started_by)
                .execute(&mut *tx)
                .await?;
                if let Some(lock) = <$store as $crate::store::queries::Dialect>::TARGET_FACTS_LOCK {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                // In agent order: the rows (and their primary key) are written side by
                // side instead of each on a random page (BENCHMARKS.md, bench-promote).
                let mut targets: Vec<&(String, usize)> = new.targets.iter().collect();
                targets.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                for chunk in targets.chunks(r::TARGETS_PER_STATEMENT) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(r::INSERT_TARGETS.0);
                    insert.push_values(chunk, |mut row, (agent, wave)| {
                        row.push_bind(new.id)
                            .push_bind(agent.as_str())
                            .push_bind(i64::try_from(*wave).unwrap_or(i64::MAX));
                    });
                    insert.push(r::INSERT_TARGETS.1);
                    insert.build().execute(&mut *tx).await?;
                }
                sqlx::query(
                    "INSERT INTO rollout_waves (rollout_id, wave, started_at) VALUES ($1, 0, $2)",
                )
                .bind(new.id)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO rollout_events (rollout_id, at, state, actor, detail) \
                     VALUES ($1, $2, 'running', $3, $4)",
                )
                .bind(new.id)
                .bind(now_ms)
                .bind(new.started_by)
                .bind(new.detail)
                .execute(&mut *tx)
                .await?;
                for old in new.supersedes {
                    let reason = format!("superseded by rollout {} of {}", new.id, new.version);
                    let changed = sqlx::query(&format!(
                        "UPDATE rollouts SET state = 'superseded', reason = $1, updated_at = $2 \
                         WHERE id = $3 AND state IN {}",
                        r::OPEN_STATES
                    ))
                    .bind(&reason)
                    .bind(now_ms)
                    .bind(old.as_str())
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if changed > 0 {
                        sqlx::query(
                            "INSERT INTO rollout_events (rollout_id, at, state, actor, detail) \
                             VALUES ($1, $2, 'superseded', $3, $4)",
                        )
                        .bind(old.as_str())
                        .bind(now_ms)
                        .bind(new.started_by)
                        .bind(&reason)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                let row: r::RolloutRow = sqlx::query_as(&format!(
                    "SELECT {} FROM rollouts WHERE id = $1",
                    r::ROLLOUT_COLUMNS
                ))
                .bind(new.id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                row.try_into()
            }

            async fn rollout(
                &self,
                id: &str,
            ) -> $crate::store::StoreResult<$crate::store::rollouts::Rollout> {
                use $crate::store::rollouts as r;
                let row: r::RolloutRow = sqlx::query_as(&format!(
                    "SELECT {} FROM rollouts WHERE id = $1",
                    r::ROLLOUT_COLUMNS
                ))
                .bind(id)
                .fetch_one(&self.pool)
                .await?;
                row.try_into()
            }

            async fn list_rollouts(
                &self,
                filter: &$crate::store::rollouts::RolloutFilter<'_>,
            ) -> $crate::store::StoreResult<Vec<$crate::store::rollouts::Rollout>> {
                use $crate::store::rollouts as r;
                let rows: Vec<r::RolloutRow> = sqlx::query_as(&format!(
                    "SELECT {} FROM rollouts \
                     WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR version = $2) \
                     ORDER BY created_at DESC, id DESC LIMIT $3 OFFSET $4",
                    r::ROLLOUT_COLUMNS
                ))
                .bind(filter.state.map(|s| s.as_str()))
                .bind(filter.version)
                .bind(filter.limit)
                .bind(filter.offset)
                .fetch_all(&self.pool)
                .await?;
                r::convert(rows)
            }

            async fn rollout_book(
                &self,
                known: Option<&str>,
            ) -> $crate::store::StoreResult<(
                Vec<$crate::store::rollouts::Rollout>,
                Vec<(String, String, usize)>,
            )> {
                use $crate::store::rollouts as r;
                let rows: Vec<r::RolloutRow> = sqlx::query_as(&format!(
                    "SELECT {} FROM rollouts",
                    r::ROLLOUT_COLUMNS
                ))
                .fetch_all(&self.pool)
                .await?;
                let targets: Vec<r::BookTarget> = self
                    .fetch_bulk(
                        &[r::BOOK_TARGET_COLUMNS],
                        &format!(
                            "rollout_targets t JOIN rollouts o ON o.id = t.rollout_id \
                             WHERE o.state IN {} AND o.id <> $1",
                            r::OPEN_STATES
                        ),
                        Some(known.unwrap_or("")),
                    )
                    .await?;
                Ok((
                    r::convert(rows)?,
                    targets
                        .into_iter()
                        .map(|t| (t.rollout_id, t.agent_id, r::wave(t.wave)))
                        .collect(),
                ))
            }

            async fn add_rollout_target(
                &self,
                rollout_id: &str,
                agent_id: &str,
                wave: usize,
            ) -> $crate::store::StoreResult<()> {
                use $crate::store::rollouts as r;
                let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                if let Some(lock) = <$store as $crate::store::queries::Dialect>::TARGET_FACTS_LOCK {
                    sqlx::query(lock).execute(&mut *tx).await?;
                }
                sqlx::query(&format!(
                    "{}VALUES ($1, $2, $3){}",
                    r::INSERT_TARGETS.0,
                    r::INSERT_TARGETS.1
                ))
                .bind(rollout_id)
                .bind(agent_id)
                .bind(i64::try_from(wave).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn change_rollout_state(
                &self,
                change: &$crate::store::rollouts::StateChange<'_>,
                now_ms: i64,
            ) -> $crate::store::StoreResult<bool> {
                let from: Vec<String> =
                    change.from.iter().map(|s| format!("'{}'", s.as_str())).collect();
                let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                let changed = sqlx::query(&format!(
                    "UPDATE rollouts SET state = $1, reason = $2, updated_at = $3, \
                         resumed_at = CASE WHEN $4 THEN $3 ELSE resumed_at END \
                     WHERE id = $5 AND state IN ({})",
                    from.join(", ")
                ))
                .bind(change.to.as_str())
                .bind(change.reason)
                .bind(now_ms)
                .bind(change.resume)
                .bind(change.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if changed > 0 {
                    sqlx::query(
                        "INSERT INTO rollout_events (rollout_id, at, state, actor, detail) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(change.id)
                    .bind(now_ms)
                    .bind(change.to.as_str())
                    .bind(change.actor)
                    .bind(change.detail.or(change.reason))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(changed > 0)
            }

            async fn start_wave(
                &self,
                id: &str,
                next: usize,
                actor: &str,
                now_ms: i64,
            ) -> $crate::store::StoreResult<bool> {
                let next = i64::try_from(next).unwrap_or(i64::MAX);
                let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                let changed = sqlx::query(
                    "UPDATE rollouts SET current_wave = $1, state = 'running', updated_at = $2 \
                     WHERE id = $3 AND current_wave = $4 AND state IN ('running', 'waiting')",
                )
                .bind(next)
                .bind(now_ms)
                .bind(id)
                .bind(next - 1)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if changed > 0 {
                    sqlx::query(
                        "INSERT INTO rollout_waves (rollout_id, wave, started_at) \
                         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    )
                    .bind(id)
                    .bind(next)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO rollout_events (rollout_id, at, state, actor, detail) \
                         VALUES ($1, $2, 'running', $3, $4)",
                    )
                    .bind(id)
                    .bind(now_ms)
                    .bind(actor)
                    .bind(format!("wave {} started", next + 1))
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(changed > 0)
            }

            async fn mark_wave_passed(
                &self,
                id: &str,
                wave: usize,
                now_ms: i64,
            ) -> $crate::store::StoreResult<bool> {
                let changed = sqlx::query(
                    "UPDATE rollout_waves SET passed_at = $1 \
                     WHERE rollout_id = $2 AND wave = $3 AND passed_at IS NULL",
                )
                .bind(now_ms)
                .bind(id)
                .bind(i64::try_from(wave).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(changed > 0)
            }

            async fn rollout_waves(
                &self,
                ids: &[&str],
            ) -> $crate::store::StoreResult<Vec<(String, $crate::store::rollouts::WaveRow)>> {
                use $crate::store::rollouts as r;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let sql = r::waves_sql(ids.len());
                let mut query = sqlx::query_as::<_, (String, i64, i64, Option<i64>)>(&sql);
                for id in ids {
                    query = query.bind(*id);
                }
                Ok(query
                    .fetch_all(&self.pool)
                    .await?
                    .into_iter()
                    .map(|(id, wave, started_at, passed_at)| {
                        (id, r::WaveRow { wave, started_at, passed_at })
                    })
                    .collect())
            }

            async fn rollout_events(
                &self,
                id: &str,
            ) -> $crate::store::StoreResult<Vec<$crate::store::rollouts::RolloutEvent>> {
                Ok(sqlx::query_as(
                    "SELECT id, at, state, actor, detail FROM rollout_events \
                     WHERE rollout_id = $1 ORDER BY id",
                )
                .bind(id)
                .fetch_all(&self.pool)
                .await?)
            }

            async fn rollout_target_groups(
                &self,
                ids: &[&str],
                settled_before_ms: i64,
            ) -> $crate::store::StoreResult<Vec<(String, $crate::store::rollouts::TargetGroup)>> {
                use $crate::store::rollouts as r;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let sql = r::target_groups_sql(ids.len());
                let mut query = sqlx::query_as::<_, r::TargetGroupRow>(&sql).bind(settled_before_ms);
                for id in ids {
                    query = query.bind(*id);
                }
                Ok(r::split_settled(r::convert(query.fetch_all(&self.pool).await?)?))
            }

            async fn rollout_class_rows(
                &self,
                ids: &[&str],
            ) -> $crate::store::StoreResult<Vec<(String, $crate::store::rollouts::ClassRow)>> {
                use $crate::store::rollouts as r;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                let sql = r::class_rows_sql(ids.len());
                let mut query = sqlx::query_as::<_, r::ClassRowRaw>(&sql);
                for id in ids {
                    query = query.bind(*id);
                }
                r::convert(query.fetch_all(&self.pool).await?)
            }

            async fn rollout_targets_page(
                &self,
                id: &str,
                page: &$crate::store::rollouts::TargetPage<'_>,
            ) -> $crate::store::StoreResult<(Vec<$crate::store::rollouts::RolloutTarget>, i64)> {
                use $crate::store::rollouts as r;
                let (rows_sql, count_sql) =
                    r::targets_page_sql(page.inputs.closed_windows.len(), page.stage.is_some());
                let wave = page.wave.map(|w| i64::try_from(w).unwrap_or(i64::MAX));
                let mut rows = sqlx::query_as::<_, r::RolloutTargetRow>(&rows_sql)
                    .bind(id)
                    .bind(wave)
                    .bind(page.inputs.updates_enabled)
                    .bind(page.inputs.current_wave);
                let mut count = sqlx::query_scalar::<_, i64>(&count_sql).bind(id).bind(wave);
                if page.stage.is_some() {
                    count = count
                        .bind(page.inputs.updates_enabled)
                        .bind(page.inputs.current_wave);
                }
                for window in &page.inputs.closed_windows {
                    rows = rows.bind(window.as_str());
                    if page.stage.is_some() {
                        count = count.bind(window.as_str());
                    }
                }
                if let Some(stage) = page.stage {
                    rows = rows.bind(stage);
                    count = count.bind(stage);
                }
                let rows = rows
                    .bind(page.limit)
                    .bind(page.offset)
                    .fetch_all(&self.pool)
                    .await?;
                let total = count.fetch_one(&self.pool).await?;
                Ok((r::convert(rows)?, total))
            }

            async fn rollouts_to_summarize(
                &self,
                before_ms: i64,
            ) -> $crate::store::StoreResult<Vec<$crate::store::rollouts::Rollout>> {
                use $crate::store::rollouts as r;
                let rows: Vec<r::RolloutRow> = sqlx::query_as(&format!(
                    "SELECT {} FROM rollouts WHERE summary IS NULL \
                     AND state IN ('completed', 'aborted', 'superseded') AND updated_at < $1 \
                     ORDER BY updated_at",
                    r::ROLLOUT_COLUMNS
                ))
                .bind(before_ms)
                .fetch_all(&self.pool)
                .await?;
                r::convert(rows)
            }

            async fn set_rollout_summary(
                &self,
                id: &str,
                summary: &str,
            ) -> $crate::store::StoreResult<()> {
                sqlx::query("UPDATE rollouts SET summary = $1 WHERE id = $2")
                    .bind(summary)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn prune_rollout_targets(&self, batch: i64) -> $crate::store::StoreResult<u64> {
                let done = sqlx::query(
                    "DELETE FROM rollout_targets WHERE (rollout_id, agent_id) IN \
                     (SELECT t.rollout_id, t.agent_id FROM rollout_targets t \
                      JOIN rollouts r ON r.id = t.rollout_id \
                      WHERE r.summary IS NOT NULL LIMIT $1)",
                )
                .bind(batch)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }
        }
    };
}
pub(super) use impl_rollout_store;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::Connection;

    use super::*;
    use crate::rollouts::health::{Stage, TargetFacts, stage_of};

    /// Every combination of what a target's stage depends on.
    fn every_fact() -> Vec<TargetFacts> {
        let statuses = std::iter::once(None).chain(TaskStatus::ALL.into_iter().map(Some));
        let classes = [
            None,
            Some(FailureClass::Build),
            Some(FailureClass::Environment),
            Some(FailureClass::Transient),
        ];
        let mut all = Vec::new();
        for status in statuses {
            for class in classes {
                for bits in 0..32u8 {
                    all.push(TargetFacts {
                        status,
                        class,
                        wave_started: bits & 1 != 0,
                        paused: bits & 2 != 0,
                        auto_update: bits & 4 != 0,
                        updates_enabled: bits & 8 != 0,
                        outside_window: bits & 16 != 0,
                    });
                }
            }
        }
        all
    }

    fn stage_query() -> String {
        format!(
            "SELECT {}",
            stage_sql("$1", "$2", "$3", "$4", "$5", "$6", "$7")
        )
    }

    /// The stage `stage_sql` gives `facts` on a connection of either backend.
    macro_rules! sql_stage {
        ($db:expr, $facts:expr) => {{
            let facts: &TargetFacts = $facts;
            let (stage,): (String,) = sqlx::query_as(&stage_query())
                .bind(facts.status.map(TaskStatus::as_str))
                .bind(facts.class.map(FailureClass::as_str))
                .bind(facts.paused)
                .bind(facts.auto_update)
                .bind(facts.updates_enabled)
                .bind(facts.wave_started)
                .bind(facts.outside_window)
                .fetch_one(&mut $db)
                .await
                .unwrap();
            stage
        }};
    }

    #[tokio::test]
    async fn the_sql_stage_is_stage_of_for_every_fact_on_sqlite() {
        let mut db = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        let facts = every_fact();
        assert_eq!(facts.len(), 12 * 4 * 32);
        for f in &facts {
            let sql = sql_stage!(db, f);
            assert_eq!(Stage::parse(&sql), Some(stage_of(f).0), "{f:?}");
        }
    }

    #[tokio::test]
    async fn the_sql_stage_is_stage_of_for_every_fact_on_postgres() {
        let url = std::env::var("DROVER_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let connected =
            tokio::time::timeout(Duration::from_secs(10), sqlx::PgConnection::connect(&url)).await;
        let mut db = match connected {
            Ok(Ok(db)) => db,
            _ if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("PostgreSQL at {url} cannot be reached, and CI=true requires it")
            }
            _ => {
                eprintln!("skipping: PostgreSQL at {url} cannot be reached");
                return;
            }
        };
        for f in &every_fact() {
            let sql = sql_stage!(db, f);
            assert_eq!(Stage::parse(&sql), Some(stage_of(f).0), "{f:?}");
        }
    }
}
