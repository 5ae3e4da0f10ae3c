//! Reads the downloads directory into a `ReleaseIndex`, hashing only builds that changed
//! since the last scan.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use protocol::release_signature::ReleaseSignature;
use sha2::{Digest, Sha256};

use super::{Channel, Release, ReleaseIndex, Skipped};

const PREFIX: &str = "drover-agent-";
const OSES: [&str; 3] = ["linux", "windows", "macos"];
const ARCHES: [&str; 2] = ["amd64", "arm64"];
const SIDECARS: [&str; 3] = [".sha256", ".channel", ".sig"];
/// The directory ships a README for operators; it is not a build.
const README: &str = "README.md";
/// Stands for the directory itself when it cannot be read.
const DIRECTORY: &str = ".";
/// Sidecars are a few bytes; anything larger is not one.
const SIDECAR_LIMIT: u64 = 4096;
/// A file hashed within this long of its last change is hashed again next time: equal
/// timestamps cannot prove equal content while the filesystem's clock (1 s on some NFS
/// servers, 2 s on FAT) has not moved on since the change.
const SETTLE: Duration = Duration::from_secs(5);

const NO_MATCH: &str = "name does not match drover-agent-{os}-{arch}-{version}";
const EXE_NOT_WINDOWS: &str = ".exe suffix is only for windows builds";
const NOT_REGULAR: &str = "not a regular file";
/// Links are never followed: one could publish any file the server can read.
const SYMLINK: &str =
    "a symbolic link: builds and sidecars must be regular files in the downloads directory";
const NO_CHECKSUM: &str = "no .sha256 checksum file";
const BAD_CHECKSUM: &str = "checksum file is not a sha256 digest";
const BAD_SIGNATURE: &str = "bad signature file";
const UNSIGNED: &str = "unsigned build and signatures are required";
const ORPHAN_SIDECAR: &str = "sidecar without a build";
const SKIPPED_SIDECAR: &str = "sidecar of a skipped build";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanOptions {
    /// Channel of a build whose `.channel` is absent or says neither `stable` nor `beta`.
    pub(crate) default_channel: Channel,
    /// Refuse builds without a `.sig`.
    pub(crate) require_signatures: bool,
}

impl Default for ScanOptions {
    fn default() -> ScanOptions {
        ScanOptions {
            default_channel: Channel::Stable,
            require_signatures: false,
        }
    }
}

/// Scans one directory, remembering digests between scans. Blocking: run it off the
/// async runtime.
#[derive(Debug)]
pub(crate) struct Scanner {
    dir: PathBuf,
    options: ScanOptions,
    cache: HashMap<String, Hashed>,
    settle: Duration,
    /// Files actually read and hashed, so tests can see the cache at work.
    #[cfg(test)]
    hashed: usize,
}

#[derive(Debug, Clone)]
struct Hashed {
    stamp: Stamp,
    digest: String,
}

/// What must stay equal for a cached digest to stand for the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    modified: Option<SystemTime>,
    /// Status change time and inode catch `cp -p` and renames, which can keep size and
    /// mtime while bringing other bytes.
    #[cfg(unix)]
    changed: Option<SystemTime>,
    #[cfg(unix)]
    inode: (u64, u64),
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        Stamp {
            size: meta.len(),
            modified: meta.modified().ok(),
            #[cfg(unix)]
            changed: u64::try_from(meta.ctime()).ok().and_then(|secs| {
                let nanos = u32::try_from(meta.ctime_nsec()).ok()?;
                SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
            }),
            #[cfg(unix)]
            inode: (meta.dev(), meta.ino()),
        }
    }

    fn settled(&self, at: SystemTime, settle: Duration) -> bool {
        #[cfg(unix)]
        let latest = self.modified.max(self.changed);
        #[cfg(not(unix))]
        let latest = self.modified;
        latest
            .and_then(|t| t.checked_add(settle))
            .is_some_and(|t| t <= at)
    }
}

/// The parts of a build's file name.
#[derive(Debug)]
struct BuildName {
    os: &'static str,
    arch: &'static str,
    version: semver::Version,
}

impl Scanner {
    pub(crate) fn new(dir: PathBuf, options: ScanOptions) -> Scanner {
        Scanner {
            dir,
            options,
            cache: HashMap::new(),
            settle: SETTLE,
            #[cfg(test)]
            hashed: 0,
        }
    }

    /// Reads the directory once; hashes only files whose size or mtime changed since
    /// the last scan. Sidecars are read every time.
    pub(crate) fn scan(&mut self) -> ReleaseIndex {
        let mut skipped = Vec::new();
        let files = match self.regular_files(&mut skipped) {
            Ok(files) => files,
            Err(err) => {
                self.cache.clear();
                return ReleaseIndex::new(Vec::new(), vec![skip(DIRECTORY, unreadable(err))]);
            }
        };

        let mut builds = Vec::new();
        let mut sidecars = Vec::new();
        for name in &files {
            if let Some(base) = sidecar_base(name) {
                sidecars.push((name, base));
                continue;
            }
            match parse_name(name) {
                Ok(build) => builds.push((name, build)),
                Err(reason) => skipped.push(skip(name, reason)),
            }
        }

        let mut releases = Vec::new();
        let mut first_of: BTreeMap<(&str, &str, semver::Version), &str> = BTreeMap::new();
        for (name, build) in builds {
            let key = (build.os, build.arch, build.version.clone());
            let release = match self.verify(name, build, &files) {
                Ok(release) => release,
                Err(reason) => {
                    skipped.push(skip(name, reason));
                    continue;
                }
            };
            // `files` is sorted, so the first by name wins.
            if let Some(first) = first_of.get(&key) {
                skipped.push(skip(name, format!("duplicate of {first}")));
                continue;
            }
            first_of.insert(key, name);
            releases.push(release);
        }
        self.cache.retain(|name, _| files.contains(name));

        for (name, base) in sidecars {
            if releases.iter().any(|r| r.file == base) {
                continue;
            }
            let reason = if files.contains(base) && sidecar_base(base).is_none() {
                SKIPPED_SIDECAR
            } else {
                ORPHAN_SIDECAR
            };
            skipped.push(skip(name, reason));
        }
        ReleaseIndex::new(releases, skipped)
    }

