//! The conductor: the one place that starts rollouts, moves them through their waves,
//! halts, pauses, resumes, advances, aborts and rolls back. The API, the sessions, the
//! wave ticker and other nodes' signals all call it; the decisions are the pure
//! functions of `rollouts`, and every change is written to the store before anyone acts
//! on it.

use std::collections::HashMap;
use std::time::Duration;

use crate::AppState;
use crate::clock::now_ms;
use crate::engine::{AgentPosition, channel_admits, resolve_candidate_channel};
use crate::maintenance::closed_until;
use crate::releases::{Channel, Release, ReleaseIndex};
use crate::rollouts::book::{Book, KnownTargets, LiveRollout};
use crate::rollouts::health::{self, Counts, GateVerdict, WaveVerdict};
use crate::rollouts::plan::{self, Candidate, Plan};
use crate::session::Outbound;
use crate::store::{
    AgentRecord, CandidateRecord, NewRollout, Rollout, RolloutFilter, RolloutKind, RolloutState,
    StateChange, StoreError, StoreResult, WaveRow,
};

/// What went wrong with an operator's request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConductError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) type Conducted<T> = Result<T, ConductError>;

/// A rollout to start.
#[derive(Debug, Clone)]
pub(crate) struct Start {
    /// A fixed id makes the start idempotent across nodes (the store refuses a second).
    pub(crate) id: Option<String>,
    pub(crate) version: String,
    pub(crate) kind: RolloutKind,
    pub(crate) platforms: Vec<(String, String)>,
    pub(crate) plan: Plan,
    pub(crate) started_by: String,
    pub(crate) detail: String,
    pub(crate) candidates: Vec<Candidate>,
}

/// Starts a rollout: places its targets in waves, supersedes the open rollouts of the
/// same kind on its platforms (of other versions), and tells every node.
pub(crate) async fn start(state: &AppState, start: Start) -> StoreResult<Rollout> {
    let rollout = start_untold(state, start).await?;
    announce(state, &[&rollout.id]);
    Ok(rollout)
}

/// Starts a rollout as `start` does, and this node's book holds it, but no agent and no
/// other node is told yet: the caller announces it once what else it changes is in place
/// (a promote's builds read stable), so every agent checks once, when it can move.
pub(crate) async fn start_untold(state: &AppState, start: Start) -> StoreResult<Rollout> {
    let (rollout, targets) = record_start(state, start).await?;
    reread_book_knowing(state, Some(KnownTargets::new(&rollout.id, targets))).await;
    Ok(rollout)
}

/// Writes a rollout's start (as `start` does) without telling anyone yet; answers the
/// rollout and the targets it wrote.
async fn record_start(
    state: &AppState,
    start: Start,
) -> StoreResult<(Rollout, Vec<(String, usize)>)> {
    let id = start
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut plan = start.plan;
    let targets = plan::assign(&id, &start.candidates, &mut plan);
    let supersedes: Vec<String> = match start.kind {
        RolloutKind::Beta | RolloutKind::Promote => state
            .book()
            .rollouts()
            .filter(|r| {
                r.record.kind == start.kind
                    && r.record.state.is_open()
                    && r.record.version != start.version
                    && r.record
                        .platforms
                        .iter()
                        .any(|p| start.platforms.contains(p))
            })
            .map(|r| r.record.id.clone())
            .collect(),
        RolloutKind::Rollback | RolloutKind::Targeted => Vec::new(),
    };
    let plan_json = serde_json::to_string(&plan)
        .map_err(|e| StoreError::Other(format!("could not write the plan: {e}")))?;
    let rollout = state
        .store
        .create_rollout(
            &NewRollout {
                id: &id,
                version: &start.version,
                kind: start.kind,
                platforms: &start.platforms,
                plan: &plan_json,
                started_by: &start.started_by,
                detail: &start.detail,
                targets: &targets,
                supersedes: &supersedes,
            },
            now_ms(),
        )
        .await?;
    tracing::info!(rollout = %rollout.id, version = %rollout.version, kind = rollout.kind.as_str(), targets = targets.len(), by = %rollout.started_by, "rollout started");
    Ok((rollout, targets))
}

/// The promote rollout of `version` that a promote would only repeat: every build of the
/// version is stable already and a promote rollout of it over all of `platforms` is
/// under way or completed (not aborted or superseded).
pub(crate) fn promoted_already(
    state: &AppState,
    version: &str,
    platforms: &[(String, String)],
    all_stable: bool,
) -> Option<Rollout> {
    if !all_stable {
        return None;
    }
    state
        .book()
        .rollouts()
        .find(|r| {
            r.record.kind == RolloutKind::Promote
                && r.record.version == version
                && !matches!(
                    r.record.state,
                    RolloutState::Aborted | RolloutState::Superseded
                )
                && platforms.iter().all(|p| r.record.platforms.contains(p))
        })
        .map(|r| r.record.clone())
}

