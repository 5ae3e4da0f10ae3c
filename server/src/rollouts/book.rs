//! The rollouts dispatch consults, held in memory so a heartbeat never queries them, and
//! the one rule that says whether an agent may be started on a version now: under which
//! rollout and wave, or why not. Explain asks the same function, so it cannot disagree
//! with dispatch.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::plan::Plan;
use crate::releases::Channel;
use crate::store::{Rollout, RolloutKind, RolloutState};

/// One rollout as dispatch sees it.
#[derive(Debug)]
pub(crate) struct LiveRollout {
    pub(crate) record: Rollout,
    pub(crate) plan: Plan,
    /// Targets and their waves; loaded only while the rollout can still start agents.
    pub(crate) targets: HashMap<String, usize>,
    /// Agents that joined since the book was loaded (already written to the store).
    joined: Mutex<HashMap<String, usize>>,
}

impl LiveRollout {
    pub(crate) fn new(record: Rollout, plan: Plan, targets: HashMap<String, usize>) -> LiveRollout {
        LiveRollout {
            record,
            plan,
            targets,
            joined: Mutex::default(),
        }
    }

    fn covers(&self, os: &str, arch: &str) -> bool {
        self.record
            .platforms
            .iter()
            .any(|(o, a)| o == os && a == arch)
    }

    pub(crate) fn wave_of(&self, agent_id: &str) -> Option<usize> {
        self.targets.get(agent_id).copied().or_else(|| {
            self.joined
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(agent_id)
                .copied()
        })
    }

    /// Records that an agent joined (after the store has it).
    pub(crate) fn note_joined(&self, agent_id: &str, wave: usize) {
        self.joined
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(agent_id.to_owned(), wave);
    }
}

/// The targets of a rollout its node has just written, handed to the book so that it
/// need not read them back (a promote to the whole fleet writes thousands).
#[derive(Debug)]
pub(crate) struct KnownTargets {
    pub(crate) rollout_id: String,
    pub(crate) targets: HashMap<String, usize>,
}

impl KnownTargets {
    pub(crate) fn new(rollout_id: &str, targets: Vec<(String, usize)>) -> KnownTargets {
        KnownTargets {
            rollout_id: rollout_id.to_owned(),
            targets: targets.into_iter().collect(),
        }
    }
}

/// Every rollout that can matter to dispatch, newest first, indexed so that a heartbeat
/// looks at the rollouts of one version and the open targeted ones only.
#[derive(Debug, Default)]
pub(crate) struct Book {
    rollouts: Vec<LiveRollout>,
    /// Positions in `rollouts` by version, newest first.
    by_version: HashMap<String, Vec<usize>>,
    /// Positions of the open targeted rollouts, newest first.
    open_targeted: Vec<usize>,
}

/// What admission says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Start the agent now, under this rollout and wave.
    Go { rollout_id: String, wave: usize },
    /// The agent is new to this rollout: record it as a target of `wave` first; it may
    /// start if `started`.
    Join {
        rollout_id: String,
        wave: usize,
        started: bool,
    },
    /// Not under this rollout, and why: an update under way to it is stopped.
    Hold(String),
    /// Not yet, and why (its wave has not started, or the rollout is paused or halted):
    /// an update under way goes on.
    Wait(String),
}

/// Who asks: an agent, the version it would be moved to, and how.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asking<'a> {
    pub(crate) agent_id: &'a str,
    pub(crate) channel: Channel,
    pub(crate) os: &'a str,
    pub(crate) arch: &'a str,
    /// The version the rollout is about: the new build for an update, the rolled-back
    /// version for a rollback.
    pub(crate) version: &'a str,
    pub(crate) rollback: bool,
}

