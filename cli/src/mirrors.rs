//! `drover mirror`: setting a site's or client's download mirror, the mirrors' health,
//! copying the offered builds to a directory a web server serves (`sync`), and checking
//! that a mirror holds every offered build with the right bytes (`check`).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use reqwest::Method;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::api::Api;
use crate::render::{MirrorList, MirrorSet, mirror_line, mirrors_view};
use crate::{ScopeOwner, show};

#[derive(Debug, Subcommand)]
pub(crate) enum MirrorAction {
    /// List every download mirror, who uses it, and its health over the last 24 hours
    List {
        /// Print the API's JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Send a site's or a client's agents to a mirror for their downloads (they verify
    /// its bytes and fall back to the server when it fails)
    Set {
        #[command(flatten)]
        owner: ScopeOwner,
        /// The mirror's base URL; a build's file name is appended to it
        url: String,
    },
    /// Remove a site's or client's mirror: its agents follow their client's mirror, the
    /// server-wide one, or download from the server
    Clear {
        #[command(flatten)]
        owner: ScopeOwner,
    },
    /// Copy every offered build and its sidecars (.sha256, .channel, .sig) into DIR, for
    /// a web server to serve as a mirror; builds already there with the right bytes are
    /// kept
    Sync {
        dir: PathBuf,
        /// Also remove builds (and their sidecars) in DIR that are no longer offered
        #[arg(long)]
        delete: bool,
    },
    /// Check that the mirror at URL serves every offered build with the right bytes;
    /// names each one missing or corrupted, and fails if any is
    Check { url: String },
}

pub(crate) fn run(action: MirrorAction, api: &Api) -> anyhow::Result<()> {
    match action {
        MirrorAction::List { json } => {
            show(api.get("/api/v1/mirrors")?, json, |list: MirrorList| {
                mirrors_view(&list)
            })
        }
        MirrorAction::Set { owner, url } => set(api, &owner, Some(&url)),
        MirrorAction::Clear { owner } => set(api, &owner, None),
        MirrorAction::Sync { dir, delete } => sync(api, &dir, delete),
        MirrorAction::Check { url } => check(api, &url),
    }
}

fn set(api: &Api, owner: &ScopeOwner, url: Option<&str>) -> anyhow::Result<()> {
    let (kind, id) = owner.kind_and_id();
    let path = format!("/api/v1/{kind}s/{id}/download-mirror");
    let answer = api.request(Method::PUT, &path, Some(&json!({ "url": url })))?;
    show(answer, false, |set: MirrorSet| mirror_line(kind, &set))
}

/// An offered build, as `GET /api/v1/releases` lists it.
#[derive(Debug, Deserialize)]
struct Offered {
    file: String,
    sha256: String,
    size: u64,
    channel: String,
    blocked: bool,
    signed: bool,
}

/// The builds agents may be sent: rolled-back ones are offered to nobody.
fn offered(api: &Api) -> anyhow::Result<Vec<Offered>> {
    let all: Vec<Offered> = serde_json::from_value(api.get("/api/v1/releases")?)
        .context("unexpected answer from the server")?;
    Ok(all.into_iter().filter(|r| !r.blocked).collect())
}

fn sync(api: &Api, dir: &Path, delete: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("while creating the mirror directory {}", dir.display()))?;
    let builds = offered(api)?;
    let (mut copied, mut kept, mut bytes) = (0, 0, 0u64);
    for build in &builds {
        let target = dir.join(&build.file);
        if hash_file(&target).ok().as_ref() == Some(&(build.size, build.sha256.clone())) {
            kept += 1;
        } else {
            let path = format!("/api/v1/releases/files/{}", build.file);
            let response = api.download(&path)?;
            let (size, digest) = write_atomically(&target, response)?;
            if (size, digest.as_str()) != (build.size, build.sha256.as_str()) {
                let _ = std::fs::remove_file(&target);
                bail!(
                    "{} arrived as {size} bytes hashing to {digest}, not the {} bytes the server offers; nothing of it was kept",
                    build.file,
                    build.size
                );
            }
            println!("copied {} ({} bytes)", build.file, build.size);
            copied += 1;
            bytes += build.size;
        }
        write_sidecar(
            dir,
            &build.file,
            "sha256",
            format!("{}\n", build.sha256).as_bytes(),
        )?;
        write_sidecar(
            dir,
            &build.file,
            "channel",
            format!("{}\n", build.channel).as_bytes(),
        )?;
        if build.signed {
            let document = api.download(&format!("/api/v1/releases/files/{}.sig", build.file))?;
            let document = document
                .bytes()
                .with_context(|| format!("while reading the signature of {}", build.file))?;
            write_sidecar(dir, &build.file, "sig", &document)?;
        }
    }
    let offered_files: BTreeSet<&str> = builds.iter().map(|b| b.file.as_str()).collect();
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let build = [".sha256", ".channel", ".sig"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(&name);
        if build.starts_with("drover-agent-") && !offered_files.contains(build) {
            stale.push(name);
        }
    }
    stale.sort();
    for name in &stale {
        if delete {
            std::fs::remove_file(dir.join(name))
                .with_context(|| format!("while removing {name}"))?;
            println!("removed {name} (no longer offered)");
        } else {
            println!("kept {name}: no longer offered (--delete removes it)");
        }
    }
    println!(
        "{}: {copied} builds copied ({bytes} bytes), {kept} already up to date",
        dir.display()
    );
    Ok(())
}

