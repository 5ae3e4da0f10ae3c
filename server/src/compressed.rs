//! Compressed copies of offered builds: one zstd file per build in the server's data
//! directory, named by the build's SHA-256, made once (off the async runtime) and served
//! by `downloads` beside the build. A copy is written to a temporary file and renamed,
//! so a killed server never leaves half a copy to serve; one found at start is checked
//! (decompressed and hashed) before it is offered. A build is offered compressed only
//! once its copy is ready, and only when the copy is smaller; why a copy could not be
//! made is kept for the releases API until a later attempt succeeds. `Job` also makes
//! the deltas `deltas` plans: the same zstd stream with an older build as its prefix.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::releases::{Release, Releases};

/// Bytes read and written per step, both ways.
const CHUNK: usize = 256 * 1024;

/// A build's compressed copy, ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Copy {
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    /// Lower-case hex SHA-256 of the copy's bytes.
    pub(crate) sha256: String,
}

/// What became of a build's copy.
#[derive(Debug, Clone)]
enum Made {
    Ready(Copy),
    /// Compressing made the build no smaller (or it changed since it was scanned): it
    /// is not compressed again at every change of the index.
    NotSmaller,
    /// Making it failed, for this reason; it is tried again at the next change of the
    /// index (or start).
    Failed(String),
}

/// What became of each build's copy, by SHA-256. Cheap to clone; empty when compressed
/// transfer is off.
#[derive(Clone, Default)]
pub(crate) struct Compressed {
    ready: Arc<RwLock<HashMap<String, Made>>>,
}

impl Compressed {
    fn made(&self, sha256: &str) -> Option<Made> {
        self.ready
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sha256)
            .cloned()
    }

    /// The copy of the build with this SHA-256, once it is ready.
    pub(crate) fn copy_of(&self, sha256: &str) -> Option<Copy> {
        match self.made(sha256)? {
            Made::Ready(copy) => Some(copy),
            Made::NotSmaller | Made::Failed(_) => None,
        }
    }

    /// Why the last attempt at the build's copy failed, while it has none.
    pub(crate) fn failure_of(&self, sha256: &str) -> Option<String> {
        match self.made(sha256)? {
            Made::Failed(reason) => Some(reason),
            Made::Ready(_) | Made::NotSmaller => None,
        }
    }

    /// Whether the build's copy was made, or found not worth making.
    fn done(&self, sha256: &str) -> bool {
        matches!(self.made(sha256), Some(Made::Ready(_) | Made::NotSmaller))
    }

    /// Stops offering a copy (it changed on disk since it was made); the next change
    /// of the index, or the next start, makes it again.
    pub(crate) fn forget(&self, sha256: &str) {
        self.ready
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sha256);
    }

    /// Makes the copies of every offered build in `dir` at `level`, one at a time, now
    /// and whenever the index changes, until `shutdown`.
    pub(crate) fn start(
        dir: PathBuf,
        level: i32,
        downloads: PathBuf,
        releases: Releases,
        shutdown: CancellationToken,
    ) -> Compressed {
        let compressed = Compressed::default();
        let worker = compressed.clone();
        tokio::spawn(async move {
            let mut changes = releases.subscribe();
            loop {
                let releases = releases.current();
                worker
                    .make_missing(&dir, level, &downloads, &releases.releases, &shutdown)
                    .await;
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = shutdown.cancelled() => return,
                }
            }
        });
        compressed
    }

    async fn make_missing(
        &self,
        dir: &Path,
        level: i32,
        downloads: &Path,
        releases: &[Release],
        shutdown: &CancellationToken,
    ) {
        let wanted: HashSet<String> = releases.iter().map(|r| r.sha256.clone()).collect();
        self.ready
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|sha256, _| wanted.contains(sha256));
        for release in releases {
            if self.done(&release.sha256) {
                continue;
            }
            if shutdown.is_cancelled() {
                return;
            }
            let job = Job {
                dir: dir.to_owned(),
                level,
                build: downloads.join(&release.file),
                sha256: release.sha256.clone(),
                size: release.size,
                base: None,
                stop: shutdown.clone(),
            };
            let file = release.file.clone();
            let made = match in_background(job).await {
                Ok(Some(copy)) => Made::Ready(copy),
                Ok(None) => Made::NotSmaller,
                Err(err) => {
                    let reason = format!("{err:#}");
                    tracing::warn!(%file, error = %reason, "could not make the compressed copy; the build is served as it is");
                    Made::Failed(reason)
                }
            };
            self.ready
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(release.sha256.clone(), made);
        }
        let dir = dir.to_owned();
        let _ = tokio::task::spawn_blocking(move || prune(&dir, &wanted)).await;
    }
}

