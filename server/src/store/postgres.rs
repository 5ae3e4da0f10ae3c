//! The PostgreSQL backend: a connection pool shared with other server nodes on the same
//! database, migrations from `migrations/postgres`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Row};

use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

const DEFAULT_CLIENT: &str = "default";
const DEFAULT_SITE: &str = "default";

const MAX_CONNECTIONS: u32 = 16;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serializes first starts of several nodes on one empty database, which would otherwise
/// each create a default client and their own bootstrap tokens.
const BOOTSTRAP_LOCK: i64 = 0x6472_6f76_6572_0001;

/// The LISTEN/NOTIFY channel server nodes talk on.
const CHANNEL: &str = "drover_nodes";

struct Listener(PgListener);

#[async_trait]
impl Subscription for Listener {
    async fn next(&mut self) -> StoreResult<Option<String>> {
        // `try_recv` answers `None` once after a lost connection, which it re-establishes
        // on the next call: the caller re-syncs then.
        Ok(self
            .0
            .try_recv()
            .await?
            .map(|notification| notification.payload().to_owned()))
    }
}

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> anyhow::Result<PostgresStore> {
        let shown = redact_password(url);
        let options = PgConnectOptions::from_str(url)
            .with_context(|| format!("while reading the database URL {shown}"))?;
        let pool = match PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await
        {
            Ok(pool) => pool,
            Err(sqlx::Error::PoolTimedOut) => {
                // The pool retries until its timeout and then hides why; one more plain
                // attempt says what is wrong.
                let why = match PgConnection::connect_with(&options).await {
                    Ok(_) => format!("no connection within {}s", ACQUIRE_TIMEOUT.as_secs()),
                    Err(err) => err.to_string(),
                };
                anyhow::bail!("could not open the database {shown}: {why}");
            }
            Err(err) => {
                return Err(err).with_context(|| format!("while opening the database {shown}"));
            }
        };
        // The migrator holds an advisory lock, so nodes starting together migrate once.
        MIGRATOR
            .run(&pool)
            .await
            .with_context(|| format!("while migrating the database {shown}"))?;
        Ok(PostgresStore { pool })
    }
}

/// `url` with the password (in the user info or a `password` parameter) replaced, so it
/// can be printed and logged.
pub(crate) fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    if query.is_empty() {
        return format!("{scheme}://{authority}{tail}");
    }
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, format!("#{fragment}")),
        None => (query, String::new()),
    };
    let query = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some(("password", _)) => "password=***".to_owned(),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    format!("{scheme}://{authority}{path}?{query}{fragment}")
}

const AGENT_COLUMNS: &str = "a.id, a.site_id, a.fingerprint, a.hostname, a.version, a.os, a.arch, \
     a.paused, a.auto_update, a.enrolled_at, a.last_seen, \
     a.channel AS agent_channel, s.channel AS site_channel, c.channel AS client_channel, \
     a.node_id, n.last_beat AS node_last_beat \
     FROM agents a JOIN sites s ON s.id = a.site_id JOIN clients c ON c.id = s.client_id \
     LEFT JOIN nodes n ON n.id = a.node_id";

