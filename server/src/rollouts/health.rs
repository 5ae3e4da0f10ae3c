//! A rollout's health, from its own targets and tasks only: where each target stands
//! (stages that add up to the targets, so succeeded never exceeds targeted), a wave's
//! verdict against its thresholds, and the promote gate over a beta rollout. Pure: the
//! store brings the grouped rows.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::plan::{Thresholds, Wave};
use crate::store::{FailureClass, TargetGroup, TaskStatus};

/// Where one target of a rollout stands; every target is in exactly one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Stage {
    /// Its wave has not started.
    Waiting,
    /// Its wave started; no update is under way yet (offline, waiting for a download
    /// slot, or about to retry after a transient failure).
    Queued,
    /// Its wave started, and its site's (or client's) maintenance window is closed.
    OutsideWindow,
    /// Sent, downloading or verifying.
    Downloading,
    /// Installing the new build.
    Installing,
    /// Restarted into the new build, on probation until it connects and heartbeats.
    Probation,
    Succeeded,
    /// The build failed on it (class `build`).
    Failed,
    /// The new build did not prove itself; the previous one runs again.
    RolledBack,
    /// Its task was cancelled and nothing new is under way.
    Cancelled,
    /// Nothing is started on it while it is paused, declines updates, or updates are off.
    Skipped,
}

impl Stage {
    pub(crate) const ALL: [Stage; 11] = [
        Stage::Waiting,
        Stage::Queued,
        Stage::OutsideWindow,
        Stage::Downloading,
        Stage::Installing,
        Stage::Probation,
        Stage::Succeeded,
        Stage::Failed,
        Stage::RolledBack,
        Stage::Cancelled,
        Stage::Skipped,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Stage::Waiting => "waiting",
            Stage::Queued => "queued",
            Stage::OutsideWindow => "outside_window",
            Stage::Downloading => "downloading",
            Stage::Installing => "installing",
            Stage::Probation => "probation",
            Stage::Succeeded => "succeeded",
            Stage::Failed => "failed",
            Stage::RolledBack => "rolled_back",
            Stage::Cancelled => "cancelled",
            Stage::Skipped => "skipped",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// Why a target is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SkipReason {
    UpdatesOff,
    Paused,
    Declines,
}

/// What the stage of a target depends on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TargetFacts {
    pub(crate) wave_started: bool,
    pub(crate) paused: bool,
    pub(crate) auto_update: bool,
    pub(crate) updates_enabled: bool,
    /// The rollout obeys maintenance windows and the target's is closed now.
    pub(crate) outside_window: bool,
    /// Its newest task in this rollout.
    pub(crate) status: Option<TaskStatus>,
    pub(crate) class: Option<FailureClass>,
}

/// The one place that says where a target stands.
pub(crate) fn stage_of(facts: &TargetFacts) -> (Stage, Option<SkipReason>) {
    let active = facts.status.is_some_and(TaskStatus::is_active);
    if !active {
        match facts.status {
            Some(TaskStatus::Succeeded) => return (Stage::Succeeded, None),
            Some(TaskStatus::RolledBack) if facts.class == Some(FailureClass::Build) => {
                return (Stage::RolledBack, None);
            }
            Some(_) if facts.class == Some(FailureClass::Build) => return (Stage::Failed, None),
            _ => {}
        }
        let skip = if !facts.updates_enabled {
            Some(SkipReason::UpdatesOff)
        } else if facts.paused {
            Some(SkipReason::Paused)
        } else if !facts.auto_update {
            Some(SkipReason::Declines)
        } else {
            None
        };
        if let Some(reason) = skip {
            return (Stage::Skipped, Some(reason));
        }
        if facts.status == Some(TaskStatus::Cancelled) {
            return (Stage::Cancelled, None);
        }
        if !facts.wave_started {
            return (Stage::Waiting, None);
        }
        if facts.outside_window {
            return (Stage::OutsideWindow, None);
        }
        return (Stage::Queued, None);
    }
    match facts.status {
        Some(TaskStatus::Queued) => (Stage::Queued, None),
        Some(TaskStatus::Installing) => (Stage::Installing, None),
        Some(TaskStatus::Restarting) => (Stage::Probation, None),
        _ => (Stage::Downloading, None),
    }
}

