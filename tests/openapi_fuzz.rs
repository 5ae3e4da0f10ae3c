//! Property-based fuzzing of the REST API against its own OpenAPI document: requests
//! generated from `/api/v1/openapi.json` of a real `drover-server`, valid ones and ones
//! that break the schema, must get only documented statuses with documented bodies, no
//! 5xx, and a valid request is never refused as malformed (the document is exactly as
//! strict as the server), nor an invalid one accepted.

mod support;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, Union};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use reqwest::blocking::Client;
use serde_json::{Value, json};
use support::*;

/// Requests per operation. About 50 operations; each request is a loopback round trip.
const CASES: u32 = 48;

/// Rules that JSON Schema cannot state, which the document says in words (the
/// description of `waves`): a schema-valid request may be refused with 400 for these,
/// and the detail says which.
const STATED_IN_WORDS: [&str; 2] = [
    "wave shares are cumulative and must grow",
    "it must be 100%, so that every target is reached",
];

/// The document, to resolve `$ref`s and validate against its schemas, with each
/// schema's validator built once.
struct Doc(Value, RefCell<HashMap<String, Rc<jsonschema::Validator>>>);

impl Doc {
    /// The schema `schema` refers to, or itself.
    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(reference) => {
                let name = reference.trim_start_matches("#/components/schemas/");
                let target = &self.0["components"]["schemas"][name];
                assert!(target.is_object(), "{reference} is not in the document");
                self.resolve(target)
            }
            None => schema,
        }
    }

    /// Whether `value` is valid against `schema`, a schema of the document; the error
    /// says why not.
    fn validate(&self, schema: &Value, value: &Value) -> Result<(), String> {
        let key = schema.to_string();
        let cached = self.1.borrow().get(&key).cloned();
        let validator = match cached {
            Some(validator) => validator,
            None => {
                let root = json!({
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "allOf": [schema],
                    "components": self.0["components"],
                });
                let validator = jsonschema::draft202012::options()
                    .build(&root)
                    .map_err(|e| format!("the schema {schema} does not compile: {e}"))?;
                let validator = Rc::new(validator);
                self.1.borrow_mut().insert(key, validator.clone());
                validator
            }
        };
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Location {
    Path,
    Query,
}

#[derive(Debug, Clone)]
struct Param {
    name: String,
    location: Location,
    required: bool,
    schema: Value,
}

/// One documented operation.
#[derive(Debug, Clone)]
struct Operation {
    method: String,
    path: String,
    spec: Value,
    params: Vec<Param>,
    /// The JSON body's schema, and whether the body is required.
    body: Option<(Value, bool)>,
    /// The scheme of its security requirement; `None` for an open operation.
    scheme: Option<String>,
    /// The least role it needs, per its requirement's scopes.
    role: Option<String>,
}

fn operations(doc: &Doc) -> Vec<Operation> {
    let mut found = Vec::new();
    for (path, item) in doc.0["paths"].as_object().expect("paths") {
        for (method, spec) in item.as_object().expect("path item") {
            if !["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            let params = spec["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| Param {
                    name: p["name"].as_str().unwrap().to_owned(),
                    location: match p["in"].as_str() {
                        Some("path") => Location::Path,
                        Some("query") => Location::Query,
                        other => panic!("{method} {path}: parameter in {other:?}"),
                    },
                    required: p["required"] == true,
                    schema: p["schema"].clone(),
                })
                .collect();
            let body = spec["requestBody"].as_object().map(|body| {
                let schema = body["content"]["application/json"]["schema"].clone();
                assert!(
                    schema.is_object(),
                    "{method} {path}: a body that is not JSON"
                );
                (schema, body.get("required") == Some(&Value::Bool(true)))
            });
            let requirement = spec["security"]
                .as_array()
                .and_then(|requirements| requirements.first())
                .and_then(Value::as_object)
                .and_then(|requirement| requirement.iter().next());
            let scheme = requirement.map(|(scheme, _)| scheme.clone());
            let role = requirement
                .and_then(|(_, scopes)| scopes[0].as_str())
                .map(str::to_owned);
            found.push(Operation {
                method: method.to_uppercase(),
                path: path.clone(),
                spec: spec.clone(),
                params,
                body,
                scheme,
                role,
            });
        }
    }
    found
}

#[derive(Debug, Clone)]
enum Auth {
    /// The token the operation's scheme asks for.
    Proper,
    /// A viewer's API token: too little for an operation that needs more.
    Viewer,
    Missing,
    Unknown,
}

#[derive(Debug, Clone)]
enum Body {
    Absent,
    Json(Value),
    /// JSON sent as `text/plain`.
    NotJson(Value),
}

#[derive(Debug, Clone)]
struct Request {
    path: Vec<(String, Value)>,
    query: Vec<(String, Value)>,
    body: Body,
    auth: Auth,
}

/// Values the server knows (ids of its records, its builds' versions), which the
/// generator mixes in so that requests reach more than "not found".
#[derive(Debug, Default)]
struct Known(BTreeMap<String, Vec<String>>);

impl Known {
    fn add(&mut self, name: &str, value: impl Into<String>) {
        self.0
            .entry(name.to_owned())
            .or_default()
            .push(value.into());
    }

    fn strings(&self, name: &str) -> Vec<Value> {
        self.0
            .get(name)
            .into_iter()
            .flatten()
            .map(|v| Value::String(v.clone()))
            .collect()
    }
}

/// Strings that are often, but not always, what a field wants.
fn some_string() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => "[a-z0-9][a-z0-9.-]{0,11}",
        1 => Just(String::new()),
        1 => Just("  ".to_owned()),
        1 => "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}(-rc\\.[0-9])?",
        1 => prop::sample::select(vec!["stable", "beta", "linux", "amd64", "10m", "1,10,100"])
            .prop_map(str::to_owned),
        1 => "[ -~]{0,30}",
        1 => "\\PC{1,12}",
        1 => Just("x".repeat(201)),
    ]
    .prop_map(Value::String)
    .boxed()
}

