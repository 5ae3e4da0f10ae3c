//! The REST API under `/api/v1`: bearer-token authentication, JSON bodies, and one
//! `ApiError` that turns domain errors into status codes.

mod admin;
mod agents;
mod events;
mod hierarchy;
mod install;
mod login;
mod mirrors;
pub(crate) mod openapi;
mod releases;
mod rollouts;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::auth::hash_secret;
use crate::clock::now_ms;
use crate::store::{ApiToken, Role, StoreError};

/// The largest request body the API reads. Its bodies are small JSON documents.
const BODY_LIMIT: usize = 256 * 1024;

/// The API as served: the documented routes and a JSON 404 for everything else; every
/// error, also those axum answers by itself, in the JSON error shape. Every request
/// waits for the tasks of the updates this node sent before it to be written.
pub(crate) fn router(state: AppState) -> Router<AppState> {
    let (router, _) = routes().split_for_parts();
    router
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state,
            after_sent_tasks,
        ))
}

/// Lets a request through once the tasks of the updates this node has already sent are
/// written (a batch, usually no wait at all): an update goes out before its task is
/// written (`TaskWriter::begin`), and no answer may leave out, or fail to supersede, a
/// task whose update an agent already holds.
async fn after_sent_tasks(State(state): State<AppState>, request: Request, next: Next) -> Response {
    state.tasks.until_sent_written().await;
    next.run(request).await
}

/// Gives the JSON error shape to error answers that axum makes by itself: a body over
/// the limit where a handler takes raw bytes, a path parameter that does not decode, a
/// method a route does not have. Their status and headers (such as `Allow`) stay.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    // axum's own error texts are one line.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let detail = if status.is_server_error() {
        tracing::error!(%status, detail = %text, "internal error answering an API call");
        None
    } else if text.is_empty() {
        Some(status.canonical_reason().unwrap_or("error").to_lowercase())
    } else {
        Some(text)
    };
    let mut answer = (
        status,
        Json(ErrorBody {
            error: error_word(status),
            detail,
        }),
    )
        .into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            answer.headers_mut().insert(name, value.clone());
        }
    }
    answer
}

/// The `error` word of an error answer with this status.
fn error_word(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not found",
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "payload too large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported media type",
        StatusCode::TOO_MANY_REQUESTS => "too many requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal error",
        _ => "bad request",
    }
}

/// Every endpoint with its `#[utoipa::path]` description; both the router and the
/// OpenAPI document are made from this one list. Add endpoints only with `routes!`: one
/// added with a plain `.route` would be served undocumented, and no test could tell.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(agents::list))
        .routes(routes!(agents::fleet))
        .routes(routes!(agents::fleet_history))
        .routes(routes!(agents::one))
        .routes(routes!(agents::pause))
        .routes(routes!(agents::resume))
        .routes(routes!(agents::update_now))
        .routes(routes!(agents::explain))
        .routes(routes!(hierarchy::set_agent_channel))
        .routes(routes!(hierarchy::list_clients, hierarchy::create_client))
        .routes(routes!(hierarchy::set_client_channel))
        .routes(routes!(hierarchy::set_client_window))
        .routes(routes!(hierarchy::list_sites, hierarchy::create_site))
        .routes(routes!(hierarchy::set_site_channel))
        .routes(routes!(hierarchy::set_site_window))
        .routes(routes!(mirrors::set_site_mirror))
        .routes(routes!(mirrors::set_client_mirror))
        .routes(routes!(mirrors::list))
        .routes(routes!(
            admin::list_site_enrollment_tokens,
            admin::create_enrollment_token
        ))
        .routes(routes!(admin::list_enrollment_tokens))
        .routes(routes!(admin::revoke_enrollment_token))
        .routes(routes!(install::newest_for_install))
        .routes(routes!(releases::list))
        .routes(routes!(releases::rescan))
        .routes(routes!(releases::file))
        .routes(routes!(
            releases::updates_switch,
            releases::set_updates_switch
        ))
        .routes(routes!(admin::list_tokens, admin::create_token))
        .routes(routes!(admin::revoke_token))
        .routes(routes!(admin::audit))
        .routes(routes!(rollouts::list, rollouts::create))
        .routes(routes!(rollouts::one))
        .routes(routes!(rollouts::agents))
        .routes(routes!(rollouts::pause))
        .routes(routes!(rollouts::advance))
        .routes(routes!(rollouts::abort))
        .routes(routes!(rollouts::promote))
        .routes(routes!(rollouts::rollback))
        .routes(routes!(rollouts::unblock))
        .routes(routes!(rollouts::resume))
        .routes(routes!(login::login, login::current, login::logout))
        .routes(routes!(events::stream))
        .routes(routes!(openapi::document_json))
}

