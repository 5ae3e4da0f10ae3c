//! The storage boundary: the operations the product needs, one error enum, the SQL both
//! backends share (`queries`) and one module per backend for the rest. Only this module and
//! its children see sqlx types.

mod postgres;
mod queries;
mod rollouts;
mod sqlite;
mod version_key;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

pub use postgres::PostgresStore;
pub use queries::Queries;
pub(crate) use queries::{new_task_id, task_minted_ms};
pub use rollouts::{
    ClassRow, NewRollout, Rollout, RolloutEvent, RolloutFilter, RolloutKind, RolloutState,
    RolloutStore, RolloutTarget, StageInputs, StateChange, TargetGroup, TargetPage, WaveRow,
};
pub use sqlite::{Snapshot, SqliteStore};
pub use version_key::version_key;

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
            other => {
                crate::metrics::Counters::bump(&crate::metrics::COUNTERS.database_errors);
                StoreError::Other(other.to_string())
            }
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

/// What an enrollment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrollment {
    /// A new record, or the machine's own record re-bound to a new secret.
    Enrolled(Enrolled),
    /// The machine's record in the site is live, so it was left alone: nothing changed
    /// but the conflict noted on it, and the token's use was not counted.
    Conflict {
        agent_id: String,
        /// Refused enrollments in this conflict so far, this one included.
        count: i64,
    },
}

/// When a machine's record counts as live, so that an enrollment may not re-bind it:
/// held by a node that beat at or after `node_beat_ms`, or seen (authenticated or
/// heartbeating) at or after `seen_ms` once an agent has shown it holds the record's
/// secret (a record whose welcome was lost is live only while its session is held).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveSince {
    pub node_beat_ms: i64,
    pub seen_ms: i64,
}

/// An enrollment token as stored (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct EnrollmentToken {
    pub id: String,
    pub site_id: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub max_uses: Option<i64>,
    pub uses: i64,
    pub revoked_at_ms: Option<i64>,
}

impl EnrollmentToken {
    /// Whether it still enrolls at `now_ms`, and if not why: the same rule as the
    /// statements that accept a token (`USABLE_TOKEN`).
    pub fn state(&self, now_ms: i64) -> &'static str {
        if self.revoked_at_ms.is_some() {
            "revoked"
        } else if self.expires_at_ms.is_some_and(|at| at <= now_ms) {
            "expired"
        } else if self.max_uses.is_some_and(|max| self.uses >= max) {
            "used_up"
        } else {
            "usable"
        }
    }
}

/// One agent as stored, with the channels of its site and client for resolution.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
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
    /// The maintenance windows (JSON) of its site and client.
    pub site_window: Option<String>,
    pub client_window: Option<String>,
    /// The download mirrors (base URLs) of its site and client.
    pub site_mirror: Option<String>,
    pub client_mirror: Option<String>,
    /// The node holding the agent's session, and that node's last heartbeat.
    pub node_id: Option<String>,
    pub node_last_beat_ms: Option<i64>,
    /// The newest enrollment refused because this record was live (a fingerprint
    /// conflict), how many since the conflict began, and the hostname that machine gave.
    pub conflict_at_ms: Option<i64>,
    pub conflict_count: i64,
    pub conflict_hostname: Option<String>,
}

/// What starting a rollout needs to know of an agent (`Queries::list_candidates`): a
/// fraction of an `AgentRecord`, read for the whole fleet at once.
#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub struct CandidateRecord {
    pub id: String,
    pub site_id: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    pub agent_channel: Option<String>,
    pub site_channel: Option<String>,
    pub client_channel: Option<String>,
}

/// What rolling a version back needs to know of an agent that runs it
/// (`Queries::running_version`): what any rollout's start reads, and a little more, read
/// for every agent on the version at once.
#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
pub struct RunningRecord {
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub candidate: CandidateRecord,
    pub hostname: String,
    #[serde(deserialize_with = "queries::flag")]
    pub paused: bool,
    #[serde(deserialize_with = "queries::flag")]
    pub auto_update: bool,
    pub node_id: Option<String>,
    pub node_last_beat_ms: Option<i64>,
}

