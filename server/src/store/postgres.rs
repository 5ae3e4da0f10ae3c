//! The PostgreSQL backend: a connection pool shared with other server nodes on the same
//! database, migrations from `migrations/postgres`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use super::queries::{Dialect, impl_queries};
use super::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

const MAX_CONNECTIONS: u32 = 16;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

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
        let applied: Option<i64> = sqlx::query_scalar(APPLIED_SCHEMA)
            .fetch_one(&pool)
            .await
            .ok()
            .flatten();
        refuse_newer_schema(applied, &MIGRATOR, &shown)?;
        migrate(&pool)
            .await
            .with_context(|| format!("while migrating the database {shown}"))?;
        let store = PostgresStore { pool };
        store
            .fill_version_keys()
            .await
            .with_context(|| format!("while keying the versions in {shown}"))?;
        Ok(store)
    }
}

/// How often a migration that lost a lock conflict is tried again.
const MIGRATION_ATTEMPTS: u32 = 5;

/// Applies the pending migrations. The migrator holds an advisory lock, so nodes
/// starting together migrate once. Nodes of the previous version may still be running
/// on the database (a rolling upgrade): a migration that loses a deadlock or a lock
/// wait to one of their transactions is rolled back whole, and is tried again.
///
/// Each attempt runs on a connection of its own, closed after it: a migration that
/// fails leaves the migrator's advisory lock held by its session, and on a connection
/// that went back to the pool the next attempt (on another connection) would wait for
/// that lock for ever, and so would every other node.
async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut attempt = 1;
    loop {
        let own = PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*pool.connect_options()).clone())
            .await?;
        let outcome = MIGRATOR.run(&own).await;
        // Ends the session, and with it any lock the attempt left held.
        own.close().await;
        match outcome {
            Err(err) if attempt < MIGRATION_ATTEMPTS && lost_a_lock_conflict(&err) => {
                tracing::warn!(%err, attempt, "a migration lost a lock conflict; trying again");
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt))).await;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Deadlock detected, lock not available, or a serialization failure.
fn lost_a_lock_conflict(err: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    let (MigrateError::Execute(err) | MigrateError::ExecuteMigration(err, _)) = err else {
        return false;
    };
    err.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|code| matches!(code.as_ref(), "40P01" | "55P03" | "40001"))
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

impl Dialect for PostgresStore {
    type Db = sqlx::Postgres;

    // Text is ordered by bytes to list things exactly as SQLite does, whatever the
    // database's locale.
    const BYTE_ORDER: &'static str = " COLLATE \"C\"";
    const GREATEST: &'static str = "GREATEST";
    const INSERTION_ORDER: &'static str = "seq";
    // Serializes first starts of several nodes on one empty database, which would
    // otherwise each create a default client and their own bootstrap tokens. The key is
    // 0x6472_6f76_6572_0001 ("drover", then 1).
    const BOOTSTRAP_LOCK: Option<&'static str> =
        Some("SELECT pg_advisory_xact_lock(7237970105436602369)");
    // Conflicts with the ROW EXCLUSIVE lock every INSERT takes, and not with reads. A
    // statement takes its snapshot after its locks, so an insert that waited here sees
    // the block and makes no task.
    const TASK_INSERTS_LOCK: Option<&'static str> =
        Some("LOCK TABLE update_tasks IN SHARE ROW EXCLUSIVE MODE");
    // The lock every refresh of targets' facts takes (migration 0015). Its own
    // statement: the insert after it takes its snapshot once the lock is held, so it
    // reads every change of an agent, site or client committed before.
    const TARGET_FACTS_LOCK: Option<&'static str> = Some("SELECT rollout_targets_facts_lock()");
    const BEGIN: &'static str = "BEGIN";
    const BULK_AS_JSON: bool = false;
}

impl_queries!(PostgresStore);

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
        let mut tx = super::queries::begin_write::<Self>(&self.pool).await?;
        // Locked so a re-enrollment on another node cannot replace the secret between the
        // check and the write (`NO KEY UPDATE`: references to the row do not wait).
        let stored: String =
            sqlx::query_scalar("SELECT secret_hash FROM agents WHERE id = $1 FOR NO KEY UPDATE")
                .bind(agent_id)
                .fetch_one(&mut *tx)
                .await?;
        if !crate::auth::hashes_equal(&stored, secret_hash) {
            return Err(StoreError::NotFound);
        }
        Self::record_hello(&mut *tx, agent_id, secret_hash, facts, now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn record_heartbeats(&self, batch: &[HeartbeatRecord]) -> StoreResult<()> {
        // Folded per agent as writing the batch in order would: the last version wins and
        // last_seen only moves forward.
        let mut newest: BTreeMap<&str, (&str, i64, Option<&str>)> = BTreeMap::new();
        for beat in batch {
            let shown = beat.shown_secret.as_deref();
            newest
                .entry(&beat.agent_id)
                .and_modify(|(version, at, was_shown)| {
                    *version = &beat.version;
                    *at = (*at).max(beat.at_ms);
                    *was_shown = was_shown.or(shown);
                })
                .or_insert((&beat.version, beat.at_ms, shown));
        }
        if newest.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = newest.keys().copied().collect();
        let versions: Vec<&str> = newest.values().map(|(version, _, _)| *version).collect();
        let ats: Vec<i64> = newest.values().map(|(_, at, _)| *at).collect();
        let shown: Vec<Option<&str>> = newest.values().map(|(_, _, shown)| *shown).collect();
        let keys: Vec<String> = versions
            .iter()
            .map(|v| super::version_key::version_key(v))
            .collect();
        let mut tx = super::queries::begin_write::<Self>(&self.pool).await?;
        // Rows are locked in id order (byte order, as session changes are written) so
        // two nodes writing overlapping batches, or a batch and the session changes,
        // wait for each other instead of deadlocking; `NO KEY UPDATE`, what the update
        // itself takes, so rows referenced meanwhile (a rollout's targets, tasks being
        // created, each holding a key share) neither wait for a batch nor block one.
        sqlx::query(
            "SELECT id FROM agents WHERE id = ANY($1) ORDER BY id COLLATE \"C\" FOR NO KEY UPDATE",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "UPDATE agents AS a SET version = b.version, version_key = b.version_key, \
                 last_seen = GREATEST(a.last_seen, b.at), {} \
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[]) \
                 AS b (id, version, at, version_key, shown) \
             WHERE a.id = b.id",
            super::queries::shown_secret("b.shown")
        ))
        .bind(&ids)
        .bind(&versions)
        .bind(&ats)
        .bind(&keys)
        .bind(&shown)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
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
