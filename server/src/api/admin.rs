//! Tokens and the audit log: `/api/v1/tokens` (admin), enrollment tokens for sites
//! (admin: made, listed and revoked), `/api/v1/audit` (viewer).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, Body, Caller, ErrorBody, OptionalBody, Params, openapi};
use crate::AppState;
use crate::auth::{generate_secret, hash_secret};
use crate::clock::{now_ms, rfc3339};
use crate::store::{ApiToken, AuditEntry, EnrollmentToken, Role, StoreError};

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = ApiToken)]
pub(crate) struct TokenView {
    id: String,
    name: String,
    #[schema(schema_with = openapi::role)]
    role: Role,
    /// RFC 3339.
    created_at: String,
    revoked: bool,
}

impl From<ApiToken> for TokenView {
    fn from(token: ApiToken) -> TokenView {
        TokenView {
            created_at: rfc3339(token.created_at_ms),
            id: token.id,
            name: token.name,
            role: token.role,
            revoked: token.revoked,
        }
    }
}

#[utoipa::path(
    get,
    path = "/tokens",
    tag = "admin",
    summary = "Every API token (never the token itself)",
    responses(
        (status = 200, description = "Every API token, revoked ones too", body = [TokenView]),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
pub(crate) async fn list_tokens(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    caller.require(Role::Admin)?;
    let tokens = state.store.list_api_tokens().await?;
    Ok(Json(tokens.into_iter().map(TokenView::from).collect()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewToken {
    /// Trimmed; not empty.
    #[schema(schema_with = openapi::not_blank)]
    name: String,
    #[schema(schema_with = openapi::role)]
    role: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreatedToken {
    id: String,
    name: String,
    #[schema(schema_with = openapi::role)]
    role: Role,
    /// The bearer token; it is shown in this answer only.
    token: String,
}

/// Mints an API token; the token itself is in this answer only.
#[utoipa::path(
    post,
    path = "/tokens",
    tag = "admin",
    request_body = NewToken,
    responses(
        (status = 201, description = "The new token, with its secret", body = CreatedToken),
        (status = 400, description = "The body is malformed, the name empty or the role unknown", body = ErrorBody),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
pub(crate) async fn create_token(
    caller: Caller,
    State(state): State<AppState>,
    body: Body<NewToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    caller.require(Role::Admin)?;
    let request = body.take()?;
    let role = Role::parse(&request.role).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "role {:?} is not one of viewer, operator, admin",
            request.role
        ))
    })?;
    let name = request.name.trim();
    if name.is_empty() {
        return Err(ApiError::BadRequest("a token needs a name".into()));
    }
    let secret = generate_secret("drv_");
    let token = state
        .store
        .create_api_token(name, role, &hash_secret(&secret))
        .await?;
    state
        .audit(
            &caller.actor,
            "token.create",
            &format!("{name} ({})", token.id),
            Some(role.as_str().into()),
            "created",
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id: token.id,
            name: token.name,
            role: token.role,
            token: secret,
        }),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RevokedToken {
    id: String,
    /// Always true.
    revoked: bool,
}

#[utoipa::path(
    delete,
    path = "/tokens/{id}",
    tag = "admin",
    summary = "Revoke an API token",
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 200, description = "The token is revoked", body = RevokedToken),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 404, description = "No unrevoked token has this id", body = ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
pub(crate) async fn revoke_token(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RevokedToken>, ApiError> {
    caller.require(Role::Admin)?;
    match state.store.revoke_api_token(&id).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::NotFound(format!("no active token with id {id}")));
        }
        Err(err) => return Err(err.into()),
    }
    state
        .audit(&caller.actor, "token.revoke", &id, None, "revoked")
        .await;
    Ok(Json(RevokedToken { id, revoked: true }))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewEnrollmentToken {
    /// Positive; the token never expires when left out.
    #[schema(minimum = 1)]
    expires_in_secs: Option<i64>,
    /// Positive; unlimited when left out.
    #[schema(minimum = 1)]
    max_uses: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreatedEnrollmentToken {
    id: String,
    site_id: String,
    /// The enrollment token; it is shown in this answer only.
    token: String,
    /// RFC 3339; null when it never expires.
    expires_at: Option<String>,
    max_uses: Option<i64>,
}

/// Mints an enrollment token for a site, optionally expiring and limited in uses.
#[utoipa::path(
    post,
    path = "/sites/{id}/enrollment-tokens",
    tag = "admin",
    params(("id" = String, Path, description = "The site's id")),
    request_body(
        content = Option<NewEnrollmentToken>,
        description = "Optional; no body or `null` means a token that never expires and has no use limit",
    ),
    responses(
        (status = 201, description = "The new enrollment token, with its secret", body = CreatedEnrollmentToken),
        (status = 400, description = "The body is malformed or a limit is not positive", body = ErrorBody),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 404, description = "No site has this id", body = ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
pub(crate) async fn create_enrollment_token(
    caller: Caller,
    State(state): State<AppState>,
    Path(site_id): Path<String>,
    body: OptionalBody<NewEnrollmentToken>,
) -> Result<(StatusCode, Json<CreatedEnrollmentToken>), ApiError> {
    caller.require(Role::Admin)?;
    let request = body.take()?;
    if request.expires_in_secs.is_some_and(|s| s <= 0) || request.max_uses.is_some_and(|n| n <= 0) {
        return Err(ApiError::BadRequest(
            "expires_in_secs and max_uses must be positive".into(),
        ));
    }
    let expires_at = request
        .expires_in_secs
        .map(|secs| now_ms().saturating_add(secs.saturating_mul(1000)));
    let secret = generate_secret("drv_enroll_");
    let id = match state
        .store
        .create_enrollment_token(
            &site_id,
            &hash_secret(&secret),
            expires_at,
            request.max_uses,
        )
        .await
    {
        Ok(id) => id,
        Err(StoreError::NotFound) => {
            return Err(ApiError::NotFound(format!("no site with id {site_id}")));
        }
        Err(err) => return Err(err.into()),
    };
    state
        .audit(
            &caller.actor,
            "enrollment_token.create",
            &site_id,
            Some(format!("token {id}")),
            "created",
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedEnrollmentToken {
            id,
            site_id,
            token: secret,
            expires_at: expires_at.map(rfc3339),
            max_uses: request.max_uses,
        }),
    ))
}