/// Runs `job` off the async runtime.
pub(crate) async fn in_background(job: Job) -> anyhow::Result<Option<Copy>> {
    tokio::task::spawn_blocking(move || job.run())
        .await
        .map_err(|err| anyhow::anyhow!("compressing stopped: {err}"))?
}

/// One build to find or make a copy of, or a delta to it.
pub(crate) struct Job {
    pub(crate) dir: PathBuf,
    pub(crate) level: i32,
    pub(crate) build: PathBuf,
    pub(crate) sha256: String,
    pub(crate) size: u64,
    /// For a delta, the build it starts from: the zstd prefix both sides hold.
    pub(crate) base: Option<Base>,
    /// A server shutting down does not wait for a copy: the temporary file is dropped.
    pub(crate) stop: CancellationToken,
}

/// The file a delta to the build with SHA-256 `build` from the one with `base` is kept
/// in: named by the digests it joins.
pub(crate) fn delta_file(build: &str, base: &str) -> String {
    format!("{build}.from-{base}.zst")
}

/// The build a delta starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Base {
    pub(crate) path: PathBuf,
    pub(crate) sha256: String,
    pub(crate) size: u64,
}

impl Base {
    /// The build's bytes, if they are still what was scanned.
    fn read(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let bytes = std::fs::read(&self.path)?;
        let same =
            bytes.len() as u64 == self.size && hex::encode(Sha256::digest(&bytes)) == self.sha256;
        Ok(same.then_some(bytes))
    }
}

impl Job {
    /// Where the copy (or the delta) is kept: named by the digests it joins.
    pub(crate) fn path(&self) -> PathBuf {
        match &self.base {
            None => self.dir.join(format!("{}.zst", self.sha256)),
            Some(base) => self.dir.join(delta_file(&self.sha256, &base.sha256)),
        }
    }

    /// The copy: the one on disk if it still decompresses to the build, else a new one.
    /// `None` when compressing saves nothing, the build (or the base) changed since it
    /// was scanned (it has another SHA-256 now), or the server is stopping.
    pub(crate) fn run(&self) -> anyhow::Result<Option<Copy>> {
        std::fs::create_dir_all(&self.dir)?;
        let prefix = match &self.base {
            Some(base) => match base.read()? {
                Some(bytes) => Some(bytes),
                None => return Ok(None),
            },
            None => None,
        };
        let path = self.path();
        if path.exists() {
            match check(&path, &self.sha256, self.size, prefix.as_deref()) {
                Ok(copy) => return Ok(Some(copy)),
                Err(err) => {
                    tracing::warn!(copy = %path.display(), error = %format!("{err:#}"), "the compressed copy is not the build's; making it again");
                    std::fs::remove_file(&path)?;
                }
            }
        }
        let started = Instant::now();
        let mut source = std::fs::File::open(&self.build)?;
        let mut temp = tempfile::Builder::new()
            .prefix(".making-")
            .suffix(".zst.tmp")
            .tempfile_in(&self.dir)?;
        let mut hashed = Hashing::new(temp.as_file_mut());
        let mut encoder = match &prefix {
            None => zstd::stream::write::Encoder::new(&mut hashed, self.level)?,
            Some(prefix) => {
                let mut encoder =
                    zstd::stream::write::Encoder::with_ref_prefix(&mut hashed, self.level, prefix)?;
                // Matches as far back as the base's start, found across its length.
                encoder.window_log(protocol::delta_window_log(prefix.len() as u64, self.size))?;
                encoder.long_distance_matching(true)?;
                encoder
            }
        };
        encoder.include_contentsize(true)?;
        encoder.set_pledged_src_size(Some(self.size))?;
        let mut build_digest = Sha256::new();
        let mut read = 0u64;
        let mut buffer = vec![0; CHUNK];
        loop {
            let n = source.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            if self.stop.is_cancelled() {
                return Ok(None);
            }
            read += n as u64;
            if read > self.size {
                break;
            }
            build_digest.update(&buffer[..n]);
            encoder.write_all(&buffer[..n])?;
        }
        if read != self.size || hex::encode(build_digest.finalize()) != self.sha256 {
            // Changed since the scan; the scanner judges it again.
            return Ok(None);
        }
        encoder.finish()?;
        let (size, sha256) = hashed.finish();
        if size >= self.size {
            tracing::info!(build = %self.build.display(), "compressing does not make this build smaller; it is served as it is");
            return Ok(None);
        }
        temp.as_file().sync_all()?;
        temp.persist(&path)?;
        sync_dir(&self.dir)?;
        tracing::info!(
            build = %self.build.display(),
            base = self.base.as_ref().map(|b| b.path.display().to_string()),
            size = self.size,
            compressed = size,
            level = self.level,
            ms = started.elapsed().as_millis() as u64,
            "{} made",
            if self.base.is_some() { "delta" } else { "compressed copy" }
        );
        Ok(Some(Copy { path, size, sha256 }))
    }
}

