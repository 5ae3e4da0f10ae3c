//! Turning decisions into update tasks and `update` messages for one connected agent, and
//! moving its task along as the agent reports. Each session owns one `LiveAgent`; the
//! database is touched only when a task is created or changes.

use std::collections::HashSet;

use protocol::{ServerMessage, Update, UpdateOutcome, UpdateProgress, UpdateResult, UpdateStage};

use crate::clock::now_ms;
use crate::engine::{AgentPosition, Decision, channel_admits, needs_update, resolve_channel};
use crate::store::{StoreError, StoreResult, TaskKind, TaskStatus, UpdateTask};
use crate::task_writer::TaskRequest;
use crate::{AppState, rollouts};

/// What a session knows about its agent between database reads.
#[derive(Debug, Clone)]
pub(crate) struct LiveAgent {
    pub(crate) id: String,
    pub(crate) position: AgentPosition,
    pub(crate) active: Option<UpdateTask>,
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
    /// Reads the agent, its unfinished task and its failed versions.
    pub(crate) async fn load(state: &AppState, id: &str, running: &str) -> StoreResult<LiveAgent> {
        let record = state.store.agent(id).await?;
        let active = state.store.active_task(id).await?;
        let failed_versions: HashSet<String> =
            state.store.failed_versions(id).await?.into_iter().collect();
        let (channel, _) = resolve_channel(&record);
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
        })
    }
}

