//! `/api/v1/session`: the dashboard's login. The session cookie carries the API token
//! itself (hex-encoded, HttpOnly), so revoking the token ends every session made with
//! it and any node of a cluster accepts it; nothing about sessions is stored.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{AppendHeaders, IntoResponse};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, Caller, ErrorBody, openapi, optional_body};
use crate::AppState;
use crate::store::Role;

/// The cookie that holds the session.
pub(crate) const COOKIE: &str = "drover_session";
/// The header a cookie-authenticated request must carry to change anything. A page on
/// another origin cannot set it without a CORS preflight, which this server never grants.
pub(crate) const CSRF_HEADER: &str = "x-drover";

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

/// The session token from the request's cookies, if any.
pub(crate) fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| hex::decode(value).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|token| !token.is_empty())
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
    HeaderValue::from_str(&cookie).expect("a hex value and fixed attributes make a valid header")
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
    ),
    security(()),
)]
pub(crate) async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let request: Login = optional_body(&body)?;
    let token = request
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::Unauthorized(
            "give the API token as {\"token\": \"...\"}",
        ))?;
    let caller = match Caller::of_token(&state, token).await {
        Ok(caller) => caller,
        Err(err) => {
            tracing::warn!("dashboard login with an unknown or revoked token");
            return Err(err);
        }
    };
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
    Ok((
        AppendHeaders([(
            header::SET_COOKIE,
            cookie(&hex::encode(token), None, secure),
        )]),
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

/// Logs out: the session cookie is cleared. The token itself stays valid; revoke it
/// with `DELETE /api/v1/tokens/{id}` to end it everywhere.
#[utoipa::path(
    delete,
    path = "/session",
    operation_id = "delete_session",
    tag = "session",
    responses((status = 200, description = "The session cookie is cleared", body = LoggedOut)),
)]
pub(crate) async fn logout(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let secure = over_tls(&state, &headers);
    (
        AppendHeaders([(header::SET_COOKIE, cookie("", Some(0), secure))]),
        Json(LoggedOut { logged_out: true }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_token_is_read_from_among_other_cookies() {
        let mut headers = HeaderMap::new();
        let value = format!("theme=dark; {COOKIE}={}; other=1", hex::encode("drv_abc"));
        headers.insert(header::COOKIE, HeaderValue::from_str(&value).unwrap());
        assert_eq!(session_token(&headers).as_deref(), Some("drv_abc"));

        for broken in ["", "theme=dark", "drover_session=", "drover_session=zz"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::COOKIE, HeaderValue::from_str(broken).unwrap());
            assert_eq!(session_token(&headers), None, "{broken}");
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