/// Values mostly valid against `schema`, now and then just outside it.
fn value_for(
    doc: &Doc,
    schema: &Value,
    known: &[Value],
    names: &Known,
    depth: u32,
) -> BoxedStrategy<Value> {
    let schema = doc.resolve(schema);
    if let Some(branches) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
        let branches: Vec<_> = branches
            .iter()
            .map(|b| value_for(doc, b, known, names, depth))
            .collect();
        return Union::new(branches).boxed();
    }
    // The first part of an `allOf` carries the shape; the rest narrow it (the
    // validator, not the generator, judges them).
    if let Some(first) = schema["allOf"].as_array().and_then(|parts| parts.first()) {
        return value_for(doc, first, known, names, depth);
    }
    if let Some(values) = schema["enum"].as_array() {
        return prop_oneof![
            6 => prop::sample::select(values.clone()),
            1 => some_string(),
        ]
        .boxed();
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    if types.is_empty() {
        return prop_oneof![Just(json!({})), Just(Value::Null)].boxed();
    }
    let mut choices: Vec<BoxedStrategy<Value>> = Vec::new();
    for kind in types {
        choices.push(match kind {
            "null" => Just(Value::Null).boxed(),
            "boolean" => any::<bool>().prop_map(Value::Bool).boxed(),
            "integer" | "number" => integer(schema),
            "string" => string(schema, known),
            "array" if depth < 3 => prop::collection::vec(
                value_for(doc, &schema["items"], known, names, depth + 1),
                0..3,
            )
            .prop_map(Value::Array)
            .boxed(),
            "object" if depth < 3 => object(doc, schema, names, depth),
            _ => Just(Value::Null).boxed(),
        });
    }
    Union::new(choices).boxed()
}

fn integer(schema: &Value) -> BoxedStrategy<Value> {
    let min = schema["minimum"].as_i64();
    let max = schema["maximum"].as_i64();
    let low = min.unwrap_or(-5);
    let high = max.unwrap_or(low.saturating_add(10_000)).max(low);
    let edges: Vec<i64> = [
        Some(0),
        Some(-1),
        Some(1),
        min.map(|m| m - 1),
        max.map(|m| m + 1),
        Some(i64::MAX),
    ]
    .into_iter()
    .flatten()
    .collect();
    prop_oneof![
        5 => (low..=high).prop_map(Value::from),
        1 => prop::sample::select(edges).prop_map(Value::from),
    ]
    .boxed()
}

