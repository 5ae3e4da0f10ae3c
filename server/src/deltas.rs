//! Deltas between builds: which to have, and which are ready. For each build an agent
//! may be sent next (per os/arch, the newest of each channel that is not rolled back),
//! one zstd patch from each of the few versions the fleet runs most on that os/arch,
//! made once by `compressed::Job` (the older build is the zstd prefix) into the data
//! directory's `deltas/`, and planned again whenever the index changes and every
//! `REPLAN`. An update offers a ready delta to an agent that runs its base; the agent
//! rebuilds the build and trusts only the build's own digest and signature.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::AppState;
use crate::compressed::{self, Base, Copy, Job};
use crate::releases::{Channel, Release};
use crate::store::FleetCount;

/// How often the fleet's common versions are read again when nothing else changed.
const REPLAN: Duration = Duration::from_secs(60);

/// A delta that is ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delta {
    pub(crate) copy: Copy,
    /// The version of the build it starts from.
    pub(crate) base_version: semver::Version,
}

/// (The build's SHA-256, the base's.)
type Pair = (String, String);

/// The deltas made, by pair: the ready delta, or `None` when it was no smaller than the
/// build (so it is not made again at every plan). Cheap to clone; empty when deltas are
/// off.
#[derive(Clone, Default)]
pub(crate) struct Deltas {
    ready: Arc<RwLock<HashMap<Pair, Option<Delta>>>>,
}

impl Deltas {
    /// The delta to the build with SHA-256 `build` from the one with `base`, once ready.
    pub(crate) fn delta(&self, build: &str, base: &str) -> Option<Delta> {
        self.ready
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(build.to_owned(), base.to_owned()))
            .cloned()
            .flatten()
    }

    /// Whether the pair's delta was made, or found no smaller than the build.
    fn done(&self, pair: &Pair) -> bool {
        self.ready
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(pair)
    }

    /// The ready deltas to the build with SHA-256 `build`, oldest base first.
    pub(crate) fn to_build(&self, build: &str) -> Vec<Delta> {
        let mut deltas: Vec<Delta> = self
            .ready
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|((to, _), _)| to == build)
            .filter_map(|(_, delta)| delta.clone())
            .collect();
        deltas.sort_by(|a, b| a.base_version.cmp(&b.base_version));
        deltas
    }

    /// Stops offering a delta (it changed on disk since it was made); the next plan
    /// makes it again.
    pub(crate) fn forget(&self, build: &str, base: &str) {
        self.ready
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(build.to_owned(), base.to_owned()));
    }

    /// Plans and makes the deltas into `dir` until the server stops.
    pub(crate) fn start(state: AppState, dir: PathBuf) {
        tokio::spawn(async move {
            let mut changes = state.releases.subscribe();
            loop {
                state.deltas.make_planned(&state, &dir).await;
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(REPLAN) => {}
                    () = state.shutdown.cancelled() => return,
                }
            }
        });
    }

    async fn make_planned(&self, state: &AppState, dir: &Path) {
        let fleet = match state.store.fleet_counts(0).await {
            Ok(fleet) => fleet,
            Err(err) => {
                tracing::warn!(%err, "could not read the fleet's versions; deltas are planned later");
                return;
            }
        };
        let index = state.releases.current();
        let pairs: Vec<(Release, Release)> = {
            let blocked = state.blocked_versions();
            plan(
                &index.releases,
                &blocked,
                &fleet,
                state.settings.delta_bases,
            )
            .into_iter()
            .map(|(build, base)| (build.clone(), base.clone()))
            .collect()
        };
        let wanted: HashSet<Pair> = pairs
            .iter()
            .map(|(build, base)| (build.sha256.clone(), base.sha256.clone()))
            .collect();
        self.ready
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|pair, _| wanted.contains(pair));
        for (build, base) in pairs {
            let pair = (build.sha256.clone(), base.sha256.clone());
            if self.done(&pair) {
                continue;
            }
            if state.shutdown.is_cancelled() {
                return;
            }
            let downloads = &state.settings.downloads;
            let job = Job {
                dir: dir.to_owned(),
                level: state.settings.compression_level,
                build: downloads.join(&build.file),
                sha256: build.sha256.clone(),
                size: build.size,
                base: Some(Base {
                    path: downloads.join(&base.file),
                    sha256: base.sha256.clone(),
                    size: base.size,
                }),
                stop: state.shutdown.clone(),
            };
            match compressed::in_background(job).await {
                Ok(copy) => {
                    let delta = copy.map(|copy| Delta {
                        copy,
                        base_version: base.version.clone(),
                    });
                    self.ready
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(pair, delta);
                }
                Err(err) => {
                    tracing::warn!(build = %build.file, base = %base.file, error = %format!("{err:#}"), "could not make the delta; agents download the build");
                }
            }
        }
        let names: HashSet<String> = wanted
            .iter()
            .map(|(build, base)| compressed::delta_file(build, base))
            .collect();
        let dir = dir.to_owned();
        let _ = tokio::task::spawn_blocking(move || {
            compressed::prune_but(&dir, |name| names.contains(name));
        })
        .await;
    }
}