/// After a rollout changed: every node re-reads the book and checks its agents.
async fn changed(state: &AppState, rollout_id: &str) {
    reread_book(state).await;
    announce(state, &[rollout_id]);
}

async fn reread_book(state: &AppState) {
    reread_book_knowing(state, None).await;
}

/// Re-reads the book, taking the targets of a rollout this node has just started from
/// memory rather than reading them back.
async fn reread_book_knowing(state: &AppState, known: Option<KnownTargets>) {
    if let Err(err) = state.reload_rollout_state(known).await {
        tracing::warn!(%err, "could not re-read the rollouts");
    }
}

/// Tells the dashboards about changed rollouts, and every node to check its agents
/// (once, however many changed).
pub(crate) fn announce(state: &AppState, rollout_ids: &[&str]) {
    for id in rollout_ids {
        state.events.rollout(Some(id));
    }
    state.registry.broadcast(|| Outbound::Check);
}

/// The agents a beta or promote rollout of `version` moves on `platforms`: those whose
/// channel sees a build of `channel` and that run something older.
pub(crate) fn candidates(
    agents: &[CandidateRecord],
    version: &semver::Version,
    platforms: &[(String, String)],
    audience: impl Fn(Channel) -> bool,
) -> Vec<Candidate> {
    agents
        .iter()
        .filter(|a| platforms.iter().any(|(o, r)| *o == a.os && *r == a.arch))
        .filter(|a| audience(resolve_candidate_channel(a)))
        .filter(|a| semver::Version::parse(&a.version).is_ok_and(|v| v < *version))
        .map(candidate_of_record)
        .collect()
}

fn candidate_of_record(agent: &CandidateRecord) -> Candidate {
    candidate_of(&agent.id, &agent.site_id, &agent.os, &agent.arch)
}

pub(crate) fn candidate(agent: &AgentRecord) -> Candidate {
    candidate_of(&agent.id, &agent.site_id, &agent.os, &agent.arch)
}

/// A candidate is placed in the waves within its group: its site and os/arch.
fn candidate_of(id: &str, site_id: &str, os: &str, arch: &str) -> Candidate {
    Candidate {
        agent_id: id.to_owned(),
        group: format!("{site_id}/{os}/{arch}"),
    }
}

/// The plan a promote gets unless it names one.
pub(crate) fn default_plan(state: &AppState) -> Plan {
    let settings = &state.settings;
    Plan::new(
        &settings.default_waves,
        duration_ms(settings.wave_bake),
        settings.wave_thresholds,
    )
    .expect("the default waves were checked at start")
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Every offered build has a rollout: a build that lands on beta starts a `beta`
/// rollout over beta agents, one that lands on stable a `promote` rollout with the
/// default plan. Ids are fixed per build, so two nodes seeing it start one. Builds that
/// land together (several published at once, or found at a first start) start oldest
/// first, so each supersedes the older ones and the newest is the one under way; the
/// nodes are told once.
pub(crate) async fn start_rollouts_of_new_builds(state: &AppState) {
    let index = state.releases.current();
    let mut oldest_first: Vec<&Release> = index.releases.iter().collect();
    oldest_first.sort_by(|a, b| a.version.cmp(&b.version));
    let mut agents: Option<Vec<CandidateRecord>> = None;
    let mut started = Vec::new();
    for release in oldest_first {
        let kind = match release.channel {
            Channel::Beta => RolloutKind::Beta,
            Channel::Stable => RolloutKind::Promote,
        };
        let version = release.version.to_string();
        let platform = (release.os.clone(), release.arch.clone());
        if state.blocked_versions().contains(&version) {
            continue;
        }
        let known = state.book().rollouts().any(|r| {
            r.record.version == version
                && (r.record.kind == kind || r.record.kind == RolloutKind::Promote)
                && r.record.platforms.contains(&platform)
        });
        if known {
            continue;
        }
        let id = format!(
            "{}-{}-{}-{}",
            kind.as_str(),
            version,
            release.os,
            release.arch
        );
        // Another node may have started one (a promote, say) since this one read the book.
        let stored = state
            .store
            .list_rollouts(&RolloutFilter {
                version: Some(&version),
                limit: i64::MAX,
                ..RolloutFilter::default()
            })
            .await;
        match stored {
            Ok(stored)
                if stored.iter().any(|r| {
                    (r.kind == kind || r.kind == RolloutKind::Promote)
                        && r.platforms.contains(&platform)
                }) =>
            {
                continue;
            }
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%err, "could not look up the rollouts of a new build");
                continue;
            }
        }
        let agents = match &agents {
            Some(agents) => agents,
            None => match state.store.list_candidates().await {
                Ok(list) => agents.insert(list),
                Err(err) => {
                    tracing::warn!(%err, "could not read the agents for a new build's rollout");
                    return;
                }
            },
        };
        let (plan, audience): (Plan, fn(Channel) -> bool) = match kind {
            RolloutKind::Beta => (Plan::all_at_once(state.settings.wave_thresholds), |c| {
                c == Channel::Beta
            }),
            _ => (default_plan(state), |_| true),
        };
        let start_request = Start {
            id: Some(id),
            candidates: candidates(
                agents,
                &release.version,
                std::slice::from_ref(&platform),
                audience,
            ),
            version,
            kind,
            platforms: vec![platform],
            plan,
            started_by: "drover".into(),
            detail: format!("{} landed on {}", release.file, release.channel.as_str()),
        };
        match record_start(state, start_request).await {
            Ok((rollout, targets)) => {
                // The next build's start supersedes this one from the book.
                reread_book_knowing(state, Some(KnownTargets::new(&rollout.id, targets))).await;
                started.push(rollout.id);
            }
            Err(StoreError::Conflict(_)) => {}
            Err(err) => {
                tracing::warn!(%err, file = %release.file, "could not start the rollout of a new build")
            }
        }
    }
    if !started.is_empty() {
        let ids: Vec<&str> = started.iter().map(String::as_str).collect();
        announce(state, &ids);
    }
}