/// A copy (or with its base's bytes as `prefix`, a delta) found on disk, if it
/// decompresses to exactly the build's bytes.
fn check(
    path: &Path,
    build_sha256: &str,
    build_size: u64,
    prefix: Option<&[u8]>,
) -> anyhow::Result<Copy> {
    let file = std::fs::File::open(path)?;
    let mut reader = Hashing::new(file);
    let mut decoded = Sha256::new();
    let mut total = 0u64;
    {
        let mut decoder = match prefix {
            None => zstd::stream::read::Decoder::new(&mut reader)?,
            Some(prefix) => {
                let mut decoder = zstd::stream::read::Decoder::with_ref_prefix(
                    std::io::BufReader::new(&mut reader),
                    prefix,
                )?;
                decoder
                    .window_log_max(protocol::delta_window_log(prefix.len() as u64, build_size))?;
                decoder
            }
        };
        let mut buffer = vec![0; CHUNK];
        loop {
            let n = decoder.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            total += n as u64;
            anyhow::ensure!(total <= build_size, "it holds more than the build");
            decoded.update(&buffer[..n]);
        }
    }
    // Whatever the decoder did not need still counts toward the copy's digest.
    std::io::copy(&mut reader, &mut std::io::sink())?;
    anyhow::ensure!(
        total == build_size && hex::encode(decoded.finalize()) == build_sha256,
        "it does not decompress to the build"
    );
    let (size, sha256) = reader.finish();
    Ok(Copy {
        path: path.to_owned(),
        size,
        sha256,
    })
}

/// Removes copies of builds no longer offered, and temporary files a killed server left.
fn prune(dir: &Path, wanted: &HashSet<String>) {
    prune_but(dir, |name| {
        name.strip_suffix(".zst")
            .is_some_and(|sha256| wanted.contains(sha256))
    });
}

