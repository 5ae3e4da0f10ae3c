//! `/api/v1/agents`: the fleet listing, one agent with its tasks, and per-agent actions.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, Caller, ErrorBody, Params, openapi};
use crate::AppState;
use crate::clock::{now_ms, rfc3339};
use crate::conductor;
use crate::dispatch::{self, Due, LiveAgent};
use crate::engine::{channel_admits, resolve_channel, why_not};
use crate::rollouts::plan::Plan;
use crate::session::Outbound;
use crate::store::{
    AgentFilter, AgentRecord, FailureClass, NewTask, Role, RolloutKind, StoreError, TaskKind,
    TaskStatus, UpdateTask, version_key,
};

/// Tasks shown with one agent.
const TASK_HISTORY: i64 = 50;

/// An agent as the REST API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Agent)]
pub(crate) struct AgentView {
    id: String,
    hostname: String,
    /// The version the agent last reported.
    version: String,
    os: String,
    arch: String,
    site_id: String,
    /// The resolved channel.
    #[schema(schema_with = openapi::channel)]
    channel: &'static str,
    /// The level the channel is set at.
    #[schema(schema_with = openapi::channel_source)]
    channel_source: &'static str,
    /// Has a live session with a server.
    online: bool,
    /// RFC 3339.
    last_seen: String,
    /// RFC 3339.
    enrolled_at: String,
    paused: bool,
    /// False when the agent runs with auto-update off and declines updates.
    auto_update: bool,
    fingerprint: String,
    /// Another machine with this fingerprint tried to enroll in the site while this
    /// agent was live and was refused (a cloned machine, or an attempt to take over its
    /// identity); null when that has not happened for a day.
    fingerprint_conflict: Option<FingerprintConflict>,
    /// The target version of the agent's unfinished update task; only in a page of the
    /// listing (`limit`) and in `GET /api/v1/agents/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pending_update: Option<String>,
    /// Newest first; only in `GET /api/v1/agents/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    tasks: Option<Vec<TaskView>>,
    /// Where its updates are downloaded from; only in `GET /api/v1/agents/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    downloads: Option<DownloadsView>,
}

/// Where an agent's updates are downloaded from.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct DownloadsView {
    /// The download mirror its updates offer (base URL); null when it downloads from
    /// the server itself.
    mirror: Option<String>,
    /// Where that mirror is set: `site`, `client` or `server` (`--download-url`).
    #[schema(example = "site")]
    mirror_source: Option<&'static str>,
}

/// Enrollments refused because they carried a live agent's fingerprint.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FingerprintConflict {
    /// RFC 3339: the newest refused enrollment.
    last_at: String,
    /// Refused enrollments since the conflict began.
    attempts: i64,
    /// The hostname the refused machine gave.
    hostname: Option<String>,
}

/// How long a refused enrollment keeps an agent marked as in conflict.
const CONFLICT_SHOWN_MS: i64 = 24 * 60 * 60 * 1000;

/// The conflict an agent shows at `now_ms`: one refused within the last day.
fn conflict_of(agent: &AgentRecord, now_ms: i64) -> Option<FingerprintConflict> {
    let at = agent
        .conflict_at_ms
        .filter(|at| *at > now_ms.saturating_sub(CONFLICT_SHOWN_MS))?;
    Some(FingerprintConflict {
        last_at: rfc3339(at),
        attempts: agent.conflict_count,
        hostname: agent.conflict_hostname.clone(),
    })
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = UpdateTask)]
pub(crate) struct TaskView {
    id: String,
    agent_id: String,
    from_version: String,
    to_version: String,
    #[schema(schema_with = openapi::task_kind)]
    kind: TaskKind,
    #[schema(schema_with = openapi::task_status)]
    status: TaskStatus,
    /// Times the update was sent.
    attempts: i64,
    error: Option<String>,
    bytes_done: i64,
    bytes_total: i64,
    /// RFC 3339.
    created_at: String,
    /// RFC 3339.
    updated_at: String,
    /// The rollout it belongs to and its wave (0 is the first); null for tasks made
    /// before rollouts were records.
    rollout_id: Option<String>,
    wave: Option<i64>,
    /// Why an ended task did not succeed: `build`, `environment` or `transient`.
    #[schema(schema_with = openapi::failure_class)]
    failure_class: Option<FailureClass>,
    /// How the build reaches (or reached) the agent; null until the agent says.
    transfer: Option<TransferView>,
}