/// A rollout's health now: counts per wave (stages add up to the targets), totals, and
/// when each wave started and passed.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    pub(crate) plan: Plan,
    pub(crate) waves: Vec<Counts>,
    pub(crate) total: Counts,
    pub(crate) wave_rows: Vec<WaveRow>,
}

pub(crate) fn parse_plan(rollout: &Rollout) -> StoreResult<Plan> {
    serde_json::from_str(&rollout.plan).map_err(|e| {
        StoreError::Other(format!(
            "the plan of rollout {} does not read: {e}",
            rollout.id
        ))
    })
}

pub(crate) async fn health(
    state: &AppState,
    rollout: &Rollout,
    scope: impl Fn(&crate::store::TargetGroup) -> bool,
) -> StoreResult<Health> {
    Ok(observe(state, rollout).await?.health(state, scope))
}

/// What a rollout's health is counted from, read from the store once and counted over
/// as many scopes as a caller needs (a listing counts a beta rollout whole and for its
/// gate).
pub(crate) struct Observed {
    id: String,
    kind: RolloutKind,
    current_wave: usize,
    plan: Plan,
    /// Its counts frozen before its tasks were pruned: the record.
    summary: Option<Vec<Counts>>,
    groups: Vec<crate::store::TargetGroup>,
    classes: Vec<health::ClassGroup>,
    wave_rows: Vec<WaveRow>,
    now: i64,
}

pub(crate) async fn observe(state: &AppState, rollout: &Rollout) -> StoreResult<Observed> {
    let mut observed = observe_all(state, std::slice::from_ref(rollout)).await?;
    Ok(observed.remove(0))
}

/// What the health of each of `rollouts` is counted from, in their order: three queries
/// whatever their number (a listing reads a page of them at once).
pub(crate) async fn observe_all(
    state: &AppState,
    rollouts: &[Rollout],
) -> StoreResult<Vec<Observed>> {
    let now = now_ms();
    let ids: Vec<&str> = rollouts.iter().map(|r| r.id.as_str()).collect();
    // Rollouts whose tasks may be pruned keep the counts frozen before that: the record.
    let counted: Vec<&str> = rollouts
        .iter()
        .filter(|r| r.summary.is_none())
        .map(|r| r.id.as_str())
        .collect();
    let settled_before = now - duration_ms(state.settings.success_bake);
    let mut wave_rows = by_rollout(state.store.rollout_waves(&ids).await?);
    let mut groups = by_rollout(
        state
            .store
            .rollout_target_groups(&counted, settled_before)
            .await?,
    );
    let mut classes = by_rollout(state.store.rollout_class_rows(&counted).await?);
    let mut observed = Vec::with_capacity(rollouts.len());
    for rollout in rollouts {
        let summary = match &rollout.summary {
            Some(summary) => Some(serde_json::from_str(summary).map_err(|e| {
                StoreError::Other(format!(
                    "the summary of rollout {} does not read: {e}",
                    rollout.id
                ))
            })?),
            None => None,
        };
        observed.push(Observed {
            id: rollout.id.clone(),
            kind: rollout.kind,
            current_wave: usize::try_from(rollout.current_wave).unwrap_or(0),
            plan: parse_plan(rollout)?,
            summary,
            groups: groups.remove(&rollout.id).unwrap_or_default(),
            classes: classes
                .remove(&rollout.id)
                .unwrap_or_default()
                .into_iter()
                .map(|row| health::ClassGroup {
                    wave: row.wave,
                    class: row.class,
                    tasks: row.tasks,
                    recent: row.recent,
                })
                .collect(),
            wave_rows: wave_rows.remove(&rollout.id).unwrap_or_default(),
            now,
        });
    }
    Ok(observed)
}