    /// Names of the regular files (or links to them) worth looking at, in name order;
    /// everything else that is not ignored goes to `skipped`.
    fn regular_files(&self, skipped: &mut Vec<Skipped>) -> io::Result<BTreeSet<String>> {
        let mut files = BTreeSet::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = match entry {
                Ok(entry) => entry,
                Err(err) => {
                    skipped.push(skip(DIRECTORY, unreadable(err)));
                    continue;
                }
            };
            let name = match entry.file_name().into_string() {
                Ok(name) => name,
                Err(raw) => {
                    let lossy = raw.to_string_lossy().into_owned();
                    if !ignored(&lossy) {
                        skipped.push(skip(&lossy, "name is not valid UTF-8"));
                    }
                    continue;
                }
            };
            if ignored(&name) {
                continue;
            }
            let regular = match entry.file_type() {
                Ok(kind) if kind.is_symlink() => {
                    skipped.push(skip(&name, SYMLINK));
                    continue;
                }
                Ok(kind) => Ok(kind.is_file()),
                Err(err) => Err(err),
            };
            match regular {
                Ok(true) => {
                    files.insert(name);
                }
                Ok(false) => skipped.push(skip(&name, NOT_REGULAR)),
                Err(err) => skipped.push(skip(&name, unreadable(err))),
            }
        }
        Ok(files)
    }

    /// Checks a well-named build against its sidecars; the error is the skip reason.
    fn verify(
        &mut self,
        name: &str,
        build: BuildName,
        files: &BTreeSet<String>,
    ) -> Result<Release, String> {
        let sidecar = |suffix: &str| {
            let sidecar = format!("{name}{suffix}");
            files.contains(&sidecar).then_some(sidecar)
        };

        let checksum = sidecar(".sha256").ok_or(NO_CHECKSUM)?;
        let expected = self
            .read_sidecar(&checksum)?
            .and_then(|text| parse_checksum(&text))
            .ok_or(BAD_CHECKSUM)?;

        let signature = match sidecar(".sig") {
            Some(sig) => {
                let bytes = self
                    .read_sidecar(&sig)?
                    .ok_or_else(|| format!("{BAD_SIGNATURE}: larger than {SIDECAR_LIMIT} bytes"))?;
                Some(signature_for(&bytes, &build)?)
            }
            None if self.options.require_signatures => return Err(UNSIGNED.to_string()),
            None => None,
        };

        let channel = match sidecar(".channel") {
            Some(file) => self
                .read_sidecar(&file)?
                .and_then(|bytes| Channel::parse(String::from_utf8_lossy(&bytes).trim()))
                .unwrap_or(self.options.default_channel),
            None => self.options.default_channel,
        };

        let (size, digest) = self.digest(name).map_err(unreadable)?;
        if digest != expected {
            // The file's own digest is not shown: it would tell anyone reading the skip
            // reasons the hash of whatever the file holds.
            return Err(format!(
                "checksum mismatch: the file does not hash to the .sha256 digest {expected}"
            ));
        }
        Ok(Release {
            version: build.version,
            os: build.os.to_string(),
            arch: build.arch.to_string(),
            channel,
            sha256: digest,
            size,
            file: name.to_string(),
            signature,
        })
    }

    /// The sidecar's bytes, or `None` when it is too large to be one.
    fn read_sidecar(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        let read = || -> io::Result<Vec<u8>> {
            let mut bytes = Vec::new();
            File::open(self.dir.join(name))?
                .take(SIDECAR_LIMIT + 1)
                .read_to_end(&mut bytes)?;
            Ok(bytes)
        };
        match read() {
            Ok(bytes) if bytes.len() as u64 > SIDECAR_LIMIT => Ok(None),
            Ok(bytes) => Ok(Some(bytes)),
            Err(err) => Err(format!("unreadable: {name}: {err}")),
        }
    }

    /// Size and lower-case hex digest of a build, from the cache when its stamp is
    /// unchanged.
    fn digest(&mut self, name: &str) -> io::Result<(u64, String)> {
        let mut file = File::open(self.dir.join(name))?;
        let before = Stamp::of(&file.metadata()?);
        if let Some(cached) = self.cache.get(name)
            && cached.stamp == before
        {
            return Ok((before.size, cached.digest.clone()));
        }

        let started = SystemTime::now();
        let (size, digest) = hash(&mut file)?;
        #[cfg(test)]
        {
            self.hashed += 1;
        }
        let after = Stamp::of(&file.metadata()?);
        if before == after && before.size == size && before.settled(started, self.settle) {
            let digest = digest.clone();
            self.cache.insert(
                name.to_string(),
                Hashed {
                    stamp: before,
                    digest,
                },
            );
        } else {
            self.cache.remove(name);
        }
        Ok((size, digest))
    }
}

fn hash(file: &mut File) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 256 * 1024];
    let mut size = 0;
    loop {
        let read = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        };
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

fn ignored(name: &str) -> bool {
    name == README || name.starts_with('.')
}

/// The build a sidecar belongs to. A version whose pre-release ends in `.sig`,
/// `.sha256` or `.channel` therefore cannot name a build.
fn sidecar_base(name: &str) -> Option<&str> {
    SIDECARS
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|base| !base.is_empty())
}

