//! The REST API under `/api/v1`: bearer-token authentication, JSON bodies, and one
//! `ApiError` that turns domain errors into status codes.

mod admin;
mod agents;
mod hierarchy;
mod install;
mod releases;
mod rollouts;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::AppState;
use crate::auth::hash_secret;
use crate::store::{Role, StoreError};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/agents", get(agents::list))
        .route("/agents/{id}", get(agents::one))
        .route("/agents/{id}/pause", post(agents::pause))
        .route("/agents/{id}/resume", post(agents::resume))
        .route("/agents/{id}/update", post(agents::update_now))
        .route("/agents/{id}/explain", get(agents::explain))
        .route("/agents/{id}/channel", put(hierarchy::set_agent_channel))
        .route(
            "/clients",
            get(hierarchy::list_clients).post(hierarchy::create_client),
        )
        .route("/clients/{id}/channel", put(hierarchy::set_client_channel))
        .route(
            "/sites",
            get(hierarchy::list_sites).post(hierarchy::create_site),
        )
        .route("/sites/{id}/channel", put(hierarchy::set_site_channel))
        .route("/agent/install", get(install::newest_for_install))
        .route("/releases", get(releases::list))
        .route("/releases/rescan", post(releases::rescan))
        .route(
            "/updates",
            get(releases::updates_switch).put(releases::set_updates_switch),
        )
        .route("/tokens", get(admin::list_tokens).post(admin::create_token))
        .route("/tokens/{id}", delete(admin::revoke_token))
        .route(
            "/sites/{id}/enrollment-tokens",
            post(admin::create_enrollment_token),
        )
        .route("/audit", get(admin::audit))
        .route("/rollouts", get(rollouts::list))
        .route("/rollouts/{version}/promote", post(rollouts::promote))
        .route("/rollouts/{version}/rollback", post(rollouts::rollback))
        .route("/rollouts/{version}/unblock", post(rollouts::unblock))
        .route("/rollouts/{version}/resume", post(rollouts::resume))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
}

/// An error answer: a status and `{"error": "...", "detail": ...}`.
#[derive(Debug)]
pub(crate) enum ApiError {
    BadRequest(String),
    Unauthorized(&'static str),
    Forbidden(String),
    NotFound(String),
    Conflict(String),
    Unavailable(String),
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
            ApiError::BadRequest(detail) => (StatusCode::BAD_REQUEST, "bad request", json!(detail)),
            ApiError::Forbidden(detail) => (StatusCode::FORBIDDEN, "forbidden", json!(detail)),
            ApiError::Unavailable(detail) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                json!(detail),
            ),
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
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    role: Role,
    /// Who acted, as the audit log shows it: the token's name and id.
    actor: String,
}

impl Caller {
    /// Refuses callers below `needed`.
    fn require(&self, needed: Role) -> Result<&Caller, ApiError> {
        if self.role >= needed {
            Ok(self)
        } else {
            Err(ApiError::Forbidden(format!(
                "this action needs the {} role; the token has {}",
                needed.as_str(),
                self.role.as_str()
            )))
        }
    }
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
        match state.store.api_token(&hash_secret(token)).await {
            Ok(token) => Ok(Caller {
                role: token.role,
                actor: format!("{} ({})", token.name, token.id),
            }),
            Err(StoreError::NotFound) => Err(ApiError::Unauthorized("unknown or revoked token")),
            Err(err) => Err(err.into()),
        }
    }
}

/// A JSON request body whose rejections are `ApiError`s with the JSON error shape.
pub(crate) struct Body<T>(T);

impl<T: DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Body<T>, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => Err(bad_body(rejection)),
        }
    }
}

fn bad_body(rejection: JsonRejection) -> ApiError {
    ApiError::BadRequest(rejection.body_text())
}

/// A JSON body that may be left out; no body means the defaults.
pub(crate) fn optional_body<T: Default + DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))
}