/// Rows tagged with their rollout's id, by rollout.
fn by_rollout<T>(rows: Vec<(String, T)>) -> HashMap<String, Vec<T>> {
    let mut by: HashMap<String, Vec<T>> = HashMap::new();
    for (id, row) in rows {
        by.entry(id).or_default().push(row);
    }
    by
}

impl Observed {
    /// Its health over the targets `scope` admits (a frozen summary is whole).
    pub(crate) fn health(
        &self,
        state: &AppState,
        scope: impl Fn(&crate::store::TargetGroup) -> bool,
    ) -> Health {
        if let Some(waves) = &self.summary {
            return Health {
                total: health::total(waves),
                wave_rows: self.wave_rows.clone(),
                plan: self.plan.clone(),
                waves: waves.clone(),
            };
        }
        let obeys_windows = crate::rollouts::obeys_windows(self.kind, &self.plan);
        let now = self.now;
        let waves = health::count_waves(
            self.plan.waves.len(),
            self.current_wave,
            state.updates_enabled(),
            &self.groups,
            &self.classes,
            scope,
            |group| obeys_windows && closed_until(group.window.as_deref(), now).is_some(),
        );
        Health {
            total: health::total(&waves),
            plan: self.plan.clone(),
            waves,
            wave_rows: self.wave_rows.clone(),
        }
    }
}

/// Drives every running rollout once; every node does, and the store's conditional
/// updates make sure each step happens once.
pub(crate) async fn drive_all(state: AppState) {
    let mut ticker = tokio::time::interval(state.settings.rollout_tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        let running: Vec<String> = state
            .book()
            .rollouts()
            .filter(|r| {
                matches!(
                    r.record.state,
                    RolloutState::Running | RolloutState::Waiting
                )
            })
            .map(|r| r.record.id.clone())
            .collect();
        for id in running {
            if let Err(err) = drive(&state, &id).await {
                tracing::warn!(%err, rollout = %id, "could not move the rollout along");
            }
        }
    }
}

/// Judges a rollout's started waves and moves it: halt, bake, next wave, completed.
pub(crate) async fn drive(state: &AppState, id: &str) -> StoreResult<()> {
    let rollout = state.store.rollout(id).await?;
    if !matches!(rollout.state, RolloutState::Running | RolloutState::Waiting) {
        return Ok(());
    }
    let health = health(state, &rollout, |_| true).await?;
    let current = usize::try_from(rollout.current_wave).unwrap_or(0);
    // Any started wave can still halt the rollout: agents of early waves report late.
    for (index, counts) in health.waves.iter().enumerate().take(current + 1) {
        if let WaveVerdict::Halt(reason) = health::judge(index, &health.plan.waves[index], counts) {
            halt(state, &rollout, &reason).await?;
            return Ok(());
        }
    }
    let wave = &health.plan.waves[current];
    let counts = &health.waves[current];
    if health::judge(current, wave, counts) != WaveVerdict::Passed {
        return Ok(());
    }
    let now = now_ms();
    let passed_at = match health
        .wave_rows
        .iter()
        .find(|w| w.wave == rollout.current_wave)
        .and_then(|w| w.passed_at)
    {
        Some(at) => at,
        None => {
            state.store.mark_wave_passed(id, current, now).await?;
            now
        }
    };
    if current == health.plan.last_wave() {
        if health.total.unfinished() == 0 && health.total.waiting == 0 {
            let detail = format!(
                "{} of {} targets succeeded",
                health.total.succeeded, health.total.targeted
            );
            transition(
                state,
                &StateChange {
                    detail: Some(&detail),
                    ..StateChange::new(
                        id,
                        &[RolloutState::Running, RolloutState::Waiting],
                        RolloutState::Completed,
                        "drover",
                    )
                },
            )
            .await?;
        }
        return Ok(());
    }
    // An empty wave proves nothing and needs no bake.
    let bake_until = if counts.targeted == 0 {
        passed_at
    } else {
        passed_at.saturating_add(wave.bake_ms)
    };
    if now >= bake_until {
        if state
            .store
            .start_wave(id, current + 1, "drover", now)
            .await?
        {
            tracing::info!(rollout = %id, wave = current + 2, "next wave started");
            changed(state, id).await;
        }
    } else if rollout.state == RolloutState::Running {
        let detail = format!(
            "wave {} passed; baking until {}",
            current + 1,
            crate::clock::rfc3339(bake_until)
        );
        transition(
            state,
            &StateChange {
                detail: Some(&detail),
                ..StateChange::new(
                    id,
                    &[RolloutState::Running],
                    RolloutState::Waiting,
                    "drover",
                )
            },
        )
        .await?;
    }
    Ok(())
}

