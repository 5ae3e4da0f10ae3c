//! End-to-end: `drover-sim` runs a simulated fleet against the real server, which must
//! see every simulated agent, and must see each of them take a promoted update; a backup
//! taken while the fleet heartbeats restores a server every agent returns to.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

const FLEET: usize = 200;

/// A running `drover-sim --json`. Killed when dropped; `stop` ends it politely.
struct Sim {
    child: Option<Child>,
    progress: PathBuf,
}

impl Sim {
    fn start(server: &Server, dir: &Path, agents: usize, extra: &[&str]) -> Sim {
        Sim::start_in(server, dir, ENROLL_TOKEN, "identities.json", agents, extra)
    }

    /// A fleet enrolled with `token` (into that token's site), its identities in `file`.
    fn start_in(
        server: &Server,
        dir: &Path,
        token: &str,
        file: &str,
        agents: usize,
        extra: &[&str],
    ) -> Sim {
        let progress = dir.join(format!("sim-{}.log", rand_suffix()));
        let log = std::fs::File::create(&progress).unwrap();
        let child = Command::new(sim_bin())
            .args(["--server", &server.url, "--enroll-token", token])
            .args(["--agents", &agents.to_string()])
            .arg("--identities")
            .arg(dir.join(file))
            .args(["--source-ips", "127.0.0.2-127.0.0.5"])
            .args(["--report-every", "0.2", "--json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("drover-sim starts");
        Sim {
            child: Some(child),
            progress,
        }
    }

    /// The newest progress line the simulator wrote.
    fn last_progress(&self) -> String {
        std::fs::read_to_string(&self.progress)
            .unwrap_or_default()
            .lines()
            .rev()
            .find(|line| line.contains("connected "))
            .unwrap_or_default()
            .to_owned()
    }

    /// SIGTERM, then the JSON report the simulator prints on its way out.
    fn stop(mut self) -> Value {
        let child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "drover-sim failed: {stdout}\n{}",
            std::fs::read_to_string(&self.progress).unwrap_or_default()
        );
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|err| panic!("drover-sim printed no JSON report ({err}): {stdout}"))
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The newest rollout of `version`; `None` while there is none, or while the server does
/// not answer (it may be restarting).
async fn rollout_of(api: &Api, version: &str) -> Option<Value> {
    let (status, rollouts) = api
        .get(&format!("/api/v1/rollouts?version={version}"))
        .await;
    (status == 200).then_some(())?;
    rollouts.as_array()?.first().cloned()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn ids(agents: &[Value]) -> BTreeSet<String> {
    agents
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn simulated_fleet_connects_and_a_rerun_reuses_its_identities() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &[]);
    let api = server.api();

    let sim = Sim::start(&server, dir.path(), FLEET, &[]);
    let agents = all_online(&api, FLEET).await;
    let first = ids(&agents);
    assert_eq!(first.len(), FLEET, "every simulated agent has its own id");
    let hostnames: BTreeSet<&str> = agents
        .iter()
        .map(|a| a["hostname"].as_str().unwrap())
        .collect();
    assert!(hostnames.contains("sim-0") && hostnames.contains(&*format!("sim-{}", FLEET - 1)));
    let report = sim.stop();
    assert_eq!(report["connected"], FLEET, "report: {report}");
    assert_eq!(report["errors_total"], 0, "report: {report}");
    assert_eq!(report["enrolled"], FLEET, "report: {report}");
    assert_eq!(report["connect_ms"]["count"], FLEET, "report: {report}");

    let rerun = Sim::start(&server, dir.path(), FLEET, &[]);
    let again = all_online(&api, FLEET).await;
    assert_eq!(
        ids(&again),
        first,
        "a rerun authenticates as the same agents"
    );
    let report = rerun.stop();
    assert_eq!(report["enrolled"], 0, "report: {report}");
    assert_eq!(report["reused_identities"], FLEET, "report: {report}");
    assert_eq!(report["errors_total"], 0, "report: {report}");
    assert_eq!(api.agents().await.unwrap().len(), FLEET);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_full_of_sessions_still_answers_its_health_checks_and_operators() {
    let dir = tempfile::tempdir().unwrap();
    // Forty connections: sessions may take twenty of them.
    let server = Server::start_with_args(dir.path(), &["--max-connections", "40"]);
    let api = server.api();
    let sim = Sim::start(&server, dir.path(), 50, &[]);
    eventually(
        "twenty agents connected and the rest refused",
        Duration::from_secs(30),
        || async {
            let refused = sessions_refused(&server).await;
            let online = api
                .agents()
                .await?
                .iter()
                .filter(|a| a["online"] == true)
                .count();
            (online == 20 && refused > 0.0).then_some(())
        },
    )
    .await;
    // Full, and with agents knocking all along: every health check and operator request
    // is answered, and the node never takes a twenty-first session.
    for _ in 0..10 {
        let health: Value = reqwest::get(format!("{}/healthz", server.url))
            .await
            .expect("a full node answers its health check")
            .json()
            .await
            .unwrap();
        assert_eq!(health["agents_connected"], 20, "{health}");
        let (status, fleet) = api.get("/api/v1/fleet").await;
        assert_eq!(status, 200, "{fleet}");
        assert_eq!(fleet["online"], 20, "{fleet}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let report = sim.stop();
    assert_eq!(report["connected"], 20, "report: {report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_a_full_node_turns_away_stays_away_as_long_as_it_asks() {
    let dir = tempfile::tempdir().unwrap();
    // Sixteen connections: sessions may take eight, and eight simulated agents hold them.
    let server = Server::start_with_args(dir.path(), &["--max-connections", "16"]);
    let api = server.api();
    let sim = Sim::start(&server, dir.path(), 8, &[]);
    all_online(&api, 8).await;
    let agent = Agent::start(&server, dir.path(), "late");
    // The node answers 503 with Retry-After (5 to 30 s); with one server, the agent
    // waits at least that long rather than its first backoff of about a second.
    let waited = eventually(
        "the refused agent to back off",
        Duration::from_secs(20),
        || async {
            let log = agent.log();
            let refused = log.find("503")?;
            let line = log[refused..]
                .lines()
                .find(|line| line.contains("reconnecting after backoff"))?;
            let ms = line.split("delay_ms=").nth(1)?.split_whitespace().next()?;
            ms.parse::<u64>().ok()
        },
    )
    .await;
    assert!((5_000..=30_000).contains(&waited), "waited {waited} ms");
    // Once there is room, it comes in.
    drop(sim);
    eventually("the late agent online", Duration::from_secs(60), || async {
        let agent = agent_view(&server, "late").await?;
        (agent["online"] == true).then_some(())
    })
    .await;
}

/// How many sessions the server turned away because it held its most.
async fn sessions_refused(server: &Server) -> f64 {
    let text = server.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix("drover_sessions_refused_total "))
        .and_then(|value| value.parse().ok())
        .expect("drover_sessions_refused_total in /metrics")
}

/// Runs `drover-server COMMAND FILE` on the server's data directory; its success and
/// everything it printed.
fn server_command(server: &Server, command: &str, file: &Path) -> (bool, String) {
    let output = Command::new(SERVER_BIN)
        .arg(command)
        .arg(file)
        .arg("--data-dir")
        .arg(server.dir.join("data"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("drover-server runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_taken_while_the_fleet_heartbeats_restores_a_server_every_agent_returns_to() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with_args(dir.path(), &[]);
    let api = server.api();
    let sim = Sim::start(&server, dir.path(), FLEET, &[]);
    let first = ids(&all_online(&api, FLEET).await);

    // Taken while every agent heartbeats into the database.
    let backup = dir.path().join("drover-backup.db");
    let (ok, said) = server_command(&server, "backup", &backup);
    assert!(ok, "{said}");
    assert!(
        said.contains(&format!("({FLEET} agents, schema version")),
        "{said}"
    );
    let (ok, said) = server_command(&server, "backup", &backup);
    assert!(!ok && said.contains("exists already"), "{said}");
    // Something the backup does not hold, which the restore must undo.
    let (status, body) = api
        .post(
            "/api/v1/clients",
            Some(serde_json::json!({"name": "after the backup"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // A running server's database is not replaced under it.
    let (ok, said) = server_command(&server, "restore", &backup);
    assert!(!ok && said.contains("stop it first"), "{said}");
    assert_eq!(sim.stop()["errors_total"], 0);

    server.terminate();
    let (ok, said) = server_command(&server, "restore", &backup);
    assert!(ok, "{said}");
    assert!(
        said.contains("the database it replaced is kept as"),
        "{said}"
    );
    server.restart();

    let rerun = Sim::start(&server, dir.path(), FLEET, &[]);
    let again = all_online(&api, FLEET).await;
    assert_eq!(ids(&again), first, "every agent returns as itself");
    let report = rerun.stop();
    assert_eq!(report["enrolled"], 0, "nothing re-enrolls: {report}");
    assert_eq!(report["reused_identities"], FLEET, "report: {report}");
    assert_eq!(report["errors_total"], 0, "report: {report}");
    let (_, clients) = api.get("/api/v1/clients").await;
    assert!(
        clients
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["name"] != "after the backup"),
        "{clients}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn simulated_fleet_takes_a_promoted_build_downloads_verifies_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &[]);
    let api = server.api();
    // Under the server's download limit, so no agent waits out a 10 s Retry-After.
    let sim = Sim::start(&server, dir.path(), FLEET, &["--max-downloads", "32"]);
    let agents = all_online(&api, FLEET).await;

    // A beta build is not for this stable fleet...
    let build: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    publish(&server.downloads(), "1.1.0", Some("beta"), &build);
    let rollout = || rollout_of(&api, "1.1.0");
    let beta = eventually("1.1.0 to be offered", Duration::from_secs(20), rollout).await;
    assert_eq!(
        (&beta["kind"], &beta["targeted"]),
        (&"beta".into(), &0.into()),
        "a beta rollout with no beta agent: {beta}"
    );

    // ...until it is promoted (forced: no beta agent has tried it), which reaches all.
    let (status, promoted) = api
        .post(
            "/api/v1/rollouts/1.1.0/promote",
            Some(serde_json::json!({ "force": true })),
        )
        .await;
    assert_eq!(status, 200, "{promoted}");
    assert_eq!(promoted["forced"], true, "{promoted}");

    eventually(
        "every simulated agent to run 1.1.0",
        Duration::from_secs(60),
        || async {
            let agents = api.agents().await?;
            let updated = agents.iter().filter(|a| a["version"] == "1.1.0").count();
            (updated == FLEET).then_some(())
        },
    )
    .await;
    for agent in &agents {
        let id = agent["id"].as_str().unwrap();
        eventually(
            &format!("agent {id}'s task to succeed"),
            Duration::from_secs(20),
            || async {
                let (status, detail) = api.get(&format!("/api/v1/agents/{id}")).await;
                let task = &detail["tasks"][0];
                (status == 200 && task["to_version"] == "1.1.0" && task["status"] == "succeeded")
                    .then_some(())
            },
        )
        .await;
    }
    // The simulator counts an update complete when the server acknowledges the new
    // version's heartbeat, which can trail the server's own bookkeeping by a moment.
    let done = format!("updates {FLEET}/{FLEET}");
    eventually(
        "the simulator to count every update",
        Duration::from_secs(10),
        || async { sim.last_progress().contains(&done).then_some(()) },
    )
    .await;

    let done = eventually(
        "the promote to complete",
        Duration::from_secs(20),
        || async {
            let done = rollout().await?;
            (done["state"] == "completed").then_some(done)
        },
    )
    .await;
    assert_eq!(
        (
            &done["kind"],
            &done["targeted"],
            &done["succeeded"],
            &done["failed"]
        ),
        (&"promote".into(), &FLEET.into(), &FLEET.into(), &0.into()),
        "{done}"
    );

    let report = sim.stop();
    assert_eq!(report["updates_received"], FLEET, "report: {report}");
    assert_eq!(
        report["update_received_unix_ms"]["count"], FLEET,
        "every agent held the update once: {report}"
    );
    assert_eq!(
        report["update_completed_unix_ms"]["count"], FLEET,
        "report: {report}"
    );
    assert_eq!(report["updates_verified"], FLEET, "report: {report}");
    assert_eq!(report["updates_completed"], FLEET, "report: {report}");
    assert_eq!(report["updates_failed"], 0, "report: {report}");
    assert_eq!(report["errors_total"], 0, "report: {report}");
    assert_eq!(
        report["update_notify_ms"]["count"], FLEET,
        "report: {report}"
    );
    assert_eq!(
        api.agents().await.unwrap().len(),
        FLEET,
        "updates add no agents"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_download_server_pushes_updates_as_slots_free_instead_of_refusing_them() {
    const FEW: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--max-concurrent-downloads", "2"]);
    let api = server.api();
    let sim = Sim::start(&server, dir.path(), FEW, &[]);
    all_online(&api, FEW).await;

    let build = vec![7u8; 4 * 1024 * 1024];
    publish(&server.downloads(), "1.1.0", Some("stable"), &build);
    // Two slots: three pushed at once, the rest queued and pushed as slots free.
    let queued = eventually("the rest to be queued", Duration::from_secs(20), || async {
        let rollout = rollout_of(&api, "1.1.0").await?;
        (rollout["queued"].as_u64()? >= 10).then_some(rollout)
    })
    .await;
    // Only downloads hold slots: an agent that has its bytes (installing) gave its own back.
    assert!(queued["downloading"].as_u64().unwrap() <= 3, "{queued}");
    let done = format!("updates {FEW}/{FEW}");
    eventually(
        "the simulator to finish every update",
        Duration::from_secs(120),
        || async { sim.last_progress().contains(&done).then_some(()) },
    )
    .await;

    let report = sim.stop();
    // Without admission every agent but two met a 503 first; now at most the margin
    // does, now and then, and waits it out.
    assert!(
        report["download_retries"].as_u64().unwrap() < (FEW / 2) as u64,
        "agents were pushed faster than slots freed: {report}"
    );
    assert_eq!(report["updates_completed"], FEW, "report: {report}");
    assert_eq!(report["errors_total"], 0, "report: {report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn simulated_build_failures_reach_the_server_as_rolled_back_tasks() {
    // Under the server's halt minimum (5 finished attempts a version), so every agent
    // is offered each build and the counts below are exact.
    const FEW: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    // Frequent heartbeats, so versions reach the agent rows quickly.
    let server = Server::start_with_args(dir.path(), &["--heartbeat-interval", "1"]);
    let api = server.api();
    // A rate of 0.5 fails sim-1 and sim-3 on every build; everyone fails 1.2.0.
    let sim = Sim::start(
        &server,
        dir.path(),
        FEW,
        &["--fail-rate", "0.5", "--fail-versions", "1.2.0"],
    );
    let agents = all_online(&api, FEW).await;
    let id_of = |name: &str| {
        let agent = agents.iter().find(|a| a["hostname"] == name).unwrap();
        agent["id"].as_str().unwrap().to_owned()
    };
    let newest_task_is = |name: &'static str, version: &'static str, status: &'static str| {
        let id = id_of(name);
        let server = &server;
        async move {
            eventually(
                &format!("{name}'s task to {version} to be {status}"),
                UPDATE_WAIT,
                || async {
                    let newest = tasks_of(server, &id).await.first()?.clone();
                    (newest["to_version"] == version && newest["status"] == status).then_some(())
                },
            )
            .await
        }
    };

    publish(&server.downloads(), "1.1.0", Some("stable"), &[1u8; 4096]);
    for (name, status) in [
        ("sim-0", "succeeded"),
        ("sim-1", "rolled_back"),
        ("sim-2", "succeeded"),
        ("sim-3", "rolled_back"),
    ] {
        newest_task_is(name, "1.1.0", status).await;
    }
    // A newer build is offered again to the agents that failed the last one.
    publish(&server.downloads(), "1.2.0", Some("stable"), &[2u8; 4096]);
    for name in ["sim-0", "sim-1", "sim-2", "sim-3"] {
        newest_task_is(name, "1.2.0", "rolled_back").await;
    }
    // Rolled back means still on the old version.
    eventually(
        "every agent row to show the version it kept",
        Duration::from_secs(30),
        || async {
            let agents = api.agents().await?;
            agents
                .iter()
                .all(|a| {
                    let kept = match a["hostname"].as_str() {
                        Some("sim-0" | "sim-2") => "1.1.0",
                        _ => "1.0.0",
                    };
                    a["version"] == kept
                })
                .then_some(())
        },
    )
    .await;

    // The server's rolled-back tasks, per version, are what the simulator says it sent.
    let mut recorded = serde_json::Map::new();
    for agent in &agents {
        for task in tasks_of(&server, agent["id"].as_str().unwrap()).await {
            if task["status"] == "rolled_back" {
                let version = task["to_version"].as_str().unwrap().to_owned();
                let count = recorded.get(&version).and_then(Value::as_u64).unwrap_or(0);
                recorded.insert(version, (count + 1).into());
            }
        }
    }
    let report = sim.stop();
    assert_eq!(
        report["failures_reported"],
        serde_json::json!({"1.1.0": 2, "1.2.0": FEW}),
        "report: {report}"
    );
    assert_eq!(
        Value::Object(recorded),
        report["failures_reported"],
        "report: {report}"
    );
    assert_eq!(report["updates_completed"], 2, "report: {report}");
    assert_eq!(report["updates_failed"], 2 + FEW, "report: {report}");
    assert_eq!(report["errors_total"], 0, "report: {report}");
}

/// Agents the kill -9 test simulates: "a few thousand", within this machine's limits.
const STORM: usize = 2000;

/// Whether this process may open enough sockets for `STORM` agents; the server and the
/// simulator inherit the limit. Says why not, and fails instead under `CI=true`.
fn open_files_allow(agents: usize) -> bool {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|soft| soft.parse::<usize>().ok())
        .unwrap_or(usize::MAX);
    let needed = agents + 500;
    if soft >= needed {
        return true;
    }
    let why =
        format!("the open-files limit is {soft}; this test needs {needed} (ulimit -n {needed})");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipping: {why}");
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_killed_mid_rollout_finishes_it_from_its_saved_state() {
    if !open_files_allow(STORM) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Few downloads at once, so the rollout is still under way when the kill comes.
    let mut server = Server::start_with_args(
        dir.path(),
        &[
            "--max-concurrent-downloads",
            "4",
            "--heartbeat-interval",
            "5",
        ],
    );
    let api = server.api();
    let sim = Sim::start(&server, dir.path(), STORM, &["--max-downloads", "4"]);
    all_online(&api, STORM).await;

    let build: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 253) as u8).collect();
    publish(&server.downloads(), "1.1.0", Some("beta"), &build);
    let rollout = || rollout_of(&api, "1.1.0");
    eventually("1.1.0 to be offered", Duration::from_secs(20), rollout).await;
    let (status, promoted) = api
        .post(
            "/api/v1/rollouts/1.1.0/promote",
            Some(serde_json::json!({ "force": true })),
        )
        .await;
    assert_eq!(status, 200, "{promoted}");

    // Mid-rollout: some agents done, most not.
    let before = eventually(
        "the rollout to be under way",
        Duration::from_secs(60),
        || async {
            let state = rollout().await?;
            let succeeded = state["succeeded"].as_u64()?;
            (succeeded >= 20).then_some(state)
        },
    )
    .await;
    server.kill9();
    let succeeded_before = before["succeeded"].as_u64().unwrap();
    assert!(
        succeeded_before < STORM as u64,
        "the rollout ended before the kill; slow it down: {before}"
    );
    server.restart();

    // The promote, acknowledged before the kill, holds; the agents come back and the
    // rollout runs to the end, each agent through its one task.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let done = loop {
        let state = rollout().await;
        if let Some(state) = &state
            && state["succeeded"] == STORM
        {
            break state.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every agent's task did not succeed after the restart; last seen {state:?}; sim: {}",
            sim.last_progress()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        (&done["kind"], &done["targeted"]),
        (&"promote".into(), &STORM.into()),
        "{done}"
    );
    // One task per agent: a second would have needed the first to fail or be cancelled.
    assert_eq!(
        (&done["failed"], &done["rolled_back"], &done["cancelled"]),
        (&0.into(), &0.into(), &0.into()),
        "{done}"
    );
    assert_eq!(
        done["failures"],
        serde_json::json!({ "build": 0, "environment": 0, "transient": 0 }),
        "{done}"
    );
    // Versions reach the agent rows with the next heartbeat batch.
    eventually(
        "every agent row to show 1.1.0",
        Duration::from_secs(30),
        || async {
            let agents = api.agents().await?;
            assert_eq!(agents.len(), STORM, "no agent twice");
            agents.iter().all(|a| a["version"] == "1.1.0").then_some(())
        },
    )
    .await;
    let (status, audit) = api.get("/api/v1/audit?limit=500").await;
    assert_eq!(status, 200, "{audit}");
    assert!(
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "rollout.promote" && e["target"] == "1.1.0"),
        "the promote's audit entry survived the kill: {audit}"
    );

    let report = sim.stop();
    // Every agent that moved to 1.1.0 did so with a build whose size and SHA-256 it
    // checked; none was sent anything it refused.
    assert_eq!(report["updates_failed"], 0, "report: {report}");
    assert!(
        report["updates_verified"].as_u64().unwrap() >= STORM as u64,
        "report: {report}"
    );
}

/// Publishes `version` on beta and promotes it with the server's default plan (forced:
/// no beta agent has tried it); answers the promote.
async fn publish_and_promote(server: &Server, version: &str, build: &[u8]) -> Value {
    let api = server.api();
    publish(&server.downloads(), version, Some("beta"), build);
    eventually(
        &format!("{version} to be offered"),
        Duration::from_secs(20),
        || rollout_of(&api, version),
    )
    .await;
    let (status, promoted) = api
        .post(
            &format!("/api/v1/rollouts/{version}/promote"),
            Some(serde_json::json!({ "force": true })),
        )
        .await;
    assert_eq!(status, 200, "{promoted}");
    promoted
}

/// Where each agent of a rollout stands: agent id → (wave, stage), from its agents pages.
async fn targets_of(api: &Api, rollout: &str) -> Vec<(String, u64, String)> {
    let mut all = Vec::new();
    loop {
        let (status, page) = api
            .get(&format!(
                "/api/v1/rollouts/{rollout}/agents?limit=500&offset={}",
                all.len()
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        let agents = page["agents"].as_array().unwrap();
        all.extend(agents.iter().map(|a| {
            (
                a["agent_id"].as_str().unwrap().to_owned(),
                a["wave"].as_u64().unwrap(),
                a["stage"].as_str().unwrap().to_owned(),
            )
        }));
        if agents.is_empty() || all.len() as u64 >= page["total"].as_u64().unwrap() {
            return all;
        }
    }
}

/// No agent outside a started wave was ever sent the update: every agent with a task in
/// the rollout is in a wave that had started. Read the agents first, then the rollout,
/// so a wave that starts in between cannot make a violation look legal.
async fn only_started_waves_moved(api: &Api, rollout: &str) -> Value {
    let targets = targets_of(api, rollout).await;
    let (_, record) = api.get(&format!("/api/v1/rollouts/{rollout}")).await;
    let current = record["current_wave"].as_u64().unwrap();
    for (agent, wave, stage) in &targets {
        if stage != "waiting" && stage != "skipped" {
            assert!(
                *wave <= current,
                "agent {agent} of wave {} is {stage} while the rollout is in wave {}",
                wave + 1,
                current + 1
            );
        }
    }
    // The stages add up, and no more succeed than are targeted.
    let n = |k: &str| record[k].as_u64().unwrap();
    assert_eq!(
        [
            "waiting",
            "queued",
            "in_progress",
            "succeeded",
            "failed",
            "rolled_back",
            "cancelled",
            "skipped"
        ]
        .iter()
        .map(|k| n(k))
        .sum::<u64>(),
        n("targeted"),
        "{record}"
    );
    record
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_agents_over_four_sites_take_a_promote_wave_by_wave_and_a_bad_build_stops_in_the_canary()
 {
    const PER_SITE: usize = 250;
    const FLEET: usize = 4 * PER_SITE;
    if !open_files_allow(FLEET) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The default plan (1% canary, 10%, 50%, everyone) with a short bake.
    let server = Server::start_with_args(
        dir.path(),
        &[
            "--default-waves",
            "1%,10%,50%,100%",
            "--wave-bake",
            "2s",
            "--heartbeat-interval",
            "2",
        ],
    );
    let api = server.api();

    // Four sites of 250 agents each; 1.2.0 fails on every agent that tries it.
    let (_, client) = api.get("/api/v1/clients").await;
    let client_id = client[0]["id"].as_str().unwrap().to_owned();
    let (_, sites) = api.get("/api/v1/sites").await;
    let mut tokens = vec![(
        sites[0]["id"].as_str().unwrap().to_owned(),
        ENROLL_TOKEN.to_owned(),
    )];
    for name in ["north", "east", "west"] {
        let (status, site) = api
            .post(
                "/api/v1/sites",
                Some(serde_json::json!({ "client_id": client_id, "name": name })),
            )
            .await;
        assert_eq!(status, 201, "{site}");
        let site = site["id"].as_str().unwrap().to_owned();
        let (status, token) = api
            .post(&format!("/api/v1/sites/{site}/enrollment-tokens"), None)
            .await;
        assert_eq!(status, 201, "{token}");
        tokens.push((site, token["token"].as_str().unwrap().to_owned()));
    }
    let fleets: Vec<Sim> = tokens
        .iter()
        .enumerate()
        .map(|(i, (_, token))| {
            Sim::start_in(
                &server,
                dir.path(),
                token,
                &format!("identities-{i}.json"),
                PER_SITE,
                &["--max-downloads", "64", "--fail-versions", "1.2.0"],
            )
        })
        .collect();
    let agents = all_online(&api, FLEET).await;
    let site_of: std::collections::HashMap<String, String> = agents
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_owned(),
                a["site_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();

    // Promote 1.1.0 with the default plan.
    let build: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let promoted = publish_and_promote(&server, "1.1.0", &build).await;
    let id = promoted["rollout"]["id"].as_str().unwrap().to_owned();
    let sizes: Vec<u64> = promoted["rollout"]["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [10, 90, 400, 500], "{promoted}");

    // Each wave holds its share, the canary spans the four sites, and at every look no
    // agent outside a started wave has been sent the build.
    let targets = targets_of(&api, &id).await;
    assert_eq!(targets.len(), FLEET);
    for (wave, size) in sizes.iter().enumerate() {
        let members = targets.iter().filter(|(_, w, _)| *w == wave as u64).count() as u64;
        assert!(
            members.abs_diff(*size) <= 1,
            "wave {wave}: {members} of {size}"
        );
    }
    let canary_sites: BTreeSet<&String> = targets
        .iter()
        .filter(|(_, w, _)| *w == 0)
        .map(|(agent, _, _)| &site_of[agent])
        .collect();
    assert_eq!(canary_sites.len(), 4, "the canary spans every site");
    let waves_seen = std::sync::Mutex::new(BTreeSet::new());
    let done = eventually(
        "every wave to run and the promote to complete",
        Duration::from_secs(240),
        || async {
            let record = only_started_waves_moved(&api, &id).await;
            waves_seen
                .lock()
                .unwrap()
                .insert(record["current_wave"].as_u64().unwrap());
            (record["state"] == "completed").then_some(record)
        },
    )
    .await;
    assert_eq!(done["succeeded"], FLEET, "{done}");
    let waves_seen = waves_seen.into_inner().unwrap();
    assert!(
        waves_seen.len() > 1,
        "waves started one after another: {waves_seen:?}"
    );

    // 1.2.0 fails on every agent: the rollout halts in the canary, and nobody outside
    // it is sent the build.
    let promoted = publish_and_promote(&server, "1.2.0", &build[..32 * 1024]).await;
    let bad = promoted["rollout"]["id"].as_str().unwrap().to_owned();
    let halted = eventually("the bad build to halt", Duration::from_secs(60), || async {
        let record = only_started_waves_moved(&api, &bad).await;
        (record["state"] == "halted").then_some(record)
    })
    .await;
    assert_eq!(halted["current_wave"], 0, "halted in the canary: {halted}");
    assert!(
        halted["reason"].as_str().unwrap().starts_with("wave 1"),
        "{halted}"
    );
    // Whatever of the canary was under way ends; still nobody else moves.
    let settled = eventually(
        "the canary's updates to end",
        Duration::from_secs(60),
        || async {
            let record = only_started_waves_moved(&api, &bad).await;
            (record["in_progress"] == 0 && record["queued"] == 0).then_some(record)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = only_started_waves_moved(&api, &bad).await;
    assert_eq!(still["waiting"], FLEET - 10, "{still}");

    // A rollback finds nobody on 1.2.0, and every agent runs 1.1.0.
    let (status, rolled) = api.post("/api/v1/rollouts/1.2.0/rollback", None).await;
    assert_eq!(status, 200, "{rolled}");
    assert_eq!(rolled["targeted"], 0, "{rolled}");
    let versions: BTreeSet<String> = api
        .agents()
        .await
        .unwrap()
        .iter()
        .map(|a| a["version"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(versions, BTreeSet::from(["1.1.0".to_owned()]));

    // The server's counts are what the simulators did.
    let reported: u64 = fleets
        .into_iter()
        .map(|sim| {
            sim.stop()["failures_reported"]["1.2.0"]
                .as_u64()
                .unwrap_or(0)
        })
        .sum();
    let (_, after) = api.get(&format!("/api/v1/rollouts/{bad}")).await;
    assert_eq!(
        (
            after["rolled_back"].as_u64(),
            after["failures"]["build"].as_u64()
        ),
        (Some(reported), Some(reported)),
        "{after}"
    );
    assert_eq!(
        after["waves"][0]["counts"]["rolled_back"].as_u64(),
        Some(reported),
        "{after}"
    );
    assert_eq!(settled["rolled_back"].as_u64(), Some(reported), "{settled}");
}

#[tokio::test(flavor = "multi_thread")]
async fn simulated_agents_take_the_compressed_copy_and_count_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--compression-level", "3"]);
    let api = server.api();
    let build: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    publish(&server.downloads(), "1.1.0", Some("beta"), &build);
    let copy = eventually(
        "the compressed copy to be made",
        Duration::from_secs(20),
        || async {
            let (_, releases) = api.get("/api/v1/releases").await;
            releases.as_array()?.first()?["compressed_size"].as_u64()
        },
    )
    .await;
    assert!(copy < build.len() as u64 / 4, "{copy}");
    let sim = Sim::start(&server, dir.path(), FLEET, &["--max-downloads", "32"]);
    all_online(&api, FLEET).await;
    let report = promote_to_every_agent(&api, sim).await;
    assert_eq!(
        report["download_bytes"],
        FLEET as u64 * copy,
        "only the copy crossed the wire: {report}"
    );
}

/// Promotes 1.1.0 to the whole simulated fleet and waits until every agent verified it
/// without an error; answers the simulator's report.
async fn promote_to_every_agent(api: &Api, sim: Sim) -> Value {
    let (status, promoted) = api
        .post(
            "/api/v1/rollouts/1.1.0/promote",
            Some(serde_json::json!({ "force": true })),
        )
        .await;
    assert_eq!(status, 200, "{promoted}");
    let done = format!("updates {FLEET}/{FLEET}");
    eventually(
        "the simulator to count every update",
        Duration::from_secs(60),
        || async { sim.last_progress().contains(&done).then_some(()) },
    )
    .await;
    let report = sim.stop();
    assert_eq!(report["updates_verified"], FLEET, "report: {report}");
    assert_eq!(report["errors_total"], 0, "report: {report}");
    report
}

#[tokio::test(flavor = "multi_thread")]
async fn simulated_agents_take_a_delta_from_the_build_they_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--compression-level", "3"]);
    let api = server.api();
    let base: Vec<u8> = (0..256 * 1024).map(|_| rand::random::<u8>()).collect();
    let mut next = base.clone();
    next[1000..1008].copy_from_slice(b"v1.1.0!!");
    publish(&server.downloads(), "1.0.0", Some("stable"), &base);
    let running = dir.path().join("running-build");
    std::fs::write(&running, &base).unwrap();
    let sim = Sim::start(
        &server,
        dir.path(),
        FLEET,
        &["--running-build", running.to_str().unwrap()],
    );
    all_online(&api, FLEET).await;
    // The fleet runs 1.0.0: the new build gets a delta from it.
    publish(&server.downloads(), "1.1.0", Some("beta"), &next);
    let delta = eventually("the delta to be made", Duration::from_secs(30), || async {
        let (_, releases) = api.get("/api/v1/releases").await;
        let release = releases
            .as_array()?
            .iter()
            .find(|r| r["version"] == "1.1.0")?
            .clone();
        release["deltas"].as_array()?.first()?["size"].as_u64()
    })
    .await;
    assert!(delta < 1000, "{delta}");
    let report = promote_to_every_agent(&api, sim).await;
    assert_eq!(
        report["download_bytes"],
        FLEET as u64 * delta,
        "only the delta crossed the wire: {report}"
    );
}