/// Splits `drover-agent-{os}-{arch}-{version}[.exe]`. The version may contain `-`, so os
/// and arch come off the front.
fn parse_name(name: &str) -> Result<BuildName, String> {
    let rest = name.strip_prefix(PREFIX).ok_or(NO_MATCH)?;
    let (rest, exe) = match rest.strip_suffix(".exe") {
        Some(rest) => (rest, true),
        None => (rest, false),
    };
    let (os, rest) = rest.split_once('-').ok_or(NO_MATCH)?;
    let (arch, version) = rest.split_once('-').ok_or(NO_MATCH)?;
    let known_os = OSES.into_iter().find(|known| *known == os);
    let known_arch = ARCHES.into_iter().find(|known| *known == arch);
    match (known_os, known_arch, semver::Version::parse(version)) {
        (Some(os), Some(arch), Ok(version)) => {
            if exe && os != "windows" {
                return Err(EXE_NOT_WINDOWS.to_string());
            }
            Ok(BuildName { os, arch, version })
        }
        // One wrong part reads as a typo worth naming; more than one is some other file,
        // such as a per-site build `drover-agent-site-<uuid>-...`.
        (None, Some(_), Ok(_)) => Err(format!("unknown os {os:?}")),
        (Some(_), None, Ok(_)) => Err(format!("unknown arch {arch:?}")),
        (Some(_), Some(_), Err(_)) => Err(format!("version {version:?} is not strict semver")),
        _ => Err(NO_MATCH.to_string()),
    }
}

/// A bare digest, or one line as `sha256sum` writes it: `<hex>  <name>` or
/// `<hex> *<name>`, with a leading `\` when the name was escaped.
fn parse_checksum(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.lines().count() != 1 {
        return None;
    }
    let text = text.strip_prefix('\\').unwrap_or(text);
    let digest = text.split_whitespace().next()?;
    let well_formed = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
    well_formed.then(|| digest.to_ascii_lowercase())
}

/// The build's signature document, rendered canonically. The server holds no key and
/// judges no signature (agents do); it only refuses a document it cannot read or one
/// that names another build, which is a misplaced or stale sidecar.
fn signature_for(bytes: &[u8], build: &BuildName) -> Result<String, String> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| format!("{BAD_SIGNATURE}: not UTF-8 text"))?;
    let document =
        ReleaseSignature::parse(text).map_err(|err| format!("{BAD_SIGNATURE}: {err}"))?;
    let signed = &document.release;
    let named = (build.version.to_string(), build.os, build.arch);
    if (
        signed.version.as_str(),
        signed.os.as_str(),
        signed.arch.as_str(),
    ) != (named.0.as_str(), named.1, named.2)
    {
        return Err(format!(
            "{BAD_SIGNATURE}: it signs {} {}/{}, the file name says {} {}/{}",
            signed.version, signed.os, signed.arch, named.0, named.1, named.2
        ));
    }
    Ok(document.render())
}

fn skip(file: &str, reason: impl Into<String>) -> Skipped {
    Skipped {
        file: file.to_string(),
        reason: reason.into(),
    }
}

fn unreadable(err: io::Error) -> String {
    format!("unreadable: {err}")
}

#[cfg(test)]
mod tests {
    use std::fs::FileTimes;
    use std::path::Path;

    use super::*;

    enum Entry {
        /// A file with text in which `{sha:X}`, `{SHA:X}` and `{sig:XX}` are expanded.
        Text(&'static str, &'static str),
        Bytes(&'static str, &'static [u8]),
        Dir(&'static str),
        Link(&'static str, &'static str),
    }
    use Entry::{Bytes, Dir, Link, Text};

    struct Offer {
        file: &'static str,
        os: &'static str,
        arch: &'static str,
        version: &'static str,
        channel: Channel,
        signature: Option<&'static str>,
    }

    const fn offer(
        file: &'static str,
        os: &'static str,
        arch: &'static str,
        version: &'static str,
        channel: Channel,
    ) -> Offer {
        Offer {
            file,
            os,
            arch,
            version,
            channel,
            signature: None,
        }
    }

    const fn signed(offer: Offer, signature: &'static str) -> Offer {
        Offer {
            signature: Some(signature),
            ..offer
        }
    }

    struct Case {
        name: &'static str,
        entries: &'static [Entry],
        default_channel: Channel,
        require_signatures: bool,
        offered: &'static [Offer],
        /// File and reason; a reason ending in `*` matches as a prefix.
        skipped: &'static [(&'static str, &'static str)],
    }

    const CASE: Case = Case {
        name: "",
        entries: &[],
        default_channel: Channel::Stable,
        require_signatures: false,
        offered: &[],
        skipped: &[],
    };

    const STABLE: Channel = Channel::Stable;
    const BETA: Channel = Channel::Beta;

