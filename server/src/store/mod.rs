//! The storage boundary: the operations the product needs, one error enum, one module per
//! backend. Only this module and its children see sqlx types.

mod postgres;
mod rollouts;
mod sqlite;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

pub use postgres::PostgresStore;
pub use rollouts::{
    ClassRow, NewRollout, Rollout, RolloutEvent, RolloutFilter, RolloutKind, RolloutState,
    RolloutStore, RolloutTarget, StateChange, TargetGroup, WaveRow,
};
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.message().to_owned())
            }
            other => StoreError::Other(other.to_string()),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// What an agent says about itself in its hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentFacts {
    pub fingerprint: String,
    pub hostname: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    pub auto_update: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub agent_id: String,
    /// True when the machine already had a record in the site and was re-bound to it.
    pub rebound: bool,
}

/// One agent as stored, with the channels of its site and client for resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub id: String,
    pub site_id: String,
    pub fingerprint: String,
    pub hostname: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    pub paused: bool,
    pub auto_update: bool,
    pub enrolled_at_ms: i64,
    pub last_seen_ms: i64,
    pub agent_channel: Option<String>,
    pub site_channel: Option<String>,
    pub client_channel: Option<String>,
    /// The node holding the agent's session, and that node's last heartbeat.
    pub node_id: Option<String>,
    pub node_last_beat_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRecord {
    pub agent_id: String,
    pub version: String,
    pub at_ms: i64,
}

/// What first start needs: a default client and site, and the hashes of the bootstrap
/// tokens to create when none exists yet.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub admin_token_hash: Option<String>,
    pub enroll_token_hash: Option<String>,
}

/// Which bootstrap pieces were missing and have now been created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootstrapOutcome {
    pub created_site: bool,
    pub created_admin_token: bool,
    pub created_enroll_token: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapState {
    pub has_admin_token: bool,
    pub has_enroll_token: bool,
}

/// Why a task exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// The server decided the agent is due a newer build.
    Update,
    /// An operator asked for it.
    Forced,
    /// An operator rolled a version back; the agent accepts an older build.
    Rollback,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Update => "update",
            TaskKind::Forced => "forced",
            TaskKind::Rollback => "rollback",
        }
    }

    fn parse(text: &str) -> Option<TaskKind> {
        [TaskKind::Update, TaskKind::Forced, TaskKind::Rollback]
            .into_iter()
            .find(|k| k.as_str() == text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    Dispatched,
    Downloading,
    Verifying,
    Installing,
    Restarting,
    Succeeded,
    Failed,
    RolledBack,
    Cancelled,
    TimedOut,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 11] = [
        TaskStatus::Queued,
        TaskStatus::Dispatched,
        TaskStatus::Downloading,
        TaskStatus::Verifying,
        TaskStatus::Installing,
        TaskStatus::Restarting,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::RolledBack,
        TaskStatus::Cancelled,
        TaskStatus::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Dispatched => "dispatched",
            TaskStatus::Downloading => "downloading",
            TaskStatus::Verifying => "verifying",
            TaskStatus::Installing => "installing",
            TaskStatus::Restarting => "restarting",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::RolledBack => "rolled_back",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::TimedOut => "timed_out",
        }
    }

    fn parse(text: &str) -> Option<TaskStatus> {
        TaskStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Unfinished: the agent still owes an outcome.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            TaskStatus::Queued
                | TaskStatus::Dispatched
                | TaskStatus::Downloading
                | TaskStatus::Verifying
                | TaskStatus::Installing
                | TaskStatus::Restarting
        )
    }

    /// Counts against the version on this agent: not offered again unless forced.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            TaskStatus::Failed | TaskStatus::RolledBack | TaskStatus::TimedOut
        )
    }
}

/// Why an ended task did not succeed; only `Build` says anything about the build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    Build,
    Environment,
    Transient,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Build => "build",
            FailureClass::Environment => "environment",
            FailureClass::Transient => "transient",
        }
    }

    pub fn parse(text: &str) -> Option<FailureClass> {
        [
            FailureClass::Build,
            FailureClass::Environment,
            FailureClass::Transient,
        ]
        .into_iter()
        .find(|c| c.as_str() == text)
    }
}