/// How a task's build reaches its agent, as the agent reported it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TransferView {
    /// What was sent: `full` (the build itself), `compressed` (the server's compressed
    /// copy, which the agent decompressed and verified) or `delta` (a delta from the
    /// build the agent ran, which it applied and verified as the build).
    #[schema(example = "compressed")]
    kind: &'static str,
    /// Bytes of what was sent: the compressed copy's size, the delta's, or the build's.
    bytes: i64,
    /// `mirror` (the mirror served verified bytes) or `server`.
    #[schema(example = "mirror")]
    source: String,
    /// The mirror the update offered (base URL), if any.
    mirror: Option<String>,
    /// Why the agent gave up on the mirror: `unreachable`, `not_found`, `http_error`,
    /// `wrong_bytes` or `stalled`.
    fallback: Option<String>,
    /// What the agent saw go wrong with the mirror.
    fallback_error: Option<String>,
}

impl TransferView {
    fn of(task: &UpdateTask) -> Option<TransferView> {
        let source = task.transfer_source.clone()?;
        Some(TransferView {
            kind: protocol::TransferKind::parse(task.transfer_kind.as_deref().unwrap_or(""))
                .as_str(),
            bytes: task.transfer_bytes.unwrap_or(task.bytes_total),
            source,
            mirror: task.mirror.clone(),
            fallback: task.transfer_fallback.clone(),
            fallback_error: task.transfer_error.clone(),
        })
    }
}

impl From<UpdateTask> for TaskView {
    fn from(task: UpdateTask) -> TaskView {
        TaskView {
            transfer: TransferView::of(&task),
            created_at: rfc3339(task.created_at_ms),
            updated_at: rfc3339(task.updated_at_ms),
            id: task.id,
            agent_id: task.agent_id,
            from_version: task.from_version,
            to_version: task.to_version,
            kind: task.kind,
            status: task.status,
            attempts: task.attempts,
            error: task.error,
            bytes_done: task.bytes_done,
            bytes_total: task.bytes_total,
            rollout_id: task.rollout_id,
            wave: task.wave,
            failure_class: task.failure_class,
        }
    }
}

fn view(agent: AgentRecord) -> AgentView {
    let (channel, channel_source) = resolve_channel(&agent);
    let now = crate::clock::now_ms();
    AgentView {
        fingerprint_conflict: conflict_of(&agent, now),
        online: crate::nodes::is_live(agent.node_last_beat_ms, now),
        last_seen: rfc3339(agent.last_seen_ms),
        enrolled_at: rfc3339(agent.enrolled_at_ms),
        channel: channel.as_str(),
        channel_source,
        id: agent.id,
        hostname: agent.hostname,
        version: agent.version,
        os: agent.os,
        arch: agent.arch,
        site_id: agent.site_id,
        paused: agent.paused,
        auto_update: agent.auto_update,
        fingerprint: agent.fingerprint,
        pending_update: None,
        tasks: None,
        downloads: None,
    }
}

async fn agent_or_404(state: &AppState, id: &str) -> Result<AgentRecord, ApiError> {
    match state.store.agent(id).await {
        Ok(agent) => Ok(agent),
        Err(StoreError::NotFound) => Err(ApiError::NotFound(format!("no agent with id {id}"))),
        Err(err) => Err(err.into()),
    }
}

/// Filters and paging of the agent listing; every one is optional.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Part of the hostname or the id, any case.
    q: Option<String>,
    /// The site's id.
    site: Option<String>,
    /// The resolved channel, `stable` or `beta`.
    channel: Option<String>,
    /// The exact version the agent runs.
    version: Option<String>,
    /// Only agents running a semver version lower than this one.
    #[param(schema_with = openapi::version)]
    older_than: Option<String>,
    os: Option<String>,
    arch: Option<String>,
    online: Option<bool>,
    paused: Option<bool>,
    /// With `limit`, the page's order: `hostname` (the default), `version` (semver),
    /// `last_seen`, `platform` or `site`; `-` before it reverses it (`-last_seen`).
    #[param(schema_with = sort_keys)]
    sort: Option<String>,
    /// Page size, 0 to 500. With it the answer is `{"agents", "total"}` instead of an array.
    #[param(schema_with = page_limit)]
    limit: Option<usize>,
    /// Agents to skip, with `limit`.
    offset: Option<usize>,
}

