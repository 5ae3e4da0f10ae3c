//! `/api/v1/rollouts`: rollout records (listing, one with its timeline, its agents by
//! stage), the operator actions on them (pause, resume, advance, abort), a targeted
//! rollout from a selector, and the version-keyed shortcuts (promote behind the health
//! gate, rollback, unblock, resume). Handlers parse and render; `conductor` decides.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, Caller, ErrorBody, OptionalBody, Params, openapi};
use crate::AppState;
use crate::clock::{now_ms, rfc3339};
use crate::conductor::{self, Action, ConductError, Health};
use crate::engine::resolve_channel;
use crate::releases::{Channel, Release};
use crate::rollouts::health::{Counts, GateVerdict, Stage};
use crate::rollouts::plan::{Plan, Share};
use crate::store::{
    FailureClass, Role, Rollout, RolloutFilter, RolloutKind, RolloutState, TargetPage, TaskStatus,
};

impl From<ConductError> for ApiError {
    fn from(err: ConductError) -> ApiError {
        match err {
            ConductError::NotFound(m) => ApiError::NotFound(m),
            ConductError::Conflict(m) => ApiError::Conflict(m),
            ConductError::Store(e) => e.into(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Platform {
    os: String,
    arch: String,
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

/// One wave of a rollout.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WaveView {
    /// 0 is the first wave.
    index: usize,
    /// Cumulative share of the targets: `1%`, `10%` or a count such as `50`.
    share: String,
    /// Agents in this wave itself.
    size: u64,
    /// `pending` (not started), `running`, `baking` (passed; the next wave starts at
    /// `bake_until`), `passed`, or `halted`.
    #[schema(schema_with = wave_state)]
    state: &'static str,
    /// RFC 3339.
    started_at: Option<String>,
    /// RFC 3339: when it met its success threshold.
    passed_at: Option<String>,
    /// RFC 3339: when the next wave starts by itself.
    bake_until: Option<String>,
    counts: Counts,
}

fn wave_state() -> utoipa::openapi::schema::Object {
    openapi::string_enum(["pending", "running", "baking", "passed", "halted"])
}

/// A rollout: what it moves, where it stands, and its waves. Its stage counts add up to
/// `targeted`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Rollout)]
pub(crate) struct RolloutView {
    id: String,
    version: String,
    #[schema(schema_with = openapi::rollout_kind)]
    kind: RolloutKind,
    #[schema(schema_with = openapi::rollout_state)]
    state: RolloutState,
    /// Why it is halted, aborted or superseded.
    reason: Option<String>,
    platforms: Vec<Platform>,
    #[serde(flatten)]
    counts: Counts,
    /// The wave started last (0 is the first).
    current_wave: usize,
    waves: Vec<WaveView>,
    /// The promote gate over this beta rollout; null for other kinds.
    gate: Option<GateView>,
    /// Maintenance windows hold this rollout's agents: a `promote` or `targeted` rollout
    /// that does not override them.
    obeys_windows: bool,
    /// Closed long enough ago that its tasks and targets were pruned (`--retain-tasks`):
    /// the counts are the ones frozen then, and its agents are no longer listed.
    details_pruned: bool,
    /// This beta build has been ahead of stable for longer than the threshold.
    stale_stable: bool,
    /// How long this beta build has been ahead of stable; null unless it is.
    stable_lag_seconds: Option<i64>,
    started_by: String,
    /// RFC 3339.
    created_at: String,
    /// RFC 3339.
    updated_at: String,
}

/// An entry of a rollout's timeline.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TimelineEntry {
    /// RFC 3339.
    at: String,
    #[schema(schema_with = openapi::rollout_state)]
    state: String,
    actor: String,
    detail: Option<String>,
}

/// A rollout with its timeline and its plan's thresholds.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RolloutDetail {
    #[serde(flatten)]
    rollout: RolloutView,
    timeline: Vec<TimelineEntry>,
    plan: PlanView,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PlanView {
    waves: Vec<PlanWave>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct PlanWave {
    share: String,
    bake_seconds: i64,
    /// Build failures over finished updates above this share halt the rollout.
    max_failure_rate: f64,
    /// The rate applies once this many updates of the wave finished.
    min_finished: u64,
    /// More build failures than this halt the rollout; null for no such limit.
    max_failures: Option<u64>,
    /// The share of the wave's agents that must succeed before it passes.
    min_success_share: f64,
}

impl From<&Plan> for PlanView {
    fn from(plan: &Plan) -> PlanView {
        PlanView {
            waves: plan
                .waves
                .iter()
                .map(|w| PlanWave {
                    share: w.share.to_string(),
                    bake_seconds: w.bake_ms / 1000,
                    max_failure_rate: w.thresholds.max_failure_rate,
                    min_finished: w.thresholds.min_finished,
                    max_failures: w.thresholds.max_failures,
                    min_success_share: w.thresholds.min_success_share,
                })
                .collect(),
        }
    }
}

/// What the listing computes once for every row.
struct Context {
    lags: HashMap<(String, String), (String, i64)>,
    stale_after_ms: i64,
}

async fn context(state: &AppState) -> Result<Context, ApiError> {
    Ok(Context {
        lags: conductor::stable_lags(state).await?,
        stale_after_ms: state.settings.stale_stable_after_ms(),
    })
}

async fn render(
    state: &AppState,
    rollout: Rollout,
    observed: &conductor::Observed,
    context: &Context,
) -> Result<RolloutView, ApiError> {
    let health = observed.health(state, |_| true);
    let gate = if rollout.kind == RolloutKind::Beta {
        let platforms = rollout.platforms.clone();
        Some(
            conductor::gate_knowing(
                state,
                &rollout.version,
                |os, arch| platforms.iter().any(|(o, a)| o == os && a == arch),
                Some(observed),
            )
            .await?
            .into(),
        )
    } else {
        None
    };
    let lag = (rollout.kind == RolloutKind::Beta && rollout.state != RolloutState::Superseded)
        .then(|| {
            rollout
                .platforms
                .iter()
                .filter_map(|p| context.lags.get(p))
                .filter(|(beta, _)| *beta == rollout.version)
                .map(|(_, lag)| *lag)
                .max()
        })
        .flatten();
    Ok(view(rollout, health, gate, lag, context.stale_after_ms))
}

fn view(
    rollout: Rollout,
    health: Health,
    gate: Option<GateView>,
    lag: Option<i64>,
    stale_after_ms: i64,
) -> RolloutView {
    let current = usize::try_from(rollout.current_wave).unwrap_or(0);
    let now = now_ms();
    let waves = health
        .plan
        .waves
        .iter()
        .zip(&health.waves)
        .enumerate()
        .map(|(index, (wave, counts))| {
            let row = health.wave_rows.iter().find(|w| w.wave == index as i64);
            let passed_at = row.and_then(|r| r.passed_at);
            let bake_until = passed_at
                .filter(|_| index < health.plan.last_wave() && counts.targeted > 0)
                .map(|at| at.saturating_add(wave.bake_ms));
            let state = if index > current {
                "pending"
            } else if rollout.state == RolloutState::Halted && index == current {
                "halted"
            } else if passed_at.is_none() {
                "running"
            } else if index == current && bake_until.is_some_and(|until| until > now) {
                "baking"
            } else {
                "passed"
            };
            WaveView {
                index,
                share: wave.share.to_string(),
                size: health.plan.wave_size(index),
                state,
                started_at: row.map(|r| rfc3339(r.started_at)),
                passed_at: passed_at.map(rfc3339),
                bake_until: bake_until.map(rfc3339),
                counts: *counts,
            }
        })
        .collect();
    RolloutView {
        platforms: rollout
            .platforms
            .iter()
            .map(|(os, arch)| Platform {
                os: os.clone(),
                arch: arch.clone(),
            })
            .collect(),
        counts: health.total,
        current_wave: current,
        waves,
        gate,
        obeys_windows: crate::rollouts::obeys_windows(rollout.kind, &health.plan),
        details_pruned: rollout.summary.is_some(),
        stale_stable: lag.is_some_and(|lag| lag > stale_after_ms),
        stable_lag_seconds: lag.map(|lag| lag / 1000),
        created_at: rfc3339(rollout.created_at_ms),
        updated_at: rfc3339(rollout.updated_at_ms),
        id: rollout.id,
        version: rollout.version,
        kind: rollout.kind,
        state: rollout.state,
        reason: rollout.reason,
        started_by: rollout.started_by,
    }
}

async fn one_view(state: &AppState, rollout: Rollout) -> Result<RolloutView, ApiError> {
    let observed = conductor::observe(state, &rollout).await?;
    render(state, rollout, &observed, &context(state).await?).await
}

/// Filters and paging of the rollout listing.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only rollouts in this state.
    #[param(schema_with = openapi::rollout_state)]
    state: Option<String>,
    /// Only rollouts of this version.
    version: Option<String>,
    /// Page size, 1 to 200 (default 50).
    #[param(schema_with = rollouts_limit)]
    limit: Option<i64>,
    /// Rollouts to skip.
    offset: Option<i64>,
}

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;

/// A page size from 1 to `max`.
fn page_limit(max: i64) -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Integer)
        .minimum(Some(1))
        .maximum(Some(max))
        .build()
}

fn rollouts_limit() -> utoipa::openapi::schema::Object {
    page_limit(MAX_PAGE)
}

/// The largest page of a rollout's agents.
const MAX_AGENTS_PAGE: usize = 500;

fn agents_limit() -> utoipa::openapi::schema::Object {
    page_limit(MAX_AGENTS_PAGE as i64)
}

#[utoipa::path(
    get,
    path = "/rollouts",
    operation_id = "list_rollouts",
    tag = "rollouts",
    summary = "Rollouts, newest first",
    params(ListQuery),
    responses(
        (status = 200, description = "Rollouts, newest first", body = [RolloutView]),
        (status = 400, description = "A filter is malformed", body = ErrorBody),
    ),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Params(query): Params<ListQuery>,
) -> Result<Json<Vec<RolloutView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let wanted = match query.state.as_deref() {
        None => None,
        Some(text) => Some(RolloutState::parse(text).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "state {text:?} is not one of {}",
                RolloutState::ALL.map(RolloutState::as_str).join(", ")
            ))
        })?),
    };
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit {limit} is out of range: 1 to {MAX_PAGE}"
        )));
    }
    let rollouts = state
        .store
        .list_rollouts(&RolloutFilter {
            state: wanted,
            version: query.version.as_deref(),
            limit,
            offset: query.offset.unwrap_or(0).max(0),
        })
        .await?;
    let context = context(&state).await?;
    let observed = conductor::observe_all(&state, &rollouts).await?;
    let mut views = Vec::with_capacity(rollouts.len());
    for (rollout, observed) in rollouts.into_iter().zip(&observed) {
        views.push(render(&state, rollout, observed, &context).await?);
    }
    Ok(Json(views))
}

