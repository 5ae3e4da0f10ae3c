//! End-to-end: what an operations team relies on, against the real server: JSON logs a
//! collector can parse line by line (with agent, task and rollout ids as fields and no
//! secret anywhere), and a `/metrics` that the shipped Grafana dashboard can be built on.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const SOON: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_parse_line_by_line_with_ids_as_fields_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--log-format", "json"]);
    let mut agent = ProtocolAgent::enroll(&server, "fp-logged", "1.0.0").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"a build to log",
    );
    let update = agent.next_update(SOON).await.expect("an update");

    let lines = eventually("the dispatch to be logged", SOON, || async {
        let log = server.log();
        log.contains("dispatching update").then_some(log)
    })
    .await;
    let mut messages = BTreeSet::new();
    let mut dispatched = None;
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "message", "target"] {
            assert!(entry[field].is_string(), "{field} missing: {line}");
        }
        messages.insert(entry["message"].as_str().unwrap().to_owned());
        if entry["message"] == "dispatching update" {
            dispatched = Some(entry);
        }
    }
    let dispatched = dispatched.expect("the dispatch is logged");
    assert_eq!(dispatched["level"], "INFO", "{dispatched}");
    assert_eq!(dispatched["agent"], agent.id.as_str(), "{dispatched}");
    assert_eq!(dispatched["task"], update.task_id.as_str(), "{dispatched}");
    assert_eq!(dispatched["to"], "1.1.0", "{dispatched}");
    assert!(
        dispatched["rollout"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{dispatched}"
    );
    assert!(messages.contains("agent enrolled"), "{messages:?}");
    for secret in [ADMIN_TOKEN, ENROLL_TOKEN, agent.secret.as_str()] {
        assert!(!lines.contains(secret), "a secret reached the log");
    }
}

/// Metric names in a text: every `drover_` word.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.match_indices("drover_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect::<String>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_documented_and_the_grafana_dashboard_uses_only_real_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut agent = ProtocolAgent::enroll(&server, "fp-measured", "1.0.0").await;
    let file = publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"a measured build",
    );
    agent.next_update(SOON).await.expect("an update");
    agent.reconnect(&server, "1.1.0").await;
    agent.heartbeat().await;
    let (status, body) = api.put("/api/v1/updates", json!({"enabled": false})).await;
    assert_eq!(status, 200, "{body}");
    let refused = reqwest::get(format!("{}/downloads/{file}", server.url))
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);

    let metrics = eventually("the success to be counted", SOON, || async {
        let text = reqwest::get(format!("{}/metrics", server.url))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.contains("drover_task_endings_total{status=\"succeeded\",class=\"none\"} 1")
            .then_some(text)
    })
    .await;
    assert!(
        metrics.contains("drover_downloads_refused_total{reason=\"off\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("drover_updates_enabled 0"), "{metrics}");
    assert!(
        metrics.contains("drover_agents_connected{node=\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("drover_database_errors_total 0"),
        "{metrics}"
    );

    // Every family the server exports is documented, and nothing documented is missing.
    let exported: BTreeSet<String> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| rest.split(' ').next().unwrap().to_owned())
        .collect();
    assert!(exported.len() >= 14, "{exported:?}");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let documented = metric_names(&std::fs::read_to_string(root.join("METRICS.md")).unwrap());
    assert_eq!(documented, exported, "METRICS.md and /metrics disagree");

    // The dashboard is valid JSON whose queries use only exported metrics.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/drover.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            used.extend(metric_names(target["expr"].as_str().expect("an expr")));
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "the dashboard uses metrics /metrics lacks: {unknown:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_rollout_keeps_its_counts_after_its_tasks_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(
        dir.path(),
        &["--retain-tasks", "2s", "--prune-interval", "1s"],
    );
    let api = server.api();
    let mut agents = Vec::new();
    for n in 0..2 {
        agents.push(ProtocolAgent::enroll(&server, &format!("fp-kept-{n}"), "1.0.0").await);
    }
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"a build to prune",
    );
    for agent in &mut agents {
        agent.next_update(SOON).await.expect("an update");
        agent.reconnect(&server, "1.1.0").await;
        agent.heartbeat().await;
    }
    let completed = eventually("the rollout to complete", SOON, || async {
        let (_, rollouts) = api.get("/api/v1/rollouts?version=1.1.0").await;
        let rollout = rollouts.as_array()?.first()?.clone();
        (rollout["state"] == "completed").then_some(rollout)
    })
    .await;
    assert_eq!(
        (&completed["targeted"], &completed["succeeded"]),
        (&json!(2), &json!(2)),
        "{completed}"
    );
    let id = completed["id"].as_str().unwrap();

    // Two seconds after it closed, its tasks and targets are pruned; its counts stay.
    // The agents keep heartbeating meanwhile: a silent one's session would close, and
    // its success would no longer count as settled when the counts are frozen.
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        for agent in &mut agents {
            agent.heartbeat().await;
        }
        let (_, detail) = api.get(&format!("/api/v1/agents/{}", agents[0].id)).await;
        if detail["tasks"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tasks were not pruned: {detail}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (_, listed) = api.get(&format!("/api/v1/rollouts/{id}/agents")).await;
    assert_eq!(listed["agents"], json!([]), "{listed}");
    let (_, after) = api.get(&format!("/api/v1/rollouts/{id}")).await;
    for field in ["targeted", "succeeded", "failed", "queued", "waves"] {
        assert_eq!(after[field], completed[field], "{field}: {after}");
    }
    assert_eq!(
        (&completed["details_pruned"], &after["details_pruned"]),
        (&json!(false), &json!(true))
    );
    assert!(server.log().contains("pruned rows past their retention"));
}