impl Book {
    pub(crate) fn new(mut rollouts: Vec<LiveRollout>) -> Book {
        rollouts.sort_by(|a, b| {
            (b.record.created_at_ms, &b.record.id).cmp(&(a.record.created_at_ms, &a.record.id))
        });
        let mut by_version: HashMap<String, Vec<usize>> = HashMap::new();
        let mut open_targeted = Vec::new();
        for (at, rollout) in rollouts.iter().enumerate() {
            by_version
                .entry(rollout.record.version.clone())
                .or_default()
                .push(at);
            if rollout.record.kind == RolloutKind::Targeted && rollout.record.state.is_open() {
                open_targeted.push(at);
            }
        }
        Book {
            rollouts,
            by_version,
            open_targeted,
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<&LiveRollout> {
        self.rollouts.iter().find(|r| r.record.id == id)
    }

    pub(crate) fn rollouts(&self) -> impl Iterator<Item = &LiveRollout> {
        self.rollouts.iter()
    }

    /// Targeted rollouts that still want to move this agent, newest first: an operator
    /// chose the version, so it is offered even where the channel would not offer it.
    pub(crate) fn targeted_for(&self, agent_id: &str) -> Option<&LiveRollout> {
        self.open_targeted
            .iter()
            .map(|&at| &self.rollouts[at])
            .find(|r| r.wave_of(agent_id).is_some())
    }

    /// Halted versions on each platform, for the listing and metrics.
    pub(crate) fn halted(&self) -> HashSet<(String, String, String)> {
        self.rollouts
            .iter()
            .filter(|r| r.record.state == RolloutState::Halted)
            .flat_map(|r| {
                r.record
                    .platforms
                    .iter()
                    .map(|(os, arch)| (r.record.version.clone(), os.clone(), arch.clone()))
            })
            .collect()
    }

    /// May this agent be started on this version now?
    pub(crate) fn admit(&self, asking: &Asking<'_>) -> Admission {
        let Some(rollout) = self.governing(asking) else {
            return Admission::Hold(format!(
                "no rollout of {} covers this agent yet",
                asking.version
            ));
        };
        let id = &rollout.record.id;
        let state = rollout.record.state;
        match state {
            RolloutState::Running | RolloutState::Waiting | RolloutState::Completed => {}
            RolloutState::Paused => return Admission::Wait(format!("rollout {id} is paused")),
            RolloutState::Halted => {
                return Admission::Wait(format!(
                    "rollout {id} is halted: {}",
                    rollout.record.reason.as_deref().unwrap_or("by an operator")
                ));
            }
            RolloutState::Aborted => return Admission::Hold(format!("rollout {id} was aborted")),
            RolloutState::Superseded => {
                return Admission::Hold(format!(
                    "rollout {id} was superseded{}",
                    rollout
                        .record
                        .reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ));
            }
        }
        let current = usize::try_from(rollout.record.current_wave).unwrap_or(0);
        // A newcomer becomes a target, so the rollout's counts include it; after the
        // rollout completed, it joins the last wave (everyone).
        let (wave, joining) = match rollout.wave_of(asking.agent_id) {
            Some(wave) => (wave, false),
            None if state == RolloutState::Completed => (rollout.plan.last_wave(), true),
            None => (rollout.plan.wave_of_latecomer(id, asking.agent_id), true),
        };
        let started = state == RolloutState::Completed || wave <= current;
        if joining {
            return Admission::Join {
                rollout_id: id.clone(),
                wave,
                started,
            };
        }
        if started {
            Admission::Go {
                rollout_id: id.clone(),
                wave,
            }
        } else {
            Admission::Wait(waiting_for_wave(id, wave))
        }
    }

    /// The rollout whose rules apply: a rollback of the version the agent runs; else the
    /// version's beta rollout for a beta agent (its promote rollout when there is none),
    /// its promote rollout for a stable one. The newest of the kind decides.
    fn governing(&self, asking: &Asking<'_>) -> Option<&LiveRollout> {
        let of_version = self
            .by_version
            .get(asking.version)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let of_kind = |kind: RolloutKind| {
            of_version
                .iter()
                .map(|&at| &self.rollouts[at])
                .find(|r| r.record.kind == kind && r.covers(asking.os, asking.arch))
        };
        if asking.rollback {
            return of_kind(RolloutKind::Rollback);
        }
        match asking.channel {
            Channel::Beta => of_kind(RolloutKind::Beta).or_else(|| of_kind(RolloutKind::Promote)),
            Channel::Stable => of_kind(RolloutKind::Promote),
        }
    }
}

pub(crate) fn waiting_for_wave(rollout_id: &str, wave: usize) -> String {
    format!(
        "waiting for wave {} of rollout {rollout_id}, which has not started",
        wave + 1
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollouts::plan::{Share, Thresholds};

    fn rollout(
        id: &str,
        version: &str,
        kind: RolloutKind,
        state: RolloutState,
        current_wave: i64,
        created: i64,
        targets: &[(&str, usize)],
    ) -> LiveRollout {
        let mut plan = Plan::new(
            &[Share::BasisPoints(1000), Share::EVERYONE],
            0,
            Thresholds::default(),
        )
        .unwrap();
        plan.reach = vec![1, 10];
        LiveRollout::new(
            Rollout {
                id: id.into(),
                version: version.into(),
                kind,
                platforms: vec![("linux".into(), "amd64".into())],
                state,
                plan: String::new(),
                current_wave,
                resumed_at_ms: 0,
                reason: Some("3 of 5 failed".into()),
                started_by: "op".into(),
                created_at_ms: created,
                updated_at_ms: created,
                summary: None,
            },
            plan,
            targets.iter().map(|(a, w)| ((*a).to_owned(), *w)).collect(),
        )
    }

    /// The reason of a `Hold` or `Wait`.
    fn reason_of(admission: &Admission) -> Option<&str> {
        match admission {
            Admission::Hold(reason) | Admission::Wait(reason) => Some(reason),
            _ => None,
        }
    }

    fn asking<'a>(agent: &'a str, channel: Channel, version: &'a str) -> Asking<'a> {
        Asking {
            agent_id: agent,
            channel,
            os: "linux",
            arch: "amd64",
            version,
            rollback: false,
        }
    }

    #[test]
    fn only_started_waves_go() {
        use RolloutKind::*;
        use RolloutState::*;
        let book = Book::new(vec![rollout(
            "p1",
            "1.1.0",
            Promote,
            Running,
            0,
            10,
            &[("a", 0), ("b", 1)],
        )]);
        let stable = |agent| book.admit(&asking(agent, Channel::Stable, "1.1.0"));
        assert!(matches!(stable("a"), Admission::Go { wave: 0, .. }));
        assert_eq!(stable("b"), Admission::Wait(waiting_for_wave("p1", 1)));
        // A newcomer joins a wave of its own.
        assert!(matches!(stable("c"), Admission::Join { .. }));
        // Another platform has no rollout.
        let mut other = asking("a", Channel::Stable, "1.1.0");
        other.os = "windows";
        assert!(matches!(book.admit(&other), Admission::Hold(r) if r.contains("no rollout")));
    }

    #[test]
    fn the_state_of_the_newest_rollout_decides() {
        use RolloutKind::*;
        use RolloutState::*;
        let cases = [
            (Paused, "is paused"),
            (Halted, "is halted: 3 of 5 failed"),
            (Aborted, "was aborted"),
            (Superseded, "was superseded"),
        ];
        for (state, reason) in cases {
            let book = Book::new(vec![
                rollout("old", "1.1.0", Promote, Completed, 1, 1, &[]),
                rollout("new", "1.1.0", Promote, state, 1, 2, &[("a", 0)]),
            ]);
            let admission = book.admit(&asking("a", Channel::Stable, "1.1.0"));
            let why = reason_of(&admission).unwrap_or_else(|| panic!("{state:?}: {admission:?}"));
            assert!(why.contains(reason), "{state:?}: {why}");
            // A paused or halted rollout lets what is under way go on; an ended one not.
            assert_eq!(
                matches!(admission, Admission::Wait(_)),
                matches!(state, Paused | Halted),
                "{state:?}"
            );
        }
        // A completed rollout lets anyone in, as a target of its last wave.
        let book = Book::new(vec![rollout("p", "1.1.0", Promote, Completed, 1, 1, &[])]);
        assert!(matches!(
            book.admit(&asking("z", Channel::Stable, "1.1.0")),
            Admission::Join {
                wave: 1,
                started: true,
                ..
            }
        ));
    }

    #[test]
    fn beta_agents_follow_the_beta_rollout_and_stable_ones_the_promote() {
        use RolloutKind::*;
        use RolloutState::*;
        let book = Book::new(vec![
            rollout("b", "1.1.0", Beta, Completed, 0, 1, &[]),
            rollout("p", "1.1.0", Promote, Halted, 0, 2, &[]),
        ]);
        assert!(matches!(
            book.admit(&asking("x", Channel::Beta, "1.1.0")),
            Admission::Join { ref rollout_id, started: true, .. } if rollout_id == "b"
        ));
        assert!(matches!(
            book.admit(&asking("x", Channel::Stable, "1.1.0")),
            Admission::Wait(r) if r.contains("rollout p is halted")
        ));
        // A beta build never reaches a stable agent through the beta rollout.
        let beta_only = Book::new(vec![rollout("b", "1.2.0", Beta, Running, 0, 1, &[])]);
        assert!(matches!(
            beta_only.admit(&asking("x", Channel::Stable, "1.2.0")),
            Admission::Hold(_)
        ));
        // A rollback is governed by the rollback of the version the agent runs.
        let rollback = Book::new(vec![
            rollout("p", "1.1.0", Promote, Running, 3, 1, &[]),
            rollout("r", "1.1.0", Rollback, Paused, 0, 2, &[("x", 0)]),
        ]);
        let mut back = asking("x", Channel::Stable, "1.1.0");
        back.rollback = true;
        assert!(
            matches!(rollback.admit(&back), Admission::Wait(r) if r.contains("rollout r is paused"))
        );
    }

    #[test]
    fn targeted_rollouts_reach_only_their_members() {
        use RolloutKind::*;
        use RolloutState::*;
        let book = Book::new(vec![rollout(
            "t",
            "1.3.0",
            Targeted,
            Running,
            0,
            1,
            &[("a", 0)],
        )]);
        assert!(book.targeted_for("a").is_some());
        assert!(book.targeted_for("b").is_none());
        let done = Book::new(vec![rollout(
            "t",
            "1.3.0",
            Targeted,
            Aborted,
            0,
            1,
            &[("a", 0)],
        )]);
        assert!(done.targeted_for("a").is_none());
    }
}