/// Task outcomes by failure class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) struct ClassCounts {
    pub(crate) build: u64,
    pub(crate) environment: u64,
    pub(crate) transient: u64,
}

impl ClassCounts {
    pub(crate) fn add(&mut self, class: FailureClass, tasks: u64) {
        match class {
            FailureClass::Build => self.build += tasks,
            FailureClass::Environment => self.environment += tasks,
            FailureClass::Transient => self.transient += tasks,
        }
    }
}

/// Skipped targets by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub(crate) struct SkipCounts {
    pub(crate) paused: u64,
    pub(crate) declines_updates: u64,
    pub(crate) updates_off: u64,
}

/// The targets of a rollout (or one wave) by stage. The stages add up to `targeted`.
/// Also the form a closed rollout's frozen summary is stored in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub(crate) struct Counts {
    pub(crate) targeted: u64,
    pub(crate) waiting: u64,
    pub(crate) queued: u64,
    /// In a started wave, waiting for their maintenance window to open.
    pub(crate) outside_window: u64,
    pub(crate) downloading: u64,
    pub(crate) installing: u64,
    /// Restarted into the new build, on probation until it connects and heartbeats.
    pub(crate) probation: u64,
    /// `downloading`, `installing` and `probation` together.
    pub(crate) in_progress: u64,
    pub(crate) succeeded: u64,
    /// Of `succeeded`, those that stayed connected on the new version through the
    /// success bake.
    pub(crate) settled: u64,
    pub(crate) failed: u64,
    pub(crate) rolled_back: u64,
    pub(crate) cancelled: u64,
    pub(crate) skipped: u64,
    pub(crate) skipped_by: SkipCounts,
    /// Ended tasks by failure class (tasks, not targets: a target may retry).
    pub(crate) failures: ClassCounts,
    /// Build failures since the rollout last resumed: what a halt reads.
    pub(crate) recent_build_failures: u64,
}

impl Counts {
    fn add_target(&mut self, stage: Stage, skip: Option<SkipReason>, settled: bool, agents: u64) {
        self.targeted += agents;
        *self.stage_mut(stage) += agents;
        if matches!(
            stage,
            Stage::Downloading | Stage::Installing | Stage::Probation
        ) {
            self.in_progress += agents;
        }
        if stage == Stage::Succeeded && settled {
            self.settled += agents;
        }
        match skip {
            Some(SkipReason::Paused) => self.skipped_by.paused += agents,
            Some(SkipReason::Declines) => self.skipped_by.declines_updates += agents,
            Some(SkipReason::UpdatesOff) => self.skipped_by.updates_off += agents,
            None => {}
        }
    }

    /// The targets in `stage`.
    pub(crate) fn of(&self, stage: Stage) -> u64 {
        let mut copy = *self;
        *copy.stage_mut(stage)
    }

    fn stage_mut(&mut self, stage: Stage) -> &mut u64 {
        match stage {
            Stage::Waiting => &mut self.waiting,
            Stage::Queued => &mut self.queued,
            Stage::OutsideWindow => &mut self.outside_window,
            Stage::Downloading => &mut self.downloading,
            Stage::Installing => &mut self.installing,
            Stage::Probation => &mut self.probation,
            Stage::Succeeded => &mut self.succeeded,
            Stage::Failed => &mut self.failed,
            Stage::RolledBack => &mut self.rolled_back,
            Stage::Cancelled => &mut self.cancelled,
            Stage::Skipped => &mut self.skipped,
        }
    }

    /// Targets whose update has not ended yet (queued, outside their window or under
    /// way).
    pub(crate) fn unfinished(&self) -> u64 {
        self.queued + self.outside_window + self.in_progress
    }
}

