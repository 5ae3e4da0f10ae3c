//! First start: a default client and site, an admin API token and an enrollment token.
//! Tokens come from `DROVER_ADMIN_TOKEN` / `DROVER_ENROLL_TOKEN` when set; otherwise they
//! are generated and written (mode 0600) to files in the data directory, before the
//! database learns their hash, so a crash in between never leaves a token nobody knows.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::auth::{generate_secret, hash_secret};
use crate::clock::{now_ms, rfc3339};
use crate::store::{Bootstrap, EnrollmentToken, Store, StoreError};

pub(crate) const ADMIN_TOKEN_FILE: &str = "admin-token";
/// Tokens an operator chooses must be at least this long: short ones can be guessed.
const MIN_TOKEN_CHARS: usize = 32;
pub(crate) const ENROLL_TOKEN_FILE: &str = "enroll-token";
/// How long the bootstrap enrollment token enrolls: long enough to install the first
/// machines, not forever (`drover sites enroll-token` makes more).
pub(crate) const BOOTSTRAP_ENROLL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where an operator finds a bootstrap token; printed at startup.
pub(crate) enum TokenSource {
    File(PathBuf),
    Environment(&'static str),
    /// Created earlier without a file (from the environment), or its file was removed.
    Existing,
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::File(path) => write!(f, "{}", path.display()),
            TokenSource::Environment(var) => write!(f, "from {var}"),
            TokenSource::Existing => write!(f, "created on first start (not stored in a file)"),
        }
    }
}

pub(crate) struct Tokens {
    pub(crate) admin: TokenSource,
    pub(crate) enroll: TokenSource,
    /// Whether the first enrollment token still enrolls, and until when.
    pub(crate) enroll_validity: String,
}

/// What the startup banner says of the first enrollment token at `now_ms`.
fn validity(token: Option<&EnrollmentToken>, now_ms: i64) -> String {
    let Some(token) = token else {
        return "none".to_owned();
    };
    let more = "make more with `drover sites enroll-token SITE`";
    match (token.state(now_ms), token.expires_at_ms) {
        ("usable", Some(at)) => format!("expires {}", rfc3339(at)),
        ("usable", None) => format!("never expires: revoke it once agents are enrolled; {more}"),
        ("expired", Some(at)) => format!("expired {}; {more}", rfc3339(at)),
        (state, _) => format!("{}; {more}", state.replace('_', " ")),
    }
}

pub(crate) async fn first_start(store: &dyn Store, data_dir: &Path) -> anyhow::Result<Tokens> {
    let existing = store.bootstrap_state().await?;
    let (admin, admin_hash) = token(
        existing.has_admin_token,
        "DROVER_ADMIN_TOKEN",
        "drv_admin_",
        &data_dir.join(ADMIN_TOKEN_FILE),
    )?;
    let (enroll, enroll_hash) = token(
        existing.has_enroll_token,
        "DROVER_ENROLL_TOKEN",
        "drv_enroll_",
        &data_dir.join(ENROLL_TOKEN_FILE),
    )?;
    let now = now_ms();
    let expires_at = now.saturating_add(BOOTSTRAP_ENROLL_TTL.as_millis() as i64);
    let outcome = store
        .bootstrap(&Bootstrap {
            admin_token_hash: admin_hash,
            enroll_token_hash: enroll_hash,
            enroll_token_expires_at_ms: Some(expires_at),
        })
        .await
        .context("while creating the default client, site and tokens")?;
    if outcome.created_site {
        tracing::info!("created the default client and site");
    }
    if existing.has_admin_token
        && let Ok(value) = std::env::var("DROVER_ADMIN_TOKEN")
        && matches!(
            store.api_token(&hash_secret(&value)).await,
            Err(StoreError::NotFound)
        )
    {
        tracing::warn!(
            "DROVER_ADMIN_TOKEN is ignored: it only sets the admin token on first start, and this database has one"
        );
    }
    let first = if outcome.created_enroll_token {
        store.bootstrap_state().await?.first_enroll_token
    } else {
        existing.first_enroll_token
    };
    Ok(Tokens {
        admin,
        enroll,
        enroll_validity: validity(first.as_ref(), now),
    })
}

/// Decides one bootstrap token: the environment's, a new generated one written to `file`,
/// or (when the database has one) whatever file says where it is.
fn token(
    exists: bool,
    var: &'static str,
    prefix: &str,
    file: &Path,
) -> anyhow::Result<(TokenSource, Option<String>)> {
    if exists {
        let source = if file.exists() {
            TokenSource::File(file.to_owned())
        } else if std::env::var_os(var).is_some() {
            TokenSource::Environment(var)
        } else {
            TokenSource::Existing
        };
        return Ok((source, None));
    }
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => {
            let length = value.trim().chars().count();
            anyhow::ensure!(
                length >= MIN_TOKEN_CHARS,
                "{var} is {length} characters long; a token must have at least \
                 {MIN_TOKEN_CHARS} (for example `openssl rand -hex 32`), or leave {var} unset \
                 to have one generated"
            );
            Ok((
                TokenSource::Environment(var),
                Some(hash_secret(value.trim())),
            ))
        }
        _ => {
            let value = generate_secret(prefix);
            write_private(file, &value)?;
            Ok((
                TokenSource::File(file.to_owned()),
                Some(hash_secret(&value)),
            ))
        }
    }
}

/// Writes `contents` to `path` atomically with mode 0600: temporary file, fsync, rename,
/// fsync of the directory.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("while creating a file in {}", dir.display()))?;
    writeln!(file, "{contents}")?;
    file.as_file().sync_all()?;
    file.persist(path)
        .with_context(|| format!("while writing {}", path.display()))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(expires_at_ms: Option<i64>, max_uses: Option<i64>, uses: i64) -> EnrollmentToken {
        EnrollmentToken {
            id: "e1".into(),
            site_id: "s1".into(),
            created_at_ms: 0,
            expires_at_ms,
            max_uses,
            uses,
            revoked_at_ms: None,
        }
    }

    #[test]
    fn the_banner_says_whether_the_first_enrollment_token_still_enrolls() {
        let day = 86_400_000;
        assert_eq!(
            validity(Some(&token(Some(day), None, 0)), 0),
            "expires 1970-01-02T00:00:00.000Z"
        );
        assert!(validity(Some(&token(Some(day), None, 0)), day).starts_with("expired 1970-01-02"));
        assert!(validity(Some(&token(None, Some(1), 1)), 0).starts_with("used up; make more"));
        assert!(validity(Some(&token(None, None, 0)), 0).starts_with("never expires"));
        let revoked = EnrollmentToken {
            revoked_at_ms: Some(1),
            ..token(None, None, 0)
        };
        assert!(validity(Some(&revoked), 5).starts_with("revoked; make more"));
        assert_eq!(validity(None, 0), "none");
    }
}