async fn halt(state: &AppState, rollout: &Rollout, reason: &str) -> StoreResult<()> {
    let halted = transition(
        state,
        &StateChange {
            reason: Some(reason),
            ..StateChange::new(
                &rollout.id,
                &[RolloutState::Running, RolloutState::Waiting],
                RolloutState::Halted,
                "drover",
            )
        },
    )
    .await?;
    if halted {
        tracing::warn!(rollout = %rollout.id, version = %rollout.version, %reason, "rollout halted");
        state
            .audit(
                "drover",
                "rollout.halt",
                &rollout.id,
                Some(format!("{}: {reason}", rollout.version)),
                "halted",
            )
            .await;
    }
    Ok(())
}

/// Applies a state change (`change_rollout_state`) and, if it happened, tells every node.
async fn transition(state: &AppState, change: &StateChange<'_>) -> StoreResult<bool> {
    let applied = state.store.change_rollout_state(change, now_ms()).await?;
    if applied {
        changed(state, change.id).await;
    }
    Ok(applied)
}

/// What an operator can do to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Pause,
    Resume,
    Advance,
    Abort,
}

impl Action {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Advance => "advance",
            Action::Abort => "abort",
        }
    }
}

/// Pause, resume, advance or abort a rollout; answers the rollout as it is after.
pub(crate) async fn act(
    state: &AppState,
    id: &str,
    action: Action,
    actor: &str,
) -> Conducted<Rollout> {
    let rollout = match state.store.rollout(id).await {
        Ok(rollout) => rollout,
        Err(StoreError::NotFound) => {
            return Err(ConductError::NotFound(format!("no rollout {id}")));
        }
        Err(err) => return Err(err.into()),
    };
    let refuse = || {
        ConductError::Conflict(format!(
            "rollout {id} is {}; it cannot {}",
            rollout.state.as_str(),
            action.as_str()
        ))
    };
    use RolloutState::*;
    let now = now_ms();
    let applied = match action {
        Action::Pause => {
            transition(
                state,
                &StateChange::new(id, &[Running, Waiting], Paused, actor),
            )
            .await?
        }
        Action::Resume => {
            transition(
                state,
                &StateChange {
                    detail: Some("resumed; earlier build failures no longer count toward a halt"),
                    resume: true,
                    ..StateChange::new(id, &[Paused, Halted], Running, actor)
                },
            )
            .await?
        }
        Action::Advance => {
            let plan = parse_plan(&rollout)?;
            let next = usize::try_from(rollout.current_wave).unwrap_or(0) + 1;
            if next > plan.last_wave() {
                return Err(ConductError::Conflict(format!(
                    "rollout {id} is in its last wave; there is no wave to advance to"
                )));
            }
            if !matches!(rollout.state, Running | Waiting) {
                return Err(refuse());
            }
            let started = state.store.start_wave(id, next, actor, now).await?;
            if started {
                changed(state, id).await;
            }
            started
        }
        Action::Abort => {
            let applied = transition(
                state,
                &StateChange {
                    reason: Some(&format!("aborted by {actor}")),
                    ..StateChange::new(id, &RolloutState::OPEN, Aborted, actor)
                },
            )
            .await?;
            if applied {
                cancel_rollout_tasks(state, &rollout, &format!("rollout {id} was aborted")).await?;
            }
            applied
        }
    };
    if !applied {
        return Err(refuse());
    }
    state
        .audit(
            actor,
            &format!("rollout.{}", action.as_str()),
            id,
            Some(rollout.version.clone()),
            action.as_str(),
        )
        .await;
    Ok(state.store.rollout(id).await?)
}

/// Cancels the unfinished tasks of a rollout and tells their agents.
async fn cancel_rollout_tasks(
    state: &AppState,
    rollout: &Rollout,
    reason: &str,
) -> StoreResult<()> {
    for agent in state
        .store
        .cancel_rollout_tasks(&rollout.id, reason, now_ms())
        .await?
    {
        state.registry.send(&agent, Outbound::Refresh);
        state.events.agent(&agent);
    }
    Ok(())
}