/// Silent tasks in one status, ended alike (`Queries::time_out_tasks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SilentTasks {
    pub status: TaskStatus,
    pub class: FailureClass,
    pub error: String,
    pub task_ids: Vec<String>,
}

/// A change to which node holds an agent's session (`Queries::record_sessions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange {
    /// This node holds the agent's session since `at_ms`.
    Claim { agent_id: String, at_ms: i64 },
    /// The session this node claimed at `claimed_at_ms` ended.
    Release {
        agent_id: String,
        claimed_at_ms: i64,
    },
}

impl SessionChange {
    pub fn agent_id(&self) -> &str {
        match self {
            SessionChange::Claim { agent_id, .. } | SessionChange::Release { agent_id, .. } => {
                agent_id
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRecord {
    pub agent_id: String,
    pub version: String,
    pub at_ms: i64,
    /// On the first heartbeat of an enrolled session: the hash of the secret its welcome
    /// carried, which the agent has shown it holds by heartbeating (migration 0021).
    pub shown_secret: Option<String>,
}

/// What first start needs: a default client and site, and the hashes of the bootstrap
/// tokens to create when none exists yet.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub admin_token_hash: Option<String>,
    pub enroll_token_hash: Option<String>,
    /// When the bootstrap enrollment token stops enrolling.
    pub enroll_token_expires_at_ms: Option<i64>,
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
    /// An enrollment token was ever made: first start makes one only when none was,
    /// so revoking every token is not undone by a restart.
    pub has_enroll_token: bool,
    /// The first enrollment token made (the bootstrap one, unless it predates this
    /// record), to say at start whether it still enrolls.
    pub first_enroll_token: Option<EnrollmentToken>,
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

// Stored as its text; an unknown one is a corrupt row.
impl<DB: sqlx::Database> sqlx::Type<DB> for FailureClass
where
    String: sqlx::Type<DB>,
{
    fn type_info() -> DB::TypeInfo {
        <String as sqlx::Type<DB>>::type_info()
    }

    fn compatible(ty: &DB::TypeInfo) -> bool {
        <String as sqlx::Type<DB>>::compatible(ty)
    }
}

impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for FailureClass
where
    String: sqlx::Decode<'r, DB>,
{
    fn decode(value: DB::ValueRef<'r>) -> Result<FailureClass, sqlx::error::BoxDynError> {
        let text = <String as sqlx::Decode<'r, DB>>::decode(value)?;
        FailureClass::parse(&text).ok_or_else(|| format!("unknown failure class {text:?}").into())
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

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UpdateTask {
    pub id: String,
    pub agent_id: String,
    pub from_version: String,
    pub to_version: String,
    pub os: String,
    pub arch: String,
    #[sqlx(try_from = "String")]
    pub kind: TaskKind,
    #[sqlx(try_from = "String")]
    pub status: TaskStatus,
    pub attempts: i64,
    pub error: Option<String>,
    pub bytes_done: i64,
    pub bytes_total: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub dispatched_at_ms: Option<i64>,
    pub progress_at_ms: Option<i64>,
    /// The rollout and wave it belongs to; none for tasks older than rollout records.
    pub rollout_id: Option<String>,
    pub wave: Option<i64>,
    /// Why it did not succeed, once ended.
    pub failure_class: Option<FailureClass>,
    pub finished_at_ms: Option<i64>,
    /// The download mirror its update message offered (base URL), if any.
    pub mirror: Option<String>,
    /// How the build reached the agent, as it reported: `mirror` (the mirror served
    /// verified bytes) or `server`; unknown until the agent says.
    pub transfer_source: Option<String>,
    /// Why the agent gave up on the mirror (`MirrorFailure`), and what it saw.
    pub transfer_fallback: Option<String>,
    pub transfer_error: Option<String>,
    /// What crossed the wire, as the agent reported: `full`, `compressed` or `delta`; unknown
    /// (read as `full`) until the agent says, and from agents that do not.
    pub transfer_kind: Option<String>,
    /// Bytes of what crossed the wire, as the agent reported.
    pub transfer_bytes: Option<i64>,
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

/// Rows in one multi-row `INSERT` of tasks: 15 parameters each, far below either
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
    pub rollout_id: Option<&'a str>,
    pub wave: Option<usize>,
    /// The download mirror its update message offers.
    pub mirror: Option<&'a str>,
}

impl NewTask<'_> {
    /// The row `create_tasks` writes for this task: every column not set here starts at
    /// its default in the schema (no error, no bytes, no progress).
    pub(crate) fn made(&self, id: &str, now_ms: i64) -> UpdateTask {
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
            rollout_id: self.rollout_id.map(str::to_owned),
            wave: self.wave.and_then(|w| i64::try_from(w).ok()),
            failure_class: None,
            finished_at_ms: None,
            mirror: self.mirror.map(str::to_owned),
            transfer_source: None,
            transfer_fallback: None,
            transfer_error: None,
            transfer_kind: None,
            transfer_bytes: None,
        }
    }
}

/// How a task's build reaches its agent, as the agent reported (see `UpdateTask`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferRecord<'a> {
    pub source: &'a str,
    pub fallback: Option<&'a str>,
    pub error: Option<&'a str>,
    /// `full`, `compressed` or `delta`.
    pub kind: &'a str,
    /// Bytes of what crosses the wire, when the agent said.
    pub bytes: Option<i64>,
}

/// Tasks offered one mirror that reported one source and fallback reason.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MirrorCount {
    pub mirror: String,
    pub source: String,
    pub fallback: Option<String>,
    pub tasks: i64,
}

/// One reported transfer of a task offered a mirror.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MirrorTransfer {
    /// Why the agent fell back; `None` when the mirror served it.
    pub fallback: Option<String>,
    pub error: Option<String>,
    pub at_ms: i64,
}

/// A setting a site or a client holds for its agents (a site's wins over its client's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HierarchySetting {
    /// The weekly window (JSON, see `maintenance`).
    MaintenanceWindow,
    /// The download mirror's base URL (see `mirrors`).
    DownloadMirror,
}