/// Largest page of agents.
const MAX_PAGE: usize = 500;

/// One page of agents.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AgentPage {
    /// Sorted as `sort` asks (by hostname, then id, by default); each with `pending_update`.
    agents: Vec<AgentView>,
    /// Agents matching the filters, on every page.
    total: usize,
}

/// The answer of `GET /agents`: a bare array unless `limit` was given.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub(crate) enum AgentListing {
    All(Vec<AgentView>),
    Page(AgentPage),
}

impl ListQuery {
    /// `older_than` is the `version_key` of the query's version.
    fn admits(&self, agent: &AgentView, older_than: Option<&str>) -> bool {
        let q = self.q.as_deref().map(str::to_lowercase);
        q.is_none_or(|q| agent.hostname.to_lowercase().contains(&q) || agent.id.contains(&q))
            && self.site.as_deref().is_none_or(|s| s == agent.site_id)
            && self.channel.as_deref().is_none_or(|c| c == agent.channel)
            && self.version.as_deref().is_none_or(|v| v == agent.version)
            && self.os.as_deref().is_none_or(|o| o == agent.os)
            && self.arch.as_deref().is_none_or(|a| a == agent.arch)
            && self.online.is_none_or(|o| o == agent.online)
            && self.paused.is_none_or(|p| p == agent.paused)
            && older_than.is_none_or(|limit| {
                let key = version_key(&agent.version);
                !key.is_empty() && key.as_str() < limit
            })
    }
}

/// Every agent, or with `limit` one page of those matching the filters. The filters are
/// applied here so that a dashboard over a large fleet fetches only what it shows.
#[utoipa::path(
    get,
    path = "/agents",
    operation_id = "list_agents",
    tag = "agents",
    params(ListQuery),
    responses(
        (status = 200, description = "An array of agents (filtered when asked); with `limit` an object with one page and the total", body = AgentListing),
        (status = 400, description = "A query parameter is malformed", body = ErrorBody),
    ),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn list(
    caller: Caller,
    State(state): State<AppState>,
    Params(query): Params<ListQuery>,
) -> Result<Json<AgentListing>, ApiError> {
    caller.require(Role::Viewer)?;
    let older_than = query
        .older_than
        .as_deref()
        .map(|text| {
            semver::Version::parse(text)
                .map(|v| version_key(&v.to_string()))
                .map_err(|e| ApiError::BadRequest(format!("older_than={text:?}: {e}")))
        })
        .transpose()?;
    let sort = query.sort.as_deref().unwrap_or("hostname");
    let (key, reverse) = match sort.strip_prefix('-') {
        Some(key) => (key, true),
        None => (sort, false),
    };
    if !SORT_KEYS.contains(&key) {
        return Err(ApiError::BadRequest(format!(
            "sort={key:?}: one of {} (with - before it to reverse)",
            SORT_KEYS.join(", ")
        )));
    }
    if let Some(limit) = query.limit {
        if limit > MAX_PAGE {
            return Err(ApiError::BadRequest(format!(
                "limit={limit}: at most {MAX_PAGE}"
            )));
        }
        // The database filters, sorts (semver by the stored `version_key`) and counts
        // a page by itself.
        let filter = AgentFilter {
            q: query.q.as_deref(),
            site: query.site.as_deref(),
            channel: query.channel.as_deref(),
            version: query.version.as_deref(),
            older_than_key: older_than.as_deref(),
            os: query.os.as_deref(),
            arch: query.arch.as_deref(),
            online: query.online,
            live_since_ms: crate::nodes::live_since(now_ms()),
            paused: query.paused,
            sort: key,
            descending: reverse,
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            offset: i64::try_from(query.offset.unwrap_or(0)).unwrap_or(i64::MAX),
        };
        let (agents, total) = state.store.agents_page(&filter).await?;
        let page = agents.into_iter().map(view).collect();
        return Ok(Json(AgentListing::Page(AgentPage {
            agents: with_pending_updates(&state, page).await?,
            total: usize::try_from(total).unwrap_or(0),
        })));
    }
    let agents = state.store.list_agents().await?;
    let views: Vec<AgentView> = agents
        .into_iter()
        .map(view)
        .filter(|agent| query.admits(agent, older_than.as_deref()))
        .collect();
    Ok(Json(AgentListing::All(views)))
}