impl From<protocol::FailureClass> for FailureClass {
    /// A class this server does not know is nobody's fault until it knows better.
    fn from(class: protocol::FailureClass) -> FailureClass {
        match class {
            protocol::FailureClass::Build => FailureClass::Build,
            protocol::FailureClass::Environment => FailureClass::Environment,
            protocol::FailureClass::Transient | protocol::FailureClass::Unknown => {
                FailureClass::Transient
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateTask {
    pub id: String,
    pub agent_id: String,
    pub from_version: String,
    pub to_version: String,
    pub os: String,
    pub arch: String,
    pub kind: TaskKind,
    pub status: TaskStatus,
    pub attempts: i64,
    pub error: Option<String>,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub dispatched_at_ms: Option<i64>,
    pub progress_at_ms: Option<i64>,
}

impl UpdateTask {
    /// When the agent last showed it was working on the task.
    pub fn last_activity_ms(&self) -> i64 {
        self.progress_at_ms
            .into_iter()
            .chain(self.dispatched_at_ms)
            .max()
            .unwrap_or(self.created_at_ms)
    }
}

/// Rows in one multi-row `INSERT` of tasks: 12 parameters each, far below either
/// database's limit on parameters in a statement.
const TASKS_PER_STATEMENT: usize = 500;

#[derive(Debug, Clone)]
pub struct NewTask<'a> {
    pub agent_id: &'a str,
    pub from_version: &'a str,
    pub to_version: &'a str,
    pub os: &'a str,
    pub arch: &'a str,
    pub kind: TaskKind,
    /// `Dispatched` when it is sent at once, `Queued` when the agent is not connected.
    pub status: TaskStatus,
}

impl NewTask<'_> {
    /// The row `create_tasks` writes for this task: every column not set here starts at
    /// its default in the schema (no error, no bytes, no progress).
    fn made(&self, id: &str, now_ms: i64) -> UpdateTask {
        let dispatched = self.status == TaskStatus::Dispatched;
        UpdateTask {
            id: id.to_owned(),
            agent_id: self.agent_id.to_owned(),
            from_version: self.from_version.to_owned(),
            to_version: self.to_version.to_owned(),
            os: self.os.to_owned(),
            arch: self.arch.to_owned(),
            kind: self.kind,
            status: self.status,
            attempts: i64::from(dispatched),
            error: None,
            bytes_done: 0,
            bytes_total: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            dispatched_at_ms: dispatched.then_some(now_ms),
            progress_at_ms: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Client {
    pub id: String,
    pub name: String,
    pub channel: Option<String>,
    #[serde(skip)]
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Site {
    pub id: String,
    pub client_id: String,
    pub name: String,
    pub channel: Option<String>,
    #[serde(skip)]
    pub created_at_ms: i64,
}

/// What is stored about one version on one platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutRecord {
    pub version: String,
    pub os: String,
    pub arch: String,
    pub first_seen_ms: i64,
    pub promoted_at_ms: Option<i64>,
    pub halted_at_ms: Option<i64>,
    pub halt_reason: Option<String>,
}

/// How many tasks to one version on one platform are in one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCount {
    pub version: String,
    pub os: String,
    pub arch: String,
    pub status: TaskStatus,
    pub tasks: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditEntry {
    pub id: i64,
    #[serde(skip)]
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: Option<String>,
    pub result: String,
}

/// An API token as stored (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at_ms: i64,
    pub revoked: bool,
}

/// How many agents ran one version on one platform at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionCount {
    pub at_ms: i64,
    pub os: String,
    pub arch: String,
    pub version: String,
    pub agents: i64,
}

/// Which level of the hierarchy a channel is set on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelScope {
    Agent,
    Site,
    Client,
}

/// Messages from the other server nodes sharing the database.
#[async_trait]
pub trait Subscription: Send {
    /// The next message another node published. `None` means the connection was lost
    /// and re-established: messages published meanwhile are lost, so re-read state.
    async fn next(&mut self) -> StoreResult<Option<String>>;
}

#[async_trait]
pub trait Store: RolloutStore + Send + Sync + 'static {
    /// Records that this node is alive.
    async fn node_beat(&self, node_id: &str, address: &str, now_ms: i64) -> StoreResult<()>;

    /// Marks the agent's session as held by this node.
    async fn claim_session(&self, agent_id: &str, node_id: &str) -> StoreResult<()>;

    /// Forgets every recorded session: for a backend only one node can use, whose
    /// sessions all died with the previous process.
    async fn forget_sessions(&self) -> StoreResult<()>;

    /// Clears the agent's session if this node still holds it.
    async fn release_session(&self, agent_id: &str, node_id: &str) -> StoreResult<()>;

    /// Sends a small message to every other node sharing the database. A backend that
    /// cannot be shared by several nodes has no one to tell.
    async fn publish(&self, _message: &str) -> StoreResult<()> {
        Ok(())
    }

    /// Listens to the other nodes; `None` when the backend serves a single node.
    async fn subscribe(&self) -> StoreResult<Option<Box<dyn Subscription>>> {
        Ok(None)
    }

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

    /// `NotFound` when there is no such unrevoked token.
    async fn revoke_api_token(&self, id: &str) -> StoreResult<()>;

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
    /// a use of the token. `NotFound` when the token is unknown, revoked, expired or used
    /// up.
    async fn enroll(
        &self,
        enroll_token_hash: &str,
        facts: &AgentFacts,
        secret_hash: &str,
        now_ms: i64,
    ) -> StoreResult<Enrolled>;

    /// The site an enrollment token enrolls into; `NotFound` when unknown, revoked,
    /// expired or used up.
    async fn enrollment_site(&self, enroll_token_hash: &str) -> StoreResult<String>;

    /// Checks an agent's credentials and records what its hello said.
    /// `NotFound` when the id is unknown or the secret does not match.
    async fn authenticate(
        &self,
        agent_id: &str,
        secret_hash: &str,
        facts: &AgentFacts,
        now_ms: i64,
    ) -> StoreResult<()>;

    /// Writes a batch of heartbeats in one transaction.
    async fn record_heartbeats(&self, batch: &[HeartbeatRecord]) -> StoreResult<()>;

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>>;

    async fn agent(&self, id: &str) -> StoreResult<AgentRecord>;

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

    /// Ids of the agents a channel change at `scope`/`id` affects.
    async fn agents_under(&self, scope: ChannelScope, id: &str) -> StoreResult<Vec<String>>;

    async fn set_paused(&self, agent_id: &str, paused: bool) -> StoreResult<()>;

    async fn setting(&self, key: &str) -> StoreResult<Option<String>>;

    async fn set_setting(&self, key: &str, value: &str) -> StoreResult<()>;

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
    ) -> StoreResult<Vec<Option<UpdateTask>>>;