/// Runs a command; its stdout, or a panic with everything it said.
fn run(command: &mut std::process::Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{command:?} runs: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Whether a packaging tool is here; under CI it must be (scripts/ci-setup installs it).
fn have(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found || std::env::var("CI").as_deref() != Ok("true"),
        "CI=true requires {tool} (scripts/ci-setup installs it)"
    );
    if !found {
        eprintln!("{tool} is not installed: its part of the package test is skipped");
    }
    found
}

/// Whether a 64-bit little-endian ELF executable names a dynamic loader (`PT_INTERP`):
/// a dynamically linked one does, a static one does not.
fn asks_for_a_loader(path: &std::path::Path) -> bool {
    let elf = std::fs::read(path).unwrap();
    assert_eq!(
        &elf[..5],
        b"\x7fELF\x02",
        "{} is not a 64-bit ELF file",
        path.display()
    );
    let word = |at: usize, len: usize| {
        elf[at..at + len]
            .iter()
            .rev()
            .fold(0usize, |n, b| n << 8 | usize::from(*b))
    };
    let (table, size, count) = (word(0x20, 8), word(0x36, 2), word(0x38, 2));
    (0..count).any(|i| word(table + i * size, 4) == 3)
}

#[test]
fn packages_hold_the_binaries_hardened_units_configs_and_maintainer_scripts() {
    let root_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let made = run(std::process::Command::new(root_dir.join("scripts/package"))
        .args(["--profile", "dev", "--out"])
        .arg(out.path()));
    let version = env!("CARGO_PKG_VERSION");
    let made: Vec<&str> = made.lines().collect();
    let deb = |name: &str| out.path().join(format!("{name}_{version}_amd64.deb"));
    assert!(
        made.contains(&deb("drover-server").to_str().unwrap()),
        "{made:?}"
    );
    assert!(
        made.contains(&deb("drover-agent").to_str().unwrap()),
        "{made:?}"
    );

    // Unpacked as dpkg would install them.
    let root = tempfile::tempdir().unwrap();
    let control = tempfile::tempdir().unwrap();
    for name in ["drover-server", "drover-agent"] {
        run(std::process::Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb(name))
            .arg(root.path()));
        run(std::process::Command::new("dpkg-deb")
            .arg("-e")
            .arg(deb(name))
            .arg(control.path().join(name)));
    }
    let at = |path: &str| root.path().join(path.trim_start_matches('/'));
    for binary in [
        "/usr/bin/drover-server",
        "/usr/bin/drover",
        "/usr/bin/drover-agent",
    ] {
        assert_eq!(mode_of(&at(binary)), 0o755, "{binary}");
        let said = run(std::process::Command::new(at(binary)).arg("--version"));
        assert!(said.contains(version), "{binary}: {said}");
    }
    // The agent runs on any Linux, whatever its C library: nothing to load at start.
    assert!(
        !asks_for_a_loader(&at("/usr/bin/drover-agent")),
        "the packaged agent is dynamically linked"
    );
    assert!(asks_for_a_loader(&at("/usr/bin/drover-server")));
    assert_eq!(mode_of(&at("/etc/drover/server.conf")), 0o640);
    assert_eq!(mode_of(&at("/etc/drover-agent/agent.conf")), 0o600);
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap();
    assert_eq!(
        read(&control.path().join("drover-server/conffiles")).trim(),
        "/etc/drover/server.conf"
    );
    assert_eq!(
        read(&control.path().join("drover-agent/conffiles")).trim(),
        "/etc/drover-agent/agent.conf"
    );
    let server_conf = read(&at("/etc/drover/server.conf"));
    assert!(
        server_conf.contains("data-dir = /var/lib/drover"),
        "{server_conf}"
    );

    let server_unit = read(&at("/lib/systemd/system/drover-server.service"));
    for line in [
        "ExecStart=/usr/bin/drover-server --config /etc/drover/server.conf",
        "User=drover",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=/var/lib/drover",
        "StateDirectoryMode=0700",
        "LimitNOFILE=262144",
    ] {
        assert!(
            server_unit.lines().any(|l| l == line),
            "{line} missing:\n{server_unit}"
        );
    }
    let agent_unit = read(&at("/lib/systemd/system/drover-agent.service"));
    assert!(
        agent_unit
            .lines()
            .any(|l| l
                == "ExecStart=/usr/bin/drover-agent run --config /etc/drover-agent/agent.conf"),
        "{agent_unit}"
    );
    // The package's agent unit is the one `drover-agent service install` writes, but for
    // its paths and its first comment lines.
    let written = tempfile::tempdir().unwrap();
    let config = written.path().join("agent.conf");
    run(std::process::Command::new(at("/usr/bin/drover-agent"))
        .args(["service", "install", "--no-start", "--unit-dir"])
        .arg(written.path())
        .arg("--config")
        .arg(&config)
        .args(["--", "--server", "https://drover.example.com"]));
    let installed = read(&written.path().join("drover-agent.service"))
        .replace(
            at("/usr/bin/drover-agent").to_str().unwrap(),
            "/usr/bin/drover-agent",
        )
        .replace(config.to_str().unwrap(), "/etc/drover-agent/agent.conf");
    let body = |unit: &str| -> Vec<String> {
        unit.lines()
            .filter(|l| {
                !l.starts_with("# systemd unit for the Drover agent")
                    && !l.starts_with("# `drover-agent service install` writes")
            })
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(body(&agent_unit), body(&installed));

    // Maintainer scripts: a user and a private state directory on install; removal stops
    // the service and keeps the data, only a purge deletes it.
    let script = |name: &str, which: &str| {
        let path = control.path().join(name).join(which);
        assert_eq!(mode_of(&path), 0o755, "{name} {which}");
        read(&path)
    };
    let postinst = script("drover-server", "postinst");
    assert!(postinst.contains("adduser --system") && postinst.contains("useradd --system"));
    assert!(
        postinst.contains("chmod 0700 /var/lib/drover"),
        "{postinst}"
    );
    assert!(script("drover-server", "prerm").contains("systemctl stop drover-server.service"));
    let postrm = script("drover-server", "postrm");
    let purge = postrm.find("\"$1\" = purge").expect("a purge branch");
    let delete = postrm
        .find("rm -rf /var/lib/drover")
        .expect("purge deletes the data");
    assert!(
        delete > purge,
        "the data is deleted only on purge:\n{postrm}"
    );
    for name in ["drover-server", "drover-agent"] {
        for which in ["postinst", "prerm", "postrm"] {
            run(std::process::Command::new("sh")
                .arg("-n")
                .arg(control.path().join(name).join(which)));
        }
    }

    // systemd reads the units (with ExecStart pointing at the unpacked binaries, as the
    // host has none installed).
    if have("systemd-analyze") {
        for (unit, binary) in [
            ("drover-server.service", "/usr/bin/drover-server"),
            ("drover-agent.service", "/usr/bin/drover-agent"),
        ] {
            let text = read(&at(&format!("/lib/systemd/system/{unit}")))
                .replace(binary, at(binary).to_str().unwrap());
            let copy = control.path().join(unit);
            std::fs::write(&copy, text).unwrap();
            run(std::process::Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(&copy));
        }
    }
    if have("rpm") {
        for name in ["drover-server", "drover-agent"] {
            let rpm = out.path().join(format!("{name}-{version}-1.x86_64.rpm"));
            let files = run(std::process::Command::new("rpm").arg("-qlp").arg(&rpm));
            assert!(
                files.lines().any(|f| f == format!("/usr/bin/{name}")),
                "{files}"
            );
            let scripts = run(std::process::Command::new("rpm")
                .args(["-qp", "--scripts"])
                .arg(&rpm));
            assert!(scripts.contains("systemctl"), "{scripts}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_can_require_a_token_and_count_agents_without_reading_them() {
    const TOKEN: &str = "metrics-0123456789abcdef0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--metrics-token", TOKEN]);
    let _agent = ProtocolAgent::enroll(&server, "fp-counted", "1.0.0").await;
    let client = reqwest::Client::new();
    let url = format!("{}/metrics", server.url);
    for bearer in [None, Some("wrong"), Some(&TOKEN[..TOKEN.len() - 1])] {
        let mut request = client.get(&url);
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status(), 401, "{bearer:?}");
    }
    let answer = client.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await.unwrap().contains("\ndrover_agents 1\n"));

    // A guessable token is refused before the server starts.
    let output = std::process::Command::new(SERVER_BIN)
        .args(["--metrics-token", "hunter2", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("use at least 32"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_server_keeps_its_data_private_and_refuses_guessable_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let _agent = ProtocolAgent::enroll(&server, "fp-private", "1.0.0").await;
    let data = dir.path().join("data");
    assert_eq!(mode_of(&data), 0o700);
    for file in [
        "drover.db",
        "drover.db-wal",
        "drover.db-shm",
        "drover.db.lock",
    ] {
        let path = data.join(file);
        if path.exists() {
            assert_eq!(mode_of(&path), 0o600, "{file}");
        }
    }
    assert!(data.join("drover.db").exists());
    assert!(data.join("drover.db.lock").exists());

    let output = std::process::Command::new(SERVER_BIN)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("weak"))
        .env("DROVER_ADMIN_TOKEN", "hunter2")
        .env_remove("DROVER_ENROLL_TOKEN")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("DROVER_ADMIN_TOKEN is 7 characters long; a token must have at least 32"),
        "{said}"
    );
}