    const CASES: &[Case] = &[
        Case {
            name: "bare digest",
            entries: &[
                Text("drover-agent-linux-amd64-1.0.0", "one"),
                Text("drover-agent-linux-amd64-1.0.0.sha256", "{sha:one}\n"),
            ],
            offered: &[offer(
                "drover-agent-linux-amd64-1.0.0",
                "linux",
                "amd64",
                "1.0.0",
                STABLE,
            )],
            ..CASE
        },
        Case {
            name: "sha256sum formats and upper-case hex",
            entries: &[
                Text("drover-agent-linux-amd64-1.0.0", "text mode"),
                Text(
                    "drover-agent-linux-amd64-1.0.0.sha256",
                    "{sha:text mode}  drover-agent-linux-amd64-1.0.0\n",
                ),
                Text("drover-agent-linux-arm64-1.0.0", "binary mode"),
                Text(
                    "drover-agent-linux-arm64-1.0.0.sha256",
                    "{sha:binary mode} *downloads/drover-agent-linux-arm64-1.0.0\n",
                ),
                Text("drover-agent-macos-arm64-1.0.0", "upper"),
                Text("drover-agent-macos-arm64-1.0.0.sha256", "{SHA:upper}"),
                Text("drover-agent-macos-amd64-1.0.0", "escaped"),
                Text(
                    "drover-agent-macos-amd64-1.0.0.sha256",
                    "\\{sha:escaped}  odd\\nname\n",
                ),
            ],
            offered: &[
                offer(
                    "drover-agent-linux-amd64-1.0.0",
                    "linux",
                    "amd64",
                    "1.0.0",
                    STABLE,
                ),
                offer(
                    "drover-agent-linux-arm64-1.0.0",
                    "linux",
                    "arm64",
                    "1.0.0",
                    STABLE,
                ),
                offer(
                    "drover-agent-macos-amd64-1.0.0",
                    "macos",
                    "amd64",
                    "1.0.0",
                    STABLE,
                ),
                offer(
                    "drover-agent-macos-arm64-1.0.0",
                    "macos",
                    "arm64",
                    "1.0.0",
                    STABLE,
                ),
            ],
            ..CASE
        },
        Case {
            name: "pre-release and build metadata",
            entries: &[
                Text("drover-agent-linux-arm64-1.2.0-beta.1", "beta one"),
                Text(
                    "drover-agent-linux-arm64-1.2.0-beta.1.sha256",
                    "{sha:beta one}",
                ),
                Text("drover-agent-linux-arm64-1.2.0-beta.1.channel", "beta\n"),
                Text("drover-agent-macos-arm64-2.0.0-rc.1+build.7", "rc"),
                Text(
                    "drover-agent-macos-arm64-2.0.0-rc.1+build.7.sha256",
                    "{sha:rc}",
                ),
            ],
            offered: &[
                offer(
                    "drover-agent-linux-arm64-1.2.0-beta.1",
                    "linux",
                    "arm64",
                    "1.2.0-beta.1",
                    BETA,
                ),
                offer(
                    "drover-agent-macos-arm64-2.0.0-rc.1+build.7",
                    "macos",
                    "arm64",
                    "2.0.0-rc.1+build.7",
                    STABLE,
                ),
            ],
            ..CASE
        },
        Case {
            name: "channel sidecar with a stable default",
            entries: &[
                Text("drover-agent-linux-amd64-1.0.0", "a"),
                Text("drover-agent-linux-amd64-1.0.0.sha256", "{sha:a}"),
                Text("drover-agent-linux-amd64-1.0.0.channel", "  beta \n"),
                Text("drover-agent-linux-amd64-1.1.0", "b"),
                Text("drover-agent-linux-amd64-1.1.0.sha256", "{sha:b}"),
                Text("drover-agent-linux-amd64-1.1.0.channel", "Beta"),
                Text("drover-agent-linux-amd64-1.2.0", "c"),
                Text("drover-agent-linux-amd64-1.2.0.sha256", "{sha:c}"),
                Text("drover-agent-linux-amd64-1.2.0.channel", ""),
            ],
            offered: &[
                offer(
                    "drover-agent-linux-amd64-1.2.0",
                    "linux",
                    "amd64",
                    "1.2.0",
                    STABLE,
                ),
                offer(
                    "drover-agent-linux-amd64-1.1.0",
                    "linux",
                    "amd64",
                    "1.1.0",
                    STABLE,
                ),
                offer(
                    "drover-agent-linux-amd64-1.0.0",
                    "linux",
                    "amd64",
                    "1.0.0",
                    BETA,
                ),
            ],
            ..CASE
        },
        Case {
            name: "channel sidecar with a beta default",
            default_channel: BETA,
            entries: &[
                Text("drover-agent-linux-amd64-1.0.0", "a"),
                Text("drover-agent-linux-amd64-1.0.0.sha256", "{sha:a}"),
                Text("drover-agent-linux-amd64-1.0.0.channel", "stable\n"),
                Text("drover-agent-linux-amd64-1.1.0", "b"),
                Text("drover-agent-linux-amd64-1.1.0.sha256", "{sha:b}"),
                Text("drover-agent-linux-amd64-1.2.0", "c"),
                Text("drover-agent-linux-amd64-1.2.0.sha256", "{sha:c}"),
                Text("drover-agent-linux-amd64-1.2.0.channel", "nightly"),
            ],
            offered: &[
                offer(
                    "drover-agent-linux-amd64-1.2.0",
                    "linux",
                    "amd64",
                    "1.2.0",
                    BETA,
                ),
                offer(
                    "drover-agent-linux-amd64-1.1.0",
                    "linux",
                    "amd64",
                    "1.1.0",
                    BETA,
                ),
                offer(
                    "drover-agent-linux-amd64-1.0.0",
                    "linux",
                    "amd64",
                    "1.0.0",
                    STABLE,
                ),
            ],
            ..CASE
        },
        Case {
            name: ".exe only for windows",
            entries: &[
                Text("drover-agent-windows-amd64-1.0.0.exe", "win"),
                Text("drover-agent-windows-amd64-1.0.0.exe.sha256", "{sha:win}"),
                Text("drover-agent-windows-arm64-1.0.0", "win without exe"),
                Text(
                    "drover-agent-windows-arm64-1.0.0.sha256",
                    "{sha:win without exe}",
                ),
                Text("drover-agent-linux-amd64-1.0.0.exe", "linux"),
                Text("drover-agent-linux-amd64-1.0.0.exe.sha256", "{sha:linux}"),
            ],
            offered: &[
                offer(
                    "drover-agent-windows-amd64-1.0.0.exe",
                    "windows",
                    "amd64",
                    "1.0.0",
                    STABLE,
                ),
                offer(
                    "drover-agent-windows-arm64-1.0.0",
                    "windows",
                    "arm64",
                    "1.0.0",
                    STABLE,
                ),
            ],
            skipped: &[
                (
                    "drover-agent-linux-amd64-1.0.0.exe",
                    ".exe suffix is only for windows builds",
                ),
                (
                    "drover-agent-linux-amd64-1.0.0.exe.sha256",
                    "sidecar of a skipped build",
                ),
            ],
            ..CASE
        },
        Case {
            name: "names that are not builds",
            entries: &[
                Text("notes.txt", "x"),
                Text("agent-linux-amd64-1.0.0", "x"),
                Text(
                    "drover-agent-site-3f2a9c1e-8b4d-4c1e-9d7a-0a1b2c3d4e5f-linux-amd64-1.0.0",
                    "x",
                ),
                Text("drover-agent-linux-amd64", "x"),
                Text("drover-agent-", "x"),
                Text("drover-agent-x86-solaris-1.0.0", "x"),
                Text("drover-agent-linux-amd64-1.0.0.tar.gz", "x"),
                Text("drover-agent-linux-amd64-1.0.0.sha256.bak", "x"),
            ],
            skipped: &[
                (
                    "agent-linux-amd64-1.0.0",
                    "name does not match drover-agent-{os}-{arch}-{version}",
                ),
                (
                    "drover-agent-",
                    "name does not match drover-agent-{os}-{arch}-{version}",
                ),
                (
                    "drover-agent-linux-amd64",
                    "name does not match drover-agent-{os}-{arch}-{version}",
                ),
                (
                    "drover-agent-linux-amd64-1.0.0.sha256.bak",
                    "version \"1.0.0.sha256.bak\" is not strict semver",
                ),
                (
                    "drover-agent-linux-amd64-1.0.0.tar.gz",
                    "version \"1.0.0.tar.gz\" is not strict semver",
                ),
                (
                    "drover-agent-site-3f2a9c1e-8b4d-4c1e-9d7a-0a1b2c3d4e5f-linux-amd64-1.0.0",
                    "name does not match drover-agent-{os}-{arch}-{version}",
                ),
                (
                    "drover-agent-x86-solaris-1.0.0",
                    "name does not match drover-agent-{os}-{arch}-{version}",
                ),
                (
                    "notes.txt",
                    "name does not match drover-agent-{os}-{arch}-{version}",
                ),
            ],
            ..CASE
        },
        Case {
            name: "one wrong part is named",
            entries: &[
                Text("drover-agent-solaris-amd64-1.0.0", "x"),
                Text("drover-agent-linux-x86-1.0.0", "x"),
                Text("drover-agent-linux-amd64-v1.2", "x"),
                Text("drover-agent-linux-amd64-1.2", "x"),
                Text("drover-agent-linux-amd64-01.2.0", "x"),
                Text("drover-agent-linux-amd64-", "x"),
            ],
            skipped: &[
                (
                    "drover-agent-linux-amd64-",
                    "version \"\" is not strict semver",
                ),
                (
                    "drover-agent-linux-amd64-01.2.0",
                    "version \"01.2.0\" is not strict semver",
                ),
                (
                    "drover-agent-linux-amd64-1.2",
                    "version \"1.2\" is not strict semver",
                ),
                (
                    "drover-agent-linux-amd64-v1.2",
                    "version \"v1.2\" is not strict semver",
                ),
                ("drover-agent-linux-x86-1.0.0", "unknown arch \"x86\""),
                ("drover-agent-solaris-amd64-1.0.0", "unknown os \"solaris\""),
            ],
            ..CASE
        },
        Case {
            name: "readme and hidden files are not listed",
            entries: &[
                Text("README.md", "how to publish"),
                Text(".hidden", "x"),
                Text(".drover-agent-linux-amd64-1.0.0.partial", "half"),
                Dir(".git"),
            ],
            ..CASE
        },
        Case {
            name: "checksum missing",
            entries: &[
                Text("drover-agent-linux-amd64-1.0.0", "x"),
                Text("drover-agent-linux-amd64-1.0.0.channel", "beta"),
            ],
            skipped: &[
                ("drover-agent-linux-amd64-1.0.0", "no .sha256 checksum file"),
                (
                    "drover-agent-linux-amd64-1.0.0.channel",
                    "sidecar of a skipped build",
                ),
            ],
            ..CASE
        },
        Case {
            name: "checksum files that are not a digest",
            entries: &[
                Text("drover-agent-linux-amd64-1.0.0", "x"),
                Text("drover-agent-linux-amd64-1.0.0.sha256", "hello"),
                Text("drover-agent-linux-amd64-1.0.1", "x"),
                Text("drover-agent-linux-amd64-1.0.1.sha256", ""),
                Text("drover-agent-linux-amd64-1.0.2", "x"),
                Text(
                    "drover-agent-linux-amd64-1.0.2.sha256",
                    "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a489",
                ),
                Text("drover-agent-linux-amd64-1.0.3", "x"),
                Text("drover-agent-linux-amd64-1.0.3.sha256", "{sha:x}0"),
                Text("drover-agent-linux-amd64-1.0.4", "x"),
                Text(
                    "drover-agent-linux-amd64-1.0.4.sha256",
                    "{sha:x}  a\n{sha:y}  b\n",
                ),
                Text("drover-agent-linux-amd64-1.0.5", "x"),
                Text(
                    "drover-agent-linux-amd64-1.0.5.sha256",
                    "zz711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4899",
                ),
            ],
            skipped: &[
                (
                    "drover-agent-linux-amd64-1.0.0",
                    "checksum file is not a sha256 digest",
                ),
                (
                    "drover-agent-linux-amd64-1.0.0.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.0.1",
                    "checksum file is not a sha256 digest",
                ),
                (
                    "drover-agent-linux-amd64-1.0.1.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.0.2",
                    "checksum file is not a sha256 digest",
                ),
                (
                    "drover-agent-linux-amd64-1.0.2.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.0.3",
                    "checksum file is not a sha256 digest",
                ),
                (
                    "drover-agent-linux-amd64-1.0.3.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.0.4",
                    "checksum file is not a sha256 digest",
                ),
                (
                    "drover-agent-linux-amd64-1.0.4.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.0.5",
                    "checksum file is not a sha256 digest",
                ),
                (
                    "drover-agent-linux-amd64-1.0.5.sha256",
                    "sidecar of a skipped build",
                ),
            ],
            ..CASE
        },
        Case {
            name: "checksum mismatch",
            entries: &[
                Text("drover-agent-linux-amd64-1.0.0", "half"),
                Text("drover-agent-linux-amd64-1.0.0.sha256", "{sha:full}"),
            ],
            skipped: &[
                (
                    "drover-agent-linux-amd64-1.0.0",
                    "checksum mismatch: the file does not hash to the .sha256 digest {sha:full}",
                ),
                (
                    "drover-agent-linux-amd64-1.0.0.sha256",
                    "sidecar of a skipped build",
                ),
            ],
            ..CASE
        },
        Case {
            name: "sidecars without a build",
            entries: &[
                Text("drover-agent-linux-amd64-2.0.0.sha256", "{sha:x}"),
                Text("drover-agent-linux-amd64-2.0.0.channel", "beta"),
                Text("drover-agent-linux-amd64-2.0.0.sig", "{sig:ab}"),
                Text(".sha256", "x"),
                Text("README.md.sha256", "{sha:x}"),
                Text("notes.txt", "x"),
                Text("notes.txt.sha256", "{sha:x}"),
            ],
            skipped: &[
                ("README.md.sha256", "sidecar without a build"),
                (
                    "drover-agent-linux-amd64-2.0.0.channel",
                    "sidecar without a build",
                ),
                (
                    "drover-agent-linux-amd64-2.0.0.sha256",
                    "sidecar without a build",
                ),
                (
                    "drover-agent-linux-amd64-2.0.0.sig",
                    "sidecar without a build",
                ),
                (
                    "notes.txt",
                    "name does not match drover-agent-{os}-{arch}-{version}",
                ),
                ("notes.txt.sha256", "sidecar of a skipped build"),
            ],
            ..CASE
        },
        Case {
            name: "signature files",
            entries: &[
                Text("drover-agent-linux-amd64-1.0.0", "canonical"),
                Text("drover-agent-linux-amd64-1.0.0.sha256", "{sha:canonical}"),
                Text(
                    "drover-agent-linux-amd64-1.0.0.sig",
                    "{doc:1.0.0:linux:amd64}",
                ),
                Text("drover-agent-linux-amd64-1.1.0", "loose"),
                Text("drover-agent-linux-amd64-1.1.0.sha256", "{sha:loose}"),
                Text(
                    "drover-agent-linux-amd64-1.1.0.sig",
                    "{DOC:1.1.0:linux:amd64}",
                ),
                Text("drover-agent-linux-amd64-1.2.0", "old format"),
                Text("drover-agent-linux-amd64-1.2.0.sha256", "{sha:old format}"),
                Text("drover-agent-linux-amd64-1.2.0.sig", "{sig:AB}\n"),
                Text("drover-agent-linux-amd64-1.3.0", "other version"),
                Text(
                    "drover-agent-linux-amd64-1.3.0.sha256",
                    "{sha:other version}",
                ),
                Text(
                    "drover-agent-linux-amd64-1.3.0.sig",
                    "{doc:1.2.0:linux:amd64}",
                ),
                Text("drover-agent-linux-amd64-1.4.0", "other arch"),
                Text("drover-agent-linux-amd64-1.4.0.sha256", "{sha:other arch}"),
                Text(
                    "drover-agent-linux-amd64-1.4.0.sig",
                    "{doc:1.4.0:linux:arm64}",
                ),
                Text("drover-agent-linux-amd64-1.5.0", "not a document"),
                Text(
                    "drover-agent-linux-amd64-1.5.0.sha256",
                    "{sha:not a document}",
                ),
                Text("drover-agent-linux-amd64-1.5.0.sig", "hello"),
                Text("drover-agent-linux-amd64-1.6.0", "binary"),
                Text("drover-agent-linux-amd64-1.6.0.sha256", "{sha:binary}"),
                Bytes("drover-agent-linux-amd64-1.6.0.sig", &[0xfe; 64]),
            ],
            offered: &[
                signed(
                    offer(
                        "drover-agent-linux-amd64-1.1.0",
                        "linux",
                        "amd64",
                        "1.1.0",
                        STABLE,
                    ),
                    "{doc:1.1.0:linux:amd64}",
                ),
                signed(
                    offer(
                        "drover-agent-linux-amd64-1.0.0",
                        "linux",
                        "amd64",
                        "1.0.0",
                        STABLE,
                    ),
                    "{doc:1.0.0:linux:amd64}",
                ),
            ],
            skipped: &[
                (
                    "drover-agent-linux-amd64-1.2.0",
                    "bad signature file: a bare hex signature in the old format*",
                ),
                (
                    "drover-agent-linux-amd64-1.2.0.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.2.0.sig",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.3.0",
                    "bad signature file: it signs 1.2.0 linux/amd64, the file name says 1.3.0 linux/amd64",
                ),
                (
                    "drover-agent-linux-amd64-1.3.0.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.3.0.sig",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.4.0",
                    "bad signature file: it signs 1.4.0 linux/arm64, the file name says 1.4.0 linux/amd64",
                ),
                (
                    "drover-agent-linux-amd64-1.4.0.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.4.0.sig",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.5.0",
                    "bad signature file: not a signature document*",
                ),
                (
                    "drover-agent-linux-amd64-1.5.0.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.5.0.sig",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.6.0",
                    "bad signature file: not UTF-8 text",
                ),
                (
                    "drover-agent-linux-amd64-1.6.0.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-linux-amd64-1.6.0.sig",
                    "sidecar of a skipped build",
                ),
            ],
            ..CASE
        },
        Case {
            name: "signatures required",
            require_signatures: true,
            entries: &[
                Text("drover-agent-linux-amd64-1.0.0", "signed"),
                Text("drover-agent-linux-amd64-1.0.0.sha256", "{sha:signed}"),
                Text(
                    "drover-agent-linux-amd64-1.0.0.sig",
                    "{doc:1.0.0:linux:amd64}",
                ),
                Text("drover-agent-linux-amd64-1.1.0", "unsigned"),
                Text("drover-agent-linux-amd64-1.1.0.sha256", "{sha:unsigned}"),
            ],
            offered: &[signed(
                offer(
                    "drover-agent-linux-amd64-1.0.0",
                    "linux",
                    "amd64",
                    "1.0.0",
                    STABLE,
                ),
                "{doc:1.0.0:linux:amd64}",
            )],
            skipped: &[
                (
                    "drover-agent-linux-amd64-1.1.0",
                    "unsigned build and signatures are required",
                ),
                (
                    "drover-agent-linux-amd64-1.1.0.sha256",
                    "sidecar of a skipped build",
                ),
            ],
            ..CASE
        },
        Case {
            name: "duplicates keep the first good build by name",
            entries: &[
                Text("drover-agent-windows-amd64-1.0.0", "plain"),
                Text("drover-agent-windows-amd64-1.0.0.sha256", "{sha:plain}"),
                Text("drover-agent-windows-amd64-1.0.0.exe", "exe"),
                Text("drover-agent-windows-amd64-1.0.0.exe.sha256", "{sha:exe}"),
                Text("drover-agent-windows-arm64-1.0.0", "no checksum"),
                Text("drover-agent-windows-arm64-1.0.0.exe", "exe"),
                Text("drover-agent-windows-arm64-1.0.0.exe.sha256", "{sha:exe}"),
            ],
            offered: &[
                offer(
                    "drover-agent-windows-amd64-1.0.0",
                    "windows",
                    "amd64",
                    "1.0.0",
                    STABLE,
                ),
                offer(
                    "drover-agent-windows-arm64-1.0.0.exe",
                    "windows",
                    "arm64",
                    "1.0.0",
                    STABLE,
                ),
            ],
            skipped: &[
                (
                    "drover-agent-windows-amd64-1.0.0.exe",
                    "duplicate of drover-agent-windows-amd64-1.0.0",
                ),
                (
                    "drover-agent-windows-amd64-1.0.0.exe.sha256",
                    "sidecar of a skipped build",
                ),
                (
                    "drover-agent-windows-arm64-1.0.0",
                    "no .sha256 checksum file",
                ),
            ],
            ..CASE
        },
        Case {
            name: "directories and links",
            entries: &[
                Dir("drover-agent-linux-amd64-3.0.0"),
                Dir("old"),
                Link("previous", "old"),
                Link("dangling", "nowhere"),
                Dir(".store"),
                Text(".store/agent", "linked"),
                Link("drover-agent-linux-arm64-1.0.0", ".store/agent"),
                Text("drover-agent-linux-arm64-1.0.0.sha256", "{sha:linked}"),
                Text("drover-agent-macos-amd64-1.0.0", "x"),
                Dir("drover-agent-macos-amd64-1.0.0.sha256"),
            ],
            skipped: &[
                ("dangling", SYMLINK),
                ("drover-agent-linux-amd64-3.0.0", "not a regular file"),
                ("drover-agent-linux-arm64-1.0.0", SYMLINK),
                (
                    "drover-agent-linux-arm64-1.0.0.sha256",
                    "sidecar without a build",
                ),
                ("drover-agent-macos-amd64-1.0.0", "no .sha256 checksum file"),
                (
                    "drover-agent-macos-amd64-1.0.0.sha256",
                    "not a regular file",
                ),
                ("old", "not a regular file"),
                ("previous", SYMLINK),
            ],
            ..CASE
        },
    ];

