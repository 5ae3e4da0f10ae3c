//! Rollouts: one per version and platform. Their counts, the health gate that guards a
//! promote, the auto-halt rule and the stale-stable warning. Pure: the callers bring the
//! index, the stored records and the task counts.

pub(crate) mod book;
pub(crate) mod health;
pub(crate) mod plan;

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::releases::{Channel, ReleaseIndex};
use crate::store::{RolloutRecord, TaskCount, TaskStatus};

/// A version on one platform.
pub(crate) type RolloutKey = (String, String, String);

/// Thresholds operators can tune.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RolloutPolicy {
    /// Beta successes needed before a promote.
    pub(crate) gate_min_successes: u64,
    /// Success rate needed before a promote.
    pub(crate) gate_min_success_rate: f64,
    /// Failure rate above which a version halts...
    pub(crate) halt_failure_rate: f64,
    /// ...once it has at least this many finished attempts.
    pub(crate) halt_min_attempts: u64,
    /// Beta ahead of stable for longer than this is a warning.
    pub(crate) stale_stable_after_ms: i64,
}

/// Finished and unfinished task counts of one rollout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Tally {
    pub(crate) dispatched: u64,
    pub(crate) in_progress: u64,
    pub(crate) succeeded: u64,
    pub(crate) failed: u64,
    pub(crate) rolled_back: u64,
    pub(crate) timed_out: u64,
}

impl Tally {
    fn add(&mut self, status: TaskStatus, tasks: u64) {
        self.dispatched += tasks;
        match status {
            TaskStatus::Succeeded => self.succeeded += tasks,
            TaskStatus::Failed => self.failed += tasks,
            TaskStatus::RolledBack => self.rolled_back += tasks,
            TaskStatus::TimedOut => self.timed_out += tasks,
            TaskStatus::Cancelled => {}
            _ => self.in_progress += tasks,
        }
    }

    pub(crate) fn plus(&self, other: &Tally) -> Tally {
        Tally {
            dispatched: self.dispatched + other.dispatched,
            in_progress: self.in_progress + other.in_progress,
            succeeded: self.succeeded + other.succeeded,
            failed: self.failed + other.failed,
            rolled_back: self.rolled_back + other.rolled_back,
            timed_out: self.timed_out + other.timed_out,
        }
    }

    /// Failed, reverted and silent tasks alike: a revert is a failure.
    pub(crate) fn failures(&self) -> u64 {
        self.failed + self.rolled_back + self.timed_out
    }

    pub(crate) fn finished(&self) -> u64 {
        self.succeeded + self.failures()
    }

    pub(crate) fn success_rate(&self) -> Option<f64> {
        (self.finished() > 0).then(|| self.succeeded as f64 / self.finished() as f64)
    }
}

