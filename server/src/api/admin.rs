//! Tokens and the audit log: `/api/v1/tokens` (admin), enrollment tokens for sites
//! (admin), `/api/v1/audit` (viewer).

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{ApiError, Body, Caller};
use crate::AppState;
use crate::auth::{generate_secret, hash_secret};
use crate::clock::{now_ms, rfc3339};
use crate::store::{ApiToken, AuditEntry, Role, StoreError};

#[derive(Debug, Serialize)]
pub(crate) struct TokenView {
    id: String,
    name: String,
    role: Role,
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

pub(crate) async fn list_tokens(
    caller: Caller,
    State(state): State<AppState>,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    caller.require(Role::Admin)?;
    let tokens = state.store.list_api_tokens().await?;
    Ok(Json(tokens.into_iter().map(TokenView::from).collect()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewToken {
    name: String,
    role: String,
}

/// Mints an API token; the token itself is in this answer only.
pub(crate) async fn create_token(
    caller: Caller,
    State(state): State<AppState>,
    Body(request): Body<NewToken>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Role::Admin)?;
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
        Json(json!({ "id": token.id, "name": token.name, "role": token.role, "token": secret })),
    ))
}

pub(crate) async fn revoke_token(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({ "id": id, "revoked": true })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewEnrollmentToken {
    expires_in_secs: Option<i64>,
    max_uses: Option<i64>,
}

/// Mints an enrollment token for a site, optionally expiring and limited in uses.
pub(crate) async fn create_enrollment_token(
    caller: Caller,
    State(state): State<AppState>,
    Path(site_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Role::Admin)?;
    let request: NewEnrollmentToken = super::optional_body(&body)?;
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
        Json(json!({
            "id": id,
            "site_id": site_id,
            "token": secret,
            "expires_at": expires_at.map(rfc3339),
            "max_uses": request.max_uses,
        })),
    ))
}

#[derive(Debug, Deserialize)]
pub(crate) struct AuditQuery {
    limit: Option<i64>,
    before: Option<i64>,
    action: Option<String>,
}

#[derive(Debug, Serialize)]
struct AuditView {
    #[serde(flatten)]
    entry: AuditEntry,
    at: String,
}

/// The audit log, newest first, a page at a time.
pub(crate) async fn audit(
    caller: Caller,
    State(state): State<AppState>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Viewer)?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let entries = state
        .store
        .audit(limit, query.before, query.action.as_deref())
        .await?;
    let next_before = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    let entries: Vec<AuditView> = entries
        .into_iter()
        .map(|entry| AuditView {
            at: rfc3339(entry.at_ms),
            entry,
        })
        .collect();
    Ok(Json(
        json!({ "entries": entries, "next_before": next_before }),
    ))
}