fn string(schema: &Value, known: &[Value]) -> BoxedStrategy<Value> {
    let mut choices = vec![(2, some_string())];
    if let Some(pattern) = schema["pattern"].as_str() {
        let bare = pattern.trim_start_matches('^').trim_end_matches('$');
        if let Ok(strategy) = proptest::string::string_regex(bare) {
            choices.push((6, strategy.prop_map(Value::String).boxed()));
        }
    }
    if !known.is_empty() {
        choices.push((6, prop::sample::select(known.to_vec()).boxed()));
    }
    Union::new_weighted(choices).boxed()
}

fn object(doc: &Doc, schema: &Value, names: &Known, depth: u32) -> BoxedStrategy<Value> {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = schema["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, property)| {
            let name = name.clone();
            let value = value_for(doc, property, &names.strings(&name), names, depth + 1);
            let weight_absent = if required.contains(&name.as_str()) {
                1
            } else {
                4
            };
            prop_oneof![
                weight_absent => Just(None),
                12 => value.prop_map(move |v| Some((name.clone(), v))),
            ]
            .boxed()
        })
        .collect();
    let stray = prop_oneof![
        15 => Just(None),
        1 => Just(Some(("not_a_field".to_owned(), json!(1)))),
    ];
    (fields, stray)
        .prop_map(|(fields, stray)| {
            Value::Object(fields.into_iter().chain([stray]).flatten().collect())
        })
        .boxed()
}

/// Requests for `op`: mostly valid ones with known values, some breaking the schema.
fn requests(doc: &Doc, op: &Operation, known: &Known) -> BoxedStrategy<Request> {
    let path: Vec<BoxedStrategy<(String, Value)>> = op
        .params
        .iter()
        .filter(|p| p.location == Location::Path)
        .map(|p| {
            let name = p.name.clone();
            let known = known.strings(&format!("{} {}", op.path, p.name));
            value_for(doc, &p.schema, &known, &Known::default(), 0)
                .prop_map(move |v| (name.clone(), v))
                .boxed()
        })
        .collect();
    let query: Vec<BoxedStrategy<Option<(String, Value)>>> = op
        .params
        .iter()
        .filter(|p| p.location == Location::Query)
        .map(|p| {
            let name = p.name.clone();
            let known = known.strings(&p.name);
            let value = value_for(doc, &p.schema, &known, &Known::default(), 0);
            let absent = if p.required { 1 } else { 3 };
            prop_oneof![
                absent => Just(None),
                4 => value.prop_map(move |v| Some((name.clone(), v))),
            ]
            .boxed()
        })
        .collect();
    let body: BoxedStrategy<Body> = match &op.body {
        None => Just(Body::Absent).boxed(),
        Some((schema, _)) => {
            let value = value_for(doc, schema, &[], known, 0);
            prop_oneof![
                10 => value.clone().prop_map(Body::Json),
                1 => Just(Body::Absent),
                1 => prop_oneof![
                    Just(json!([])),
                    Just(json!(["x", "viewer"])),
                    Just(json!(7)),
                    Just(json!("text")),
                ]
                .prop_map(Body::Json),
                1 => value.prop_map(Body::NotJson),
            ]
            .boxed()
        }
    };
    let auth = if op.scheme.is_some() {
        prop_oneof![
            12 => Just(Auth::Proper),
            1 => Just(Auth::Viewer),
            1 => Just(Auth::Missing),
            1 => Just(Auth::Unknown),
        ]
        .boxed()
    } else {
        Just(Auth::Proper).boxed()
    };
    (path, query, body, auth)
        .prop_map(|(path, query, body, auth)| Request {
            path,
            query: query.into_iter().flatten().collect(),
            body,
            auth,
        })
        .boxed()
}