    fn sha(text: &str) -> String {
        hex::encode(Sha256::digest(text))
    }

    /// A signature document for VERSION:OS:ARCH; `loose` spells it as a person might
    /// (CRLF, upper-case hex, another field order), which reads the same.
    fn document(spec: &str, loose: bool) -> String {
        let mut parts = spec.splitn(3, ':');
        let (version, os, arch) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        if loose {
            return format!(
                "drover-signature 1\r\nsignature: {}\r\nsha256: {}\r\nkey-id: 0123456789ABCDEF\r\nversion: {version}\r\nos: {os}\r\narch: {arch}\r\ncounter: 3\r\nrollback: false\r\n",
                "CD".repeat(64),
                "EF".repeat(32)
            );
        }
        format!(
            "drover-signature 1\nkey-id: 0123456789abcdef\nversion: {version}\nos: {os}\narch: {arch}\ncounter: 3\nrollback: false\nsha256: {}\nsignature: {}\n",
            "ef".repeat(32),
            "cd".repeat(64)
        )
    }

    /// Replaces `{sha:X}` with the digest of X (`{SHA:X}` upper-case), `{sig:XX}` with
    /// XX repeated 64 times, and `{doc:V:OS:ARCH}` (`{DOC:...}` loosely spelled) with a
    /// signature document.
    fn expand(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            let Some(end) = rest[start..].find('}').map(|end| start + end) else {
                break;
            };
            let expanded = match rest[start + 1..end].split_once(':') {
                Some(("sha", arg)) => sha(arg),
                Some(("SHA", arg)) => sha(arg).to_ascii_uppercase(),
                Some(("sig", arg)) => arg.repeat(64),
                Some(("doc", arg)) => document(arg, false),
                Some(("DOC", arg)) => document(arg, true),
                _ => rest[start..=end].to_string(),
            };
            out.push_str(&rest[..start]);
            out.push_str(&expanded);
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        out
    }