/// Ended tasks of one wave in one failure class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClassGroup {
    pub(crate) wave: usize,
    pub(crate) class: FailureClass,
    pub(crate) tasks: u64,
    /// Of those, ended since the rollout last resumed.
    pub(crate) recent: u64,
}

/// Counts per wave from the store's grouped rows; waves past `current_wave` have not
/// started; `outside_window` says whether a group's maintenance window holds it now.
pub(crate) fn count_waves(
    waves: usize,
    current_wave: usize,
    updates_enabled: bool,
    targets: &[TargetGroup],
    classes: &[ClassGroup],
    in_scope: impl Fn(&TargetGroup) -> bool,
    outside_window: impl Fn(&TargetGroup) -> bool,
) -> Vec<Counts> {
    let mut counts = vec![Counts::default(); waves.max(1)];
    let last = counts.len() - 1;
    for group in targets.iter().filter(|g| in_scope(g)) {
        let wave = group.wave.min(last);
        let (stage, skip) = stage_of(&TargetFacts {
            wave_started: wave <= current_wave,
            paused: group.paused,
            auto_update: group.auto_update,
            updates_enabled,
            outside_window: outside_window(group),
            status: group.status,
            class: group.class,
        });
        counts[wave].add_target(stage, skip, group.settled, group.agents);
    }
    for class in classes {
        let wave = class.wave.min(last);
        counts[wave].failures.add(class.class, class.tasks);
        if class.class == FailureClass::Build {
            counts[wave].recent_build_failures += class.recent;
        }
    }
    counts
}

/// Sums per-wave counts.
pub(crate) fn total(waves: &[Counts]) -> Counts {
    let mut sum = Counts::default();
    for w in waves {
        sum.targeted += w.targeted;
        sum.waiting += w.waiting;
        sum.queued += w.queued;
        sum.outside_window += w.outside_window;
        sum.downloading += w.downloading;
        sum.installing += w.installing;
        sum.probation += w.probation;
        sum.in_progress += w.in_progress;
        sum.succeeded += w.succeeded;
        sum.settled += w.settled;
        sum.failed += w.failed;
        sum.rolled_back += w.rolled_back;
        sum.cancelled += w.cancelled;
        sum.skipped += w.skipped;
        sum.skipped_by.paused += w.skipped_by.paused;
        sum.skipped_by.declines_updates += w.skipped_by.declines_updates;
        sum.skipped_by.updates_off += w.skipped_by.updates_off;
        sum.failures.build += w.failures.build;
        sum.failures.environment += w.failures.environment;
        sum.failures.transient += w.failures.transient;
        sum.recent_build_failures += w.recent_build_failures;
    }
    sum
}

/// What a wave's thresholds say now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum WaveVerdict {
    /// Over a failure threshold: the rollout halts, with this reason.
    Halt(String),
    /// Enough of it succeeded: it may bake, then the next wave starts.
    Passed,
    /// Not yet: this many successes needed, this many so far.
    Pending { needed: u64, succeeded: u64 },
}

/// Judges wave `index` of `counts` by its thresholds. Only build failures since the last
/// resume count; transient and environment failures never halt anything.
pub(crate) fn judge(index: usize, wave: &Wave, counts: &Counts) -> WaveVerdict {
    let Thresholds {
        max_failure_rate,
        min_finished,
        max_failures,
        min_success_share,
    } = wave.thresholds;
    let failures = counts.recent_build_failures;
    if let Some(max) = max_failures
        && failures > max
    {
        return WaveVerdict::Halt(format!(
            "wave {} has {failures} build failures, over the limit of {max}",
            index + 1
        ));
    }
    let judged = counts.succeeded + failures;
    let enough = min_finished.min(counts.targeted).max(1);
    if judged >= enough && failures as f64 > max_failure_rate * judged as f64 {
        return WaveVerdict::Halt(format!(
            "wave {}: {failures} of {judged} finished updates failed ({:.0}%, over the {:.0}% limit)",
            index + 1,
            failures as f64 * 100.0 / judged as f64,
            max_failure_rate * 100.0
        ));
    }
    let members = counts.targeted - counts.skipped;
    if counts.targeted == 0 {
        return WaveVerdict::Passed;
    }
    // A wave whose every member is skipped proves nothing: it waits for an operator.
    let needed = ((min_success_share * members as f64).ceil() as u64).max(1);
    if counts.succeeded >= needed {
        WaveVerdict::Passed
    } else {
        WaveVerdict::Pending {
            needed,
            succeeded: counts.succeeded,
        }
    }
}

