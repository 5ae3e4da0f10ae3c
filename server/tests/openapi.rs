//! The OpenAPI document against the server that serves it: every documented operation is
//! routed with the documented authentication, no other method is routed on a documented
//! path, and real answers have the documented shapes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use server::Settings;
use server::store::{AgentFacts, Bootstrap, Enrolled, Enrollment, LiveSince, Queries, SqliteStore};

/// No record counts as live: every enrollment of a known machine re-binds it.
const NONE_LIVE: LiveSince = LiveSince {
    node_beat_ms: i64::MAX,
    seen_ms: i64::MAX,
};

/// The enrollment that happened; a conflict where none is expected fails the test.
fn enrolled(enrollment: Enrollment) -> Enrolled {
    match enrollment {
        Enrollment::Enrolled(enrolled) => enrolled,
        Enrollment::Conflict { agent_id, .. } => panic!("unexpected conflict with {agent_id}"),
    }
}

const ADMIN_TOKEN: &str = "openapi-test-admin";
const ENROLL_TOKEN: &str = "openapi-test-enroll";
const BUILD: &str = "drover-agent-linux-amd64-1.2.0";

/// Methods a documented path is probed with.
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

/// Served under `/api/v1` but deliberately not in the document: the agent WebSocket is
/// not a REST endpoint (MessagePack frames after an upgrade).
const NOT_REST: [(&str, &str); 1] = [("GET", "/api/v1/agent/ws")];

struct TestServer {
    base: String,
    /// The id of an enrolled agent, which never connects.
    agent: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// A server on port 0 with a SQLite store, a known admin token, one enrolled agent,
    /// and one beta build and one stray file in its downloads directory.
    async fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let downloads = dir.path().join("downloads");
        std::fs::create_dir(&downloads).unwrap();
        let build = b"not really an agent";
        std::fs::write(downloads.join(BUILD), build).unwrap();
        std::fs::write(
            downloads.join(format!("{BUILD}.sha256")),
            hex::encode(Sha256::digest(build)),
        )
        .unwrap();
        std::fs::write(downloads.join(format!("{BUILD}.channel")), "beta\n").unwrap();
        std::fs::write(downloads.join("notes.txt"), "not a build").unwrap();

        let store = SqliteStore::open(&dir.path().join("drover.db"))
            .await
            .unwrap();
        store
            .bootstrap(&Bootstrap {
                admin_token_hash: Some(hash(ADMIN_TOKEN)),
                enroll_token_hash: Some(hash(ENROLL_TOKEN)),
                enroll_token_expires_at_ms: None,
            })
            .await
            .unwrap();
        let facts = AgentFacts {
            fingerprint: "fp-1".into(),
            hostname: "one".into(),
            version: "1.0.0".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            auto_update: true,
        };
        let agent = store
            .enroll(
                &hash(ENROLL_TOKEN),
                &facts,
                &hash("agent secret"),
                1_000,
                NONE_LIVE,
            )
            .await
            .map(enrolled)
            .unwrap()
            .agent_id;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::run(
            Arc::new(store),
            Settings::new(base.clone(), downloads),
            listener,
            shutdown.clone(),
        ));
        TestServer {
            base,
            agent,
            http: reqwest::Client::new(),
            shutdown,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        // Not every route answers JSON (the WebSocket's refusal is plain text); a JSON
        // answer that should have been is caught by the schema check.
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    async fn document(&self) -> Value {
        let (status, doc) = self.call("GET", "/api/v1/openapi.json", None, None).await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        doc
    }
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Every (method, path template) the document describes.
fn operations(doc: &Value) -> BTreeMap<(String, String), Value> {
    let mut found = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            if METHODS.contains(&method.to_uppercase().as_str()) {
                found.insert((method.to_uppercase(), path.clone()), operation.clone());
            }
        }
    }
    found
}