fn check(api: &Api, base: &str) -> anyhow::Result<()> {
    let base = base.trim_end_matches('/');
    let builds = offered(api)?;
    let mut problems = Vec::new();
    for build in &builds {
        let url = format!("{base}/{}", build.file);
        let verdict = match api.fetch_elsewhere(&url) {
            Err(err) => Err(format!("unreachable ({err})")),
            Ok(response) if response.status() == reqwest::StatusCode::NOT_FOUND => {
                Err("missing (404)".to_owned())
            }
            Ok(response) if !response.status().is_success() => {
                Err(format!("answered {}", response.status()))
            }
            Ok(response) => match hash_stream(response) {
                Err(err) => Err(format!("unreadable ({err:#})")),
                Ok((size, digest)) if size == build.size && digest == build.sha256 => Ok(()),
                Ok((size, digest)) => Err(format!(
                    "corrupted: {size} bytes hashing to {digest}, not {} bytes hashing to {}",
                    build.size, build.sha256
                )),
            },
        };
        match verdict {
            Ok(()) => println!("ok         {}", build.file),
            Err(why) => {
                println!("PROBLEM    {}: {why}", build.file);
                problems.push(build.file.clone());
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "{base} does not serve {} of {} offered builds correctly: {}",
            problems.len(),
            builds.len(),
            problems.join(", ")
        );
    }
    println!(
        "{base} serves all {} offered builds correctly",
        builds.len()
    );
    Ok(())
}

/// Size and lower-case hex SHA-256 of what `reader` yields.
fn hash_stream(mut reader: impl Read) -> anyhow::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            return Ok((size, hex::encode(hasher.finalize())));
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
}

fn hash_file(path: &Path) -> anyhow::Result<(u64, String)> {
    hash_stream(std::fs::File::open(path)?)
}

/// Writes `reader` to `target` through a temporary file in the same directory, hashing
/// as it goes; a web server never serves a half-written build.
fn write_atomically(target: &Path, mut reader: impl Read) -> anyhow::Result<(u64, String)> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("while creating a file in {}", dir.display()))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let read = reader
            .read(&mut buffer)
            .with_context(|| format!("while downloading {}", target.display()))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        temp.write_all(&buffer[..read])?;
        size += read as u64;
    }
    temp.as_file().sync_all()?;
    // Readable by the web server.
    set_readable(temp.path())?;
    temp.persist(target)
        .with_context(|| format!("while writing {}", target.display()))?;
    Ok((size, hex::encode(hasher.finalize())))
}

fn write_sidecar(dir: &Path, build: &str, suffix: &str, contents: &[u8]) -> anyhow::Result<()> {
    let path = dir.join(format!("{build}.{suffix}"));
    if std::fs::read(&path).ok().as_deref() == Some(contents) {
        return Ok(());
    }
    write_atomically(&path, contents).map(|_| ())
}

#[cfg(unix)]
fn set_readable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn set_readable(_: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_is_whole_readable_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("drover-agent-linux-amd64-1.0.0");
        let (size, digest) = write_atomically(&target, &b"test"[..]).unwrap();
        assert_eq!(
            (size, digest.as_str()),
            (
                4,
                "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
            )
        );
        assert_eq!(hash_file(&target).unwrap(), (size, digest));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