async fn rollout_or_404(state: &AppState, id: &str) -> Result<Rollout, ApiError> {
    match state.store.rollout(id).await {
        Ok(rollout) => Ok(rollout),
        Err(crate::store::StoreError::NotFound) => {
            Err(ApiError::NotFound(format!("no rollout {id}")))
        }
        Err(err) => Err(err.into()),
    }
}

#[utoipa::path(
    get,
    path = "/rollouts/{id}",
    operation_id = "get_rollout",
    tag = "rollouts",
    summary = "One rollout, with its plan and timeline",
    params(("id" = String, Path, description = "The rollout's id")),
    responses(
        (status = 200, description = "The rollout", body = RolloutDetail),
        (status = 404, description = "No rollout has this id", body = ErrorBody),
    ),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn one(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RolloutDetail>, ApiError> {
    caller.require(Role::Viewer)?;
    let rollout = rollout_or_404(&state, &id).await?;
    let plan = conductor::parse_plan(&rollout)?;
    let timeline = state
        .store
        .rollout_events(&id)
        .await?
        .into_iter()
        .map(|e| TimelineEntry {
            at: rfc3339(e.at),
            state: e.state,
            actor: e.actor,
            detail: e.detail,
        })
        .collect();
    Ok(Json(RolloutDetail {
        rollout: one_view(&state, rollout).await?,
        timeline,
        plan: PlanView::from(&plan),
    }))
}

/// Which agents of a rollout to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AgentsQuery {
    /// Only agents in this stage: waiting, queued, downloading, installing, succeeded,
    /// failed, rolled_back, cancelled or skipped.
    #[param(schema_with = stage)]
    stage: Option<String>,
    /// Only agents of this wave (0 is the first).
    wave: Option<usize>,
    /// Page size, 1 to 500 (default 100).
    #[param(schema_with = agents_limit)]
    limit: Option<usize>,
    offset: Option<usize>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RolloutAgent {
    agent_id: String,
    hostname: String,
    /// The version it runs.
    version: String,
    wave: usize,
    #[schema(schema_with = stage)]
    stage: Stage,
    /// Its newest task in this rollout.
    task_id: Option<String>,
    #[schema(schema_with = openapi::nullable_task_status)]
    status: Option<TaskStatus>,
    #[schema(schema_with = openapi::failure_class)]
    failure_class: Option<FailureClass>,
    error: Option<String>,
}

fn stage() -> utoipa::openapi::schema::Object {
    openapi::string_enum(Stage::ALL.map(Stage::as_str))
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RolloutAgents {
    /// Agents matching the filters, before paging.
    total: usize,
    agents: Vec<RolloutAgent>,
}

#[utoipa::path(
    get,
    path = "/rollouts/{id}/agents",
    operation_id = "rollout_agents",
    tag = "rollouts",
    summary = "The agents of a rollout and where each stands",
    params(("id" = String, Path, description = "The rollout's id"), AgentsQuery),
    responses(
        (status = 200, description = "A page of the rollout's agents, by wave", body = RolloutAgents),
        (status = 400, description = "A filter is malformed", body = ErrorBody),
        (status = 404, description = "No rollout has this id", body = ErrorBody),
    ),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn agents(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Params(query): Params<AgentsQuery>,
) -> Result<Json<RolloutAgents>, ApiError> {
    caller.require(Role::Viewer)?;
    let wanted = match query.stage.as_deref() {
        None => None,
        Some(text) => Some(Stage::parse(text).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "stage {text:?} is not one of {}",
                Stage::ALL.map(Stage::as_str).join(", ")
            ))
        })?),
    };
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_AGENTS_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit {limit} is out of range: 1 to {MAX_AGENTS_PAGE}"
        )));
    }
    let rollout = rollout_or_404(&state, &id).await?;
    let page = TargetPage {
        wave: query.wave,
        stage: wanted.map(Stage::as_str),
        inputs: conductor::stage_inputs(&state, &rollout).await?,
        limit: i64::try_from(limit).unwrap_or(i64::MAX),
        offset: i64::try_from(query.offset.unwrap_or(0)).unwrap_or(i64::MAX),
    };
    let (targets, total) = state.store.rollout_targets_page(&id, &page).await?;
    let agents = targets
        .into_iter()
        .map(|t| {
            let stage = Stage::parse(&t.stage).ok_or_else(|| {
                ApiError::Internal(format!("the store placed an agent in stage {:?}", t.stage))
            })?;
            Ok(RolloutAgent {
                agent_id: t.agent_id,
                hostname: t.hostname,
                version: t.version,
                wave: t.wave,
                stage,
                task_id: t.task_id,
                status: t.status,
                failure_class: t.class,
                error: t.error,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let total = usize::try_from(total).unwrap_or(0);
    Ok(Json(RolloutAgents { total, agents }))
}

async fn act(
    caller: &Caller,
    state: &AppState,
    id: &str,
    action: Action,
) -> Result<Json<RolloutView>, ApiError> {
    caller.require(Role::Operator)?;
    let rollout = conductor::act(state, id, action, &caller.actor).await?;
    Ok(Json(one_view(state, rollout).await?))
}

#[utoipa::path(
    post,
    path = "/rollouts/{id}/pause",
    operation_id = "pause_rollout",
    tag = "rollouts",
    summary = "Start no one new; what is under way goes on",
    params(("id" = String, Path, description = "The rollout's id")),
    responses(
        (status = 200, description = "The rollout is paused", body = RolloutView),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No rollout has this id", body = ErrorBody),
        (status = 409, description = "The rollout is not running or waiting", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn pause(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, ApiError> {
    act(&caller, &state, &id, Action::Pause).await
}

#[utoipa::path(
    post,
    path = "/rollouts/{id}/advance",
    operation_id = "advance_rollout",
    tag = "rollouts",
    summary = "Start the next wave now",
    params(("id" = String, Path, description = "The rollout's id")),
    responses(
        (status = 200, description = "The next wave started", body = RolloutView),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No rollout has this id", body = ErrorBody),
        (status = 409, description = "The rollout is in its last wave, or not running or waiting", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn advance(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, ApiError> {
    act(&caller, &state, &id, Action::Advance).await
}

#[utoipa::path(
    post,
    path = "/rollouts/{id}/abort",
    operation_id = "abort_rollout",
    tag = "rollouts",
    summary = "End the rollout and cancel what it has under way",
    params(("id" = String, Path, description = "The rollout's id")),
    responses(
        (status = 200, description = "The rollout is aborted", body = RolloutView),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No rollout has this id", body = ErrorBody),
        (status = 409, description = "The rollout has ended already", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn abort(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RolloutView>, ApiError> {
    act(&caller, &state, &id, Action::Abort).await
}

/// Optional platform scope of a version's resume.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResumeRequest {
    os: Option<String>,
    arch: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Resumed {
    version: String,
    /// Halted or paused rollouts of the version resumed.
    resumed: u64,
}

/// A resume answers the rollout (by id) or a count (by version).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum ResumeAnswer {
    Rollout(Box<RolloutView>),
    Version(Resumed),
}

#[utoipa::path(
    post,
    path = "/rollouts/{id}/resume",
    operation_id = "resume_rollout",
    tag = "rollouts",
    summary = "Resume a paused or halted rollout (by id), or every one of a version",
    description = "Build failures before the resume no longer count toward a halt. With a \
        version instead of an id, every paused or halted rollout of it (on the platform of \
        the optional body) resumes and the answer counts them.",
    params(("id" = String, Path, description = "A rollout id, or a version such as `1.4.0`")),
    request_body(
        content = Option<ResumeRequest>,
        description = "Only with a version: the platform to resume",
    ),
    responses(
        (status = 200, description = "Dispatch goes on", body = ResumeAnswer),
        (status = 400, description = "The body is malformed", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No such rollout, or none of the version is paused or halted", body = ErrorBody),
        (status = 409, description = "The rollout is not paused or halted", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn resume(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: OptionalBody<ResumeRequest>,
) -> Result<Json<ResumeAnswer>, ApiError> {
    caller.require(Role::Operator)?;
    let request = body.take()?;
    if semver::Version::parse(&id).is_err() {
        let rollout = conductor::act(&state, &id, Action::Resume, &caller.actor).await?;
        return Ok(Json(ResumeAnswer::Rollout(Box::new(
            one_view(&state, rollout).await?,
        ))));
    }
    let in_scope = |os: &str, arch: &str| {
        request.os.as_deref().is_none_or(|o| o == os)
            && request.arch.as_deref().is_none_or(|a| a == arch)
    };
    let stopped: Vec<String> = state
        .book()
        .rollouts()
        .filter(|r| r.record.version == id)
        .filter(|r| matches!(r.record.state, RolloutState::Halted | RolloutState::Paused))
        .filter(|r| r.record.platforms.iter().any(|(o, a)| in_scope(o, a)))
        .map(|r| r.record.id.clone())
        .collect();
    let mut resumed = 0;
    for rollout in &stopped {
        match conductor::act(&state, rollout, Action::Resume, &caller.actor).await {
            Ok(_) => resumed += 1,
            Err(ConductError::Conflict(_)) => {}
            Err(err) => return Err(err.into()),
        }
    }
    if resumed == 0 {
        return Err(ApiError::NotFound(format!(
            "no paused or halted rollout of {id}"
        )));
    }
    Ok(Json(ResumeAnswer::Version(Resumed {
        version: id,
        resumed,
    })))
}

/// "1 agent", "2 agents": audit details and timelines are read by people.
fn count(n: u64, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn parse_version(text: &str) -> Result<semver::Version, ApiError> {
    semver::Version::parse(text)
        .map_err(|e| ApiError::BadRequest(format!("{text:?} is not a version: {e}")))
}

/// A plan from a request's `waves`, `bake` and `ignore_windows`, or the default.
fn plan_of(
    state: &AppState,
    waves: Option<&[String]>,
    bake: Option<&str>,
    ignore_windows: bool,
    fallback: Plan,
) -> Result<Plan, ApiError> {
    let bake_ms = match bake {
        None => None,
        Some(text) => Some(
            humantime::parse_duration(text.trim())
                .map_err(|e| {
                    ApiError::BadRequest(format!("bake {text:?} is not a duration like 10m: {e}"))
                })?
                .as_millis(),
        ),
    };
    let bake_ms = bake_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX));
    let mut plan = match waves {
        Some(waves) => {
            // One share an item, as `openapi::nullable_waves` documents; no comma lists.
            let shares: Vec<Share> = waves
                .iter()
                .map(|share| Share::parse(share))
                .collect::<Result<_, _>>()
                .map_err(ApiError::BadRequest)?;
            Plan::new(
                &shares,
                bake_ms.unwrap_or_else(|| {
                    i64::try_from(state.settings.wave_bake.as_millis()).unwrap_or(i64::MAX)
                }),
                state.settings.wave_thresholds,
            )
            .map_err(ApiError::BadRequest)?
        }
        None => fallback,
    };
    if let Some(bake_ms) = bake_ms {
        for wave in &mut plan.waves {
            wave.bake_ms = bake_ms;
        }
    }
    plan.ignore_windows = ignore_windows;
    Ok(plan)
}

/// A promote: its scope, and optionally its plan.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PromoteRequest {
    /// Only this platform's beta rollout counts for the gate.
    os: Option<String>,
    arch: Option<String>,
    /// Promote even when the health gate fails (audited).
    #[serde(default)]
    force: bool,
    /// Cumulative wave shares, such as `["1%", "10%", "50", "100%"]`; the server's
    /// default waves otherwise.
    #[schema(schema_with = openapi::nullable_waves)]
    waves: Option<Vec<String>>,
    /// Bake time between waves, such as `10m`.
    #[schema(schema_with = openapi::nullable_bake)]
    bake: Option<String>,
    /// Start agents outside their maintenance windows too.
    #[serde(default)]
    ignore_windows: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Promoted {
    version: String,
    /// The build files moved from beta to stable.
    promoted: Vec<String>,
    gate: GateView,
    /// Promoted past a failing health gate.
    forced: bool,
    /// The version was promoted already and this changed nothing (nor was it audited):
    /// `rollout` is the promote rollout that is under way or completed.
    unchanged: bool,
    /// The promote rollout it started.
    rollout: RolloutView,
}

/// Starts a `promote` rollout of the version over every agent of its platforms that runs
/// something older, then flips every `.channel` sidecar of the version to stable.
#[utoipa::path(
    post,
    path = "/rollouts/{version}/promote",
    tag = "rollouts",
    params(("version" = inline(openapi::Version), Path, description = "A semver version, such as `1.4.0`")),
    request_body(
        content = Option<PromoteRequest>,
        description = "Optional; no body or `null` means every platform, the default waves, behind the health gate",
    ),
    responses(
        (status = 200, description = "The version is stable and its promote rollout started (or, `unchanged`, it was promoted already)", body = Promoted),
        (status = 400, description = "The body, the version or the waves are malformed", body = ErrorBody),
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
    body: OptionalBody<PromoteRequest>,
) -> Result<Json<Promoted>, ApiError> {
    caller.require(Role::Operator)?;
    let request = body.take()?;
    let parsed = parse_version(&version)?;
    let plan = plan_of(
        &state,
        request.waves.as_deref(),
        request.bake.as_deref(),
        request.ignore_windows,
        conductor::default_plan(&state),
    )?;
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
    let verdict = conductor::gate(&state, &version, in_scope).await?;
    let platforms: Vec<(String, String)> = builds
        .iter()
        .map(|b| (b.os.clone(), b.arch.clone()))
        .collect();
    let all_stable = builds.iter().all(|b| b.channel == Channel::Stable);
    if let Some(rollout) = conductor::promoted_already(&state, &version, &platforms, all_stable) {
        return Ok(Json(Promoted {
            version,
            promoted: Vec::new(),
            gate: verdict.into(),
            forced: false,
            unchanged: true,
            rollout: one_view(&state, rollout).await?,
        }));
    }
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
    let agents = state.store.list_candidates().await?;
    let forced = request.force && !verdict.pass;
    // The rollout exists before any build reads as stable, so no node mistakes the
    // promoted build for one that landed on stable by itself; agents and the other nodes
    // hear of it once the builds read stable, when they can move.
    let rollout = conductor::start_untold(
        &state,
        conductor::Start {
            id: None,
            version: version.clone(),
            kind: RolloutKind::Promote,
            candidates: conductor::candidates(&agents, &parsed, &platforms, |_| true),
            platforms,
            plan,
            started_by: caller.actor.clone(),
            detail: format!(
                "promoted{}: {}",
                if forced { " past the health gate" } else { "" },
                verdict.reason
            ),
        },
    )
    .await?;
    let made_stable = make_stable(&state, &version, &builds).await;
    // Told even if a build could not be made stable: the rollout is under way.
    conductor::announce(&state, &[&rollout.id]);
    let promoted = made_stable?;
    state
        .audit(
            &caller.actor,
            "rollout.promote",
            &version,
            Some(format!(
                "rollout {}: {} ({})",
                rollout.id,
                verdict.reason,
                count(promoted.len() as u64, "build")
            )),
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
        unchanged: false,
        rollout: one_view(&state, rollout).await?,
    }))
}

/// Puts a promoted version's builds on stable and re-reads them; answers the files
/// whose channel changed.
async fn make_stable(
    state: &AppState,
    version: &str,
    builds: &[Release],
) -> Result<Vec<String>, ApiError> {
    let mut promoted = Vec::new();
    for build in builds.iter().filter(|b| b.channel != Channel::Stable) {
        write_channel(&state.settings.downloads, &build.file, Channel::Stable)
            .map_err(|e| ApiError::Internal(format!("while promoting {}: {e:#}", build.file)))?;
        promoted.push(build.file.clone());
    }
    state.store.mark_promoted(version, now_ms()).await?;
    state.releases.rescan().await;
    Ok(promoted)
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

/// Optional plan of a rollback.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RollbackRequest {
    /// Cumulative wave shares; one wave (everyone at once) otherwise.
    #[schema(schema_with = openapi::nullable_waves)]
    waves: Option<Vec<String>>,
    #[schema(schema_with = openapi::nullable_bake)]
    bake: Option<String>,
}

/// Targets not started now, by reason.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RollbackSkipped {
    paused: u64,
    declines_updates: u64,
    /// Every target, while updates are switched off server-wide.
    updates_off: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RolledBack {
    version: String,
    /// Always true.
    blocked: bool,
    /// The rollback rollout; null when no agent has a build to go back to.
    rollout: Option<RolloutView>,
    /// Agents running the version that have a build to go back to.
    targeted: u64,
    /// Of those, not started while paused, declining updates, or updates are off.
    skipped: RollbackSkipped,
    /// Of those, not connected now: they are moved when they reconnect.
    offline: u64,
    /// Agents running the version with no other build of their channel to go back to.
    no_build: Vec<String>,
    /// Unfinished tasks to the version that were cancelled.
    cancelled: u64,
    /// Targets that can move now (targeted less skipped), as earlier versions answered.
    agents_rolled_back: u64,
    /// The version was rolled back already and this changed nothing (nor was it
    /// audited): its rollback rollout is under way, or no agent runs it. The counts are
    /// then zero; `rollout` is the rollback rollout under way, if any.
    unchanged: bool,
}

/// Blocks the version on every node, cancels what is under way to it, stops its
/// rollouts, and starts a `rollback` rollout moving every agent that runs it to the
/// newest other build of its channel. Pauses, the update switch and agents that decline
/// updates are obeyed; the answer says whom that skips.
#[utoipa::path(
    post,
    path = "/rollouts/{version}/rollback",
    tag = "rollouts",
    params(("version" = inline(openapi::Version), Path, description = "A semver version, such as `1.4.0`")),
    request_body(
        content = Option<RollbackRequest>,
        description = "Optional; one wave, everyone at once, by default",
    ),
    responses(
        (status = 200, description = "The version is blocked (`unchanged` when it was rolled back already and nothing changed)", body = RolledBack),
        (status = 400, description = "The version or the body is malformed", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No build of the version was ever offered", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn rollback(
    caller: Caller,
    State(state): State<AppState>,
    Path(version): Path<String>,
    body: OptionalBody<RollbackRequest>,
) -> Result<Json<RolledBack>, ApiError> {
    caller.require(Role::Operator)?;
    let request = body.take()?;
    parse_version(&version)?;
    let plan = match request.waves.as_deref() {
        None if request.bake.is_none() => None,
        waves => Some(plan_of(
            &state,
            waves,
            request.bake.as_deref(),
            false,
            Plan::all_at_once(state.settings.wave_thresholds),
        )?),
    };
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
    let outcome = conductor::rollback(&state, &version, plan, &caller.actor).await?;
    let unchanged = outcome.unchanged;
    let skipped = RollbackSkipped {
        paused: if outcome.updates_off {
            0
        } else {
            outcome.paused
        },
        declines_updates: if outcome.updates_off {
            0
        } else {
            outcome.declines_updates
        },
        updates_off: if outcome.updates_off {
            outcome.targeted
        } else {
            0
        },
    };
    let not_moving = skipped.paused + skipped.declines_updates + skipped.updates_off;
    if !unchanged {
        state
            .audit(
                &caller.actor,
                "rollout.rollback",
                &version,
                Some(format!(
                    "{} to move ({} skipped, {} offline), {} with no build to go back to, {} cancelled",
                    count(outcome.targeted, "agent"),
                    not_moving,
                    outcome.offline,
                    outcome.no_build.len(),
                    count(outcome.cancelled, "task")
                )),
                "blocked",
            )
            .await;
    }
    let rollout = match outcome.rollout {
        Some(rollout) => Some(one_view(&state, rollout).await?),
        None => None,
    };
    Ok(Json(RolledBack {
        version,
        blocked: true,
        rollout,
        targeted: outcome.targeted,
        agents_rolled_back: outcome.targeted - not_moving,
        skipped,
        offline: outcome.offline,
        no_build: outcome.no_build,
        cancelled: outcome.cancelled,
        unchanged,
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
    description = "Its rollouts were aborted by the rollback, so each of its builds starts a \
        new one: `promote` with the default waves where the build is stable, `beta` where it \
        is beta.",
    params(("version" = inline(openapi::Version), Path, description = "A semver version, such as `1.4.0`")),
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
    if !conductor::unblock(&state, &version, &caller.actor).await? {
        return Err(ApiError::NotFound(format!("{version} is not blocked")));
    }
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

/// Which agents a targeted rollout moves: every filter given must match, and at least
/// one is needed.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Selector {
    agent_ids: Option<Vec<String>>,
    site_id: Option<String>,
    client_id: Option<String>,
    os: Option<String>,
    arch: Option<String>,
    /// Only agents running exactly this version.
    running: Option<String>,
}

/// The filters of a `Selector`, of which at least one must be given (not null).
const SELECTOR_FILTERS: [&str; 6] = ["agent_ids", "site_id", "client_id", "os", "arch", "running"];

/// A `Selector` with at least one filter given.
fn selector() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, ObjectBuilder, Schema, Type};
    let given = SELECTOR_FILTERS.map(|filter| {
        let kind = if filter == "agent_ids" {
            Type::Array
        } else {
            Type::String
        };
        ObjectBuilder::new()
            .property(filter, ObjectBuilder::new().schema_type(kind))
            .required(filter)
            .build()
    });
    let any = given
        .into_iter()
        .fold(AnyOfBuilder::new(), AnyOfBuilder::item)
        .description(Some("At least one filter is given"));
    Schema::AllOf(
        AllOfBuilder::new()
            .item(<Selector as utoipa::PartialSchema>::schema())
            .item(any)
            .build(),
    )
    .into()
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TargetedRequest {
    /// The version to move the selected agents to.
    #[schema(schema_with = openapi::version)]
    version: String,
    #[schema(schema_with = selector)]
    selector: Selector,
    /// Cumulative wave shares; one wave (everyone at once) otherwise.
    #[schema(schema_with = openapi::nullable_waves)]
    waves: Option<Vec<String>>,
    #[schema(schema_with = openapi::nullable_bake)]
    bake: Option<String>,
    /// Start agents outside their maintenance windows too.
    #[serde(default)]
    ignore_windows: bool,
}

#[utoipa::path(
    post,
    path = "/rollouts",
    operation_id = "create_rollout",
    tag = "rollouts",
    summary = "A targeted rollout: move the selected agents to a version",
    request_body = TargetedRequest,
    responses(
        (status = 201, description = "The rollout started", body = RolloutView),
        (status = 400, description = "The body, the version or the waves are malformed, or the selector is empty", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No agent matches, or the version is offered for none of their platforms", body = ErrorBody),
        (status = 409, description = "The version is rolled back", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn create(
    caller: Caller,
    State(state): State<AppState>,
    body: super::Body<TargetedRequest>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    caller.require(Role::Operator)?;
    let request = body.take()?;
    let version = parse_version(&request.version)?;
    let plan = plan_of(
        &state,
        request.waves.as_deref(),
        request.bake.as_deref(),
        request.ignore_windows,
        Plan::all_at_once(state.settings.wave_thresholds),
    )?;
    let s = &request.selector;
    if s.agent_ids.is_none()
        && s.site_id.is_none()
        && s.client_id.is_none()
        && s.os.is_none()
        && s.arch.is_none()
        && s.running.is_none()
    {
        return Err(ApiError::BadRequest(format!(
            "the selector is empty: name {}",
            SELECTOR_FILTERS.join(", ")
        )));
    }
    if state.blocked_versions().contains(&request.version) {
        return Err(ApiError::Conflict(format!(
            "{} is rolled back; unblock it first",
            request.version
        )));
    }
    let index = state.releases.current();
    let sites = state.store.list_sites().await?;
    let client_of: HashMap<&str, &str> = sites
        .iter()
        .map(|site| (site.id.as_str(), site.client_id.as_str()))
        .collect();
    let agents = state.store.list_agents().await?;
    let selected: Vec<_> = agents
        .iter()
        .filter(|a| s.agent_ids.as_ref().is_none_or(|ids| ids.contains(&a.id)))
        .filter(|a| s.site_id.as_ref().is_none_or(|id| *id == a.site_id))
        .filter(|a| {
            s.client_id
                .as_deref()
                .is_none_or(|id| client_of.get(a.site_id.as_str()) == Some(&id))
        })
        .filter(|a| s.os.as_ref().is_none_or(|os| *os == a.os))
        .filter(|a| s.arch.as_ref().is_none_or(|arch| *arch == a.arch))
        .filter(|a| s.running.as_ref().is_none_or(|v| *v == a.version))
        // Only forward: going back is a rollback's business.
        .filter(|a| semver::Version::parse(&a.version).is_ok_and(|v| v < version))
        .collect();
    if selected.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no agent matches the selector and runs something older than {}",
            request.version
        )));
    }
    let with_build: Vec<_> = selected
        .into_iter()
        .filter(|a| index.find(&version, &a.os, &a.arch).is_some())
        .collect();
    if with_build.is_empty() {
        return Err(ApiError::NotFound(format!(
            "{} is offered for none of the selected agents' platforms",
            request.version
        )));
    }
    let mut platforms: Vec<(String, String)> = Vec::new();
    for agent in &with_build {
        let platform = (agent.os.clone(), agent.arch.clone());
        if !platforms.contains(&platform) {
            platforms.push(platform);
        }
    }
    let channels: Vec<&str> = with_build
        .iter()
        .map(|a| resolve_channel(a).0.as_str())
        .collect();
    let rollout = conductor::start(
        &state,
        conductor::Start {
            id: None,
            version: request.version.clone(),
            kind: RolloutKind::Targeted,
            platforms,
            plan,
            started_by: caller.actor.clone(),
            detail: format!(
                "{} selected ({} on beta)",
                count(with_build.len() as u64, "agent"),
                channels.iter().filter(|c| **c == "beta").count()
            ),
            candidates: with_build.iter().map(|a| conductor::candidate(a)).collect(),
        },
    )
    .await?;
    state
        .audit(
            &caller.actor,
            "rollout.create",
            &rollout.id,
            Some(format!(
                "{} to {}",
                request.version,
                count(with_build.len() as u64, "agent")
            )),
            "started",
        )
        .await;
    Ok((StatusCode::CREATED, Json(one_view(&state, rollout).await?)))
}
