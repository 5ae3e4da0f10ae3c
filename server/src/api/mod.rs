//! The REST API under `/api/v1`: bearer-token authentication, JSON bodies, and one
//! `ApiError` that turns domain errors into status codes.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;

use crate::AppState;
use crate::auth::hash_secret;
use crate::clock::rfc3339;
use crate::store::{AgentRecord, Role, StoreError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/agents", get(list_agents))
        .route("/agents/{id}", get(get_agent))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
}

/// An error answer: a status and `{"error": "...", "detail": ...}`.
#[derive(Debug)]
pub enum ApiError {
    Unauthorized(&'static str),
    NotFound(String),
    Conflict(String),
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        match err {
            StoreError::NotFound => ApiError::NotFound("not found".into()),
            StoreError::Conflict(detail) => ApiError::Conflict(detail),
            StoreError::Other(detail) => ApiError::Internal(detail),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error, detail) = match self {
            ApiError::Unauthorized(detail) => {
                (StatusCode::UNAUTHORIZED, "unauthorized", json!(detail))
            }
            ApiError::NotFound(detail) => (StatusCode::NOT_FOUND, "not found", json!(detail)),
            ApiError::Conflict(detail) => (StatusCode::CONFLICT, "conflict", json!(detail)),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error answering an API call");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error",
                    json!(null),
                )
            }
        };
        (status, Json(json!({ "error": error, "detail": detail }))).into_response()
    }
}

/// The caller of an operator endpoint, authenticated by `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub role: Role,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let header =
            parts
                .headers
                .get(axum::http::header::AUTHORIZATION)
                .ok_or(ApiError::Unauthorized(
                    "missing Authorization: Bearer <token> header",
                ))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthorized(
                "the Authorization header must be Bearer <token>",
            ))?;
        match state.store.api_token_role(&hash_secret(token)).await {
            Ok(role) => Ok(Caller { role }),
            Err(StoreError::NotFound) => Err(ApiError::Unauthorized("unknown or revoked token")),
            Err(err) => Err(err.into()),
        }
    }
}

/// An agent as the REST API shows it.
#[derive(Debug, Serialize)]
pub struct AgentView {
    pub id: String,
    pub hostname: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    pub site_id: String,
    pub channel: String,
    pub channel_source: &'static str,
    pub online: bool,
    pub last_seen: String,
    pub enrolled_at: String,
    pub paused: bool,
    pub auto_update: bool,
    pub fingerprint: String,
}

/// Where an agent's channel came from, most specific first.
pub fn resolve_channel(agent: &AgentRecord) -> (String, &'static str) {
    [
        (&agent.agent_channel, "agent"),
        (&agent.site_channel, "site"),
        (&agent.client_channel, "client"),
    ]
    .into_iter()
    .find_map(|(channel, source)| channel.clone().map(|c| (c, source)))
    .unwrap_or_else(|| ("stable".to_owned(), "default"))
}

fn view(state: &AppState, agent: AgentRecord) -> AgentView {
    let (channel, channel_source) = resolve_channel(&agent);
    AgentView {
        online: state.registry.is_online(&agent.id),
        last_seen: rfc3339(agent.last_seen_ms),
        enrolled_at: rfc3339(agent.enrolled_at_ms),
        channel,
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
    }
}

async fn list_agents(
    _caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<AgentView>>, ApiError> {
    let agents = state.store.list_agents().await?;
    Ok(Json(agents.into_iter().map(|a| view(&state, a)).collect()))
}

async fn get_agent(
    _caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    match state.store.agent(&id).await {
        Ok(agent) => Ok(Json(view(&state, agent))),
        Err(StoreError::NotFound) => Err(ApiError::NotFound(format!("no agent with id {id}"))),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(agent: Option<&str>, site: Option<&str>, client: Option<&str>) -> AgentRecord {
        AgentRecord {
            id: "a".into(),
            site_id: "s".into(),
            fingerprint: "f".into(),
            hostname: "h".into(),
            version: "1.0.0".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            paused: false,
            auto_update: true,
            enrolled_at_ms: 0,
            last_seen_ms: 0,
            agent_channel: agent.map(Into::into),
            site_channel: site.map(Into::into),
            client_channel: client.map(Into::into),
        }
    }

    #[test]
    fn channel_resolves_agent_then_site_then_client_then_stable() {
        let cases = [
            (
                agent(Some("beta"), Some("stable"), Some("stable")),
                ("beta", "agent"),
            ),
            (agent(None, Some("beta"), Some("stable")), ("beta", "site")),
            (agent(None, None, Some("beta")), ("beta", "client")),
            (agent(None, None, None), ("stable", "default")),
            (
                agent(Some("stable"), Some("beta"), None),
                ("stable", "agent"),
            ),
        ];
        for (record, (channel, source)) in cases {
            let (got_channel, got_source) = resolve_channel(&record);
            assert_eq!(
                (got_channel.as_str(), got_source),
                (channel, source),
                "{record:?}"
            );
        }
    }
}