/// The path with placeholders for its parameters and for required query parameters.
fn concrete(path: &str, operation: &Value) -> String {
    let mut concrete = path
        .split('/')
        .map(|segment| {
            if segment.starts_with('{') && segment.ends_with('}') {
                "placeholder"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/");
    let query: Vec<String> = operation["parameters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["in"] == "query" && p["required"] == true)
        .map(|p| format!("{}=placeholder", p["name"].as_str().unwrap()))
        .collect();
    if !query.is_empty() {
        concrete = format!("{concrete}?{}", query.join("&"));
    }
    concrete
}

fn is_api_fallback(status: StatusCode, body: &Value) -> bool {
    status == StatusCode::NOT_FOUND && body["detail"] == "no such endpoint"
}

#[tokio::test]
async fn the_document_describes_exactly_the_routes_served() {
    let server = TestServer::start().await;
    let doc = server.document().await;
    let operations = operations(&doc);
    assert!(operations.len() > 20, "{operations:?}");

    for ((method, path), operation) in &operations {
        assert!(path.starts_with("/api/v1/"), "{path} is outside the API");
        let url = concrete(path, operation);
        let (status, body) = server.call(method, &url, None, None).await;
        // Without a token, a routed operation that needs one answers 401, which proves it
        // is routed and that its documented authentication is the real one.
        let expected = if operation["security"].is_array() {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        assert_eq!(status, expected, "{method} {url}: {body}");
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(body["error"], "unauthorized", "{method} {url}: {body}");
        }
    }

    let paths: BTreeSet<&String> = operations.keys().map(|(_, path)| path).collect();
    for path in paths {
        for method in METHODS {
            let key = (method.to_owned(), path.clone());
            if operations.contains_key(&key) {
                continue;
            }
            let url = concrete(path, &Value::Null);
            let (status, body) = server.call(method, &url, None, None).await;
            assert!(
                status == StatusCode::METHOD_NOT_ALLOWED || is_api_fallback(status, &body),
                "{method} {url} is served ({status}: {body}) but not documented"
            );
        }
    }

    for (method, path) in NOT_REST {
        assert!(
            !operations.contains_key(&(method.to_owned(), path.to_owned())),
            "{method} {path} is documented; take it off NOT_REST"
        );
        let (status, body) = server.call(method, path, None, None).await;
        assert!(
            !is_api_fallback(status, &body) && status != StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path} is not served any more ({status}: {body}); take it off NOT_REST"
        );
    }

    let (status, body) = server
        .call("GET", "/api/v1/no-such-thing", None, None)
        .await;
    assert!(is_api_fallback(status, &body), "{status}: {body}");
    server.stop().await;
}

fn response<'a>(doc: &'a Value, method: &str, path: &str, status: &str) -> &'a Value {
    let response = &doc["paths"][path][method]["responses"][status];
    assert!(
        response.is_object(),
        "{method} {path} documents no {status} answer"
    );
    response
}

fn response_schema<'a>(doc: &'a Value, method: &str, path: &str, status: &str) -> &'a Value {
    &response(doc, method, path, status)["content"]["application/json"]["schema"]
}

