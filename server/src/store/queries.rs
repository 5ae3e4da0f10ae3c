//! The SQL both backends share: the `Queries` operations, written once with `$N`
//! placeholders (which sqlx maps to the N-th argument on SQLite as on PostgreSQL).

use async_trait::async_trait;

use super::*;

/// The few fragments of SQL in which the backends' dialects differ, spliced into the
/// shared statements.
pub(super) trait Dialect {
    /// The database the backend's pool talks to.
    type Db: sqlx::Database;
    /// Starts a transaction that may write. On SQLite it takes the write lock at once: a
    /// transaction that read first and then wrote failed with "database is locked",
    /// without waiting, whenever another write had committed since its read.
    const BEGIN: &'static str;
    /// Follows a text sort key so it orders by bytes, exactly as on every other backend.
    const BYTE_ORDER: &'static str;
    /// The scalar function giving the largest of its arguments.
    const GREATEST: &'static str;
    /// A column ordering the rows of `update_tasks` by insertion.
    const INSERTION_ORDER: &'static str;
    /// Run first in bootstrap's transaction where several nodes may start at once.
    const BOOTSTRAP_LOCK: Option<&'static str>;
    /// Taken by a block before it commits: waits for task inserts under way and holds
    /// new ones until the block is visible to them.
    const TASK_INSERTS_LOCK: Option<&'static str>;
    /// Run in a transaction that adds rollout targets, before the insert reads their
    /// agents' facts: orders it after any change of those facts under way, and holds
    /// new ones until the targets are visible to them (migration 0017).
    const TARGET_FACTS_LOCK: Option<&'static str>;
    /// Reads thousands of rows as one JSON array (`fetch_bulk`) rather than row by row.
    const BULK_AS_JSON: bool;
}

/// The columns of a `CandidateRecord`, (expression, name) over `agents a` joined to
/// `sites s` and `clients c`.
pub(super) const CANDIDATE_COLUMNS: &[(&str, &str)] = &[
    ("a.id", "id"),
    ("a.site_id", "site_id"),
    ("a.version", "version"),
    ("a.os", "os"),
    ("a.arch", "arch"),
    ("a.channel", "agent_channel"),
    ("s.channel", "site_channel"),
    ("c.channel", "client_channel"),
];

/// The columns a `RunningRecord` adds to `CANDIDATE_COLUMNS`, with `nodes n` joined too.
pub(super) const RUNNING_COLUMNS: &[(&str, &str)] = &[
    ("a.hostname", "hostname"),
    ("a.paused", "paused"),
    ("a.auto_update", "auto_update"),
    ("a.node_id", "node_id"),
    ("n.last_beat", "node_last_beat_ms"),
];

/// The statement of a bulk read (`fetch_bulk`) of `columns` and what follows `FROM`:
/// each value named, as a row or, when `as_json`, as a member of the row's JSON object,
/// all rows in one JSON array.
pub(super) fn bulk_sql(columns: &[&[(&str, &str)]], from: &str, as_json: bool) -> String {
    let columns = columns.iter().flat_map(|part| part.iter());
    let list: Vec<String> = if as_json {
        columns
            .map(|(expr, name)| format!("'{name}', {expr}"))
            .collect()
    } else {
        columns
            .map(|(expr, name)| format!("{expr} AS {name}"))
            .collect()
    };
    let list = list.join(", ");
    if as_json {
        format!("SELECT json_group_array(json_object({list})) FROM {from}")
    } else {
        format!("SELECT {list} FROM {from}")
    }
}

/// A flag as a bulk read gives it: a boolean, or 0 or 1 as SQLite keeps it.
pub(super) fn flag<'de, D: serde::Deserializer<'de>>(value: D) -> Result<bool, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Int(i64),
    }
    Ok(match serde::Deserialize::deserialize(value)? {
        Flag::Bool(set) => set,
        Flag::Int(n) => n != 0,
    })
}

/// Begins a store transaction, as the backend `D` begins one that may write
/// (`Dialect::BEGIN`). Every transaction of the store begins here.
pub(super) async fn begin_write<D: Dialect>(
    pool: &sqlx::Pool<D::Db>,
) -> sqlx::Result<sqlx::Transaction<'static, D::Db>> {
    pool.begin_with(D::BEGIN).await
}

/// The operations whose SQL both backends accept.
#[async_trait]
pub trait Queries: Send + Sync {
    /// Records that this node is alive.
    async fn node_beat(&self, node_id: &str, address: &str, now_ms: i64) -> StoreResult<()>;

    /// Claims and releases of this node's sessions, applied in their order in one
    /// transaction. A claim marks the agent's session as held by this node since its
    /// moment; a release clears it only if this node still holds the claim of that
    /// moment, so a newer session's claim is never undone by an older one ending.
    async fn record_sessions(&self, node_id: &str, changes: &[SessionChange]) -> StoreResult<()>;

    /// Which bootstrap tokens exist already, so first start generates only the missing ones.
    async fn bootstrap_state(&self) -> StoreResult<BootstrapState>;

    /// Creates whatever of the default client, site and bootstrap tokens is missing, in
    /// one transaction.
    async fn bootstrap(&self, pieces: &Bootstrap) -> StoreResult<BootstrapOutcome>;

    /// The unrevoked token with this hash; `NotFound` otherwise.
    async fn api_token(&self, token_hash: &str) -> StoreResult<ApiToken>;

    async fn create_api_token(
        &self,
        name: &str,
        role: Role,
        token_hash: &str,
    ) -> StoreResult<ApiToken>;

    async fn list_api_tokens(&self) -> StoreResult<Vec<ApiToken>>;

    /// Revokes the token and ends every dashboard session made with it. `NotFound`
    /// when there is no such unrevoked token.
    async fn revoke_api_token(&self, id: &str) -> StoreResult<()>;

    /// Records a dashboard session of the token `token_id` until `expires_at_ms`.
    async fn create_session(
        &self,
        id_hash: &str,
        token_id: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> StoreResult<()>;

    /// The token of an unexpired session whose token is not revoked; `NotFound`
    /// otherwise.
    async fn session_token(&self, id_hash: &str, now_ms: i64) -> StoreResult<ApiToken>;

    /// Ends a session; false when there was none.
    async fn delete_session(&self, id_hash: &str) -> StoreResult<bool>;

    /// Deletes the sessions that expired before `now_ms`; how many.
    async fn prune_sessions(&self, now_ms: i64) -> StoreResult<u64>;

    /// `NotFound` when the site does not exist.
    async fn create_enrollment_token(
        &self,
        site_id: &str,
        token_hash: &str,
        expires_at_ms: Option<i64>,
        max_uses: Option<i64>,
    ) -> StoreResult<String>;

    /// Enrolls a machine with a site enrollment token: re-binds the machine's record in
    /// that site if there is one (same id, new secret), otherwise creates one, and counts
    /// a use of the token. A record that is live (`live`) is never re-bound: the answer
    /// is `Conflict`, the token's use is not counted, and the conflict is noted on the
    /// record. A record whose secret no agent has shown (`shown_secret`: a heartbeat after
    /// the welcome that carried it, or an authentication) is live only while a node holds
    /// its session. `NotFound` when the token is unknown, revoked,
    /// expired or used up.
    async fn enroll(
        &self,
        enroll_token_hash: &str,
        facts: &AgentFacts,
        secret_hash: &str,
        now_ms: i64,
        live: LiveSince,
    ) -> StoreResult<Enrollment>;

    /// Enrollment tokens, oldest first; only the site's when `site_id` is given.
    async fn list_enrollment_tokens(
        &self,
        site_id: Option<&str>,
    ) -> StoreResult<Vec<EnrollmentToken>>;

    /// `NotFound` when there is no such unrevoked enrollment token.
    async fn revoke_enrollment_token(&self, id: &str, now_ms: i64) -> StoreResult<()>;

    /// The site an enrollment token enrolls into; `NotFound` when unknown, revoked,
    /// expired or used up.
    async fn enrollment_site(&self, enroll_token_hash: &str) -> StoreResult<String>;

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>>;

    /// What starting a rollout needs of every agent, in no order (a rollout places its
    /// targets by `rollouts::plan::placement`).
    async fn list_candidates(&self) -> StoreResult<Vec<CandidateRecord>>;

    /// What a rollback needs of each agent that runs `version`, in no order.
    async fn running_version(&self, version: &str) -> StoreResult<Vec<RunningRecord>>;

    /// Whether any agent runs `version`.
    async fn version_runs(&self, version: &str) -> StoreResult<bool>;

    /// Writes the `version_key` of agents written before it existed; how many. Each is
    /// written only if its version is still the one the key was computed from.
    async fn fill_version_keys(&self) -> StoreResult<u64>;

    /// How many agents there are, counted in the database.
    async fn count_agents(&self) -> StoreResult<i64>;

    async fn agent(&self, id: &str) -> StoreResult<AgentRecord>;

    /// The agents whose session the database says `node_id` holds, and the id of each
    /// one's unfinished task (agent id, task id).
    async fn held_by(
        &self,
        node_id: &str,
    ) -> StoreResult<(Vec<AgentRecord>, Vec<(String, String)>)>;

    async fn list_clients(&self) -> StoreResult<Vec<Client>>;

    /// `Conflict` when the name is taken.
    async fn create_client(&self, name: &str) -> StoreResult<Client>;

    async fn list_sites(&self) -> StoreResult<Vec<Site>>;

    /// `NotFound` when the client does not exist; `Conflict` when the name is taken in it.
    async fn create_site(&self, client_id: &str, name: &str) -> StoreResult<Site>;

    /// Sets or clears (`None`) a channel; `NotFound` when the row does not exist.
    async fn set_channel(
        &self,
        scope: ChannelScope,
        id: &str,
        channel: Option<&str>,
    ) -> StoreResult<()>;

    /// Sets or clears (`None`) a setting of a site or a client; `NotFound` when the row
    /// does not exist.
    async fn set_hierarchy_setting(
        &self,
        scope: ChannelScope,
        id: &str,
        setting: HierarchySetting,
        value: Option<&str>,
    ) -> StoreResult<()>;

    /// Ids of the agents a channel change at `scope`/`id` affects.
    async fn agents_under(&self, scope: ChannelScope, id: &str) -> StoreResult<Vec<String>>;

    async fn set_paused(&self, agent_id: &str, paused: bool) -> StoreResult<()>;

    async fn setting(&self, key: &str) -> StoreResult<Option<String>>;

    async fn set_setting(&self, key: &str, value: &str) -> StoreResult<()>;

    /// The setting's value, storing `value` first when the key has none: every node
    /// sharing the database ends up with the value the first of them stored.
    async fn setting_or_insert(&self, key: &str, value: &str) -> StoreResult<String>;

    async fn blocked_versions(&self) -> StoreResult<Vec<String>>;

    /// Creates a task; `Conflict` when the agent already has an unfinished one.
    async fn create_task(&self, task: &NewTask<'_>, now_ms: i64) -> StoreResult<UpdateTask> {
        self.create_tasks(std::slice::from_ref(task), now_ms)
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| {
                StoreError::Conflict(format!(
                    "agent {} already has an unfinished task",
                    task.agent_id
                ))
            })
    }