impl HierarchySetting {
    /// Its column in `sites` and `clients`.
    pub fn column(self) -> &'static str {
        match self {
            HierarchySetting::MaintenanceWindow => "maintenance_window",
            HierarchySetting::DownloadMirror => "download_mirror",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Client {
    pub id: String,
    pub name: String,
    pub channel: Option<String>,
    /// Its maintenance window as JSON (see `maintenance`).
    pub maintenance_window: Option<String>,
    /// Its agents' download mirror (base URL); see `mirrors`.
    pub download_mirror: Option<String>,
    #[serde(skip)]
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Site {
    pub id: String,
    pub client_id: String,
    pub name: String,
    pub channel: Option<String>,
    /// Its maintenance window as JSON (see `maintenance`).
    pub maintenance_window: Option<String>,
    /// Its agents' download mirror (base URL); see `mirrors`.
    pub download_mirror: Option<String>,
    #[serde(skip)]
    pub created_at_ms: i64,
}

/// What is stored about one version on one platform.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RolloutRecord {
    pub version: String,
    pub os: String,
    pub arch: String,
    pub first_seen_ms: i64,
    pub promoted_at_ms: Option<i64>,
    pub halted_at_ms: Option<i64>,
    pub halt_reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
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
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiToken {
    pub id: String,
    pub name: String,
    #[sqlx(try_from = "String")]
    pub role: Role,
    pub created_at_ms: i64,
    pub revoked: bool,
}

/// How many agents ran one version on one platform at one moment.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct VersionCount {
    pub at_ms: i64,
    pub os: String,
    pub arch: String,
    pub version: String,
    pub agents: i64,
}

/// Which agents a page of the listing holds; every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct AgentFilter<'a> {
    /// Part of the hostname (any case) or of the id.
    pub q: Option<&'a str>,
    pub site: Option<&'a str>,
    /// The resolved channel.
    pub channel: Option<&'a str>,
    pub version: Option<&'a str>,
    /// Only agents whose version precedes this one (a `version_key`).
    pub older_than_key: Option<&'a str>,
    pub os: Option<&'a str>,
    pub arch: Option<&'a str>,
    /// With `live_since_ms`: held by a node that beat at or after it.
    pub online: Option<bool>,
    pub live_since_ms: i64,
    pub paused: Option<bool>,
    /// `hostname`, `version` (semver precedence), `last_seen`, `platform` or `site`,
    /// then hostname and id.
    pub sort: &'a str,
    pub descending: bool,
    pub limit: i64,
    pub offset: i64,
}

/// Agents on one platform and version now: how many, how many online, how many paused,
/// how many on the beta channel.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FleetCount {
    pub os: String,
    pub arch: String,
    pub version: String,
    pub agents: i64,
    pub online: i64,
    pub paused: i64,
    pub beta: i64,
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

/// Everything the product stores: the operations both backends share (`Queries`) and
/// those whose SQL differs between them.
#[async_trait]
pub trait Store: Queries + RolloutStore + Send + Sync + 'static {
    /// Forgets every recorded session: for a backend only one node can use, whose
    /// sessions all died with the previous process.
    async fn forget_sessions(&self) -> StoreResult<()>;