/// Decides whether the agent is due an update, or its task is due a re-dispatch, a
/// timeout or success; returns the message to send, if any.
pub(crate) async fn check(
    state: &AppState,
    live: &mut LiveAgent,
    trigger: Trigger,
) -> StoreResult<Option<ServerMessage>> {
    if let Some(task) = live.active.clone() {
        return advance(state, live, task, trigger).await;
    }
    let index = state.releases.current();
    // An agent on a rolled-back version is moved off it, downwards if need be.
    let (release, kind) = if state.blocked_versions().contains(&live.position.version) {
        let position = &live.position;
        let target = state.with_policy(|policy| {
            index
                .newest(&position.os, &position.arch, |r| {
                    channel_admits(position.channel, r.channel) && policy.allows(r)
                })
                .cloned()
        });
        match target {
            // A rollback this agent refused (an old signature, say) is tried again when
            // something changes (a build, an operator's action, a new session), not on
            // every heartbeat: each attempt would be one more failed task.
            Some(release)
                if trigger == Trigger::Heartbeat
                    && position
                        .failed_versions
                        .contains(&release.version.to_string()) =>
            {
                return Ok(None);
            }
            Some(release) => (release, TaskKind::Rollback),
            None => {
                tracing::warn!(agent = %live.id, version = %position.version, "runs a rolled-back version and no other build is offered for it");
                return Ok(None);
            }
        }
    } else {
        match state.with_policy(|policy| needs_update(&live.position, &index, policy)) {
            Decision::Offer(release) => (release, TaskKind::Update),
            Decision::Hold(_) => return Ok(None),
        }
    };
    let request = TaskRequest {
        agent_id: live.id.clone(),
        from_version: live.position.version.clone(),
        to_version: release.version.to_string(),
        os: release.os.clone(),
        arch: release.arch.clone(),
        kind,
        status: TaskStatus::Dispatched,
    };
    match state.tasks.create(request).await {
        Ok(task) => {
            tracing::info!(agent = %live.id, task = %task.id, from = %task.from_version, to = %task.to_version, "dispatching update");
            state.events.task(&task.id, &live.id);
            let message = update_message(state, &task);
            live.active = Some(task);
            Ok(message)
        }
        // Someone else (an operator, another node) created a task meanwhile: pick it up.
        Err(StoreError::Conflict(_)) => {
            live.active = state.store.active_task(&live.id).await?;
            Ok(None)
        }
        Err(err) => Err(err),
    }
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
            finish(state, live, &task, TaskStatus::Succeeded, None).await?;
        }
        return Ok(None);
    }
    let settings = &state.settings;
    let now = now_ms();
    let silent_ms = now - task.last_activity_ms();
    let timeout_ms = i64::try_from(settings.task_timeout.as_millis()).unwrap_or(i64::MAX);
    // The agent may have lost the message, or the download it had begun, with its
    // previous session (a server killed mid-rollout drops them all); an agent still
    // working on the task ignores the repeated update.
    let resend_on_connect = trigger == Trigger::Connect
        && matches!(
            task.status,
            TaskStatus::Dispatched | TaskStatus::Downloading
        );
    let redispatch =
        resend_on_connect || task.status == TaskStatus::Queued || silent_ms > timeout_ms;
    if !redispatch {
        return Ok(None);
    }
    let may_retry = (resend_on_connect
        || matches!(task.status, TaskStatus::Queued | TaskStatus::Dispatched))
        && task.attempts < i64::from(settings.task_max_attempts);
    if !may_retry {
        let error = format!(
            "no progress for {}s ({} of {} attempts); last status {}",
            silent_ms / 1000,
            task.attempts,
            settings.task_max_attempts,
            task.status.as_str()
        );
        finish(state, live, &task, TaskStatus::TimedOut, Some(&error)).await?;
        return Ok(None);
    }
    match state.store.record_dispatch(&task.id, now).await {
        Ok(task) => {
            tracing::info!(agent = %live.id, task = %task.id, attempt = task.attempts, to = %task.to_version, "dispatching update again");
            state.events.task(&task.id, &live.id);
            let message = update_message(state, &task);
            live.active = Some(task);
            Ok(message)
        }
        Err(StoreError::NotFound) => {
            live.active = None;
            Ok(None)
        }
        Err(err) => Err(err),
    }
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
            state.events.task(&task.id, &live.id);
            live.active = Some(task);
            Ok(())
        }
        Err(StoreError::NotFound) => {
            tracing::debug!(agent = %live.id, task = %report.task_id, "progress for a task that is not active; ignored");
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// Applies an agent's final report to its task.
pub(crate) async fn result(
    state: &AppState,
    live: &mut LiveAgent,
    report: UpdateResult,
) -> StoreResult<()> {
    let Some(task) = live.active.clone().filter(|t| t.id == report.task_id) else {
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
    finish(state, live, &task, status, report.error.as_deref()).await
}

async fn finish(
    state: &AppState,
    live: &mut LiveAgent,
    task: &UpdateTask,
    status: TaskStatus,
    error: Option<&str>,
) -> StoreResult<()> {
    match state
        .store
        .finish_task(&live.id, &task.id, status, error, now_ms())
        .await
    {
        Ok(_) | Err(StoreError::NotFound) => {}
        Err(err) => return Err(err),
    }
    tracing::info!(agent = %live.id, task = %task.id, to = %task.to_version, status = status.as_str(), error = error.unwrap_or(""), "update task finished");
    state.events.task(&task.id, &live.id);
    if status.is_failure() {
        live.position
            .failed_versions
            .insert(task.to_version.clone());
        halt_if_failing(state, task).await?;
    }
    live.active = None;
    Ok(())
}

/// Stops dispatching a version on a platform once too many of its attempts failed.
pub(crate) async fn halt_if_failing(state: &AppState, task: &UpdateTask) -> StoreResult<()> {
    let key = (task.to_version.clone(), task.os.clone(), task.arch.clone());
    if state.halted().contains(&key) {
        return Ok(());
    }
    let tallies = rollouts::tally(&state.store.task_counts().await?);
    let Some(reason) = tallies
        .get(&key)
        .and_then(|tally| rollouts::should_halt(tally, &state.settings.rollout_policy()))
    else {
        return Ok(());
    };
    if state
        .store
        .halt(&key.0, &key.1, &key.2, &reason, now_ms())
        .await?
    {
        let target = format!("{} {}/{}", key.0, key.1, key.2);
        let version = key.0.clone();
        state
            .halted
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key);
        tracing::warn!(rollout = %target, %reason, "rollout halted");
        state.events.rollout(Some(&version));
        // The other nodes stop dispatching it too.
        state
            .registry
            .signal_other_nodes(crate::nodes::Signal::CheckAll);
        state
            .audit("drover", "rollout.halt", &target, Some(reason), "halted")
            .await;
    }
    Ok(())
}

/// The `update` message for a task, or `None` (and a log line) when its build is no
/// longer offered; the task then times out like any unanswered one.
fn update_message(state: &AppState, task: &UpdateTask) -> Option<ServerMessage> {
    let index = state.releases.current();
    let release = semver::Version::parse(&task.to_version)
        .ok()
        .and_then(|v| index.find(&v, &task.os, &task.arch).cloned());
    let Some(release) = release else {
        tracing::warn!(task = %task.id, version = %task.to_version, "the build for this task is no longer offered");
        return None;
    };
    Some(ServerMessage::Update(Update {
        task_id: task.id.clone(),
        version: task.to_version.clone(),
        url: format!("{}/downloads/{}", state.settings.public_url, release.file),
        sha256: release.sha256,
        size: release.size,
        signature: release.signature,
        rollback: task.kind == TaskKind::Rollback,
        sent_at_ms: u64::try_from(now_ms()).unwrap_or(0),
    }))
}

/// Times out tasks of agents that went silent while not connected here: a connected
/// agent's session handles its own task, but a bricked or vanished machine never
/// heartbeats again, and its task must still end. It gets as long as a connected agent
/// gets for all its attempts.
pub(crate) async fn time_out_silent_agents(state: AppState) {
    let patience = state.settings.task_timeout * state.settings.task_max_attempts;
    let mut ticker = tokio::time::interval(
        (state.settings.task_timeout / 2).max(std::time::Duration::from_secs(1)),
    );
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        let patience_ms = i64::try_from(patience.as_millis()).unwrap_or(i64::MAX);
        let stale = match state
            .store
            .stale_tasks(now_ms().saturating_sub(patience_ms))
            .await
        {
            Ok(stale) => stale,
            Err(err) => {
                tracing::warn!(%err, "could not look for silent update tasks");
                continue;
            }
        };
        for task in stale {
            // A connected agent's session, on whichever node, looks after its own task.
            let connected = state
                .store
                .agent(&task.agent_id)
                .await
                .is_ok_and(|agent| crate::nodes::is_live(agent.node_last_beat_ms, now_ms()));
            if connected {
                continue;
            }
            let error = format!(
                "the agent went silent for {}s while the task was {}",
                patience.as_secs(),
                task.status.as_str()
            );
            match state
                .store
                .finish_task(
                    &task.agent_id,
                    &task.id,
                    TaskStatus::TimedOut,
                    Some(&error),
                    now_ms(),
                )
                .await
            {
                Ok(_) => {
                    tracing::warn!(agent = %task.agent_id, task = %task.id, to = %task.to_version, "{error}; timed out");
                    state.events.task(&task.id, &task.agent_id);
                }
                Err(StoreError::NotFound) => {}
                Err(err) => tracing::warn!(%err, task = %task.id, "could not time out a task"),
            }
        }
    }
}
