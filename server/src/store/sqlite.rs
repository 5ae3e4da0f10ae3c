//! The SQLite backend: one database file in WAL mode, migrations from `migrations/sqlite`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

const DEFAULT_CLIENT: &str = "default";
const DEFAULT_SITE: &str = "default";

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> anyhow::Result<SqliteStore> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("while creating {}", parent.display()))?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .with_context(|| format!("while opening the database {}", path.display()))?;
        MIGRATOR
            .run(&pool)
            .await
            .with_context(|| format!("while migrating the database {}", path.display()))?;
        Ok(SqliteStore { pool })
    }
}

const AGENT_COLUMNS: &str = "a.id, a.site_id, a.fingerprint, a.hostname, a.version, a.os, a.arch, \
     a.paused, a.auto_update, a.enrolled_at, a.last_seen, \
     a.channel AS agent_channel, s.channel AS site_channel, c.channel AS client_channel, \
     a.node_id, n.last_beat AS node_last_beat \
     FROM agents a JOIN sites s ON s.id = a.site_id JOIN clients c ON c.id = s.client_id \
     LEFT JOIN nodes n ON n.id = a.node_id";

fn agent_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<AgentRecord, sqlx::Error> {
    Ok(AgentRecord {
        id: row.try_get("id")?,
        site_id: row.try_get("site_id")?,
        fingerprint: row.try_get("fingerprint")?,
        hostname: row.try_get("hostname")?,
        version: row.try_get("version")?,
        os: row.try_get("os")?,
        arch: row.try_get("arch")?,
        paused: row.try_get("paused")?,
        auto_update: row.try_get("auto_update")?,
        enrolled_at_ms: row.try_get("enrolled_at")?,
        last_seen_ms: row.try_get("last_seen")?,
        agent_channel: row.try_get("agent_channel")?,
        site_channel: row.try_get("site_channel")?,
        client_channel: row.try_get("client_channel")?,
        node_id: row.try_get("node_id")?,
        node_last_beat_ms: row.try_get("node_last_beat")?,
    })
}

const TASK_COLUMNS: &str = "id, agent_id, from_version, to_version, os, arch, kind, status, \
     attempts, error, bytes_done, bytes_total, created_at, updated_at, dispatched_at, progress_at";

const ACTIVE_STATUSES: &str =
    "('queued', 'dispatched', 'downloading', 'verifying', 'installing', 'restarting')";

fn task_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<UpdateTask, sqlx::Error> {
    let kind: String = row.try_get("kind")?;
    let status: String = row.try_get("status")?;
    let corrupt = |what: &str, value: &str| {
        sqlx::Error::Decode(format!("unknown task {what} {value:?}").into())
    };
    Ok(UpdateTask {
        id: row.try_get("id")?,
        agent_id: row.try_get("agent_id")?,
        from_version: row.try_get("from_version")?,
        to_version: row.try_get("to_version")?,
        os: row.try_get("os")?,
        arch: row.try_get("arch")?,
        kind: TaskKind::parse(&kind).ok_or_else(|| corrupt("kind", &kind))?,
        status: TaskStatus::parse(&status).ok_or_else(|| corrupt("status", &status))?,
        attempts: row.try_get("attempts")?,
        error: row.try_get("error")?,
        bytes_done: row.try_get("bytes_done")?,
        bytes_total: row.try_get("bytes_total")?,
        created_at_ms: row.try_get("created_at")?,
        updated_at_ms: row.try_get("updated_at")?,
        dispatched_at_ms: row.try_get("dispatched_at")?,
        progress_at_ms: row.try_get("progress_at")?,
    })
}

fn client_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Client, sqlx::Error> {
    Ok(Client {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        channel: row.try_get("channel")?,
        created_at_ms: row.try_get("created_at")?,
    })
}

fn site_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Site, sqlx::Error> {
    Ok(Site {
        id: row.try_get("id")?,
        client_id: row.try_get("client_id")?,
        name: row.try_get("name")?,
        channel: row.try_get("channel")?,
        created_at_ms: row.try_get("created_at")?,
    })
}

/// An enrollment token that is not revoked, expired (binds now) or used up.
const USABLE_TOKEN: &str = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) \
     AND (max_uses IS NULL OR uses < max_uses)";