    /// Creates tasks in one transaction, answering for each in order: `None` where the
    /// agent already has an unfinished task (an earlier one in the same batch included).
    async fn create_tasks(
        &self,
        tasks: &[NewTask<'_>],
        now_ms: i64,
    ) -> StoreResult<Vec<Option<UpdateTask>>> {
        let ids: Vec<String> = tasks.iter().map(|_| new_task_id()).collect();
        self.create_tasks_as(tasks, &ids, now_ms).await
    }

    /// `create_tasks` with the ids the tasks get (from `new_task_id`), one per task: a
    /// session that sends an update before its task is written names the task first.
    async fn create_tasks_as(
        &self,
        tasks: &[NewTask<'_>],
        ids: &[String],
        now_ms: i64,
    ) -> StoreResult<Vec<Option<UpdateTask>>>;

    /// The agent's unfinished task, if any.
    async fn active_task(&self, agent_id: &str) -> StoreResult<Option<UpdateTask>>;

    /// The task with this id, finished or not.
    async fn task(&self, task_id: &str) -> StoreResult<Option<UpdateTask>>;

    /// Versions that failed on this agent because of the build (class `build`).
    async fn failed_versions(&self, agent_id: &str) -> StoreResult<Vec<String>>;

    /// Unfinished, dispatched tasks (not `queued`) whose agent has shown no activity on
    /// them since `cutoff_ms` and is not connected to a node heard from since
    /// `live_since_ms` (a connected agent's session looks after its own task).
    async fn stale_tasks(&self, cutoff_ms: i64, live_since_ms: i64)
    -> StoreResult<Vec<UpdateTask>>;

    /// Ends the tasks of each group `timed_out` with the group's class and error, those
    /// still in the group's status with no activity since `cutoff_ms` (a report that
    /// came in after `stale_tasks` read them keeps a task going), in one transaction
    /// and one statement per group and few hundred tasks. Returns the tasks it ended.
    async fn time_out_tasks(
        &self,
        groups: &[SilentTasks],
        cutoff_ms: i64,
        now_ms: i64,
    ) -> StoreResult<Vec<UpdateTask>>;

    /// Takes or renews the lease `name` for `holder` until `until_ms`; false while
    /// another holder's lease runs (past `now_ms`).
    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<bool>;

    /// Newest first.
    async fn tasks_for_agent(&self, agent_id: &str, limit: i64) -> StoreResult<Vec<UpdateTask>>;

    /// Marks a (re-)dispatch: status `dispatched`, one more attempt if `attempt` (a resend
    /// after a reconnect is not one), and the mirror the update message offers.
    /// `NotFound` unless the task is unfinished.
    async fn record_dispatch(
        &self,
        task_id: &str,
        now_ms: i64,
        attempt: bool,
        mirror: Option<&str>,
    ) -> StoreResult<UpdateTask>;

    /// Records how the build of an unfinished task of this agent reaches it, as the agent
    /// reported. `NotFound` when the task is not this agent's or is finished.
    async fn record_transfer(
        &self,
        agent_id: &str,
        task_id: &str,
        transfer: &TransferRecord<'_>,
    ) -> StoreResult<UpdateTask>;

    /// Per mirror, source and fallback reason: how many tasks created since `since_ms`
    /// reported their transfer.
    async fn mirror_counts(&self, since_ms: i64) -> StoreResult<Vec<MirrorCount>>;

    /// The newest reported transfers of tasks offered `mirror`, newest first; only
    /// fallbacks when `fallbacks_only`.
    async fn mirror_transfers(
        &self,
        mirror: &str,
        fallbacks_only: bool,
        limit: i64,
    ) -> StoreResult<Vec<MirrorTransfer>>;

    /// Moves an unfinished task of this agent to an in-progress status. `NotFound` when the
    /// task is not this agent's or is finished.
    async fn record_progress(
        &self,
        agent_id: &str,
        task_id: &str,
        status: TaskStatus,
        bytes_done: i64,
        bytes_total: i64,
        now_ms: i64,
    ) -> StoreResult<UpdateTask>;

    /// Ends an unfinished task of this agent with a final status and, unless it
    /// succeeded, a failure class. `NotFound` when the task is not this agent's or is
    /// finished already (so a repeated result changes nothing).
    async fn finish_task(
        &self,
        agent_id: &str,
        task_id: &str,
        status: TaskStatus,
        class: Option<FailureClass>,
        error: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<UpdateTask>;

    /// Turns a succeeded task of this agent into `rolled_back` (class `build`): the new
    /// build passed its probation but its supervisor did not take over, and the agent,
    /// which no longer runs `to_version` (it runs `running`), went back. `NotFound`
    /// unless the task succeeded, is this agent's, and its version is not `running`.
    async fn revert_success(
        &self,
        agent_id: &str,
        task_id: &str,
        running: &str,
        error: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<UpdateTask>;

    /// Records the first sighting of builds; later sightings change nothing.
    async fn record_first_seen(
        &self,
        builds: &[(String, String, String)],
        now_ms: i64,
    ) -> StoreResult<()>;

    async fn rollout_records(&self) -> StoreResult<Vec<RolloutRecord>>;

    /// Marks every platform's record of `version` promoted.
    async fn mark_promoted(&self, version: &str, now_ms: i64) -> StoreResult<()>;

    /// Blocks a version and cancels every unfinished task to it (class `transient`, with
    /// `cancel_reason`) in one transaction, waiting for task inserts under way on any node
    /// first: a task is either created before and cancelled here, or refused after.
    /// Returns the agents whose task was cancelled.
    async fn block_version(
        &self,
        version: &str,
        reason: &str,
        cancel_reason: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<String>>;

    /// False when the version was not blocked.
    async fn unblock_version(&self, version: &str) -> StoreResult<bool>;

    /// Cancels the unfinished tasks of a rollout (class `transient`); returns the agents
    /// they belonged to.
    async fn cancel_rollout_tasks(
        &self,
        rollout_id: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<String>>;

    /// Deletes at most `batch` tasks that finished before `before_ms`, keeping build
    /// failures (they keep a version off an agent) and tasks of rollouts whose counts
    /// are not frozen yet; how many it deleted.
    async fn prune_tasks(&self, before_ms: i64, batch: i64) -> StoreResult<u64>;

    /// Deletes at most `batch` audit entries older than `before_ms`.
    async fn prune_audit(&self, before_ms: i64, batch: i64) -> StoreResult<u64>;

    /// Deletes the adoption snapshots of at most `batch` moments before `before_ms`.
    async fn prune_snapshots(&self, before_ms: i64, batch: i64) -> StoreResult<u64>;

    /// Deletes the rows of nodes not heard from since `before_ms`.
    async fn prune_nodes(&self, before_ms: i64) -> StoreResult<u64>;

    /// Counts agents per platform and version now, for the adoption history.
    async fn record_version_snapshot(&self, now_ms: i64) -> StoreResult<()>;

    /// Snapshots taken since `since_ms`, oldest first.
    async fn version_history(&self, since_ms: i64) -> StoreResult<Vec<VersionCount>>;

    /// One page of the agents matching `filter`, and how many match, filtered, sorted
    /// and counted in the database.
    async fn agents_page(&self, filter: &AgentFilter<'_>) -> StoreResult<(Vec<AgentRecord>, i64)>;

    /// Agents per platform and version, counted in the database; online means held by a
    /// node that beat at or after `live_since_ms`.
    async fn fleet_counts(&self, live_since_ms: i64) -> StoreResult<Vec<FleetCount>>;

    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()>;

    /// Newest first; `before` pages by id; `action` filters exactly.
    async fn audit(
        &self,
        limit: i64,
        before: Option<i64>,
        action: Option<&str>,
    ) -> StoreResult<Vec<AuditEntry>>;
}

/// Marks an agent's session as held by node `$1` since `$2`.
pub(super) const CLAIM_SESSION: &str =
    "UPDATE agents SET node_id = $1, connected_at = $2 WHERE id = $3";
/// Clears an agent's session if node `$1` still holds the one it claimed at `$2`.
pub(super) const RELEASE_SESSION: &str =
    "UPDATE agents SET node_id = NULL WHERE id = $3 AND node_id = $1 AND connected_at = $2";
pub(super) const DEFAULT_CLIENT: &str = "default";
pub(super) const DEFAULT_SITE: &str = "default";

/// Selects an `AgentRecord`, with the channels of its site and client and its node's
/// heartbeat; a statement goes on with `WHERE` or `ORDER BY`.
pub(super) const SELECT_AGENTS: &str = "SELECT a.id, a.site_id, a.fingerprint, a.hostname, \
     a.version, a.os, a.arch, a.paused, a.auto_update, \
     a.enrolled_at AS enrolled_at_ms, a.last_seen AS last_seen_ms, \
     a.channel AS agent_channel, s.channel AS site_channel, c.channel AS client_channel, \
     s.maintenance_window AS site_window, c.maintenance_window AS client_window, \
     s.download_mirror AS site_mirror, c.download_mirror AS client_mirror, \
     a.node_id, n.last_beat AS node_last_beat_ms, \
     a.conflict_at AS conflict_at_ms, a.conflict_count, a.conflict_hostname \
     FROM agents a JOIN sites s ON s.id = a.site_id JOIN clients c ON c.id = s.client_id \
     LEFT JOIN nodes n ON n.id = a.node_id";

/// The columns of an `UpdateTask`, for `SELECT` and `RETURNING`.
pub(super) const TASK_COLUMNS: &str = "id, agent_id, from_version, to_version, os, arch, kind, \
     status, attempts, error, bytes_done, bytes_total, created_at AS created_at_ms, \
     updated_at AS updated_at_ms, dispatched_at AS dispatched_at_ms, \
     progress_at AS progress_at_ms, rollout_id, wave, failure_class, \
     finished_at AS finished_at_ms, mirror, transfer_source, transfer_fallback, transfer_error, \
     transfer_kind, transfer_bytes";

/// `$first, $first+1, ...`: `count` placeholders, for a list bound at run time.
pub(super) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// At most this many tasks in one statement of `time_out_tasks`.
pub(super) const TIME_OUT_BATCH: usize = 500;

pub(super) const ACTIVE_STATUSES: &str =
    "('queued', 'dispatched', 'downloading', 'verifying', 'installing', 'restarting')";

/// A value bound to a placeholder of a query built at run time.
pub(super) enum Value {
    Text(String),
    Int(i64),
    Bool(bool),
}

/// The `WHERE` clause of a page of agents (empty without filters) and the values of its
/// `$1`, `$2`... in order. Only placeholders carry what the caller gave.
/// `bytes` is the backend's `Dialect::BYTE_ORDER`.
pub(super) fn agent_conditions(filter: &AgentFilter<'_>, bytes: &str) -> (String, Vec<Value>) {
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    let mut add = |condition: &str, value: Value| {
        values.push(value);
        conditions.push(condition.replace('?', &format!("${}", values.len())));
    };
    if let Some(q) = filter.q {
        let escaped = q
            .to_lowercase()
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        add(
            "(LOWER(a.hostname) LIKE ? ESCAPE '\\' OR a.id LIKE ? ESCAPE '\\')",
            Value::Text(format!("%{escaped}%")),
        );
    }
    if let Some(site) = filter.site {
        add("a.site_id = ?", Value::Text(site.to_owned()));
    }
    if let Some(channel) = filter.channel {
        // As `engine::resolve_channel`: the first level that sets one; beta or stable.
        add(
            "(CASE WHEN COALESCE(a.channel, s.channel, c.channel) = 'beta' \
              THEN 'beta' ELSE 'stable' END) = ?",
            Value::Text(channel.to_owned()),
        );
    }
    if let Some(version) = filter.version {
        add("a.version = ?", Value::Text(version.to_owned()));
    }
    if let Some(key) = filter.older_than_key {
        // The empty key is a version that is not semver: older than none.
        add(
            &format!("(a.version_key <> '' AND a.version_key{bytes} < ?)"),
            Value::Text(key.to_owned()),
        );
    }
    if let Some(os) = filter.os {
        add("a.os = ?", Value::Text(os.to_owned()));
    }
    if let Some(arch) = filter.arch {
        add("a.arch = ?", Value::Text(arch.to_owned()));
    }
    match filter.online {
        Some(true) => add("n.last_beat >= ?", Value::Int(filter.live_since_ms)),
        Some(false) => add(
            "(n.last_beat IS NULL OR n.last_beat < ?)",
            Value::Int(filter.live_since_ms),
        ),
        None => {}
    }
    if let Some(paused) = filter.paused {
        add("a.paused = ?", Value::Bool(paused));
    }
    if conditions.is_empty() {
        (String::new(), values)
    } else {
        (format!(" WHERE {}", conditions.join(" AND ")), values)
    }
}

pub(super) const CLIENT_COLUMNS: &str =
    "id, name, channel, maintenance_window, download_mirror, created_at AS created_at_ms";

pub(super) const SITE_COLUMNS: &str = "id, client_id, name, channel, maintenance_window, download_mirror, created_at AS created_at_ms";

/// The columns of an `ApiToken`: never the hash.
pub(super) const TOKEN_COLUMNS: &str =
    "id, name, role, created_at AS created_at_ms, revoked_at IS NOT NULL AS revoked";

/// An enrollment token that is not revoked, expired (binds now as `$2`) or used up.
pub(super) const USABLE_TOKEN: &str = "revoked_at IS NULL \
     AND (expires_at IS NULL OR expires_at > $2) AND (max_uses IS NULL OR uses < max_uses)";

/// The site of a usable enrollment token (hash `$1`, now `$2`) and whether it limits its
/// uses.
pub(super) fn usable_token_site() -> String {
    format!(
        "SELECT site_id, max_uses IS NOT NULL FROM enrollment_tokens \
         WHERE token_hash = $1 AND {USABLE_TOKEN}"
    )
}

pub(super) const COUNT_ADMIN_TOKENS: &str =
    "SELECT COUNT(*) FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL";

pub(super) const COUNT_ENROLL_TOKENS: &str = "SELECT COUNT(*) FROM enrollment_tokens";

/// The columns of an `EnrollmentToken`: never the hash. Its uses are counted in its row
/// when it has `max_uses`, else as rows of `enrollment_uses` (migration 0018).
pub(super) const ENROLL_TOKEN_COLUMNS: &str = "id, site_id, created_at AS created_at_ms, \
     expires_at AS expires_at_ms, max_uses, uses + (SELECT COUNT(*) FROM enrollment_uses u \
     WHERE u.token_id = enrollment_tokens.id) AS uses, revoked_at AS revoked_at_ms";

/// The assignment that records an agent showing it holds a secret, whose hash is the
/// expression `hash` (NULL: none shown): the record's secret counts as shown (migration
/// 0021) only if it is still that secret, so a re-enrollment that replaced it meanwhile
/// stays unshown.
pub(super) fn shown_secret(hash: &str) -> String {
    format!("secret_proven = (secret_proven OR COALESCE(secret_hash = {hash}, FALSE))")
}

/// How long a fingerprint conflict lasts: a refused enrollment this long after the
/// previous one starts counting again.
pub(super) const CONFLICT_SPELL_MS: i64 = 24 * 60 * 60 * 1000;

pub(super) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A task's id: ordered by creation within this process (UUID version 7), so the
/// thousands of tasks a fan-out writes go to the end of the id index instead of to
/// random places in it.
pub(crate) fn new_task_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// When a task id from `new_task_id` was made (milliseconds since the epoch); `None`
/// for any other string.
pub(crate) fn task_minted_ms(id: &str) -> Option<i64> {
    let (secs, nanos) = uuid::Uuid::parse_str(id).ok()?.get_timestamp()?.to_unix();
    i64::try_from(secs)
        .ok()?
        .checked_mul(1000)?
        .checked_add(i64::from(nanos / 1_000_000))
}

/// `NotFound` when a statement that must change a row changed none.
pub(super) fn changed_one(rows_affected: u64) -> StoreResult<()> {
    if rows_affected == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

// The enums are stored as their text; an unknown one is a corrupt row.
impl TryFrom<String> for Role {
    type Error = String;

    fn try_from(text: String) -> Result<Role, String> {
        Role::parse(&text).ok_or_else(|| format!("unknown role {text:?}"))
    }
}

impl TryFrom<String> for TaskKind {
    type Error = String;

    fn try_from(text: String) -> Result<TaskKind, String> {
        TaskKind::parse(&text).ok_or_else(|| format!("unknown task kind {text:?}"))
    }
}

impl TryFrom<String> for TaskStatus {
    type Error = String;

    fn try_from(text: String) -> Result<TaskStatus, String> {
        TaskStatus::parse(&text).ok_or_else(|| format!("unknown task status {text:?}"))
    }
}

/// Implements `Queries` for a backend whose `pool` field is a sqlx pool and which
/// implements `Dialect`.
macro_rules! impl_queries {
    ($store:ty) => {
        const _: () = {
            use $crate::store::queries::*;
            use $crate::store::*;

            impl $store {
                /// Every row of `bulk_sql(columns, from)`, `$1` bound to `bind` if given.
                /// sqlx hands SQLite's rows over from its worker thread one at a time, a
                /// few microseconds each, so there thousands of rows come as one JSON
                /// array, about three times sooner (BENCHMARKS.md, bench-promote);
                /// PostgreSQL sends rows cheaply and builds JSON slowly, so it sends rows.
                pub(super) async fn fetch_bulk<T>(
                    &self,
                    columns: &[&[(&str, &str)]],
                    from: &str,
                    bind: Option<&str>,
                ) -> StoreResult<Vec<T>>
                where
                    T: serde::de::DeserializeOwned
                        + for<'r> sqlx::FromRow<'r, <<$store as Dialect>::Db as sqlx::Database>::Row>
                        + Send
                        + Unpin,
                {
                    let as_json = <$store as Dialect>::BULK_AS_JSON;
                    let sql = bulk_sql(columns, from, as_json);
                    if as_json {
                        let mut query = sqlx::query_scalar::<_, String>(&sql);
                        if let Some(value) = bind {
                            query = query.bind(value);
                        }
                        let rows = query.fetch_one(&self.pool).await?;
                        serde_json::from_str(&rows).map_err(|err| {
                            StoreError::Other(format!("could not read the rows of {from}: {err}"))
                        })
                    } else {
                        let mut query = sqlx::query_as::<_, T>(&sql);
                        if let Some(value) = bind {
                            query = query.bind(value);
                        }
                        Ok(query.fetch_all(&self.pool).await?)
                    }
                }

                /// Runs one pruning statement: `$1` is the cutoff, `$2` the batch size;
                /// how many rows it deleted.
                async fn delete_batch(&self, sql: &str, before_ms: i64, batch: i64) -> StoreResult<u64> {
                    let done = sqlx::query(sql)
                        .bind(before_ms)
                        .bind(batch)
                        .execute(&self.pool)
                        .await?;
                    Ok(done.rows_affected())
                }

                /// Writes what an agent's hello said, once `authenticate` has checked its
                /// secret (each backend guards that check its own way); the agent has
                /// shown that it holds `secret_hash`'s secret (`shown_secret`).
                async fn record_hello<'c, E>(
                    executor: E,
                    agent_id: &str,
                    secret_hash: &str,
                    facts: &AgentFacts,
                    now_ms: i64,
                ) -> StoreResult<()>
                where
                    E: sqlx::Executor<'c, Database = <$store as Dialect>::Db>,
                {
                    sqlx::query(&format!(
                        "UPDATE agents SET hostname = $1, version = $2, os = $3, arch = $4, \
                             auto_update = $5, last_seen = $6, version_key = $8, {} \
                         WHERE id = $7",
                        shown_secret("$9")
                    ))
                    .bind(&facts.hostname)
                    .bind(&facts.version)
                    .bind(&facts.os)
                    .bind(&facts.arch)
                    .bind(facts.auto_update)
                    .bind(now_ms)
                    .bind(agent_id)
                    .bind(super::version_key::version_key(&facts.version))
                    .bind(secret_hash)
                    .execute(executor)
                    .await?;
                    Ok(())
                }
            }

            #[async_trait::async_trait]
            impl Queries for $store {
                async fn node_beat(
                    &self,
                    node_id: &str,
                    address: &str,
                    now_ms: i64,
                ) -> StoreResult<()> {
                    sqlx::query(
                        "INSERT INTO nodes (id, address, started_at, last_beat) \
                         VALUES ($1, $2, $3, $3) \
                         ON CONFLICT (id) DO UPDATE SET last_beat = excluded.last_beat",
                    )
                    .bind(node_id)
                    .bind(address)
                    .bind(now_ms)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn record_sessions(
                    &self,
                    node_id: &str,
                    changes: &[SessionChange],
                ) -> StoreResult<()> {
                    // Rows are changed in agent id order (byte order, as heartbeat
                    // batches lock theirs), so this batch and a heartbeat batch or another
                    // node's batch wait for each other instead of deadlocking; one agent's
                    // changes keep their order (a stable sort).
                    let mut ordered: Vec<&SessionChange> = changes.iter().collect();
                    ordered.sort_by(|a, b| a.agent_id().cmp(b.agent_id()));
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    for change in ordered {
                        let (sql, agent_id, at_ms) = match change {
                            SessionChange::Claim { agent_id, at_ms } => (CLAIM_SESSION, agent_id, at_ms),
                            SessionChange::Release { agent_id, claimed_at_ms } => {
                                (RELEASE_SESSION, agent_id, claimed_at_ms)
                            }
                        };
                        sqlx::query(sql)
                            .bind(node_id)
                            .bind(*at_ms)
                            .bind(agent_id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    Ok(())
                }

                async fn bootstrap_state(&self) -> StoreResult<BootstrapState> {
                    let admins: i64 = sqlx::query_scalar(COUNT_ADMIN_TOKENS)
                        .fetch_one(&self.pool)
                        .await?;
                    let enrolls: i64 = sqlx::query_scalar(COUNT_ENROLL_TOKENS)
                        .fetch_one(&self.pool)
                        .await?;
                    let first_enroll_token = sqlx::query_as(&format!(
                        "SELECT {ENROLL_TOKEN_COLUMNS} FROM enrollment_tokens \
                         ORDER BY created_at, id LIMIT 1"
                    ))
                    .fetch_optional(&self.pool)
                    .await?;
                    Ok(BootstrapState {
                        has_admin_token: admins > 0,
                        has_enroll_token: enrolls > 0,
                        first_enroll_token,
                    })
                }

                async fn bootstrap(&self, pieces: &Bootstrap) -> StoreResult<BootstrapOutcome> {
                    let now = $crate::clock::now_ms();
                    let mut outcome = BootstrapOutcome::default();
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    if let Some(lock) = <$store as Dialect>::BOOTSTRAP_LOCK {
                        sqlx::query(lock).execute(&mut *tx).await?;
                    }
                    let client_id: Option<String> =
                        sqlx::query_scalar("SELECT id FROM clients WHERE name = $1")
                            .bind(DEFAULT_CLIENT)
                            .fetch_optional(&mut *tx)
                            .await?;
                    let client_id = match client_id {
                        Some(id) => id,
                        None => {
                            let id = new_id();
                            sqlx::query(
                                "INSERT INTO clients (id, name, created_at) VALUES ($1, $2, $3)",
                            )
                            .bind(&id)
                            .bind(DEFAULT_CLIENT)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                            id
                        }
                    };
                    let site_id: Option<String> = sqlx::query_scalar(
                        "SELECT id FROM sites WHERE client_id = $1 AND name = $2",
                    )
                    .bind(&client_id)
                    .bind(DEFAULT_SITE)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let site_id = match site_id {
                        Some(id) => id,
                        None => {
                            let id = new_id();
                            sqlx::query(
                                "INSERT INTO sites (id, client_id, name, created_at) \
                                 VALUES ($1, $2, $3, $4)",
                            )
                            .bind(&id)
                            .bind(&client_id)
                            .bind(DEFAULT_SITE)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                            outcome.created_site = true;
                            id
                        }
                    };
                    let admins: i64 = sqlx::query_scalar(COUNT_ADMIN_TOKENS)
                        .fetch_one(&mut *tx)
                        .await?;
                    if let (0, Some(hash)) = (admins, &pieces.admin_token_hash) {
                        sqlx::query(
                            "INSERT INTO api_tokens (id, name, role, token_hash, created_at) \
                             VALUES ($1, 'bootstrap admin', 'admin', $2, $3)",
                        )
                        .bind(new_id())
                        .bind(hash)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                        outcome.created_admin_token = true;
                    }
                    let enrolls: i64 = sqlx::query_scalar(COUNT_ENROLL_TOKENS)
                        .fetch_one(&mut *tx)
                        .await?;
                    if let (0, Some(hash)) = (enrolls, &pieces.enroll_token_hash) {
                        sqlx::query(
                            "INSERT INTO enrollment_tokens \
                                 (id, site_id, token_hash, created_at, expires_at) \
                             VALUES ($1, $2, $3, $4, $5)",
                        )
                        .bind(new_id())
                        .bind(&site_id)
                        .bind(hash)
                        .bind(now)
                        .bind(pieces.enroll_token_expires_at_ms)
                        .execute(&mut *tx)
                        .await?;
                        outcome.created_enroll_token = true;
                    }
                    tx.commit().await?;
                    Ok(outcome)
                }

                async fn api_token(&self, token_hash: &str) -> StoreResult<ApiToken> {
                    Ok(sqlx::query_as(&format!(
                        "SELECT {TOKEN_COLUMNS} FROM api_tokens \
                         WHERE token_hash = $1 AND revoked_at IS NULL"
                    ))
                    .bind(token_hash)
                    .fetch_one(&self.pool)
                    .await?)
                }

                async fn create_api_token(
                    &self,
                    name: &str,
                    role: Role,
                    token_hash: &str,
                ) -> StoreResult<ApiToken> {
                    Ok(sqlx::query_as(&format!(
                        "INSERT INTO api_tokens (id, name, role, token_hash, created_at) \
                         VALUES ($1, $2, $3, $4, $5) RETURNING {TOKEN_COLUMNS}"
                    ))
                    .bind(new_id())
                    .bind(name)
                    .bind(role.as_str())
                    .bind(token_hash)
                    .bind($crate::clock::now_ms())
                    .fetch_one(&self.pool)
                    .await?)
                }

                async fn list_api_tokens(&self) -> StoreResult<Vec<ApiToken>> {
                    let bytes = <$store as Dialect>::BYTE_ORDER;
                    Ok(sqlx::query_as(&format!(
                        "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at, id{bytes}"
                    ))
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn revoke_api_token(&self, id: &str) -> StoreResult<()> {
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    let done = sqlx::query(
                        "UPDATE api_tokens SET revoked_at = $1 \
                         WHERE id = $2 AND revoked_at IS NULL",
                    )
                    .bind($crate::clock::now_ms())
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    changed_one(done.rows_affected())?;
                    sqlx::query("DELETE FROM dashboard_sessions WHERE token_id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    Ok(())
                }

                async fn create_session(
                    &self,
                    id_hash: &str,
                    token_id: &str,
                    now_ms: i64,
                    expires_at_ms: i64,
                ) -> StoreResult<()> {
                    sqlx::query(
                        "INSERT INTO dashboard_sessions (id_hash, token_id, created_at, expires_at) \
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(id_hash)
                    .bind(token_id)
                    .bind(now_ms)
                    .bind(expires_at_ms)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn session_token(&self, id_hash: &str, now_ms: i64) -> StoreResult<ApiToken> {
                    Ok(sqlx::query_as(
                        "SELECT t.id, t.name, t.role, t.created_at AS created_at_ms, \
                                t.revoked_at IS NOT NULL AS revoked \
                         FROM dashboard_sessions s JOIN api_tokens t ON t.id = s.token_id \
                         WHERE s.id_hash = $1 AND s.expires_at > $2 AND t.revoked_at IS NULL",
                    )
                    .bind(id_hash)
                    .bind(now_ms)
                    .fetch_one(&self.pool)
                    .await?)
                }

                async fn delete_session(&self, id_hash: &str) -> StoreResult<bool> {
                    let done = sqlx::query("DELETE FROM dashboard_sessions WHERE id_hash = $1")
                        .bind(id_hash)
                        .execute(&self.pool)
                        .await?;
                    Ok(done.rows_affected() > 0)
                }

                async fn prune_sessions(&self, now_ms: i64) -> StoreResult<u64> {
                    let done = sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at <= $1")
                        .bind(now_ms)
                        .execute(&self.pool)
                        .await?;
                    Ok(done.rows_affected())
                }

                async fn create_enrollment_token(
                    &self,
                    site_id: &str,
                    token_hash: &str,
                    expires_at_ms: Option<i64>,
                    max_uses: Option<i64>,
                ) -> StoreResult<String> {
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    let _: String = sqlx::query_scalar("SELECT id FROM sites WHERE id = $1")
                        .bind(site_id)
                        .fetch_one(&mut *tx)
                        .await?;
                    let id = new_id();
                    sqlx::query(
                        "INSERT INTO enrollment_tokens \
                             (id, site_id, token_hash, created_at, expires_at, max_uses) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(&id)
                    .bind(site_id)
                    .bind(token_hash)
                    .bind($crate::clock::now_ms())
                    .bind(expires_at_ms)
                    .bind(max_uses)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(id)
                }

                async fn enroll(
                    &self,
                    enroll_token_hash: &str,
                    facts: &AgentFacts,
                    secret_hash: &str,
                    now_ms: i64,
                    live: LiveSince,
                ) -> StoreResult<Enrollment> {
                    // The token's site, read without a lock (a token's site never
                    // changes); its use is counted, and its limits checked again, last.
                    let (site_id, limited): (String, bool) = sqlx::query_as(&usable_token_site())
                        .bind(enroll_token_hash)
                        .bind(now_ms)
                        .fetch_one(&self.pool)
                        .await?;
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    let candidate = new_id();
                    // The re-bind happens in the same statement that checks the record is
                    // not live, so two enrollments racing for one machine cannot both win.
                    // A record whose secret no agent has shown (`shown_secret`) is live
                    // only while a node holds its session: its welcome never arrived, or
                    // the agent gave up waiting for it, and no machine holds that secret.
                    let agent_id: Option<String> = sqlx::query_scalar(
                        "INSERT INTO agents (id, site_id, fingerprint, secret_hash, hostname, \
                                             version, os, arch, auto_update, enrolled_at, \
                                             last_seen, version_key, secret_proven) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $13, FALSE) \
                         ON CONFLICT (site_id, fingerprint) DO UPDATE SET \
                             secret_hash = excluded.secret_hash, hostname = excluded.hostname, \
                             version = excluded.version, version_key = excluded.version_key, \
                             os = excluded.os, \
                             arch = excluded.arch, auto_update = excluded.auto_update, \
                             last_seen = excluded.last_seen, secret_proven = FALSE \
                         WHERE (agents.last_seen < $11 OR NOT agents.secret_proven) \
                             AND NOT EXISTS ( \
                             SELECT 1 FROM nodes n \
                             WHERE n.id = agents.node_id AND n.last_beat >= $12) \
                         RETURNING id",
                    )
                    .bind(&candidate)
                    .bind(&site_id)
                    .bind(&facts.fingerprint)
                    .bind(secret_hash)
                    .bind(&facts.hostname)
                    .bind(&facts.version)
                    .bind(&facts.os)
                    .bind(&facts.arch)
                    .bind(facts.auto_update)
                    .bind(now_ms)
                    .bind(live.seen_ms)
                    .bind(live.node_beat_ms)
                    .bind(super::version_key::version_key(&facts.version))
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(agent_id) = agent_id else {
                        // The use is not counted: nothing enrolled.
                        tx.rollback().await?;
                        let (agent_id, count): (String, i64) = sqlx::query_as(
                            "UPDATE agents SET conflict_at = $1, conflict_hostname = $2, \
                                 conflict_count = CASE WHEN conflict_at >= $3 \
                                     THEN conflict_count + 1 ELSE 1 END \
                             WHERE site_id = $4 AND fingerprint = $5 \
                             RETURNING id, conflict_count",
                        )
                        .bind(now_ms)
                        .bind(&facts.hostname)
                        .bind(now_ms.saturating_sub(CONFLICT_SPELL_MS))
                        .bind(&site_id)
                        .bind(&facts.fingerprint)
                        .fetch_one(&self.pool)
                        .await?;
                        return Ok(Enrollment::Conflict { agent_id, count });
                    };
                    // The use is counted in the statement that checks the token is still
                    // usable. A limited token counts it in its row, so two enrollments
                    // cannot both take its last use: the second waits for the first's lock
                    // (SQLite's database lock, PostgreSQL's row lock), then re-checks the
                    // limits against the counted use. Any other token's use is a row of
                    // its own, so enrollments with it do not queue on one row (migration
                    // 0018).
                    let count_use = if limited {
                        format!(
                            "UPDATE enrollment_tokens SET uses = uses + 1 \
                             WHERE token_hash = $1 AND {USABLE_TOKEN}"
                        )
                    } else {
                        format!(
                            "INSERT INTO enrollment_uses (token_id, used_at) \
                             SELECT id, $2 FROM enrollment_tokens \
                             WHERE token_hash = $1 AND {USABLE_TOKEN}"
                        )
                    };
                    let counted = sqlx::query(&count_use)
                        .bind(enroll_token_hash)
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await?;
                    if counted.rows_affected() == 0 {
                        // Revoked, expired or used up since it was read: nothing enrolled.
                        tx.rollback().await?;
                        return Err(StoreError::NotFound);
                    }
                    tx.commit().await?;
                    Ok(Enrollment::Enrolled(Enrolled {
                        rebound: agent_id != candidate,
                        agent_id,
                    }))
                }

                async fn list_enrollment_tokens(
                    &self,
                    site_id: Option<&str>,
                ) -> StoreResult<Vec<EnrollmentToken>> {
                    let bytes = <$store as Dialect>::BYTE_ORDER;
                    Ok(sqlx::query_as(&format!(
                        "SELECT {ENROLL_TOKEN_COLUMNS} FROM enrollment_tokens \
                         WHERE $1 IS NULL OR site_id = $1 ORDER BY created_at, id{bytes}"
                    ))
                    .bind(site_id)
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn revoke_enrollment_token(&self, id: &str, now_ms: i64) -> StoreResult<()> {
                    let done = sqlx::query(
                        "UPDATE enrollment_tokens SET revoked_at = $1 \
                         WHERE id = $2 AND revoked_at IS NULL",
                    )
                    .bind(now_ms)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                    changed_one(done.rows_affected())
                }

                async fn enrollment_site(&self, enroll_token_hash: &str) -> StoreResult<String> {
                    let (site_id, _limited): (String, bool) = sqlx::query_as(&usable_token_site())
                        .bind(enroll_token_hash)
                        .bind($crate::clock::now_ms())
                        .fetch_one(&self.pool)
                        .await?;
                    Ok(site_id)
                }

                async fn count_agents(&self) -> StoreResult<i64> {
                    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM agents")
                        .fetch_one(&self.pool)
                        .await?)
                }

                async fn fill_version_keys(&self) -> StoreResult<u64> {
                    let missing: Vec<(String, String)> = sqlx::query_as(
                        "SELECT id, version FROM agents WHERE version_key IS NULL",
                    )
                    .fetch_all(&self.pool)
                    .await?;
                    let mut filled = 0;
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    for (id, version) in &missing {
                        filled += sqlx::query(
                            "UPDATE agents SET version_key = $1 WHERE id = $2 AND version = $3",
                        )
                        .bind(super::version_key::version_key(version))
                        .bind(id)
                        .bind(version)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    }
                    tx.commit().await?;
                    Ok(filled)
                }

                async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
                    let bytes = <$store as Dialect>::BYTE_ORDER;
                    Ok(sqlx::query_as(&format!(
                        "{SELECT_AGENTS} ORDER BY a.hostname{bytes}, a.id{bytes}"
                    ))
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn list_candidates(&self) -> StoreResult<Vec<CandidateRecord>> {
                    self.fetch_bulk(
                        &[CANDIDATE_COLUMNS],
                        "agents a JOIN sites s ON s.id = a.site_id \
                         JOIN clients c ON c.id = s.client_id",
                        None,
                    )
                    .await
                }

                async fn running_version(
                    &self,
                    version: &str,
                ) -> StoreResult<Vec<RunningRecord>> {
                    self.fetch_bulk(
                        &[CANDIDATE_COLUMNS, RUNNING_COLUMNS],
                        "agents a JOIN sites s ON s.id = a.site_id \
                         JOIN clients c ON c.id = s.client_id \
                         LEFT JOIN nodes n ON n.id = a.node_id \
                         WHERE a.version = $1",
                        Some(version),
                    )
                    .await
                }

                async fn version_runs(&self, version: &str) -> StoreResult<bool> {
                    let one: Option<(String,)> =
                        sqlx::query_as("SELECT id FROM agents WHERE version = $1 LIMIT 1")
                            .bind(version)
                            .fetch_optional(&self.pool)
                            .await?;
                    Ok(one.is_some())
                }

                async fn held_by(
                    &self,
                    node_id: &str,
                ) -> StoreResult<(Vec<AgentRecord>, Vec<(String, String)>)> {
                    let agents = sqlx::query_as(&format!("{SELECT_AGENTS} WHERE a.node_id = $1"))
                        .bind(node_id)
                        .fetch_all(&self.pool)
                        .await?;
                    let tasks = sqlx::query_as(&format!(
                        "SELECT t.agent_id, t.id FROM update_tasks t \
                         JOIN agents a ON a.id = t.agent_id \
                         WHERE a.node_id = $1 AND t.status IN {ACTIVE_STATUSES}"
                    ))
                    .bind(node_id)
                    .fetch_all(&self.pool)
                    .await?;
                    Ok((agents, tasks))
                }

                async fn agent(&self, id: &str) -> StoreResult<AgentRecord> {
                    Ok(sqlx::query_as(&format!("{SELECT_AGENTS} WHERE a.id = $1"))
                        .bind(id)
                        .fetch_one(&self.pool)
                        .await?)
                }

                async fn list_clients(&self) -> StoreResult<Vec<Client>> {
                    let bytes = <$store as Dialect>::BYTE_ORDER;
                    Ok(sqlx::query_as(&format!(
                        "SELECT {CLIENT_COLUMNS} FROM clients ORDER BY name{bytes}"
                    ))
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn create_client(&self, name: &str) -> StoreResult<Client> {
                    Ok(sqlx::query_as(&format!(
                        "INSERT INTO clients (id, name, created_at) VALUES ($1, $2, $3) \
                         RETURNING {CLIENT_COLUMNS}"
                    ))
                    .bind(new_id())
                    .bind(name)
                    .bind($crate::clock::now_ms())
                    .fetch_one(&self.pool)
                    .await?)
                }

                async fn list_sites(&self) -> StoreResult<Vec<Site>> {
                    let bytes = <$store as Dialect>::BYTE_ORDER;
                    Ok(sqlx::query_as(&format!(
                        "SELECT {SITE_COLUMNS} FROM sites ORDER BY client_id{bytes}, name{bytes}"
                    ))
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn create_site(&self, client_id: &str, name: &str) -> StoreResult<Site> {
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    let _: String = sqlx::query_scalar("SELECT id FROM clients WHERE id = $1")
                        .bind(client_id)
                        .fetch_one(&mut *tx)
                        .await?;
                    let site = sqlx::query_as(&format!(
                        "INSERT INTO sites (id, client_id, name, created_at) \
                         VALUES ($1, $2, $3, $4) RETURNING {SITE_COLUMNS}"
                    ))
                    .bind(new_id())
                    .bind(client_id)
                    .bind(name)
                    .bind($crate::clock::now_ms())
                    .fetch_one(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    Ok(site)
                }

                async fn set_channel(
                    &self,
                    scope: ChannelScope,
                    id: &str,
                    channel: Option<&str>,
                ) -> StoreResult<()> {
                    let table = match scope {
                        ChannelScope::Agent => "agents",
                        ChannelScope::Site => "sites",
                        ChannelScope::Client => "clients",
                    };
                    let done =
                        sqlx::query(&format!("UPDATE {table} SET channel = $1 WHERE id = $2"))
                            .bind(channel)
                            .bind(id)
                            .execute(&self.pool)
                            .await?;
                    changed_one(done.rows_affected())
                }

                async fn set_hierarchy_setting(
                    &self,
                    scope: ChannelScope,
                    id: &str,
                    setting: HierarchySetting,
                    value: Option<&str>,
                ) -> StoreResult<()> {
                    let table = match scope {
                        ChannelScope::Site => "sites",
                        ChannelScope::Client => "clients",
                        ChannelScope::Agent => {
                            return Err(StoreError::Other(format!(
                                "{} belongs to sites and clients",
                                setting.column()
                            )));
                        }
                    };
                    let done = sqlx::query(&format!(
                        "UPDATE {table} SET {} = $1 WHERE id = $2",
                        setting.column()
                    ))
                    .bind(value)
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                    changed_one(done.rows_affected())
                }

                async fn agents_under(
                    &self,
                    scope: ChannelScope,
                    id: &str,
                ) -> StoreResult<Vec<String>> {
                    let query = match scope {
                        ChannelScope::Agent => "SELECT id FROM agents WHERE id = $1",
                        ChannelScope::Site => "SELECT id FROM agents WHERE site_id = $1",
                        ChannelScope::Client => {
                            "SELECT a.id FROM agents a JOIN sites s ON s.id = a.site_id \
                             WHERE s.client_id = $1"
                        }
                    };
                    Ok(sqlx::query_scalar(query)
                        .bind(id)
                        .fetch_all(&self.pool)
                        .await?)
                }

                async fn set_paused(&self, agent_id: &str, paused: bool) -> StoreResult<()> {
                    let done = sqlx::query("UPDATE agents SET paused = $1 WHERE id = $2")
                        .bind(paused)
                        .bind(agent_id)
                        .execute(&self.pool)
                        .await?;
                    changed_one(done.rows_affected())
                }

                async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
                    Ok(
                        sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                            .bind(key)
                            .fetch_optional(&self.pool)
                            .await?,
                    )
                }

                async fn set_setting(&self, key: &str, value: &str) -> StoreResult<()> {
                    sqlx::query(
                        "INSERT INTO settings (key, value) VALUES ($1, $2) \
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    )
                    .bind(key)
                    .bind(value)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn setting_or_insert(&self, key: &str, value: &str) -> StoreResult<String> {
                    sqlx::query(
                        "INSERT INTO settings (key, value) VALUES ($1, $2) \
                         ON CONFLICT (key) DO NOTHING",
                    )
                    .bind(key)
                    .bind(value)
                    .execute(&self.pool)
                    .await?;
                    Ok(
                        sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
                            .bind(key)
                            .fetch_one(&self.pool)
                            .await?,
                    )
                }

                async fn blocked_versions(&self) -> StoreResult<Vec<String>> {
                    let bytes = <$store as Dialect>::BYTE_ORDER;
                    Ok(sqlx::query_scalar(&format!(
                        "SELECT version FROM version_blocks ORDER BY version{bytes}"
                    ))
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn create_tasks_as(
                    &self,
                    tasks: &[NewTask<'_>],
                    ids: &[String],
                    now_ms: i64,
                ) -> StoreResult<Vec<Option<UpdateTask>>> {
                    // One transaction and one statement per chunk: a promote dispatches to
                    // every connected agent at once, and a statement per task would make
                    // the last agent wait for all the others. The unique index on
                    // unfinished tasks turns a second one for an agent into no row. Only
                    // the ids of the rows made come back (in any order); the rest of each
                    // row is what was written.
                    if ids.len() != tasks.len() {
                        return Err(StoreError::Other(format!(
                            "{} task ids for {} tasks",
                            ids.len(),
                            tasks.len()
                        )));
                    }
                    let mut made = std::collections::HashSet::with_capacity(tasks.len());
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    for chunk in tasks
                        .iter()
                        .zip(ids)
                        .collect::<Vec<_>>()
                        .chunks(TASKS_PER_STATEMENT)
                    {
                        // A blocked version gets no new task, whatever a node's memory of
                        // the blocks says: a rollback on another node may have just
                        // committed its block.
                        let mut insert = sqlx::QueryBuilder::new(
                            "INSERT INTO update_tasks (id, agent_id, from_version, to_version, \
                                 os, arch, kind, status, attempts, created_at, updated_at, \
                                 dispatched_at, rollout_id, wave, mirror) \
                             SELECT * FROM (",
                        );
                        insert.push_values(chunk, |mut row, (task, id)| {
                            let dispatched = task.status == TaskStatus::Dispatched;
                            row.push_bind(id.as_str())
                                .push_bind(task.agent_id)
                                .push_bind(task.from_version)
                                .push_bind(task.to_version)
                                .push_bind(task.os)
                                .push_bind(task.arch)
                                .push_bind(task.kind.as_str())
                                .push_bind(task.status.as_str())
                                .push_bind(i64::from(dispatched))
                                .push_bind(now_ms)
                                .push_bind(now_ms)
                                .push_bind(dispatched.then_some(now_ms))
                                .push_bind(task.rollout_id)
                                .push_bind(task.wave.and_then(|w| i64::try_from(w).ok()))
                                .push_bind(task.mirror);
                        });
                        insert.push(
                            ") AS v WHERE NOT EXISTS (SELECT 1 FROM version_blocks b \
                             WHERE b.version = v.column4) ON CONFLICT DO NOTHING RETURNING id",
                        );
                        let rows: Vec<String> =
                            insert.build_query_scalar().fetch_all(&mut *tx).await?;
                        made.extend(rows);
                    }
                    tx.commit().await?;
                    Ok(tasks
                        .iter()
                        .zip(ids)
                        .map(|(task, id)| made.contains(id).then(|| task.made(id, now_ms)))
                        .collect())
                }

                async fn active_task(&self, agent_id: &str) -> StoreResult<Option<UpdateTask>> {
                    Ok(sqlx::query_as(&format!(
                        "SELECT {TASK_COLUMNS} FROM update_tasks \
                         WHERE agent_id = $1 AND status IN {ACTIVE_STATUSES}"
                    ))
                    .bind(agent_id)
                    .fetch_optional(&self.pool)
                    .await?)
                }

                async fn task(&self, task_id: &str) -> StoreResult<Option<UpdateTask>> {
                    Ok(sqlx::query_as(&format!(
                        "SELECT {TASK_COLUMNS} FROM update_tasks WHERE id = $1"
                    ))
                    .bind(task_id)
                    .fetch_optional(&self.pool)
                    .await?)
                }

                async fn failed_versions(&self, agent_id: &str) -> StoreResult<Vec<String>> {
                    Ok(sqlx::query_scalar(
                        "SELECT DISTINCT to_version FROM update_tasks \
                         WHERE agent_id = $1 AND failure_class = 'build'",
                    )
                    .bind(agent_id)
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn stale_tasks(
                    &self,
                    cutoff_ms: i64,
                    live_since_ms: i64,
                ) -> StoreResult<Vec<UpdateTask>> {
                    let greatest = <$store as Dialect>::GREATEST;
                    Ok(sqlx::query_as(&format!(
                        "SELECT {TASK_COLUMNS} FROM update_tasks \
                         WHERE status IN {ACTIVE_STATUSES} AND status <> 'queued' \
                           AND {greatest}(created_at, COALESCE(dispatched_at, 0), \
                                          COALESCE(progress_at, 0)) < $1 \
                           AND agent_id NOT IN (SELECT a.id FROM agents a \
                               JOIN nodes n ON n.id = a.node_id WHERE n.last_beat >= $2)"
                    ))
                    .bind(cutoff_ms)
                    .bind(live_since_ms)
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn time_out_tasks(
                    &self,
                    groups: &[SilentTasks],
                    cutoff_ms: i64,
                    now_ms: i64,
                ) -> StoreResult<Vec<UpdateTask>> {
                    let greatest = <$store as Dialect>::GREATEST;
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    let mut ended = Vec::new();
                    let mut counts = Vec::with_capacity(groups.len());
                    for group in groups {
                        let before = ended.len();
                        for ids in group.task_ids.chunks(TIME_OUT_BATCH) {
                            let list = placeholders(6, ids.len());
                            let sql = format!(
                                "UPDATE update_tasks SET status = 'timed_out', failure_class = $1, \
                                     error = $2, updated_at = $3, finished_at = $3 \
                                 WHERE status = $4 \
                                   AND {greatest}(created_at, COALESCE(dispatched_at, 0), \
                                                  COALESCE(progress_at, 0)) < $5 \
                                   AND id IN ({list}) \
                                 RETURNING {TASK_COLUMNS}"
                            );
                            let mut query = sqlx::query_as(&sql)
                                .bind(group.class.as_str())
                                .bind(&group.error)
                                .bind(now_ms)
                                .bind(group.status.as_str())
                                .bind(cutoff_ms);
                            for id in ids {
                                query = query.bind(id);
                            }
                            let done: Vec<UpdateTask> = query.fetch_all(&mut *tx).await?;
                            ended.extend(done);
                        }
                        counts.push(ended.len() - before);
                    }
                    tx.commit().await?;
                    for (group, count) in groups.iter().zip(counts) {
                        $crate::metrics::COUNTERS.tasks_ended(
                            TaskStatus::TimedOut.as_str(),
                            Some(group.class.as_str()),
                            count,
                        );
                    }
                    Ok(ended)
                }

                async fn take_lease(
                    &self,
                    name: &str,
                    holder: &str,
                    now_ms: i64,
                    until_ms: i64,
                ) -> StoreResult<bool> {
                    let done = sqlx::query(
                        "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (name) DO UPDATE \
                         SET holder = excluded.holder, expires_at = excluded.expires_at \
                         WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
                    )
                    .bind(name)
                    .bind(holder)
                    .bind(until_ms)
                    .bind(now_ms)
                    .execute(&self.pool)
                    .await?;
                    Ok(done.rows_affected() == 1)
                }

                async fn tasks_for_agent(
                    &self,
                    agent_id: &str,
                    limit: i64,
                ) -> StoreResult<Vec<UpdateTask>> {
                    let inserted = <$store as Dialect>::INSERTION_ORDER;
                    Ok(sqlx::query_as(&format!(
                        "SELECT {TASK_COLUMNS} FROM update_tasks WHERE agent_id = $1 \
                         ORDER BY created_at DESC, {inserted} DESC LIMIT $2"
                    ))
                    .bind(agent_id)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn record_dispatch(
                    &self,
                    task_id: &str,
                    now_ms: i64,
                    attempt: bool,
                    mirror: Option<&str>,
                ) -> StoreResult<UpdateTask> {
                    Ok(sqlx::query_as(&format!(
                        "UPDATE update_tasks SET status = 'dispatched', \
                             attempts = attempts + $3, dispatched_at = $1, updated_at = $1, \
                             mirror = $4 \
                         WHERE id = $2 AND status IN {ACTIVE_STATUSES} RETURNING {TASK_COLUMNS}"
                    ))
                    .bind(now_ms)
                    .bind(task_id)
                    .bind(i64::from(attempt))
                    .bind(mirror)
                    .fetch_one(&self.pool)
                    .await?)
                }

                async fn record_transfer(
                    &self,
                    agent_id: &str,
                    task_id: &str,
                    transfer: &TransferRecord<'_>,
                ) -> StoreResult<UpdateTask> {
                    Ok(sqlx::query_as(&format!(
                        "UPDATE update_tasks SET transfer_source = $1, transfer_fallback = $2, \
                             transfer_error = $3, transfer_kind = $6, transfer_bytes = $7 \
                         WHERE id = $4 AND agent_id = $5 AND status IN {ACTIVE_STATUSES} \
                         RETURNING {TASK_COLUMNS}"
                    ))
                    .bind(transfer.source)
                    .bind(transfer.fallback)
                    .bind(transfer.error)
                    .bind(task_id)
                    .bind(agent_id)
                    .bind(transfer.kind)
                    .bind(transfer.bytes)
                    .fetch_one(&self.pool)
                    .await?)
                }

                async fn mirror_counts(&self, since_ms: i64) -> StoreResult<Vec<MirrorCount>> {
                    Ok(sqlx::query_as(
                        "SELECT mirror, transfer_source AS source, transfer_fallback AS fallback, \
                             COUNT(*) AS tasks \
                         FROM update_tasks \
                         WHERE mirror IS NOT NULL AND created_at >= $1 \
                           AND transfer_source IS NOT NULL \
                         GROUP BY mirror, transfer_source, transfer_fallback",
                    )
                    .bind(since_ms)
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn mirror_transfers(
                    &self,
                    mirror: &str,
                    fallbacks_only: bool,
                    limit: i64,
                ) -> StoreResult<Vec<MirrorTransfer>> {
                    let which = if fallbacks_only {
                        "transfer_fallback IS NOT NULL"
                    } else {
                        "transfer_source IS NOT NULL"
                    };
                    Ok(sqlx::query_as(&format!(
                        "SELECT transfer_fallback AS fallback, transfer_error AS error, \
                             updated_at AS at_ms \
                         FROM update_tasks WHERE mirror = $1 AND {which} \
                         ORDER BY created_at DESC LIMIT $2"
                    ))
                    .bind(mirror)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn record_progress(
                    &self,
                    agent_id: &str,
                    task_id: &str,
                    status: TaskStatus,
                    bytes_done: i64,
                    bytes_total: i64,
                    now_ms: i64,
                ) -> StoreResult<UpdateTask> {
                    Ok(sqlx::query_as(&format!(
                        "UPDATE update_tasks SET status = $1, bytes_done = $2, bytes_total = $3, \
                             progress_at = $4, updated_at = $4 \
                         WHERE id = $5 AND agent_id = $6 AND status IN {ACTIVE_STATUSES} \
                         RETURNING {TASK_COLUMNS}"
                    ))
                    .bind(status.as_str())
                    .bind(bytes_done)
                    .bind(bytes_total)
                    .bind(now_ms)
                    .bind(task_id)
                    .bind(agent_id)
                    .fetch_one(&self.pool)
                    .await?)
                }

                async fn finish_task(
                    &self,
                    agent_id: &str,
                    task_id: &str,
                    status: TaskStatus,
                    class: Option<FailureClass>,
                    error: Option<&str>,
                    now_ms: i64,
                ) -> StoreResult<UpdateTask> {
                    Ok(sqlx::query_as(&format!(
                        "UPDATE update_tasks SET status = $1, error = $2, updated_at = $3, \
                             finished_at = $3, failure_class = $6 \
                         WHERE id = $4 AND agent_id = $5 AND status IN {ACTIVE_STATUSES} \
                         RETURNING {TASK_COLUMNS}"
                    ))
                    .bind(status.as_str())
                    .bind(error)
                    .bind(now_ms)
                    .bind(task_id)
                    .bind(agent_id)
                    .bind(class.map(FailureClass::as_str))
                    .fetch_one(&self.pool)
                    .await
                    .inspect(|_| {
                        $crate::metrics::COUNTERS.tasks_ended(
                            status.as_str(),
                            class.map(FailureClass::as_str),
                            1,
                        );
                    })?)
                }

                async fn revert_success(
                    &self,
                    agent_id: &str,
                    task_id: &str,
                    running: &str,
                    error: Option<&str>,
                    now_ms: i64,
                ) -> StoreResult<UpdateTask> {
                    Ok(sqlx::query_as(&format!(
                        "UPDATE update_tasks SET status = 'rolled_back', failure_class = 'build', \
                             error = $1, updated_at = $2, finished_at = $2 \
                         WHERE id = $3 AND agent_id = $4 AND status = 'succeeded' \
                           AND to_version <> $5 \
                         RETURNING {TASK_COLUMNS}"
                    ))
                    .bind(error)
                    .bind(now_ms)
                    .bind(task_id)
                    .bind(agent_id)
                    .bind(running)
                    .fetch_one(&self.pool)
                    .await
                    .inspect(|_| {
                        $crate::metrics::COUNTERS.tasks_ended("rolled_back", Some("build"), 1);
                    })?)
                }

                async fn record_first_seen(
                    &self,
                    builds: &[(String, String, String)],
                    now_ms: i64,
                ) -> StoreResult<()> {
                    // Inserted in one order on every node, so two PostgreSQL nodes recording
                    // the same new builds wait for each other instead of deadlocking on the
                    // primary key.
                    let mut builds: Vec<&(String, String, String)> = builds.iter().collect();
                    builds.sort();
                    builds.dedup();
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    for (version, os, arch) in builds {
                        sqlx::query(
                            "INSERT INTO builds (version, os, arch, first_seen) \
                             VALUES ($1, $2, $3, $4) ON CONFLICT (version, os, arch) DO NOTHING",
                        )
                        .bind(version)
                        .bind(os)
                        .bind(arch)
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                    Ok(())
                }

                async fn rollout_records(&self) -> StoreResult<Vec<RolloutRecord>> {
                    Ok(sqlx::query_as(
                        "SELECT version, os, arch, first_seen AS first_seen_ms, \
                             promoted_at AS promoted_at_ms, halted_at AS halted_at_ms, \
                             halt_reason \
                         FROM builds",
                    )
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn mark_promoted(&self, version: &str, now_ms: i64) -> StoreResult<()> {
                    sqlx::query("UPDATE builds SET promoted_at = $1 WHERE version = $2")
                        .bind(now_ms)
                        .bind(version)
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                }

                async fn block_version(
                    &self,
                    version: &str,
                    reason: &str,
                    cancel_reason: &str,
                    now_ms: i64,
                ) -> StoreResult<Vec<String>> {
                    let mut tx = $crate::store::queries::begin_write::<$store>(&self.pool).await?;
                    if let Some(lock) = <$store as Dialect>::TASK_INSERTS_LOCK {
                        sqlx::query(lock).execute(&mut *tx).await?;
                    }
                    sqlx::query(
                        "INSERT INTO version_blocks (version, reason, created_at) \
                         VALUES ($1, $2, $3) ON CONFLICT (version) DO NOTHING",
                    )
                    .bind(version)
                    .bind(reason)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                    let cancelled: Vec<String> = sqlx::query_scalar(&format!(
                        "UPDATE update_tasks SET status = 'cancelled', error = $1, \
                             updated_at = $2, finished_at = $2, failure_class = 'transient' \
                         WHERE to_version = $3 AND status IN {ACTIVE_STATUSES} \
                         RETURNING agent_id"
                    ))
                    .bind(cancel_reason)
                    .bind(now_ms)
                    .bind(version)
                    .fetch_all(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    $crate::metrics::COUNTERS.tasks_ended(
                        "cancelled",
                        Some("transient"),
                        cancelled.len(),
                    );
                    Ok(cancelled)
                }

                async fn unblock_version(&self, version: &str) -> StoreResult<bool> {
                    let done = sqlx::query("DELETE FROM version_blocks WHERE version = $1")
                        .bind(version)
                        .execute(&self.pool)
                        .await?;
                    Ok(done.rows_affected() > 0)
                }

                async fn cancel_rollout_tasks(
                    &self,
                    rollout_id: &str,
                    reason: &str,
                    now_ms: i64,
                ) -> StoreResult<Vec<String>> {
                    Ok(sqlx::query_scalar(&format!(
                        "UPDATE update_tasks SET status = 'cancelled', error = $1, \
                             updated_at = $2, finished_at = $2, failure_class = 'transient' \
                         WHERE rollout_id = $3 AND status IN {ACTIVE_STATUSES} \
                         RETURNING agent_id"
                    ))
                    .bind(reason)
                    .bind(now_ms)
                    .bind(rollout_id)
                    .fetch_all(&self.pool)
                    .await
                    .inspect(|cancelled| {
                        $crate::metrics::COUNTERS.tasks_ended(
                            "cancelled",
                            Some("transient"),
                            cancelled.len(),
                        );
                    })?)
                }

                async fn prune_tasks(&self, before_ms: i64, batch: i64) -> StoreResult<u64> {
                    let sql = format!(
                        "DELETE FROM update_tasks WHERE id IN (SELECT u.id FROM update_tasks u \
                             LEFT JOIN rollouts r ON r.id = u.rollout_id \
                             WHERE u.finished_at < $1 AND u.status NOT IN {ACTIVE_STATUSES} \
                             AND NOT (u.failure_class = 'build' AND u.status <> 'succeeded') \
                             AND (u.rollout_id IS NULL OR r.summary IS NOT NULL) LIMIT $2)"
                    );
                    self.delete_batch(&sql, before_ms, batch).await
                }

                async fn prune_audit(&self, before_ms: i64, batch: i64) -> StoreResult<u64> {
                    let sql = "DELETE FROM audit_log WHERE id IN \
                         (SELECT id FROM audit_log WHERE at < $1 ORDER BY at LIMIT $2)";
                    self.delete_batch(sql, before_ms, batch).await
                }

                async fn prune_snapshots(&self, before_ms: i64, batch: i64) -> StoreResult<u64> {
                    let sql = "DELETE FROM version_snapshots WHERE at IN \
                         (SELECT DISTINCT at FROM version_snapshots WHERE at < $1 \
                          ORDER BY at LIMIT $2)";
                    self.delete_batch(sql, before_ms, batch).await
                }

                async fn prune_nodes(&self, before_ms: i64) -> StoreResult<u64> {
                    let done = sqlx::query("DELETE FROM nodes WHERE last_beat < $1")
                        .bind(before_ms)
                        .execute(&self.pool)
                        .await?;
                    Ok(done.rows_affected())
                }

                async fn record_version_snapshot(&self, now_ms: i64) -> StoreResult<()> {
                    sqlx::query(
                        "INSERT INTO version_snapshots (at, os, arch, version, agents) \
                         SELECT $1, os, arch, version, COUNT(*) FROM agents \
                         GROUP BY os, arch, version \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(now_ms)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn agents_page(
                    &self,
                    filter: &AgentFilter<'_>,
                ) -> StoreResult<(Vec<AgentRecord>, i64)> {
                    let bytes = <$store as Dialect>::BYTE_ORDER;
                    let (conditions, values) = agent_conditions(filter, bytes);
                    let from = &SELECT_AGENTS[SELECT_AGENTS.find(" FROM ").unwrap_or(0)..];
                    // The count goes through the same joins as the page.
                    let count_text = format!("SELECT COUNT(*){from}{conditions}");
                    let mut count = sqlx::query_scalar::<_, i64>(&count_text);
                    for value in &values {
                        count = match value {
                            Value::Text(text) => count.bind(text.clone()),
                            Value::Int(n) => count.bind(*n),
                            Value::Bool(b) => count.bind(*b),
                        };
                    }
                    let total = count.fetch_one(&self.pool).await?;
                    let direction = if filter.descending { " DESC" } else { "" };
                    let first = match filter.sort {
                        "last_seen" => format!("a.last_seen{direction}, "),
                        "version" => {
                            format!("COALESCE(a.version_key, ''){bytes}{direction}, ")
                        }
                        "platform" => format!("a.os{bytes}{direction}, a.arch{bytes}{direction}, "),
                        "site" => format!("a.site_id{bytes}{direction}, "),
                        _ => String::new(),
                    };
                    let hostname = if filter.sort == "hostname" { direction } else { "" };
                    let n = values.len();
                    let text = format!(
                        "{SELECT_AGENTS}{conditions} ORDER BY {first}a.hostname{bytes}{hostname}, \
                         a.id{bytes}{hostname} LIMIT ${} OFFSET ${}",
                        n + 1,
                        n + 2
                    );
                    let mut page = sqlx::query_as::<_, AgentRecord>(&text);
                    for value in &values {
                        page = match value {
                            Value::Text(text) => page.bind(text.clone()),
                            Value::Int(n) => page.bind(*n),
                            Value::Bool(b) => page.bind(*b),
                        };
                    }
                    let agents = page
                        .bind(filter.limit)
                        .bind(filter.offset)
                        .fetch_all(&self.pool)
                        .await?;
                    Ok((agents, total))
                }

                async fn fleet_counts(&self, live_since_ms: i64) -> StoreResult<Vec<FleetCount>> {
                    Ok(sqlx::query_as(
                        // Agents grouped first by all the counts depend on (from the
                        // index `agents_fleet`, in its order), then the few groups
                        // joined to their site, client and node.
                        "SELECT g.os, g.arch, g.version, \
                           CAST(SUM(g.n) AS BIGINT) AS agents, \
                           CAST(SUM(CASE WHEN nd.last_beat >= $1 THEN g.n ELSE 0 END) AS BIGINT) \
                               AS online, \
                           CAST(SUM(CASE WHEN g.paused THEN g.n ELSE 0 END) AS BIGINT) AS paused, \
                           CAST(SUM(CASE WHEN COALESCE(g.channel, s.channel, c.channel) = 'beta' \
                               THEN g.n ELSE 0 END) AS BIGINT) AS beta \
                         FROM (SELECT os, arch, version, site_id, channel, paused, node_id, \
                                   COUNT(*) AS n \
                               FROM agents \
                               GROUP BY os, arch, version, site_id, channel, paused, node_id) g \
                           JOIN sites s ON s.id = g.site_id \
                           JOIN clients c ON c.id = s.client_id \
                           LEFT JOIN nodes nd ON nd.id = g.node_id \
                         GROUP BY g.os, g.arch, g.version",
                    )
                    .bind(live_since_ms)
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn version_history(&self, since_ms: i64) -> StoreResult<Vec<VersionCount>> {
                    Ok(sqlx::query_as(
                        "SELECT at AS at_ms, os, arch, version, agents FROM version_snapshots \
                         WHERE at >= $1 ORDER BY at, os, arch, version",
                    )
                    .bind(since_ms)
                    .fetch_all(&self.pool)
                    .await?)
                }

                async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()> {
                    sqlx::query(
                        "INSERT INTO audit_log (at, actor, action, target, detail, result) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(entry.at_ms)
                    .bind(&entry.actor)
                    .bind(&entry.action)
                    .bind(&entry.target)
                    .bind(&entry.detail)
                    .bind(&entry.result)
                    .execute(&self.pool)
                    .await?;
                    Ok(())
                }

                async fn audit(
                    &self,
                    limit: i64,
                    before: Option<i64>,
                    action: Option<&str>,
                ) -> StoreResult<Vec<AuditEntry>> {
                    // Typed by casts so PostgreSQL knows what a NULL parameter is.
                    Ok(sqlx::query_as(
                        "SELECT id, at AS at_ms, actor, action, target, detail, result \
                         FROM audit_log \
                         WHERE (CAST($1 AS BIGINT) IS NULL OR id < $1) \
                           AND (CAST($2 AS TEXT) IS NULL OR action = $2) \
                         ORDER BY id DESC LIMIT $3",
                    )
                    .bind(before)
                    .bind(action)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?)
                }
            }
        };
    };
}

pub(super) use impl_queries;
