//! `/api/v1/session`: the dashboard's login. A login exchanges an API token for a
//! server-side session: the HttpOnly cookie holds a random session id, stored only as its
//! hash, which expires after `SESSION_LIFETIME` and ends at logout or when its token is
//! revoked (on every node: sessions live in the database). Logins are limited per source
//! address, take JSON only, and failed ones are audited.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{AppendHeaders, IntoResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, Caller, ErrorBody, OptionalBody, openapi};
use crate::AppState;
use crate::auth::{generate_secret, hash_secret};
use crate::clock::now_ms;
use crate::limits::TooManyAttempts;
use crate::store::Role;

/// The cookie that holds the session.
pub(crate) const COOKIE: &str = "drover_session";
/// The header a cookie-authenticated request must carry to change anything. A page on
/// another origin cannot set it without a CORS preflight, which this server never grants.
pub(crate) const CSRF_HEADER: &str = "x-drover";
/// How long a dashboard session lasts; then the user logs in again.
pub(crate) const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Login {
    /// An API token, as `drover tokens create` prints it.
    token: Option<String>,
}

/// Who is logged in.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Session {
    #[schema(schema_with = openapi::role)]
    role: Role,
    /// The token's name.
    name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct LoggedOut {
    /// Always true.
    logged_out: bool,
}

/// The session id from the request's cookies, if any.
pub(crate) fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
        .filter(|id| !id.is_empty())
}

/// Whether the browser reached us over TLS: directly by the public URL, or through a
/// proxy that says so. A `Secure` cookie would never come back over plain HTTP.
fn over_tls(state: &AppState, headers: &HeaderMap) -> bool {
    let forwarded = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("https")
        });
    forwarded || state.settings.public_url.starts_with("https://")
}

fn cookie(value: &str, max_age: Option<u32>, secure: bool) -> HeaderValue {
    let mut cookie = format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/");
    if let Some(age) = max_age {
        cookie.push_str(&format!("; Max-Age={age}"));
    }
    if secure {
        cookie.push_str("; Secure");
    }
    HeaderValue::from_str(&cookie).expect("a generated id and fixed attributes make a valid header")
}

/// Logs in with an API token: answers who it is and sets the session cookie.
#[utoipa::path(
    post,
    path = "/session",
    operation_id = "create_session",
    tag = "session",
    request_body(content = Login, description = "`{\"token\": \"...\"}`"),
    responses(
        (status = 200, description = "Logged in; the answer sets the HttpOnly session cookie", body = Session),
        (status = 400, description = "The body is malformed", body = ErrorBody),
        (status = 401, description = "No token given, or an unknown or revoked one", body = ErrorBody),
        (status = 415, description = "The body is not JSON", body = ErrorBody),
        (status = 429, description = "Too many login attempts from this address; retry later", body = ErrorBody),
    ),
    security(()),
)]
pub(crate) async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: OptionalBody<Login>,
) -> Result<impl IntoResponse, ApiError> {
    let source = peer.ip();
    state
        .logins
        .attempt(source, Instant::now())
        .map_err(|TooManyAttempts(message)| ApiError::TooManyRequests(message))?;
    let refused = |why: &'static str| {
        let state = state.clone();
        async move {
            state.logins.failed(source, Instant::now());
            tracing::warn!(%source, reason = why, "dashboard login refused");
            state
                .audit(
                    &format!("login from {source}"),
                    "session.login",
                    "dashboard",
                    Some(why.to_owned()),
                    "refused",
                )
                .await;
        }
    };
    let request = match body.take() {
        Ok(request) => request,
        Err(err) => {
            refused("malformed login").await;
            return Err(err);
        }
    };
    let Some(token) = request
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        refused("no token given").await;
        return Err(ApiError::Unauthorized(
            "give the API token as {\"token\": \"...\"}",
        ));
    };
    let caller = match Caller::of_token(&state, token).await {
        Ok(caller) => caller,
        Err(err) => {
            if matches!(err, ApiError::Unauthorized(_)) {
                refused("unknown or revoked token").await;
            }
            return Err(err);
        }
    };
    let now = now_ms();
    // Expired sessions go whenever someone logs in; a login is rare enough.
    state.store.prune_sessions(now).await?;
    let id = generate_secret("drv_session_");
    let lifetime = i64::try_from(SESSION_LIFETIME.as_millis()).unwrap_or(i64::MAX);
    state
        .store
        .create_session(
            &hash_secret(&id),
            &caller.token_id,
            now,
            now.saturating_add(lifetime),
        )
        .await?;
    state
        .audit(
            &caller.actor,
            "session.login",
            &caller.name,
            None,
            "logged in",
        )
        .await;
    let secure = over_tls(&state, &headers);
    let max_age = u32::try_from(SESSION_LIFETIME.as_secs()).unwrap_or(u32::MAX);
    Ok((
        AppendHeaders([(header::SET_COOKIE, cookie(&id, Some(max_age), secure))]),
        Json(Session {
            role: caller.role,
            name: caller.name,
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/session",
    operation_id = "get_session",
    tag = "session",
    summary = "Who is logged in (by cookie or bearer token)",
    responses((status = 200, description = "The caller's role and token name", body = Session)),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn current(caller: Caller) -> Json<Session> {
    Json(Session {
        role: caller.role,
        name: caller.name,
    })
}

/// Logs out: the session ends on the server (every node) and the cookie is cleared.
/// The API token itself stays valid; revoke it with `DELETE /api/v1/tokens/{id}` to end
/// every session made with it.
#[utoipa::path(
    delete,
    path = "/session",
    operation_id = "delete_session",
    tag = "session",
    responses((status = 200, description = "The session is ended and its cookie cleared", body = LoggedOut)),
)]
pub(crate) async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(id) = session_id(&headers)
        && state.store.delete_session(&hash_secret(&id)).await?
    {
        state
            .audit(
                "dashboard session",
                "session.logout",
                "dashboard",
                None,
                "logged out",
            )
            .await;
    }
    let secure = over_tls(&state, &headers);
    Ok((
        AppendHeaders([(header::SET_COOKIE, cookie("", Some(0), secure))]),
        Json(LoggedOut { logged_out: true }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_id_is_read_from_among_other_cookies() {
        let mut headers = HeaderMap::new();
        let value = format!("theme=dark; {COOKIE}=drv_session_abc; other=1");
        headers.insert(header::COOKIE, HeaderValue::from_str(&value).unwrap());
        assert_eq!(session_id(&headers).as_deref(), Some("drv_session_abc"));

        for broken in ["", "theme=dark", "drover_session="] {
            let mut headers = HeaderMap::new();
            headers.insert(header::COOKIE, HeaderValue::from_str(broken).unwrap());
            assert_eq!(session_id(&headers), None, "{broken}");
        }
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_over_tls() {
        let plain = cookie("6162", None, false);
        assert_eq!(
            plain,
            "drover_session=6162; HttpOnly; SameSite=Strict; Path=/"
        );
        let cleared = cookie("", Some(0), true);
        assert_eq!(
            cleared,
            "drover_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0; Secure"
        );
    }
}