/// An error answer: a status and `{"error": "...", "detail": ...}`.
#[derive(Debug)]
pub(crate) enum ApiError {
    BadRequest(String),
    /// The body exceeds the API's limit.
    PayloadTooLarge(String),
    /// The body is not `application/json`.
    UnsupportedMediaType(String),
    Unauthorized(&'static str),
    Forbidden(String),
    /// Too many attempts from the caller's address; retry later.
    TooManyRequests(String),
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

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// What kind of error: `bad request`, `unauthorized`, `forbidden`, `not found`,
    /// `method not allowed`, `conflict`, `payload too large`, `unsupported media type`,
    /// `too many requests`, `unavailable` or `internal error`.
    #[schema(example = "not found")]
    error: &'static str,
    /// What went wrong, in words; null for internal errors, whose detail is only logged.
    #[schema(example = "no agent with id 7d0c4b1e")]
    detail: Option<String>,
}

impl ApiError {
    /// The error's answer, telling the caller to come back after `secs` seconds (a busy
    /// download server, a node full of sessions).
    pub(crate) fn retry_after(self, secs: u32) -> Response {
        let mut answer = self.into_response();
        answer.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from(secs),
        );
        answer
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, detail) = match self {
            ApiError::Unauthorized(detail) => (StatusCode::UNAUTHORIZED, Some(detail.into())),
            ApiError::BadRequest(detail) => (StatusCode::BAD_REQUEST, Some(detail)),
            ApiError::PayloadTooLarge(detail) => (StatusCode::PAYLOAD_TOO_LARGE, Some(detail)),
            ApiError::UnsupportedMediaType(detail) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, Some(detail))
            }
            ApiError::Forbidden(detail) => (StatusCode::FORBIDDEN, Some(detail)),
            ApiError::TooManyRequests(detail) => (StatusCode::TOO_MANY_REQUESTS, Some(detail)),
            ApiError::Unavailable(detail) => (StatusCode::SERVICE_UNAVAILABLE, Some(detail)),
            ApiError::NotFound(detail) => (StatusCode::NOT_FOUND, Some(detail)),
            ApiError::Conflict(detail) => (StatusCode::CONFLICT, Some(detail)),
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "internal error answering an API call");
                (StatusCode::INTERNAL_SERVER_ERROR, None)
            }
        };
        let error = error_word(status);
        (status, Json(ErrorBody { error, detail })).into_response()
    }
}

/// The caller of an operator endpoint, authenticated by `Authorization: Bearer <token>`
/// or by the dashboard's session cookie, which names a server-side session of a token.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    role: Role,
    /// What the caller presented, to check later that it still holds.
    credential: Credential,
    /// The token's id.
    token_id: String,
    /// The token's name.
    name: String,
    /// Who acted, as the audit log shows it: the token's name and id.
    actor: String,
}

/// How a caller authenticated: the hash of its bearer token, or of its session id.
#[derive(Debug, Clone)]
enum Credential {
    Token(String),
    Session(String),
}

impl Caller {
    /// Whether the caller's token, or session, is still valid: not revoked, logged out or
    /// expired since the request began.
    async fn still_valid(&self, state: &AppState) -> bool {
        let answer = match &self.credential {
            Credential::Token(hash) => state.store.api_token(hash).await,
            Credential::Session(hash) => state.store.session_token(hash, now_ms()).await,
        };
        !matches!(answer, Err(StoreError::NotFound))
    }

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

    /// The caller a token stands for.
    async fn of_token(state: &AppState, token: &str) -> Result<Caller, ApiError> {
        let token_hash = hash_secret(token);
        match state.store.api_token(&token_hash).await {
            Ok(token) => Ok(Caller::new(token, Credential::Token(token_hash))),
            Err(StoreError::NotFound) => Err(ApiError::Unauthorized("unknown or revoked token")),
            Err(err) => Err(err.into()),
        }
    }

    /// The caller a dashboard session id stands for.
    async fn of_session(state: &AppState, id: &str) -> Result<Caller, ApiError> {
        let id_hash = hash_secret(id);
        match state.store.session_token(&id_hash, now_ms()).await {
            Ok(token) => Ok(Caller::new(token, Credential::Session(id_hash))),
            Err(StoreError::NotFound) => Err(ApiError::Unauthorized(
                "the session has ended (logged out, expired, or its token revoked); log in again",
            )),
            Err(err) => Err(err.into()),
        }
    }