/// Why `request` breaks the document, if it does.
fn violation(doc: &Doc, op: &Operation, request: &Request) -> Option<String> {
    match (&request.auth, op.scheme.as_deref(), op.role.as_deref()) {
        (Auth::Proper, _, _) => {}
        // A viewer's token is enough for what viewers may do.
        (Auth::Viewer, Some("bearer"), Some("viewer")) => {}
        (auth, _, _) => return Some(format!("authentication {auth:?}")),
    }
    for param in &op.params {
        let given = match param.location {
            Location::Path => &request.path,
            Location::Query => &request.query,
        };
        match given.iter().find(|(name, _)| *name == param.name) {
            Some((_, value)) => {
                if let Err(why) = doc.validate(&param.schema, value) {
                    return Some(format!("parameter {}: {why}", param.name));
                }
            }
            None if param.required => return Some(format!("{} is missing", param.name)),
            None => {}
        }
    }
    match (&op.body, &request.body) {
        (None, _) => None,
        (Some((_, required)), Body::Absent) => required.then(|| "no body".to_owned()),
        (Some(_), Body::NotJson(_)) => Some("the body is not sent as JSON".to_owned()),
        (Some((schema, _)), Body::Json(value)) => doc
            .validate(schema, value)
            .err()
            .map(|why| format!("body: {why}")),
    }
}

/// A parameter as the URL carries it.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Percent-encodes a path segment.
fn segment(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

struct Fuzzer {
    server: Server,
    http: Client,
    doc: Doc,
    /// A viewer's API token, never revoked by the fuzzer (its id is not offered).
    viewer: String,
    /// The statuses each operation answered, to show what the run reached.
    seen: RefCell<BTreeMap<String, BTreeMap<u16, u32>>>,
}

impl Fuzzer {
    fn token(&self, scheme: &str) -> &'static str {
        match scheme {
            "enrollment_token" => ENROLL_TOKEN,
            _ => ADMIN_TOKEN,
        }
    }

    /// Sends `request` for `op`; the status, the content type and the body.
    fn send(&self, op: &Operation, request: &Request) -> (u16, String, String) {
        let mut path = op.path.clone();
        for (name, value) in &request.path {
            path = path.replace(&format!("{{{name}}}"), &segment(&text(value)));
        }
        let method = reqwest::Method::from_bytes(op.method.as_bytes()).unwrap();
        let query: Vec<(String, String)> = request
            .query
            .iter()
            .map(|(name, value)| (name.clone(), text(value)))
            .collect();
        let mut call = self
            .http
            .request(method, format!("{}{path}", self.server.url))
            .query(&query);
        match (&request.auth, &op.scheme) {
            (Auth::Proper, Some(scheme)) => call = call.bearer_auth(self.token(scheme)),
            (Auth::Viewer, Some(_)) => call = call.bearer_auth(&self.viewer),
            (Auth::Unknown, _) => call = call.bearer_auth("drv_no_such_token_0123456789abcdef"),
            _ => {}
        }
        match &request.body {
            Body::Absent => {}
            Body::Json(value) => call = call.json(value),
            Body::NotJson(value) => {
                call = call
                    .header("content-type", "text/plain")
                    .body(value.to_string())
            }
        }
        let response = call.send().expect("the server answers");
        let status = response.status().as_u16();
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        // An event stream does not end; its status and type are what is checked.
        let body = if kind.starts_with("text/event-stream") {
            String::new()
        } else {
            response.text().expect("the body is read")
        };
        (status, kind, body)
    }

    /// Checks one exchange against the document.
    fn check(&self, op: &Operation, request: &Request) -> Result<(), String> {
        let (status, kind, body) = self.send(op, request);
        *self
            .seen
            .borrow_mut()
            .entry(format!("{} {}", op.method, op.path))
            .or_default()
            .entry(status)
            .or_default() += 1;
        let violation = violation(&self.doc, op, request);
        let what = format!(
            "{} {} with {request:?} ({}) answered {status} {body}",
            op.method,
            op.path,
            violation.as_deref().unwrap_or("valid per the document")
        );
        if status >= 500 {
            return Err(format!("a server error: {what}"));
        }
        let responses = &op.spec["responses"];
        let documented = &responses[status.to_string()];
        if !documented.is_object() {
            return Err(format!("an undocumented status: {what}"));
        }
        match &documented["content"] {
            Value::Object(content) if content.contains_key("application/json") => {
                if !kind.starts_with("application/json") {
                    return Err(format!(
                        "a {kind:?} answer where JSON is documented: {what}"
                    ));
                }
                let value: Value =
                    serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {what}"))?;
                let schema = &content["application/json"]["schema"];
                self.doc
                    .validate(schema, &value)
                    .map_err(|why| format!("the body is not as documented ({why}): {what}"))?;
                if status >= 400 {
                    let fields: Vec<&String> = value.as_object().unwrap().keys().collect();
                    if fields != ["detail", "error"] || !value["error"].is_string() {
                        return Err(format!("not the error shape: {what}"));
                    }
                }
            }
            Value::Object(content) => {
                let documented_kind = content.keys().next().unwrap();
                if !kind.starts_with(documented_kind.as_str()) {
                    return Err(format!(
                        "a {kind:?} answer, documented {documented_kind}: {what}"
                    ));
                }
            }
            _ => {
                if !body.is_empty() {
                    return Err(format!("a body where none is documented: {what}"));
                }
            }
        }
        match violation {
            // Exactly as strict: a request the document allows is not refused for its
            // form; not found, conflicts and limits depend on the server's state.
            None => {
                let in_words =
                    status == 400 && STATED_IN_WORDS.iter().any(|rule| body.contains(rule));
                let refused = (matches!(status, 400 | 403 | 413 | 415 | 422) && !in_words)
                    || (status == 401 && op.scheme.is_some());
                if refused {
                    return Err(format!("a valid request refused: {what}"));
                }
            }
            Some(_) => {
                if (200..300).contains(&status) {
                    return Err(format!("an invalid request accepted: {what}"));
                }
            }
        }
        Ok(())
    }

    fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut call = self
            .http
            .request(method, format!("{}/api/v1{path}", self.server.url))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            call = call.json(&body);
        }
        let response = call.send().unwrap();
        let status = response.status();
        let value: Value = response.json().unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {value}");
        value
    }
}

