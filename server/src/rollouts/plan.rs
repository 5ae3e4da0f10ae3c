//! A rollout's plan: its waves (cumulative shares of the targets, written `1%,10%,50,100%`),
//! each with a bake time and thresholds, and which wave every target falls in. Pure: wave
//! membership is a hash of the rollout id and the agent id, so every node computes the
//! same waves.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A wave's reach: a cumulative share of the targets, in hundredths of a percent
/// (integers, so 1% of 1,000 agents is exactly 10), or a cumulative count of agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    BasisPoints(u64),
    Count(u64),
}

const ALL: u64 = 10_000;

impl Share {
    pub const EVERYONE: Share = Share::BasisPoints(ALL);

    pub fn parse(text: &str) -> Result<Share, String> {
        let text = text.trim();
        let bad = || {
            format!(
                "{text:?} is not a wave share: use a percentage such as 10% or a count of agents such as 50"
            )
        };
        if let Some(percent) = text.strip_suffix('%') {
            let percent: f64 = percent.trim().parse().map_err(|_| bad())?;
            if !(percent > 0.0 && percent <= 100.0) {
                return Err(format!(
                    "{text:?} is out of range: a share is over 0% and at most 100%"
                ));
            }
            // Rounded to hundredths of a percent; 0.001% would otherwise become nothing.
            return Ok(Share::BasisPoints(
                ((percent * 100.0).round() as u64).max(1),
            ));
        }
        match text.parse::<u64>() {
            Ok(0) => Err(format!(
                "{text:?} is out of range: a wave holds at least 1 agent"
            )),
            Ok(count) => Ok(Share::Count(count)),
            Err(_) => Err(bad()),
        }
    }

    /// How many of `targets` agents the waves up to and including this one reach.
    fn reach(self, targets: u64) -> u64 {
        match self {
            Share::BasisPoints(bp) => (bp * targets).div_ceil(ALL),
            Share::Count(count) => count.min(targets),
        }
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Share::BasisPoints(bp) if bp % 100 == 0 => write!(f, "{}%", bp / 100),
            Share::BasisPoints(bp) => write!(f, "{}%", bp as f64 / 100.0),
            Share::Count(count) => write!(f, "{count}"),
        }
    }
}

impl Serialize for Share {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Share, D::Error> {
        let text = String::deserialize(deserializer)?;
        Share::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// One wave of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Wave {
    /// Cumulative: `10%` after `1%` reaches up to 10% of the targets in all.
    pub(crate) share: Share,
    /// At least and at most this many agents in this wave itself (the canary's bounds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) min_agents: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_agents: Option<u64>,
    /// How long the wave must stay healthy after it passed before the next one starts.
    pub(crate) bake_ms: i64,
    /// Thresholds over this wave's tasks.
    pub(crate) thresholds: Thresholds,
}

/// When a wave halts its rollout, and when it has proved enough to go on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Build failures over finished updates above this share halt the rollout...
    pub max_failure_rate: f64,
    /// ...once this many updates finished (or every member of a smaller wave).
    pub min_finished: u64,
    /// More build failures than this halt the rollout whatever the rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u64>,
    /// The share of the wave's members (those not skipped) that must succeed before it
    /// passes.
    pub min_success_share: f64,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            max_failure_rate: 0.1,
            min_finished: 5,
            max_failures: None,
            min_success_share: 0.5,
        }
    }
}

/// A whole plan: waves in order, and the wave sizes fixed when the rollout started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) waves: Vec<Wave>,
    /// Cumulative reach of each wave over the targets the rollout started with; set by
    /// `assign`. Agents that join later fall in a wave by the same proportions.
    #[serde(default)]
    pub(crate) reach: Vec<u64>,
    /// Start agents outside their sites' maintenance windows (an operator's override;
    /// windows hold only `promote` and `targeted` rollouts).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) ignore_windows: bool,
}

