//! Rollouts as records: their plans and waves (`plan`), their health and the promote
//! gate (`health`), and the admission rule dispatch consults (`book`); here, the
//! stale-stable warning and which rollouts maintenance windows hold. Pure: the callers
//! bring the index and the stored records.

pub(crate) mod book;
pub(crate) mod health;
pub mod plan;

use std::collections::{HashMap, HashSet};

use crate::releases::{Channel, ReleaseIndex};
use crate::store::{RolloutKind, RolloutRecord};

/// Whether maintenance windows hold a rollout's agents: `promote` and `targeted`
/// rollouts do, unless the operator overrode them; beta agents chose early builds and a
/// rollback must not wait.
pub(crate) fn obeys_windows(kind: RolloutKind, plan: &plan::Plan) -> bool {
    matches!(kind, RolloutKind::Promote | RolloutKind::Targeted) && !plan.ignore_windows
}

/// A version on one platform.
pub(crate) type RolloutKey = (String, String, String);

/// How long stable has been behind beta on each platform: the age of the oldest beta
/// build that is newer than the newest stable one.
pub(crate) fn stable_lag_ms(
    index: &ReleaseIndex,
    blocked: &HashSet<String>,
    first_seen: &HashMap<RolloutKey, i64>,
    now_ms: i64,
) -> HashMap<(String, String), (String, i64)> {
    let mut lags = HashMap::new();
    let platforms: HashSet<(&str, &str)> = index
        .releases
        .iter()
        .map(|r| (r.os.as_str(), r.arch.as_str()))
        .collect();
    for (os, arch) in platforms {
        let offered = |r: &crate::releases::Release| !blocked.contains(&r.version.to_string());
        let stable = index.newest(os, arch, |r| offered(r) && r.channel == Channel::Stable);
        let ahead = index.releases.iter().filter(|r| {
            r.os == os
                && r.arch == arch
                && r.channel == Channel::Beta
                && offered(r)
                && stable.is_none_or(|s| r.version > s.version)
        });
        let oldest = ahead
            .filter_map(|r| {
                let key = (r.version.to_string(), r.os.clone(), r.arch.clone());
                first_seen
                    .get(&key)
                    .map(|seen| (r.version.to_string(), *seen))
            })
            .min_by_key(|(_, seen)| *seen);
        if let Some((version, seen)) = oldest {
            lags.insert((os.to_owned(), arch.to_owned()), (version, now_ms - seen));
        }
    }
    lags
}

/// First sightings by key, from the stored records.
pub(crate) fn first_seen(records: &[RolloutRecord]) -> HashMap<RolloutKey, i64> {
    records
        .iter()
        .map(|r| {
            (
                (r.version.clone(), r.os.clone(), r.arch.clone()),
                r.first_seen_ms,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_lag_is_the_age_of_the_oldest_beta_ahead_of_stable() {
        use crate::releases::Release;
        let release = |version: &str, channel| Release {
            version: semver::Version::parse(version).unwrap(),
            os: "linux".into(),
            arch: "amd64".into(),
            channel,
            sha256: String::new(),
            size: 0,
            file: format!("drover-agent-linux-amd64-{version}"),
            signature: None,
        };
        let index = ReleaseIndex {
            releases: vec![
                release("1.3.0", Channel::Beta),
                release("1.2.0", Channel::Beta),
                release("1.1.0", Channel::Stable),
                release("1.0.0", Channel::Beta),
            ],
            skipped: Vec::new(),
        };
        let key = |v: &str| (v.to_owned(), "linux".to_owned(), "amd64".to_owned());
        let seen = HashMap::from([
            (key("1.3.0"), 900),
            (key("1.2.0"), 500),
            (key("1.0.0"), 100),
        ]);
        let lags = stable_lag_ms(&index, &HashSet::new(), &seen, 1000);
        assert_eq!(
            lags[&("linux".into(), "amd64".into())],
            ("1.2.0".into(), 500)
        );
        let blocked = HashSet::from(["1.2.0".to_owned()]);
        let lags = stable_lag_ms(&index, &blocked, &seen, 1000);
        assert_eq!(
            lags[&("linux".into(), "amd64".into())],
            ("1.3.0".into(), 100)
        );
    }
}
