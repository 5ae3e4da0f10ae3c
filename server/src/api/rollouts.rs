//! `/api/v1/rollouts`: the health of every version on every platform, and the operator
//! actions on them: promote (behind the health gate), rollback, unblock, resume.

use std::collections::{BTreeSet, HashMap};

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, Caller, ErrorBody, openapi, optional_body};
use crate::AppState;
use crate::clock::{now_ms, rfc3339};
use crate::engine::{channel_admits, resolve_channel};
use crate::releases::{Channel, Release};
use crate::rollouts::{self, GateVerdict, RolloutKey, Tally};
use crate::session::Outbound;
use crate::store::Role;

/// One version on one platform.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Rollout)]
pub(crate) struct RolloutView {
    version: String,
    os: String,
    arch: String,
    #[schema(schema_with = rollout_state)]
    state: &'static str,
    /// Agents on the platform whose channel sees this build and that run it or older.
    targeted: u64,
    /// Tasks to this version, in any state.
    dispatched: u64,
    in_progress: u64,
    succeeded: u64,
    failed: u64,
    rolled_back: u64,
    timed_out: u64,
    /// Agents running this version now.
    running: u64,
    /// Succeeded over finished tasks, 0 to 1; null before any task finished.
    success_rate: Option<f64>,
    /// Whether a promote would pass the health gate now.
    gate: GateView,
    /// The newest beta has been ahead of stable for longer than the threshold.
    stale_stable: bool,
    /// How long this beta has been ahead of stable; null unless it is the newest beta.
    stable_lag_seconds: Option<i64>,
    halt_reason: Option<String>,
    /// RFC 3339.
    first_seen: String,
    /// RFC 3339.
    promoted_at: Option<String>,
}

fn rollout_state() -> utoipa::openapi::schema::Object {
    openapi::string_enum([
        Channel::Beta.as_str(),
        Channel::Stable.as_str(),
        "halted",
        "rolled_back",
    ])
}

/// The health gate's verdict.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct GateView {
    pass: bool,
    reason: String,
}

impl From<GateVerdict> for GateView {
    fn from(verdict: GateVerdict) -> GateView {
        GateView {
            pass: verdict.pass,
            reason: verdict.reason,
        }
    }
}

#[utoipa::path(
    get,
    path = "/rollouts",
    operation_id = "list_rollouts",
    tag = "rollouts",
    summary = "The health of every version on every platform",
    responses((status = 200, description = "Every rollout, newest version first", body = [RolloutView])),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn list(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<RolloutView>>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(Json(rollout_views(&state).await?))
}