/// `drover-agent status --json` for a state directory.
fn agent_status(state_dir: &std::path::Path) -> Value {
    let out = run(std::process::Command::new(AGENT_BIN)
        .args(["status", "--json", "--state-dir"])
        .arg(state_dir));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status is not JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_status_reads_the_state_directory_and_agent_logs_can_be_json() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let mut agent = Agent::start_with(
        &server,
        dir.path(),
        "watched",
        &[
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            "fp-watched",
            "--log-format",
            "json",
        ],
    );
    let id = enrolled_id(&server, "watched").await;
    let status = eventually("the agent to record its session", SOON, || async {
        let status = agent_status(&agent.state_dir);
        (status["connected"] == true).then_some(status)
    })
    .await;
    assert_eq!(status["agent_id"], id.as_str(), "{status}");
    assert_eq!(status["server"], server.url.as_str(), "{status}");
    assert_eq!(
        status["version"],
        version_of(std::path::Path::new(AGENT_BIN)),
        "{status}"
    );
    assert_eq!(status["running"], true, "{status}");
    assert!(
        status["update"].is_null() && status["last_result"].is_null(),
        "{status}"
    );
    assert_eq!(
        status["channel"], "stable",
        "the welcome names it: {status}"
    );
    let text = run(std::process::Command::new(AGENT_BIN)
        .args(["status", "--state-dir"])
        .arg(&agent.state_dir));
    assert!(text.contains(&format!("agent:       {id}")), "{text}");
    assert!(text.contains("connection:  connected since "), "{text}");
    assert!(
        text.contains("channel:     stable (as the server said at "),
        "{text}"
    );

    // An operator moves the agent: the connected agent hears of it without reconnecting.
    let (code, body) = server
        .api()
        .put(
            &format!("/api/v1/agents/{id}/channel"),
            json!({"channel": "beta"}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let moved = eventually("the agent to record its new channel", SOON, || async {
        let status = agent_status(&agent.state_dir);
        (status["channel"] == "beta").then_some(status)
    })
    .await;
    assert_eq!(
        moved["since_ms"], status["since_ms"],
        "the same session: {moved}"
    );

    // Supervisor and worker both log JSON, with the agent id as a field.
    let log = agent.log();
    let mut connected = false;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let entry: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("an agent log line is not JSON ({e}): {line}"));
        connected |= entry["agent"] == id.as_str()
            && entry["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("connected to"));
    }
    assert!(connected, "{log}");

    // Killed without a word: status says so rather than "connected".
    agent.kill9();
    let gone = agent_status(&agent.state_dir);
    assert_eq!(gone["running"], false, "{gone}");
    let text = run(std::process::Command::new(AGENT_BIN)
        .args(["status", "--state-dir"])
        .arg(&agent.state_dir));
    assert!(text.contains("connection:  not running"), "{text}");
}
