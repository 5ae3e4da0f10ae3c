//! End-to-end: the dashboard against the real `drover-server`. The login cookie and its
//! CSRF guard over plain HTTP, the page and its assets, the event stream, and the page
//! itself in a headless Chromium driven over WebDriver.

mod support;

use std::time::Duration;

use protocol::{
    AgentMessage, FailureClass, MirrorFailure, Transfer, TransferKind, TransferSource,
    UpdateOutcome, UpdateProgress, UpdateResult, UpdateStage,
};
use serde_json::{Value, json};
use support::*;

/// A request to the server carrying the session cookie (or nothing), the way a browser
/// would send it.
struct Browserish {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
}

impl Browserish {
    fn new(server: &Server) -> Browserish {
        Browserish {
            base: server.url.clone(),
            http: reqwest::Client::new(),
            cookie: None,
        }
    }

    /// Logs in with `token`; returns the status, the body and the raw Set-Cookie header.
    async fn login(&mut self, token: &str) -> (u16, Value, Option<String>) {
        let response = self
            .http
            .post(format!("{}/api/v1/session", self.base))
            .json(&json!({ "token": token }))
            .send()
            .await
            .unwrap();
        let set_cookie = response
            .headers()
            .get(reqwest::header::SET_COOKIE)
            .map(|v| v.to_str().unwrap().to_owned());
        if let Some(set_cookie) = &set_cookie {
            self.cookie = Some(set_cookie.split(';').next().unwrap().to_owned());
        }
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(Value::Null),
            set_cookie,
        )
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header(reqwest::header::COOKIE, cookie);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// Agents enrolled through the protocol and kept online by a heartbeat every 300 ms
/// (the test server expects one a second) until this is dropped.
struct Online {
    ids: Vec<String>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Online {
    /// Enrolls one agent per `(hostname, version)`.
    async fn enroll(server: &Server, fleet: &[(&str, &str)]) -> Online {
        let mut agents = Vec::new();
        for (hostname, version) in fleet {
            agents.push(ProtocolAgent::enroll(server, hostname, version).await);
        }
        let ids = agents.iter().map(|a| a.id.clone()).collect();
        let keeper = tokio::spawn(async move {
            loop {
                for agent in &mut agents {
                    agent.heartbeat().await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Online { ids, keeper }
    }
}

impl Drop for Online {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

async fn create_token(server: &Server, name: &str, role: &str) -> String {
    let (status, body) = server
        .api()
        .post(
            "/api/v1/tokens",
            Some(json!({ "name": name, "role": role })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn login_sets_an_http_only_strict_cookie_and_logout_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let mut browser = Browserish::new(&server);

    let (status, body, set_cookie) = browser.login("not a token").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(set_cookie, None);
    browser.cookie = None;

    let (status, body, set_cookie) = browser.login(ADMIN_TOKEN).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "admin");
    let set_cookie = set_cookie.expect("login sets a cookie");
    let attributes: Vec<&str> = set_cookie.split(';').map(str::trim).collect();
    assert!(attributes[0].starts_with("drover_session="), "{set_cookie}");
    assert!(attributes.contains(&"HttpOnly"), "{set_cookie}");
    assert!(attributes.contains(&"SameSite=Strict"), "{set_cookie}");
    assert!(attributes.contains(&"Path=/"), "{set_cookie}");
    // Served over plain HTTP: a Secure cookie would never come back.
    assert!(!attributes.contains(&"Secure"), "{set_cookie}");
    assert!(
        !set_cookie.contains(ADMIN_TOKEN),
        "the cookie holds a session id, not the token: {set_cookie}"
    );

    let (status, who) = browser
        .call(reqwest::Method::GET, "/api/v1/session", &[])
        .await;
    assert_eq!(status, 200, "{who}");
    assert_eq!(who["role"], "admin");
    let (status, agents) = browser
        .call(reqwest::Method::GET, "/api/v1/agents", &[])
        .await;
    assert_eq!(status, 200, "{agents}");

    let response = reqwest::Client::new()
        .delete(format!("{}/api/v1/session", server.url))
        .header(reqwest::header::COOKIE, browser.cookie.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let cleared = response.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cleared.starts_with("drover_session=;"), "{cleared}");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
}

#[tokio::test]
async fn behind_a_tls_proxy_the_cookie_is_secure() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/session", server.url))
        .header("X-Forwarded-Proto", "https")
        .json(&json!({ "token": ADMIN_TOKEN }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let set_cookie = response.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap();
    assert!(
        set_cookie.split(';').any(|a| a.trim() == "Secure"),
        "{set_cookie}"
    );
}

#[tokio::test]
async fn cookie_requests_that_change_state_need_the_custom_header_and_the_role() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let operator = create_token(&server, "ops", "operator").await;
    let viewer = create_token(&server, "watcher", "viewer").await;
    let rescan = "/api/v1/releases/rescan";

    let mut browser = Browserish::new(&server);
    browser.login(&operator).await;
    // What a forged cross-site form post looks like: the cookie, and no custom header.
    let (status, body) = browser.call(reqwest::Method::POST, rescan, &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("X-Drover"),
        "{body}"
    );
    let (status, body) = browser
        .call(reqwest::Method::POST, rescan, &[("X-Drover", "1")])
        .await;
    assert_eq!(status, 200, "{body}");

    let mut browser = Browserish::new(&server);
    let (status, body, _) = browser.login(&viewer).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({ "role": "viewer", "name": "watcher" }));
    let (status, body) = browser
        .call(reqwest::Method::POST, rescan, &[("X-Drover", "1")])
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("operator"),
        "{body}"
    );
    let (status, _) = browser
        .call(reqwest::Method::GET, "/api/v1/rollouts", &[])
        .await;
    assert_eq!(status, 200);

    // A bearer token needs no custom header: scripts are not browsers.
    let (status, body) = Api::new(&server.url, &operator).post(rescan, None).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_with_a_strict_policy() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = reqwest::Client::new();
    for (path, kind, marker) in [
        ("/", "text/html", "/assets/app.js"),
        ("/assets/app.js", "text/javascript", "EventSource"),
        ("/assets/app.css", "text/css", "--accent"),
        ("/favicon.ico", "image/svg+xml", "<svg"),
    ] {
        let response = http
            .get(format!("{}{path}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
        let headers = response.headers().clone();
        assert!(
            headers["content-type"].to_str().unwrap().starts_with(kind),
            "{path}: {headers:?}"
        );
        let policy = headers["content-security-policy"].to_str().unwrap();
        assert!(policy.contains("script-src 'self'"), "{policy}");
        let text = response.text().await.unwrap();
        assert!(text.contains(marker), "{path}");
    }
}

#[tokio::test]
async fn the_agent_listing_filters_and_pages_and_stays_an_array_without_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let fleet = Online::enroll(
        &server,
        &[("web-1", "1.0.0"), ("web-2", "1.1.0"), ("db-1", "1.0.0")],
    )
    .await;
    let (status, all) = api.get("/api/v1/agents").await;
    assert_eq!(status, 200);
    assert_eq!(all.as_array().unwrap().len(), 3);

    let (status, page) = api.get("/api/v1/agents?limit=2").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total"], 3);
    assert_eq!(page["agents"].as_array().unwrap().len(), 2);
    let (_, rest) = api.get("/api/v1/agents?limit=2&offset=2").await;
    assert_eq!(rest["agents"].as_array().unwrap().len(), 1);

    let (_, older) = api
        .get("/api/v1/agents?older_than=1.1.0&channel=stable&limit=0")
        .await;
    assert_eq!(older, json!({ "agents": [], "total": 2 }));
    let (_, found) = api.get("/api/v1/agents?q=WEB&limit=10").await;
    assert_eq!(found["total"], 2, "{found}");
    let (_, exact) = api.get("/api/v1/agents?version=1.1.0").await;
    assert_eq!(exact.as_array().unwrap().len(), 1);
    let (_, online) = api
        .get("/api/v1/agents?online=true&paused=false&limit=10")
        .await;
    assert_eq!(online["total"], 3, "{online}");

    let (status, body) = api.get("/api/v1/agents?limit=100000").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api.get("/api/v1/agents?online=maybe").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api.get("/api/v1/agents?limit=10&sort=shoe_size").await;
    assert_eq!(status, 400, "{body}");
    let (_, sorted) = api.get("/api/v1/agents?limit=10&sort=-version").await;
    let hostnames: Vec<&str> = sorted["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["hostname"].as_str().unwrap())
        .collect();
    assert_eq!(hostnames, ["web-2", "db-1", "web-1"]);

    let (status, summary) = api.get("/api/v1/fleet").await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["total"], 3);
    assert_eq!(summary["online"], 3);
    assert_eq!(summary["offline"], 0);
    let versions: Vec<(&str, u64)> = summary["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_str().unwrap(),
                v["agents"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(versions, [("1.1.0", 1), ("1.0.0", 2)]);
    drop(fleet);
}

/// Reads the event stream until a `data:` line satisfies `wanted`, or `within` passes.
async fn next_event(
    stream: &mut reqwest::Response,
    buffer: &mut String,
    within: Duration,
    wanted: impl Fn(&Value) -> bool,
) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        while let Some(end) = buffer.find('\n') {
            let line: String = buffer.drain(..=end).collect();
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                let event: Value = serde_json::from_str(data.trim()).unwrap();
                if wanted(&event) {
                    return Some(event);
                }
            }
        }
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .ok()?
            .unwrap()?;
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn the_event_stream_tells_of_agents_and_actions_by_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let mut browser = Browserish::new(&server);
    browser.login(ADMIN_TOKEN).await;
    let http = reqwest::Client::new();

    let refused = http
        .get(format!("{}/api/v1/events", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);

    let mut stream = http
        .get(format!("{}/api/v1/events", server.url))
        .header(reqwest::header::COOKIE, browser.cookie.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    assert!(
        stream.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut buffer = String::new();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    buffer.push_str(std::str::from_utf8(&first).unwrap());
    assert!(buffer.contains("retry:"), "{buffer}");

    let agent = ProtocolAgent::enroll(&server, "fp-live", "1.0.0").await;
    let event = next_event(&mut stream, &mut buffer, Duration::from_secs(5), |e| {
        e["kind"] == "agent"
    })
    .await
    .expect("an agent event");
    assert_eq!(event["id"], agent.id.as_str());

    let (status, _) = server
        .api()
        .post(&format!("/api/v1/agents/{}/pause", agent.id), None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = server
        .api()
        .put("/api/v1/updates", json!({ "enabled": false }))
        .await;
    assert_eq!(status, 200);
    let event = next_event(&mut stream, &mut buffer, Duration::from_secs(5), |e| {
        e["kind"] == "settings"
    })
    .await
    .expect("a settings event");
    assert_eq!(
        event,
        json!({ "kind": "settings", "id": "updates_enabled" })
    );

    publish(&server.downloads(), "1.1.0", Some("beta"), b"a build");
    next_event(&mut stream, &mut buffer, Duration::from_secs(10), |e| {
        e["kind"] == "release"
    })
    .await
    .expect("a release event");

    let api = server.api();
    let (status, _) = api.put("/api/v1/updates", json!({ "enabled": true })).await;
    assert_eq!(status, 200);
    // A paused agent is refused an update now (409); resumed, a stable agent is still
    // not offered the beta build by itself, so the update below is the only task.
    let (status, _) = api
        .post(&format!("/api/v1/agents/{}/resume", agent.id), None)
        .await;
    assert_eq!(status, 200);
    let (status, queued) = api
        .post(
            &format!("/api/v1/agents/{}/update", agent.id),
            Some(json!({ "version": "1.1.0" })),
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    let event = next_event(&mut stream, &mut buffer, Duration::from_secs(5), |e| {
        e["kind"] == "task"
    })
    .await
    .expect("a task event");
    assert_eq!(event["id"], queued["task"]["id"]);
    assert_eq!(event["agent"], agent.id.as_str());

    let (status, body) = api
        .post(
            "/api/v1/rollouts/1.1.0/promote",
            Some(json!({ "force": true })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Rollout events name the rollout that changed: here the promote rollout started.
    let started = body["rollout"]["id"].clone();
    assert!(started.is_string(), "{body}");
    next_event(&mut stream, &mut buffer, Duration::from_secs(5), |e| {
        e["kind"] == "rollout" && e["id"] == started
    })
    .await
    .expect("a rollout event for the promote rollout");
    drop(agent);
}

// ------------------------------------------------------------------ in a real browser

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long the page may take to show what the server knows.
const PAGE_WAIT: Duration = Duration::from_secs(15);

/// A headless Chromium driven over WebDriver by its own chromedriver.
struct Browser {
    client: fantoccini::Client,
    driver: std::process::Child,
    base: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a browser session; `None` (and a note) when the browser
    /// is not installed, except in CI, where that is a failure.
    async fn start(server: &Server) -> Option<Browser> {
        let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
            .into_iter()
            .filter(|path| !std::path::Path::new(path).exists())
            .collect();
        if !missing.is_empty() {
            let why = format!(
                "{} not installed; scripts/ci-setup installs the Debian packages chromium \
                 and chromium-driver",
                missing.join(" and ")
            );
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "the dashboard's browser tests cannot run: {why}"
            );
            eprintln!("skipping the browser test: {why}");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = std::process::Command::new(CHROMEDRIVER);
        command
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // Its own process group, so the browsers it starts end with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let driver = command.spawn().expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let webdriver = format!("http://127.0.0.1:{port}");
        let client = eventually("chromedriver to start a session", PAGE_WAIT, || {
            let capabilities = capabilities.clone();
            let webdriver = webdriver.clone();
            async move {
                let connector = hyper_util::client::legacy::connect::HttpConnector::new();
                fantoccini::ClientBuilder::new(connector)
                    .capabilities(capabilities)
                    .connect(&webdriver)
                    .await
                    .ok()
            }
        })
        .await;
        Some(Browser {
            client,
            driver,
            base: server.url.clone(),
            _profile: profile,
        })
    }

    async fn open(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap();
    }

    /// Runs `script` in the page and returns its value.
    async fn run(&self, script: &str, args: Vec<Value>) -> Value {
        self.client.execute(script, args).await.unwrap()
    }

    /// The text of the first element matching `css`, or None.
    async fn text(&self, css: &str) -> Option<String> {
        let script = "const el = document.querySelector(arguments[0]); \
                      return el ? el.textContent : null;";
        self.run(script, vec![json!(css)])
            .await
            .as_str()
            .map(str::to_owned)
    }

    async fn count(&self, css: &str) -> u64 {
        self.run(
            "return document.querySelectorAll(arguments[0]).length;",
            vec![json!(css)],
        )
        .await
        .as_u64()
        .unwrap()
    }

    async fn visible(&self, id: &str) -> bool {
        self.run(
            "const el = document.getElementById(arguments[0]); return !!el && !el.hidden;",
            vec![json!(id)],
        )
        .await
            == json!(true)
    }

    /// Waits until `css` matches an element whose text satisfies `wanted`; returns it.
    async fn wait_for_text(&self, css: &str, wanted: impl Fn(&str) -> bool) -> String {
        eventually(&format!("{css} on the page"), PAGE_WAIT, || async {
            self.text(css).await.filter(|text| wanted(text))
        })
        .await
    }

    /// Clicks the first element matching `css`. Live views redraw their rows when events
    /// arrive, so an element found may be replaced before the click: then it is found
    /// again.
    async fn click(&self, css: &str) {
        eventually(&format!("a click on {css}"), PAGE_WAIT, || async {
            let element = self.client.find(fantoccini::Locator::Css(css)).await.ok()?;
            match element.click().await {
                Ok(()) => Some(()),
                Err(fantoccini::error::CmdError::Standard(e))
                    if e.error == fantoccini::error::ErrorStatus::StaleElementReference =>
                {
                    None
                }
                Err(e) => panic!("{css}: {e}"),
            }
        })
        .await
    }

    /// Logs in through the login form.
    async fn log_in(&self, token: &str) {
        self.open("/").await;
        eventually("the login form", PAGE_WAIT, || async {
            self.visible("login").await.then_some(())
        })
        .await;
        self.client
            .find(fantoccini::Locator::Id("token"))
            .await
            .unwrap()
            .send_keys(token)
            .await
            .unwrap();
        self.click("#login-form button[type=submit]").await;
        eventually("the dashboard after login", PAGE_WAIT, || async {
            self.visible("top").await.then_some(())
        })
        .await;
    }

    async fn close(self) {
        // Ends the browser; dropping then ends chromedriver.
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = format!("-{}", self.driver.id());
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &group])
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test]
async fn the_overview_shows_the_fleet_counts_the_api_gives() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--snapshot-interval", "1"]);
    let _online = Online::enroll(&server, &[("fp-one", "1.0.0"), ("fp-two", "1.1.0")]).await;
    drop(ProtocolAgent::enroll(&server, "fp-gone", "1.0.0").await);
    let api = server.api();
    let fleet = eventually("one agent offline", PAGE_WAIT, || async {
        let (_, fleet) = api.get("/api/v1/fleet").await;
        (fleet["offline"] == 1).then_some(fleet)
    })
    .await;
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.log_in(ADMIN_TOKEN).await;

    for name in ["online", "offline", "total"] {
        let shown = browser
            .wait_for_text(&format!("[data-count={name}] .value"), |_| true)
            .await;
        assert_eq!(shown, fleet[name].to_string(), "{name}");
    }
    assert_eq!(fleet["online"], 2);
    assert_eq!(fleet["total"], 3);
    // One chart for the one platform, a bar per version.
    assert_eq!(browser.count("[data-platform='linux/amd64'] rect").await, 2);
    // Version adoption over time: the server's snapshots, one line per version.
    let history = eventually("two snapshots", PAGE_WAIT, || async {
        let (_, history) = api.get("/api/v1/fleet/history").await;
        let moments: std::collections::BTreeSet<String> = history
            .as_array()?
            .iter()
            .map(|p| p["at"].as_str().unwrap().to_owned())
            .collect();
        (moments.len() >= 2).then_some(history)
    })
    .await;
    let versions: std::collections::BTreeSet<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["1.0.0", "1.1.0"].into());
    browser.open("/").await;
    eventually("the adoption chart", PAGE_WAIT, || async {
        (browser
            .count("[data-adoption='linux/amd64'] polyline")
            .await
            == 2)
            .then_some(())
    })
    .await;

    let cookies = browser.client.get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name() == "drover_session")
        .expect("the session cookie");
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(
        session.same_site().map(|s| s.to_string()),
        Some("Strict".into())
    );
    assert_eq!(
        browser.run("return document.cookie;", vec![]).await,
        json!(""),
        "the page's script cannot read the session cookie"
    );
    browser.close().await;
}

#[tokio::test]
async fn a_connecting_agent_appears_on_the_agents_view_without_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let first = Online::enroll(&server, &[("fp-first", "1.0.0")]).await;
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.log_in(ADMIN_TOKEN).await;
    browser.open("/#/agents").await;
    browser
        .wait_for_text(&format!("tr[data-agent='{}']", first.ids[0]), |_| true)
        .await;
    eventually("live updates on", PAGE_WAIT, || async {
        (browser.count("#live.on").await == 1).then_some(())
    })
    .await;
    // Survives only as long as the page is not reloaded.
    browser.run("window.stillHere = true;", vec![]).await;

    let started = std::time::Instant::now();
    let second = Online::enroll(&server, &[("fp-second", "1.0.0")]).await;
    browser
        .wait_for_text(&format!("tr[data-agent='{}']", second.ids[0]), |text| {
            text.contains("fp-second")
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    browser
        .wait_for_text("#agent-total", |text| text.ends_with("of 2"))
        .await;
    assert_eq!(browser.run("return window.stillHere;", vec![]).await, true);

    // After a server restart the page reconnects by itself and stays live.
    server.restart();
    let third = Online::enroll(&server, &[("fp-third", "1.0.0")]).await;
    eventually(
        "the agent after the restart",
        Duration::from_secs(20),
        || async {
            (browser
                .count(&format!("tr[data-agent='{}']", third.ids[0]))
                .await
                == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(browser.run("return window.stillHere;", vec![]).await, true);
    browser.close().await;
}

#[tokio::test]
async fn logging_out_returns_to_the_login_page() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.log_in(ADMIN_TOKEN).await;
    browser
        .wait_for_text("#who", |who| who.contains("admin"))
        .await;
    let live_title = || async {
        browser
            .run("return document.getElementById('live').title;", vec![])
            .await
    };
    eventually("live updates on", PAGE_WAIT, || async {
        (live_title().await == json!("Live updates: on")).then_some(())
    })
    .await;
    browser.click("#logout").await;
    eventually("the login page", PAGE_WAIT, || async {
        (browser.visible("login").await && !browser.visible("top").await).then_some(())
    })
    .await;
    // Logged out, the page says it hears nothing.
    assert_eq!(live_title().await, json!("Live updates: off"));
    assert_eq!(browser.count("#live.on").await, 0);
    // The cookie is gone too: a reload stays on the login page.
    browser.open("/#/agents").await;
    eventually("the login page after a reload", PAGE_WAIT, || async {
        browser.visible("login").await.then_some(())
    })
    .await;
    assert!(!browser.visible("top").await);
    browser.close().await;
}

#[tokio::test]
async fn a_viewer_sees_no_action_buttons_and_cannot_act_with_its_cookie() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let watched = Online::enroll(&server, &[("fp-watched", "1.0.0")]).await;
    let agent = &watched.ids[0];
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    let viewer = create_token(&server, "watcher", "viewer").await;
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.log_in(&viewer).await;
    browser.open("/#/rollouts").await;
    browser
        .wait_for_text("tr[data-version='1.1.0'][data-kind='beta']", |_| true)
        .await;
    assert_eq!(browser.count("button.action").await, 0);
    browser.open(&format!("/#/agents/{agent}")).await;
    browser
        .wait_for_text("dl.identity", |t| t.contains("fp-watched"))
        .await;
    assert_eq!(browser.count("button.action").await, 0);

    // The page's own fetch, with the cookie and the custom header: refused for the role.
    let status = browser
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1]; \
             fetch('/api/v1/releases/rescan', {method: 'POST', headers: {'X-Drover': '1'}}) \
               .then((r) => done(r.status));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(status, json!(403));
    let cookie = browser
        .client
        .get_named_cookie("drover_session")
        .await
        .unwrap();
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/agents/{agent}/pause", server.url))
        .header(
            reqwest::header::COOKIE,
            format!("drover_session={}", cookie.value()),
        )
        .header("X-Drover", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    browser.close().await;
}

#[tokio::test]
async fn the_promote_confirmation_names_the_version_and_the_agents_that_will_update() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    // The one already on 1.1.0 is not counted.
    let fleet = Online::enroll(
        &server,
        &[
            ("fp-a", "1.0.0"),
            ("fp-b", "1.0.0"),
            ("fp-c", "1.0.0"),
            ("fp-ahead", "1.1.0"),
        ],
    )
    .await;
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.log_in(ADMIN_TOKEN).await;
    browser.open("/#/rollouts").await;
    let row = "tr[data-version='1.1.0'][data-kind='beta']";
    browser.wait_for_text(row, |_| true).await;
    // A beta rollout shows its gate; with no beta success yet it is "not ready" (the
    // usual state before a promote, not an error), and the promote is a forced one.
    browser
        .wait_for_text(&format!("{row} td.gate"), |gate| {
            gate.starts_with("not ready")
        })
        .await;
    assert_eq!(
        browser.count(&format!("{row} td.gate .state.failed")).await,
        0
    );
    browser
        .click(&format!("{row} button.danger[data-action=promote-anyway]"))
        .await;
    let text = browser
        .wait_for_text("#confirm-text", |t| !t.is_empty())
        .await;
    assert!(text.contains("Promote 1.1.0"), "{text}");
    assert!(text.contains("3 stable agents will update"), "{text}");
    // No beta successes yet: the dialog says the gate fails and that this forces it.
    assert!(text.contains("health gate fails"), "{text}");
    assert_eq!(
        browser.text("#confirm-ok").await.as_deref(),
        Some("Promote anyway")
    );
    browser.confirm_typing("1.1.0").await;

    let api = server.api();
    let promoted = eventually("1.1.0 promoted", PAGE_WAIT, || async {
        let (_, rollouts) = api.get("/api/v1/rollouts").await;
        rollouts
            .as_array()?
            .iter()
            .find(|r| r["version"] == "1.1.0" && r["kind"] == "promote")
            .cloned()
    })
    .await;
    // The three older stable agents, not the one already on 1.1.0.
    assert_eq!(promoted["targeted"], 3, "{promoted}");
    // The page heard of it and shows the promote rollout without a reload; the beta
    // rollout offers no second promote.
    let promote_row = format!("tr[data-rollout='{}']", promoted["id"].as_str().unwrap());
    let shown = browser
        .wait_for_text(&promote_row, |t| t.contains("promote"))
        .await;
    assert!(shown.contains("1.1.0"), "{shown}");
    assert_eq!(
        browser
            .text(&format!("{promote_row}[data-version='1.1.0'] .kind"))
            .await
            .as_deref(),
        Some("promote")
    );
    eventually("no promote button left", PAGE_WAIT, || async {
        (browser
            .count(&format!("{row} button[data-action^=promote]"))
            .await
            == 0)
            .then_some(())
    })
    .await;
    let (_, audit) = api.get("/api/v1/audit?action=rollout.promote").await;
    assert!(
        audit["entries"][0]["result"]
            .as_str()
            .unwrap()
            .contains("forced"),
        "{audit}"
    );
    drop(fleet);
    browser.close().await;
}

impl Browser {
    /// Shows `hash` in the page without reloading it (the view changes, the page stays).
    async fn show(&self, hash: &str) {
        self.run("location.hash = arguments[0];", vec![json!(hash)])
            .await;
    }

    /// Confirms a dangerous action: the OK button stays disabled until `typed` (the
    /// version) is typed, a wrong text leaves it disabled, then it is clicked.
    async fn confirm_typing(&self, typed: &str) {
        let ok_enabled = || async {
            self.run(
                "return !document.getElementById('confirm-ok').disabled;",
                vec![],
            )
            .await
                == json!(true)
        };
        assert!(!ok_enabled().await, "enabled before typing");
        let input = self
            .client
            .find(fantoccini::Locator::Id("confirm-typed"))
            .await
            .unwrap();
        input.send_keys("0.0.0").await.unwrap();
        assert!(!ok_enabled().await, "enabled with the wrong version");
        input.clear().await.unwrap();
        input.send_keys(typed).await.unwrap();
        eventually("the confirm button enabled", PAGE_WAIT, || async {
            ok_enabled().await.then_some(())
        })
        .await;
        self.click("#confirm-ok").await;
    }

    /// The errors the page's script ran into (app.js collects them in `__droverErrors`).
    async fn errors(&self) -> Value {
        self.run("return window.__droverErrors;", vec![]).await
    }

    /// Saves the page as `target/dashboard-screenshots/{name}.png`.
    async fn screenshot(&self, name: &str) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("dashboard-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).unwrap();
        let saved = std::fs::read(&path).unwrap();
        assert!(
            saved.len() > 8 && saved.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is not a PNG",
            path.display()
        );
    }
}

/// Three real agents, one on beta: a beta build reaches the beta agent while the page
/// watches, and a promote from the page's button takes it to the other two.
#[tokio::test]
async fn the_story_in_the_browser() {
    let dir = tempfile::tempdir().unwrap();
    // One beta success is enough for the gate here; the default asks for three.
    let server = Server::start_with_args(dir.path(), &["--gate-min-successes", "1"]);
    let api = server.api();
    let names = ["story-a", "story-b", "story-c"];
    let _fleet: Vec<Agent> = names
        .iter()
        .map(|name| {
            let exe = dir.path().join(format!("{name}-bin/drover-agent"));
            stamp_agent("1.0.0", &exe);
            Agent::start_installed(
                &server,
                &exe,
                dir.path(),
                name,
                &[
                    "--enroll-token",
                    ENROLL_TOKEN,
                    "--fingerprint",
                    &format!("fp-{name}"),
                ],
            )
        })
        .collect();
    let agents = all_online(&api, 3).await;
    let id_of = |name: &str| {
        agents
            .iter()
            .find(|a| a["hostname"] == name)
            .unwrap_or_else(|| panic!("{name} among {agents:?}"))["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let beta = id_of("story-c");
    let (status, body) = api
        .put(
            &format!("/api/v1/agents/{beta}/channel"),
            json!({ "channel": "beta" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    // Screenshots at a laptop's size rather than the headless default.
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    browser
        .wait_for_text("[data-count=online] .value", |v| v == "3")
        .await;
    browser.screenshot("overview").await;

    browser.show("#/agents").await;
    for name in names {
        browser
            .wait_for_text(&format!("tr[data-agent='{}']", id_of(name)), |t| {
                t.contains(name) && t.contains("1.0.0")
            })
            .await;
    }
    browser.screenshot("agents").await;

    browser.show("#/rollouts").await;
    eventually("live updates on", PAGE_WAIT, || async {
        (browser.count("#live.on").await == 1).then_some(())
    })
    .await;
    // Survives only as long as the page is not reloaded.
    browser.run("window.stillHere = true;", vec![]).await;
    let row = "tr[data-version='1.1.0'][data-kind='beta']";
    assert_eq!(browser.count(row).await, 0, "nothing published yet");

    publish_agent(&server, dir.path(), "1.1.0", "beta");
    // The funnel reads "0 waiting → 0 queued → … → 0 installing → 1 succeeded".
    let succeeded = |funnel: &str| {
        funnel
            .split(" → ")
            .find_map(|s| s.strip_suffix(" succeeded"))
            .and_then(|n| n.parse::<u64>().ok())
    };
    let first = browser
        .wait_for_text(&format!("{row} .funnel"), |_| true)
        .await;
    assert_eq!(succeeded(&first), Some(0), "{first}");
    // The beta agent downloads, restarts on probation and proves the build.
    let funnel = eventually(
        "the beta agent's success on the page",
        Duration::from_secs(60),
        || async {
            browser
                .text(&format!("{row} .funnel"))
                .await
                .filter(|f| succeeded(f) == Some(1))
        },
    )
    .await;
    assert!(funnel.ends_with("1 succeeded"), "{funnel}");
    // The beta rollout had one target, and it succeeded.
    browser
        .wait_for_text(&format!("{row} .state"), |s| s == "completed")
        .await;
    browser
        .wait_for_text(&format!("{row} td.gate"), |gate| gate.starts_with("ready"))
        .await;
    assert_eq!(browser.run("return window.stillHere;", vec![]).await, true);
    browser.screenshot("rollouts").await;

    browser
        .click(&format!("{row} button[data-action=promote]"))
        .await;
    let text = browser
        .wait_for_text("#confirm-text", |t| !t.is_empty())
        .await;
    assert!(text.contains("Promote 1.1.0"), "{text}");
    assert!(text.contains("2 stable agents will update"), "{text}");
    assert_eq!(
        browser.text("#confirm-ok").await.as_deref(),
        Some("Promote")
    );
    browser.click("#confirm-ok").await;
    let promote_row = "tr[data-version='1.1.0'][data-kind='promote']";
    // Once both stable agents succeeded, the promote rollout is completed.
    browser
        .wait_for_text(&format!("{promote_row} .state"), |s| s == "completed")
        .await;
    let done = browser
        .wait_for_text(&format!("{promote_row} .funnel"), |_| true)
        .await;
    assert_eq!(succeeded(&done), Some(2), "{done}");
    eventually("every agent on 1.1.0", Duration::from_secs(90), || async {
        let agents = api.agents().await?;
        (agents.len() == 3
            && agents
                .iter()
                .all(|a| a["version"] == "1.1.0" && a["online"] == true))
        .then_some(())
    })
    .await;
    assert_eq!(browser.run("return window.stillHere;", vec![]).await, true);

    browser
        .show(&format!("#/agents/{}", id_of("story-a")))
        .await;
    browser
        .wait_for_text("dl.identity", |t| {
            t.contains("fp-story-a") && t.contains("1.1.0")
        })
        .await;
    browser.screenshot("agent").await;
    browser.show("#/releases").await;
    // Compression is off in these stories: every build is sent as it is.
    let sent = browser
        .wait_for_text("#main table", |t| t.contains("1.1.0"))
        .await;
    assert!(sent.contains("as it is"), "{sent}");
    browser.screenshot("releases").await;
    browser.show("#/audit").await;
    browser
        .wait_for_text("#main table", |t| t.contains("rollout.promote"))
        .await;
    browser.screenshot("audit").await;

    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    browser.close().await;
}

/// A build that fails probation on every agent it reaches halts its rollout: the
/// overview lists the rollout with its build failures in red and shows a banner with
/// the reason, and the banner's Resume acts on that rollout.
#[tokio::test]
async fn a_halted_rollout_is_bannered_and_resumed_from_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut agents = Vec::new();
    for name in ["fp-h1", "fp-h2"] {
        agents.push(ProtocolAgent::enroll(&server, name, "1.0.0").await);
    }
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"a broken build",
    );
    let mut updates = Vec::new();
    for agent in &mut agents {
        let update = agent
            .next_update(Duration::from_secs(20))
            .await
            .expect("an update to 1.1.0");
        assert_eq!(update.version, "1.1.0");
        updates.push(update.task_id);
    }
    // Each agent installs it and the new version dies on probation: a build failure.
    for (agent, task_id) in agents.iter_mut().zip(updates) {
        agent
            .report(AgentMessage::UpdateResult(UpdateResult {
                task_id,
                outcome: UpdateOutcome::RolledBack,
                version: "1.0.0".into(),
                error: Some("the new version exited during probation".into()),
                failure_class: Some(FailureClass::Build),
                transfer: None,
            }))
            .await;
    }
    let keeper = tokio::spawn(async move {
        loop {
            for agent in &mut agents {
                agent.heartbeat().await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let halted = eventually("the rollout to halt", PAGE_WAIT, || async {
        let (_, rollouts) = api.get("/api/v1/rollouts?state=halted").await;
        rollouts.as_array()?.first().cloned()
    })
    .await;
    assert_eq!(halted["version"], "1.1.0", "{halted}");
    assert_eq!(halted["failures"]["build"], 2, "{halted}");
    let id = halted["id"].as_str().unwrap().to_owned();
    let reason = halted["reason"].as_str().unwrap().to_owned();

    let Some(browser) = Browser::start(&server).await else {
        keeper.abort();
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    let banner = browser
        .wait_for_text("[data-banner=halted]", |t| t.contains("halted"))
        .await;
    assert!(banner.contains("1.1.0"), "{banner}");
    assert!(banner.contains(&reason), "{banner} / {reason}");
    // The overview's active rollouts: the halted one, its wave, no success yet (an empty
    // bar) and its two build failures in red.
    let row = format!("tr[data-rollout='{id}']");
    let active = browser.wait_for_text(&row, |t| t.contains("halted")).await;
    assert!(active.contains("1 of 1"), "{active}");
    assert!(active.contains("0 / 2"), "{active}");
    assert_eq!(
        browser
            .text(&format!("{row} td.failures.bad"))
            .await
            .as_deref(),
        Some("2")
    );
    assert_eq!(
        browser
            .run(
                "return document.querySelector(arguments[0]).style.width;",
                vec![json!(format!("{row} .progress > span"))],
            )
            .await,
        json!("0%")
    );
    browser.screenshot("overview-halted").await;

    browser
        .click("[data-banner=halted] button[data-action=resume]")
        .await;
    let text = browser
        .wait_for_text("#confirm-text", |t| !t.is_empty())
        .await;
    assert!(text.contains("Resume the"), "{text}");
    assert!(text.contains(&id[..8]), "{text}");
    assert!(text.contains("0 of 2 succeeded, 2 failed"), "{text}");
    browser.click("#confirm-ok").await;
    let resumed = eventually("the rollout resumed", PAGE_WAIT, || async {
        let (_, rollout) = api.get(&format!("/api/v1/rollouts/{id}")).await;
        (rollout["state"] != "halted").then_some(rollout)
    })
    .await;
    assert_eq!(resumed["state"], "running", "{resumed}");
    eventually("the banner gone", PAGE_WAIT, || async {
        (browser.count("[data-banner=halted]").await == 0).then_some(())
    })
    .await;
    let (_, audit) = api.get("/api/v1/audit?action=rollout.resume").await;
    assert_eq!(audit["entries"][0]["target"], id.as_str(), "{audit}");

    // The agent's task says what kind of failure it was.
    browser.show(&format!("#/agents/{}", ids[0])).await;
    let tasks = browser
        .wait_for_text("#tasks table", |t| t.contains("1.0.0 → 1.1.0"))
        .await;
    assert!(tasks.contains("rolled back"), "{tasks}");
    assert_eq!(
        browser.text("#tasks table .failure-class").await.as_deref(),
        Some("build")
    );
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    keeper.abort();
    browser.close().await;
}

/// Roll back from the rollouts view: the version is blocked and a rollback rollout moves
/// the agents that run it; Unblock offers it again.
#[tokio::test]
async fn a_rollback_and_an_unblock_from_the_rollouts_view() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let fleet = Online::enroll(
        &server,
        &[("fp-r1", "1.1.0"), ("fp-r2", "1.1.0"), ("fp-r3", "1.0.0")],
    )
    .await;
    publish(
        &server.downloads(),
        "1.0.0",
        Some("stable"),
        b"the stable build",
    );
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    browser.show("#/rollouts").await;
    let beta = "tr[data-version='1.1.0'][data-kind='beta']";
    browser.wait_for_text(beta, |_| true).await;
    browser
        .click(&format!("{beta} button[data-action=roll-back]"))
        .await;
    let text = browser
        .wait_for_text("#confirm-text", |t| !t.is_empty())
        .await;
    assert!(text.contains("Roll back 1.1.0"), "{text}");
    assert!(text.contains("2 agents running it"), "{text}");
    assert_eq!(
        browser.text("#confirm-ok").await.as_deref(),
        Some("Roll back")
    );
    // The agents have 1.0.0 to go back to, and the dialog says so.
    assert!(text.contains("go back to 1.0.0"), "{text}");
    browser.confirm_typing("1.1.0").await;

    let blocked = |version: &'static str| {
        let api = &api;
        async move {
            let (_, releases) = api.get("/api/v1/releases").await;
            releases
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["version"] == version)
                .map(|r| r["blocked"] == true)
        }
    };
    eventually("1.1.0 blocked", PAGE_WAIT, || async {
        blocked("1.1.0").await.filter(|b| *b)
    })
    .await;
    let rollback = "tr[data-version='1.1.0'][data-kind='rollback']";
    let shown = browser.wait_for_text(rollback, |_| true).await;
    assert!(shown.contains("blocked"), "{shown}");
    let (_, listed) = api.get("/api/v1/rollouts?version=1.1.0").await;
    let record = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "rollback")
        .expect("a rollback rollout")
        .clone();
    assert_eq!(record["targeted"], 2, "{record}");
    // Blocked: no second rollback, no promote; the newest row of 1.1.0 offers Unblock.
    eventually("the beta row's actions gone", PAGE_WAIT, || async {
        (browser
            .count(&format!(
                "{beta} button[data-action=roll-back], {beta} button[data-action^=promote]"
            ))
            .await
            == 0)
            .then_some(())
    })
    .await;
    browser.screenshot("rollouts-rollback").await;

    browser
        .click(&format!("{rollback} button[data-action=unblock]"))
        .await;
    let text = browser
        .wait_for_text("#confirm-text", |t| t.starts_with("Unblock"))
        .await;
    assert!(text.starts_with("Unblock 1.1.0"), "{text}");
    assert!(text.contains("offered again on beta"), "{text}");
    browser.click("#confirm-ok").await;
    eventually("1.1.0 offered again", PAGE_WAIT, || async {
        blocked("1.1.0").await.filter(|b| !*b)
    })
    .await;
    browser
        .wait_for_text(&format!("{beta} button[data-action=roll-back]"), |_| true)
        .await;
    assert_eq!(browser.count("button[data-action=unblock]").await, 0);
    let (_, audit) = api.get("/api/v1/audit?action=rollout.unblock").await;
    assert_eq!(audit["entries"][0]["target"], "1.1.0", "{audit}");
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    drop(fleet);
    browser.close().await;
}

/// A promote in two waves, driven from the rollouts view: pause and resume it, advance
/// it past its bake, then abort it; each confirmation names the numbers it affects.
#[tokio::test]
async fn pause_advance_and_abort_a_rollout_from_the_rollouts_view() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    // Agents that take an update and never report on it: what they were sent stays
    // unfinished.
    let fleet = Online::enroll(
        &server,
        &[("fp-w1", "1.0.0"), ("fp-w2", "1.0.0"), ("fp-w3", "1.0.0")],
    )
    .await;
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    eventually("the beta rollout", PAGE_WAIT, || async {
        let (_, rollouts) = api.get("/api/v1/rollouts?version=1.1.0").await;
        (!rollouts.as_array()?.is_empty()).then_some(())
    })
    .await;
    let (status, promoted) = api
        .post(
            "/api/v1/rollouts/1.1.0/promote",
            Some(json!({ "force": true, "waves": ["1", "100%"], "bake": "1h" })),
        )
        .await;
    assert_eq!(status, 200, "{promoted}");
    let id = promoted["rollout"]["id"].as_str().unwrap().to_owned();
    let row = format!("tr[data-rollout='{id}']");
    let record = || async {
        let (_, record) = api.get(&format!("/api/v1/rollouts/{id}")).await;
        record
    };

    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    browser.show("#/rollouts").await;
    // The canary wave: one agent started, two waiting.
    let first = eventually("the canary under way", PAGE_WAIT, || async {
        let r = record().await;
        (r["waiting"] == 2 && r["queued"].as_u64()? + r["in_progress"].as_u64()? == 1).then_some(r)
    })
    .await;
    assert_eq!(first["state"], "running", "{first}");
    browser
        .wait_for_text(&format!("{row} .funnel"), |f| f.starts_with("2 waiting"))
        .await;
    assert_eq!(
        browser.text(&format!("{row} .wave")).await.as_deref(),
        Some("1 of 2")
    );

    browser
        .click(&format!("{row} button[data-action=pause]"))
        .await;
    let text = browser
        .wait_for_text("#confirm-text", |t| t.starts_with("Pause"))
        .await;
    assert!(text.contains(&id[..8]), "{text}");
    assert!(text.contains("none of its 2 waiting agents"), "{text}");
    assert!(text.contains("its 1 update under way goes on"), "{text}");
    browser.click("#confirm-ok").await;
    browser
        .wait_for_text(&format!("{row} .state"), |s| s == "paused")
        .await;
    assert_eq!(record().await["state"], "paused");
    // Paused: it can be resumed or aborted, not advanced or paused again.
    for (action, shown) in [("resume", 1), ("abort", 1), ("advance", 0), ("pause", 0)] {
        assert_eq!(
            browser
                .count(&format!("{row} button[data-action={action}]"))
                .await,
            shown,
            "{action}"
        );
    }
    browser
        .click(&format!("{row} button[data-action=resume]"))
        .await;
    browser
        .wait_for_text("#confirm-text", |t| t.starts_with("Resume"))
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait_for_text(&format!("{row} .state"), |s| s == "running")
        .await;

    // The canary cannot pass (its agent never reports); advance starts the last wave.
    browser
        .click(&format!("{row} button[data-action=advance]"))
        .await;
    let text = browser
        .wait_for_text("#confirm-text", |t| t.starts_with("Advance"))
        .await;
    assert!(
        text.contains("to wave 2 of 2 (100% of its targets)"),
        "{text}"
    );
    browser.click("#confirm-ok").await;
    browser
        .wait_for_text(&format!("{row} .wave"), |w| w == "2 of 2")
        .await;
    let all = eventually("every agent started", PAGE_WAIT, || async {
        let r = record().await;
        (r["waiting"] == 0 && r["queued"].as_u64()? + r["in_progress"].as_u64()? == 3).then_some(r)
    })
    .await;
    assert_eq!(all["current_wave"], 1, "{all}");
    browser
        .wait_for_text(&format!("{row} .funnel"), |f| f.starts_with("0 waiting"))
        .await;
    assert_eq!(
        browser
            .count(&format!("{row} button[data-action=advance]"))
            .await,
        0,
        "the last wave"
    );
    browser.screenshot("rollouts-waves").await;

    browser
        .click(&format!("{row} button[data-action=abort]"))
        .await;
    let text = browser
        .wait_for_text("#confirm-text", |t| t.starts_with("Abort"))
        .await;
    assert!(
        text.contains("its 3 unfinished updates are cancelled"),
        "{text}"
    );
    browser.click("#confirm-ok").await;
    let aborted = browser
        .wait_for_text(&format!("{row} td:nth-child(4)"), |s| {
            s.starts_with("aborted")
        })
        .await;
    assert!(aborted.contains("aborted by"), "{aborted}");
    let r = record().await;
    assert_eq!(r["state"], "aborted", "{r}");
    assert_eq!(r["cancelled"], 3, "{r}");
    assert_eq!(
        browser.count(&format!("{row} button.action")).await,
        1,
        "roll back only"
    );
    let (_, audit) = api.get("/api/v1/audit?limit=20").await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in [
        "rollout.pause",
        "rollout.resume",
        "rollout.advance",
        "rollout.abort",
    ] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    drop(fleet);
    browser.close().await;
}

/// Every view, shown in turn in one page, runs without a script error.
#[tokio::test]
async fn no_view_raises_a_javascript_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let fleet = Online::enroll(&server, &[("fp-one", "1.0.0"), ("fp-two", "1.0.0")]).await;
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.log_in(ADMIN_TOKEN).await;
    assert_eq!(browser.errors().await, json!([]), "on the overview");
    let detail = format!("#/agents/{}", fleet.ids[0]);
    for (hash, ready) in [
        ("#/overview", "[data-count=online] .value"),
        ("#/rollouts", "tr[data-version='1.1.0'][data-kind='beta']"),
        ("#/agents", "#agent-total"),
        (detail.as_str(), "dl.identity"),
        ("#/releases", "#main table"),
        ("#/enrollment", "#main table"),
        ("#/audit", "#main table"),
    ] {
        browser.show(hash).await;
        browser.wait_for_text(ready, |_| true).await;
        // A moment for any late fetch to fail.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(browser.errors().await, json!([]), "on {hash}");
    }
    // A test of the test: an uncaught error is seen. (The injected script has no origin
    // of its own, so the error's message is muted to "Script error.".)
    browser
        .run(
            "setTimeout(() => { throw new Error('thrown'); }, 0);",
            vec![],
        )
        .await;
    eventually("the error recorded", PAGE_WAIT, || async {
        (browser.errors().await.as_array()?.len() == 1).then_some(())
    })
    .await;
    drop(fleet);
    browser.close().await;
}

// ------------------------------------------------ what the page once showed wrongly

/// Agents that heartbeat every 300 ms until dropped, for tests that drive each agent
/// through its updates first.
fn keep_online(mut agents: Vec<ProtocolAgent>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for agent in &mut agents {
                agent.heartbeat().await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// Takes the next update and comes back on its version: a success.
async fn succeed(server: &Server, agent: &mut ProtocolAgent) -> String {
    let update = agent
        .next_update(Duration::from_secs(20))
        .await
        .expect("an update");
    agent.reconnect(server, &update.version).await;
    agent.heartbeat().await;
    update.version
}

async fn put_on_beta(api: &Api, agent: &str) {
    let (status, body) = api
        .put(
            &format!("/api/v1/agents/{agent}/channel"),
            json!({ "channel": "beta" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// The computed background colour of the first element matching `css`.
async fn background(browser: &Browser, css: &str) -> String {
    browser
        .run(
            "return getComputedStyle(document.querySelector(arguments[0])).backgroundColor;",
            vec![json!(css)],
        )
        .await
        .as_str()
        .unwrap()
        .to_owned()
}

/// The colour of `--ok` in app.css.
const GREEN: &str = "rgb(18, 128, 92)";

/// A beta version that succeeded and was then rolled back: its bar is not a full green
/// one and its gate does not say "pass" or "ready"; it says blocked.
#[tokio::test]
async fn a_rolled_back_version_shows_no_green_bar_and_a_blocked_gate() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(
        dir.path(),
        &["--gate-min-successes", "1", "--success-bake", "1s"],
    );
    let api = server.api();
    let mut agent = ProtocolAgent::enroll(&server, "fp-rb", "1.0.0").await;
    put_on_beta(&api, &agent.id).await;
    publish(
        &server.downloads(),
        "1.0.0",
        Some("stable"),
        b"the stable build",
    );
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    assert_eq!(succeed(&server, &mut agent).await, "1.1.0");
    let keeper = keep_online(vec![agent]);
    let beta = eventually(
        "the beta rollout completed and ready",
        PAGE_WAIT,
        || async {
            let (_, listed) = api.get("/api/v1/rollouts?version=1.1.0").await;
            listed
                .as_array()?
                .iter()
                .find(|r| {
                    r["kind"] == "beta" && r["state"] == "completed" && r["gate"]["pass"] == true
                })
                .cloned()
        },
    )
    .await;
    assert_eq!(beta["succeeded"], 1, "{beta}");
    let (status, body) = api.post("/api/v1/rollouts/1.1.0/rollback", None).await;
    assert_eq!(status, 200, "{body}");

    let Some(browser) = Browser::start(&server).await else {
        keeper.abort();
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    browser.show("#/rollouts").await;
    let row = format!("tr[data-rollout='{}']", beta["id"].as_str().unwrap());
    let gate = browser
        .wait_for_text(&format!("{row} td.gate"), |g| !g.is_empty())
        .await;
    assert!(gate.starts_with("blocked"), "{gate}");
    assert_eq!(
        browser
            .count(&format!("{row} [data-gate=ready], {row} .state.succeeded"))
            .await,
        0
    );
    let shown = browser
        .text(&format!("{row} .progress-cell"))
        .await
        .unwrap();
    assert!(shown.contains("1 / 1 succeeded"), "{shown}");
    assert!(shown.contains("1.1.0 rolled back"), "{shown}");
    assert_ne!(
        background(&browser, &format!("{row} .progress > span")).await,
        GREEN,
        "a rolled-back version's bar is not green"
    );
    // The same on its own page.
    browser
        .show(&format!("#/rollouts/{}", beta["id"].as_str().unwrap()))
        .await;
    browser
        .wait_for_text("#rollout-title", |t| t.contains("blocked"))
        .await;
    assert_ne!(background(&browser, ".progress > span").await, GREEN);
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    keeper.abort();
    browser.close().await;
}

/// The installed stable version, before any promote: no red gate, no "0 / 2"; every
/// stage on screen is the API's number, and none exceeds the targets.
#[tokio::test]
async fn progress_and_funnel_numbers_are_the_apis_and_an_installed_version_is_not_red() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let fleet = Online::enroll(
        &server,
        &[("fp-s1", "1.0.0"), ("fp-s2", "1.0.0"), ("fp-s3", "1.0.0")],
    )
    .await;
    put_on_beta(&api, &fleet.ids[2]).await;
    publish(
        &server.downloads(),
        "1.0.0",
        Some("stable"),
        b"the stable build",
    );
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    let rollouts = eventually("the beta rollout under way", PAGE_WAIT, || async {
        let (_, listed) = api.get("/api/v1/rollouts").await;
        let listed = listed.as_array()?.clone();
        listed
            .iter()
            .any(|r| {
                r["version"] == "1.1.0"
                    && r["in_progress"].as_u64().unwrap_or(0) + r["queued"].as_u64().unwrap_or(0)
                        == 1
            })
            .then_some(listed)
    })
    .await;
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    browser.show("#/rollouts").await;
    for listed in &rollouts {
        let id = listed["id"].as_str().unwrap();
        let row = format!("tr[data-rollout='{id}']");
        browser.wait_for_text(&row, |_| true).await;
        // The API's numbers and the screen's, read together until they agree: an agent
        // may move on between one reading and the other, and the page follows it live.
        let (r, sum) = eventually(
            "the funnel to show the API's numbers",
            PAGE_WAIT,
            || async {
                let (_, now) = api.get(&format!("/api/v1/rollouts/{id}")).await;
                let mut sum = 0;
                for stage in [
                    "waiting",
                    "queued",
                    "downloading",
                    "installing",
                    "succeeded",
                ] {
                    let shown = browser
                        .run(
                            "return document.querySelector(arguments[0]).dataset.count;",
                            vec![json!(format!("{row} .funnel [data-stage={stage}]"))],
                        )
                        .await;
                    if shown.as_str()?.parse::<u64>().ok() != now[stage].as_u64() {
                        return None;
                    }
                    sum += now[stage].as_u64()?;
                }
                Some((now, sum))
            },
        )
        .await;
        let targeted = r["targeted"].as_u64().unwrap();
        assert!(sum <= targeted, "{r}");
        let label = browser
            .text(&format!("{row} .progress-cell small"))
            .await
            .unwrap();
        if targeted == 0 {
            assert_eq!(label, "no agent to update");
        } else {
            assert_eq!(label, format!("{} / {targeted} succeeded", r["succeeded"]));
        }
        // Nothing failed: nothing is red.
        assert_eq!(
            browser
                .count(&format!(
                    "{row} .state.failed, {row} .stage.bad, {row} .marker.failing"
                ))
                .await,
            0,
            "{r}"
        );
    }
    // The installed stable version moves nobody: a rollout of it, if any, says so.
    for installed in rollouts.iter().filter(|r| r["version"] == "1.0.0") {
        assert_eq!(installed["targeted"], 0, "{installed}");
    }
    // The overview counts the beta agent still on 1.0.0 as behind its channel's build.
    browser.show("#/overview").await;
    let lag = browser
        .wait_for_text("[data-platform='linux/amd64'] [data-lagging]", |_| true)
        .await;
    assert_eq!(
        lag,
        "1 agent behind its channel's build (0 on stable, which is due 1.0.0; 1 on beta, which is due 1.1.0)"
    );
    let (_, fleet_now) = api.get("/api/v1/fleet").await;
    assert_eq!(fleet_now["versions"][0]["beta"], 1, "{fleet_now}");
    browser.show("#/rollouts").await;
    // The beta rollout's gate before any promote is "not ready", not a red "fail".
    let beta = "tr[data-version='1.1.0'][data-kind='beta'] td.gate";
    let gate = browser.wait_for_text(beta, |_| true).await;
    assert!(gate.starts_with("not ready"), "{gate}");
    assert_ne!(
        background(&browser, &format!("{beta} .state")).await,
        "rgb(254, 228, 226)"
    );
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    drop(fleet);
    browser.close().await;
}

/// One build failure in a wave too small to halt yet: the overview shows the rollout
/// red (a marker, a red share of the bar) while it is still running.
#[tokio::test]
async fn a_failing_build_is_red_on_the_overview_before_it_halts() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut agents = Vec::new();
    for n in 0..6 {
        agents.push(ProtocolAgent::enroll(&server, &format!("fp-f{n}"), "1.0.0").await);
    }
    for agent in &agents {
        put_on_beta(&api, &agent.id).await;
    }
    publish(
        &server.downloads(),
        "1.1.0",
        Some("beta"),
        b"a broken build",
    );
    let mut tasks = Vec::new();
    for agent in &mut agents {
        tasks.push(
            agent
                .next_update(Duration::from_secs(20))
                .await
                .expect("an update")
                .task_id,
        );
    }
    agents[0]
        .report(AgentMessage::UpdateResult(UpdateResult {
            task_id: tasks[0].clone(),
            outcome: UpdateOutcome::RolledBack,
            version: "1.0.0".into(),
            error: Some("the new version exited during probation".into()),
            failure_class: Some(FailureClass::Build),
            transfer: None,
        }))
        .await;
    let keeper = keep_online(agents);
    let failing = eventually("one build failure", PAGE_WAIT, || async {
        let (_, listed) = api.get("/api/v1/rollouts?version=1.1.0").await;
        listed
            .as_array()?
            .first()
            .filter(|r| r["failures"]["build"] == 1)
            .cloned()
    })
    .await;
    assert_eq!(failing["state"], "running", "not halted yet: {failing}");
    assert_eq!(failing["targeted"], 6, "{failing}");

    let Some(browser) = Browser::start(&server).await else {
        keeper.abort();
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    let row = format!("tr[data-rollout='{}']", failing["id"].as_str().unwrap());
    let marker = browser
        .wait_for_text(&format!("{row} .marker.failing"), |_| true)
        .await;
    assert_eq!(marker, "failing: 1 build failure");
    assert_eq!(
        background(&browser, &format!("{row} .marker.failing")).await,
        "rgb(180, 35, 24)"
    );
    let red = browser
        .run(
            "return document.querySelector(arguments[0]).style.width;",
            vec![json!(format!("{row} .progress > span.bad"))],
        )
        .await;
    // One of six, rounded down.
    assert_eq!(red, json!("16%"));
    assert_eq!(browser.count("[data-banner=halted]").await, 0);
    browser.screenshot("overview-failing").await;
    // Its page marks the wave red too, and lists the failed agent under its stage.
    browser
        .show(&format!("#/rollouts/{}", failing["id"].as_str().unwrap()))
        .await;
    let wave = browser
        .wait_for_text(".wave-card[data-wave='0'] .marker.failing", |_| true)
        .await;
    assert_eq!(wave, "failing: 1 build failure");
    browser
        .click("#rollout-funnel button[data-stage=rolled_back]")
        .await;
    browser
        .wait_for_text("#rollout-agents-total", |t| t == "1–1 of 1")
        .await;
    assert_eq!(
        browser
            .count("#rollout-agents tr[data-stage=rolled_back] .failure-class.build")
            .await,
        1
    );
    browser.screenshot("rollout-failing").await;
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    keeper.abort();
    browser.close().await;
}

/// A mirror whose last downloads all fell back is bannered on the overview, with why,
/// and listed with its counts; the agents' updates go on.
#[tokio::test]
async fn a_failing_download_mirror_is_bannered_on_the_overview() {
    let dir = tempfile::tempdir().unwrap();
    let mirror = "http://127.0.0.1:9/drover";
    let server = Server::start_with_args(dir.path(), &["--download-url", mirror]);
    let api = server.api();
    let mut agents = Vec::new();
    for n in 0..3 {
        agents.push(ProtocolAgent::enroll(&server, &format!("fp-m{n}"), "1.0.0").await);
    }
    for agent in &agents {
        put_on_beta(&api, &agent.id).await;
    }
    let file = publish(&server.downloads(), "1.1.0", Some("beta"), b"a good build");
    for agent in &mut agents {
        let update = agent
            .next_update(Duration::from_secs(20))
            .await
            .expect("an update");
        assert_eq!(
            update.mirror_url.as_deref(),
            Some(format!("{mirror}/{file}").as_str())
        );
        assert!(update.url.starts_with(&server.url), "{}", update.url);
        agent
            .report(AgentMessage::UpdateProgress(UpdateProgress {
                task_id: update.task_id,
                stage: UpdateStage::Downloading,
                bytes_done: 0,
                bytes_total: update.size,
                transfer: Some(Transfer {
                    source: TransferSource::Server,
                    fallback: Some(MirrorFailure::WrongBytes),
                    fallback_error: Some("checksum mismatch\nforged line".into()),
                    kind: TransferKind::Full,
                    bytes: None,
                }),
            }))
            .await;
    }
    let first = agents[0].id.clone();
    let keeper = keep_online(agents);
    let listed = eventually("the mirror to be failing", PAGE_WAIT, || async {
        let (_, listed) = api.get("/api/v1/mirrors").await;
        (listed["mirrors"][0]["failing"] == true).then_some(listed)
    })
    .await;
    let only = &listed["mirrors"][0];
    assert_eq!(only["fallbacks"], json!({"wrong_bytes": 3}), "{listed}");
    assert_eq!(
        only["last_fallback"]["error"], "checksum mismatch forged line",
        "control characters are blanked"
    );

    let Some(browser) = Browser::start(&server).await else {
        keeper.abort();
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    let banner = browser
        .wait_for_text("[data-banner=mirror]", |t| t.contains("failing"))
        .await;
    assert!(banner.contains(mirror), "{banner}");
    assert!(
        banner.contains("wrong bytes: checksum mismatch"),
        "{banner}"
    );
    let row = browser
        .wait_for_text(&format!("#mirrors tr[data-mirror='{mirror}']"), |_| true)
        .await;
    assert!(row.contains("3 (wrong bytes 3)"), "{row}");
    assert!(row.contains("server --download-url"), "{row}");
    browser.screenshot("overview-mirror-failing").await;
    // The agent's page says where it downloads from and how its task's build came.
    browser.show(&format!("#/agents/{first}")).await;
    let source = browser
        .wait_for_text("#agent-mirror", |t| t.contains(mirror))
        .await;
    assert!(source.contains("set on its server"), "{source}");
    let note = browser.wait_for_text("#tasks .transfer", |_| true).await;
    assert_eq!(note, "from the server (mirror wrong bytes)");
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    keeper.abort();
    browser.close().await;
}

/// An operator sets a site's download mirror from the Sites page, is told why a bad
/// URL is refused, and clears it again; the page says what a site without one uses.
#[tokio::test]
async fn the_sites_page_sets_and_clears_a_sites_download_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let (_, sites) = api.get("/api/v1/sites").await;
    let site = sites[0]["id"].as_str().unwrap().to_owned();
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    browser.show("#/sites").await;
    let row = format!("tr[data-site='{site}']");
    browser
        .wait_for_text(&format!("{row} td.mirror"), |t| t == "none: this server")
        .await;
    let set_to = |url: &'static str| {
        let (browser, row) = (&browser, &row);
        async move {
            browser
                .click(&format!("{row} button[data-action=set-mirror]"))
                .await;
            browser
                .wait_for_text("#confirm-text", |t| t.contains("download mirror"))
                .await;
            browser
                .client
                .find(fantoccini::Locator::Id("confirm-field-url"))
                .await
                .unwrap()
                .send_keys(url)
                .await
                .unwrap();
            browser.click("#confirm-ok").await;
        }
    };
    set_to("ftp://mirror.example.com").await;
    browser
        .wait_for_text("#toast", |t| t.contains("http:// or https://"))
        .await;
    set_to("http://mirror.example.com/drover/").await;
    browser
        .wait_for_text(&format!("{row} td.mirror"), |t| {
            t == "http://mirror.example.com/drover"
        })
        .await;
    let (_, sites) = api.get("/api/v1/sites").await;
    assert_eq!(
        sites[0]["download_mirror"],
        "http://mirror.example.com/drover"
    );
    browser.screenshot("sites-mirror").await;

    browser
        .click(&format!("{row} button[data-action=clear-mirror]"))
        .await;
    browser
        .wait_for_text("#confirm-text", |t| t.contains("Stop sending"))
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait_for_text(&format!("{row} td.mirror"), |t| t == "none: this server")
        .await;
    let (_, sites) = api.get("/api/v1/sites").await;
    assert_eq!(sites[0]["download_mirror"], Value::Null);
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    browser.close().await;
}

/// A new fleet has a point on the adoption chart at once, with axes; a snapshot carries
/// the time it was taken (not the start of its interval); a new version shows without
/// a reload; the range control asks for that range.
#[tokio::test]
async fn the_adoption_chart_shows_a_new_fleet_at_once_with_axes_and_true_times() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--snapshot-interval", "5"]);
    let api = server.api();
    let first = Online::enroll(&server, &[("fp-a1", "1.0.0"), ("fp-a2", "1.0.0")]).await;
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    let chart = "[data-adoption='linux/amd64']";
    eventually("a point for now", PAGE_WAIT, || async {
        (browser.count(&format!("{chart} circle")).await >= 1).then_some(())
    })
    .await;
    // The y axis runs to the most agents on one version: 2.
    let ticks = browser
        .run(
            "return [...document.querySelectorAll(arguments[0])].map((t) => t.textContent);",
            vec![json!(format!("{chart} .axes text.tick[data-tick]"))],
        )
        .await;
    assert_eq!(ticks, json!(["0", "1", "2"]));
    assert!(
        browser
            .text(&format!("{chart} .axes"))
            .await
            .unwrap()
            .ends_with("now")
    );

    // An agent on a new version joins: its line appears without a reload.
    let joined_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let second = Online::enroll(&server, &[("fp-a3", "1.2.0")]).await;
    eventually("the new version on the chart", PAGE_WAIT, || async {
        (browser
            .count(&format!("{chart} .series[data-version='1.2.0'] circle"))
            .await
            >= 1)
            .then_some(())
    })
    .await;
    // The first snapshot that counts it was taken after it joined.
    let at = eventually("a snapshot with 1.2.0", Duration::from_secs(20), || async {
        let (_, history) = api.get("/api/v1/fleet/history?hours=1").await;
        history
            .as_array()?
            .iter()
            .find(|p| p["version"] == "1.2.0")
            .map(|p| p["at"].as_str().unwrap().to_owned())
    })
    .await;
    let at_ms = chrono_ms(&at);
    assert!(
        at_ms >= joined_ms - 5,
        "the snapshot is labelled {at}, before the agent joined ({joined_ms})"
    );

    browser.click("button[data-range='6']").await;
    eventually("6 h chosen", PAGE_WAIT, || async {
        (browser
            .count("button[data-range='6'][aria-pressed=true]")
            .await
            == 1)
            .then_some(())
    })
    .await;
    assert_eq!(browser.count("button[aria-pressed=true]").await, 1);
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    drop((first, second));
    browser.close().await;
}

/// Milliseconds since the epoch of an RFC 3339 time in UTC, as the server writes them.
fn chrono_ms(rfc3339: &str) -> i64 {
    let output = std::process::Command::new("date")
        .args(["-u", "-d", rfc3339, "+%s%3N"])
        .output()
        .unwrap_or_else(|e| panic!("date -d {rfc3339}: {e}"));
    String::from_utf8(output.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The audit log shows new entries without a reload, names agents by hostname with a
/// link, counts "1 agent", and its relative times tick.
#[tokio::test]
async fn the_audit_log_is_live_names_its_targets_and_its_times_tick() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let fleet = Online::enroll(&server, &[("audited-host", "1.0.0")]).await;
    let agent = fleet.ids[0].clone();
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    browser.show("#/audit").await;
    browser
        .wait_for_text("#main table", |t| t.contains("session.login"))
        .await;
    assert_eq!(
        browser.run("return document.title;", vec![]).await,
        json!("Audit · Drover")
    );

    let (status, body) = api
        .post(&format!("/api/v1/agents/{agent}/pause"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let link = "tr[data-action='agent.pause'] a[data-target=agent]";
    let name = browser.wait_for_text(link, |_| true).await;
    assert_eq!(name, "audited-host");
    let href = browser
        .run(
            "return document.querySelector(arguments[0]).getAttribute('href');",
            vec![json!(link)],
        )
        .await;
    assert_eq!(href, json!(format!("#/agents/{agent}")));
    let (status, body) = api
        .post(&format!("/api/v1/agents/{agent}/resume"), None)
        .await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = api
        .post(
            "/api/v1/rollouts",
            Some(json!({ "version": "1.1.0", "selector": { "agent_ids": [agent] } })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let created = browser
        .wait_for_text("tr[data-action='rollout.create']", |_| true)
        .await;
    assert!(created.contains("1.1.0 to 1 agent"), "{created}");
    assert!(!created.contains("1 agents"), "{created}");
    assert_eq!(
        browser
            .count("tr[data-action='rollout.create'] a[data-target=rollout]")
            .await,
        1
    );

    // The times tick without any event.
    let when = "tr[data-action='rollout.create'] time";
    let before = browser.text(when).await.unwrap();
    let later = eventually("the time to tick", Duration::from_secs(10), || async {
        browser.text(when).await.filter(|t| *t != before)
    })
    .await;
    assert!(later.ends_with("s ago"), "{before} then {later}");
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    drop(fleet);
    browser.close().await;
}

/// Sites and clients show by name, never as an id, however the requests race.
#[tokio::test]
async fn sites_and_clients_show_by_name_on_the_agents_list_and_the_agent_page() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let fleet = Online::enroll(&server, &[("fp-n1", "1.0.0"), ("fp-n2", "1.0.0")]).await;
    let (_, sites) = api.get("/api/v1/sites").await;
    let site = sites[0].clone();
    let (_, clients) = api.get("/api/v1/clients").await;
    let client = clients
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == site["client_id"])
        .unwrap()
        .clone();
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.log_in(ADMIN_TOKEN).await;
    for _ in 0..6 {
        browser.open("/#/agents").await;
        let cell = browser
            .wait_for_text(
                &format!("tr[data-agent='{}'] td.site", fleet.ids[0]),
                |_| true,
            )
            .await;
        assert_eq!(cell, site["name"].as_str().unwrap());
    }
    browser.show(&format!("#/agents/{}", fleet.ids[1])).await;
    let facts = browser
        .wait_for_text("dl.identity", |t| t.contains("fp-n2"))
        .await;
    assert!(!facts.contains(site["id"].as_str().unwrap()), "{facts}");
    assert_eq!(
        browser.text("[data-site]").await.as_deref(),
        site["name"].as_str()
    );
    assert!(
        facts.contains(&format!("Client{}", client["name"].as_str().unwrap())),
        "{facts}"
    );
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    drop(fleet);
    browser.close().await;
}

/// "Update now" offers only versions newer than the agent's, and is disabled with the
/// reason when there is none.
#[tokio::test]
async fn update_now_lists_only_versions_that_would_be_an_update() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let fleet = Online::enroll(&server, &[("fp-u1", "1.1.0"), ("fp-u2", "1.2.0")]).await;
    publish(
        &server.downloads(),
        "1.0.0",
        Some("stable"),
        b"an older build",
    );
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"the stable build",
    );
    publish(&server.downloads(), "1.2.0", Some("beta"), b"a beta build");
    eventually("three builds", PAGE_WAIT, || async {
        let (_, releases) = api.get("/api/v1/releases").await;
        (releases.as_array()?.len() == 3).then_some(())
    })
    .await;
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;

    // On the newest build: nothing to update to, and the page says why.
    browser.show(&format!("#/agents/{}", fleet.ids[1])).await;
    let why = browser
        .wait_for_text("[data-why=update-now]", |_| true)
        .await;
    assert_eq!(why, "Nothing newer than 1.2.0 is offered for linux/amd64.");
    assert_eq!(
        browser
            .run(
                "return document.querySelector('button[data-action=update-now]').disabled;",
                vec![],
            )
            .await,
        json!(true)
    );

    // On 1.1.0: only 1.2.0 is listed, and the confirmation names it.
    browser.show(&format!("#/agents/{}", fleet.ids[0])).await;
    browser
        .wait_for_text("dl.identity", |t| t.contains("fp-u1"))
        .await;
    // The explain answer, as the API gives it: every candidate with its reason.
    let (_, why) = api
        .get(&format!("/api/v1/agents/{}/explain", fleet.ids[0]))
        .await;
    let candidates = why["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 3, "{why}");
    for c in candidates {
        let row = browser
            .text(&format!(
                "#explain tr[data-candidate='{}']",
                c["version"].as_str().unwrap()
            ))
            .await
            .unwrap_or_else(|| panic!("no row for {c}"));
        assert!(
            row.contains(c["reason"].as_str().unwrap_or("")),
            "{row} / {c}"
        );
    }
    let next = browser.text("#explain .next").await.unwrap();
    assert_eq!(next, format!("Next: {}", why["next"].as_str().unwrap()));
    let options = browser
        .run(
            "return [...document.querySelectorAll('#update-version option')].map((o) => o.value);",
            vec![],
        )
        .await;
    assert_eq!(options, json!(["1.2.0"]));
    browser.click("button[data-action=update-now]").await;
    let text = browser
        .wait_for_text("#confirm-text", |t| t.starts_with("Update"))
        .await;
    assert!(text.contains("from 1.1.0 to 1.2.0"), "{text}");
    browser.click("#confirm-ok").await;
    let task = eventually("the task to 1.2.0", PAGE_WAIT, || async {
        tasks_of(&server, &fleet.ids[0]).await.first().cloned()
    })
    .await;
    assert_eq!(task["to_version"], "1.2.0", "{task}");
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    drop(fleet);
    browser.close().await;
}

/// Every page at a laptop's width and at a phone's (390 × 844): nothing overflows
/// sideways at either, every button is on screen, each is saved as a screenshot in
/// `target/dashboard-screenshots/`, and no page raises a script error.
#[tokio::test]
async fn every_page_fits_a_phone_and_is_screenshot_at_both_widths() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let fleet = Online::enroll(
        &server,
        &[
            (
                "a-rather-long-hostname-for-a-phone-screen.example.internal",
                "1.0.0",
            ),
            ("fp-p2", "1.0.0"),
            ("fp-p3", "1.0.0"),
        ],
    )
    .await;
    put_on_beta(&api, &fleet.ids[2]).await;
    publish(
        &server.downloads(),
        "1.0.0",
        Some("stable"),
        b"the stable build",
    );
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    let beta = eventually("the beta rollout", PAGE_WAIT, || async {
        let (_, listed) = api.get("/api/v1/rollouts?version=1.1.0").await;
        listed.as_array()?.first().cloned()
    })
    .await;
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    let rollout = format!("#/rollouts/{}", beta["id"].as_str().unwrap());
    let agent = format!("#/agents/{}", fleet.ids[0]);
    let pages = [
        (
            "overview",
            "#/overview",
            "[data-count=online] .value",
            "Overview · Drover",
        ),
        (
            "rollouts",
            "#/rollouts",
            "tr[data-kind='beta'] td.gate",
            "Rollouts · Drover",
        ),
        (
            "rollout",
            rollout.as_str(),
            "#timeline table",
            "beta rollout of 1.1.0 · Drover",
        ),
        ("agents", "#/agents", "#agent-total", "Agents · Drover"),
        (
            "agent",
            agent.as_str(),
            "#explain",
            "a-rather-long-hostname-for-a-phone-screen.example.internal · Drover",
        ),
        ("releases", "#/releases", "#main table", "Releases · Drover"),
        (
            "enrollment",
            "#/enrollment",
            "#main table",
            "Enrollment · Drover",
        ),
        ("audit", "#/audit", "#main table", "Audit · Drover"),
    ];
    for (width, height, suffix) in [(1280, 900, "desktop"), (390, 844, "phone")] {
        browser.client.set_window_size(width, height).await.unwrap();
        for (name, hash, ready, title) in pages {
            browser.show(hash).await;
            browser.wait_for_text(ready, |_| true).await;
            eventually(&format!("the title of {name}"), PAGE_WAIT, || async {
                (browser.run("return document.title;", vec![]).await == json!(title)).then_some(())
            })
            .await;
            // A moment for late fetches to land and redraw.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let fit = browser
                .run(
                    "const w = document.documentElement.clientWidth; \
                     const off = [...document.querySelectorAll('button, a, input, select')] \
                       .filter((el) => el.offsetParent !== null) \
                       .map((el) => [el.textContent || el.getAttribute('aria-label') || el.tagName, el.getBoundingClientRect()]) \
                       .filter(([, r]) => r.right > w + 1 || r.left < -1) \
                       .map(([t]) => t); \
                     return { w, scroll: document.documentElement.scrollWidth, off };",
                    vec![],
                )
                .await;
            let w = fit["w"].as_u64().unwrap();
            if suffix == "phone" {
                assert!(w <= 400, "{name}: a phone's viewport, not {w}");
            }
            assert!(
                fit["scroll"].as_u64().unwrap() <= w,
                "{name} at {suffix} width overflows: {fit}"
            );
            assert_eq!(
                fit["off"],
                json!([]),
                "{name} at {suffix} width: controls off-screen"
            );
            browser.screenshot(&format!("{name}-{suffix}")).await;
            assert_eq!(
                browser.errors().await,
                json!([]),
                "{name} at {suffix} width"
            );
        }
    }
    drop(fleet);
    browser.close().await;
}

/// The stage counts a rollout page shows (`scope` holds one funnel), by stage.
async fn funnel_on_page(browser: &Browser, scope: &str) -> Value {
    browser
        .run(
            "const out = {}; \
             for (const el of document.querySelectorAll(arguments[0] + ' [data-stage]')) \
               out[el.dataset.stage] = Number(el.dataset.count); \
             return out;",
            vec![json!(scope)],
        )
        .await
}

/// Every stage the page shows equals the API's count.
fn same_stages(shown: &Value, counts: &Value) -> bool {
    let shown = shown.as_object().unwrap();
    !shown.is_empty() && shown.iter().all(|(stage, n)| counts[stage] == *n)
}

/// Five real agents (three on stable, two on beta). A beta build progresses live on its
/// rollout page; it is promoted from that page with a three-wave plan, whose waves the
/// page shows starting, baking and passing, with a timeline equal to the API's. A
/// broken build then halts on its canary, shown with the reason on the overview and its
/// page, and is rolled back through the type-the-version dialog, which names the
/// version agents go back to.
#[tokio::test]
async fn the_rollout_page_story() {
    let dir = tempfile::tempdir().unwrap();
    // A build dropped on stable starts with a canary of two agents.
    let server = Server::start_with_args(
        dir.path(),
        &[
            "--gate-min-successes",
            "2",
            "--success-bake",
            "1s",
            "--default-waves",
            "2,100%",
        ],
    );
    let api = server.api();
    publish_agent(&server, dir.path(), "1.0.0", "stable");
    let names = ["st-1", "st-2", "st-3", "be-1", "be-2"];
    let _fleet: Vec<Agent> = names
        .iter()
        .map(|name| {
            let exe = dir.path().join(format!("{name}-bin/drover-agent"));
            stamp_agent("1.0.0", &exe);
            Agent::start_installed(
                &server,
                &exe,
                dir.path(),
                name,
                &[
                    "--enroll-token",
                    ENROLL_TOKEN,
                    "--fingerprint",
                    &format!("fp-{name}"),
                    // A broken build is given up on soon.
                    "--probation-timeout",
                    "5",
                ],
            )
        })
        .collect();
    let agents = all_online(&api, 5).await;
    for agent in agents
        .iter()
        .filter(|a| a["hostname"].as_str().is_some_and(|h| h.starts_with("be-")))
    {
        put_on_beta(&api, agent["id"].as_str().unwrap()).await;
    }
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    eventually("live updates on", PAGE_WAIT, || async {
        (browser.count("#live.on").await == 1).then_some(())
    })
    .await;
    let rollout_of = |version: &'static str, kind: &'static str| {
        let api = &api;
        async move {
            let (_, listed) = api
                .get(&format!("/api/v1/rollouts?version={version}"))
                .await;
            listed
                .as_array()?
                .iter()
                .find(|r| r["kind"] == kind)
                .cloned()
        }
    };
    let record = |id: String| {
        let api = &api;
        async move { api.get(&format!("/api/v1/rollouts/{id}")).await.1 }
    };

    // The beta build, watched on its own page.
    publish_agent(&server, dir.path(), "1.1.0", "beta");
    let beta = eventually("the beta rollout", PAGE_WAIT, || {
        rollout_of("1.1.0", "beta")
    })
    .await;
    let beta_id = beta["id"].as_str().unwrap().to_owned();
    assert_eq!(beta["targeted"], 2, "{beta}");
    browser.show(&format!("#/rollouts/{beta_id}")).await;
    browser
        .wait_for_text("#rollout-title", |t| t.contains("beta rollout"))
        .await;
    browser.run("window.stillHere = true;", vec![]).await;
    eventually(
        "both beta agents succeeded on the page",
        Duration::from_secs(90),
        || async {
            let shown = funnel_on_page(&browser, "#rollout-funnel").await;
            (shown["succeeded"] == 2).then_some(())
        },
    )
    .await;
    browser
        .wait_for_text("#rollout-title .state", |s| s == "completed")
        .await;
    let done = record(beta_id.clone()).await;
    assert!(
        same_stages(&funnel_on_page(&browser, "#rollout-funnel").await, &done),
        "{done}"
    );
    // The agents section lists both, by stage.
    browser
        .wait_for_text("#rollout-agents-total", |t| t == "1–2 of 2")
        .await;
    assert_eq!(
        browser
            .count("#rollout-agents tr[data-stage=succeeded]")
            .await,
        2
    );
    browser.wait_for_text("[data-gate=ready]", |_| true).await;
    assert_eq!(browser.run("return window.stillHere;", vec![]).await, true);
    browser.screenshot("story-rollout-beta").await;

    // Promote from the page, in three waves with a short bake.
    browser.click("button[data-action=promote]").await;
    let text = browser
        .wait_for_text("#confirm-text", |t| t.starts_with("Promote"))
        .await;
    assert!(text.contains("3 stable agents will update"), "{text}");
    for (field, value) in [("waves", "1,2,100%"), ("bake", "4s")] {
        browser
            .client
            .find(fantoccini::Locator::Id(&format!("confirm-field-{field}")))
            .await
            .unwrap()
            .send_keys(value)
            .await
            .unwrap();
    }
    browser.click("#confirm-ok").await;
    let promote = eventually("the promote rollout", PAGE_WAIT, || {
        rollout_of("1.1.0", "promote")
    })
    .await;
    let promote_id = promote["id"].as_str().unwrap().to_owned();
    let shares: Vec<&str> = promote["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["share"].as_str().unwrap())
        .collect();
    assert_eq!(shares, ["1", "2", "100%"], "{promote}");
    browser.show(&format!("#/rollouts/{promote_id}")).await;
    // Watch each wave's state on the page until the rollout completes.
    let seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    eventually(
        "the promote completed on the page",
        Duration::from_secs(120),
        || async {
            let states = browser
                .run(
                    "return [...document.querySelectorAll('.wave-card')] \
                       .map((c) => c.dataset.wave + ':' + c.querySelector('[data-wave-state]').dataset.waveState);",
                    vec![],
                )
                .await;
            for s in states.as_array()? {
                seen.borrow_mut().insert(s.as_str()?.to_owned());
            }
            let title = browser.text("#rollout-title .state").await?;
            (title == "completed").then_some(())
        },
    )
    .await;
    let seen = seen.into_inner();
    for wave in 0..2 {
        assert!(seen.contains(&format!("{wave}:running")), "{seen:?}");
        assert!(seen.contains(&format!("{wave}:baking")), "{seen:?}");
    }
    assert!(seen.contains("1:pending"), "{seen:?}");
    let done = record(promote_id.clone()).await;
    assert_eq!(done["succeeded"], 3, "{done}");
    // The page redraws after the last event; then it shows the API's numbers.
    eventually(
        "the page's funnel equal to the API's",
        PAGE_WAIT,
        || async {
            same_stages(&funnel_on_page(&browser, "#rollout-funnel").await, &done).then_some(())
        },
    )
    .await;
    for (i, wave) in done["waves"].as_array().unwrap().iter().enumerate() {
        let shown = funnel_on_page(&browser, &format!(".wave-card[data-wave='{i}']")).await;
        assert!(
            same_stages(&shown, &wave["counts"]),
            "wave {i}: {shown} / {wave}"
        );
    }
    let timeline = done["timeline"].as_array().unwrap();
    assert_eq!(
        browser.count("#timeline tbody tr").await,
        timeline.len() as u64,
        "{timeline:?}"
    );
    let shown = browser.text("#timeline tbody").await.unwrap();
    for entry in timeline {
        if let Some(detail) = entry["detail"].as_str() {
            assert!(shown.contains(detail), "{detail} not in {shown}");
        }
    }
    browser.screenshot("story-rollout-promote").await;

    // A broken build, straight onto stable: it starts and exits at once, so its canary
    // fails probation and halts it.
    publish(
        &server.downloads(),
        "1.2.0",
        Some("stable"),
        b"#!/bin/sh\nexit 3\n",
    );
    let halted = eventually(
        "the 1.2.0 rollout halted",
        Duration::from_secs(90),
        || async {
            let (_, listed) = api.get("/api/v1/rollouts?version=1.2.0&state=halted").await;
            listed.as_array()?.first().cloned()
        },
    )
    .await;
    let halted_id = halted["id"].as_str().unwrap().to_owned();
    let reason = halted["reason"].as_str().unwrap().to_owned();
    browser.show("#/overview").await;
    let banner = browser
        .wait_for_text("[data-banner=halted]", |t| t.contains("1.2.0"))
        .await;
    assert!(banner.contains(&reason), "{banner} / {reason}");
    let row = format!("tr[data-rollout='{halted_id}']");
    let shown = browser.wait_for_text(&row, |t| t.contains("halted")).await;
    assert!(shown.contains(&reason), "{shown}");
    assert_eq!(
        browser.text(&format!("{row} td.failures.bad")).await,
        Some(halted["failures"]["build"].to_string())
    );
    browser.screenshot("story-overview-halted").await;
    browser.show(&format!("#/rollouts/{halted_id}")).await;
    browser
        .wait_for_text("#rollout-title", |t| {
            t.contains("halted") && t.contains(&reason)
        })
        .await;
    assert_eq!(
        browser
            .text(".wave-card[data-wave='0'] [data-wave-state]")
            .await
            .as_deref(),
        Some("halted")
    );
    browser.screenshot("story-rollout-halted").await;

    // Roll it back from its page: the dialog names where agents go, and wants the version.
    browser.click("button[data-action=roll-back]").await;
    let text = browser
        .wait_for_text("#confirm-text", |t| t.starts_with("Roll back"))
        .await;
    assert!(text.contains("Roll back 1.2.0"), "{text}");
    assert!(text.contains("go back to 1.1.0"), "{text}");
    browser.confirm_typing("1.2.0").await;
    eventually("1.2.0 blocked", PAGE_WAIT, || async {
        let (_, releases) = api.get("/api/v1/releases").await;
        releases
            .as_array()?
            .iter()
            .any(|r| r["version"] == "1.2.0" && r["blocked"] == true)
            .then_some(())
    })
    .await;
    browser
        .wait_for_text("#rollout-title", |t| t.contains("blocked"))
        .await;
    eventually("every agent on 1.1.0", Duration::from_secs(60), || async {
        let agents = api.agents().await?;
        (agents.len() == 5
            && agents
                .iter()
                .all(|a| a["version"] == "1.1.0" && a["online"] == true))
        .then_some(())
    })
    .await;
    assert_eq!(browser.run("return window.stillHere;", vec![]).await, true);
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    browser.close().await;
}

/// The agents list keeps its filters in the address: a filtered view can be linked to,
/// and survives a reload.
#[tokio::test]
async fn the_agents_filters_live_in_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let fleet = Online::enroll(
        &server,
        &[("web-1", "1.0.0"), ("web-2", "1.0.0"), ("db-1", "1.0.0")],
    )
    .await;
    put_on_beta(&api, &fleet.ids[1]).await;
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.log_in(ADMIN_TOKEN).await;
    // A link to a filtered view.
    browser.open("/#/agents?channel=beta").await;
    browser
        .wait_for_text("#agent-total", |t| t.ends_with("of 1"))
        .await;
    assert_eq!(
        browser
            .count(&format!("tr[data-agent='{}']", fleet.ids[1]))
            .await,
        1
    );
    assert_eq!(
        browser
            .run(
                "return document.querySelector('[data-filter=channel]').value;",
                vec![]
            )
            .await,
        json!("beta")
    );
    // Changing a filter changes the address; a reload keeps it.
    browser
        .run(
            "const s = document.querySelector('[data-filter=channel]'); s.value = 'stable'; \
             s.dispatchEvent(new Event('change'));",
            vec![],
        )
        .await;
    browser
        .wait_for_text("#agent-total", |t| t.ends_with("of 2"))
        .await;
    let hash = browser.run("return location.hash;", vec![]).await;
    assert_eq!(hash, json!("#/agents?channel=stable"));
    browser.client.refresh().await.unwrap();
    browser
        .wait_for_text("#agent-total", |t| t.ends_with("of 2"))
        .await;
    assert_eq!(browser.count("tr[data-agent]").await, 2);
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    drop(fleet);
    browser.close().await;
}

/// The agents list sorts by a column (the order in the address too) and acts on the
/// agents selected: pause, and a targeted rollout of a version.
#[tokio::test]
async fn the_agents_list_sorts_and_acts_on_a_selection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let fleet = Online::enroll(
        &server,
        &[
            ("b-host", "1.10.0"),
            ("a-host", "1.2.0"),
            ("c-host", "1.9.0"),
        ],
    )
    .await;
    publish(&server.downloads(), "1.11.0", Some("beta"), b"a beta build");
    eventually("the build offered", PAGE_WAIT, || async {
        let (_, releases) = api.get("/api/v1/releases").await;
        (!releases.as_array()?.is_empty()).then_some(())
    })
    .await;
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;
    browser.show("#/agents").await;
    let order = || async {
        browser
            .run(
                "return [...document.querySelectorAll('tr[data-agent] td:nth-child(3) a')].map((a) => a.textContent);",
                vec![],
            )
            .await
    };
    browser
        .wait_for_text("#agent-total", |t| t.ends_with("of 3"))
        .await;
    assert_eq!(order().await, json!(["a-host", "b-host", "c-host"]));
    // By version, semver order (1.2.0 < 1.9.0 < 1.10.0), then reversed.
    browser.click("button[data-sort=version]").await;
    eventually("sorted by version", PAGE_WAIT, || async {
        (order().await == json!(["a-host", "c-host", "b-host"])).then_some(())
    })
    .await;
    browser.click("button[data-sort=version]").await;
    eventually("sorted by version, newest first", PAGE_WAIT, || async {
        (order().await == json!(["b-host", "c-host", "a-host"])).then_some(())
    })
    .await;
    assert_eq!(
        browser.run("return location.hash;", vec![]).await,
        json!("#/agents?sort=-version")
    );

    // Select two and move them to 1.11.0 in a targeted rollout.
    for id in [&fleet.ids[1], &fleet.ids[2]] {
        browser.click(&format!("input[data-select='{id}']")).await;
    }
    browser
        .wait_for_text("#bulk-count", |t| t == "2 agents selected")
        .await;
    browser.click("button[data-action=update-selected]").await;
    let text = browser
        .wait_for_text("#confirm-text", |t| t.starts_with("Update"))
        .await;
    assert!(
        text.contains("Update 2 selected agents to 1.11.0"),
        "{text}"
    );
    browser.click("#confirm-ok").await;
    let targeted = eventually("the targeted rollout", PAGE_WAIT, || async {
        let (_, listed) = api.get("/api/v1/rollouts?version=1.11.0").await;
        listed
            .as_array()?
            .iter()
            .find(|r| r["kind"] == "targeted")
            .cloned()
    })
    .await;
    assert_eq!(targeted["targeted"], 2, "{targeted}");

    // The selection is cleared after an action. Select one and pause it.
    browser
        .wait_for_text("#bulk-count", |t| t == "0 agents selected")
        .await;
    browser
        .click(&format!("input[data-select='{}']", fleet.ids[0]))
        .await;
    browser
        .wait_for_text("#bulk-count", |t| t == "1 agent selected")
        .await;
    browser.click("button[data-action=pause-selected]").await;
    let text = browser
        .wait_for_text("#confirm-text", |t| t.starts_with("Pause"))
        .await;
    assert!(
        text.contains("Pause automatic updates of 1 selected agent."),
        "{text}"
    );
    browser.click("#confirm-ok").await;
    eventually("b-host paused", PAGE_WAIT, || async {
        let (_, agent) = api.get(&format!("/api/v1/agents/{}", fleet.ids[0])).await;
        (agent["paused"] == true).then_some(())
    })
    .await;
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    drop(fleet);
    browser.close().await;
}

/// Reads an event stream until the server ends it; false when it is still open after
/// `within`.
async fn stream_ends(stream: &mut reqwest::Response, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.chunk()).await {
            Err(_) => return false,
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None) | Err(_)) => return true,
        }
    }
}

#[tokio::test]
async fn a_session_lives_on_the_server_and_ends_at_logout_or_with_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let viewer = create_token(&server, "watcher", "viewer").await;
    let http = reqwest::Client::new();

    // The cookie holds a random session id: neither the token nor any encoding of it.
    let mut browser = Browserish::new(&server);
    let (status, body, set_cookie) = browser.login(&viewer).await;
    assert_eq!(status, 200, "{body}");
    let set_cookie = set_cookie.unwrap();
    let value = browser.cookie.clone().unwrap();
    let value = value.strip_prefix("drover_session=").unwrap();
    assert!(!value.contains(&viewer), "{set_cookie}");
    assert!(!value.contains(&hex::encode(&viewer)), "{set_cookie}");
    assert!(set_cookie.contains("Max-Age=43200"), "{set_cookie}");
    let (status, _) = browser
        .call(reqwest::Method::GET, "/api/v1/agents", &[])
        .await;
    assert_eq!(status, 200);

    // Logging out ends the session on the server: the same cookie, replayed, is refused,
    // and an event stream opened with it ends.
    let mut stream = http
        .get(format!("{}/api/v1/events", server.url))
        .header(reqwest::header::COOKIE, browser.cookie.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let (status, _) = browser
        .call(
            reqwest::Method::DELETE,
            "/api/v1/session",
            &[("X-Drover", "1")],
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = browser
        .call(reqwest::Method::GET, "/api/v1/agents", &[])
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        stream_ends(&mut stream, Duration::from_secs(12)).await,
        "the stream ends with its session"
    );

    // Revoking the token ends every session made with it.
    let mut browser = Browserish::new(&server);
    let (status, _, _) = browser.login(&viewer).await;
    assert_eq!(status, 200);
    let (_, tokens) = server.api().get("/api/v1/tokens").await;
    let id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "watcher")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = server
        .api()
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = browser
        .call(reqwest::Method::GET, "/api/v1/session", &[])
        .await;
    assert_eq!(status, 401);

    // Only JSON logs in: a form post (what a foreign page can send) is refused.
    for (content_type, body) in [
        (
            "application/x-www-form-urlencoded",
            format!("token={ADMIN_TOKEN}"),
        ),
        ("text/plain", format!("{{\"token\": \"{ADMIN_TOKEN}\"}}")),
    ] {
        let response = http
            .post(format!("{}/api/v1/session", server.url))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 415, "{content_type}");
        assert!(
            response
                .headers()
                .get(reqwest::header::SET_COOKIE)
                .is_none()
        );
    }

    // Failed logins are audited, and an address that keeps failing is turned away, even
    // with a good token, until its limit refills.
    let mut guesser = Browserish::new(&server);
    let mut statuses = Vec::new();
    for i in 0..12 {
        let (status, _, _) = guesser.login(&format!("guess-{i}")).await;
        statuses.push(status);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let (status, body, _) = guesser.login(ADMIN_TOKEN).await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("too many failed login attempts"),
        "{body}"
    );
    let (_, audit) = server
        .api()
        .get("/api/v1/audit?action=session.login&limit=100")
        .await;
    let refused = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["result"] == "refused")
        .count();
    assert!(refused >= 10, "{audit}");
    assert!(server.log().contains("dashboard login refused"));
}

#[tokio::test]
async fn enrollment_tokens_are_revoked_from_the_page_and_a_fingerprint_conflict_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let (_, sites) = api.get("/api/v1/sites").await;
    let site = sites[0]["id"].as_str().unwrap().to_owned();
    let (status, made) = api
        .post(
            &format!("/api/v1/sites/{site}/enrollment-tokens"),
            Some(json!({"max_uses": 3})),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let token_id = made["id"].as_str().unwrap().to_owned();
    // A live agent, and a second machine with its fingerprint that is refused.
    let fleet = Online::enroll(&server, &[("fp-shared", "1.0.0")]).await;
    assert!(
        ProtocolAgent::enroll_with(&server, "fp-shared", ENROLL_TOKEN)
            .await
            .is_none(),
        "a live agent's fingerprint does not enroll"
    );
    let Some(browser) = Browser::start(&server).await else {
        return;
    };
    browser.client.set_window_size(1280, 900).await.unwrap();
    browser.log_in(ADMIN_TOKEN).await;

    browser.show("#/enrollment").await;
    let row = format!("tr[data-token='{token_id}']");
    let text = browser.wait_for_text(&row, |_| true).await;
    assert!(text.contains("0 of 3") && text.contains("usable"), "{text}");
    assert!(text.contains("default"), "the site by name: {text}");
    browser
        .click(&format!("{row} button[data-action=revoke]"))
        .await;
    let confirm = browser
        .wait_for_text("#confirm-text", |t| !t.is_empty())
        .await;
    assert!(
        confirm.contains(&format!("Revoke enrollment token {}", &token_id[..8])),
        "{confirm}"
    );
    // Cancelled: nothing happens.
    browser.click("#confirm-cancel").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, tokens) = api.get("/api/v1/enrollment-tokens").await;
    let state = |tokens: &Value| {
        tokens
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == token_id.as_str())
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state(&tokens), "usable");
    browser
        .click(&format!("{row} button[data-action=revoke]"))
        .await;
    browser
        .wait_for_text("#confirm-text", |t| t.contains("Revoke enrollment token"))
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait_for_text(&format!("{row}[data-state=revoked]"), |t| {
            t.contains("revoked")
        })
        .await;
    let (_, tokens) = api.get("/api/v1/enrollment-tokens").await;
    assert_eq!(state(&tokens), "revoked");
    assert_eq!(
        browser
            .count(&format!("{row} button[data-action=revoke]"))
            .await,
        0,
        "a revoked token has no button"
    );

    // The conflict shows on the agents list and on the agent's page.
    let id = &fleet.ids[0];
    browser.show("#/agents").await;
    let marker = browser
        .wait_for_text(&format!("tr[data-agent='{id}'] .marker.conflict"), |_| true)
        .await;
    assert_eq!(marker, "fingerprint conflict");
    browser.show(&format!("#/agents/{id}")).await;
    let banner = browser
        .wait_for_text("#fingerprint-conflict", |_| true)
        .await;
    assert!(
        banner.contains("Fingerprint conflict: 1 enrollment from another machine"),
        "{banner}"
    );
    assert_eq!(browser.errors().await, json!([]));

    // A viewer sees no tokens.
    let viewer = create_token(&server, "watcher", "viewer").await;
    browser.run("return fetch('/api/v1/session', {method: 'DELETE', headers: {'X-Drover': '1'}}).then(() => true);", vec![]).await;
    browser.log_in(&viewer).await;
    browser.show("#/enrollment").await;
    browser
        .wait_for_text("#main", |t| t.contains("shown to admins only"))
        .await;
    assert_eq!(browser.count("button[data-action=revoke]").await, 0);
    drop(fleet);
    browser.close().await;
}

/// A task whose build came as a delta says so on the agent's page, with the bytes that
/// crossed instead of the build's.
#[tokio::test]
async fn the_agent_page_says_a_build_came_as_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let mut agent = ProtocolAgent::enroll(&server, "fp-delta", "1.0.0").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"the next build",
    );
    let update = agent
        .next_update(Duration::from_secs(20))
        .await
        .expect("an update");
    agent
        .report(AgentMessage::UpdateProgress(UpdateProgress {
            task_id: update.task_id,
            stage: UpdateStage::Downloading,
            bytes_done: 0,
            bytes_total: 2256,
            transfer: Some(Transfer {
                source: TransferSource::Server,
                fallback: None,
                fallback_error: None,
                kind: TransferKind::Delta,
                bytes: Some(2256),
            }),
        }))
        .await;
    let id = agent.id.clone();
    let keeper = keep_online(vec![agent]);
    let Some(browser) = Browser::start(&server).await else {
        keeper.abort();
        return;
    };
    browser.log_in(ADMIN_TOKEN).await;
    browser.show(&format!("#/agents/{id}")).await;
    let note = browser
        .wait_for_text("#tasks .transfer", |t| t.contains("delta"))
        .await;
    assert_eq!(note, "from the server, as a delta (2.2 KiB)");
    assert_eq!(browser.errors().await, json!([]), "errors in the page");
    keeper.abort();
    browser.close().await;
}
