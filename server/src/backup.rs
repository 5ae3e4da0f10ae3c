//! `drover-server backup FILE` and `drover-server restore FILE`: a consistent copy of the
//! SQLite database taken while the server runs, and a copy put back while it is stopped.
//! Also the lock a server holds on its SQLite database, which keeps a second server (and
//! a restore) off a database in use. PostgreSQL is backed up with `pg_dump` (README).

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::store::{Location, Snapshot, SqliteStore};

/// The lock file beside a SQLite database.
fn lock_path(database: &Path) -> PathBuf {
    PathBuf::from(format!("{}.lock", database.display()))
}

/// Takes the database's lock for as long as the returned file lives; `None` for
/// PostgreSQL, which several nodes share.
pub(crate) fn lock_database(location: &Location) -> anyhow::Result<Option<File>> {
    let Location::Sqlite(path) = location else {
        return Ok(None);
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("while creating {}", parent.display()))?;
    }
    let lock = lock_path(path);
    // Private like the database beside it (it holds nothing, but nobody else needs it).
    let mut options = File::options();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(&lock)
        .with_context(|| format!("while opening {}", lock.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another drover-server is running on the database {} (it holds {}); stop it first",
            path.display(),
            lock.display()
        ),
        Err(std::fs::TryLockError::Error(err)) => {
            Err(err).with_context(|| format!("while locking {}", lock.display()))
        }
    }
}

fn describe(snapshot: &Snapshot) -> String {
    format!(
        "{} agents, schema version {}, {} bytes",
        snapshot.agents, snapshot.schema_version, snapshot.bytes
    )
}

fn sqlite_only(location: &Location, verb: &str) -> anyhow::Result<PathBuf> {
    match location {
        Location::Sqlite(path) => Ok(path.clone()),
        Location::Postgres(_) => anyhow::bail!(
            "{verb} handles the SQLite database; for PostgreSQL use pg_dump and pg_restore \
             (README: Backups)"
        ),
    }
}

/// Copies the live database into `file`, which must not exist yet.
pub(crate) async fn backup(location: &Location, file: &Path) -> anyhow::Result<()> {
    let database = sqlite_only(location, "backup")?;
    anyhow::ensure!(
        !file.exists(),
        "{} exists already; choose a new file name",
        file.display()
    );
    let snapshot = SqliteStore::backup(&database, file).await?;
    sync_file_and_dir(file)?;
    println!(
        "backed up {} to {} ({})",
        location.shown(),
        file.display(),
        describe(&snapshot)
    );
    Ok(())
}

/// Puts the database in `file` in place of the server's, which must be stopped. The
/// database it replaces is kept beside it (`drover.db.before-restore-…`); a database
/// older than this server is migrated when the server next starts.
pub(crate) async fn restore(location: &Location, file: &Path) -> anyhow::Result<()> {
    let database = sqlite_only(location, "restore")?;
    let snapshot = SqliteStore::inspect(file).await?;
    let _lock = lock_database(location)
        .map_err(|err| anyhow::anyhow!("{err:#}; restore replaces the database under it"))?;
    let stamp = crate::clock::now_ms() / 1000;
    let mut kept = None;
    for suffix in ["", "-wal", "-shm"] {
        let current = PathBuf::from(format!("{}{suffix}", database.display()));
        if current.exists() {
            let aside = PathBuf::from(format!(
                "{}.before-restore-{stamp}{suffix}",
                database.display()
            ));
            std::fs::rename(&current, &aside)
                .with_context(|| format!("while moving {} aside", current.display()))?;
            if suffix.is_empty() {
                kept = Some(aside);
            }
        }
    }
    let staging = PathBuf::from(format!("{}.restoring", database.display()));
    std::fs::copy(file, &staging)
        .with_context(|| format!("while copying {} to {}", file.display(), staging.display()))?;
    File::open(&staging)?.sync_all()?;
    std::fs::rename(&staging, &database)
        .with_context(|| format!("while putting {} in place", database.display()))?;
    sync_file_and_dir(&database)?;
    println!(
        "restored {} from {} ({})",
        location.shown(),
        file.display(),
        describe(&snapshot)
    );
    if let Some(kept) = kept {
        println!("the database it replaced is kept as {}", kept.display());
    }
    Ok(())
}

/// Makes a written file and its directory entry durable.
fn sync_file_and_dir(file: &Path) -> anyhow::Result<()> {
    File::open(file)?.sync_all()?;
    if let Some(dir) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
