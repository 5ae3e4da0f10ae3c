//! End-to-end: the real server and agents enroll, heartbeat, survive kills and restarts,
//! and refuse bad credentials and bad frames without harming anyone else.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use futures_util::SinkExt;
use protocol::{AgentMessage, Heartbeat, RejectCode, ServerMessage};
use support::*;
use tokio_tungstenite::tungstenite::Message;

fn ids_by_hostname(agents: &[serde_json::Value]) -> BTreeMap<String, String> {
    agents
        .iter()
        .map(|a| {
            (
                a["hostname"].as_str().unwrap().to_owned(),
                a["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_keep_their_identity_across_server_kills_and_agent_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // A reinstalled machine is re-bound as soon as its old record is offline.
    let mut server = Server::start_with_args(dir.path(), &["--rebind-after", "0s"]);
    let api = server.api();
    let mut agents: Vec<Agent> = ["alpha", "bravo", "charlie"]
        .iter()
        .map(|name| Agent::start(&server, dir.path(), name))
        .collect();

    let listed = all_online(&api, 3).await;
    for agent in &listed {
        assert_eq!(agent["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(agent["channel"], "stable");
        assert_eq!(agent["channel_source"], "default");
        assert!(agent["last_seen"].as_str().unwrap().ends_with('Z'));
    }
    let ids = ids_by_hostname(&listed);
    assert_eq!(
        ids.keys().collect::<Vec<_>>(),
        ["alpha", "bravo", "charlie"]
    );
    for agent in &agents {
        // Listed online at its welcome; the agent stores the identity right after.
        let identity = agent.state_dir.join("identity.json");
        let meta = eventually(
            "the identity to be stored",
            Duration::from_secs(10),
            || async { std::fs::metadata(&identity).ok() },
        )
        .await;
        let mode = meta.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "identity file must be private");
        assert!(ids.values().any(|id| Some(id.clone()) == agent.stored_id()));
    }

    // kill -9 the server; the same agents come back with the same ids, no new rows.
    server.kill9();
    eventually(
        "agents to notice the server is gone",
        Duration::from_secs(10),
        || async {
            agents
                .iter()
                .all(|a| a.log().contains("session lost"))
                .then_some(())
        },
    )
    .await;
    server.restart();
    eventually(
        "every agent to reconnect",
        Duration::from_secs(30),
        || async {
            agents
                .iter()
                .all(|a| a.log().matches("connected to").count() >= 2)
                .then_some(())
        },
    )
    .await;
    let listed = all_online(&api, 3).await;
    assert_eq!(ids_by_hostname(&listed), ids);

    // Restarting an agent keeps its id.
    agents[0].restart();
    eventually(
        "alpha to reconnect after its restart",
        Duration::from_secs(30),
        || async {
            let log = agents[0].log();
            (log.matches("connected to").count() >= 3).then_some(())
        },
    )
    .await;
    let listed = all_online(&api, 3).await;
    assert_eq!(ids_by_hostname(&listed), ids);

    // The same machine enrolling again with a fresh state directory is re-bound to its
    // record, not duplicated.
    agents[1].kill9();
    let rebound = Agent::start_with(
        &server,
        &dir.path().join("reinstalled"),
        "bravo",
        &["--enroll-token", ENROLL_TOKEN, "--fingerprint", "fp-bravo"],
    );
    // The killed agent's worker may hold its session a moment longer, so wait for the
    // new installation itself.
    let stored = eventually(
        "the reinstalled agent to store its identity",
        Duration::from_secs(30),
        || async { rebound.stored_id() },
    )
    .await;
    assert_eq!(Some(&stored), ids.get("bravo"));
    let listed = all_online(&api, 3).await;
    assert_eq!(ids_by_hostname(&listed), ids);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_are_rejected_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let agent = Agent::start(&server, dir.path(), "delta");
    let listed = all_online(&api, 1).await;
    let id = listed[0]["id"].as_str().unwrap().to_owned();

    // Right id, wrong secret.
    let mut socket = raw_connect(&server).await;
    let mut hello = hello("fp-delta");
    hello.enroll_token = None;
    hello.agent_id = Some(id.clone());
    hello.secret = Some("not-the-secret".into());
    send(&mut socket, AgentMessage::Hello(hello.clone())).await;
    let Some(ServerMessage::Reject(reject)) = receive(&mut socket).await else {
        panic!("expected a reject");
    };
    assert_eq!(reject.code, RejectCode::BadCredentials);
    let (code, _) = close_frame(&mut socket).await.expect("a close frame");
    assert_eq!(code, 1008);

    // Unknown id.
    let mut socket = raw_connect(&server).await;
    hello.agent_id = Some("00000000-0000-0000-0000-000000000000".into());
    send(&mut socket, AgentMessage::Hello(hello.clone())).await;
    let Some(ServerMessage::Reject(reject)) = receive(&mut socket).await else {
        panic!("expected a reject");
    };
    assert_eq!(reject.code, RejectCode::BadCredentials);

    // Unknown enrollment token.
    let mut socket = raw_connect(&server).await;
    let mut bad_token = support::hello("fp-intruder");
    bad_token.enroll_token = Some("guessed".into());
    send(&mut socket, AgentMessage::Hello(bad_token)).await;
    let Some(ServerMessage::Reject(reject)) = receive(&mut socket).await else {
        panic!("expected a reject");
    };
    assert_eq!(reject.code, RejectCode::BadEnrollToken);

    // A real agent whose stored secret is wrong, with no token to enroll again.
    let forged_dir = dir.path().join("forged");
    std::fs::create_dir_all(&forged_dir).unwrap();
    std::fs::write(
        forged_dir.join("identity.json"),
        format!(r#"{{"agent_id": "{id}", "secret": "forged"}}"#),
    )
    .unwrap();
    let forged = Agent::start_with(
        &server,
        dir.path(),
        "forged",
        &["--fingerprint", "fp-forged"],
    );
    eventually(
        "the forged agent to be rejected",
        Duration::from_secs(15),
        || async {
            forged
                .log()
                .contains("rejected this agent's credentials")
                .then_some(())
        },
    )
    .await;

    // Nothing new is listed, and the real agent was never displaced.
    let listed = api.agents().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["hostname"], "delta");
    assert_eq!(listed[0]["online"], true);
    assert!(!agent.log().contains("replaced"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_frames_close_only_their_own_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let _agents: Vec<Agent> = ["echo", "foxtrot"]
        .iter()
        .map(|name| Agent::start(&server, dir.path(), name))
        .collect();
    let before = all_online(&api, 2).await;

    // An enrolled session that then sends garbage.
    let mut socket = raw_connect(&server).await;
    send(&mut socket, AgentMessage::Hello(hello("fp-garbage"))).await;
    assert!(matches!(
        receive(&mut socket).await,
        Some(ServerMessage::Welcome(_))
    ));
    socket
        .send(Message::Binary(vec![0xc1, 0xff, 0x00, 0x13].into()))
        .await
        .unwrap();
    let Some(ServerMessage::Reject(reject)) = receive(&mut socket).await else {
        panic!("expected a reject for garbage");
    };
    assert_eq!(reject.code, RejectCode::MalformedFrame);
    assert_eq!(
        close_frame(&mut socket).await.map(|(code, _)| code),
        Some(1007)
    );

    // An enrolled session that sends a frame over the protocol's limit.
    let mut socket = raw_connect(&server).await;
    send(&mut socket, AgentMessage::Hello(hello("fp-oversized"))).await;
    assert!(matches!(
        receive(&mut socket).await,
        Some(ServerMessage::Welcome(_))
    ));
    let huge = AgentMessage::Heartbeat(Heartbeat {
        seq: 1,
        version: "x".repeat(protocol::MAX_FRAME_BYTES),
    });
    send(&mut socket, huge).await;
    let Some(ServerMessage::Reject(reject)) = receive(&mut socket).await else {
        panic!("expected a reject for an oversized frame");
    };
    assert_eq!(reject.code, RejectCode::FrameTooLarge);
    assert_eq!(
        close_frame(&mut socket).await.map(|(code, _)| code),
        Some(1009)
    );

    // A frame beyond what the WebSocket layer accepts at all still ends only that session.
    let mut socket = raw_connect(&server).await;
    send(&mut socket, AgentMessage::Hello(hello("fp-enormous"))).await;
    assert!(matches!(
        receive(&mut socket).await,
        Some(ServerMessage::Welcome(_))
    ));
    let _ = socket
        .send(Message::Binary(vec![0x90; 4 * 1024 * 1024].into()))
        .await;
    assert!(!matches!(
        receive(&mut socket).await,
        Some(ServerMessage::Welcome(_))
    ));

    // Garbage instead of a hello, and a text frame.
    let mut socket = raw_connect(&server).await;
    socket
        .send(Message::Binary(b"GET / HTTP/1.1".to_vec().into()))
        .await
        .unwrap();
    let Some(ServerMessage::Reject(reject)) = receive(&mut socket).await else {
        panic!("expected a reject for a garbage hello");
    };
    assert_eq!(reject.code, RejectCode::MalformedFrame);
    let mut socket = raw_connect(&server).await;
    socket
        .send(Message::Text("{\"type\":\"hello\"}".into()))
        .await
        .unwrap();
    let Some(ServerMessage::Reject(reject)) = receive(&mut socket).await else {
        panic!("expected a reject for a text frame");
    };
    assert_eq!(reject.code, RejectCode::MalformedFrame);

    // The real agents never noticed: still online, and still heartbeating.
    let last_seen = |agents: &[serde_json::Value]| ids_and(agents, "last_seen");
    let seen_before = last_seen(&before);
    eventually(
        "heartbeats to keep arriving",
        Duration::from_secs(15),
        || async {
            let agents = api.agents().await?;
            let now = last_seen(&agents);
            let advanced = seen_before
                .iter()
                .all(|(id, at)| now.get(id).is_some_and(|later| later > at));
            let online = agents
                .iter()
                .filter(|a| a["hostname"] == "echo" || a["hostname"] == "foxtrot")
                .all(|a| a["online"] == true);
            (advanced && online).then_some(())
        },
    )
    .await;
    assert!(server.log().contains("malformed frame"));
}

fn ids_and(agents: &[serde_json::Value], field: &str) -> BTreeMap<String, String> {
    agents
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_owned(),
                a[field].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn rest_api_answers_errors_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());

    let (status, body) = Api::new(&server.url, "").get("/healthz").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));

    let cases = [
        ("", "/api/v1/agents", 401, "unauthorized"),
        ("wrong-token", "/api/v1/agents", 401, "unauthorized"),
        (
            ADMIN_TOKEN,
            "/api/v1/agents/no-such-agent",
            404,
            "not found",
        ),
        (ADMIN_TOKEN, "/api/v1/no-such-endpoint", 404, "not found"),
    ];
    for (token, path, status, error) in cases {
        let (got, body) = Api::new(&server.url, token).get(path).await;
        assert_eq!(got, status, "{path} with token {token:?}: {body}");
        assert_eq!(body["error"], error, "{path}: {body}");
        assert!(body["detail"].is_string(), "{path}: {body}");
    }

    let _agent = Agent::start(&server, dir.path(), "golf");
    let listed = all_online(&server.api(), 1).await;
    let id = listed[0]["id"].as_str().unwrap();
    let (status, one) = server.api().get(&format!("/api/v1/agents/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(one["hostname"], "golf");
    for field in [
        "id",
        "hostname",
        "version",
        "os",
        "arch",
        "site_id",
        "channel",
        "channel_source",
        "online",
        "last_seen",
        "paused",
        "auto_update",
    ] {
        assert!(!one[field].is_null(), "agent is missing {field}: {one}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_lists_agents_as_a_table_and_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let _agents: Vec<Agent> = ["hotel", "india"]
        .iter()
        .map(|name| Agent::start(&server, dir.path(), name))
        .collect();
    all_online(&server.api(), 2).await;

    let cli = |args: &[&str], token: &str| {
        std::process::Command::new(CLI_BIN)
            .args(args)
            .env("DROVER_SERVER", &server.url)
            .env("DROVER_TOKEN", token)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let table = cli(&["agents"], ADMIN_TOKEN);
    assert!(table.status.success());
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.lines().next().unwrap().contains("HOSTNAME"), "{text}");
    for name in ["hotel", "india"] {
        let line = text.lines().find(|l| l.contains(name)).expect(name);
        assert!(
            line.contains("online") && line.contains("stable (default)"),
            "{line}"
        );
    }
    assert!(text.contains("2 agents, 2 online"), "{text}");

    let json = cli(&["agents", "--json"], ADMIN_TOKEN);
    let parsed: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(parsed.len(), 2);

    let denied = cli(&["agents"], "wrong");
    assert!(!denied.status.success());
    let stderr = String::from_utf8(denied.stderr).unwrap();
    assert!(
        stderr.contains("401") && stderr.contains("unknown or revoked token"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_tokens_are_private_files_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_env(dir.path(), &[]);
    let data = dir.path().join("data");
    let read = |name: &str| {
        std::fs::read_to_string(data.join(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let admin = read("admin-token");
    let enroll = read("enroll-token");
    for name in ["admin-token", "enroll-token"] {
        let mode = std::fs::metadata(data.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    let banner = std::fs::read_to_string(dir.path().join("server.out")).unwrap();
    assert!(
        banner.contains(&data.join("admin-token").display().to_string()),
        "{banner}"
    );

    server.restart();
    assert_eq!(
        read("admin-token"),
        admin,
        "restart must not regenerate tokens"
    );
    let (status, _) = Api::new(&server.url, &admin).get("/api/v1/agents").await;
    assert_eq!(status, 200);

    let _agent = Agent::start_with(
        &server,
        dir.path(),
        "juliet",
        &["--enroll-token", &enroll, "--fingerprint", "fp-juliet"],
    );
    all_online(&Api::new(&server.url, &admin), 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_several_servers_fails_over_to_one_that_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let dead = "http://127.0.0.1:1";
    let log = std::fs::File::create(dir.path().join("uniform.log")).unwrap();
    let mut agent = std::process::Command::new(AGENT_BIN)
        .args([
            "run",
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            "fp-uniform",
        ])
        .args(["--hostname", "uniform", "--state-dir"])
        .arg(dir.path().join("uniform"))
        .env("DROVER_SERVER", format!("{dead}, {}", server.url))
        .env("NO_COLOR", "1")
        .stderr(log)
        .spawn()
        .unwrap();
    let listed = all_online(&server.api(), 1).await;
    assert_eq!(listed[0]["hostname"], "uniform");
    // The server shows the agent online before its welcome reaches the agent, which
    // logs the connection once it has it.
    let connected = format!("connected to {}", server.url);
    let log = eventually(
        "the agent to log its connection",
        Duration::from_secs(10),
        || async {
            let log = std::fs::read_to_string(dir.path().join("uniform.log")).unwrap();
            log.contains(&connected).then_some(log)
        },
    )
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        log.contains("127.0.0.1:1"),
        "the first server was tried: {log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_reads_a_config_file_and_its_command_line_wins() {
    let releases = |server: &Server| {
        let api = server.api();
        async move {
            let (status, body) = api.get("/api/v1/releases?include=skipped").await;
            assert_eq!(status, 200, "{body}");
            body
        }
    };

    // From --config: a switch and a value; the file's listen address loses to the
    // command line's (the harness passes one), or the server would not be reachable.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("drover.conf");
    std::fs::write(
        &file,
        "# drover-server\nlisten = 127.0.0.1:1\nrequire-signatures = true\ndefault_channel = beta\n",
    )
    .unwrap();
    let server = Server::start_with_args(dir.path(), &["--config", file.to_str().unwrap()]);
    let build = publish(&server.downloads(), "1.1.0", None, b"unsigned");
    let reason = eventually(
        "the unsigned build to be skipped for lack of a signature",
        Duration::from_secs(20),
        || async {
            let body = releases(&server).await;
            let skipped = body["skipped"].as_array()?;
            let entry = skipped.iter().find(|s| s["file"] == build.as_str())?;
            // Until its checksum lands the build is skipped for lacking one.
            let reason = entry["reason"].as_str()?;
            reason
                .contains("signatures are required")
                .then(|| reason.to_owned())
        },
    )
    .await;
    assert_eq!(reason, "unsigned build and signatures are required");

    // From DROVER_CONFIG: without the switch the build is offered, on the file's
    // default channel.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("drover.conf");
    std::fs::write(&file, "default-channel = beta\n").unwrap();
    let server = Server::start_with_env(
        dir.path(),
        &[
            ("DROVER_ADMIN_TOKEN", ADMIN_TOKEN),
            ("DROVER_CONFIG", file.to_str().unwrap()),
        ],
    );
    publish(&server.downloads(), "1.1.0", None, b"unsigned");
    let listing = eventually(
        "the build to be offered",
        Duration::from_secs(20),
        || async {
            let body = releases(&server).await;
            (body["releases"].as_array()?.len() == 1).then_some(body)
        },
    )
    .await;
    assert_eq!(listing["releases"][0]["channel"], "beta", "{listing}");
}

#[test]
fn a_bad_server_config_file_is_an_error_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("drover.conf");
    std::fs::write(&file, "listen 0.0.0.0:8080\n").unwrap();
    let output = std::process::Command::new(SERVER_BIN)
        .args(["--config", file.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 1: expected `key = value`"),
        "{stderr}"
    );
    assert!(stderr.contains("drover.conf"), "{stderr}");
    assert!(
        !dir.path().join("drover-data").exists(),
        "nothing was created"
    );
}
