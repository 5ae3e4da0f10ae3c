//! Turning decisions into update tasks and `update` messages for one connected agent, and
//! moving its task along as the agent reports. Each session owns one `LiveAgent`; the
//! database is touched only when a task is created or changes. `decide` is the one rule
//! for what an agent is due: dispatch acts on it and explain shows it.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use protocol::{
    Cancel, CompressedBuild, DeltaBuild, MirrorFailure, ServerMessage, Transfer, TransferSource,
    Update, UpdateOutcome, UpdateProgress, UpdateResult, UpdateStage,
};

use crate::AppState;
use crate::clock::{now_ms, rfc3339};
use crate::conductor;
use crate::downloads;
use crate::engine::{AgentPosition, Decision, needs_update, resolve_channel};
use crate::maintenance::AgentWindow;
use crate::releases::Release;
use crate::rollouts::book::{Admission, Asking, Book};
use crate::store::{
    AgentRecord, FailureClass, SilentTasks, StoreError, StoreResult, TaskKind, TaskStatus,
    TransferRecord, UpdateTask,
};
use crate::task_writer::{TaskRequest, Writing};

/// Tasks read when an agent is loaded, for the retry delay and cancel reasons.
const RECENT_TASKS: i64 = 20;

/// What a session knows about its agent between database reads.
#[derive(Debug)]
pub(crate) struct LiveAgent {
    pub(crate) id: String,
    pub(crate) position: AgentPosition,
    /// Its unfinished task, boxed: most sessions have none, and every session keeps
    /// this struct for its whole life.
    pub(crate) active: Option<Box<UpdateTask>>,
    /// Versions whose last attempt failed for a reason other than the build, and when
    /// they may be tried again.
    pub(crate) retry_at: HashMap<String, i64>,
    /// Why recent tasks ended, by task id (for the `cancel` sent after an operator acted).
    pub(crate) ended: HashMap<String, String>,
    /// This session holds a download slot for its task (see `admission`).
    pub(crate) holds_slot: bool,
    /// Its site's (or client's) maintenance window.
    pub(crate) window: Option<AgentWindow>,
    /// The download mirror its updates offer (site, client or server-wide base URL).
    pub(crate) mirror: Option<String>,
    /// `settings_stamp` of the record this was read from.
    pub(crate) settings: u64,
    /// Its new task, whose update went out before the task was written; the session
    /// waits for the write (`written`) before it reads more from the agent.
    pub(crate) writing: Option<Box<Writing>>,
}

/// What prompted a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    Connect,
    Heartbeat,
    /// The release index or an operator changed something.
    Nudge,
}

impl LiveAgent {
    /// Reads the agent, its unfinished task, its failed versions and its recent tasks.
    pub(crate) async fn load(state: &AppState, id: &str, running: &str) -> StoreResult<LiveAgent> {
        // A task an earlier session sent is read once it is written.
        state.tasks.until_agent_written(id).await;
        let record = state.store.agent(id).await?;
        let active = state.store.active_task(id).await?.map(Box::new);
        let failed_versions: HashSet<String> =
            state.store.failed_versions(id).await?.into_iter().collect();
        let recent = state.store.tasks_for_agent(id, RECENT_TASKS).await?;
        let delay = i64::try_from(state.settings.retry_delay.as_millis()).unwrap_or(i64::MAX);
        let mut retry_at: HashMap<String, i64> = HashMap::new();
        let mut ended = HashMap::new();
        for task in &recent {
            if let Some(error) = &task.error {
                ended.insert(task.id.clone(), error.clone());
            }
            let retried_later = task.status != TaskStatus::Cancelled
                && matches!(
                    task.failure_class,
                    Some(FailureClass::Environment | FailureClass::Transient)
                );
            if retried_later && let Some(finished) = task.finished_at_ms {
                let at = retry_at.entry(task.to_version.clone()).or_default();
                *at = (*at).max(finished.saturating_add(delay));
            }
        }
        let (channel, _) = resolve_channel(&record);
        let settings = settings_stamp(&record);
        let window = AgentWindow::of(
            record.site_window.as_deref(),
            record.client_window.as_deref(),
        );
        let mirror = crate::mirrors::resolve(
            record.site_mirror.as_deref(),
            record.client_mirror.as_deref(),
            state.settings.download_url.as_deref(),
        )
        .map(|(base, _)| base.to_owned());
        Ok(LiveAgent {
            id: record.id,
            position: AgentPosition {
                version: running.to_owned(),
                os: record.os,
                arch: record.arch,
                channel,
                paused: record.paused,
                auto_update: record.auto_update,
                failed_versions,
            },
            active,
            retry_at,
            ended,
            holds_slot: false,
            window,
            mirror,
            settings,
            writing: None,
        })
    }

    /// `stamp` of what this session holds.
    pub(crate) fn stamp(&self) -> u64 {
        stamp(
            self.settings,
            self.active.as_ref().map(|task| task.id.as_str()),
        )
    }
}