async fn rollout_views(state: &AppState) -> Result<Vec<RolloutView>, ApiError> {
    let records = state.store.rollout_records().await?;
    let tallies = rollouts::tally(&state.store.task_counts().await?);
    let agents = state.store.list_agents().await?;
    let index = state.releases.current();
    let policy = state.settings.rollout_policy();
    let now = now_ms();
    let blocked = state.blocked_versions().clone();
    let halted = state.halted().clone();
    let lags = rollouts::stable_lag_ms(&index, &blocked, &rollouts::first_seen(&records), now);

    let mut keys: BTreeSet<RolloutKey> = records
        .iter()
        .map(|r| (r.version.clone(), r.os.clone(), r.arch.clone()))
        .collect();
    keys.extend(
        index
            .releases
            .iter()
            .map(|r| (r.version.to_string(), r.os.clone(), r.arch.clone())),
    );
    let records: HashMap<RolloutKey, _> = records
        .into_iter()
        .map(|r| ((r.version.clone(), r.os.clone(), r.arch.clone()), r))
        .collect();

    let mut views = Vec::new();
    for key in keys {
        let (version, os, arch) = key.clone();
        let Ok(parsed) = semver::Version::parse(&version) else {
            continue;
        };
        let record = records.get(&key);
        let channel = index
            .find(&parsed, &os, &arch)
            .map(|r| r.channel)
            .unwrap_or(match record.and_then(|r| r.promoted_at_ms) {
                Some(_) => Channel::Stable,
                None => Channel::Beta,
            });
        let state_name = if blocked.contains(&version) {
            "rolled_back"
        } else if halted.contains(&key) {
            "halted"
        } else {
            channel.as_str()
        };
        let on_platform = agents.iter().filter(|a| a.os == os && a.arch == arch);
        let running = on_platform.clone().filter(|a| a.version == version).count() as u64;
        let targeted = on_platform
            .filter(|a| channel_admits(resolve_channel(a).0, channel))
            .filter(|a| semver::Version::parse(&a.version).is_ok_and(|v| v <= parsed))
            .count() as u64;
        let tally = tallies.get(&key).copied().unwrap_or_default();
        let lag = lags
            .get(&(os.clone(), arch.clone()))
            .filter(|(beta, _)| *beta == version)
            .map(|(_, lag)| *lag);
        views.push(RolloutView {
            state: state_name,
            targeted,
            running,
            success_rate: tally.success_rate(),
            gate: rollouts::gate(&tally, &policy).into(),
            stale_stable: lag.is_some_and(|lag| lag > policy.stale_stable_after_ms),
            stable_lag_seconds: lag.map(|lag| lag / 1000),
            halt_reason: record.and_then(|r| r.halt_reason.clone()),
            first_seen: rfc3339(record.map_or(now, |r| r.first_seen_ms)),
            promoted_at: record.and_then(|r| r.promoted_at_ms).map(rfc3339),
            dispatched: tally.dispatched,
            in_progress: tally.in_progress,
            succeeded: tally.succeeded,
            failed: tally.failed,
            rolled_back: tally.rolled_back,
            timed_out: tally.timed_out,
            version,
            os,
            arch,
        });
    }
    views.sort_by(|a, b| {
        let version = |v: &RolloutView| semver::Version::parse(&v.version).ok();
        version(b)
            .cmp(&version(a))
            .then_with(|| (&a.os, &a.arch).cmp(&(&b.os, &b.arch)))
    });
    Ok(views)
}

fn parse_version(text: &str) -> Result<semver::Version, ApiError> {
    semver::Version::parse(text)
        .map_err(|e| ApiError::BadRequest(format!("{text:?} is not a version: {e}")))
}

/// Optional platform scope of an action.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PromoteRequest {
    /// Only this platform's tasks count for the gate.
    os: Option<String>,
    arch: Option<String>,
    /// Promote even when the health gate fails.
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Promoted {
    version: String,
    /// The build files moved from beta to stable.
    promoted: Vec<String>,
    gate: GateView,
    /// Promoted past a failing health gate.
    forced: bool,
}

