//! The OpenAPI document of the REST API, served at `/api/v1/openapi.json`, and the
//! schemas of fields whose values are a fixed set of words.

use std::sync::LazyLock;

use axum::Json;
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{Array, ArrayBuilder, Object, ObjectBuilder, SchemaType, Type};
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

/// Every call that takes a body can be refused for its form, every call that takes a
/// token for the token, and every one of those can fail on the database; saying so once
/// here keeps the handlers' lists to what is particular to them.
fn add_common_errors(operation: &mut Operation) {
    if operation.request_body.is_some() {
        let responses = &mut operation.responses.responses;
        responses.entry("400".into()).or_insert_with(|| {
            error_response("The body is not a JSON object of the documented fields")
        });
        responses.entry("413".into()).or_insert_with(|| {
            error_response(&format!(
                "The body is larger than the API reads ({} KiB)",
                super::BODY_LIMIT / 1024
            ))
        });
        responses.entry("415".into()).or_insert_with(|| {
            error_response("A body is sent without `Content-Type: application/json`")
        });
    }
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

// Values the server checks beyond their JSON type, documented by the schema its check
// implies: each is made from the constant or the grammar that check uses, so that the
// document is as strict as the server.

/// A semver version as `semver::Version::parse` takes it; numbers of up to 18 digits,
/// which fit its u64.
pub(crate) const SEMVER_PATTERN: &str = concat!(
    r"^(0|[1-9][0-9]{0,17})\.(0|[1-9][0-9]{0,17})\.(0|[1-9][0-9]{0,17})",
    r"(-(0|[1-9][0-9]{0,17}|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(\.(0|[1-9][0-9]{0,17}|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*)?",
    r"(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
);

/// White space as `str::trim` takes it (Unicode's White_Space), spelled the same in
/// ECMA and Rust regular expressions; `\s` differs between them.
const WHITE_SPACE: &str =
    r"\t\n\u000B\u000C\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000";

/// A pattern of `core` with the white space around it that the server trims.
fn trimmed(core: &str) -> String {
    format!("^[{WHITE_SPACE}]*{core}[{WHITE_SPACE}]*$")
}

/// A pattern of text that is not empty once trimmed.
fn not_blank_pattern() -> String {
    format!("[^{WHITE_SPACE}]")
}

fn with_pattern(description: &str, pattern: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .pattern(Some(pattern))
        .build()
}

/// A path parameter that is a semver version.
pub(crate) struct Version;

impl utoipa::PartialSchema for Version {
    fn schema() -> RefOr<utoipa::openapi::schema::Schema> {
        RefOr::T(utoipa::openapi::schema::Schema::Object(version()))
    }
}

impl utoipa::ToSchema for Version {}

pub(crate) fn version() -> Object {
    with_pattern("A semver version, such as `1.4.0`", SEMVER_PATTERN)
}

pub(crate) fn nullable_version() -> Object {
    ObjectBuilder::from(version())
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .build()
}

/// The name of a client or a site, trimmed.
pub(crate) fn name() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(format!(
            "1 to {} characters once surrounding white space is trimmed",
            super::hierarchy::NAME_MAX
        )))
        .pattern(Some(not_blank_pattern()))
        .max_length(Some(super::hierarchy::NAME_MAX))
        .build()
}

/// Any text but white space only, which is trimmed.
pub(crate) fn not_blank() -> Object {
    with_pattern(
        "Not empty once surrounding white space is trimmed",
        &not_blank_pattern(),
    )
}

/// How long a maintenance window stays open, in one unit, 1 minute to 7 days.
pub(crate) fn window_duration() -> Object {
    with_pattern(
        "`90m`, `3h` or `2d`: 1 minute to 7 days",
        &trimmed("([1-9][0-9]{0,3}m|[1-9][0-9]?h|[1-7]d)"),
    )
}

pub(crate) fn time_of_day() -> Object {
    with_pattern("`HH:MM`", &trimmed("([01][0-9]|2[0-3]):[0-5][0-9]"))
}

/// The days a window opens: at least one.
pub(crate) fn days() -> Array {
    ArrayBuilder::new()
        .items(string_enum(crate::maintenance::DAY_NAMES))
        .min_items(Some(1))
        .build()
}

/// The time zones the server knows, as `jiff` names them.
pub(crate) fn time_zone() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(
            "An IANA time zone name, such as `Europe/Berlin` or `UTC`",
        ))
        .enum_values(Some(crate::maintenance::time_zones()))
        .build()
}

pub(crate) fn bake() -> Object {
    with_pattern(
        "A duration in one unit, such as `90s`, `10m` or `1h`",
        &trimmed("[0-9]{1,6}(ms|s|m|h|d)"),
    )
}

pub(crate) fn nullable_bake() -> Object {
    ObjectBuilder::from(bake())
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .build()
}

/// Cumulative wave shares; that they grow and end at 100% the detail of a 400 says.
pub(crate) fn nullable_waves() -> Array {
    let share = with_pattern(
        "A percentage over 0 and at most 100 (`10%`) or a count of agents (`50`); \
         wave shares are cumulative and must grow, and the last is 100%",
        &trimmed(&format!(
            r"((100|[1-9][0-9]?(\.[0-9]{{1,2}})?|0\.([1-9][0-9]?|0[1-9]))[{WHITE_SPACE}]*%|[1-9][0-9]{{0,8}})"
        )),
    );
    ArrayBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
        .items(share)
        .min_items(Some(1))
        .build()
}

/// A download mirror's base URL, as `mirrors::check_base` takes it; null clears it.
pub(crate) fn mirror_url() -> Object {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .description(Some(
            "`http` or `https` with a host name or IPv4 address, no credentials, query or fragment",
        ))
        .pattern(Some(trimmed(
            concat!(
                r"https?://",
                // A host name whose labels start with a letter, or an IPv4 address.
                r"([A-Za-z][A-Za-z0-9]*(-[A-Za-z0-9]+)*(\.[A-Za-z][A-Za-z0-9]*(-[A-Za-z0-9]+)*)*",
                r"|(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3})",
                r"(:[0-9]{1,4})?(/[A-Za-z0-9._~!$&'()*+,;=:@/-]*)?",
            ),
        )))
        .max_length(Some(crate::mirrors::MAX_URL_BYTES))
        .build()
}
