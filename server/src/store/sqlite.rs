//! The SQLite backend: one database file in WAL mode, migrations from `migrations/sqlite`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

use anyhow::Context;
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection, SqlitePool};

use super::queries::{Dialect, impl_queries};
use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .with_context(|| format!("while creating {}", parent.display()))?;
        }
        // Created readable by the server's user only; SQLite gives its -wal and -shm
        // files the same mode.
        if !path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("while creating the database {}", path.display()))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            // The write-ahead log is copied back into the database (a checkpoint, by the
            // connection that commits) after 10,000 pages (40 MB) rather than SQLite's
            // 1,000: a fan-out's task batches each wrote more than 1,000 pages and so
            // each waited for a checkpoint.
            .pragma("wal_autocheckpoint", "10000")
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .with_context(|| format!("while opening the database {}", path.display()))?;
        let shown = format!("sqlite://{}", path.display());
        let applied: Option<i64> = sqlx::query_scalar(APPLIED_SCHEMA)
            .fetch_one(&pool)
            .await
            .ok()
            .flatten();
        refuse_newer_schema(applied, &MIGRATOR, &shown)?;
        MIGRATOR
            .run(&pool)
            .await
            .with_context(|| format!("while migrating the database {}", path.display()))?;
        let store = SqliteStore { pool };
        store
            .fill_version_keys()
            .await
            .with_context(|| format!("while keying the versions in {}", path.display()))?;
        Ok(store)
    }
}

impl Dialect for SqliteStore {
    type Db = sqlx::Sqlite;

    // SQLite compares text by its bytes (the BINARY collation) already.
    const BYTE_ORDER: &'static str = "";
    // SQLite's MAX with several arguments is the scalar one.
    const GREATEST: &'static str = "MAX";
    const INSERTION_ORDER: &'static str = "rowid";
    // Only one node uses a SQLite file.
    const BOOTSTRAP_LOCK: Option<&'static str> = None;
    // SQLite runs one write at a time, and each task insert is one statement.
    const TASK_INSERTS_LOCK: Option<&'static str> = None;
    // SQLite runs one write at a time.
    const TARGET_FACTS_LOCK: Option<&'static str> = None;
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    const BULK_AS_JSON: bool = true;
}

impl_queries!(SqliteStore);

/// Heartbeats per statement: three parameters each, well under SQLite's limit.
const HEARTBEAT_CHUNK: usize = 500;

super::rollouts::impl_rollout_store!(SqliteStore, sqlx::Sqlite);

#[async_trait]
impl Store for SqliteStore {
    async fn forget_sessions(&self) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET node_id = NULL WHERE node_id IS NOT NULL")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn authenticate(
        &self,
        agent_id: &str,
        secret_hash: &str,
        facts: &AgentFacts,
        now_ms: i64,
    ) -> StoreResult<()> {
        let stored: String = sqlx::query_scalar("SELECT secret_hash FROM agents WHERE id = ?")
            .bind(agent_id)
            .fetch_one(&self.pool)
            .await?;
        if !crate::auth::hashes_equal(&stored, secret_hash) {
            return Err(StoreError::NotFound);
        }
        Self::record_hello(&self.pool, agent_id, secret_hash, facts, now_ms).await
    }

    async fn record_heartbeats(&self, batch: &[HeartbeatRecord]) -> StoreResult<()> {
        // One statement per few hundred agents rather than one per agent: a batch of
        // tens of thousands is a handful of statements.
        let mut tx = super::queries::begin_write::<Self>(&self.pool).await?;
        for chunk in batch.chunks(HEARTBEAT_CHUNK) {
            let values = vec!["(?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let statement = format!(
                "UPDATE agents SET version = v.column2, version_key = v.column4, \
                     last_seen = MAX(agents.last_seen, v.column3), {} \
                 FROM (VALUES {values}) AS v WHERE agents.id = v.column1",
                super::queries::shown_secret("v.column5")
            );
            let mut query = sqlx::query(&statement);
            for beat in chunk {
                query = query
                    .bind(&beat.agent_id)
                    .bind(&beat.version)
                    .bind(beat.at_ms)
                    .bind(super::version_key::version_key(&beat.version))
                    .bind(beat.shown_secret.as_deref());
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// What a database file holds, as a backup or a restore reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The newest migration applied to it.
    pub schema_version: i64,
    pub agents: i64,
    pub bytes: u64,
}

impl SqliteStore {
    /// A consistent copy of the database at `source` written to `dest` (which must not
    /// exist), taken by `VACUUM INTO` inside one read transaction: a server using the
    /// database goes on writing meanwhile. The copy is checked as `inspect` does.
    pub async fn backup(source: &Path, dest: &Path) -> anyhow::Result<Snapshot> {
        anyhow::ensure!(
            source.is_file(),
            "there is no database at {}",
            source.display()
        );
        let options = SqliteConnectOptions::new()
            .filename(source)
            .busy_timeout(Duration::from_secs(30));
        let mut connection = SqliteConnection::connect_with(&options)
            .await
            .with_context(|| format!("while opening the database {}", source.display()))?;
        let dest_text = dest
            .to_str()
            .with_context(|| format!("{} is not a UTF-8 path", dest.display()))?;
        sqlx::query("VACUUM INTO $1")
            .bind(dest_text)
            .execute(&mut connection)
            .await
            .with_context(|| format!("while copying the database into {}", dest.display()))?;
        connection.close().await?;
        SqliteStore::inspect(dest).await
    }

    /// Checks that `file` is a sound Drover database this server can run on: SQLite's
    /// integrity check passes, it has been migrated, and by no newer server.
    pub async fn inspect(file: &Path) -> anyhow::Result<Snapshot> {
        let bytes = std::fs::metadata(file)
            .with_context(|| format!("while reading {}", file.display()))?
            .len();
        let options = SqliteConnectOptions::new().filename(file).read_only(true);
        let mut connection = SqliteConnection::connect_with(&options)
            .await
            .with_context(|| format!("{} is not a SQLite database", file.display()))?;
        let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut connection)
            .await
            .with_context(|| format!("{} is not a SQLite database", file.display()))?;
        anyhow::ensure!(
            integrity == "ok",
            "{} is damaged: {integrity}",
            file.display()
        );
        let applied: Option<i64> = sqlx::query_scalar(APPLIED_SCHEMA)
            .fetch_one(&mut connection)
            .await
            .ok()
            .flatten();
        let Some(schema_version) = applied else {
            anyhow::bail!("{} is not a Drover database", file.display());
        };
        refuse_newer_schema(Some(schema_version), &MIGRATOR, &file.display().to_string())?;
        let agents: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM agents")
            .fetch_one(&mut connection)
            .await
            .with_context(|| format!("{} is not a Drover database", file.display()))?;
        connection.close().await?;
        Ok(Snapshot {
            schema_version,
            agents,
            bytes,
        })
    }
}