/// Flips every `.channel` sidecar of the version to stable (every platform; `os`/`arch`
/// scope only the gate), rescans, and nudges every connected agent at once.
#[utoipa::path(
    post,
    path = "/rollouts/{version}/promote",
    tag = "rollouts",
    params(("version" = String, Path, description = "A semver version, such as `1.4.0`")),
    request_body(
        content = Option<PromoteRequest>,
        description = "Optional; no body or `null` means every platform, behind the health gate",
    ),
    responses(
        (status = 200, description = "The version is stable", body = Promoted),
        (status = 400, description = "The body or the version is malformed", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No build of the version is offered (for the platform)", body = ErrorBody),
        (status = 409, description = "The health gate fails (the detail says why) and `force` is not set, or the version is rolled back", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn promote(
    caller: Caller,
    State(state): State<AppState>,
    Path(version): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Promoted>, ApiError> {
    caller.require(Role::Operator)?;
    let request: PromoteRequest = optional_body(&body)?;
    let parsed = parse_version(&version)?;
    let index = state.releases.current();
    let builds: Vec<Release> = index
        .releases
        .iter()
        .filter(|r| r.version == parsed)
        .cloned()
        .collect();
    if builds.is_empty() {
        return Err(ApiError::NotFound(format!("no offered build of {version}")));
    }
    let in_scope = |os: &str, arch: &str| {
        request.os.as_deref().is_none_or(|o| o == os)
            && request.arch.as_deref().is_none_or(|a| a == arch)
    };
    if !builds.iter().any(|r| in_scope(&r.os, &r.arch)) {
        return Err(ApiError::NotFound(format!(
            "no offered build of {version} for {}/{}",
            request.os.as_deref().unwrap_or("*"),
            request.arch.as_deref().unwrap_or("*")
        )));
    }
    if state.blocked_versions().contains(&version) {
        return Err(ApiError::Conflict(format!(
            "{version} is rolled back; unblock it before promoting it"
        )));
    }
    let mut tally = Tally::default();
    for ((v, os, arch), t) in rollouts::tally(&state.store.task_counts().await?) {
        if v == version && in_scope(&os, &arch) {
            tally = tally.plus(&t);
        }
    }
    let verdict = rollouts::gate(&tally, &state.settings.rollout_policy());
    if !verdict.pass && !request.force {
        state
            .audit(
                &caller.actor,
                "rollout.promote",
                &version,
                Some(verdict.reason.clone()),
                "refused by the health gate",
            )
            .await;
        return Err(ApiError::Conflict(format!(
            "health gate: {}",
            verdict.reason
        )));
    }
    let mut promoted = Vec::new();
    for build in builds.iter().filter(|b| b.channel != Channel::Stable) {
        write_channel(&state.settings.downloads, &build.file, Channel::Stable)
            .map_err(|e| ApiError::Internal(format!("while promoting {}: {e:#}", build.file)))?;
        promoted.push(build.file.clone());
    }
    state.store.mark_promoted(&version, now_ms()).await?;
    state.releases.rescan().await;
    state.registry.broadcast(|| Outbound::Check);
    state.events.rollout(Some(&version));
    let forced = request.force && !verdict.pass;
    state
        .audit(
            &caller.actor,
            "rollout.promote",
            &version,
            Some(format!("{} ({} builds)", verdict.reason, promoted.len())),
            if forced {
                "promoted (forced past the health gate)"
            } else {
                "promoted"
            },
        )
        .await;
    Ok(Json(Promoted {
        version,
        promoted,
        gate: verdict.into(),
        forced,
    }))
}

/// Writes `<file>.channel` by rename, so the scanner never reads half of it.
fn write_channel(downloads: &std::path::Path, file: &str, channel: Channel) -> anyhow::Result<()> {
    use std::io::Write;
    // A temporary name of its own (several nodes may promote at once); the leading dot
    // keeps the scanner from listing it.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{file}.channel."))
        .tempfile_in(downloads)?;
    writeln!(tmp, "{}", channel.as_str())?;
    tmp.as_file().sync_all()?;
    tmp.persist(downloads.join(format!("{file}.channel")))?;
    Ok(())
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RolledBack {
    version: String,
    /// Always true.
    blocked: bool,
    /// Agents running the version, each sent the newest other build of its channel.
    agents_rolled_back: usize,
}

/// Blocks the version and moves every agent running it to the newest other build of
/// its channel; agents offline now are moved when they reconnect.
#[utoipa::path(
    post,
    path = "/rollouts/{version}/rollback",
    tag = "rollouts",
    params(("version" = String, Path, description = "A semver version, such as `1.4.0`")),
    responses(
        (status = 200, description = "The version is blocked", body = RolledBack),
        (status = 400, description = "The version is malformed", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No build of the version was ever offered", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn rollback(
    caller: Caller,
    State(state): State<AppState>,
    Path(version): Path<String>,
) -> Result<Json<RolledBack>, ApiError> {
    caller.require(Role::Operator)?;
    parse_version(&version)?;
    let known = state
        .releases
        .current()
        .releases
        .iter()
        .any(|r| r.version.to_string() == version)
        || state
            .store
            .rollout_records()
            .await?
            .iter()
            .any(|r| r.version == version);
    if !known {
        return Err(ApiError::NotFound(format!(
            "no build of {version} was ever offered"
        )));
    }
    let now = now_ms();
    state
        .store
        .block_version(&version, &format!("rolled back by {}", caller.actor), now)
        .await?;
    state.reload_rollout_state().await?;
    for agent in state
        .store
        .cancel_tasks_to(&version, &format!("{version} was rolled back"), now)
        .await?
    {
        state.registry.send(&agent, Outbound::Refresh);
        state.events.agent(&agent);
    }
    let running = state
        .store
        .list_agents()
        .await?
        .iter()
        .filter(|a| a.version == version)
        .count();
    state.registry.broadcast(|| Outbound::Check);
    state.events.rollout(Some(&version));
    state
        .audit(
            &caller.actor,
            "rollout.rollback",
            &version,
            Some(format!("{running} agents run it")),
            "blocked",
        )
        .await;
    Ok(Json(RolledBack {
        version,
        blocked: true,
        agents_rolled_back: running,
    }))
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Unblocked {
    version: String,
    /// Always false.
    blocked: bool,
}

#[utoipa::path(
    post,
    path = "/rollouts/{version}/unblock",
    tag = "rollouts",
    summary = "Offer a rolled-back version again",
    params(("version" = String, Path, description = "A semver version, such as `1.4.0`")),
    responses(
        (status = 200, description = "The version is offered again", body = Unblocked),
        (status = 400, description = "The version is malformed", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "The version is not blocked", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn unblock(
    caller: Caller,
    State(state): State<AppState>,
    Path(version): Path<String>,
) -> Result<Json<Unblocked>, ApiError> {
    caller.require(Role::Operator)?;
    parse_version(&version)?;
    if !state.store.unblock_version(&version).await? {
        return Err(ApiError::NotFound(format!("{version} is not blocked")));
    }
    state.reload_rollout_state().await?;
    state.registry.broadcast(|| Outbound::Check);
    state.events.rollout(Some(&version));
    state
        .audit(
            &caller.actor,
            "rollout.unblock",
            &version,
            None,
            "offered again",
        )
        .await;
    Ok(Json(Unblocked {
        version,
        blocked: false,
    }))
}

/// Optional platform scope of a resume; both or neither.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResumeRequest {
    os: Option<String>,
    arch: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Resumed {
    version: String,
    /// Halted rollouts (platforms) resumed.
    resumed: u64,
}

#[utoipa::path(
    post,
    path = "/rollouts/{version}/resume",
    operation_id = "resume_rollout",
    tag = "rollouts",
    summary = "Resume a rollout halted by its failure rate",
    params(("version" = String, Path, description = "A semver version, such as `1.4.0`")),
    request_body(
        content = Option<ResumeRequest>,
        description = "Optional; no body (or only one of `os` and `arch`) resumes every platform",
    ),
    responses(
        (status = 200, description = "Dispatch of the version goes on", body = Resumed),
        (status = 400, description = "The body or the version is malformed", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No rollout of the version is halted", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn resume(
    caller: Caller,
    State(state): State<AppState>,
    Path(version): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Resumed>, ApiError> {
    caller.require(Role::Operator)?;
    let request: ResumeRequest = optional_body(&body)?;
    parse_version(&version)?;
    let platform = request.os.as_deref().zip(request.arch.as_deref());
    let resumed = state.store.resume(&version, platform).await?;
    if resumed == 0 {
        return Err(ApiError::NotFound(format!(
            "no halted rollout of {version}"
        )));
    }
    state.reload_rollout_state().await?;
    state.registry.broadcast(|| Outbound::Check);
    state.events.rollout(Some(&version));
    state
        .audit(
            &caller.actor,
            "rollout.resume",
            &version,
            Some(format!("{resumed} rollouts")),
            "resumed",
        )
        .await;
    Ok(Json(Resumed { version, resumed }))
}
