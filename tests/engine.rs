//! End-to-end: the update engine against the real server. Builds dropped into the
//! downloads directory reach the right agents, tasks move through their states, silent
//! tasks are re-sent and time out, operators pause and force, and channels resolve.

mod support;

use std::time::Duration;

use protocol::{
    AgentMessage, FailureClass, UpdateOutcome, UpdateProgress, UpdateResult, UpdateStage,
};
use serde_json::json;
use support::*;

const SOON: Duration = Duration::from_secs(5);

async fn tasks(server: &Server, agent: &str) -> Vec<serde_json::Value> {
    let (status, body) = server.api().get(&format!("/api/v1/agents/{agent}")).await;
    assert_eq!(status, 200, "{body}");
    body["tasks"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_beta_build_dropped_in_reaches_beta_agents_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut beta = ProtocolAgent::enroll(&server, "fp-beta", "1.0.0").await;
    let mut stable = ProtocolAgent::enroll(&server, "fp-stable", "1.0.0").await;
    let (status, body) = api
        .put(
            &format!("/api/v1/agents/{}/channel", beta.id),
            json!({"channel": "beta"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        beta.channel.as_deref(),
        Some("stable"),
        "the welcome names it"
    );
    assert!(
        beta.next_message(Duration::from_millis(600))
            .await
            .is_none(),
        "no build yet"
    );
    // The session hears of its new channel at once, and a new session from the welcome.
    assert_eq!(beta.channel.as_deref(), Some("beta"));
    assert_eq!(stable.channel.as_deref(), Some("stable"));

    // No restart, no rescan call: the watcher finds the file.
    let contents = b"new agent build".repeat(1000);
    let file = publish(&server.downloads(), "1.1.0", Some("beta"), &contents);
    let update = beta
        .next_update(SOON)
        .await
        .expect("the beta agent is sent the build");
    assert_eq!(update.version, "1.1.0");
    assert_eq!(update.size, contents.len() as u64);
    assert!(
        update.url.starts_with(&format!(
            "{}/downloads/{file}?task={}&grant=",
            server.url, update.task_id
        )),
        "{}",
        update.url
    );
    assert!(!update.rollback);
    assert!(update.sent_at_ms > 0);
    let download = reqwest::get(&update.url).await.unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(
        download.bytes().await.unwrap().as_ref(),
        contents.as_slice()
    );

    assert!(
        stable.next_message(Duration::from_secs(2)).await.is_none(),
        "stable agents get no beta build"
    );

    let listed = tasks(&server, &beta.id).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["status"], "dispatched");
    assert_eq!(listed[0]["kind"], "update");
    assert_eq!(listed[0]["from_version"], "1.0.0");
    assert_eq!(listed[0]["to_version"], "1.1.0");
    assert_eq!(listed[0]["id"], update.task_id.as_str());
    assert!(tasks(&server, &stable.id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn task_moves_through_its_states_and_succeeds_only_on_the_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    publish(&server.downloads(), "1.1.0", None, b"stable build");
    // An agent that starts outdated is told at once, on connect.
    let mut agent = ProtocolAgent::enroll(&server, "fp-mover", "1.0.0").await;
    let update = agent.next_update(SOON).await.expect("update on connect");

    for (stage, status) in [
        (UpdateStage::Downloading, "downloading"),
        (UpdateStage::Verifying, "verifying"),
        (UpdateStage::Installing, "installing"),
        (UpdateStage::Restarting, "restarting"),
    ] {
        agent
            .report(AgentMessage::UpdateProgress(UpdateProgress {
                task_id: update.task_id.clone(),
                stage,
                bytes_done: 6,
                bytes_total: 12,
                transfer: None,
            }))
            .await;
        eventually(status, SOON, || async {
            let listed = tasks(&server, &agent.id).await;
            (listed[0]["status"] == status && listed[0]["bytes_done"] == 6).then_some(())
        })
        .await;
    }

    // "Succeeded" from the old version is not believed.
    agent
        .report(AgentMessage::UpdateResult(UpdateResult {
            task_id: update.task_id.clone(),
            outcome: UpdateOutcome::Succeeded,
            version: "1.1.0".into(),
            error: None,
            failure_class: None,
            transfer: None,
        }))
        .await;
    agent.heartbeat().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tasks(&server, &agent.id).await[0]["status"], "restarting");

    // The new version connects and heartbeats: that is success.
    agent.reconnect(&server, "1.1.0").await;
    assert!(
        agent
            .next_message(Duration::from_millis(800))
            .await
            .is_none()
    );
    eventually("success", SOON, || async {
        (tasks(&server, &agent.id).await[0]["status"] == "succeeded").then_some(())
    })
    .await;
    let (_, listed) = server
        .api()
        .get(&format!("/api/v1/agents/{}", agent.id))
        .await;
    assert_eq!(listed["version"], "1.1.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_resends_without_an_attempt_and_silence_times_out_as_transient() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--task-timeout", "3"]);
    publish(&server.downloads(), "1.1.0", None, b"build one");
    let mut agent = ProtocolAgent::enroll(&server, "fp-silent", "1.0.0").await;
    let first = agent.next_update(SOON).await.expect("first dispatch");

    // Three reconnects: the same task each time, and none of them is an attempt.
    for _ in 0..3 {
        agent.reconnect(&server, "1.0.0").await;
        let again = agent
            .next_update(SOON)
            .await
            .expect("sent again on connect");
        assert_eq!(again.task_id, first.task_id, "the same task is sent again");
    }
    let listed = tasks(&server, &agent.id).await;
    assert_eq!(
        (listed.len(), listed[0]["attempts"].as_i64()),
        (1, Some(1)),
        "{listed:?}"
    );

    // The agent keeps heartbeating and ignoring it: without progress it times out, and
    // that is nobody's fault but the network's (timeout 3 s; retried 2 s after).
    assert!(agent.next_message(Duration::from_secs(4)).await.is_none());
    let listed = tasks(&server, &agent.id).await;
    let timed_out = &listed[0];
    assert_eq!(
        (
            timed_out["status"].as_str(),
            timed_out["failure_class"].as_str()
        ),
        (Some("timed_out"), Some("transient")),
        "{timed_out}"
    );
    assert!(
        timed_out["error"].as_str().unwrap().contains("no progress"),
        "{timed_out}"
    );

    // Not the build's fault, so the version is offered again after the retry delay.
    let retry = agent
        .next_update(Duration::from_secs(10))
        .await
        .expect("the version is retried");
    assert_eq!(retry.version, "1.1.0");
    assert_ne!(retry.task_id, first.task_id);
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_stops_dispatch_and_a_requested_update_overrides_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut agent = ProtocolAgent::enroll(&server, "fp-paused", "1.0.0").await;
    let (status, body) = api
        .post(&format!("/api/v1/agents/{}/pause", agent.id), None)
        .await;
    assert_eq!((status, &body["paused"]), (200, &json!(true)), "{body}");

    publish(&server.downloads(), "1.1.0", None, b"stable build");
    assert!(
        agent.next_message(Duration::from_secs(2)).await.is_none(),
        "paused agents get nothing"
    );
    // A pause holds for requested updates too: the operator resumes first.
    let (status, body) = api
        .post(&format!("/api/v1/agents/{}/update", agent.id), None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("paused"),
        "{body}"
    );
    let (status, _) = api
        .post(&format!("/api/v1/agents/{}/resume", agent.id), None)
        .await;
    assert_eq!(status, 200);
    let offered = agent.next_update(SOON).await.expect("offered once resumed");
    assert_eq!(offered.version, "1.1.0");

    let (status, body) = api
        .post(&format!("/api/v1/agents/{}/update", agent.id), None)
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["pushed"], true);
    assert_eq!(body["task"]["kind"], "forced");
    // The task it had is cancelled first, saying why.
    match agent.next_message(SOON).await {
        Some(protocol::ServerMessage::Cancel(cancel)) => {
            assert_eq!(cancel.task_id, offered.task_id);
            assert!(
                cancel.reason.contains("requested update to 1.1.0"),
                "{cancel:?}"
            );
        }
        other => panic!("expected the offered task to be cancelled, got {other:?}"),
    }
    let update = agent
        .next_update(SOON)
        .await
        .expect("the requested update is pushed at once");
    assert_eq!(update.version, "1.1.0");
    assert_eq!(update.task_id, body["task"]["id"].as_str().unwrap());

    // A failure is recorded with its reason; the version is not offered again...
    agent
        .report(AgentMessage::UpdateResult(UpdateResult {
            task_id: update.task_id.clone(),
            outcome: UpdateOutcome::Failed,
            version: "1.0.0".into(),
            error: Some("checksum mismatch".into()),
            failure_class: Some(FailureClass::Build),
            transfer: None,
        }))
        .await;
    eventually("the failure", SOON, || async {
        let listed = tasks(&server, &agent.id).await;
        (listed[0]["status"] == "failed" && listed[0]["error"] == "checksum mismatch").then_some(())
    })
    .await;
    let (status, _) = api
        .post(&format!("/api/v1/agents/{}/resume", agent.id), None)
        .await;
    assert_eq!(status, 200);
    assert!(agent.next_message(Duration::from_secs(2)).await.is_none());

    // ...unless an operator forces it.
    let (status, _) = api
        .post(
            &format!("/api/v1/agents/{}/update", agent.id),
            Some(json!({"version": "1.1.0"})),
        )
        .await;
    assert_eq!(status, 202);
    assert!(agent.next_update(SOON).await.is_some());

    // Requests that cannot work say why.
    let cases = [
        (json!({"version": "9.9.9"}), 404),
        (json!({"version": "not-semver"}), 400),
        (json!({"colour": "red"}), 400),
    ];
    for (body, expected) in cases {
        let (status, answer) = api
            .post(
                &format!("/api/v1/agents/{}/update", agent.id),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, expected, "{body}: {answer}");
        assert!(answer["error"].is_string());
    }
    let (status, _) = api.post("/api/v1/agents/nobody/update", None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn requested_update_for_an_offline_agent_waits_for_it_to_connect() {
    let dir = tempfile::tempdir().unwrap();
    // It comes back by enrolling again, re-bound as soon as its record is offline.
    let server = Server::start_with_args(dir.path(), &["--rebind-after", "0s"]);
    let api = server.api();
    let agent = ProtocolAgent::enroll(&server, "fp-away", "1.0.0").await;
    let id = agent.id.clone();
    let secret = agent.secret.clone();
    drop(agent);
    // A beta build: only the request can move this stable agent to it.
    publish(&server.downloads(), "1.2.0", Some("beta"), b"build");
    eventually(
        "the agent to be offline and the build offered",
        SOON,
        || async {
            let (_, body) = api.get(&format!("/api/v1/agents/{id}")).await;
            let (_, releases) = api.get("/api/v1/releases").await;
            (body["online"] == false && releases.as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    let (status, body) = api
        .post(
            &format!("/api/v1/agents/{id}/update"),
            Some(json!({"version": "1.2.0"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["pushed"], false);
    assert!(body["task"]["rollout_id"].is_string(), "{body}");
    assert_eq!(body["task"]["status"], "queued");

    let mut back = ProtocolAgent::enroll(&server, "fp-away", "1.0.0").await;
    assert_eq!(back.id, id, "re-bound to its record");
    assert_ne!(back.secret, secret);
    let update = back.next_update(SOON).await.expect("sent on connect");
    assert_eq!(update.version, "1.2.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn channels_resolve_from_agent_site_and_client() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let agent = ProtocolAgent::enroll(&server, "fp-channels", "1.0.0").await;

    let (_, agent_view) = api.get(&format!("/api/v1/agents/{}", agent.id)).await;
    let site = agent_view["site_id"].as_str().unwrap().to_owned();
    let (_, clients) = api.get("/api/v1/clients").await;
    let client = clients[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(clients[0]["name"], "default");

    let resolved = || async {
        let (_, view) = api.get(&format!("/api/v1/agents/{}", agent.id)).await;
        (
            view["channel"].as_str().unwrap().to_owned(),
            view["channel_source"].as_str().unwrap().to_owned(),
        )
    };
    let steps = [
        (
            format!("/api/v1/clients/{client}/channel"),
            json!("beta"),
            ("beta", "client"),
        ),
        (
            format!("/api/v1/sites/{site}/channel"),
            json!("stable"),
            ("stable", "site"),
        ),
        (
            format!("/api/v1/agents/{}/channel", agent.id),
            json!("beta"),
            ("beta", "agent"),
        ),
        (
            format!("/api/v1/agents/{}/channel", agent.id),
            json!(null),
            ("stable", "site"),
        ),
        (
            format!("/api/v1/sites/{site}/channel"),
            json!(null),
            ("beta", "client"),
        ),
        (
            format!("/api/v1/clients/{client}/channel"),
            json!(null),
            ("stable", "default"),
        ),
    ];
    for (path, channel, (expected, source)) in steps {
        let (status, body) = api.put(&path, json!({ "channel": channel })).await;
        assert_eq!(status, 200, "{path}: {body}");
        let (got, got_source) = resolved().await;
        assert_eq!(
            (got.as_str(), got_source.as_str()),
            (expected, source),
            "after {path} = {channel}"
        );
    }

    let (status, body) = api
        .put(
            &format!("/api/v1/sites/{site}/channel"),
            json!({"channel": "nightly"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = api
        .put("/api/v1/sites/nope/channel", json!({"channel": "beta"}))
        .await;
    assert_eq!(status, 404);

    // Clients and sites can be created and listed.
    let (status, created) = api
        .post("/api/v1/clients", Some(json!({"name": "acme"})))
        .await;
    assert_eq!(status, 201, "{created}");
    let (status, _) = api
        .post("/api/v1/clients", Some(json!({"name": "acme"})))
        .await;
    assert_eq!(status, 409);
    let client_id = created["id"].as_str().unwrap();
    let (status, site) = api
        .post(
            "/api/v1/sites",
            Some(json!({"client_id": client_id, "name": "berlin"})),
        )
        .await;
    assert_eq!(status, 201, "{site}");
    assert_eq!(site["client_id"], client_id);
    let (_, sites) = api.get("/api/v1/sites").await;
    assert_eq!(sites.as_array().unwrap().len(), 2);
    let (status, _) = api
        .post(
            "/api/v1/sites",
            Some(json!({"client_id": "nope", "name": "x"})),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_switched_off_server_wide_stop_dispatch_and_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let file = publish(&server.downloads(), "1.1.0", None, b"build");
    let (status, _) = api.put("/api/v1/updates", json!({"enabled": false})).await;
    assert_eq!(status, 200);
    let mut agent = ProtocolAgent::enroll(&server, "fp-switch", "1.0.0").await;
    assert!(agent.next_message(Duration::from_secs(2)).await.is_none());
    let download = reqwest::get(format!("{}/downloads/{file}", server.url))
        .await
        .unwrap();
    assert_eq!(download.status(), 403);

    let (status, body) = api.get("/api/v1/updates").await;
    assert_eq!((status, &body["enabled"]), (200, &json!(false)));
    api.put("/api/v1/updates", json!({"enabled": true})).await;
    assert!(
        agent.next_update(SOON).await.is_some(),
        "switching back on dispatches at once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn releases_list_offered_builds_and_explain_skipped_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--rescan-interval", "1h"]);
    let api = server.api();
    let downloads = server.downloads();
    publish(&downloads, "1.0.0", None, b"good");
    publish(&downloads, "1.1.0-beta.1", Some("beta"), b"beta");
    std::fs::write(
        downloads.join("drover-agent-linux-amd64-2.0.0"),
        b"no checksum",
    )
    .unwrap();
    std::fs::write(
        downloads.join("drover-agent-site-1234-linux-amd64-1.0.0"),
        b"x",
    )
    .unwrap();
    publish(&downloads, "3.0.0", None, b"original");
    std::fs::write(
        downloads.join("drover-agent-linux-amd64-3.0.0"),
        b"tampered",
    )
    .unwrap();

    let (status, rescanned) = api.post("/api/v1/releases/rescan", None).await;
    assert_eq!(status, 200, "{rescanned}");
    let (_, listed) = api.get("/api/v1/releases").await;
    let versions: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["version"].as_str().unwrap(),
                r["channel"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(versions, [("1.1.0-beta.1", "beta"), ("1.0.0", "stable")]);
    for release in listed.as_array().unwrap() {
        for field in [
            "version", "os", "arch", "channel", "sha256", "size", "file", "blocked",
        ] {
            assert!(!release[field].is_null(), "{field} missing: {release}");
        }
    }

    let (_, with_skipped) = api.get("/api/v1/releases?include=skipped").await;
    let reason_of = |file: &str| {
        with_skipped["skipped"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["file"] == file)
            .map(|s| s["reason"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{file} not listed as skipped: {with_skipped}"))
    };
    assert!(reason_of("drover-agent-linux-amd64-2.0.0").contains("no .sha256"));
    assert!(reason_of("drover-agent-site-1234-linux-amd64-1.0.0").contains("name does not match"));
    assert!(reason_of("drover-agent-linux-amd64-3.0.0").contains("checksum mismatch"));
    assert_eq!(with_skipped["releases"].as_array().unwrap().len(), 2);

    // Viewers may read; nobody without a token may.
    let (status, _) = Api::new(&server.url, "").get("/api/v1/releases").await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_serve_ranges_and_refuse_what_is_not_offered() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let contents: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let file = publish(&server.downloads(), "1.0.0", None, &contents);
    std::fs::write(server.downloads().join("secret.txt"), b"not a build").unwrap();
    std::fs::write(dir.path().join("outside.txt"), b"outside").unwrap();
    let http = operator_http();
    let url = |name: &str| format!("{}/downloads/{name}", server.url);
    eventually("the build to be offered", SOON, || async {
        let response = http.head(url(&file)).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;

    let ranged = http
        .get(url(&file))
        .header("Range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(
        ranged.headers()["content-range"],
        format!("bytes 1000-1999/{}", contents.len()).as_str()
    );
    assert_eq!(
        ranged.bytes().await.unwrap().as_ref(),
        &contents[1000..2000]
    );
    let resumed = http
        .get(url(&file))
        .header("Range", "bytes=99000-")
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.bytes().await.unwrap().as_ref(), &contents[99000..]);

    // Names that are not offered are not found; names that are not a plain file name
    // at all are malformed.
    for (name, status) in [
        (format!("{file}.sha256"), 404),
        ("secret.txt".to_owned(), 404),
        ("drover-agent-linux-amd64-9.9.9".to_owned(), 404),
        ("..%2Foutside.txt".to_owned(), 400),
        ("%2E%2E%2F%2E%2E%2Fetc%2Fpasswd".to_owned(), 400),
    ] {
        let response = http.get(url(&name)).send().await.unwrap();
        assert_eq!(response.status(), status, "{name}");
    }
    let response = http
        .get(format!("{}/downloads/../data/admin-token", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

/// An HTTP client that sends the admin token: downloads need a grant or an API token.
fn operator_http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {ADMIN_TOKEN}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Publishes a build of `size` bytes as 1.0.0 and answers its download URL once it is
/// offered.
async fn offer_large_build(server: &Server, size: usize) -> String {
    let contents: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    let file = publish(&server.downloads(), "1.0.0", None, &contents);
    drop(contents);
    eventually(
        "the large build to be offered",
        Duration::from_secs(30),
        || async {
            let (_, listed) = server.api().get("/api/v1/releases").await;
            (listed.as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    format!("{}/downloads/{file}", server.url)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_build_streams_under_the_concurrency_limit_with_flat_memory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--max-concurrent-downloads", "1"]);
    let size = 200 * 1024 * 1024;
    let url = offer_large_build(&server, size).await;
    let http = operator_http();
    let baseline = rss_kib(server.pid());

    let mut first = http.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let mut received = first.chunk().await.unwrap().unwrap().len();

    // The one slot is taken: the next agent is told when to come back.
    let busy = http.get(&url).send().await.unwrap();
    assert_eq!(busy.status(), 503);
    let retry_after: u64 = busy.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 0);

    let mut peak = baseline;
    while let Some(chunk) = first.chunk().await.unwrap() {
        received += chunk.len();
        if received % (16 * 1024 * 1024) < chunk.len() {
            peak = peak.max(rss_kib(server.pid()));
        }
    }
    assert_eq!(received, size);
    // Streaming, not buffering: far less than the 200 MiB file.
    assert!(
        peak.saturating_sub(baseline) < 64 * 1024,
        "server RSS grew from {baseline} KiB to {peak} KiB while streaming"
    );

    // The slot is free again once the body is done.
    eventually("the slot to be released", SOON, || async {
        let response = http.head(&url).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_that_finds_every_slot_taken_waits_a_moment_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(
        dir.path(),
        &[
            "--max-concurrent-downloads",
            "1",
            "--max-downloads-per-address",
            "2",
        ],
    );
    // Larger than what the sockets buffer, so the first download holds its slot until
    // it is read.
    let size = 48 * 1024 * 1024;
    let url = offer_large_build(&server, size).await;
    let http = operator_http();

    let first = http.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    // The second waits for the slot rather than being sent away for ten seconds...
    let second = tokio::spawn(http.get(&url).send());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "the second download was answered at once"
    );
    // ...and gets it when the first is done.
    assert_eq!(first.bytes().await.unwrap().len(), size);
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(second.bytes().await.unwrap().len(), size);
    assert!(
        server
            .metrics()
            .await
            .contains("drover_downloads_refused_total{reason=\"busy\"} 0")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_limit_of_zero_serves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--max-concurrent-downloads", "0"]);
    let file = publish(&server.downloads(), "1.0.0", None, b"build");
    let response = reqwest::get(format!("{}/downloads/{file}", server.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_whose_agent_vanishes_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--task-timeout", "1"]);
    publish(&server.downloads(), "1.1.0", None, b"build");
    let mut agent = ProtocolAgent::enroll(&server, "fp-vanishing", "1.0.0").await;
    let update = agent.next_update(SOON).await.expect("dispatched");
    agent
        .report(AgentMessage::UpdateProgress(UpdateProgress {
            task_id: update.task_id.clone(),
            stage: UpdateStage::Installing,
            bytes_done: 5,
            bytes_total: 5,
            transfer: None,
        }))
        .await;
    let id = agent.id.clone();
    drop(agent);
    let ended = eventually(
        "the silent task to time out",
        Duration::from_secs(10),
        || async {
            // The task is written just after its update goes out.
            let task = tasks(&server, &id).await.first()?.clone();
            (task["status"] == "timed_out").then_some(task)
        },
    )
    .await;
    assert!(
        ended["error"]
            .as_str()
            .is_some_and(|e| e.contains("went silent") && e.contains("installing")),
        "the error says what happened: {ended}"
    );
    // Silence after it began installing: the new build never came up.
    assert_eq!(ended["failure_class"], "build", "{ended}");
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_drive_the_engine_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let cli = |args: &[&str]| run_cli(&server, args);
    // The build lands through the publish script, as an operator would do it.
    let build = dir.path().join("build");
    std::fs::write(&build, b"agent build").unwrap();
    let published = std::process::Command::new("scripts/publish")
        .args([
            build.to_str().unwrap(),
            "1.1.0",
            "stable",
            "--os",
            "linux",
            "--arch",
            "amd64",
        ])
        .env("DROVER_DOWNLOADS", server.downloads())
        .output()
        .unwrap();
    assert!(published.status.success(), "{published:?}");
    let (ok, text) = cli(&["releases", "rescan"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("1.1.0") && text.contains("linux/amd64") && text.contains("stable"),
        "{text}"
    );

    let mut agent = ProtocolAgent::enroll(&server, "fp-cli", "1.0.0").await;
    let _ = agent.next_update(SOON).await.expect("stable agent updated");
    let (ok, text) = cli(&["agent", "pause", &agent.id]);
    assert!(ok && text.contains("paused"), "{text}");
    let (ok, text) = cli(&["channel", "set", "--agent", &agent.id, "beta"]);
    assert!(ok && text.contains("beta"), "{text}");
    let (_, view) = server
        .api()
        .get(&format!("/api/v1/agents/{}", agent.id))
        .await;
    assert_eq!(
        (view["channel"].as_str(), view["paused"].as_bool()),
        (Some("beta"), Some(true))
    );

    // Paused, a requested update is refused until the agent is resumed.
    let (ok, text) = cli(&["agent", "update", &agent.id, "--version", "1.1.0"]);
    assert!(!ok && text.contains("paused"), "{text}");
    let (ok, text) = cli(&["agent", "resume", &agent.id]);
    assert!(ok && text.contains("resumed"), "{text}");
    let (ok, text) = cli(&["agent", "update", &agent.id, "--version", "1.1.0"]);
    assert!(ok && text.contains("1.1.0"), "{text}");
    let forced = agent.next_message(SOON).await;
    assert!(
        matches!(
            forced,
            Some(protocol::ServerMessage::Cancel(_)) | Some(protocol::ServerMessage::Update(_))
        ),
        "{forced:?}"
    );
    let (ok, text) = cli(&["channel", "set", "--site", "nope", "beta"]);
    assert!(!ok && text.contains("404"), "{text}");
}

#[test]
fn stamped_agents_report_the_stamped_version() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("drover-agent-1.4.2");
    let stamped = std::process::Command::new("scripts/stamp-agent")
        .args(["1.4.2-beta.1", out.to_str().unwrap(), AGENT_BIN])
        .output()
        .unwrap();
    assert!(stamped.status.success(), "{stamped:?}");
    let version = std::process::Command::new(&out)
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        "drover-agent 1.4.2-beta.1"
    );
    let refused = std::process::Command::new("scripts/stamp-agent")
        .args(["v1.0", out.to_str().unwrap(), AGENT_BIN])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn updates_are_pushed_no_faster_than_download_slots_free() {
    let dir = tempfile::tempdir().unwrap();
    // Two download slots: three pushes at once (a tenth more, at least one).
    let server = Server::start_with_args(dir.path(), &["--max-concurrent-downloads", "2"]);
    let mut agents = Vec::new();
    for i in 0..7 {
        agents.push(ProtocolAgent::enroll(&server, &format!("fp-slot-{i}"), "1.0.0").await);
    }
    publish(&server.downloads(), "1.1.0", Some("stable"), b"a build");

    // Each agent's newest update, heard while visiting every agent in turn.
    async fn collect(agents: &mut [ProtocolAgent], sent: &mut [Option<String>], window: Duration) {
        for (i, message) in listen(agents, window).await {
            if let protocol::ServerMessage::Update(update) = message {
                sent[i] = Some(update.task_id);
            }
        }
    }
    let mut sent: Vec<Option<String>> = vec![None; agents.len()];
    collect(&mut agents, &mut sent, Duration::from_secs(3)).await;
    let pushed = |sent: &[Option<String>]| sent.iter().filter(|s| s.is_some()).count();
    assert_eq!(pushed(&sent), 3, "three pushed, the rest queued: {sent:?}");
    let (_, rollouts) = server.api().get("/api/v1/rollouts?version=1.1.0").await;
    assert_eq!(
        (&rollouts[0]["queued"], &rollouts[0]["in_progress"]),
        (&json!(4), &json!(3)),
        "{rollouts}"
    );

    // Each agent that has its bytes frees its slot, and the next in line is pushed.
    let mut reported = std::collections::HashSet::new();
    for round in 0..4 {
        let Some(first) = (0..agents.len()).find(|i| sent[*i].is_some() && !reported.contains(i))
        else {
            panic!("round {round}: nobody left to report: {sent:?}");
        };
        agents[first]
            .report(AgentMessage::UpdateProgress(UpdateProgress {
                task_id: sent[first].clone().unwrap(),
                stage: UpdateStage::Verifying,
                bytes_done: 7,
                bytes_total: 7,
                transfer: None,
            }))
            .await;
        reported.insert(first);
        let before = pushed(&sent);
        let deadline = tokio::time::Instant::now() + SOON;
        while pushed(&sent) == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: nobody was pushed after a slot freed: {sent:?}"
            );
            collect(&mut agents, &mut sent, Duration::from_millis(300)).await;
        }
        assert_eq!(pushed(&sent), before + 1, "one slot, one push: {sent:?}");
    }
    assert_eq!(
        pushed(&sent),
        agents.len(),
        "everyone was pushed in the end"
    );
}