/// Sums task counts per rollout.
pub(crate) fn tally(counts: &[TaskCount]) -> HashMap<RolloutKey, Tally> {
    let mut tallies: HashMap<RolloutKey, Tally> = HashMap::new();
    for count in counts {
        let key = (count.version.clone(), count.os.clone(), count.arch.clone());
        tallies
            .entry(key)
            .or_default()
            .add(count.status, u64::try_from(count.tasks).unwrap_or(0));
    }
    tallies
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct GateVerdict {
    pub(crate) pass: bool,
    pub(crate) reason: String,
}

/// The health gate: enough beta successes, and a high enough success rate.
pub(crate) fn gate(tally: &Tally, policy: &RolloutPolicy) -> GateVerdict {
    let rate = tally.success_rate().unwrap_or(0.0);
    let percent = |r: f64| format!("{:.0}%", r * 100.0);
    if tally.succeeded < policy.gate_min_successes {
        return GateVerdict {
            pass: false,
            reason: format!(
                "{} of the {} beta successes needed ({} failed)",
                tally.succeeded,
                policy.gate_min_successes,
                tally.failures()
            ),
        };
    }
    if rate < policy.gate_min_success_rate {
        return GateVerdict {
            pass: false,
            reason: format!(
                "success rate {} is under the {} needed ({} succeeded, {} failed)",
                percent(rate),
                percent(policy.gate_min_success_rate),
                tally.succeeded,
                tally.failures()
            ),
        };
    }
    GateVerdict {
        pass: true,
        reason: format!(
            "{} beta {}, success rate {}",
            tally.succeeded,
            if tally.succeeded == 1 {
                "success"
            } else {
                "successes"
            },
            percent(rate)
        ),
    }
}

/// Why a rollout should halt, if it should.
pub(crate) fn should_halt(tally: &Tally, policy: &RolloutPolicy) -> Option<String> {
    let finished = tally.finished();
    if finished < policy.halt_min_attempts {
        return None;
    }
    let failure_rate = tally.failures() as f64 / finished as f64;
    (failure_rate > policy.halt_failure_rate).then(|| {
        format!(
            "{} of {} attempts failed ({:.0}%, over the {:.0}% limit)",
            tally.failures(),
            finished,
            failure_rate * 100.0,
            policy.halt_failure_rate * 100.0
        )
    })
}

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

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            gate_min_successes: 3,
            gate_min_success_rate: 0.9,
            halt_failure_rate: 0.2,
            halt_min_attempts: 5,
            stale_stable_after_ms: 7 * 24 * 3600 * 1000,
        }
    }

    fn tally_of(succeeded: u64, failed: u64, rolled_back: u64, timed_out: u64) -> Tally {
        Tally {
            dispatched: succeeded + failed + rolled_back + timed_out,
            in_progress: 0,
            succeeded,
            failed,
            rolled_back,
            timed_out,
        }
    }

    #[test]
    fn the_gate_needs_enough_successes_and_a_high_rate() {
        let cases = [
            (tally_of(0, 0, 0, 0), false, "0 of the 3 beta successes"),
            (tally_of(2, 0, 0, 0), false, "2 of the 3 beta successes"),
            (
                tally_of(3, 0, 0, 0),
                true,
                "3 beta successes, success rate 100%",
            ),
            (tally_of(9, 1, 0, 0), true, "success rate 90%"),
            (
                tally_of(8, 0, 1, 1),
                false,
                "success rate 80% is under the 90% needed",
            ),
            (tally_of(3, 0, 1, 0), false, "success rate 75%"),
        ];
        for (tally, pass, reason) in cases {
            let verdict = gate(&tally, &policy());
            assert_eq!(verdict.pass, pass, "{tally:?}: {}", verdict.reason);
            assert!(
                verdict.reason.contains(reason),
                "{tally:?}: {}",
                verdict.reason
            );
        }
    }

    #[test]
    fn halts_after_enough_attempts_with_too_many_failures() {
        let cases = [
            (tally_of(0, 0, 4, 0), false),
            (tally_of(0, 0, 5, 0), true),
            (tally_of(4, 1, 0, 0), false),
            (tally_of(3, 1, 0, 1), true),
            (tally_of(40, 5, 2, 3), false),
        ];
        for (tally, halts) in cases {
            assert_eq!(should_halt(&tally, &policy()).is_some(), halts, "{tally:?}");
        }
        assert!(
            should_halt(&tally_of(0, 0, 5, 0), &policy())
                .unwrap()
                .contains("5 of 5 attempts failed")
        );
    }

    #[test]
    fn tallies_count_reverts_and_timeouts_as_failures() {
        let count = |status, tasks| TaskCount {
            version: "1.1.0".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            status,
            tasks,
        };
        let tallies = tally(&[
            count(TaskStatus::Succeeded, 4),
            count(TaskStatus::RolledBack, 1),
            count(TaskStatus::TimedOut, 1),
            count(TaskStatus::Downloading, 2),
            count(TaskStatus::Cancelled, 3),
        ]);
        let t = tallies[&("1.1.0".into(), "linux".into(), "amd64".into())];
        assert_eq!(
            (t.dispatched, t.in_progress, t.failures(), t.finished()),
            (11, 2, 2, 6)
        );
        assert_eq!(t.success_rate(), Some(4.0 / 6.0));
    }

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