/// What another node can change about an agent that its session keeps in memory, the
/// agent's settings (`settings_stamp`) and which task is its unfinished one, as one
/// number. When signals between nodes may have been lost, a session whose stamp
/// differs from the one made of the database's rows missed a change (`nodes`).
pub(crate) fn stamp(settings: u64, active_task: Option<&str>) -> u64 {
    let mut hasher = DefaultHasher::new();
    (settings, active_task).hash(&mut hasher);
    hasher.finish()
}

/// The settings of an agent's record that operators change, as one number.
pub(crate) fn settings_stamp(record: &AgentRecord) -> u64 {
    let mut hasher = DefaultHasher::new();
    (
        record.paused,
        record.auto_update,
        &record.agent_channel,
        &record.site_channel,
        &record.client_channel,
        &record.site_window,
        &record.client_window,
        &record.site_mirror,
        &record.client_mirror,
    )
        .hash(&mut hasher);
    hasher.finish()
}

/// What an agent is due now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Due {
    /// Start a task to this build, under this rollout and wave; `join` when the agent is
    /// new to the rollout and must be recorded as its target first.
    Start {
        release: Release,
        kind: TaskKind,
        rollout_id: String,
        wave: usize,
        join: bool,
    },
    /// Nothing now, and why. `keeps_task` when the reason only paces the rollout (a wave
    /// not started, a paused or halted rollout, a retry delay): an update already under
    /// way goes on. Otherwise the rules no longer allow the build, and one under way is
    /// cancelled.
    Hold { reason: String, keeps_task: bool },
}

/// The rule: what an agent is due now, ignoring any task it has. Dispatch acts on it,
/// explain shows it, and an unfinished task the rule no longer allows is cancelled.
pub(crate) fn decide(state: &AppState, agent_id: &str, live: &LiveAgentView<'_>) -> Due {
    let position = live.position;
    let hold = |reason: String| Due::Hold {
        reason,
        keeps_task: false,
    };
    let pace = |reason: String| Due::Hold {
        reason,
        keeps_task: true,
    };
    // These hold for every kind of rollout, rollbacks and targeted ones included.
    if !state.updates_enabled() {
        return hold("updates are disabled server-wide".into());
    }
    if position.paused {
        return hold("updates are paused for this agent".into());
    }
    if !position.auto_update {
        return hold("the agent runs with auto-update off".into());
    }
    let index = state.releases.current();
    let book = state.book();
    // Read under the lock, never cloned: this runs at every heartbeat.
    let blocked = state.blocked_versions();
    let admitted = |release: Release, kind: TaskKind, admission: Admission| match admission {
        Admission::Go { rollout_id, wave } => Due::Start {
            release,
            kind,
            rollout_id,
            wave,
            join: false,
        },
        Admission::Join {
            rollout_id,
            wave,
            started: true,
        } => Due::Start {
            release,
            kind,
            rollout_id,
            wave,
            join: true,
        },
        Admission::Join {
            rollout_id, wave, ..
        } => pace(crate::rollouts::book::waiting_for_wave(&rollout_id, wave)),
        Admission::Wait(reason) => pace(reason),
        Admission::Hold(reason) => hold(reason),
    };
    // A closed maintenance window paces a start; an update under way goes on.
    let admitted = |release: Release, kind: TaskKind, admission: Admission| match admitted(
        release, kind, admission,
    ) {
        Due::Start { rollout_id, .. }
            if let Some(reason) = window_holds(live, &book, &rollout_id) =>
        {
            pace(reason)
        }
        due => due,
    };

    // An operator chose this agent and a version.
    if let Some(targeted) = book.targeted_for(agent_id)
        && targeted.record.version != position.version
    {
        let version = &targeted.record.version;
        let release = semver::Version::parse(version)
            .ok()
            .and_then(|v| index.find(&v, &position.os, &position.arch).cloned());
        let Some(release) = release else {
            return hold(format!(
                "targeted rollout {} wants {version}, which is not offered for {}/{}",
                targeted.record.id, position.os, position.arch
            ));
        };
        if blocked.contains(version.as_str()) {
            return hold(format!("{version} is rolled back"));
        }
        let wave = targeted.wave_of(agent_id).unwrap_or(0);
        let admission = match targeted.record.state {
            crate::store::RolloutState::Running | crate::store::RolloutState::Waiting
                if wave <= usize::try_from(targeted.record.current_wave).unwrap_or(0) =>
            {
                Admission::Go {
                    rollout_id: targeted.record.id.clone(),
                    wave,
                }
            }
            crate::store::RolloutState::Running | crate::store::RolloutState::Waiting => {
                Admission::Wait(crate::rollouts::book::waiting_for_wave(
                    &targeted.record.id,
                    wave,
                ))
            }
            other => Admission::Wait(format!(
                "targeted rollout {} is {}",
                targeted.record.id,
                other.as_str()
            )),
        };
        return admitted(release, TaskKind::Forced, admission);
    }

    // An agent on a rolled-back version is moved off it, downwards if need be.
    if blocked.contains(&position.version) {
        let Some(release) = conductor::rollback_target(&index, position, &blocked) else {
            return hold(format!(
                "runs the rolled-back {} and no other build of its channel is offered",
                position.version
            ));
        };
        // A rollback this agent refused (an old signature, say) is tried again when
        // something changes (a build, an operator's action, a new session), not on every
        // heartbeat: each attempt would be one more failed task.
        if !live.something_changed
            && position
                .failed_versions
                .contains(&release.version.to_string())
        {
            return pace(format!(
                "going back to {} failed on this agent before; it is tried again when the builds or the rules change, or when forced",
                release.version
            ));
        }
        let admission = book.admit(&Asking {
            agent_id,
            channel: position.channel,
            os: &position.os,
            arch: &position.arch,
            version: &position.version,
            rollback: true,
        });
        return admitted(release, TaskKind::Rollback, admission);
    }

    // The read guard above is the policy's; taking the lock again here could deadlock
    // behind a waiting writer.
    let policy = crate::engine::Policy {
        updates_enabled: true,
        blocked_versions: &blocked,
    };
    let release = match needs_update(position, &index, &policy) {
        Decision::Offer(release) => release,
        // Failed before: a task to it still under way (started before the failure was
        // known) is cancelled like any the rules no longer allow.
        Decision::Hold(reason) => return hold(reason.describe()),
    };
    let version = release.version.to_string();
    if let Some(&at) = live.retry_at.get(&version)
        && at > now_ms()
    {
        return pace(format!(
            "the last attempt at {version} failed for a reason other than the build; it is retried after {}",
            rfc3339(at)
        ));
    }
    let admission = book.admit(&Asking {
        agent_id,
        channel: position.channel,
        os: &position.os,
        arch: &position.arch,
        version: &version,
        rollback: false,
    });
    admitted(release, TaskKind::Update, admission)
}