/// The build an agent on a rolled-back version goes back to: the newest offered,
/// unblocked build of its channel and platform (older or newer).
pub(crate) fn rollback_target(
    index: &ReleaseIndex,
    position: &AgentPosition,
    blocked: &std::collections::HashSet<String>,
) -> Option<Release> {
    index
        .newest(&position.os, &position.arch, |r| {
            channel_admits(position.channel, r.channel) && !blocked.contains(&r.version.to_string())
        })
        .cloned()
}

/// What a rollback did, honestly.
#[derive(Debug, Clone)]
pub(crate) struct RollbackOutcome {
    pub(crate) rollout: Option<Rollout>,
    /// Agents running the version that have a build to go back to.
    pub(crate) targeted: u64,
    /// Of those, not started now, and why.
    pub(crate) paused: u64,
    pub(crate) declines_updates: u64,
    pub(crate) updates_off: bool,
    /// Of those, not connected now: moved when they reconnect.
    pub(crate) offline: u64,
    /// Agents running the version with nothing to go back to.
    pub(crate) no_build: Vec<String>,
    /// Unfinished tasks to the version that were cancelled.
    pub(crate) cancelled: u64,
    /// The version was rolled back already and this changed nothing: its rollback
    /// rollout (if any) is under way, or no agent runs the version.
    pub(crate) unchanged: bool,
}

/// Blocks a version everywhere, cancels what is under way to it, stops its rollouts,
/// and starts a `rollback` rollout moving every agent that runs it back. A repeat that
/// would change nothing does nothing and says so (`unchanged`).
pub(crate) async fn rollback(
    state: &AppState,
    version: &str,
    plan: Option<Plan>,
    actor: &str,
) -> Conducted<RollbackOutcome> {
    let now = now_ms();
    if state
        .store
        .blocked_versions()
        .await?
        .iter()
        .any(|v| v == version)
    {
        let open = state
            .book()
            .rollouts()
            .find(|r| {
                r.record.kind == RolloutKind::Rollback
                    && r.record.version == version
                    && r.record.state.is_open()
            })
            .map(|r| r.record.clone());
        if open.is_some() || !state.store.version_runs(version).await? {
            return Ok(RollbackOutcome {
                rollout: open,
                targeted: 0,
                paused: 0,
                declines_updates: 0,
                updates_off: !state.updates_enabled(),
                offline: 0,
                no_build: Vec::new(),
                cancelled: 0,
                unchanged: true,
            });
        }
    }
    let cancelled_for = state
        .store
        .block_version(
            version,
            &format!("rolled back by {actor}"),
            &format!("{version} was rolled back"),
            now,
        )
        .await?;
    // The block is in the store before anyone acts on it. This node sees it now; the
    // other nodes are told to re-read it (only it: they check their agents once, when
    // the rollback is announced) before they hear of any single agent (signals arrive in
    // order), and a task insert on any of them refuses a blocked version.
    state.reload_blocked_versions().await?;
    state
        .registry
        .signal_other_nodes(crate::nodes::Signal::Blocked);
    for agent in &cancelled_for {
        state.registry.send(agent, Outbound::Refresh);
        state.events.agent(agent);
    }
    // Read from the store: another node may have started one this node has not heard of.
    let stop: Vec<Rollout> = state
        .store
        .list_rollouts(&RolloutFilter {
            version: Some(version),
            limit: i64::MAX,
            ..RolloutFilter::default()
        })
        .await?
        .into_iter()
        .filter(|r| r.state.is_open() && r.kind != RolloutKind::Rollback)
        .collect();
    // What changes is told once, when the rollback rollout exists (or could not be
    // started): agents check when they can move, not once per step.
    let mut aborted = Vec::new();
    let moved = abort_and_move_back(
        state,
        version,
        plan,
        actor,
        &stop,
        &mut aborted,
        cancelled_for.len() as u64,
    )
    .await;
    let mut told: Vec<&str> = aborted.iter().map(String::as_str).collect();
    match moved.as_ref().ok().and_then(|o| o.rollout.as_ref()) {
        Some(rollout) => told.push(&rollout.id),
        None => {
            reread_book(state).await;
            if told.is_empty() {
                told.push(version);
            }
        }
    }
    announce(state, &told);
    moved
}

