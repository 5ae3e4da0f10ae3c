//! `/api/v1/clients` and `/api/v1/sites`, and channels set on agents, sites and clients.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiError, Body, Caller};
use crate::AppState;
use crate::clock::rfc3339;
use crate::releases::Channel;
use crate::session::Outbound;
use crate::store::{ChannelScope, Client, Role, Site, StoreError};

#[derive(Debug, Serialize)]
pub(crate) struct Dated<T: Serialize> {
    #[serde(flatten)]
    item: T,
    created_at: String,
}

fn dated_client(client: Client) -> Dated<Client> {
    Dated {
        created_at: rfc3339(client.created_at_ms),
        item: client,
    }
}

fn dated_site(site: Site) -> Dated<Site> {
    Dated {
        created_at: rfc3339(site.created_at_ms),
        item: site,
    }
}

fn conflict_or(err: StoreError, what: &str) -> ApiError {
    match err {
        StoreError::Conflict(_) => ApiError::Conflict(format!("{what} already exists")),
        other => other.into(),
    }
}

fn check_name(name: &str) -> Result<&str, ApiError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::BadRequest(
            "name must be 1 to 200 characters".into(),
        ));
    }
    Ok(name)
}

pub(crate) async fn list_clients(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<Dated<Client>>>, ApiError> {
    caller.require(Role::Viewer)?;
    let clients = state.store.list_clients().await?;
    Ok(Json(clients.into_iter().map(dated_client).collect()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewClient {
    name: String,
}

pub(crate) async fn create_client(
    caller: Caller,
    State(state): State<AppState>,
    Body(body): Body<NewClient>,
) -> Result<(StatusCode, Json<Dated<Client>>), ApiError> {
    caller.require(Role::Admin)?;
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
    Ok((StatusCode::CREATED, Json(dated_client(client))))
}

pub(crate) async fn list_sites(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<Dated<Site>>>, ApiError> {
    caller.require(Role::Viewer)?;
    let sites = state.store.list_sites().await?;
    Ok(Json(sites.into_iter().map(dated_site).collect()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewSite {
    client_id: String,
    name: String,
}

pub(crate) async fn create_site(
    caller: Caller,
    State(state): State<AppState>,
    Body(body): Body<NewSite>,
) -> Result<(StatusCode, Json<Dated<Site>>), ApiError> {
    caller.require(Role::Admin)?;
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
    Ok((StatusCode::CREATED, Json(dated_site(site))))
}

/// `{"channel": "beta"}` sets, `{"channel": null}` clears.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChannelChange {
    channel: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ChannelSet {
    id: String,
    channel: Option<&'static str>,
    /// Agents whose resolved channel may have changed.
    agents_affected: usize,
}

pub(crate) async fn set_agent_channel(
    caller: Caller,
    state: State<AppState>,
    id: Path<String>,
    body: Body<ChannelChange>,
) -> Result<Json<ChannelSet>, ApiError> {
    set_channel(caller, state, id, body, ChannelScope::Agent).await
}

pub(crate) async fn set_site_channel(
    caller: Caller,
    state: State<AppState>,
    id: Path<String>,
    body: Body<ChannelChange>,
) -> Result<Json<ChannelSet>, ApiError> {
    set_channel(caller, state, id, body, ChannelScope::Site).await
}

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
    Body(body): Body<ChannelChange>,
    scope: ChannelScope,
) -> Result<Json<ChannelSet>, ApiError> {
    caller.require(Role::Operator)?;
    let channel = match body.channel.as_deref() {
        None => None,
        Some(text) => Some(Channel::parse(text).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "channel {text:?} is neither \"stable\" nor \"beta\""
            ))
        })?),
    };
    let what = match scope {
        ChannelScope::Agent => "agent",
        ChannelScope::Site => "site",
        ChannelScope::Client => "client",
    };
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
    let affected = state.store.agents_under(scope, &id).await?;
    for agent in &affected {
        state.registry.send(agent, Outbound::Refresh);
    }
    state
        .audit(
            &caller.actor,
            &format!("{what}.channel"),
            &id,
            Some(channel.map_or("cleared".to_owned(), |c| c.as_str().to_owned())),
            &format!("{} agents affected", affected.len()),
        )
        .await;
    Ok(Json(ChannelSet {
        id,
        channel: channel.map(Channel::as_str),
        agents_affected: affected.len(),
    }))
}
