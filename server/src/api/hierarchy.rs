//! `/api/v1/clients` and `/api/v1/sites`, channels set on agents, sites and clients, and
//! the maintenance windows of sites and clients.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, Body, Caller, ErrorBody, openapi};
use crate::AppState;
use crate::clock::{now_ms, rfc3339};
use crate::maintenance::{Openness, Window, WindowSpec};
use crate::releases::Channel;
use crate::session::Outbound;
use crate::store::{ChannelScope, Client, HierarchySetting, Role, Site, StoreError};

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Client)]
pub(crate) struct ClientView {
    id: String,
    name: String,
    /// The channel set for every agent of the client, unless a site or agent sets one.
    #[schema(schema_with = openapi::nullable_channel)]
    channel: Option<String>,
    /// Its agents' maintenance window, unless their site sets one.
    maintenance_window: Option<WindowView>,
    /// Its agents' download mirror (base URL), unless their site sets one.
    download_mirror: Option<String>,
    /// RFC 3339.
    created_at: String,
}

impl From<Client> for ClientView {
    fn from(client: Client) -> ClientView {
        ClientView {
            created_at: rfc3339(client.created_at_ms),
            maintenance_window: WindowView::of(client.maintenance_window.as_deref()),
            download_mirror: client.download_mirror,
            id: client.id,
            name: client.name,
            channel: client.channel,
        }
    }
}

/// A maintenance window and where it stands now.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WindowView {
    /// The days it opens, `mon` to `sun`, in week order.
    days: Vec<String>,
    /// `HH:MM` in its time zone.
    start: String,
    /// How long it stays open, as the server writes it (`1h 30m`).
    duration: String,
    time_zone: String,
    /// Open now.
    open: bool,
    /// When it closes (when open) or next opens (when closed), RFC 3339.
    until: String,
}

impl WindowView {
    fn of(stored: Option<&str>) -> Option<WindowView> {
        let window = Window::from_json(stored?).ok()?;
        Some(WindowView::from_window(&window))
    }

    fn from_window(window: &Window) -> WindowView {
        let (open, until) = match window.at(now_ms()) {
            Openness::Open { closes_at_ms } => (true, closes_at_ms),
            Openness::Closed { opens_at_ms } => (false, opens_at_ms),
        };
        let spec = window.spec().clone();
        WindowView {
            days: spec.days,
            start: spec.start,
            duration: spec.duration,
            time_zone: spec.time_zone,
            open,
            until: rfc3339(until),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Site)]
pub(crate) struct SiteView {
    id: String,
    client_id: String,
    name: String,
    /// The channel set for every agent of the site, unless the agent sets one.
    #[schema(schema_with = openapi::nullable_channel)]
    channel: Option<String>,
    /// Its agents' maintenance window; its client's applies when unset.
    maintenance_window: Option<WindowView>,
    /// Its agents' download mirror (base URL); its client's applies when unset.
    download_mirror: Option<String>,
    /// RFC 3339.
    created_at: String,
}

impl From<Site> for SiteView {
    fn from(site: Site) -> SiteView {
        SiteView {
            created_at: rfc3339(site.created_at_ms),
            maintenance_window: WindowView::of(site.maintenance_window.as_deref()),
            download_mirror: site.download_mirror,
            id: site.id,
            client_id: site.client_id,
            name: site.name,
            channel: site.channel,
        }
    }
}

fn conflict_or(err: StoreError, what: &str) -> ApiError {
    match err {
        StoreError::Conflict(_) => ApiError::Conflict(format!("{what} already exists")),
        other => other.into(),
    }
}

/// The longest name of a client or a site, in characters.
pub(crate) const NAME_MAX: usize = 200;

/// A client's or a site's name, trimmed; `openapi::name` documents this check.
fn check_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > NAME_MAX {
        return Err(ApiError::BadRequest(format!(
            "name must be 1 to {NAME_MAX} characters"
        )));
    }
    Ok(name)
}