/// The rollback's moves, untold: aborts the version's rollouts in `stop` (their ids go
/// to `aborted`), then starts the rollback rollout over the agents that run it.
async fn abort_and_move_back(
    state: &AppState,
    version: &str,
    plan: Option<Plan>,
    actor: &str,
    stop: &[Rollout],
    aborted: &mut Vec<String>,
    cancelled: u64,
) -> Conducted<RollbackOutcome> {
    for rollout in stop {
        let applied = state
            .store
            .change_rollout_state(
                &StateChange {
                    reason: Some(&format!("{version} was rolled back")),
                    ..StateChange::new(
                        &rollout.id,
                        &RolloutState::OPEN,
                        RolloutState::Aborted,
                        actor,
                    )
                },
                now_ms(),
            )
            .await?;
        if applied {
            aborted.push(rollout.id.clone());
        }
    }
    let agents = state.store.running_version(version).await?;
    let now = now_ms();
    let index = state.releases.current();
    let blocked = state.blocked_versions().clone();
    let mut outcome = RollbackOutcome {
        rollout: None,
        targeted: 0,
        paused: 0,
        declines_updates: 0,
        updates_off: !state.updates_enabled(),
        offline: 0,
        no_build: Vec::new(),
        cancelled,
        unchanged: false,
    };
    let mut candidates = Vec::new();
    let mut platforms: Vec<(String, String)> = Vec::new();
    let mut no_build = Vec::new();
    for agent in &agents {
        let record = &agent.candidate;
        let position = AgentPosition {
            version: record.version.clone(),
            os: record.os.clone(),
            arch: record.arch.clone(),
            channel: resolve_candidate_channel(record),
            paused: agent.paused,
            auto_update: agent.auto_update,
            failed_versions: Default::default(),
        };
        if rollback_target(&index, &position, &blocked).is_none() {
            no_build.push((&agent.hostname, &record.id));
            continue;
        }
        outcome.targeted += 1;
        outcome.paused += u64::from(agent.paused);
        outcome.declines_updates += u64::from(!agent.paused && !agent.auto_update);
        if !crate::nodes::is_live(agent.node_last_beat_ms, now) || agent.node_id.is_none() {
            outcome.offline += 1;
        }
        let platform = (record.os.clone(), record.arch.clone());
        if !platforms.contains(&platform) {
            platforms.push(platform);
        }
        candidates.push(candidate_of_record(record));
    }
    // Read in no order: listed as the agents are.
    no_build.sort();
    outcome.no_build = no_build.into_iter().map(|(_, id)| id.clone()).collect();
    platforms.sort();
    if !candidates.is_empty() {
        let detail = format!(
            "{version} rolled back: {} to move, {} with no build to go back to",
            match candidates.len() {
                1 => "1 agent".to_owned(),
                n => format!("{n} agents"),
            },
            outcome.no_build.len()
        );
        outcome.rollout = Some(
            start_untold(
                state,
                Start {
                    id: None,
                    version: version.to_owned(),
                    kind: RolloutKind::Rollback,
                    platforms,
                    plan: plan.unwrap_or_else(|| Plan::all_at_once(state.settings.wave_thresholds)),
                    started_by: actor.to_owned(),
                    detail,
                    candidates,
                },
            )
            .await?,
        );
    }
    Ok(outcome)
}

/// Lifts a block. The version's rollouts were aborted when it was rolled back, so each
/// of its offered builds starts afresh: a `promote` rollout with the default plan where
/// the build is stable, a `beta` rollout where it is beta. Answers whether it was blocked.
pub(crate) async fn unblock(state: &AppState, version: &str, actor: &str) -> StoreResult<bool> {
    if !state.store.unblock_version(version).await? {
        return Ok(false);
    }
    state.reload_rollout_state(None).await?;
    // Nobody needs moving off the version any more.
    let rollbacks: Vec<Rollout> = state
        .book()
        .rollouts()
        .filter(|r| r.record.kind == RolloutKind::Rollback && r.record.version == version)
        .filter(|r| r.record.state.is_open())
        .map(|r| r.record.clone())
        .collect();
    for rollback in &rollbacks {
        if transition(
            state,
            &StateChange {
                reason: Some(&format!("{version} was unblocked")),
                ..StateChange::new(
                    &rollback.id,
                    &RolloutState::OPEN,
                    RolloutState::Aborted,
                    actor,
                )
            },
        )
        .await?
        {
            cancel_rollout_tasks(state, rollback, &format!("{version} was unblocked")).await?;
        }
    }
    let index = state.releases.current();
    let agents = state.store.list_candidates().await?;
    for channel in [Channel::Beta, Channel::Stable] {
        let builds: Vec<&Release> = index
            .releases
            .iter()
            .filter(|r| r.version.to_string() == version && r.channel == channel)
            .collect();
        let Some(first) = builds.first() else {
            continue;
        };
        let platforms: Vec<(String, String)> = builds
            .iter()
            .map(|r| (r.os.clone(), r.arch.clone()))
            .collect();
        let (kind, plan, audience): (RolloutKind, Plan, fn(Channel) -> bool) = match channel {
            Channel::Beta => (
                RolloutKind::Beta,
                Plan::all_at_once(state.settings.wave_thresholds),
                |c| c == Channel::Beta,
            ),
            Channel::Stable => (RolloutKind::Promote, default_plan(state), |_| true),
        };
        start(
            state,
            Start {
                id: None,
                version: version.to_owned(),
                kind,
                candidates: candidates(&agents, &first.version, &platforms, audience),
                platforms,
                plan,
                started_by: actor.to_owned(),
                detail: format!("{version} unblocked"),
            },
        )
        .await?;
    }
    changed(state, version).await;
    Ok(true)
}