/// The (build, base) pairs to have deltas for. Per os/arch, the builds are the newest
/// stable and the newest of any channel, neither rolled back; the bases are the
/// `bases` versions most agents run there that still have a build in the index.
pub(crate) fn plan<'a>(
    releases: &'a [Release],
    blocked: &HashSet<String>,
    fleet: &[FleetCount],
    bases: usize,
) -> Vec<(&'a Release, &'a Release)> {
    let mut running: HashMap<(&str, &str, &str), i64> = HashMap::new();
    for group in fleet {
        *running
            .entry((&group.os, &group.arch, &group.version))
            .or_default() += group.agents;
    }
    let mut platforms: Vec<(&str, &str)> = releases
        .iter()
        .map(|r| (r.os.as_str(), r.arch.as_str()))
        .collect();
    platforms.sort_unstable();
    platforms.dedup();
    let mut pairs = Vec::new();
    for (os, arch) in platforms {
        let on_platform = || {
            releases
                .iter()
                .filter(move |r| r.os == os && r.arch == arch)
        };
        let offered = |channel: Option<Channel>| {
            on_platform()
                .filter(|r| !blocked.contains(&r.version.to_string()))
                .filter(|r| channel.is_none_or(|c| r.channel == c))
                .max_by(|a, b| a.version.cmp(&b.version))
        };
        let mut builds: Vec<&Release> = [offered(Some(Channel::Stable)), offered(None)]
            .into_iter()
            .flatten()
            .collect();
        builds.dedup_by(|a, b| a.sha256 == b.sha256);
        let mut common: Vec<(&Release, i64)> = on_platform()
            .filter_map(|r| {
                let agents = *running.get(&(os, arch, r.version.to_string().as_str()))?;
                (agents > 0).then_some((r, agents))
            })
            .collect();
        // Most agents first; of equals, the newer.
        common.sort_by(|(a, n), (b, m)| m.cmp(n).then_with(|| b.version.cmp(&a.version)));
        for build in builds {
            pairs.extend(
                common
                    .iter()
                    .take(bases)
                    .filter(|(base, _)| base.sha256 != build.sha256)
                    .map(|(base, _)| (build, *base)),
            );
        }
    }
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str, os: &str, channel: Channel) -> Release {
        Release {
            version: semver::Version::parse(version).unwrap(),
            os: os.into(),
            arch: "amd64".into(),
            channel,
            sha256: format!("{os}-{version}"),
            size: 100,
            file: format!("drover-agent-{os}-amd64-{version}"),
            signature: None,
        }
    }

    fn running(version: &str, os: &str, agents: i64) -> FleetCount {
        FleetCount {
            os: os.into(),
            arch: "amd64".into(),
            version: version.into(),
            agents,
            online: agents,
            paused: 0,
            beta: 0,
        }
    }

    fn names(pairs: &[(&Release, &Release)]) -> Vec<String> {
        pairs
            .iter()
            .map(|(build, base)| format!("{} from {}", build.sha256, base.sha256))
            .collect()
    }

    #[test]
    fn deltas_go_to_the_offered_builds_from_the_most_run_versions() {
        let releases = [
            release("1.0.0", "linux", Channel::Stable),
            release("1.0.1", "linux", Channel::Stable),
            release("1.1.0", "linux", Channel::Stable),
            release("1.2.0-beta.1", "linux", Channel::Beta),
            release("0.9.0", "linux", Channel::Stable),
            release("1.0.0", "windows", Channel::Stable),
            release("1.1.0", "windows", Channel::Stable),
        ];
        let fleet = [
            running("1.0.0", "linux", 50),
            running("1.0.1", "linux", 30),
            // Split over two groups (sites, nodes): counted together.
            running("0.9.0", "linux", 4),
            running("0.9.0", "linux", 4),
            // Not in the index: no base to start from.
            running("0.8.0", "linux", 900),
            running("1.1.0", "linux", 1),
            running("1.0.0", "windows", 7),
            running("1.1.0", "windows", 3),
        ];
        let pairs = plan(&releases, &HashSet::new(), &fleet, 2);
        assert_eq!(
            names(&pairs),
            [
                "linux-1.1.0 from linux-1.0.0",
                "linux-1.1.0 from linux-1.0.1",
                "linux-1.2.0-beta.1 from linux-1.0.0",
                "linux-1.2.0-beta.1 from linux-1.0.1",
                // The newest build is also a base the fleet runs: no delta to itself.
                "windows-1.1.0 from windows-1.0.0",
            ]
        );
        // With three bases, 0.9.0 (8 agents) comes before 1.1.0 (1).
        let pairs = plan(&releases, &HashSet::new(), &fleet, 3);
        assert!(names(&pairs).contains(&"linux-1.1.0 from linux-0.9.0".to_owned()));
        assert_eq!(plan(&releases, &HashSet::new(), &fleet, 0), []);
    }

    #[test]
    fn a_rolled_back_build_gets_no_delta_but_its_fleet_gets_one_back() {
        let releases = [
            release("1.0.0", "linux", Channel::Stable),
            release("1.1.0", "linux", Channel::Stable),
        ];
        let fleet = [running("1.1.0", "linux", 40), running("1.0.0", "linux", 2)];
        let blocked = HashSet::from(["1.1.0".to_owned()]);
        assert_eq!(
            names(&plan(&releases, &blocked, &fleet, 3)),
            ["linux-1.0.0 from linux-1.1.0"]
        );
    }
}
