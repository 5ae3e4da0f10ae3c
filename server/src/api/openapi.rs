//! The OpenAPI document of the REST API, served at `/api/v1/openapi.json`, and the
//! schemas of fields whose values are a fixed set of words.

use std::sync::LazyLock;

use axum::Json;
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{Object, ObjectBuilder, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::releases::Channel;
use crate::store::{FailureClass, Role, RolloutKind, RolloutState, TaskKind, TaskStatus};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Drover",
        description = "The REST API of a Drover server. Operator calls send \
            `Authorization: Bearer <token>` (or the dashboard's session cookie from \
            `POST /api/v1/session`, with `X-Drover: 1` on every call that changes something); roles are viewer < operator < admin, and each \
            operation's security requirement names the role it needs. Every error is a \
            4xx/5xx status with `{\"error\": \"...\", \"detail\": ...}`. Not described \
            here: `GET /api/v1/agent/ws` (the agent WebSocket, MessagePack frames), \
            `GET /healthz`, `GET /metrics` and `GET /downloads/{file}`."
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "agents", description = "The fleet and per-agent actions"),
        (name = "hierarchy", description = "Clients, sites, and channels at every level"),
        (name = "releases", description = "Offered builds and the server-wide update switch"),
        (name = "mirrors", description = "Download mirrors per site or client, and their health"),
        (name = "rollouts", description = "Rollout health, promote, rollback, unblock, resume"),
        (name = "admin", description = "API tokens, enrollment tokens and the audit log"),
        (name = "install", description = "What the install script fetches"),
        (name = "session", description = "The dashboard's login, kept in an HttpOnly cookie"),
        (name = "events", description = "Server-sent events for the live dashboard"),
        (name = "meta", description = "This document"),
    )
)]
struct ApiDoc;

/// The whole document: the routes' descriptions under `/api/v1`, plus the answers every
/// authenticated call can give.
fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi().nest("/api/v1", super::routes().into_openapi());
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            add_common_errors(operation);
        }
    }
    doc
}

/// Every call that takes a token can be refused for it, and can fail on the database;
/// saying so once here keeps the handlers' lists to what is particular to them.
fn add_common_errors(operation: &mut Operation) {
    let authenticated = operation
        .security
        .as_ref()
        .is_some_and(|requirements| !requirements.is_empty());
    if !authenticated {
        return;
    }
    let responses = &mut operation.responses.responses;
    responses.entry("401".into()).or_insert_with(|| {
        error_response(
            "The Authorization header is missing, malformed, or names an unknown or revoked token",
        )
    });
    responses
        .entry("500".into())
        .or_insert_with(|| error_response("An internal error; the detail is only logged"));
}

fn error_response(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token; the scopes of a requirement name the least role it needs",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "enrollment_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A site enrollment token, the one secret a new machine has",
                    ))
                    .build(),
            ),
        );
    }
}

/// Built once: it only changes with the code.
static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(document);

// Served without a token: it describes the API and holds no fleet data.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "meta",
    summary = "This OpenAPI document",
    responses((status = 200, description = "The OpenAPI document of this API", body = Object)),
)]
pub(crate) async fn document_json() -> Json<&'static utoipa::openapi::OpenApi> {
    Json(&DOCUMENT)
}

pub(crate) fn string_enum<'a>(values: impl IntoIterator<Item = &'a str>) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .build()
}

fn nullable_string_enum<'a>(values: impl IntoIterator<Item = &'a str>) -> Object {
    let values = values
        .into_iter()
        .map(serde_json::Value::from)
        .chain([serde_json::Value::Null]);
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(values))
        .build()
}

const CHANNELS: [Channel; 2] = [Channel::Stable, Channel::Beta];

pub(crate) fn channel() -> Object {
    string_enum(CHANNELS.map(Channel::as_str))
}

pub(crate) fn nullable_channel() -> Object {
    nullable_string_enum(CHANNELS.map(Channel::as_str))
}

/// Where an agent's channel comes from, as `engine::resolve_channel` says it.
pub(crate) fn channel_source() -> Object {
    string_enum(["agent", "site", "client", "default"])
}

pub(crate) fn role() -> Object {
    string_enum([Role::Viewer, Role::Operator, Role::Admin].map(Role::as_str))
}

pub(crate) fn task_kind() -> Object {
    string_enum([TaskKind::Update, TaskKind::Forced, TaskKind::Rollback].map(TaskKind::as_str))
}

pub(crate) fn task_status() -> Object {
    string_enum(TaskStatus::ALL.map(TaskStatus::as_str))
}

pub(crate) fn nullable_task_status() -> Object {
    nullable_string_enum(TaskStatus::ALL.map(TaskStatus::as_str))
}

pub(crate) fn failure_class() -> Object {
    nullable_string_enum(
        [
            FailureClass::Build,
            FailureClass::Environment,
            FailureClass::Transient,
        ]
        .map(FailureClass::as_str),
    )
}

pub(crate) fn rollout_kind() -> Object {
    string_enum(RolloutKind::ALL.map(RolloutKind::as_str))
}

pub(crate) fn rollout_state() -> Object {
    string_enum(RolloutState::ALL.map(RolloutState::as_str))
}