/// Promote's default waves: a 1% canary, then 10%, 50% and everyone.
pub const DEFAULT_WAVES: [Share; 4] = [
    Share::BasisPoints(100),
    Share::BasisPoints(1_000),
    Share::BasisPoints(5_000),
    Share::EVERYONE,
];

/// The canary (a first wave given as a percentage) holds at least 1 and at most 50 agents.
const CANARY_MAX: u64 = 50;

impl Plan {
    /// A plan from shares (`["1%", "10%", "100%"]`), all waves baking `bake_ms`.
    pub(crate) fn new(
        shares: &[Share],
        bake_ms: i64,
        thresholds: Thresholds,
    ) -> Result<Plan, String> {
        let Some(last) = shares.last() else {
            return Err("a plan needs at least one wave".into());
        };
        if *last != Share::EVERYONE {
            return Err(format!(
                "the last wave is {last}; it must be 100%, so that every target is reached"
            ));
        }
        for pair in shares.windows(2) {
            if let [Share::BasisPoints(a), Share::BasisPoints(b)]
            | [Share::Count(a), Share::Count(b)] = pair
                && b <= a
            {
                return Err(format!(
                    "wave shares are cumulative and must grow: {} comes after {}",
                    pair[1], pair[0]
                ));
            }
        }
        let waves = shares
            .iter()
            .enumerate()
            .map(|(index, &share)| {
                let canary =
                    index == 0 && shares.len() > 1 && matches!(share, Share::BasisPoints(_));
                Wave {
                    share,
                    min_agents: canary.then_some(1),
                    max_agents: canary.then_some(CANARY_MAX),
                    bake_ms,
                    thresholds,
                }
            })
            .collect();
        Ok(Plan {
            waves,
            reach: Vec::new(),
            ignore_windows: false,
        })
    }

    /// A plan from its written form, `1%,10%,50%,100%`.
    pub(crate) fn from_text(
        text: &str,
        bake_ms: i64,
        thresholds: Thresholds,
    ) -> Result<Plan, String> {
        Plan::new(
            &Plan::parse_shares(&[text.to_owned()])?,
            bake_ms,
            thresholds,
        )
    }

    /// One wave, everyone at once: rollbacks and single-agent updates.
    pub(crate) fn all_at_once(thresholds: Thresholds) -> Plan {
        Plan::new(&[Share::EVERYONE], 0, thresholds).expect("100% is a valid plan")
    }

    pub(crate) fn parse_shares(list: &[String]) -> Result<Vec<Share>, String> {
        list.iter()
            .flat_map(|item| item.split(','))
            .filter(|s| !s.trim().is_empty())
            .map(Share::parse)
            .collect()
    }

    /// Cumulative reach of each wave over `targets` agents: never shrinking, the last
    /// wave everyone.
    pub(crate) fn reach_over(&self, targets: u64) -> Vec<u64> {
        let mut reach = Vec::with_capacity(self.waves.len());
        let mut before = 0;
        for (index, wave) in self.waves.iter().enumerate() {
            let mut end = wave.share.reach(targets).max(before);
            if let Some(min) = wave.min_agents {
                end = end.max(before + min);
            }
            if let Some(max) = wave.max_agents {
                end = end.min(before + max);
            }
            if index + 1 == self.waves.len() {
                end = targets;
            }
            end = end.min(targets);
            reach.push(end);
            before = end;
        }
        reach
    }

    /// How many agents wave `index` itself holds (per the reach fixed at the start).
    pub(crate) fn wave_size(&self, index: usize) -> u64 {
        let end = self.reach.get(index).copied().unwrap_or(0);
        let start = index
            .checked_sub(1)
            .and_then(|i| self.reach.get(i).copied())
            .unwrap_or(0);
        end.saturating_sub(start)
    }

    pub(crate) fn last_wave(&self) -> usize {
        self.waves.len().saturating_sub(1)
    }