    /// Sends a small message to every other node sharing the database. A backend that
    /// cannot be shared by several nodes has no one to tell.
    async fn publish(&self, _message: &str) -> StoreResult<()> {
        Ok(())
    }

    /// Listens to the other nodes; `None` when the backend serves a single node.
    async fn subscribe(&self) -> StoreResult<Option<Box<dyn Subscription>>> {
        Ok(None)
    }

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
}

/// Opens the database named by `url` (`sqlite://...` or `postgres://...`), running
/// migrations, or a SQLite file in `data_dir` when `url` is `None`. The returned name is
/// safe to print: it carries no password.
/// Where the database is: `--database` if given, else `drover.db` in the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Location {
    pub fn of(url: Option<&str>, data_dir: &Path) -> anyhow::Result<Location> {
        match url {
            None => Ok(Location::Sqlite(data_dir.join("drover.db"))),
            Some(url) if url.starts_with("sqlite:") => Ok(Location::Sqlite(
                url.trim_start_matches("sqlite://")
                    .trim_start_matches("sqlite:")
                    .into(),
            )),
            Some(url) if url.starts_with("postgres:") || url.starts_with("postgresql:") => {
                Ok(Location::Postgres(url.to_owned()))
            }
            Some(url) => anyhow::bail!(
                "unsupported database URL {:?}: expected sqlite://PATH or postgres://HOST/DATABASE",
                postgres::redact_password(url)
            ),
        }
    }

    /// For printing and logs: a PostgreSQL URL without its password.
    pub fn shown(&self) -> String {
        match self {
            Location::Sqlite(path) => format!("sqlite://{}", path.display()),
            Location::Postgres(url) => postgres::redact_password(url),
        }
    }
}

pub async fn open(url: Option<&str>, data_dir: &Path) -> anyhow::Result<(Arc<dyn Store>, String)> {
    let location = Location::of(url, data_dir)?;
    let store: Arc<dyn Store> = match &location {
        Location::Sqlite(path) => Arc::new(SqliteStore::open(path).await?),
        Location::Postgres(url) => Arc::new(PostgresStore::open(url).await?),
    };
    Ok((store, location.shown()))
}

/// Refuses a database a newer server migrated: its newest applied migration is one this
/// server does not know, and running on it could lose or misread what that server wrote.
pub(crate) fn refuse_newer_schema(
    applied: Option<i64>,
    migrator: &sqlx::migrate::Migrator,
    shown: &str,
) -> anyhow::Result<()> {
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    if let Some(applied) = applied.filter(|&applied| applied > known) {
        anyhow::bail!(
            "the database {shown} was upgraded by a newer drover-server (schema version {applied}; \
             this server knows versions up to {known}): run that newer version, or restore a backup \
             made before the upgrade"
        );
    }
    Ok(())
}

/// The newest migration applied to a database (`None` for a new one), for
/// `refuse_newer_schema`.
pub(crate) const APPLIED_SCHEMA: &str = "SELECT MAX(version) FROM _sqlx_migrations";