fn agent_from_row(row: &PgRow) -> Result<AgentRecord, sqlx::Error> {
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

fn task_from_row(row: &PgRow) -> Result<UpdateTask, sqlx::Error> {
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

fn client_from_row(row: &PgRow) -> Result<Client, sqlx::Error> {
    Ok(Client {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        channel: row.try_get("channel")?,
        created_at_ms: row.try_get("created_at")?,
    })
}

fn site_from_row(row: &PgRow) -> Result<Site, sqlx::Error> {
    Ok(Site {
        id: row.try_get("id")?,
        client_id: row.try_get("client_id")?,
        name: row.try_get("name")?,
        channel: row.try_get("channel")?,
        created_at_ms: row.try_get("created_at")?,
    })
}

/// An enrollment token that is not revoked, expired (binds now as `$2`) or used up.
const USABLE_TOKEN: &str = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $2) \
     AND (max_uses IS NULL OR uses < max_uses)";

fn token_from_row(row: &PgRow) -> Result<ApiToken, sqlx::Error> {
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

fn rollout_from_row(row: &PgRow) -> Result<RolloutRecord, sqlx::Error> {
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

fn audit_from_row(row: &PgRow) -> Result<AuditEntry, sqlx::Error> {
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

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

// Text is ordered `COLLATE "C"` (byte order) to list things exactly as SQLite does,
// whatever the database's locale.
super::rollouts::impl_rollout_store!(PostgresStore, sqlx::Postgres);

#[async_trait]
impl Store for PostgresStore {
    async fn publish(&self, message: &str) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(message)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn subscribe(&self) -> StoreResult<Option<Box<dyn Subscription>>> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(Box::new(Listener(listener))))
    }

    async fn node_beat(&self, node_id: &str, address: &str, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO nodes (id, address, started_at, last_beat) VALUES ($1, $2, $3, $4) \
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
        sqlx::query("UPDATE agents SET node_id = $1 WHERE id = $2")
            .bind(node_id)
            .bind(agent_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn release_session(&self, agent_id: &str, node_id: &str) -> StoreResult<()> {
        sqlx::query("UPDATE agents SET node_id = NULL WHERE id = $1 AND node_id = $2")
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
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(BOOTSTRAP_LOCK)
            .execute(&mut *tx)
            .await?;
        let client_id: Option<String> =
            sqlx::query_scalar("SELECT id FROM clients WHERE name = $1")
                .bind(DEFAULT_CLIENT)
                .fetch_optional(&mut *tx)
                .await?;
        let client_id = match client_id {
            Some(id) => id,
            None => {
                let id = new_id();
                sqlx::query("INSERT INTO clients (id, name, created_at) VALUES ($1, $2, $3)")
                    .bind(&id)
                    .bind(DEFAULT_CLIENT)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                id
            }
        };
        let site_id: Option<String> =
            sqlx::query_scalar("SELECT id FROM sites WHERE client_id = $1 AND name = $2")
                .bind(&client_id)
                .bind(DEFAULT_SITE)
                .fetch_optional(&mut *tx)
                .await?;
        let site_id = match site_id {
            Some(id) => id,
            None => {
                let id = new_id();
                sqlx::query(
                    "INSERT INTO sites (id, client_id, name, created_at) VALUES ($1, $2, $3, $4)",
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
                 VALUES ($1, 'bootstrap admin', 'admin', $2, $3)",
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
                 VALUES ($1, $2, $3, $4)",
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
             WHERE token_hash = $1 AND revoked_at IS NULL",
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
            "INSERT INTO api_tokens (id, name, role, token_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5) \
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
            "SELECT id, name, role, created_at, revoked_at FROM api_tokens \
             ORDER BY created_at, id COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(token_from_row).collect::<Result<_, _>>()?)
    }

    async fn revoke_api_token(&self, id: &str) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
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
        let _: String = sqlx::query_scalar("SELECT id FROM sites WHERE id = $1")
            .bind(site_id)
            .fetch_one(&mut *tx)
            .await?;
        let id = new_id();
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, site_id, token_hash, created_at, expires_at, max_uses) \
             VALUES ($1, $2, $3, $4, $5, $6)",
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
        // enrollments from both taking the last use: the second waits for the first's row
        // lock and then re-checks the limits against the counted use.
        let site_id: String = sqlx::query_scalar(&format!(
            "UPDATE enrollment_tokens SET uses = uses + 1 WHERE token_hash = $1 AND {USABLE_TOKEN} \
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10) \
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
            "SELECT site_id FROM enrollment_tokens WHERE token_hash = $1 AND {USABLE_TOKEN}"
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
        let mut tx = self.pool.begin().await?;
        // Locked so a re-enrollment on another node cannot replace the secret between the
        // check and the write.
        let stored: String =
            sqlx::query_scalar("SELECT secret_hash FROM agents WHERE id = $1 FOR UPDATE")
                .bind(agent_id)
                .fetch_one(&mut *tx)
                .await?;
        if !crate::auth::hashes_equal(&stored, secret_hash) {
            return Err(StoreError::NotFound);
        }
        sqlx::query(
            "UPDATE agents SET hostname = $1, version = $2, os = $3, arch = $4, \
                 auto_update = $5, last_seen = $6 WHERE id = $7",
        )
        .bind(&facts.hostname)
        .bind(&facts.version)
        .bind(&facts.os)
        .bind(&facts.arch)
        .bind(facts.auto_update)
        .bind(now_ms)
        .bind(agent_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_heartbeats(&self, batch: &[HeartbeatRecord]) -> StoreResult<()> {
        // Folded per agent as writing the batch in order would: the last version wins and
        // last_seen only moves forward.
        let mut newest: BTreeMap<&str, (&str, i64)> = BTreeMap::new();
        for beat in batch {
            newest
                .entry(&beat.agent_id)
                .and_modify(|(version, at)| {
                    *version = &beat.version;
                    *at = (*at).max(beat.at_ms);
                })
                .or_insert((&beat.version, beat.at_ms));
        }
        if newest.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = newest.keys().copied().collect();
        let versions: Vec<&str> = newest.values().map(|(version, _)| *version).collect();
        let ats: Vec<i64> = newest.values().map(|(_, at)| *at).collect();
        let mut tx = self.pool.begin().await?;
        // Rows are locked in id order so two nodes writing overlapping batches wait for
        // each other instead of deadlocking.
        sqlx::query("SELECT id FROM agents WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE agents AS a SET version = b.version, last_seen = GREATEST(a.last_seen, b.at) \
             FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS b (id, version, at) \
             WHERE a.id = b.id",
        )
        .bind(&ids)
        .bind(&versions)
        .bind(&ats)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_agents(&self) -> StoreResult<Vec<AgentRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} ORDER BY a.hostname COLLATE \"C\", a.id COLLATE \"C\""
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(agent_from_row).collect::<Result<_, _>>()?)
    }

    async fn agent(&self, id: &str) -> StoreResult<AgentRecord> {
        let row = sqlx::query(&format!("SELECT {AGENT_COLUMNS} WHERE a.id = $1"))
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok(agent_from_row(&row)?)
    }

    async fn list_clients(&self) -> StoreResult<Vec<Client>> {
        let rows = sqlx::query(
            "SELECT id, name, channel, created_at FROM clients ORDER BY name COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(client_from_row).collect::<Result<_, _>>()?)
    }

    async fn create_client(&self, name: &str) -> StoreResult<Client> {
        let row = sqlx::query(
            "INSERT INTO clients (id, name, created_at) VALUES ($1, $2, $3) \
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
            "SELECT id, client_id, name, channel, created_at FROM sites \
             ORDER BY client_id COLLATE \"C\", name COLLATE \"C\"",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(site_from_row).collect::<Result<_, _>>()?)
    }

    async fn create_site(&self, client_id: &str, name: &str) -> StoreResult<Site> {
        let mut tx = self.pool.begin().await?;
        let _: String = sqlx::query_scalar("SELECT id FROM clients WHERE id = $1")
            .bind(client_id)
            .fetch_one(&mut *tx)
            .await?;
        let row = sqlx::query(
            "INSERT INTO sites (id, client_id, name, created_at) VALUES ($1, $2, $3, $4) \
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
        let done = sqlx::query(&format!("UPDATE {table} SET channel = $1 WHERE id = $2"))
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
            ChannelScope::Agent => "SELECT id FROM agents WHERE id = $1",
            ChannelScope::Site => "SELECT id FROM agents WHERE site_id = $1",
            ChannelScope::Client => {
                "SELECT a.id FROM agents a JOIN sites s ON s.id = a.site_id WHERE s.client_id = $1"
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
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
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

    async fn blocked_versions(&self) -> StoreResult<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT version FROM version_blocks ORDER BY version COLLATE \"C\"")
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
            let mut insert = sqlx::QueryBuilder::<sqlx::Postgres>::new(
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
             WHERE agent_id = $1 AND status IN {ACTIVE_STATUSES}"
        ))
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(task_from_row).transpose()?)
    }

    async fn failed_versions(&self, agent_id: &str) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT to_version FROM update_tasks \
             WHERE agent_id = $1 AND status IN ('failed', 'rolled_back', 'timed_out')",
        )
        .bind(agent_id)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn stale_tasks(&self, cutoff_ms: i64) -> StoreResult<Vec<UpdateTask>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM update_tasks \
             WHERE status IN {ACTIVE_STATUSES} AND status <> 'queued' \
               AND GREATEST(created_at, COALESCE(dispatched_at, 0), COALESCE(progress_at, 0)) < $1"
        ))
        .bind(cutoff_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(task_from_row).collect::<Result<_, _>>()?)
    }

    async fn tasks_for_agent(&self, agent_id: &str, limit: i64) -> StoreResult<Vec<UpdateTask>> {
        let rows = sqlx::query(&format!(
            "SELECT {TASK_COLUMNS} FROM update_tasks WHERE agent_id = $1 \
             ORDER BY created_at DESC, seq DESC LIMIT $2"
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
                 dispatched_at = $1, updated_at = $1 \
             WHERE id = $2 AND status IN {ACTIVE_STATUSES} RETURNING {TASK_COLUMNS}"
        ))
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
            "UPDATE update_tasks SET status = $1, error = $2, updated_at = $3 \
             WHERE id = $4 AND agent_id = $5 AND status IN {ACTIVE_STATUSES} \
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
        // Inserted in one order on every node, so two nodes recording the same new builds
        // wait for each other instead of deadlocking on the primary key.
        let mut builds: Vec<&(String, String, String)> = builds.iter().collect();
        builds.sort();
        builds.dedup();
        let mut tx = self.pool.begin().await?;
        for (version, os, arch) in builds {
            sqlx::query(
                "INSERT INTO builds (version, os, arch, first_seen) VALUES ($1, $2, $3, $4) \
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
        sqlx::query("UPDATE builds SET promoted_at = $1 WHERE version = $2")
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
             VALUES ($1, $2, $3, $4, $4, $5) \
             ON CONFLICT (version, os, arch) DO UPDATE SET halted_at = excluded.halted_at, \
                 halt_reason = excluded.halt_reason WHERE builds.halted_at IS NULL",
        )
        .bind(version)
        .bind(os)
        .bind(arch)
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
             WHERE version = $1 AND halted_at IS NOT NULL \
               AND ($2::text IS NULL OR os = $2) AND ($3::text IS NULL OR arch = $3)",
        )
        .bind(version)
        .bind(os)
        .bind(arch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn block_version(&self, version: &str, reason: &str, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO version_blocks (version, reason, created_at) VALUES ($1, $2, $3) \
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
        let done = sqlx::query("DELETE FROM version_blocks WHERE version = $1")
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
            "UPDATE update_tasks SET status = 'cancelled', error = $1, updated_at = $2 \
             WHERE to_version = $3 AND status IN {ACTIVE_STATUSES} RETURNING agent_id"
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
             SELECT $1, os, arch, version, COUNT(*) FROM agents GROUP BY os, arch, version \
             ON CONFLICT DO NOTHING",
        )
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn version_history(&self, since_ms: i64) -> StoreResult<Vec<VersionCount>> {
        let rows = sqlx::query(
            "SELECT at, os, arch, version, agents FROM version_snapshots WHERE at >= $1 \
             ORDER BY at, os, arch, version",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row: &PgRow| {
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
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, detail, result FROM audit_log \
             WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR action = $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(before)
        .bind(action)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(audit_from_row).collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        for (url, shown) in [
            (
                "postgres://postgres@127.0.0.1:5432/drover",
                "postgres://postgres@127.0.0.1:5432/drover",
            ),
            (
                "postgres://drover:s3cr%40t@db.example:5432/drover",
                "postgres://drover:***@db.example:5432/drover",
            ),
            (
                "postgresql://drover:pw@db/drover?sslmode=require&password=pw2",
                "postgresql://drover:***@db/drover?sslmode=require&password=***",
            ),
            (
                "postgresql:///drover?host=/run/postgresql&password=x#top",
                "postgresql:///drover?host=/run/postgresql&password=***#top",
            ),
            ("postgres://drover:pw@db", "postgres://drover:***@db"),
            ("postgres:drover", "postgres:drover"),
        ] {
            assert_eq!(redact_password(url), shown, "{url}");
        }
    }
}