/// Records of every kind for the fuzzer to find: a client, a site, an agent, builds, a
/// rollout, tokens. Their ids are keyed by the documented path and parameter.
fn populate(fuzzer: &Fuzzer, agent_id: &str) -> Known {
    let mut known = Known::default();
    let client = fuzzer.admin("POST", "/clients", Some(json!({ "name": "fuzz-client" })));
    let client = client["id"].as_str().unwrap().to_owned();
    let site = fuzzer.admin(
        "POST",
        "/sites",
        Some(json!({ "client_id": client, "name": "fuzz-site" })),
    );
    let site = site["id"].as_str().unwrap().to_owned();
    let token = fuzzer.admin(
        "POST",
        "/tokens",
        Some(json!({ "name": "fuzz", "role": "viewer" })),
    );
    let enrollment = fuzzer.admin("POST", &format!("/sites/{site}/enrollment-tokens"), None);
    fuzzer.admin("POST", "/releases/rescan", None);
    let rollout = fuzzer.admin(
        "POST",
        "/rollouts",
        Some(json!({ "version": "1.2.0", "selector": { "agent_ids": [agent_id] } })),
    );
    let rollout = rollout["id"].as_str().unwrap().to_owned();
    for op in operations(&fuzzer.doc) {
        let path = &op.path;
        let ids: Vec<String> = if path.starts_with("/api/v1/agents/") {
            vec![agent_id.to_owned()]
        } else if path.starts_with("/api/v1/sites/") {
            vec![site.clone()]
        } else if path.starts_with("/api/v1/clients/") {
            vec![client.clone()]
        } else if path.starts_with("/api/v1/tokens/") {
            vec![token["id"].as_str().unwrap().to_owned()]
        } else if path.starts_with("/api/v1/enrollment-tokens/") {
            vec![enrollment["id"].as_str().unwrap().to_owned()]
        } else if path.starts_with("/api/v1/releases/files/") {
            vec![
                "drover-agent-linux-amd64-1.1.0".to_owned(),
                "drover-agent-linux-amd64-1.2.0.sha256".to_owned(),
            ]
        } else if path.starts_with("/api/v1/rollouts/") {
            vec![rollout.clone(), "1.2.0".to_owned(), "1.1.0".to_owned()]
        } else {
            vec![]
        };
        for param in op.params.iter().filter(|p| p.location == Location::Path) {
            for id in &ids {
                known.add(&format!("{path} {}", param.name), id.clone());
            }
        }
    }
    for (name, value) in [
        ("site", site.as_str()),
        ("version", "1.0.0"),
        ("older_than", "1.2.0"),
        ("os", "linux"),
        ("arch", "amd64"),
        ("q", "fuzz"),
        ("action", "rollout.create"),
        // Body fields.
        ("client_id", client.as_str()),
        ("site_id", site.as_str()),
        ("agent_ids", agent_id),
        ("version", "1.2.0"),
        ("running", "1.0.0"),
        ("token", ADMIN_TOKEN),
        ("url", "https://mirror.example.com/drover"),
    ] {
        known.add(name, value);
    }
    known
}