    /// The wave of an agent that became a target after the rollout started: the same
    /// proportions as the waves had over the first targets, by its hash.
    pub(crate) fn wave_of_latecomer(&self, rollout_id: &str, agent_id: &str) -> usize {
        let total = self.reach.last().copied().unwrap_or(0);
        if total == 0 {
            return self.last_wave();
        }
        let position = (placement(rollout_id, agent_id) as u128 * total as u128
            / (u64::MAX as u128 + 1)) as u64;
        self.reach
            .iter()
            .position(|&end| position < end)
            .unwrap_or(self.last_wave())
    }
}

/// A target as the assignment sees it: the agent, and the group (site and platform)
/// the canary is spread across.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) agent_id: String,
    pub(crate) group: String,
}

/// Where an agent falls in a rollout: the first 8 bytes of SHA-256 over the rollout id
/// and the agent id.
pub(crate) fn placement(rollout_id: &str, agent_id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(rollout_id.as_bytes())
        .chain_update(b"/")
        .chain_update(agent_id.as_bytes())
        .finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Puts every candidate in a wave and fixes the plan's reach. The first wave of a plan
/// with several is taken from the groups in turn, so a canary spans sites and platforms
/// where the fleet allows; everyone else is ordered by `placement`.
pub(crate) fn assign(
    rollout_id: &str,
    candidates: &[Candidate],
    plan: &mut Plan,
) -> Vec<(String, usize)> {
    plan.reach = plan.reach_over(candidates.len() as u64);
    let mut ordered: Vec<(&Candidate, u64)> = candidates
        .iter()
        .map(|c| (c, placement(rollout_id, &c.agent_id)))
        .collect();
    ordered.sort_unstable_by(|(a, place_a), (b, place_b)| {
        (place_a, &a.agent_id).cmp(&(place_b, &b.agent_id))
    });

    let canary_size = if plan.waves.len() > 1 {
        plan.reach.first().copied().unwrap_or(0) as usize
    } else {
        0
    };
    // Each group's members in placement order; groups taken in the order of their first
    // member, one agent from each in turn.
    let mut groups: BTreeMap<u64, Vec<&Candidate>> = BTreeMap::new();
    let mut first_of_group: BTreeMap<&str, u64> = BTreeMap::new();
    for (candidate, place) in &ordered {
        let key = *first_of_group.entry(&candidate.group).or_insert(*place);
        groups.entry(key).or_default().push(candidate);
    }
    let mut canary: Vec<&Candidate> = Vec::with_capacity(canary_size);
    let mut round = 0;
    while canary.len() < canary_size {
        let mut took = false;
        for members in groups.values() {
            if let Some(candidate) = members.get(round) {
                canary.push(candidate);
                took = true;
                if canary.len() == canary_size {
                    break;
                }
            }
        }
        if !took {
            break;
        }
        round += 1;
    }
    let in_canary: std::collections::HashSet<&str> =
        canary.iter().map(|c| c.agent_id.as_str()).collect();
    let rest = ordered
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| !in_canary.contains(c.agent_id.as_str()));
    canary
        .into_iter()
        .chain(rest)
        .enumerate()
        .map(|(rank, candidate)| {
            let wave = plan
                .reach
                .iter()
                .position(|&end| (rank as u64) < end)
                .unwrap_or(plan.last_wave());
            (candidate.agent_id.clone(), wave)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(text: &str) -> Vec<Share> {
        Plan::parse_shares(&[text.to_owned()]).unwrap()
    }

    fn plan(text: &str) -> Plan {
        Plan::new(&shares(text), 600_000, Thresholds::default()).unwrap()
    }

    #[test]
    fn shares_parse_and_print() {
        let cases = [
            ("1%", Ok("1%")),
            ("0.5%", Ok("0.5%")),
            (" 100% ", Ok("100%")),
            ("50", Ok("50")),
            ("0", Err("at least 1 agent")),
            ("0%", Err("out of range")),
            ("101%", Err("out of range")),
            ("ten", Err("not a wave share")),
        ];
        for (input, expected) in cases {
            match (Share::parse(input), expected) {
                (Ok(share), Ok(text)) => assert_eq!(share.to_string(), text, "{input:?}"),
                (Err(err), Err(part)) => assert!(err.contains(part), "{input:?}: {err}"),
                (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn plans_must_grow_and_end_with_everyone() {
        assert!(
            Plan::new(&shares("10%,50%"), 0, Thresholds::default())
                .unwrap_err()
                .contains("must be 100%")
        );
        assert!(
            Plan::new(&shares("50%,10%,100%"), 0, Thresholds::default())
                .unwrap_err()
                .contains("must grow")
        );
        assert!(Plan::new(&[], 0, Thresholds::default()).is_err());
        assert!(Plan::new(&shares("5,50%,100%"), 0, Thresholds::default()).is_ok());
    }

    #[test]
    fn reach_is_exact_cumulative_and_bounds_the_canary() {
        let cases = [
            ("1%,10%,50%,100%", 1000, vec![10, 100, 500, 1000]),
            ("1%,10%,50%,100%", 19_000, vec![50, 1900, 9500, 19_000]),
            ("1%,10%,50%,100%", 3, vec![1, 1, 2, 3]),
            ("1%,10%,50%,100%", 0, vec![0, 0, 0, 0]),
            ("5,20,100%", 12, vec![5, 12, 12]),
            ("100%", 7, vec![7]),
        ];
        for (text, targets, expected) in cases {
            assert_eq!(
                plan(text).reach_over(targets),
                expected,
                "{text} over {targets}"
            );
        }
    }

    #[test]
    fn every_candidate_gets_one_wave_of_the_right_size() {
        let candidates: Vec<Candidate> = (0..1000)
            .map(|i| Candidate {
                agent_id: format!("agent-{i}"),
                group: format!("site-{}", i % 4),
            })
            .collect();
        let mut plan = plan("1%,10%,50%,100%");
        let waves = assign("r1", &candidates, &mut plan);
        assert_eq!(waves.len(), 1000);
        let size = |w: usize| waves.iter().filter(|(_, wave)| *wave == w).count();
        assert_eq!([size(0), size(1), size(2), size(3)], [10, 90, 400, 500]);
        for w in 0..4 {
            assert_eq!(plan.wave_size(w) as usize, size(w));
        }
        // The canary spans all four sites (10 agents: 3, 3, 2, 2).
        let canary_sites: std::collections::BTreeMap<String, usize> = waves
            .iter()
            .filter(|(_, w)| *w == 0)
            .map(|(id, _)| {
                let i: usize = id.trim_start_matches("agent-").parse().unwrap();
                format!("site-{}", i % 4)
            })
            .fold(Default::default(), |mut m, site| {
                *m.entry(site).or_default() += 1;
                m
            });
        assert_eq!(canary_sites.len(), 4, "{canary_sites:?}");
        assert!(canary_sites.values().all(|&n| (2..=3).contains(&n)));
        // Deterministic: the same rollout assigns the same waves, another rollout others.
        assert_eq!(assign("r1", &candidates, &mut plan.clone()), waves);
        assert_ne!(assign("r2", &candidates, &mut plan.clone()), waves);
    }

    #[test]
    fn latecomers_fall_in_waves_by_the_same_proportions() {
        let mut plan = plan("10%,50%,100%");
        plan.reach = plan.reach_over(1000);
        let mut counts = [0usize; 3];
        for i in 0..10_000 {
            counts[plan.wave_of_latecomer("r1", &format!("late-{i}"))] += 1;
        }
        // The canary holds at most 50 of 1,000, so: 5%, 45% and 50%, within sampling noise.
        assert_eq!(plan.reach, [50, 500, 1000]);
        assert!((380..620).contains(&counts[0]), "{counts:?}");
        assert!((4100..4900).contains(&counts[1]), "{counts:?}");
        assert!((4600..5400).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn a_plan_survives_its_json() {
        let mut plan = plan("1%,50,100%");
        plan.reach = vec![1, 50, 80];
        let json = serde_json::to_string(&plan).unwrap();
        assert!(json.contains(r#""share":"1%""#), "{json}");
        assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
    }
}
