//! The storage boundary: the operations the product needs, one error enum, one module per
//! backend. Only this module and its children see sqlx types.

mod sqlite;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

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

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which bootstrap tokens exist already, so first start generates only the missing ones.
    async fn bootstrap_state(&self) -> StoreResult<BootstrapState>;

    /// Creates whatever of the default client, site and bootstrap tokens is missing, in
    /// one transaction.
    async fn bootstrap(&self, pieces: &Bootstrap) -> StoreResult<BootstrapOutcome>;

    async fn api_token_role(&self, token_hash: &str) -> StoreResult<Role>;

    /// Enrolls a machine with a site enrollment token: re-binds the machine's record in
    /// that site if there is one (same id, new secret), otherwise creates one.
    /// `NotFound` when the token is unknown or revoked.
    async fn enroll(
        &self,
        enroll_token_hash: &str,
        facts: &AgentFacts,
        secret_hash: &str,
        now_ms: i64,
    ) -> StoreResult<Enrolled>;

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
}

/// Opens the database named by `url` (`sqlite://...`), running migrations, or a SQLite
/// file in `data_dir` when `url` is `None`.
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
            anyhow::bail!("this build does not support PostgreSQL yet; use a sqlite:// URL")
        }
        Some(url) => anyhow::bail!("unsupported database URL {url:?}: expected sqlite://PATH"),
    }
}