#[tokio::test]
async fn key_operations_document_their_answers_and_auth() {
    let server = TestServer::start().await;
    let doc = server.document().await;
    server.stop().await;

    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3."), "{version}");
    let schemes = &doc["components"]["securitySchemes"];
    for scheme in ["bearer", "enrollment_token"] {
        assert_eq!(schemes[scheme]["type"], "http", "{scheme}");
        assert_eq!(schemes[scheme]["scheme"], "bearer", "{scheme}");
    }

    let error = json!({ "$ref": "#/components/schemas/ErrorBody" });
    let promote = "/api/v1/rollouts/{version}/promote";
    assert_eq!(
        response_schema(&doc, "post", promote, "200"),
        &json!({ "$ref": "#/components/schemas/Promoted" })
    );
    for status in ["400", "401", "403", "404", "409"] {
        assert_eq!(response_schema(&doc, "post", promote, status), &error);
    }
    assert_eq!(
        doc["paths"][promote]["post"]["security"],
        json!([{ "bearer": ["operator"] }])
    );
    let parameters = &doc["paths"][promote]["post"]["parameters"];
    assert_eq!(parameters[0]["name"], "version");
    assert_eq!(parameters[0]["in"], "path");
    assert_ne!(
        doc["paths"][promote]["post"]["requestBody"]["required"], true,
        "promote's body may be left out"
    );

    let agent = "/api/v1/agents/{id}";
    assert_eq!(
        response_schema(&doc, "get", agent, "200"),
        &json!({ "$ref": "#/components/schemas/Agent" })
    );
    assert_eq!(response_schema(&doc, "get", agent, "404"), &error);
    assert_eq!(
        doc["paths"][agent]["get"]["security"],
        json!([{ "bearer": ["viewer"] }])
    );
    assert_eq!(
        response_schema(&doc, "post", "/api/v1/agents/{id}/update", "409"),
        &error
    );
    assert_eq!(
        doc["paths"]["/api/v1/agent/install"]["get"]["security"],
        json!([{ "enrollment_token": [] }])
    );
    assert_eq!(
        doc["paths"]["/api/v1/tokens"]["post"]["security"],
        json!([{ "bearer": ["admin"] }])
    );

    let operations = operations(&doc);
    let ids: Vec<&str> = operations
        .values()
        .map(|op| op["operationId"].as_str().expect("operationId"))
        .collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "operation ids repeat: {ids:?}");
}