async fn with_pending_updates(
    state: &AppState,
    mut page: Vec<AgentView>,
) -> Result<Vec<AgentView>, ApiError> {
    for agent in &mut page {
        agent.pending_update = state
            .store
            .active_task(&agent.id)
            .await?
            .map(|task| task.to_version);
    }
    Ok(page)
}

const SORT_KEYS: [&str; 5] = ["hostname", "version", "last_seen", "platform", "site"];

/// `SORT_KEYS`, each also with `-` before it.
fn sort_keys() -> utoipa::openapi::schema::Object {
    let reversed = SORT_KEYS.map(|key| format!("-{key}"));
    openapi::string_enum(
        SORT_KEYS
            .into_iter()
            .chain(reversed.iter().map(String::as_str)),
    )
}

fn page_limit() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Integer)
        .minimum(Some(0))
        .maximum(Some(MAX_PAGE))
        .build()
}

/// The fleet in numbers: what the dashboard's overview shows, without the whole listing.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FleetSummary {
    total: usize,
    online: usize,
    offline: usize,
    paused: usize,
    /// Agents per platform and version, sorted by platform, then newest version first.
    versions: Vec<VersionCount>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct VersionCount {
    os: String,
    arch: String,
    version: String,
    agents: usize,
    online: usize,
    /// Of `agents`, those whose channel resolves to beta.
    beta: usize,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct HistoryQuery {
    /// How far back, in hours (default 24, at most 2160).
    #[param(schema_with = history_hours)]
    hours: Option<u32>,
}

/// The longest history asked for: 90 days.
const MAX_HISTORY_HOURS: u32 = 2160;

fn history_hours() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Integer)
        .minimum(Some(0))
        .maximum(Some(MAX_HISTORY_HOURS))
        .build()
}

/// One snapshot: agents per platform and version at one moment.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct HistoryPoint {
    at: String,
    os: String,
    arch: String,
    version: String,
    agents: i64,
}

#[utoipa::path(
    get,
    path = "/fleet/history",
    operation_id = "fleet_history",
    tag = "agents",
    summary = "Version adoption over time: periodic counts of agents per platform and version",
    params(HistoryQuery),
    responses(
        (status = 200, description = "Snapshots, oldest first", body = [HistoryPoint]),
        (status = 400, description = "`hours` is not a whole number from 0 to 2160", body = ErrorBody),
    ),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn fleet_history(
    caller: Caller,
    State(state): State<AppState>,
    Params(query): Params<HistoryQuery>,
) -> Result<Json<Vec<HistoryPoint>>, ApiError> {
    caller.require(Role::Viewer)?;
    let hours = query.hours.unwrap_or(24);
    if hours > MAX_HISTORY_HOURS {
        return Err(ApiError::BadRequest(format!(
            "hours={hours}: at most {MAX_HISTORY_HOURS}"
        )));
    }
    let hours = i64::from(hours);
    let since = now_ms() - hours * 3600 * 1000;
    let points = state.store.version_history(since).await?;
    Ok(Json(
        points
            .into_iter()
            .map(|p| HistoryPoint {
                at: rfc3339(p.at_ms),
                os: p.os,
                arch: p.arch,
                version: p.version,
                agents: p.agents,
            })
            .collect(),
    ))
}