    fn create(dir: &Path, entries: &[Entry]) {
        for entry in entries {
            match *entry {
                Text(name, text) => fs::write(dir.join(name), expand(text)).unwrap(),
                Bytes(name, bytes) => fs::write(dir.join(name), bytes).unwrap(),
                Dir(name) => fs::create_dir_all(dir.join(name)).unwrap(),
                Link(name, target) => std::os::unix::fs::symlink(target, dir.join(name)).unwrap(),
            }
        }
    }

    fn options(default_channel: Channel, require_signatures: bool) -> ScanOptions {
        ScanOptions {
            default_channel,
            require_signatures,
        }
    }

    #[test]
    fn scans_each_case() {
        for case in CASES {
            let dir = tempfile::tempdir().unwrap();
            create(dir.path(), case.entries);
            let mut scanner = Scanner::new(
                dir.path().to_path_buf(),
                options(case.default_channel, case.require_signatures),
            );
            let index = scanner.scan();

            let expected: Vec<Release> = case
                .offered
                .iter()
                .map(|offer| {
                    let content = fs::read(dir.path().join(offer.file)).unwrap();
                    Release {
                        version: semver::Version::parse(offer.version).unwrap(),
                        os: offer.os.to_string(),
                        arch: offer.arch.to_string(),
                        channel: offer.channel,
                        sha256: hex::encode(Sha256::digest(&content)),
                        size: content.len() as u64,
                        file: offer.file.to_string(),
                        signature: offer.signature.map(expand),
                    }
                })
                .collect();
            assert_eq!(index.releases, expected, "offered in case {:?}", case.name);

            let skipped: Vec<(&str, &str)> = index
                .skipped
                .iter()
                .map(|s| (s.file.as_str(), s.reason.as_str()))
                .collect();
            assert_eq!(
                skipped.len(),
                case.skipped.len(),
                "skipped in case {:?}: {skipped:#?}",
                case.name
            );
            for ((file, reason), (want_file, want_reason)) in skipped.iter().zip(case.skipped) {
                assert_eq!(file, want_file, "case {:?}", case.name);
                let matches = match want_reason.strip_suffix('*') {
                    Some(prefix) => reason.starts_with(prefix),
                    None => *reason == expand(want_reason),
                };
                assert!(
                    matches,
                    "case {:?}: {file} skipped for {reason:?}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn non_utf8_names_are_skipped_by_their_lossy_name() {
        use std::os::unix::ffi::OsStrExt;

        let dir = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"drover-agent-linux-amd64-1.0.0-\xff");
        if fs::write(dir.path().join(name), "x").is_err() {
            return; // the filesystem refuses such names, so the scanner never sees one
        }
        let index = Scanner::new(dir.path().to_path_buf(), ScanOptions::default()).scan();
        assert_eq!(
            index.skipped,
            [skip(
                "drover-agent-linux-amd64-1.0.0-\u{fffd}",
                "name is not valid UTF-8"
            )]
        );
    }

    #[test]
    fn unreadable_directory_is_reported_as_dot() {
        let dir = tempfile::tempdir().unwrap();
        let index = Scanner::new(dir.path().join("missing"), ScanOptions::default()).scan();
        assert!(index.releases.is_empty());
        assert_eq!(index.skipped.len(), 1);
        assert_eq!(index.skipped[0].file, ".");
        assert!(
            index.skipped[0].reason.starts_with("unreadable: "),
            "{:?}",
            index.skipped[0]
        );
    }

    #[test]
    fn half_copied_build_is_offered_once_complete() {
        let dir = tempfile::tempdir().unwrap();
        let build = dir.path().join("drover-agent-linux-amd64-1.0.0");
        fs::write(
            dir.path().join("drover-agent-linux-amd64-1.0.0.sha256"),
            sha("complete build"),
        )
        .unwrap();
        fs::write(&build, "complete").unwrap();
        let mut scanner = Scanner::new(dir.path().to_path_buf(), ScanOptions::default());

        let index = scanner.scan();
        assert!(index.releases.is_empty());
        assert_eq!(
            index.skipped[0].reason,
            format!(
                "checksum mismatch: the file does not hash to the .sha256 digest {}",
                sha("complete build")
            )
        );

        fs::write(&build, "complete build").unwrap();
        let index = scanner.scan();
        assert_eq!(index.skipped, []);
        assert_eq!(index.releases.len(), 1);
        assert_eq!(index.releases[0].size, 14);
    }

    #[test]
    fn checksum_before_its_build_waits_for_the_build() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("drover-agent-linux-amd64-1.0.0.sha256"),
            sha("build"),
        )
        .unwrap();
        let mut scanner = Scanner::new(dir.path().to_path_buf(), ScanOptions::default());
        assert_eq!(
            scanner.scan().skipped,
            [skip(
                "drover-agent-linux-amd64-1.0.0.sha256",
                "sidecar without a build"
            )]
        );

        fs::write(dir.path().join("drover-agent-linux-amd64-1.0.0"), "build").unwrap();
        let index = scanner.scan();
        assert_eq!(index.skipped, []);
        assert_eq!(index.releases[0].file, "drover-agent-linux-amd64-1.0.0");
    }