/// Why the agent's maintenance window holds it back from this rollout now, if it does.
fn window_holds(live: &LiveAgentView<'_>, book: &Book, rollout_id: &str) -> Option<String> {
    let window = live.window?;
    let rollout = book.get(rollout_id)?;
    if !crate::rollouts::obeys_windows(rollout.record.kind, &rollout.plan) {
        return None;
    }
    window.holds(now_ms())
}

/// What `decide` reads of an agent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LiveAgentView<'a> {
    pub(crate) position: &'a AgentPosition,
    pub(crate) retry_at: &'a HashMap<String, i64>,
    /// The check follows a change (a connect, new builds, an operator's action) rather
    /// than a heartbeat.
    pub(crate) something_changed: bool,
    pub(crate) window: Option<&'a AgentWindow>,
}

impl LiveAgent {
    /// What `decide` reads, as at a heartbeat (what explain shows).
    pub(crate) fn view(&self) -> LiveAgentView<'_> {
        LiveAgentView {
            position: &self.position,
            retry_at: &self.retry_at,
            something_changed: false,
            window: self.window.as_ref(),
        }
    }

    fn view_at(&self, trigger: Trigger) -> LiveAgentView<'_> {
        LiveAgentView {
            something_changed: trigger != Trigger::Heartbeat,
            ..self.view()
        }
    }
}

/// Why an unfinished task must stop now that the rules changed, if it must: the agent
/// was paused, declines updates, updates were switched off, or its channel, a block or
/// an aborted rollout no longer lets it have that build. A task already installing is
/// left to finish: the agent cannot take it back.
fn no_longer_allowed(state: &AppState, live: &LiveAgent, task: &UpdateTask) -> Option<String> {
    if !matches!(
        task.status,
        TaskStatus::Queued
            | TaskStatus::Dispatched
            | TaskStatus::Downloading
            | TaskStatus::Verifying
    ) {
        return None;
    }
    if task.kind != TaskKind::Rollback && state.blocked_versions().contains(&task.to_version) {
        return Some(format!("{} was rolled back", task.to_version));
    }
    match decide(state, &live.id, &live.view()) {
        Due::Start { release, .. } if release.version.to_string() == task.to_version => None,
        Due::Start { release, .. } => Some(format!(
            "the agent's rules now offer {} instead of {}",
            release.version, task.to_version
        )),
        Due::Hold {
            keeps_task: true, ..
        } => None,
        Due::Hold { reason, .. } => Some(reason),
    }
}