/// The promote gate for `version`: its beta rollouts on the platforms in scope, counted
/// over targets that follow beta now.
pub(crate) async fn gate(
    state: &AppState,
    version: &str,
    in_scope: impl Fn(&str, &str) -> bool,
) -> StoreResult<GateVerdict> {
    gate_knowing(state, version, in_scope, None).await
}

/// `gate`, counting a rollout already `observed` from that observation.
pub(crate) async fn gate_knowing(
    state: &AppState,
    version: &str,
    in_scope: impl Fn(&str, &str) -> bool,
    observed: Option<&Observed>,
) -> StoreResult<GateVerdict> {
    let betas: Vec<Rollout> = state
        .book()
        .rollouts()
        .filter(|r| r.record.kind == RolloutKind::Beta && r.record.version == version)
        .filter(|r| r.record.platforms.iter().any(|(o, a)| in_scope(o, a)))
        .map(|r| r.record.clone())
        .collect();
    let mut sum: Option<Counts> = None;
    for rollout in &betas {
        let beta_in_scope = |g: &crate::store::TargetGroup| {
            in_scope(&g.os, &g.arch) && Channel::parse(&g.channel) == Some(Channel::Beta)
        };
        let h = match observed.filter(|o| o.id == rollout.id) {
            Some(known) => known.health(state, beta_in_scope),
            None => observe(state, rollout).await?.health(state, beta_in_scope),
        };
        let total = sum.get_or_insert_with(Counts::default);
        *total = health::total(&[*total, h.total]);
    }
    let policy = state.settings.gate_policy();
    Ok(health::gate(sum.as_ref(), &policy))
}

/// What the stage of `rollout`'s targets depends on now besides the targets themselves,
/// for the store to place them (`GET /rollouts/{id}/agents`).
pub(crate) async fn stage_inputs(
    state: &AppState,
    rollout: &Rollout,
) -> StoreResult<crate::store::StageInputs> {
    let mut closed_windows = Vec::new();
    if crate::rollouts::obeys_windows(rollout.kind, &parse_plan(rollout)?) {
        let now = now_ms();
        let sites = state.store.list_sites().await?;
        let clients = state.store.list_clients().await?;
        let windows = sites
            .into_iter()
            .filter_map(|s| s.maintenance_window)
            .chain(clients.into_iter().filter_map(|c| c.maintenance_window));
        for window in windows {
            if !closed_windows.contains(&window)
                && closed_until(Some(window.as_str()), now).is_some()
            {
                closed_windows.push(window);
            }
        }
    }
    Ok(crate::store::StageInputs {
        current_wave: rollout.current_wave,
        updates_enabled: state.updates_enabled(),
        closed_windows,
    })
}

/// How long stable has been behind beta on each platform, now (see
/// `rollouts::stable_lag_ms`): (os, arch) → (beta version, milliseconds).
pub(crate) async fn stable_lags(
    state: &AppState,
) -> StoreResult<HashMap<(String, String), (String, i64)>> {
    let records = state.store.rollout_records().await?;
    let index = state.releases.current();
    Ok(crate::rollouts::stable_lag_ms(
        &index,
        &state.blocked_versions(),
        &crate::rollouts::first_seen(&records),
        now_ms(),
    ))
}

/// Builds the book dispatch reads from what the store holds.
pub(crate) async fn load_book(state: &AppState, known: Option<KnownTargets>) -> StoreResult<Book> {
    let (rollouts, targets) = state
        .store
        .rollout_book(known.as_ref().map(|k| k.rollout_id.as_str()))
        .await?;
    let mut known = known;
    let mut by_rollout: HashMap<String, HashMap<String, usize>> = HashMap::new();
    for (rollout, agent, wave) in targets {
        by_rollout.entry(rollout).or_default().insert(agent, wave);
    }
    let mut live = Vec::with_capacity(rollouts.len());
    for record in rollouts {
        let plan = match parse_plan(&record) {
            Ok(plan) => plan,
            Err(err) => {
                tracing::error!(%err, "a rollout is left out of dispatch");
                continue;
            }
        };
        let targets = match known.take_if(|k| k.rollout_id == record.id) {
            Some(known) if record.state.is_open() => known.targets,
            _ => by_rollout.remove(&record.id).unwrap_or_default(),
        };
        live.push(LiveRollout::new(record, plan, targets));
    }
    Ok(Book::new(live))
}