    fn write_with_mtime(path: &Path, content: &[u8], age: Duration) {
        let file = File::create(path).unwrap();
        io::Write::write_all(&mut &file, content).unwrap();
        let modified = SystemTime::now() - age;
        file.set_times(FileTimes::new().set_modified(modified))
            .unwrap();
    }

    #[test]
    fn unchanged_builds_are_not_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let build = dir.path().join("drover-agent-linux-amd64-1.0.0");
        let first = vec![b'a'; 3 << 20];
        let second = vec![b'b'; 3 << 20];
        let hour = Duration::from_secs(3600);
        write_with_mtime(&build, &first, hour);
        let checksum = dir.path().join("drover-agent-linux-amd64-1.0.0.sha256");
        fs::write(&checksum, hex::encode(Sha256::digest(&first))).unwrap();
        let mut scanner = Scanner::new(dir.path().to_path_buf(), ScanOptions::default());
        // Status change times cannot be set back, so the settle rule is tested apart.
        scanner.settle = Duration::ZERO;

        assert_eq!(scanner.scan().releases.len(), 1);
        assert_eq!(scanner.hashed, 1);
        assert_eq!(scanner.scan().releases.len(), 1);
        assert_eq!(scanner.hashed, 1, "an unchanged build is not hashed again");

        // Same size, another mtime: hashed again, and the stale checksum no longer fits.
        write_with_mtime(&build, &second, 2 * hour);
        let index = scanner.scan();
        assert_eq!(scanner.hashed, 2);
        assert!(index.releases.is_empty());
        assert!(index.skipped[0].reason.starts_with("checksum mismatch"));

        // The checksum is read every scan, so fixing it alone is enough.
        fs::write(&checksum, hex::encode(Sha256::digest(&second))).unwrap();
        let index = scanner.scan();
        assert_eq!(scanner.hashed, 2);
        assert_eq!(
            index.releases[0].sha256,
            hex::encode(Sha256::digest(&second))
        );

        fs::remove_file(&build).unwrap();
        scanner.scan();
        assert!(scanner.cache.is_empty());
    }

    #[test]
    fn recently_changed_builds_are_hashed_every_scan() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("drover-agent-linux-amd64-1.0.0"), "fresh").unwrap();
        fs::write(
            dir.path().join("drover-agent-linux-amd64-1.0.0.sha256"),
            sha("fresh"),
        )
        .unwrap();
        let mut scanner = Scanner::new(dir.path().to_path_buf(), ScanOptions::default());
        scanner.settle = Duration::from_secs(3600);
        scanner.scan();
        scanner.scan();
        assert_eq!(scanner.hashed, 2);
    }
}