/// Decides whether the agent is due an update, or its task is due a re-dispatch, a
/// cancel, a timeout or success; returns the message to send, if any.
pub(crate) async fn check(
    state: &AppState,
    live: &mut LiveAgent,
    trigger: Trigger,
) -> StoreResult<Option<ServerMessage>> {
    if let Some(task) = live.active.clone() {
        if live.position.version != task.to_version
            && let Some(reason) = no_longer_allowed(state, live, &task)
        {
            return cancel(state, live, &task, &reason).await;
        }
        return advance(state, live, *task, trigger).await;
    }
    let (release, kind, rollout_id, wave, join) =
        match decide(state, &live.id, &live.view_at(trigger)) {
            Due::Start {
                release,
                kind,
                rollout_id,
                wave,
                join,
            } => (release, kind, rollout_id, wave, join),
            Due::Hold { .. } => return Ok(None),
        };
    if join {
        state
            .store
            .add_rollout_target(&rollout_id, &live.id, wave)
            .await?;
        if let Some(rollout) = state.book().get(&rollout_id) {
            rollout.note_joined(&live.id, wave);
        }
    }
    // Pushed now if a download slot is free; queued, in line, otherwise. An agent sent
    // to a mirror needs no slot unless it falls back to this server.
    let from_mirror = live.mirror.is_some();
    let admitted = from_mirror || state.admission.try_take(&live.id);
    let request = TaskRequest {
        agent_id: live.id.clone(),
        from_version: live.position.version.clone(),
        to_version: release.version.to_string(),
        os: release.os.clone(),
        arch: release.arch.clone(),
        kind,
        status: if admitted {
            TaskStatus::Dispatched
        } else {
            TaskStatus::Queued
        },
        rollout_id: Some(rollout_id),
        wave: Some(wave),
        mirror: live.mirror.clone(),
    };
    // An update the agent downloads from this server goes out before its task is
    // written: the download waits for the write, and the session reads nothing more
    // from the agent until it ends (`written`). A fan-out then waits for no batch of
    // rows. Written first: a queued task; one from a mirror (whose downloads the server
    // does not see); and an operator's forced update, whose request writes the agent's
    // task at the same moment (the session then picks that one up rather than sending
    // an update it must take back). And written first while the last write of tasks
    // failed, so a database refusing writes is not an update and a cancel each check.
    let send_first =
        admitted && !from_mirror && kind != TaskKind::Forced && state.tasks.sends_first();
    let created = if send_first {
        state.tasks.begin(request).await.map(|writing| {
            let task = writing.task.clone();
            live.writing = Some(Box::new(writing));
            task
        })
    } else {
        state.tasks.create(request).await
    };
    if created.is_err() && !from_mirror {
        if admitted {
            give_back_slot(state);
        } else {
            leave_line(state, &live.id);
        }
    }
    match created {
        Ok(task) if !admitted => {
            tracing::debug!(agent = %live.id, task = %task.id, to = %task.to_version, "queued until a download slot frees");
            state
                .events
                .task(&task.id, &live.id, task.rollout_id.as_deref());
            live.active = Some(Box::new(task));
            Ok(None)
        }
        Ok(task) => {
            tracing::info!(agent = %live.id, task = %task.id, from = %task.from_version, to = %task.to_version, rollout = task.rollout_id.as_deref().unwrap_or(""), "dispatching update");
            // A task sent first is told to the dashboard once it is written.
            if !send_first {
                state
                    .events
                    .task(&task.id, &live.id, task.rollout_id.as_deref());
            }
            let message = update_message(state, &task);
            live.holds_slot = downloads_here(task.mirror.as_deref(), &task);
            live.active = Some(Box::new(task));
            Ok(message)
        }
        // Someone else (an operator, another node) created a task meanwhile, or the
        // version was blocked since: pick up whatever is there.
        Err(StoreError::Conflict(_)) => {
            live.active = state.store.active_task(&live.id).await?.map(Box::new);
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Waits for the write of the task whose update went out first (if there is one). A task
/// that could not be written (the agent had an unfinished one meanwhile, from another
/// session or an operator, or the database failed) is taken back from the agent with a
/// `cancel`: it could not have downloaded anything for it yet.
pub(crate) async fn written(state: &AppState, live: &mut LiveAgent) -> Option<ServerMessage> {
    let writing = live.writing.take()?;
    let task_id = writing.task.id.clone();
    let err = match writing.written().await {
        Ok(task) => {
            state
                .events
                .task(&task.id, &live.id, task.rollout_id.as_deref());
            // As written (its times are the batch's).
            live.active = Some(Box::new(task));
            return None;
        }
        Err(err) => err,
    };
    release_slot(state, live);
    live.active = None;
    let reason = match err {
        StoreError::Conflict(_) => {
            // Picked up at the next check, as when `create` finds one.
            match state.store.active_task(&live.id).await {
                Ok(active) => live.active = active.map(Box::new),
                Err(err) => {
                    tracing::warn!(agent = %live.id, %err, "could not read the agent's unfinished task")
                }
            }
            "the agent already has an unfinished task".to_owned()
        }
        err => {
            tracing::warn!(agent = %live.id, task = %task_id, %err, "could not record an update task that was sent; cancelling it");
            format!("the server could not record the task: {err}")
        }
    };
    Some(ServerMessage::Cancel(Cancel { task_id, reason }))
}

/// Cancels an unfinished task on the agent and in the store.
async fn cancel(
    state: &AppState,
    live: &mut LiveAgent,
    task: &UpdateTask,
    reason: &str,
) -> StoreResult<Option<ServerMessage>> {
    tracing::info!(agent = %live.id, task = %task.id, to = %task.to_version, %reason, "cancelling update");
    finish(
        state,
        live,
        task,
        TaskStatus::Cancelled,
        FailureClass::Transient,
        Some(reason),
    )
    .await?;
    // Whatever is due instead follows at the next check.
    let _ = state
        .registry
        .send_here(&live.id, crate::session::Outbound::Check);
    Ok(Some(ServerMessage::Cancel(Cancel {
        task_id: task.id.clone(),
        reason: reason.to_owned(),
    })))
}

/// Moves an unfinished task along.
async fn advance(
    state: &AppState,
    live: &mut LiveAgent,
    task: UpdateTask,
    trigger: Trigger,
) -> StoreResult<Option<ServerMessage>> {
    // Success means the new version is running and has heartbeated, nothing less; until
    // its first heartbeat there is nothing to send it.
    if live.position.version == task.to_version {
        if trigger == Trigger::Heartbeat {
            finish(
                state,
                live,
                &task,
                TaskStatus::Succeeded,
                FailureClass::Build,
                None,
            )
            .await?;
        }
        return Ok(None);
    }
    let now = now_ms();
    let silent_ms = now - task.last_activity_ms();
    let timeout_ms = i64::try_from(state.settings.task_timeout.as_millis()).unwrap_or(i64::MAX);
    if silent_ms > timeout_ms && task.status != TaskStatus::Queued {
        let (class, error) = timeout_of(task.status, Silence::Online { silent_ms });
        finish(
            state,
            live,
            &task,
            TaskStatus::TimedOut,
            class,
            Some(&error),
        )
        .await?;
        return Ok(None);
    }
    // The agent may have lost the message, or the download it had begun, with its
    // previous session (a server killed mid-rollout drops them all); an agent still
    // working on the task ignores the repeated update. A reconnect is not an attempt.
    let resend_on_connect = trigger == Trigger::Connect
        && matches!(
            task.status,
            TaskStatus::Dispatched | TaskStatus::Downloading
        );
    if !(resend_on_connect || task.status == TaskStatus::Queued) {
        return Ok(None);
    }
    let counts_as_attempt = task.status == TaskStatus::Queued;
    // The update offers the agent's mirror as it is now.
    let mirror = live.mirror.as_deref();
    if downloads_here(mirror, &task) && !live.holds_slot {
        if counts_as_attempt {
            if !state.admission.try_take(&live.id) {
                return Ok(None);
            }
        } else {
            state.admission.take_anyway();
        }
        live.holds_slot = true;
    }
    match state
        .store
        .record_dispatch(&task.id, now, counts_as_attempt, mirror)
        .await
    {
        Ok(task) => {
            tracing::info!(agent = %live.id, task = %task.id, attempt = task.attempts, to = %task.to_version, "dispatching update again");
            state
                .events
                .task(&task.id, &live.id, task.rollout_id.as_deref());
            let message = update_message(state, &task);
            live.active = Some(Box::new(task));
            Ok(message)
        }
        Err(StoreError::NotFound) => {
            live.active = None;
            release_slot(state, live);
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// Whether a task's download comes from this server, and so takes a download slot:
/// unless its update offers a mirror that the agent has not fallen back from.
fn downloads_here(mirror: Option<&str>, task: &UpdateTask) -> bool {
    mirror.is_none() || task.transfer_fallback.is_some()
}

/// Gives back the session's download slot, if it holds one.
fn release_slot(state: &AppState, live: &mut LiveAgent) {
    if std::mem::take(&mut live.holds_slot) {
        give_back_slot(state);
    }
}

/// Gives a download slot back and checks the agent first in line, which takes it.
fn give_back_slot(state: &AppState) {
    if let Some(next) = state.admission.give_back() {
        wake(state, next);
    }
}

/// Checks an agent that waited for a slot; if it is gone, the next one.
fn wake(state: &AppState, mut agent: String) {
    while !state
        .registry
        .send_here(&agent, crate::session::Outbound::Check)
    {
        match state.admission.leave(&agent) {
            Some(next) => agent = next,
            None => return,
        }
    }
}

/// The agent needs no slot any more (its task ended): it leaves the line.
fn leave_line(state: &AppState, agent: &str) {
    if let Some(next) = state.admission.leave(agent) {
        wake(state, next);
    }
}

/// The session re-read its agent: the download slot goes with the task it was taken
/// for, and is given back if that task is gone.
pub(crate) fn reloaded(state: &AppState, before: &mut LiveAgent, fresh: &mut LiveAgent) {
    let same_task = before.active.as_ref().map(|t| &t.id) == fresh.active.as_ref().map(|t| &t.id);
    if same_task {
        fresh.holds_slot = std::mem::take(&mut before.holds_slot);
    } else {
        release_slot(state, before);
    }
}

/// A session ended: its slot and its place in line go to the next agent.
pub(crate) fn session_ended(state: &AppState, live: &mut LiveAgent) {
    release_slot(state, live);
    leave_line(state, &live.id);
}

/// How long a task has been silent, and where its agent is.
#[derive(Debug, Clone, Copy)]
enum Silence {
    /// Connected, reporting no progress for `silent_ms`.
    Online { silent_ms: i64 },
    /// Connected nowhere for longer than the task timeout.
    Offline { patience_ms: i64 },
}

/// A task that saw no progress for too long: whose fault, and what to say. Silence after
/// the agent began starting the new build means the build did not come up (nor did the
/// supervisor bring the old one back to say so); silence before it is the network's.
fn timeout_of(status: TaskStatus, silence: Silence) -> (FailureClass, String) {
    let class = match status {
        TaskStatus::Installing | TaskStatus::Restarting => FailureClass::Build,
        _ => FailureClass::Transient,
    };
    let error = match silence {
        Silence::Online { silent_ms } => {
            format!(
                "no progress for {}s; last status {}",
                silent_ms / 1000,
                status.as_str()
            )
        }
        Silence::Offline { patience_ms } => format!(
            "the agent went silent for more than {}s while the task was {}",
            patience_ms / 1000,
            status.as_str()
        ),
    };
    (class, error)
}

/// Applies an agent's progress report to its task.
pub(crate) async fn progress(
    state: &AppState,
    live: &mut LiveAgent,
    report: UpdateProgress,
) -> StoreResult<()> {
    let status = match report.stage {
        UpdateStage::Downloading => TaskStatus::Downloading,
        UpdateStage::Verifying => TaskStatus::Verifying,
        UpdateStage::Installing => TaskStatus::Installing,
        UpdateStage::Restarting => TaskStatus::Restarting,
        UpdateStage::Unknown => return Ok(()),
    };
    if let Some(transfer) = &report.transfer {
        record_transfer(state, live, &report.task_id, transfer).await?;
    }
    let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    match state
        .store
        .record_progress(
            &live.id,
            &report.task_id,
            status,
            clamp(report.bytes_done),
            clamp(report.bytes_total),
            now_ms(),
        )
        .await
    {
        Ok(task) => {
            state
                .events
                .task(&task.id, &live.id, task.rollout_id.as_deref());
            // The agent has the bytes: its download slot is free for the next one. One
            // that fell back from its mirror downloads here now, and counts.
            if !matches!(status, TaskStatus::Downloading) {
                release_slot(state, live);
            } else if !live.holds_slot && downloads_here(task.mirror.as_deref(), &task) {
                state.admission.take_anyway();
                live.holds_slot = true;
            }
            live.active = Some(Box::new(task));
            Ok(())
        }
        Err(StoreError::NotFound) => {
            tracing::debug!(agent = %live.id, task = %report.task_id, "progress for a task that is not active; ignored");
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// The class of a failure an agent reported. An agent too old to say is believed to
/// have failed on the build: a halt an operator lifts costs less than a bad build that
/// spreads.
fn reported_class(report: &UpdateResult) -> FailureClass {
    report
        .failure_class
        .map(FailureClass::from)
        .unwrap_or(FailureClass::Build)
}

/// Applies an agent's final report to its task.
pub(crate) async fn result(
    state: &AppState,
    live: &mut LiveAgent,
    report: UpdateResult,
) -> StoreResult<()> {
    let Some(task) = live.active.clone().filter(|t| t.id == report.task_id) else {
        if report.outcome == UpdateOutcome::RolledBack {
            return revert_success(state, live, &report).await;
        }
        tracing::debug!(agent = %live.id, task = %report.task_id, "result for a task that is not active; ignored");
        return Ok(());
    };
    let status = match report.outcome {
        // Believed only from the new version itself; the next heartbeat confirms it anyway.
        UpdateOutcome::Succeeded if live.position.version == task.to_version => {
            TaskStatus::Succeeded
        }
        UpdateOutcome::Succeeded | UpdateOutcome::Unknown => return Ok(()),
        UpdateOutcome::Failed => TaskStatus::Failed,
        UpdateOutcome::RolledBack => TaskStatus::RolledBack,
    };
    if let Some(transfer) = &report.transfer {
        record_transfer(state, live, &task.id, transfer).await?;
    }
    let class = if report.outcome == UpdateOutcome::RolledBack {
        FailureClass::Build
    } else {
        reported_class(&report)
    };
    finish(state, live, &task, status, class, report.error.as_deref()).await
}

/// Records how an active task's build reaches the agent, when the report says something
/// new: the first report of the source, or a fallback from the mirror.
async fn record_transfer(
    state: &AppState,
    live: &mut LiveAgent,
    task_id: &str,
    transfer: &Transfer,
) -> StoreResult<()> {
    let Some(task) = live.active.as_ref().filter(|t| t.id == task_id) else {
        return Ok(());
    };
    // Only what the update offered: `mirror` (or a fallback from one) from an agent that
    // was offered none is not believed. A reason this server does not know is kept as
    // `unknown`.
    let source = match transfer.source {
        TransferSource::Mirror if task.mirror.is_some() => "mirror",
        TransferSource::Server | TransferSource::Mirror | TransferSource::Unknown => "server",
    };
    let fallback = transfer
        .fallback
        .filter(|_| source == "server" && task.mirror.is_some())
        .map(MirrorFailure::as_str);
    let kind = transfer.kind.as_str();
    let bytes = transfer.bytes.and_then(|b| i64::try_from(b).ok());
    if task.transfer_source.as_deref() == Some(source)
        && task.transfer_fallback.as_deref() == fallback
        && task.transfer_kind.as_deref().unwrap_or("full") == kind
        && (bytes.is_none() || task.transfer_bytes == bytes)
    {
        return Ok(());
    }
    let error = fallback
        .and(transfer.fallback_error.as_deref())
        .map(crate::mirrors::clean_error);
    let record = TransferRecord {
        source,
        fallback,
        error: error.as_deref(),
        kind,
        bytes: bytes.or(task.transfer_bytes),
    };
    match state
        .store
        .record_transfer(&live.id, task_id, &record)
        .await
    {
        Ok(task) => {
            if let Some(reason) = fallback {
                tracing::info!(agent = %live.id, task = %task.id, mirror = task.mirror.as_deref().unwrap_or(""), %reason, error = error.as_deref().unwrap_or(""), "the agent fell back from its mirror to this server");
            }
            live.active = Some(Box::new(task));
            Ok(())
        }
        Err(StoreError::NotFound) => Ok(()),
        Err(err) => Err(err),
    }
}

/// A build that succeeded (its worker heartbeated) but whose supervisor then failed to
/// take over: the agent went back and says so. The success becomes a build failure, so
/// the version is not offered to the agent again and its rollout counts it (and may
/// halt). Anything else (an unknown task, one that did not succeed, an agent still on
/// the new version) changes nothing.
async fn revert_success(
    state: &AppState,
    live: &mut LiveAgent,
    report: &UpdateResult,
) -> StoreResult<()> {
    let error = report
        .error
        .as_deref()
        .unwrap_or("the new build did not take over; the previous one runs again");
    let task = match state
        .store
        .revert_success(
            &live.id,
            &report.task_id,
            &live.position.version,
            Some(error),
            now_ms(),
        )
        .await
    {
        Ok(task) => task,
        Err(StoreError::NotFound) => {
            tracing::debug!(agent = %live.id, task = %report.task_id, "rolled_back for a task that did not succeed here; ignored");
            return Ok(());
        }
        Err(err) => return Err(err),
    };
    tracing::warn!(agent = %live.id, task = %task.id, to = %task.to_version, %error, "a succeeded update was rolled back");
    state
        .events
        .task(&task.id, &live.id, task.rollout_id.as_deref());
    live.ended.insert(task.id.clone(), error.to_owned());
    live.position
        .failed_versions
        .insert(task.to_version.clone());
    if let Some(rollout) = &task.rollout_id
        && let Err(err) = conductor::drive(state, rollout).await
    {
        tracing::warn!(%err, %rollout, "could not judge the rollout after a rolled-back success");
    }
    // A task to the same build started when the agent came back (before it said why) is
    // cancelled at the check this asks for.
    let _ = state
        .registry
        .send_here(&live.id, crate::session::Outbound::Check);
    Ok(())
}

/// Ends a task. `class` is ignored for a success.
async fn finish(
    state: &AppState,
    live: &mut LiveAgent,
    task: &UpdateTask,
    status: TaskStatus,
    class: FailureClass,
    error: Option<&str>,
) -> StoreResult<()> {
    let class = (status != TaskStatus::Succeeded).then_some(class);
    let now = now_ms();
    match state
        .store
        .finish_task(&live.id, &task.id, status, class, error, now)
        .await
    {
        Ok(_) | Err(StoreError::NotFound) => {}
        Err(err) => return Err(err),
    }
    tracing::info!(agent = %live.id, task = %task.id, to = %task.to_version, status = status.as_str(), class = class.map_or("", FailureClass::as_str), error = error.unwrap_or(""), "update task finished");
    state
        .events
        .task(&task.id, &live.id, task.rollout_id.as_deref());
    if let Some(error) = error {
        live.ended.insert(task.id.clone(), error.to_owned());
    }
    match class {
        Some(FailureClass::Build) => {
            live.position
                .failed_versions
                .insert(task.to_version.clone());
        }
        Some(FailureClass::Environment | FailureClass::Transient)
            if status != TaskStatus::Cancelled =>
        {
            let delay = i64::try_from(state.settings.retry_delay.as_millis()).unwrap_or(i64::MAX);
            live.retry_at
                .insert(task.to_version.clone(), now.saturating_add(delay));
        }
        _ => {}
    }
    live.active = None;
    release_slot(state, live);
    leave_line(state, &live.id);
    // A build failure may halt the rollout now rather than at the next tick.
    if class == Some(FailureClass::Build)
        && let Some(rollout) = &task.rollout_id
        && let Err(err) = conductor::drive(state, rollout).await
    {
        tracing::warn!(%err, %rollout, "could not judge the rollout after a failure");
    }
    Ok(())
}

/// The `update` message for a task, or `None` (and a log line) when its build is no
/// longer offered or is blocked; the task then times out like any unanswered one.
fn update_message(state: &AppState, task: &UpdateTask) -> Option<ServerMessage> {
    if state.blocked_versions().contains(&task.to_version) {
        tracing::warn!(task = %task.id, version = %task.to_version, "the build for this task is rolled back; not sent");
        return None;
    }
    let index = state.releases.current();
    let release = semver::Version::parse(&task.to_version)
        .ok()
        .and_then(|v| index.find(&v, &task.os, &task.arch).cloned());
    let Some(release) = release else {
        tracing::warn!(task = %task.id, version = %task.to_version, "the build for this task is no longer offered");
        return None;
    };
    // Offered once its copy is ready; an agent with a mirror ignores it.
    let compressed = state
        .compressed
        .copy_of(&release.sha256)
        .map(|copy| CompressedBuild {
            encoding: protocol::ENCODING_ZSTD.to_owned(),
            url: downloads::server_url(state, &downloads::compressed_name(&release.file), &task.id),
            size: copy.size,
            sha256: copy.sha256,
        });
    // Offered to an agent that runs a build the delta starts from, when smaller than
    // what it would fetch otherwise; an agent with a mirror ignores it.
    let delta = semver::Version::parse(&task.from_version)
        .ok()
        .and_then(|from| index.find(&from, &task.os, &task.arch))
        .and_then(|base| {
            let delta = state.deltas.delta(&release.sha256, &base.sha256)?;
            let instead = compressed.as_ref().map_or(release.size, |copy| copy.size);
            (delta.copy.size < instead).then(|| DeltaBuild {
                encoding: protocol::ENCODING_ZSTD_PATCH.to_owned(),
                base_version: base.version.to_string(),
                base_sha256: base.sha256.clone(),
                url: downloads::server_url(
                    state,
                    &downloads::delta_name(&release.file, &base.version),
                    &task.id,
                ),
                size: delta.copy.size,
                sha256: delta.copy.sha256,
            })
        });
    Some(ServerMessage::Update(Box::new(Update {
        task_id: task.id.clone(),
        version: task.to_version.clone(),
        url: downloads::server_url(state, &release.file, &task.id),
        mirror_url: task
            .mirror
            .as_deref()
            .map(|base| crate::mirrors::build_url(base, &release.file)),
        sha256: release.sha256,
        size: release.size,
        signature: release.signature,
        rollback: task.kind == TaskKind::Rollback,
        sent_at_ms: u64::try_from(now_ms()).unwrap_or(0),
        compressed,
        delta,
    })))
}

/// Ends the stale tasks `timed_out` in one transaction, grouped by status, each as
/// `timeout_of` says; returns those that ended (not those that reported meanwhile).
async fn time_out(
    state: &AppState,
    stale: &[UpdateTask],
    now: i64,
    patience_ms: i64,
) -> StoreResult<Vec<UpdateTask>> {
    let mut groups: Vec<SilentTasks> = Vec::new();
    for task in stale {
        match groups.iter_mut().find(|g| g.status == task.status) {
            Some(group) => group.task_ids.push(task.id.clone()),
            None => {
                let (class, error) = timeout_of(task.status, Silence::Offline { patience_ms });
                groups.push(SilentTasks {
                    status: task.status,
                    class,
                    error,
                    task_ids: vec![task.id.clone()],
                });
            }
        }
    }
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    state
        .store
        .time_out_tasks(&groups, now.saturating_sub(patience_ms), now)
        .await
}

/// The lease of the silent-task sweep (`Queries::take_lease`).
const SWEEP_LEASE: &str = "silent-task-sweep";

/// Times out tasks of agents that went silent while not connected anywhere: a connected
/// agent's session handles its own task, but a bricked or vanished machine never
/// heartbeats again, and its task must still end. One node at a time sweeps.
pub(crate) async fn time_out_silent_agents(state: AppState) {
    let patience = state.settings.task_timeout;
    let sweep_every = (state.settings.task_timeout / 2).max(std::time::Duration::from_secs(1));
    let mut ticker = tokio::time::interval(sweep_every);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        let patience_ms = i64::try_from(patience.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        // One node sweeps at a time: the lease outlives a sweep interval or two, so a
        // node that dies hands the sweep on soon after.
        let lease_ms = i64::try_from(sweep_every.as_millis()).unwrap_or(i64::MAX) * 3;
        match state
            .store
            .take_lease(
                SWEEP_LEASE,
                &state.node_id,
                now,
                now.saturating_add(lease_ms),
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(err) => {
                tracing::warn!(%err, "could not take the sweep's lease");
                continue;
            }
        }
        crate::metrics::Counters::bump(&crate::metrics::COUNTERS.silent_task_sweeps);
        let live_since = now - i64::try_from(crate::nodes::NODE_LEASE.as_millis()).unwrap_or(0);
        let stale = match state
            .store
            .stale_tasks(now.saturating_sub(patience_ms), live_since)
            .await
        {
            Ok(stale) => stale,
            Err(err) => {
                tracing::warn!(%err, "could not look for silent update tasks");
                continue;
            }
        };
        let ended = match time_out(&state, &stale, now, patience_ms).await {
            Ok(ended) => ended,
            Err(err) => {
                tracing::warn!(%err, tasks = stale.len(), "could not time out silent update tasks");
                continue;
            }
        };
        let mut judge = HashSet::new();
        for task in &ended {
            let error = task.error.as_deref().unwrap_or_default();
            tracing::warn!(agent = %task.agent_id, task = %task.id, to = %task.to_version, "{error}; timed out");
            state
                .events
                .task(&task.id, &task.agent_id, task.rollout_id.as_deref());
            if task.failure_class == Some(FailureClass::Build)
                && let Some(rollout) = &task.rollout_id
            {
                judge.insert(rollout.clone());
            }
        }
        // A rollout is judged once however many of its tasks timed out.
        for rollout in judge {
            if let Err(err) = conductor::drive(&state, &rollout).await {
                tracing::warn!(%err, %rollout, "could not judge the rollout after a timeout");
            }
        }
    }
}