    fn new(token: ApiToken, credential: Credential) -> Caller {
        Caller {
            credential,
            role: token.role,
            actor: format!("{} ({})", token.name, token.id),
            token_id: token.id,
            name: token.name,
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        if let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) {
            let token = header
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or(ApiError::Unauthorized(
                    "the Authorization header must be Bearer <token>",
                ))?;
            return Caller::of_token(state, token).await;
        }
        let Some(session) = login::session_id(&parts.headers) else {
            return Err(ApiError::Unauthorized(
                "missing Authorization: Bearer <token> header (or dashboard session cookie)",
            ));
        };
        // A browser sends the cookie with any request a foreign page makes it send; such a
        // page cannot add a custom header without a CORS preflight, which is never granted.
        if !parts.method.is_safe() && !parts.headers.contains_key(login::CSRF_HEADER) {
            return Err(ApiError::Forbidden(
                "a request authenticated by the session cookie that changes something needs \
                 the X-Drover: 1 header"
                    .into(),
            ));
        }
        Caller::of_session(state, &session).await
    }
}

/// A JSON request body whose rejections are `ApiError`s with the JSON error shape. It is
/// read before the handler runs but judged only when the handler takes it, after the
/// role check: a caller without the role hears 403 whatever the body holds.
pub(crate) struct Body<T>(Result<T, ApiError>);

impl<T> Body<T> {
    /// The parsed body, or why it could not be parsed.
    pub(crate) fn take(self) -> Result<T, ApiError> {
        self.0
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for Body<T> {
    type Rejection = std::convert::Infallible;

    async fn from_request(
        request: Request,
        state: &AppState,
    ) -> Result<Body<T>, std::convert::Infallible> {
        Ok(Body(
            match Json::<serde_json::Value>::from_request(request, state).await {
                Ok(Json(value)) => object_body(value),
                Err(rejection) => Err(bad_body(rejection)),
            },
        ))
    }
}

/// A JSON body that may be left out (no body, or `null`, means the defaults), judged as
/// late as `Body`. A body that is there must be sent as JSON
/// (`Content-Type: application/json`, else 415), as `Body`'s must: a page on another
/// site can post a form or plain text without asking, never JSON.
pub(crate) struct OptionalBody<T>(Result<T, ApiError>);

impl<T> OptionalBody<T> {
    /// The parsed body, the defaults, or why it could not be parsed.
    pub(crate) fn take(self) -> Result<T, ApiError> {
        self.0
    }
}

impl<T: Default + DeserializeOwned> FromRequest<AppState> for OptionalBody<T> {
    type Rejection = std::convert::Infallible;

    async fn from_request(
        request: Request,
        state: &AppState,
    ) -> Result<OptionalBody<T>, std::convert::Infallible> {
        Ok(OptionalBody(read_optional(request, state).await))
    }
}

/// Reads a body that may be left out; one that is there must say it is JSON.
async fn read_optional<T: Default + DeserializeOwned>(
    request: Request,
    state: &AppState,
) -> Result<T, ApiError> {
    let says_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    match axum::body::Bytes::from_request(request, state).await {
        Ok(bytes) if !says_json && !bytes.iter().all(u8::is_ascii_whitespace) => {
            Err(ApiError::UnsupportedMediaType(
                "the body must be JSON, sent with Content-Type: application/json".into(),
            ))
        }
        Ok(bytes) => optional_body(&bytes),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::PayloadTooLarge(format!(
                "the body exceeds the limit of {} KiB",
                BODY_LIMIT / 1024
            )))
        }
        Err(rejection) => Err(ApiError::BadRequest(rejection.body_text())),
    }
}

/// A body's fields come from a JSON object only: serde would also take an array as the
/// fields in order (`["x", "viewer"]`), which no client means.
fn object_body<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        ));
    }
    serde_json::from_value(value).map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))
}

/// Query parameters whose rejections are `ApiError`s with the JSON error shape.
pub(crate) struct Params<T>(T);

impl<T: DeserializeOwned> FromRequestParts<AppState> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Params<T>, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Params(value)),
            Err(rejection) => Err(ApiError::BadRequest(rejection.body_text())),
        }
    }
}

fn bad_body(rejection: JsonRejection) -> ApiError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(format!(
            "the body exceeds the limit of {} KiB",
            BODY_LIMIT / 1024
        )),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(
            "the body must be JSON, sent with Content-Type: application/json".into(),
        ),
        _ => ApiError::BadRequest(rejection.body_text()),
    }
}

/// A JSON body that may be left out; no body, or `null`, means the defaults.
fn optional_body<T: Default + DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    match serde_json::from_slice::<serde_json::Value>(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid body: {e}")))?
    {
        serde_json::Value::Null => Ok(T::default()),
        value => object_body(value),
    }
}