#[utoipa::path(
    get,
    path = "/fleet",
    operation_id = "fleet_summary",
    tag = "agents",
    summary = "Agent counts: online, offline, paused, and per platform and version",
    responses((status = 200, description = "The fleet in numbers", body = FleetSummary)),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn fleet(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<FleetSummary>, ApiError> {
    caller.require(Role::Viewer)?;
    let rows = state
        .store
        .fleet_counts(crate::nodes::live_since(now_ms()))
        .await?;
    let count = |n: i64| usize::try_from(n).unwrap_or(0);
    let (mut total, mut online, mut paused) = (0, 0, 0);
    let mut versions: Vec<VersionCount> = rows
        .into_iter()
        .map(|row| {
            total += count(row.agents);
            online += count(row.online);
            paused += count(row.paused);
            VersionCount {
                os: row.os,
                arch: row.arch,
                version: row.version,
                agents: count(row.agents),
                online: count(row.online),
                beta: count(row.beta),
            }
        })
        .collect();
    let newest_first =
        |v: &VersionCount| std::cmp::Reverse(semver::Version::parse(&v.version).ok());
    versions
        .sort_by(|a, b| (&a.os, &a.arch, newest_first(a)).cmp(&(&b.os, &b.arch, newest_first(b))));
    Ok(Json(FleetSummary {
        total,
        online,
        offline: total - online,
        paused,
        versions,
    }))
}

#[utoipa::path(
    get,
    path = "/agents/{id}",
    operation_id = "get_agent",
    tag = "agents",
    summary = "One agent with its update tasks",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The agent, with `tasks` newest first", body = AgentView),
        (status = 404, description = "No agent has this id", body = ErrorBody),
    ),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn one(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Role::Viewer)?;
    let agent = agent_or_404(&state, &id).await?;
    let tasks = state.store.tasks_for_agent(&id, TASK_HISTORY).await?;
    let mirror = crate::mirrors::resolve(
        agent.site_mirror.as_deref(),
        agent.client_mirror.as_deref(),
        state.settings.download_url.as_deref(),
    );
    let downloads = DownloadsView {
        mirror: mirror.map(|(url, _)| url.to_owned()),
        mirror_source: mirror.map(|(_, source)| source.as_str()),
    };
    let mut view = view(agent);
    view.downloads = Some(downloads);
    view.pending_update = tasks
        .iter()
        .find(|t| t.status.is_active())
        .map(|t| t.to_version.clone());
    view.tasks = Some(tasks.into_iter().map(TaskView::from).collect());
    Ok(Json(view))
}

#[utoipa::path(
    post,
    path = "/agents/{id}/pause",
    operation_id = "pause_agent",
    tag = "agents",
    summary = "Pause the agent's automatic updates",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The agent, now paused", body = AgentView),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No agent has this id", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn pause(
    caller: Caller,
    state: State<AppState>,
    id: Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    set_paused(caller, state, id, true).await
}

#[utoipa::path(
    post,
    path = "/agents/{id}/resume",
    operation_id = "resume_agent",
    tag = "agents",
    summary = "Resume the agent's automatic updates",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The agent, no longer paused", body = AgentView),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No agent has this id", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn resume(
    caller: Caller,
    state: State<AppState>,
    id: Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    set_paused(caller, state, id, false).await
}

async fn set_paused(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    paused: bool,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Role::Operator)?;
    match state.store.set_paused(&id, paused).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::NotFound(format!("no agent with id {id}")));
        }
        Err(err) => return Err(err.into()),
    }
    let action = if paused {
        "agent.pause"
    } else {
        "agent.resume"
    };
    state.audit(&caller.actor, action, &id, None, "done").await;
    state.registry.send(&id, Outbound::Refresh);
    state.events.agent(&id);
    Ok(Json(view(agent_or_404(&state, &id).await?)))
}

/// Why an agent is or is not being updated, without reading logs.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Explanation {
    agent_id: String,
    version: String,
    #[schema(schema_with = openapi::channel)]
    channel: &'static str,
    #[schema(schema_with = openapi::channel_source)]
    channel_source: &'static str,
    /// Each level of agent → site → client → default and the channel it sets.
    channel_trace: Vec<TraceStep>,
    /// `offer` when a build is due, `hold` otherwise.
    #[schema(schema_with = decision)]
    decision: &'static str,
    offer: Option<String>,
    reason: String,
    candidates: Vec<Candidate>,
    active_task: Option<TaskView>,
    /// What happens next, in words.
    next: String,
}

fn decision() -> utoipa::openapi::schema::Object {
    openapi::string_enum(["offer", "hold"])
}