fn token_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<ApiToken, sqlx::Error> {
    let role: String = row.try_get("role")?;
    Ok(ApiToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: Role::parse(&role)
            .ok_or_else(|| sqlx::Error::Decode(format!("unknown role {role:?}").into()))?,
        created_at_ms: row.try_get("created_at")?,
        revoked: row.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
    })
}

fn rollout_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<RolloutRecord, sqlx::Error> {
    Ok(RolloutRecord {
        version: row.try_get("version")?,
        os: row.try_get("os")?,
        arch: row.try_get("arch")?,
        first_seen_ms: row.try_get("first_seen")?,
        promoted_at_ms: row.try_get("promoted_at")?,
        halted_at_ms: row.try_get("halted_at")?,
        halt_reason: row.try_get("halt_reason")?,
    })
}

fn audit_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<AuditEntry, sqlx::Error> {
    Ok(AuditEntry {
        id: row.try_get("id")?,
        at_ms: row.try_get("at")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        detail: row.try_get("detail")?,
        result: row.try_get("result")?,
    })
}

/// Heartbeats per statement: three parameters each, well under SQLite's limit.
const HEARTBEAT_CHUNK: usize = 500;

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

super::rollouts::impl_rollout_store!(SqliteStore, sqlx::Sqlite);

#[async_trait]
impl Store for SqliteStore {
    async fn node_beat(&self, node_id: &str, address: &str, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO nodes (id, address, started_at, last_beat) VALUES (?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET last_beat = excluded.last_beat",
        )
        .bind(node_id)
        .bind(address)
        .bind(now_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn forget_sessions(&self) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET node_id = NULL WHERE node_id IS NOT NULL")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn claim_session(&self, agent_id: &str, node_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET node_id = ? WHERE id = ?")
            .bind(node_id)
            .bind(agent_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release_session(&self, agent_id: &str, node_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET node_id = NULL WHERE id = ? AND node_id = ?")
            .bind(agent_id)
            .bind(node_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn bootstrap_state(&self) -> StoreResult<BootstrapState> {
        let admins: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        let enrolls: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM enrollment_tokens WHERE revoked_at IS NULL")
                .fetch_one(&self.pool)
                .await?;
        Ok(BootstrapState {
            has_admin_token: admins > 0,
            has_enroll_token: enrolls > 0,
        })
    }

    async fn bootstrap(&self, pieces: &Bootstrap) -> StoreResult<BootstrapOutcome> {
        let now = crate::clock::now_ms();
        let mut outcome = BootstrapOutcome::default();
        let mut tx = self.pool.begin().await?;
        let client_id: Option<String> = sqlx::query_scalar("SELECT id FROM clients WHERE name = ?")
            .bind(DEFAULT_CLIENT)
            .fetch_optional(&mut *tx)
            .await?;
        let client_id = match client_id {
            Some(id) => id,
            None => {
                let id = new_id();
                sqlx::query("INSERT INTO clients (id, name, created_at) VALUES (?, ?, ?)")
                    .bind(&id)
                    .bind(DEFAULT_CLIENT)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                id
            }
        };
        let site_id: Option<String> =
            sqlx::query_scalar("SELECT id FROM sites WHERE client_id = ? AND name = ?")
                .bind(&client_id)
                .bind(DEFAULT_SITE)
                .fetch_optional(&mut *tx)
                .await?;
        let site_id = match site_id {
            Some(id) => id,
            None => {
                let id = new_id();
                sqlx::query(
                    "INSERT INTO sites (id, client_id, name, created_at) VALUES (?, ?, ?, ?)",
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
        let admins: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM api_tokens WHERE role = 'admin' AND revoked_at IS NULL",
        )
        .fetch_one(&mut *tx)
        .await?;
        if let (0, Some(hash)) = (admins, &pieces.admin_token_hash) {
            sqlx::query(
                "INSERT INTO api_tokens (id, name, role, token_hash, created_at) \
                 VALUES (?, 'bootstrap admin', 'admin', ?, ?)",
            )
            .bind(new_id())
            .bind(hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            outcome.created_admin_token = true;
        }
        let enrolls: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM enrollment_tokens WHERE revoked_at IS NULL")
                .fetch_one(&mut *tx)
                .await?;
        if let (0, Some(hash)) = (enrolls, &pieces.enroll_token_hash) {
            sqlx::query(
                "INSERT INTO enrollment_tokens (id, site_id, token_hash, created_at) \
                 VALUES (?, ?, ?, ?)",
            )
            .bind(new_id())
            .bind(&site_id)
            .bind(hash)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            outcome.created_enroll_token = true;
        }
        tx.commit().await?;
        Ok(outcome)
    }

    async fn api_token(&self, token_hash: &str) -> StoreResult<ApiToken> {
        let row = sqlx::query(
            "SELECT id, name, role, created_at, revoked_at FROM api_tokens \
             WHERE token_hash = ? AND revoked_at IS NULL",
        )
        .bind(token_hash)
        .fetch_one(&self.pool)
        .await?;
        Ok(token_from_row(&row)?)
    }

    async fn create_api_token(
        &self,
        name: &str,
        role: Role,
        token_hash: &str,
    ) -> StoreResult<ApiToken> {
        let row = sqlx::query(
            "INSERT INTO api_tokens (id, name, role, token_hash, created_at) VALUES (?, ?, ?, ?, ?) \
             RETURNING id, name, role, created_at, revoked_at",
        )
        .bind(new_id())
        .bind(name)
        .bind(role.as_str())
        .bind(token_hash)
        .bind(crate::clock::now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(token_from_row(&row)?)
    }

    async fn list_api_tokens(&self) -> StoreResult<Vec<ApiToken>> {
        let rows = sqlx::query(
            "SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(token_from_row).collect::<Result<_, _>>()?)
    }

    async fn revoke_api_token(&self, id: &str) -> StoreResult<()> {
        let done =
            sqlx::query("UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
                .bind(crate::clock::now_ms())
                .bind(id)
                .execute(&self.pool)
                .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn create_enrollment_token(
        &self,
        site_id: &str,
        token_hash: &str,
        expires_at_ms: Option<i64>,
        max_uses: Option<i64>,
    ) -> StoreResult<String> {
        let mut tx = self.pool.begin().await?;
        let _: String = sqlx::query_scalar("SELECT id FROM sites WHERE id = ?")
            .bind(site_id)
            .fetch_one(&mut *tx)
            .await?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, site_id, token_hash, created_at, expires_at, max_uses) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(site_id)
        .bind(token_hash)
        .bind(crate::clock::now_ms())
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
    ) -> StoreResult<Enrolled> {
        let mut tx = self.pool.begin().await?;
        // Counting the use in the same statement that checks the limits keeps two
        // enrollments from both taking the last use.
        let site_id: String = sqlx::query_scalar(&format!(
            "UPDATE enrollment_tokens SET uses = uses + 1 WHERE token_hash = ? AND {USABLE_TOKEN} \
             RETURNING site_id"
        ))
        .bind(enroll_token_hash)
        .bind(now_ms)
        .fetch_one(&mut *tx)
        .await?;
        let candidate = new_id();
        let agent_id: String = sqlx::query_scalar(
            "INSERT INTO agents (id, site_id, fingerprint, secret_hash, hostname, version, os, arch, \
                                 auto_update, enrolled_at, last_seen) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (site_id, fingerprint) DO UPDATE SET \
                 secret_hash = excluded.secret_hash, hostname = excluded.hostname, \
                 version = excluded.version, os = excluded.os, arch = excluded.arch, \
                 auto_update = excluded.auto_update, last_seen = excluded.last_seen \
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
        .bind(now_ms)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Enrolled {
            rebound: agent_id != candidate,
            agent_id,
        })
    }

    async fn enrollment_site(&self, enroll_token_hash: &str) -> StoreResult<String> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT site_id FROM enrollment_tokens WHERE token_hash = ? AND {USABLE_TOKEN}"
        ))
        .bind(enroll_token_hash)
        .bind(crate::clock::now_ms())
        .fetch_one(&self.pool)
        .await?)
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
        sqlx::query(
            "UPDATE agents SET hostname = ?, version = ?, os = ?, arch = ?, auto_update = ?, \
                 last_seen = ? WHERE id = ?",
        )
        .bind(&facts.hostname)
        .bind(&facts.version)
        .bind(&facts.os)
        .bind(&facts.arch)
        .bind(facts.auto_update)
        .bind(now_ms)
        .bind(agent_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn record_heartbeats(&self, batch: &[HeartbeatRecord]) -> StoreResult<()> {
        // One statement per few hundred agents rather than one per agent: a batch of
        // tens of thousands is a handful of statements.
        let mut tx = self.pool.begin().await?;
        for chunk in batch.chunks(HEARTBEAT_CHUNK) {
            let values = vec!["(?, ?, ?)"; chunk.len()].join(", ");
            let statement = format!(
                "UPDATE agents SET version = v.column2, last_seen = MAX(agents.last_seen, v.column3) \
                 FROM (VALUES {values}) AS v WHERE agents.id = v.column1"
            );
            let mut query = sqlx::query(&statement);
            for beat in chunk {
                query = query
                    .bind(&beat.agent_id)
                    .bind(&beat.version)
                    .bind(beat.at_ms);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let rows = sqlx::query(&format!("SELECT {AGENT_COLUMNS} ORDER BY a.hostname, a.id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(agent_from_row).collect::<Result<_, _>>()?)
    }

    async fn agent(&self, id: &str) -> StoreResult<AgentRecord> {
        let row = sqlx::query(&format!("SELECT {AGENT_COLUMNS} WHERE a.id = ?"))
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(agent_from_row(&row)?)
    }

    async fn list_clients(&self) -> StoreResult<Vec<Client>> {
        let rows = sqlx::query("SELECT id, name, channel, created_at FROM clients ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(client_from_row).collect::<Result<_, _>>()?)
    }

    async fn create_client(&self, name: &str) -> StoreResult<Client> {
        let row = sqlx::query(
            "INSERT INTO clients (id, name, created_at) VALUES (?, ?, ?) \
             RETURNING id, name, channel, created_at",
        )
        .bind(new_id())
        .bind(name)
        .bind(crate::clock::now_ms())
        .fetch_one(&self.pool)
        .await?;
        Ok(client_from_row(&row)?)
    }

    async fn list_sites(&self) -> StoreResult<Vec<Site>> {
        let rows = sqlx::query(
            "SELECT id, client_id, name, channel, created_at FROM sites ORDER BY client_id, name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(site_from_row).collect::<Result<_, _>>()?)
    }

    async fn create_site(&self, client_id: &str, name: &str) -> StoreResult<Site> {
        let mut tx = self.pool.begin().await?;
        let _: String = sqlx::query_scalar("SELECT id FROM clients WHERE id = ?")
            .bind(client_id)
            .fetch_one(&mut *tx)
            .await?;
        let row = sqlx::query(
            "INSERT INTO sites (id, client_id, name, created_at) VALUES (?, ?, ?, ?) \
             RETURNING id, client_id, name, channel, created_at",
        )
        .bind(new_id())
        .bind(client_id)
        .bind(name)
        .bind(crate::clock::now_ms())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(site_from_row(&row)?)
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
        let done = sqlx::query(&format!("UPDATE {table} SET channel = ? WHERE id = ?"))
            .bind(channel)
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn agents_under(&self, scope: ChannelScope, id: &str) -> StoreResult<Vec<String>> {
        let query = match scope {
            ChannelScope::Agent => "SELECT id FROM agents WHERE id = ?",
            ChannelScope::Site => "SELECT id FROM agents WHERE site_id = ?",
            ChannelScope::Client => {
                "SELECT a.id FROM agents a JOIN sites s ON s.id = a.site_id WHERE s.client_id = ?"
            }
        };
        Ok(sqlx::query_scalar(query)
            .bind(id)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn set_paused(&self, agent_id: &str, paused: bool) -> StoreResult<()> {
        let done = sqlx::query("UPDATE agents SET paused = ? WHERE id = ?")
            .bind(paused)
            .bind(agent_id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM settings WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn set_setting(&self, key: &str, value: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO settings (key, value) VALUES (?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn blocked_versions(&self) -> StoreResult<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT version FROM version_blocks ORDER BY version")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn create_tasks(
        &self,
        tasks: &[NewTask<'_>],
        now_ms: i64,
    ) -> StoreResult<Vec<Option<UpdateTask>>> {
        // One transaction and one statement per chunk: a promote dispatches to every
        // connected agent at once, and a statement per task would make the last agent
        // wait for all the others. The unique index on unfinished tasks turns a second
        // one for an agent into no row. Only the ids of the rows made come back (in any
        // order); the rest of each row is what was written.
        let ids: Vec<String> = tasks.iter().map(|_| new_id()).collect();
        let mut made = std::collections::HashSet::with_capacity(tasks.len());
        let mut tx = self.pool.begin().await?;
        for chunk in tasks
            .iter()
            .zip(&ids)
            .collect::<Vec<_>>()
            .chunks(TASKS_PER_STATEMENT)
        {
            let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO update_tasks (id, agent_id, from_version, to_version, os, arch, \
                     kind, status, attempts, created_at, updated_at, dispatched_at) ",
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
                    .push_bind(dispatched.then_some(now_ms));
            });
            insert.push(" ON CONFLICT DO NOTHING RETURNING id");
            let rows: Vec<String> = insert.build_query_scalar().fetch_all(&mut *tx).await?;
            made.extend(rows);
        }
        tx.commit().await?;
        Ok(tasks
            .iter()
            .zip(&ids)
            .map(|(task, id)| made.contains(id).then(|| task.made(id, now_ms)))
            .collect())
    }

    async fn active_task(&self, agent_id: &str) -> StoreResult<Option<UpdateTask>> {
        let row = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM update_tasks \
             WHERE agent_id = ? AND status IN {ACTIVE_STATUSES}"
        ))
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(task_from_row).transpose()?)
    }

    async fn failed_versions(&self, agent_id: &str) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT to_version FROM update_tasks \
             WHERE agent_id = ? AND status IN ('failed', 'rolled_back', 'timed_out')",
        )
        .bind(agent_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn stale_tasks(&self, cutoff_ms: i64) -> StoreResult<Vec<UpdateTask>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM update_tasks \
             WHERE status IN {ACTIVE_STATUSES} AND status <> 'queued' \
               AND MAX(created_at, COALESCE(dispatched_at, 0), COALESCE(progress_at, 0)) < ?"
        ))
        .bind(cutoff_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(task_from_row).collect::<Result<_, _>>()?)
    }

    async fn tasks_for_agent(&self, agent_id: &str, limit: i64) -> StoreResult<Vec<UpdateTask>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM update_tasks WHERE agent_id = ? \
             ORDER BY created_at DESC, rowid DESC LIMIT ?"
        ))
        .bind(agent_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(task_from_row).collect::<Result<_, _>>()?)
    }

    async fn record_dispatch(&self, task_id: &str, now_ms: i64) -> StoreResult<UpdateTask> {
        let row = sqlx::query(&format!(
            "UPDATE update_tasks SET status = 'dispatched', attempts = attempts + 1, \
                 dispatched_at = ?, updated_at = ? \
             WHERE id = ? AND status IN {ACTIVE_STATUSES} RETURNING {TASK_COLUMNS}"
        ))
        .bind(now_ms)
        .bind(now_ms)
        .bind(task_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(task_from_row(&row)?)
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
        let row = sqlx::query(&format!(
            "UPDATE update_tasks SET status = ?, bytes_done = ?, bytes_total = ?, \
                 progress_at = ?, updated_at = ? \
             WHERE id = ? AND agent_id = ? AND status IN {ACTIVE_STATUSES} \
             RETURNING {TASK_COLUMNS}"
        ))
        .bind(status.as_str())
        .bind(bytes_done)
        .bind(bytes_total)
        .bind(now_ms)
        .bind(now_ms)
        .bind(task_id)
        .bind(agent_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(task_from_row(&row)?)
    }

    async fn finish_task(
        &self,
        agent_id: &str,
        task_id: &str,
        status: TaskStatus,
        error: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<UpdateTask> {
        let row = sqlx::query(&format!(
            "UPDATE update_tasks SET status = ?, error = ?, updated_at = ? \
             WHERE id = ? AND agent_id = ? AND status IN {ACTIVE_STATUSES} \
             RETURNING {TASK_COLUMNS}"
        ))
        .bind(status.as_str())
        .bind(error)
        .bind(now_ms)
        .bind(task_id)
        .bind(agent_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(task_from_row(&row)?)
    }

    async fn record_first_seen(
        &self,
        builds: &[(String, String, String)],
        now_ms: i64,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for (version, os, arch) in builds {
            sqlx::query(
                "INSERT INTO builds (version, os, arch, first_seen) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (version, os, arch) DO NOTHING",
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
        let rows = sqlx::query(
            "SELECT version, os, arch, first_seen, promoted_at, halted_at, halt_reason FROM builds",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(rollout_from_row)
            .collect::<Result<_, _>>()?)
    }

    async fn task_counts(&self) -> StoreResult<Vec<TaskCount>> {
        let rows = sqlx::query(
            "SELECT to_version, os, arch, status, COUNT(*) AS tasks FROM update_tasks \
             GROUP BY to_version, os, arch, status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                Ok(TaskCount {
                    version: row.try_get("to_version")?,
                    os: row.try_get("os")?,
                    arch: row.try_get("arch")?,
                    status: TaskStatus::parse(&status).ok_or_else(|| {
                        sqlx::Error::Decode(format!("unknown task status {status:?}").into())
                    })?,
                    tasks: row.try_get("tasks")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn mark_promoted(&self, version: &str, now_ms: i64) -> StoreResult<()> {
        sqlx::query("UPDATE builds SET promoted_at = ? WHERE version = ?")
            .bind(now_ms)
            .bind(version)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn halt(
        &self,
        version: &str,
        os: &str,
        arch: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO builds (version, os, arch, first_seen, halted_at, halt_reason) \
             VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (version, os, arch) DO UPDATE SET halted_at = excluded.halted_at, \
                 halt_reason = excluded.halt_reason WHERE builds.halted_at IS NULL",
        )
        .bind(version)
        .bind(os)
        .bind(arch)
        .bind(now_ms)
        .bind(now_ms)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn resume(&self, version: &str, platform: Option<(&str, &str)>) -> StoreResult<u64> {
        let (os, arch) = platform.unzip();
        let done = sqlx::query(
            "UPDATE builds SET halted_at = NULL, halt_reason = NULL \
             WHERE version = ? AND halted_at IS NOT NULL \
               AND (? IS NULL OR os = ?) AND (? IS NULL OR arch = ?)",
        )
        .bind(version)
        .bind(os)
        .bind(os)
        .bind(arch)
        .bind(arch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn block_version(&self, version: &str, reason: &str, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO version_blocks (version, reason, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(version)
        .bind(reason)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn unblock_version(&self, version: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM version_blocks WHERE version = ?")
            .bind(version)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn cancel_tasks_to(
        &self,
        version: &str,
        reason: &str,
        now_ms: i64,
    ) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(&format!(
            "UPDATE update_tasks SET status = 'cancelled', error = ?, updated_at = ? \
             WHERE to_version = ? AND status IN {ACTIVE_STATUSES} RETURNING agent_id"
        ))
        .bind(reason)
        .bind(now_ms)
        .bind(version)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn record_version_snapshot(&self, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO version_snapshots (at, os, arch, version, agents) \
             SELECT ?, os, arch, version, COUNT(*) FROM agents GROUP BY os, arch, version \
             ON CONFLICT DO NOTHING",
        )
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn version_history(&self, since_ms: i64) -> StoreResult<Vec<VersionCount>> {
        let rows = sqlx::query(
            "SELECT at, os, arch, version, agents FROM version_snapshots WHERE at >= ? \
             ORDER BY at, os, arch, version",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row: &sqlx::sqlite::SqliteRow| {
                Ok(VersionCount {
                    at_ms: row.try_get("at")?,
                    os: row.try_get("os")?,
                    arch: row.try_get("arch")?,
                    version: row.try_get("version")?,
                    agents: row.try_get("agents")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    async fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, target, detail, result) VALUES (?, ?, ?, ?, ?, ?)",
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
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, detail, result FROM audit_log \
             WHERE (? IS NULL OR id < ?) AND (? IS NULL OR action = ?) ORDER BY id DESC LIMIT ?",
        )
        .bind(before)
        .bind(before)
        .bind(action)
        .bind(action)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(audit_from_row).collect::<Result<_, _>>()?)
    }
}