/// An enrollment token as listed: never the token itself.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = EnrollmentToken)]
pub(crate) struct EnrollmentTokenView {
    id: String,
    site_id: String,
    /// RFC 3339.
    created_at: String,
    /// RFC 3339; null when it never expires.
    expires_at: Option<String>,
    /// Null when unlimited.
    max_uses: Option<i64>,
    /// Enrollments made with it.
    uses: i64,
    /// RFC 3339; null unless revoked.
    revoked_at: Option<String>,
    /// Whether it enrolls now: `usable`, `expired`, `used_up` or `revoked`.
    #[schema(pattern = "^(usable|expired|used_up|revoked)$")]
    state: &'static str,
}

impl EnrollmentTokenView {
    fn of(token: EnrollmentToken, now_ms: i64) -> EnrollmentTokenView {
        EnrollmentTokenView {
            state: token.state(now_ms),
            created_at: rfc3339(token.created_at_ms),
            expires_at: token.expires_at_ms.map(rfc3339),
            revoked_at: token.revoked_at_ms.map(rfc3339),
            id: token.id,
            site_id: token.site_id,
            max_uses: token.max_uses,
            uses: token.uses,
        }
    }
}

#[utoipa::path(
    get,
    path = "/enrollment-tokens",
    tag = "admin",
    summary = "Every enrollment token of every site (never the token itself)",
    responses(
        (status = 200, description = "Oldest first, revoked and expired ones too", body = [EnrollmentTokenView]),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
pub(crate) async fn list_enrollment_tokens(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<EnrollmentTokenView>>, ApiError> {
    caller.require(Role::Admin)?;
    let now = now_ms();
    let tokens = state.store.list_enrollment_tokens(None).await?;
    Ok(Json(
        tokens
            .into_iter()
            .map(|t| EnrollmentTokenView::of(t, now))
            .collect(),
    ))
}

#[utoipa::path(
    get,
    path = "/sites/{id}/enrollment-tokens",
    tag = "admin",
    summary = "The site's enrollment tokens (never the token itself)",
    params(("id" = String, Path, description = "The site's id")),
    responses(
        (status = 200, description = "Oldest first, revoked and expired ones too", body = [EnrollmentTokenView]),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 404, description = "No site has this id", body = ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
pub(crate) async fn list_site_enrollment_tokens(
    caller: Caller,
    State(state): State<AppState>,
    Path(site_id): Path<String>,
) -> Result<Json<Vec<EnrollmentTokenView>>, ApiError> {
    caller.require(Role::Admin)?;
    if !state
        .store
        .list_sites()
        .await?
        .iter()
        .any(|s| s.id == site_id)
    {
        return Err(ApiError::NotFound(format!("no site with id {site_id}")));
    }
    let now = now_ms();
    let tokens = state.store.list_enrollment_tokens(Some(&site_id)).await?;
    Ok(Json(
        tokens
            .into_iter()
            .map(|t| EnrollmentTokenView::of(t, now))
            .collect(),
    ))
}

#[utoipa::path(
    delete,
    path = "/enrollment-tokens/{id}",
    tag = "admin",
    summary = "Revoke an enrollment token",
    description = "It enrolls no more machines and `GET /api/v1/agent/install` refuses it; \
        agents enrolled with it keep their identities.",
    params(("id" = String, Path, description = "The enrollment token's id")),
    responses(
        (status = 200, description = "The enrollment token is revoked", body = RevokedToken),
        (status = 403, description = "The token's role is below admin", body = ErrorBody),
        (status = 404, description = "No unrevoked enrollment token has this id", body = ErrorBody),
    ),
    security(("bearer" = ["admin"])),
)]
pub(crate) async fn revoke_enrollment_token(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RevokedToken>, ApiError> {
    caller.require(Role::Admin)?;
    match state.store.revoke_enrollment_token(&id, now_ms()).await {
        Ok(()) => {}
        Err(StoreError::NotFound) => {
            return Err(ApiError::NotFound(format!(
                "no unrevoked enrollment token with id {id}"
            )));
        }
        Err(err) => return Err(err.into()),
    }
    state
        .audit(
            &caller.actor,
            "enrollment_token.revoke",
            &id,
            None,
            "revoked",
        )
        .await;
    Ok(Json(RevokedToken { id, revoked: true }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditQuery {
    /// Entries per page, 1 to 1000; 100 when left out.
    limit: Option<i64>,
    /// Only entries with a smaller id: the `next_before` of the previous page.
    before: Option<i64>,
    /// Only entries of this action, such as `rollout.promote`.
    action: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = AuditEntry)]
struct AuditView {
    id: i64,
    /// Who acted: the token's name and id.
    actor: String,
    action: String,
    target: String,
    detail: Option<String>,
    result: String,
    /// RFC 3339.
    at: String,
}

impl From<AuditEntry> for AuditView {
    fn from(entry: AuditEntry) -> AuditView {
        AuditView {
            at: rfc3339(entry.at_ms),
            id: entry.id,
            actor: entry.actor,
            action: entry.action,
            target: entry.target,
            detail: entry.detail,
            result: entry.result,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AuditPage {
    /// Newest first.
    entries: Vec<AuditView>,
    /// The `before` of the next page; null on the last page.
    next_before: Option<i64>,
}

/// The audit log, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/audit",
    operation_id = "list_audit",
    tag = "admin",
    params(AuditQuery),
    responses(
        (status = 200, description = "One page of the audit log", body = AuditPage),
        (status = 400, description = "A query parameter is malformed", body = ErrorBody),
    ),
    security(("bearer" = ["viewer"])),
)]
pub(crate) async fn audit(
    caller: Caller,
    State(state): State<AppState>,
    Params(query): Params<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let entries = state
        .store
        .audit(limit, query.before, query.action.as_deref())
        .await?;
    let next_before = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(AuditPage {
        entries: entries.into_iter().map(AuditView::from).collect(),
        next_before,
    }))
}