#[derive(Debug, Serialize, ToSchema)]
struct TraceStep {
    #[schema(schema_with = openapi::channel_source)]
    level: &'static str,
    #[schema(schema_with = openapi::nullable_channel)]
    channel: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
struct Candidate {
    version: String,
    #[schema(schema_with = openapi::channel)]
    channel: &'static str,
    file: String,
    offered: bool,
    reason: Option<String>,
}

/// Why the agent is or is not being updated: channel resolution, every candidate build
/// with the reason it is not offered, and what happens next.
#[utoipa::path(
    get,
    path = "/agents/{id}/explain",
    operation_id = "explain_agent",
    tag = "agents",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The decision and its reasons", body = Explanation),
        (status = 404, description = "No agent has this id", body = ErrorBody),
    ),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn explain(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Explanation>, ApiError> {
    caller.require(Role::Viewer)?;
    let record = agent_or_404(&state, &id).await?;
    let live = LiveAgent::load(&state, &id, &record.version).await?;
    let (channel, channel_source) = resolve_channel(&record);
    let index = state.releases.current();
    let verdicts = state.with_policy(|policy| why_not(&live.position, &index, policy));
    let (decision, offer, reason, next) = match (
        &live.active,
        dispatch::decide(&state, &id, &live.view()),
    ) {
        (Some(task), _) => (
            "hold",
            None,
            format!(
                "task {} to {} is {}{}",
                task.id,
                task.to_version,
                task.status.as_str(),
                task.rollout_id
                    .as_deref()
                    .map(|r| format!(" (rollout {r})"))
                    .unwrap_or_default()
            ),
            "the task finishes, fails, is cancelled or times out before anything else is offered"
                .to_owned(),
        ),
        (
            None,
            Due::Start {
                release,
                rollout_id,
                wave,
                ..
            },
        ) => (
            "offer",
            Some(release.version.to_string()),
            format!(
                "{} is due: wave {} of rollout {rollout_id} has started",
                release.version,
                wave + 1
            ),
            format!(
                "{} is sent at the agent's next heartbeat or connect",
                release.version
            ),
        ),
        (None, Due::Hold { reason, .. }) => {
            let next = if reason.contains("waiting for wave") {
                "the build is sent when its wave starts (the rollout moves on by itself once the earlier wave passed and baked, or when an operator advances it)"
            } else if reason.contains("rollout") {
                "nothing until an operator resumes the rollout or starts another"
            } else if reason.contains("retried after") {
                "the build is offered again after the retry delay"
            } else if reason.starts_with("already on")
                || reason.starts_with("no offered build")
                || reason.contains("failed on this agent")
            {
                "a newer build of its channel is offered as soon as it is published or promoted"
            } else {
                "nothing until an operator acts (resume, switch updates on, or request an update)"
            };
            ("hold", None, reason, next.to_owned())
        }
    };
    let channel_trace = vec![
        TraceStep {
            level: "agent",
            channel: record.agent_channel.clone(),
        },
        TraceStep {
            level: "site",
            channel: record.site_channel.clone(),
        },
        TraceStep {
            level: "client",
            channel: record.client_channel.clone(),
        },
        TraceStep {
            level: "default",
            channel: Some("stable".into()),
        },
    ];
    let candidates = verdicts
        .into_iter()
        .map(|(release, why)| Candidate {
            offered: offer.as_deref() == Some(release.version.to_string().as_str()),
            version: release.version.to_string(),
            channel: release.channel.as_str(),
            file: release.file,
            reason: why,
        })
        .collect();
    Ok(Json(Explanation {
        agent_id: id,
        version: record.version,
        channel: channel.as_str(),
        channel_source,
        channel_trace,
        decision,
        offer,
        reason,
        candidates,
        active_task: live.active.map(|task| TaskView::from(*task)),
        next,
    }))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateNow {
    /// The build to install; the newest of the agent's channel when left out.
    #[schema(schema_with = openapi::nullable_version)]
    version: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct UpdateQueued {
    task: TaskView,
    /// True when the agent is connected here and was sent the update at once.
    pushed: bool,
}

/// Request an update now: a targeted rollout of this one agent with a forced task, pushed
/// at once when the agent is connected and on its next connect otherwise. It overrides a
/// version's earlier failure on the agent and its site's maintenance window, not a pause.
#[utoipa::path(
    post,
    path = "/agents/{id}/update",
    operation_id = "update_agent",
    tag = "agents",
    params(("id" = String, Path, description = "The agent's id")),
    request_body(
        content = Option<UpdateNow>,
        description = "Optional; no body or `null` means the newest build of the agent's channel",
    ),
    responses(
        (status = 202, description = "A forced task was created (and any unfinished one cancelled)", body = UpdateQueued),
        (status = 400, description = "The body or the version is malformed", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No agent has this id, or no such build is offered for its platform", body = ErrorBody),
        (status = 409, description = "Updates are off server-wide, the agent is paused or declines updates, the build is blocked, or it is not newer than what the agent runs", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn update_now(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: super::OptionalBody<UpdateNow>,
) -> Result<(StatusCode, Json<UpdateQueued>), ApiError> {
    caller.require(Role::Operator)?;
    // No body means "the newest build of the agent's channel".
    let request = body.take()?;
    let agent = agent_or_404(&state, &id).await?;
    if !state.updates_enabled() {
        return Err(ApiError::Conflict(
            "updates are disabled server-wide".into(),
        ));
    }
    if !agent.auto_update {
        return Err(ApiError::Conflict(
            "the agent runs with auto-update off and declines updates".into(),
        ));
    }
    if agent.paused {
        return Err(ApiError::Conflict(
            "updates are paused for this agent; resume it first".into(),
        ));
    }
    let running = semver::Version::parse(&agent.version).map_err(|_| {
        ApiError::Conflict(format!(
            "the agent's version {:?} is not semver",
            agent.version
        ))
    })?;
    let index = state.releases.current();
    let release = match &request.version {
        Some(text) => {
            let version = semver::Version::parse(text)
                .map_err(|e| ApiError::BadRequest(format!("version {text:?}: {e}")))?;
            index
                .find(&version, &agent.os, &agent.arch)
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "no offered build {text} for {}/{}",
                        agent.os, agent.arch
                    ))
                })?
        }
        None => {
            let (channel, _) = resolve_channel(&agent);
            state
                .with_policy(|policy| {
                    index.newest(&agent.os, &agent.arch, |r| {
                        channel_admits(channel, r.channel) && policy.allows(r)
                    })
                })
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "no offered {} build for {}/{}",
                        channel.as_str(),
                        agent.os,
                        agent.arch
                    ))
                })?
        }
    };
    if state
        .blocked_versions()
        .contains(&release.version.to_string())
    {
        return Err(ApiError::Conflict(format!(
            "{} is blocked",
            release.version
        )));
    }
    if release.version <= running {
        return Err(ApiError::Conflict(format!(
            "the agent already runs {running}; {} would not be an update",
            release.version
        )));
    }
    let now = now_ms();
    let version = release.version.to_string();
    if let Some(active) = state.store.active_task(&id).await? {
        let _ = state
            .store
            .finish_task(
                &id,
                &active.id,
                TaskStatus::Cancelled,
                Some(FailureClass::Transient),
                Some(&format!("superseded by a requested update to {version}")),
                now,
            )
            .await;
    }
    let rollout = conductor::start(
        &state,
        conductor::Start {
            id: None,
            version: version.clone(),
            kind: RolloutKind::Targeted,
            platforms: vec![(agent.os.clone(), agent.arch.clone())],
            // "Now" is the operator's word: a maintenance window does not hold it.
            plan: Plan {
                ignore_windows: true,
                ..Plan::all_at_once(state.settings.wave_thresholds)
            },
            started_by: caller.actor.clone(),
            detail: format!("update of {} ({}) requested", agent.hostname, agent.id),
            candidates: vec![conductor::candidate(&agent)],
        },
    )
    .await?;
    let created = state
        .store
        .create_task(
            &NewTask {
                agent_id: &id,
                from_version: &agent.version,
                to_version: &version,
                os: &release.os,
                arch: &release.arch,
                kind: TaskKind::Forced,
                status: TaskStatus::Queued,
                rollout_id: Some(&rollout.id),
                wave: Some(0),
                mirror: None,
            },
            now,
        )
        .await;
    let task = match created {
        Ok(task) => task,
        // The agent's session heard of the new rollout first and made its task.
        Err(StoreError::Conflict(conflict)) => state
            .store
            .active_task(&id)
            .await?
            .filter(|task| task.rollout_id.as_deref() == Some(rollout.id.as_str()))
            .ok_or(ApiError::Conflict(conflict))?,
        Err(err) => return Err(err.into()),
    };
    let pushed = state.registry.send(&id, Outbound::Refresh);
    state.events.task(&task.id, &id, task.rollout_id.as_deref());
    state
        .audit(
            &caller.actor,
            "agent.update",
            &id,
            Some(format!("task {} to {}", task.id, task.to_version)),
            if pushed {
                "sent"
            } else {
                "queued until the agent connects"
            },
        )
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(UpdateQueued {
            task: task.into(),
            pushed,
        }),
    ))
}