/// Whether `value` has the shape `schema` documents: every required property present,
/// no undocumented property, and JSON types as declared. Enough to catch a renamed or
/// added field, which is what scripts and the CLI trip over.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        assert!(target.is_object(), "{reference} is not in the document");
        return check(doc, target, value, at);
    }
    if let Some(branches) = schema["oneOf"].as_array() {
        let errors: Vec<String> = branches
            .iter()
            .filter_map(|branch| check(doc, branch, value, at).err())
            .collect();
        return if errors.len() < branches.len() {
            Ok(())
        } else {
            Err(errors.join("; and "))
        };
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {allowed:?}"));
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => return Ok(()),
    };
    let actual = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let fits = types.contains(&actual) || (actual == "integer" && types.contains(&"number"));
    if !fits {
        return Err(format!(
            "{at}: {value} is {actual}, documented as {types:?}"
        ));
    }
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check(doc, &schema["items"], item, &format!("{at}[{i}]"))?;
            }
        }
        Value::Object(fields) => {
            let properties = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for required in schema["required"].as_array().into_iter().flatten() {
                let name = required.as_str().unwrap();
                if !fields.contains_key(name) {
                    return Err(format!("{at}: required field {name} is missing"));
                }
            }
            for (name, field) in fields {
                let Some(property) = properties.get(name) else {
                    return Err(format!("{at}: field {name} is not documented"));
                };
                check(doc, property, field, &format!("{at}.{name}"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// One request of the shapes test, and the documented answer it should get.
struct Call {
    method: &'static str,
    url: String,
    /// The documented path the URL is an instance of.
    path: String,
    token: Option<&'static str>,
    body: Option<Value>,
    status: &'static str,
}

fn as_admin(method: &'static str, url: impl Into<String>, status: &'static str) -> Call {
    let url = url.into();
    Call {
        method,
        path: url.split('?').next().unwrap().to_owned(),
        url,
        token: Some(ADMIN_TOKEN),
        body: None,
        status,
    }
}

impl Call {
    fn of(mut self, path: &str) -> Call {
        self.path = path.to_owned();
        self
    }

    fn body(mut self, body: Value) -> Call {
        self.body = Some(body);
        self
    }

    fn token(mut self, token: Option<&'static str>) -> Call {
        self.token = token;
        self
    }
}

#[tokio::test]
async fn answers_have_the_documented_shapes() {
    let server = TestServer::start().await;
    let doc = server.document().await;

    let (_, sites) = server
        .call("GET", "/api/v1/sites", Some(ADMIN_TOKEN), None)
        .await;
    let site = sites[0]["id"]
        .as_str()
        .expect("the default site")
        .to_owned();
    let agent = &server.agent;
    let calls = [
        as_admin("POST", "/api/v1/tokens", "201").body(json!({ "name": "ci", "role": "viewer" })),
        as_admin("GET", "/api/v1/tokens", "200"),
        as_admin("DELETE", "/api/v1/tokens/nothing", "404").of("/api/v1/tokens/{id}"),
        as_admin("POST", "/api/v1/clients", "201").body(json!({ "name": "acme" })),
        as_admin("POST", "/api/v1/clients", "409").body(json!({ "name": "acme" })),
        as_admin("GET", "/api/v1/clients", "200"),
        as_admin("GET", "/api/v1/sites", "200"),
        as_admin("PUT", format!("/api/v1/sites/{site}/channel"), "200")
            .of("/api/v1/sites/{id}/channel")
            .body(json!({ "channel": "beta" })),
        as_admin(
            "POST",
            format!("/api/v1/sites/{site}/enrollment-tokens"),
            "201",
        )
        .of("/api/v1/sites/{id}/enrollment-tokens")
        .body(json!({ "max_uses": 3 })),
        as_admin("GET", "/api/v1/agents", "200"),
        as_admin("GET", "/api/v1/agents", "401").token(None),
        as_admin("GET", format!("/api/v1/agents/{agent}"), "200").of("/api/v1/agents/{id}"),
        as_admin("GET", format!("/api/v1/agents/{agent}/explain"), "200")
            .of("/api/v1/agents/{id}/explain"),
        as_admin("POST", format!("/api/v1/agents/{agent}/pause"), "200")
            .of("/api/v1/agents/{id}/pause"),
        as_admin("POST", format!("/api/v1/agents/{agent}/resume"), "200")
            .of("/api/v1/agents/{id}/resume"),
        as_admin("PUT", format!("/api/v1/agents/{agent}/channel"), "200")
            .of("/api/v1/agents/{id}/channel")
            .body(json!({ "channel": null })),
        as_admin("PUT", "/api/v1/clients/nobody/channel", "404")
            .of("/api/v1/clients/{id}/channel")
            .body(json!({ "channel": "beta" })),
        as_admin("POST", format!("/api/v1/agents/{agent}/update"), "400")
            .of("/api/v1/agents/{id}/update")
            .body(json!({ "version": "soon" })),
        as_admin("PUT", "/api/v1/updates", "200").body(json!({ "enabled": false })),
        as_admin("POST", format!("/api/v1/agents/{agent}/update"), "409")
            .of("/api/v1/agents/{id}/update")
            .body(json!({ "version": "1.2.0" })),
        as_admin("PUT", "/api/v1/updates", "200").body(json!({ "enabled": true })),
        as_admin("POST", format!("/api/v1/agents/{agent}/update"), "202")
            .of("/api/v1/agents/{id}/update")
            .body(json!({ "version": "1.2.0" })),
        // Now with a task, active and listed.
        as_admin("GET", format!("/api/v1/agents/{agent}"), "200").of("/api/v1/agents/{id}"),
        as_admin("GET", format!("/api/v1/agents/{agent}/explain"), "200")
            .of("/api/v1/agents/{id}/explain"),
        as_admin("GET", "/api/v1/agents/nobody", "404").of("/api/v1/agents/{id}"),
        as_admin("GET", "/api/v1/releases", "200"),
        as_admin("GET", "/api/v1/releases?include=skipped", "200"),
        as_admin("GET", "/api/v1/releases?include=everything", "400"),
        as_admin("POST", "/api/v1/releases/rescan", "200"),
        as_admin("GET", "/api/v1/rollouts", "200"),
        // The beta build has no successes yet: the health gate refuses it.
        as_admin("POST", "/api/v1/rollouts/1.2.0/promote", "409")
            .of("/api/v1/rollouts/{version}/promote"),
        as_admin("POST", "/api/v1/rollouts/9.9.9/promote", "404")
            .of("/api/v1/rollouts/{version}/promote")
            .body(Value::Null),
        as_admin("POST", "/api/v1/rollouts/1.2.0/promote", "200")
            .of("/api/v1/rollouts/{version}/promote")
            .body(json!({ "force": true })),
        as_admin("POST", "/api/v1/rollouts/1.2.0/rollback", "200")
            .of("/api/v1/rollouts/{version}/rollback"),
        as_admin("POST", "/api/v1/rollouts/1.2.0/unblock", "200")
            .of("/api/v1/rollouts/{version}/unblock"),
        as_admin("POST", "/api/v1/rollouts/1.2.0/resume", "404").of("/api/v1/rollouts/{id}/resume"),
        as_admin("GET", "/api/v1/rollouts?state=running", "200"),
        as_admin("GET", "/api/v1/rollouts?state=sleeping", "400"),
        as_admin("GET", "/api/v1/rollouts/no-such-rollout", "404").of("/api/v1/rollouts/{id}"),
        as_admin("GET", "/api/v1/rollouts/no-such-rollout/agents", "404")
            .of("/api/v1/rollouts/{id}/agents"),
        as_admin("POST", "/api/v1/rollouts/no-such-rollout/pause", "404")
            .of("/api/v1/rollouts/{id}/pause"),
        as_admin("POST", "/api/v1/rollouts/no-such-rollout/advance", "404")
            .of("/api/v1/rollouts/{id}/advance"),
        as_admin("POST", "/api/v1/rollouts/no-such-rollout/abort", "404")
            .of("/api/v1/rollouts/{id}/abort"),
        as_admin("POST", "/api/v1/rollouts", "400")
            .body(json!({ "version": "1.2.0", "selector": {} })),
        as_admin("POST", "/api/v1/rollouts", "201")
            .body(json!({ "version": "1.2.0", "selector": { "agent_ids": [agent.clone()] } })),
        as_admin("GET", "/api/v1/updates", "200"),
        as_admin("PUT", "/api/v1/updates", "200").body(json!({ "enabled": true })),
        as_admin("GET", "/api/v1/agent/install?os=linux&arch=amd64", "200")
            .token(Some(ENROLL_TOKEN)),
        as_admin("GET", "/api/v1/agent/install", "400").token(Some(ENROLL_TOKEN)),
        as_admin("GET", "/api/v1/audit", "200"),
        as_admin("GET", "/api/v1/audit?limit=many", "400"),
    ];
    for call in calls {
        let (status, answer) = server
            .call(call.method, &call.url, call.token, call.body)
            .await;
        let (method, url) = (call.method, &call.url);
        assert_eq!(status.as_str(), call.status, "{method} {url}: {answer}");
        let schema = response_schema(&doc, &method.to_lowercase(), &call.path, call.status);
        if let Err(why) = check(&doc, schema, &answer, "answer") {
            panic!("{method} {url} answered {answer}, not as documented: {why}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn the_document_states_the_checks_the_server_makes() {
    let server = TestServer::start().await;
    let doc = server.document().await;
    server.stop().await;

    // Every operation with a body documents how a body is refused.
    for ((method, path), operation) in operations(&doc) {
        if operation["requestBody"].is_object() {
            for status in ["400", "413", "415"] {
                response(&doc, &method.to_lowercase(), &path, status);
            }
        }
    }
    let hours = &doc["paths"]["/api/v1/fleet/history"]["get"]["parameters"][0];
    assert_eq!(hours["name"], "hours");
    assert_eq!(hours["in"], "query");
    assert_ne!(hours["required"], true);
    assert_eq!(hours["schema"]["maximum"], 2160);
    for action in ["promote", "rollback", "unblock"] {
        let path = format!("/api/v1/rollouts/{{version}}/{action}");
        let version = &doc["paths"][path.as_str()]["post"]["parameters"][0];
        assert!(
            version["schema"]["pattern"].is_string(),
            "{path}: {version}"
        );
    }
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["NewClient"]["properties"]["name"]["pattern"].is_string());
    assert_eq!(schemas["NewClient"]["properties"]["name"]["maxLength"], 200);
    assert!(schemas["NewToken"]["properties"]["name"]["pattern"].is_string());
    assert_eq!(
        schemas["NewEnrollmentToken"]["properties"]["expires_in_secs"]["minimum"],
        1
    );
}