#[test]
fn requests_from_the_document_get_documented_answers() {
    let dir = tempfile::tempdir().unwrap();
    publish(
        &dir.path().join("downloads"),
        "1.1.0",
        None,
        b"stable build",
    );
    publish(
        &dir.path().join("downloads"),
        "1.2.0",
        Some("beta"),
        b"beta build",
    );
    let server = Server::start(dir.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // An agent that stays connected for the whole run.
    let agent = runtime.block_on(ProtocolAgent::enroll(&server, "fuzz-fp", "1.0.0"));
    let http = Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let doc: Value = http
        .get(format!("{}/api/v1/openapi.json", server.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let mut fuzzer = Fuzzer {
        server,
        http,
        doc: Doc(doc, RefCell::default()),
        viewer: String::new(),
        seen: RefCell::default(),
    };
    let viewer = fuzzer.admin(
        "POST",
        "/tokens",
        Some(json!({ "name": "fuzz-viewer", "role": "viewer" })),
    );
    fuzzer.viewer = viewer["token"].as_str().unwrap().to_owned();
    let known = populate(&fuzzer, &agent.id);

    // Destructive operations last: a revoked token or a rolled-back build changes what
    // the others find, not whether their answers are documented.
    let mut operations = operations(&fuzzer.doc);
    operations.sort_by_key(|op| (op.method == "DELETE", op.path.contains("/rollouts/")));
    assert!(operations.len() > 40, "{} operations", operations.len());
    let mut failures = Vec::new();
    for op in &operations {
        let config = Config {
            cases: CASES,
            failure_persistence: None,
            max_shrink_iters: 64,
            ..Config::default()
        };
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
        let mut runner = TestRunner::new_with_rng(config, rng);
        let strategy = requests(&fuzzer.doc, op, &known);
        let result = runner.run(&strategy, |request| {
            fuzzer.check(op, &request).map_err(TestCaseError::fail)
        });
        if let Err(failure) = result {
            failures.push(format!("{} {}: {failure}", op.method, op.path));
        }
    }
    drop(agent);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // Generation that reached only refusals would prove little: most operations must
    // also have succeeded.
    let seen = fuzzer.seen.borrow();
    let succeeded = seen
        .values()
        .filter(|statuses| statuses.keys().any(|s| (200..300).contains(s)))
        .count();
    let never: Vec<&String> = seen
        .iter()
        .filter(|(_, statuses)| !statuses.keys().any(|s| (200..300).contains(s)))
        .map(|(op, _)| op)
        .collect();
    println!("answers: {seen:?}\nnever succeeded: {never:?}");
    assert!(
        succeeded * 10 >= seen.len() * 8,
        "only {succeeded} of {} operations ever succeeded: {seen:#?}",
        seen.len()
    );
}