/// The promote gate's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GatePolicy {
    /// Settled successes among beta-channel agents.
    pub(crate) min_successes: u64,
    /// Build failures over finished updates must stay under this share.
    pub(crate) max_failure_rate: f64,
    /// Unfinished updates over targets must not exceed this share.
    pub(crate) max_unfinished: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub(crate) struct GateVerdict {
    pub(crate) pass: bool,
    pub(crate) reason: String,
}

/// The promote gate over the beta rollout's counts (beta-channel targets on the
/// platforms in scope). The reason names the condition and its numbers.
pub(crate) fn gate(beta: Option<&Counts>, policy: &GatePolicy) -> GateVerdict {
    let fail = |reason: String| GateVerdict {
        pass: false,
        reason,
    };
    let Some(counts) = beta else {
        return fail("no beta rollout of this version".into());
    };
    let plural = |n: u64| if n == 1 { "success" } else { "successes" };
    if counts.settled < policy.min_successes {
        let baking = counts.succeeded - counts.settled;
        return fail(format!(
            "{} of the {} beta {} needed{} ({} build failures)",
            counts.settled,
            policy.min_successes,
            plural(policy.min_successes),
            if baking > 0 {
                format!(", {baking} more still in the success bake")
            } else {
                String::new()
            },
            counts.failures.build
        ));
    }
    let finished = counts.succeeded + counts.failures.build;
    let rate = counts.failures.build as f64 / finished.max(1) as f64;
    if rate >= policy.max_failure_rate && counts.failures.build > 0 {
        return fail(format!(
            "build failure rate {:.0}% is not under the {:.0}% limit ({} failed, {} succeeded)",
            rate * 100.0,
            policy.max_failure_rate * 100.0,
            counts.failures.build,
            counts.succeeded
        ));
    }
    let unfinished = counts.unfinished();
    if unfinished as f64 > policy.max_unfinished * counts.targeted as f64 {
        return fail(format!(
            "{unfinished} of {} beta updates are unfinished, over the {:.0}% allowed",
            counts.targeted,
            policy.max_unfinished * 100.0
        ));
    }
    GateVerdict {
        pass: true,
        reason: format!(
            "{} beta {}, {} build failures ({:.0}%)",
            counts.settled,
            plural(counts.settled),
            counts.failures.build,
            rate * 100.0
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollouts::plan::{Plan, Share};

    fn facts(status: Option<TaskStatus>, class: Option<FailureClass>) -> TargetFacts {
        TargetFacts {
            wave_started: true,
            paused: false,
            auto_update: true,
            updates_enabled: true,
            outside_window: false,
            status,
            class,
        }
    }

    #[test]
    fn every_target_has_one_stage() {
        use FailureClass::*;
        use TaskStatus::*;
        let cases = [
            (facts(None, None), Stage::Queued),
            (
                TargetFacts {
                    wave_started: false,
                    ..facts(None, None)
                },
                Stage::Waiting,
            ),
            (facts(Some(Queued), None), Stage::Queued),
            (facts(Some(Dispatched), None), Stage::Downloading),
            (facts(Some(Verifying), None), Stage::Downloading),
            (facts(Some(Restarting), None), Stage::Probation),
            (facts(Some(Succeeded), None), Stage::Succeeded),
            (facts(Some(Failed), Some(Build)), Stage::Failed),
            (facts(Some(TimedOut), Some(Build)), Stage::Failed),
            (facts(Some(RolledBack), Some(Build)), Stage::RolledBack),
            // Not the build's fault: retried.
            (facts(Some(Failed), Some(Transient)), Stage::Queued),
            (facts(Some(Failed), Some(Environment)), Stage::Queued),
            (facts(Some(TimedOut), Some(Transient)), Stage::Queued),
            (facts(Some(Cancelled), Some(Transient)), Stage::Cancelled),
            (
                TargetFacts {
                    paused: true,
                    ..facts(Some(Cancelled), Some(Transient))
                },
                Stage::Skipped,
            ),
            (
                TargetFacts {
                    auto_update: false,
                    ..facts(None, None)
                },
                Stage::Skipped,
            ),
            (
                TargetFacts {
                    updates_enabled: false,
                    wave_started: false,
                    ..facts(None, None)
                },
                Stage::Skipped,
            ),
            // A closed window holds an agent whose wave started and that has nothing
            // under way; a task already under way goes on, and a pause still wins.
            (
                TargetFacts {
                    outside_window: true,
                    ..facts(Some(Failed), Some(Transient))
                },
                Stage::OutsideWindow,
            ),
            (
                TargetFacts {
                    outside_window: true,
                    wave_started: false,
                    ..facts(None, None)
                },
                Stage::Waiting,
            ),
            (
                TargetFacts {
                    outside_window: true,
                    ..facts(Some(Downloading), None)
                },
                Stage::Downloading,
            ),
            (
                TargetFacts {
                    outside_window: true,
                    paused: true,
                    ..facts(None, None)
                },
                Stage::Skipped,
            ),
            // What happened stays: a paused agent that succeeded counts as a success.
            (
                TargetFacts {
                    paused: true,
                    ..facts(Some(Succeeded), None)
                },
                Stage::Succeeded,
            ),
            // An active task is shown as it is, paused or not, until it is cancelled.
            (
                TargetFacts {
                    paused: true,
                    ..facts(Some(Downloading), None)
                },
                Stage::Downloading,
            ),
        ];
        for (facts, stage) in cases {
            assert_eq!(stage_of(&facts).0, stage, "{facts:?}");
        }
    }

    fn group(
        wave: usize,
        status: Option<TaskStatus>,
        class: Option<FailureClass>,
        agents: u64,
    ) -> TargetGroup {
        TargetGroup {
            wave,
            os: "linux".into(),
            arch: "amd64".into(),
            channel: "stable".into(),
            paused: false,
            auto_update: true,
            status,
            class,
            settled: false,
            window: None,
            agents,
        }
    }

    #[test]
    fn stages_add_up_to_the_targets_and_succeeded_never_exceeds_them() {
        use TaskStatus::*;
        let targets = [
            group(0, Some(Succeeded), None, 8),
            group(0, Some(RolledBack), Some(FailureClass::Build), 1),
            group(0, Some(Failed), Some(FailureClass::Transient), 1),
            group(1, None, None, 85),
            TargetGroup {
                window: Some("closed".into()),
                ..group(1, None, None, 5)
            },
            TargetGroup {
                window: Some("closed".into()),
                ..group(0, None, None, 2)
            },
        ];
        // Three tasks failed transiently on the way (retries), one was a build failure.
        let classes = [
            ClassGroup {
                wave: 0,
                class: FailureClass::Transient,
                tasks: 3,
                recent: 3,
            },
            ClassGroup {
                wave: 0,
                class: FailureClass::Build,
                tasks: 1,
                recent: 0,
            },
        ];
        let waves = count_waves(
            2,
            0,
            true,
            &targets,
            &classes,
            |_| true,
            |g| g.window.is_some(),
        );
        let sum = total(&waves);
        assert_eq!(sum.targeted, 102);
        assert_eq!(
            Stage::ALL
                .into_iter()
                .map(|stage| sum.of(stage))
                .sum::<u64>(),
            sum.targeted
        );
        assert_eq!(
            sum.waiting
                + sum.queued
                + sum.outside_window
                + sum.in_progress
                + sum.succeeded
                + sum.failed
                + sum.rolled_back
                + sum.cancelled
                + sum.skipped,
            sum.targeted
        );
        assert_eq!(
            (waves[0].succeeded, waves[0].rolled_back, waves[0].queued),
            (8, 1, 1)
        );
        // Outside their window only once their wave started.
        assert_eq!(waves[0].outside_window, 2);
        assert_eq!(waves[1].waiting, 90);
        assert_eq!(sum.unfinished(), 3);
        assert_eq!(sum.failures.transient, 3);
        // The build failure ended before the last resume: it no longer counts for a halt.
        assert_eq!(sum.recent_build_failures, 0);
    }

    fn wave(thresholds: Thresholds) -> Wave {
        let mut plan = Plan::new(&[Share::EVERYONE], 0, thresholds).unwrap();
        plan.waves.remove(0)
    }

    fn counts(targeted: u64, succeeded: u64, recent_failures: u64, skipped: u64) -> Counts {
        Counts {
            targeted,
            succeeded,
            recent_build_failures: recent_failures,
            skipped,
            ..Counts::default()
        }
    }

    #[test]
    fn a_wave_halts_on_build_failures_and_passes_on_successes() {
        let w = wave(Thresholds::default());
        let cases = [
            // 10-agent canary: five finished with one failure is 20%, over 10%.
            (counts(10, 4, 1, 0), "halt"),
            (counts(10, 9, 1, 0), "passed"),
            (counts(10, 2, 0, 0), "pending"),
            (counts(10, 5, 0, 0), "passed"),
            // Every failure of a small wave counts at once.
            (counts(1, 0, 1, 0), "halt"),
            (counts(3, 0, 3, 0), "halt"),
            // Fewer finished than the minimum: no rate yet.
            (counts(100, 3, 1, 0), "pending"),
            // All members skipped: nothing proves the build.
            (counts(4, 0, 0, 4), "pending"),
            (counts(0, 0, 0, 0), "passed"),
        ];
        for (c, expected) in cases {
            let got = match judge(0, &w, &c) {
                WaveVerdict::Halt(_) => "halt",
                WaveVerdict::Passed => "passed",
                WaveVerdict::Pending { .. } => "pending",
            };
            assert_eq!(got, expected, "{c:?}");
        }
        let capped = wave(Thresholds {
            max_failures: Some(2),
            ..Thresholds::default()
        });
        match judge(1, &capped, &counts(1000, 900, 3, 0)) {
            WaveVerdict::Halt(reason) => assert!(reason.contains("wave 2 has 3 build failures")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_gate_names_the_condition_that_failed() {
        let policy = GatePolicy {
            min_successes: 3,
            max_failure_rate: 0.1,
            max_unfinished: 0.5,
        };
        let beta = |succeeded, settled, build_failures, queued, targeted| Counts {
            targeted,
            succeeded,
            settled,
            queued,
            failures: ClassCounts {
                build: build_failures,
                ..ClassCounts::default()
            },
            ..Counts::default()
        };
        let cases = [
            (None, false, "no beta rollout"),
            (
                Some(beta(2, 2, 0, 0, 3)),
                false,
                "2 of the 3 beta successes",
            ),
            (
                Some(beta(3, 1, 0, 0, 3)),
                false,
                "2 more still in the success bake",
            ),
            (
                Some(beta(3, 3, 0, 0, 3)),
                true,
                "3 beta successes, 0 build failures",
            ),
            (
                Some(beta(9, 9, 1, 0, 10)),
                false,
                "10% is not under the 10% limit",
            ),
            (Some(beta(18, 18, 1, 0, 19)), true, "1 build failures (5%)"),
            (
                Some(beta(3, 3, 0, 7, 10)),
                false,
                "7 of 10 beta updates are unfinished",
            ),
        ];
        for (counts, pass, reason) in cases {
            let verdict = gate(counts.as_ref(), &policy);
            assert_eq!(verdict.pass, pass, "{counts:?}: {}", verdict.reason);
            assert!(
                verdict.reason.contains(reason),
                "{counts:?}: {}",
                verdict.reason
            );
        }
    }
}