    /// The agent's unfinished task, if any.
    async fn active_task(&self, agent_id: &str) -> StoreResult<Option<UpdateTask>>;

    /// Versions whose task failed, rolled back or timed out on this agent.
    async fn failed_versions(&self, agent_id: &str) -> StoreResult<Vec<String>>;

    /// Unfinished, dispatched tasks (not `queued`) whose agent has shown no activity on
    /// them since `cutoff_ms`.
    async fn stale_tasks(&self, cutoff_ms: i64) -> StoreResult<Vec<UpdateTask>>;

    /// Newest first.
    async fn tasks_for_agent(&self, agent_id: &str, limit: i64) -> StoreResult<Vec<UpdateTask>>;

    /// Marks a (re-)dispatch: status `dispatched`, one more attempt. `NotFound` unless the
    /// task is unfinished.
    async fn record_dispatch(&self, task_id: &str, now_ms: i64) -> StoreResult<UpdateTask>;

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

    /// Ends an unfinished task of this agent with a final status. `NotFound` when the task
    /// is not this agent's or is finished already (so a repeated result changes nothing).
    async fn finish_task(
        &self,
        agent_id: &str,
        task_id: &str,
        status: TaskStatus,
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

    async fn task_counts(&self) -> StoreResult<Vec<TaskCount>>;

    /// Marks every platform's record of `version` promoted.
    async fn mark_promoted(&self, version: &str, now_ms: i64) -> StoreResult<()>;

    /// Halts one rollout; false when it was halted already.
    async fn halt(
        &self,
        version: &str,
        os: &str,
        arch: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<bool>;

    /// Lifts halts of `version` (on one platform, or all); returns how many.
    async fn resume(&self, version: &str, platform: Option<(&str, &str)>) -> StoreResult<u64>;

    async fn block_version(&self, version: &str, reason: &str, now_ms: i64) -> StoreResult<()>;

    /// False when the version was not blocked.
    async fn unblock_version(&self, version: &str) -> StoreResult<bool>;

    /// Cancels unfinished tasks to `version`; returns the agents they belonged to.
    async fn cancel_tasks_to(
        &self,
        version: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<String>>;

    /// Counts agents per platform and version now, for the adoption history.
    async fn record_version_snapshot(&self, now_ms: i64) -> StoreResult<()>;

    /// Snapshots taken since `since_ms`, oldest first.
    async fn version_history(&self, since_ms: i64) -> StoreResult<Vec<VersionCount>>;

    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()>;

    /// Newest first; `before` pages by id; `action` filters exactly.
    async fn audit(
        &self,
        limit: i64,
        before: Option<i64>,
        action: Option<&str>,
    ) -> StoreResult<Vec<AuditEntry>>;
}

/// Opens the database named by `url` (`sqlite://...` or `postgres://...`), running
/// migrations, or a SQLite file in `data_dir` when `url` is `None`. The returned name is
/// safe to print: it carries no password.
pub async fn open(url: Option<&str>, data_dir: &Path) -> anyhow::Result<(Arc<dyn Store>, String)> {
    match url {
        None => {
            let path = data_dir.join("drover.db");
            let store = SqliteStore::open(&path).await?;
            Ok((Arc::new(store), format!("sqlite://{}", path.display())))
        }
        Some(url) if url.starts_with("sqlite:") => {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let store = SqliteStore::open(Path::new(path)).await?;
            Ok((Arc::new(store), url.to_owned()))
        }
        Some(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => {
            let store = PostgresStore::open(url).await?;
            Ok((Arc::new(store), postgres::redact_password(url)))
        }
        Some(url) => anyhow::bail!(
            "unsupported database URL {:?}: expected sqlite://PATH or postgres://HOST/DATABASE",
            postgres::redact_password(url)
        ),
    }
}