/// Removes every file in `dir` whose name `keep` does not want.
pub(crate) fn prune_but(dir: &Path, keep: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep = keep(&name);
        if !keep && let Err(err) = std::fs::remove_file(entry.path()) {
            tracing::warn!(file = %name, %err, "could not remove an old compressed copy");
        }
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Counts and hashes the bytes that pass through it, read or written.
struct Hashing<T> {
    inner: T,
    digest: Sha256,
    bytes: u64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            digest: Sha256::new(),
            bytes: 0,
        }
    }

    fn passed(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
        self.bytes += bytes.len() as u64;
    }

    fn finish(self) -> (u64, String) {
        (self.bytes, hex::encode(self.digest.finalize()))
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.passed(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.passed(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dir: &Path, build: &[u8]) -> Job {
        let path = dir.join("drover-agent-linux-amd64-1.0.0");
        std::fs::write(&path, build).unwrap();
        Job {
            dir: dir.join("compressed"),
            level: 3,
            build: path,
            sha256: hex::encode(Sha256::digest(build)),
            size: build.len() as u64,
            base: None,
            stop: CancellationToken::new(),
        }
    }

    #[test]
    fn a_copy_is_made_once_and_checked_when_found() {
        let dir = tempfile::tempdir().unwrap();
        let build: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let job = job(dir.path(), &build);
        let copy = job.run().unwrap().unwrap();
        assert!(copy.size < build.len() as u64 / 4, "{copy:?}");
        let bytes = std::fs::read(&copy.path).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), copy.sha256);
        assert_eq!(zstd::decode_all(&bytes[..]).unwrap(), build);
        // Found again: the same copy, not made anew.
        assert_eq!(job.run().unwrap().unwrap(), copy);
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(&job.dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");

        // A copy that is not the build's any more is made again.
        std::fs::write(
            &copy.path,
            zstd::encode_all(&b"other bytes"[..], 3).unwrap(),
        )
        .unwrap();
        assert_eq!(job.run().unwrap().unwrap(), copy);
        std::fs::write(&copy.path, b"garbage").unwrap();
        assert_eq!(job.run().unwrap().unwrap(), copy);
    }

    #[test]
    fn a_delta_rebuilds_the_build_from_its_base_and_is_checked_when_found() {
        let dir = tempfile::tempdir().unwrap();
        // A build that compresses poorly, and its next version: a few bytes changed.
        let base: Vec<u8> = (0..400_000).map(|_| rand::random::<u8>()).collect();
        let mut build = base.clone();
        build[1000..1016].copy_from_slice(b"version 1.0.1...");
        build.extend_from_slice(b"and a little more code");
        let base_path = dir.path().join("drover-agent-linux-amd64-0.9.0");
        std::fs::write(&base_path, &base).unwrap();
        let mut job = job(dir.path(), &build);
        job.base = Some(Base {
            path: base_path.clone(),
            sha256: hex::encode(Sha256::digest(&base)),
            size: base.len() as u64,
        });
        let delta = job.run().unwrap().unwrap();
        assert!(delta.size < 1000, "{delta:?}");
        assert_eq!(job.path(), delta.path);
        let bytes = std::fs::read(&delta.path).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), delta.sha256);
        let mut rebuilt = Vec::new();
        let mut decoder =
            zstd::stream::read::Decoder::with_ref_prefix(&bytes[..], &base[..]).unwrap();
        decoder.window_log_max(30).unwrap();
        std::io::copy(&mut decoder, &mut rebuilt).unwrap();
        assert_eq!(rebuilt, build);
        // Found again: the same delta, checked against the base.
        assert_eq!(job.run().unwrap().unwrap(), delta);
        // A delta that does not rebuild the build is made again.
        std::fs::write(&delta.path, b"garbage").unwrap();
        assert_eq!(job.run().unwrap().unwrap(), delta);
        // A base that changed since the scan gives no delta.
        std::fs::write(&base_path, &build).unwrap();
        assert_eq!(job.run().unwrap(), None);
    }

    #[test]
    fn a_shutdown_abandons_a_copy_half_made() {
        let dir = tempfile::tempdir().unwrap();
        let job = job(dir.path(), &[1; 1 << 20]);
        job.stop.cancel();
        assert_eq!(job.run().unwrap(), None);
        assert!(std::fs::read_dir(&job.dir).unwrap().next().is_none());
    }

    #[tokio::test]
    async fn a_build_that_does_not_compress_is_tried_once() {
        let dir = tempfile::tempdir().unwrap();
        let release = |file: &str, bytes: &[u8]| {
            std::fs::write(dir.path().join(file), bytes).unwrap();
            Release {
                version: semver::Version::new(1, 0, 0),
                os: "linux".into(),
                arch: "amd64".into(),
                channel: crate::releases::Channel::Stable,
                sha256: hex::encode(Sha256::digest(bytes)),
                size: bytes.len() as u64,
                file: file.into(),
                signature: None,
            }
        };
        let noise: Vec<u8> = (0..50_000).map(|_| rand::random::<u8>()).collect();
        let releases = [
            release("drover-agent-linux-amd64-1.0.0", &noise),
            release("drover-agent-linux-arm64-1.0.0", &[7; 100_000]),
        ];
        let compressed = Compressed::default();
        let stop = CancellationToken::new();
        let copies = dir.path().join("compressed");
        compressed
            .make_missing(&copies, 3, dir.path(), &releases, &stop)
            .await;
        let (noise_sha, zeros_sha) = (&releases[0].sha256, &releases[1].sha256);
        assert!(compressed.copy_of(zeros_sha).is_some());
        assert_eq!(compressed.copy_of(noise_sha), None, "served as it is");
        assert!(
            compressed.done(noise_sha),
            "not compressed again at the next change"
        );
        compressed.forget(zeros_sha);
        assert!(!compressed.done(zeros_sha), "made again at the next change");
    }

    #[test]
    fn nothing_is_offered_for_a_changed_or_incompressible_build() {
        let dir = tempfile::tempdir().unwrap();
        let mut changed = job(dir.path(), &[7; 100_000]);
        changed.sha256 = "00".repeat(32);
        assert_eq!(changed.run().unwrap(), None);
        let noise: Vec<u8> = (0..50_000).map(|_| rand::random::<u8>()).collect();
        assert_eq!(job(dir.path(), &noise).run().unwrap(), None);
        // Nothing is left behind to serve or to clear up.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("compressed"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");

        // A copy of a build no longer offered, and a killed server's temporary file, go.
        let compressed = dir.path().join("compressed");
        std::fs::write(compressed.join(format!("{}.zst", "ab".repeat(32))), b"old").unwrap();
        std::fs::write(compressed.join(".making-x.zst.tmp"), b"half").unwrap();
        std::fs::write(compressed.join(format!("{}.zst", "cd".repeat(32))), b"kept").unwrap();
        prune(&compressed, &HashSet::from(["cd".repeat(32)]));
        let left: Vec<_> = std::fs::read_dir(&compressed)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [format!("{}.zst", "cd".repeat(32))]);
    }
}
