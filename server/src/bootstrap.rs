//! First start: a default client and site, an admin API token and an enrollment token.
//! Tokens come from `DROVER_ADMIN_TOKEN` / `DROVER_ENROLL_TOKEN` when set; otherwise they
//! are generated and written (mode 0600) to files in the data directory, before the
//! database learns their hash, so a crash in between never leaves a token nobody knows.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::auth::{generate_secret, hash_secret};
use crate::store::{Bootstrap, Store, StoreError};

pub(crate) const ADMIN_TOKEN_FILE: &str = "admin-token";
/// Tokens an operator chooses must be at least this long: short ones can be guessed.
const MIN_TOKEN_CHARS: usize = 32;
pub(crate) const ENROLL_TOKEN_FILE: &str = "enroll-token";

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
    let outcome = store
        .bootstrap(&Bootstrap {
            admin_token_hash: admin_hash,
            enroll_token_hash: enroll_hash,
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
    Ok(Tokens { admin, enroll })
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