#[utoipa::path(
    get,
    path = "/clients",
    tag = "hierarchy",
    summary = "Every client",
    responses((status = 200, description = "Every client", body = [ClientView])),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn list_clients(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<ClientView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let clients = state.store.list_clients().await?;
    Ok(Json(clients.into_iter().map(ClientView::from).collect()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewClient {
    /// 1 to 200 characters, unique.
    #[schema(schema_with = openapi::name)]
    name: String,
}

#[utoipa::path(
    post,
    path = "/clients",
    tag = "hierarchy",
    summary = "Create a client",
    request_body = NewClient,
    responses(
        (status = 201, description = "The new client", body = ClientView),
        (status = 400, description = "The body or the name is malformed", body = ErrorBody),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 409, description = "A client of this name exists", body = ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
pub(crate) async fn create_client(
    caller: Caller,
    State(state): State<AppState>,
    body: Body<NewClient>,
) -> Result<(StatusCode, Json<ClientView>), ApiError> {
    caller.require(Role::Admin)?;
    let body = body.take()?;
    let name = check_name(&body.name)?;
    let client = state
        .store
        .create_client(name)
        .await
        .map_err(|e| conflict_or(e, &format!("client {name:?}")))?;
    state
        .audit(
            &caller.actor,
            "client.create",
            &client.id,
            Some(name.to_owned()),
            "created",
        )
        .await;
    Ok((StatusCode::CREATED, Json(client.into())))
}

#[utoipa::path(
    get,
    path = "/sites",
    tag = "hierarchy",
    summary = "Every site",
    responses((status = 200, description = "Every site", body = [SiteView])),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn list_sites(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<SiteView>>, ApiError> {
    caller.require(Role::Viewer)?;
    let sites = state.store.list_sites().await?;
    Ok(Json(sites.into_iter().map(SiteView::from).collect()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewSite {
    client_id: String,
    /// 1 to 200 characters, unique within the client.
    #[schema(schema_with = openapi::name)]
    name: String,
}

#[utoipa::path(
    post,
    path = "/sites",
    tag = "hierarchy",
    summary = "Create a site in a client",
    request_body = NewSite,
    responses(
        (status = 201, description = "The new site", body = SiteView),
        (status = 400, description = "The body or the name is malformed", body = ErrorBody),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 404, description = "No client has this id", body = ErrorBody),
        (status = 409, description = "The client has a site of this name", body = ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
pub(crate) async fn create_site(
    caller: Caller,
    State(state): State<AppState>,
    body: Body<NewSite>,
) -> Result<(StatusCode, Json<SiteView>), ApiError> {
    caller.require(Role::Admin)?;
    let body = body.take()?;
    let name = check_name(&body.name)?;
    let site = match state.store.create_site(&body.client_id, name).await {
        Ok(site) => site,
        Err(StoreError::NotFound) => {
            return Err(ApiError::NotFound(format!(
                "no client with id {}",
                body.client_id
            )));
        }
        Err(err) => return Err(conflict_or(err, &format!("site {name:?} in this client"))),
    };
    state
        .audit(
            &caller.actor,
            "site.create",
            &site.id,
            Some(name.to_owned()),
            "created",
        )
        .await;
    Ok((StatusCode::CREATED, Json(site.into())))
}

/// `{"channel": "beta"}` sets, `{"channel": null}` clears.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChannelChange {
    #[schema(schema_with = openapi::nullable_channel)]
    channel: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ChannelSet {
    id: String,
    #[schema(schema_with = openapi::nullable_channel)]
    channel: Option<&'static str>,
    /// Agents whose resolved channel may have changed.
    agents_affected: usize,
}

#[utoipa::path(
    put,
    path = "/agents/{id}/channel",
    tag = "hierarchy",
    summary = "Set or clear the agent's own channel",
    description = "A channel set on an agent wins over its site's, which wins over its client's; `stable` is the default. Connected agents are checked again at once.",
    params(("id" = String, Path, description = "The agent's id")),
    request_body = ChannelChange,
    responses(
        (status = 200, description = "The channel now set", body = ChannelSet),
        (status = 400, description = "The body is malformed or the channel is neither stable nor beta", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No agent has this id", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn set_agent_channel(
    caller: Caller,
    state: State<AppState>,
    id: Path<String>,
    body: Body<ChannelChange>,
) -> Result<Json<ChannelSet>, ApiError> {
    set_channel(caller, state, id, body, ChannelScope::Agent).await
}

#[utoipa::path(
    put,
    path = "/sites/{id}/channel",
    tag = "hierarchy",
    summary = "Set or clear the channel of every agent of the site",
    description = "A channel set on an agent wins over its site's, which wins over its client's; `stable` is the default. Connected agents are checked again at once.",
    params(("id" = String, Path, description = "The site's id")),
    request_body = ChannelChange,
    responses(
        (status = 200, description = "The channel now set", body = ChannelSet),
        (status = 400, description = "The body is malformed or the channel is neither stable nor beta", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No site has this id", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn set_site_channel(
    caller: Caller,
    state: State<AppState>,
    id: Path<String>,
    body: Body<ChannelChange>,
) -> Result<Json<ChannelSet>, ApiError> {
    set_channel(caller, state, id, body, ChannelScope::Site).await
}

#[utoipa::path(
    put,
    path = "/clients/{id}/channel",
    tag = "hierarchy",
    summary = "Set or clear the channel of every agent of the client",
    description = "A channel set on an agent wins over its site's, which wins over its client's; `stable` is the default. Connected agents are checked again at once.",
    params(("id" = String, Path, description = "The client's id")),
    request_body = ChannelChange,
    responses(
        (status = 200, description = "The channel now set", body = ChannelSet),
        (status = 400, description = "The body is malformed or the channel is neither stable nor beta", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No client has this id", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn set_client_channel(
    caller: Caller,
    state: State<AppState>,
    id: Path<String>,
    body: Body<ChannelChange>,
) -> Result<Json<ChannelSet>, ApiError> {
    set_channel(caller, state, id, body, ChannelScope::Client).await
}

async fn set_channel(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body<ChannelChange>,
    scope: ChannelScope,
) -> Result<Json<ChannelSet>, ApiError> {
    caller.require(Role::Operator)?;
    let body = body.take()?;
    let channel = match body.channel.as_deref() {
        None => None,
        Some(text) => Some(Channel::parse(text).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "channel {text:?} is neither \"stable\" nor \"beta\""
            ))
        })?),
    };
    let what = scope_name(scope);
    match state
        .store
        .set_channel(scope, &id, channel.map(Channel::as_str))
        .await
    {
        Ok(()) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::NotFound(format!("no {what} with id {id}")));
        }
        Err(err) => return Err(err.into()),
    }
    let affected = recheck_agents_under(
        &state,
        &caller,
        scope,
        &id,
        "channel",
        channel.map_or("cleared".to_owned(), |c| c.as_str().to_owned()),
    )
    .await?;
    Ok(Json(ChannelSet {
        id,
        channel: channel.map(Channel::as_str),
        agents_affected: affected,
    }))
}

pub(super) fn scope_name(scope: ChannelScope) -> &'static str {
    match scope {
        ChannelScope::Agent => "agent",
        ChannelScope::Site => "site",
        ChannelScope::Client => "client",
    }
}

/// Stores a setting of a site or client (`None` clears it), then rechecks, announces and
/// audits as `recheck_agents_under` does. Returns how many agents it affects.
pub(super) async fn set_setting(
    state: &AppState,
    caller: &Caller,
    scope: ChannelScope,
    id: &str,
    setting: HierarchySetting,
    value: Option<&str>,
) -> Result<usize, ApiError> {
    match state
        .store
        .set_hierarchy_setting(scope, id, setting, value)
        .await
    {
        Ok(()) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::NotFound(format!(
                "no {} with id {id}",
                scope_name(scope)
            )));
        }
        Err(err) => return Err(err.into()),
    }
    recheck_agents_under(
        state,
        caller,
        scope,
        id,
        setting.column(),
        value.unwrap_or("cleared").to_owned(),
    )
    .await
}

/// After a setting of `scope`/`id` changed: every agent under it is checked again (on
/// whichever node holds it), the pages hear of it, and the change is audited. Returns
/// how many agents it affects.
pub(super) async fn recheck_agents_under(
    state: &AppState,
    caller: &Caller,
    scope: ChannelScope,
    id: &str,
    setting: &str,
    value: String,
) -> Result<usize, ApiError> {
    let what = scope_name(scope);
    let affected = state.store.agents_under(scope, id).await?;
    for agent in &affected {
        state.registry.send(agent, Outbound::Refresh);
    }
    let action = format!("{what}.{setting}");
    // One note for a whole site or client: the page re-reads what it shows.
    match scope {
        ChannelScope::Agent => state.events.agent(id),
        ChannelScope::Site | ChannelScope::Client => state.events.settings(Some(&action)),
    }
    state
        .audit(
            &caller.actor,
            &action,
            id,
            Some(value),
            &format!("{} agents affected", affected.len()),
        )
        .await;
    Ok(affected.len())
}

/// `{"window": {"days": ["mon"], "start": "02:00", "duration": "3h", "time_zone":
/// "Europe/Berlin"}}` sets, `{"window": null}` clears.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowChange {
    window: Option<WindowSpec>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WindowSet {
    id: String,
    /// The window now set, normalised, with where it stands now; null when cleared.
    maintenance_window: Option<WindowView>,
    /// Agents it governs (a site's window wins over its client's).
    agents_affected: usize,
}

#[utoipa::path(
    put,
    path = "/sites/{id}/maintenance-window",
    tag = "hierarchy",
    summary = "Set or clear the maintenance window of every agent of the site",
    description = "Outside its window an agent is not started on a `promote` or `targeted` rollout (unless the rollout overrides windows); an update under way goes on. A site's window wins over its client's. Connected agents are checked again at once.",
    params(("id" = String, Path, description = "The site's id")),
    request_body = WindowChange,
    responses(
        (status = 200, description = "The window now set", body = WindowSet),
        (status = 400, description = "The body is malformed or the schedule is invalid (the detail says why)", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No site has this id", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn set_site_window(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body<WindowChange>,
) -> Result<Json<WindowSet>, ApiError> {
    set_window(caller, state, id, body, ChannelScope::Site).await
}

#[utoipa::path(
    put,
    path = "/clients/{id}/maintenance-window",
    tag = "hierarchy",
    summary = "Set or clear the maintenance window of every agent of the client",
    description = "Applies to the client's agents whose site sets no window of its own. Outside its window an agent is not started on a `promote` or `targeted` rollout (unless the rollout overrides windows). Connected agents are checked again at once.",
    params(("id" = String, Path, description = "The client's id")),
    request_body = WindowChange,
    responses(
        (status = 200, description = "The window now set", body = WindowSet),
        (status = 400, description = "The body is malformed or the schedule is invalid (the detail says why)", body = ErrorBody),
        (status = 403, description = "The token's role is below operator", body = ErrorBody),
        (status = 404, description = "No client has this id", body = ErrorBody),
    ),
    security(("bearer" = ["operator"])),
)]
pub(crate) async fn set_client_window(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Body<WindowChange>,
) -> Result<Json<WindowSet>, ApiError> {
    set_window(caller, state, id, body, ChannelScope::Client).await
}

async fn set_window(
    caller: Caller,
    state: AppState,
    id: String,
    body: Body<WindowChange>,
    scope: ChannelScope,
) -> Result<Json<WindowSet>, ApiError> {
    caller.require(Role::Operator)?;
    let body = body.take()?;
    let window = body
        .window
        .map(|spec| spec.check().map_err(ApiError::BadRequest))
        .transpose()?;
    let json = window.as_ref().map(Window::to_json);
    let affected = set_setting(
        &state,
        &caller,
        scope,
        &id,
        HierarchySetting::MaintenanceWindow,
        json.as_deref(),
    )
    .await?;
    Ok(Json(WindowSet {
        id,
        maintenance_window: window.as_ref().map(WindowView::from_window),
        agents_affected: affected,
    }))
}
