//! End-to-end: several server nodes on one PostgreSQL database and one downloads
//! directory. Actions on one node reach agents connected to another, one node at a time
//! sweeps for silent agents' tasks, and a node that dies hands its agents (and the
//! sweep) to the others, and nodes upgraded one at a time from 0.1.0 keep
//! the fleet connected and every task. Each test gets a database of its own; without
//! PostgreSQL these tests skip, except under CI, where they must run.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use protocol::{AgentMessage, ServerMessage};
use serde_json::json;
use support::*;

const SOON: Duration = Duration::from_secs(10);

/// A fresh database on the test PostgreSQL server, dropped on drop.
struct Database {
    name: String,
    url: String,
}

impl Database {
    fn create(test: &str) -> Option<Database> {
        let name = format!("drover_e2e_{test}_{}", std::process::id());
        let psql = |sql: &str| psql("postgres", sql);
        let created = psql(&format!("DROP DATABASE IF EXISTS {name}"))
            .and_then(|_| psql(&format!("CREATE DATABASE {name}")));
        match created {
            Ok(output) if output.status.success() => Some(Database {
                url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
                name,
            }),
            other => {
                let why = match other {
                    Ok(output) => String::from_utf8_lossy(&output.stderr).into_owned(),
                    Err(err) => err.to_string(),
                };
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "CI=true requires PostgreSQL on 127.0.0.1:5432 (scripts/ci-setup starts it): {why}"
                );
                eprintln!(
                    "skipping {test}: no PostgreSQL on 127.0.0.1:5432 ({})",
                    why.trim()
                );
                None
            }
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = psql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs one SQL statement with psql against `database` on the test PostgreSQL; the rows
/// come out unaligned, one a line.
fn psql(database: &str, sql: &str) -> std::io::Result<std::process::Output> {
    std::process::Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", database])
        .args(["-qtAc", sql])
        .output()
}

impl Database {
    /// From now on each write of tasks takes three seconds, as on a busy database.
    fn slow_task_writes(&self) {
        self.query(
            "CREATE FUNCTION slow_tasks() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$; \
             CREATE TRIGGER slow_tasks BEFORE INSERT ON update_tasks \
             FOR EACH STATEMENT EXECUTE FUNCTION slow_tasks()",
        );
    }

    /// The status of the task `id` as its row says; empty while it has no row.
    fn task_status(&self, id: &str) -> String {
        self.query(&format!(
            "SELECT status FROM update_tasks WHERE id = '{id}'"
        ))
    }

    /// What `sql` returns, trimmed; panics with psql's error if it fails.
    fn query(&self, sql: &str) -> String {
        let out = psql(&self.name, sql).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// The sum of the samples in `url`'s `/metrics` whose lines start with `prefix`; `None`
/// when the node does not answer.
async fn metric_at(url: &str, prefix: &str) -> Option<u64> {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum(),
    )
}

/// Two nodes on one database and one downloads directory.
fn two_nodes(root: &Path, database: &Database) -> (Server, Server) {
    two_nodes_with(root, database, &[])
}

/// Two nodes as `two_nodes` makes them, each with `extra` flags.
fn two_nodes_with(root: &Path, database: &Database, extra: &[&str]) -> (Server, Server) {
    let a_dir = root.join("node-a");
    let b_dir = root.join("node-b");
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let shared = a_dir.join("downloads");
    std::fs::create_dir_all(&shared).unwrap();
    let a_args = [&["--database", database.url.as_str()][..], extra].concat();
    let b_args = [
        &[
            "--database",
            database.url.as_str(),
            "--downloads",
            shared.to_str().unwrap(),
        ][..],
        extra,
    ]
    .concat();
    let a = Server::start_with_args(&a_dir, &a_args);
    let b = Server::start_with_args(&b_dir, &b_args);
    (a, b)
}

async fn offered(api: &Api, version: &str) {
    eventually(&format!("{version} offered"), SOON, || async {
        let (_, releases) = api.get("/api/v1/releases").await;
        releases
            .as_array()?
            .iter()
            .any(|r| r["version"] == version)
            .then_some(())
    })
    .await;
}

/// Waits until a rollout of `version` has started.
async fn rollout_started(api: &Api, version: &str) {
    eventually(&format!("a rollout of {version}"), SOON, || async {
        let (_, rollouts) = api
            .get(&format!("/api/v1/rollouts?version={version}"))
            .await;
        (!rollouts.as_array()?.is_empty()).then_some(())
    })
    .await;
}

/// Listens to `agents` until `awaited` has answered true for a message of each (it is
/// given every message with its agent's index); panics after `SOON` saying which agents
/// never heard `what`.
async fn until_each(
    agents: &mut [ProtocolAgent],
    what: &str,
    mut awaited: impl FnMut(usize, ServerMessage) -> bool,
) {
    let mut heard = vec![false; agents.len()];
    let deadline = tokio::time::Instant::now() + SOON;
    while heard.contains(&false) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not by every agent: {heard:?}"
        );
        for (i, message) in listen(agents, Duration::from_millis(300)).await {
            if awaited(i, message) {
                heard[i] = true;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn actions_on_one_node_reach_agents_on_the_other() {
    let Some(database) = Database::create("actions") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path(), &database);
    let mut on_a = ProtocolAgent::enroll(&a, "fp-on-a", "1.0.0").await;
    let mut on_b = ProtocolAgent::enroll(&b, "fp-on-b", "1.0.0").await;
    on_a.heartbeat().await;
    on_b.heartbeat().await;

    // Either node lists both agents online, once each.
    for node in [&a, &b] {
        let listed = all_online(&node.api(), 2).await;
        assert_eq!(listed.len(), 2);
    }

    // Promote on A reaches the stable agent connected to B.
    publish(&a.downloads(), "1.0.0", Some("stable"), b"build 1.0.0");
    publish(&a.downloads(), "1.1.0", Some("beta"), b"build 1.1.0");
    offered(&a.api(), "1.1.0").await;
    offered(&b.api(), "1.1.0").await;
    let (status, body) = a
        .api()
        .post(
            "/api/v1/rollouts/1.1.0/promote",
            Some(json!({"force": true})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let update = on_b
        .next_update(SOON)
        .await
        .expect("the agent on B hears of A's promote");
    assert_eq!(update.version, "1.1.0");
    let update = on_a
        .next_update(SOON)
        .await
        .expect("and so does the agent on A");
    assert_eq!(update.version, "1.1.0");

    // An update requested on B for an agent connected to A: a beta build, which only the
    // request can move this stable agent to.
    publish(&a.downloads(), "1.2.0", Some("beta"), b"build 1.2.0");
    on_a.reconnect(&a, "1.1.0").await;
    offered(&b.api(), "1.2.0").await;
    while let Some(message) = on_a.next_message(Duration::from_millis(800)).await {
        assert!(
            !matches!(message, ServerMessage::Update(ref u) if u.version == "1.2.0"),
            "a stable agent is not offered a beta build: {message:?}"
        );
    }
    let (status, body) = b
        .api()
        .post(
            &format!("/api/v1/agents/{}/update", on_a.id),
            Some(json!({"version": "1.2.0"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let forced = loop {
        match on_a
            .next_message(SOON)
            .await
            .expect("the request reaches A's agent")
        {
            ServerMessage::Update(update) => break *update,
            _ => continue,
        }
    };
    assert_eq!(forced.version, "1.2.0");

    // A rollback on B reaches an agent on A running the version.
    on_b.reconnect(&a, "1.1.0").await;
    let (status, body) = b.api().post("/api/v1/rollouts/1.1.0/rollback", None).await;
    assert_eq!(status, 200, "{body}");
    let rollback = loop {
        match on_b
            .next_message(SOON)
            .await
            .expect("the rollback reaches the agent")
        {
            ServerMessage::Update(update) => break *update,
            _ => continue,
        }
    };
    assert!(rollback.rollback, "{rollback:?}");
    assert_eq!(rollback.version, "1.0.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_of_a_killed_node_come_back_on_another() {
    let Some(database) = Database::create("failover") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut a, b) = two_nodes(dir.path(), &database);
    let servers = format!("{},{}", a.url, b.url);
    let _agents: Vec<Killed> = ["victor", "whiskey"]
        .iter()
        .map(|name| {
            std::process::Command::new(AGENT_BIN)
                .args(["run", "--enroll-token", ENROLL_TOKEN, "--hostname", name])
                .args(["--fingerprint", &format!("fp-{name}"), "--state-dir"])
                .arg(dir.path().join(name))
                .env("DROVER_SERVER", &servers)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map(Killed)
                .unwrap()
        })
        .collect();
    let before = all_online(&b.api(), 2).await;

    a.kill9();
    // Within the node lease the dead node's agents read as offline or as back on B; in
    // the end all are online again, with the same ids and no second rows.
    let after = eventually(
        "both agents back, on B",
        Duration::from_secs(60),
        || async {
            let agents = b.api().agents().await?;
            let all_online = agents.len() == 2 && agents.iter().all(|a| a["online"] == true);
            let log = b.log();
            let on_b = ["victor", "whiskey"]
                .iter()
                .all(|name| log.contains(&format!("hostname={name}")));
            (all_online && on_b).then_some(agents)
        },
    )
    .await;
    let ids = |agents: &[serde_json::Value]| {
        let mut ids: Vec<String> = agents
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&after), ids(&before));
}

/// A child process killed when the test ends, pass or fail.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_promotes_from_both_nodes_make_one_task_per_agent() {
    let Some(database) = Database::create("promotes") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path(), &database);
    let mut agents = Vec::new();
    for i in 0..6 {
        let node = if i % 2 == 0 { &a } else { &b };
        let mut agent = ProtocolAgent::enroll(node, &format!("fp-p{i}"), "1.0.0").await;
        agent.heartbeat().await;
        agents.push(agent);
    }
    publish(&a.downloads(), "1.1.0", Some("beta"), b"build 1.1.0");
    offered(&a.api(), "1.1.0").await;
    offered(&b.api(), "1.1.0").await;

    let force = Some(json!({"force": true}));
    let (api_a, api_b) = (a.api(), b.api());
    let (on_a, on_b) = tokio::join!(
        api_a.post("/api/v1/rollouts/1.1.0/promote", force.clone()),
        api_b.post("/api/v1/rollouts/1.1.0/promote", force.clone()),
    );
    assert_eq!((on_a.0, on_b.0), (200, 200), "{on_a:?} {on_b:?}");
    for agent in &mut agents {
        let update = agent
            .next_update(SOON)
            .await
            .expect("every agent is sent the build");
        assert_eq!(update.version, "1.1.0");
    }
    // Heartbeats and nudges keep arriving on both nodes; still one task each.
    for agent in &mut agents {
        agent.next_message(Duration::from_millis(300)).await;
    }
    // The node of each agent answers once its task is written; either node lists one.
    for (i, agent) in agents.iter().enumerate() {
        let own = if i % 2 == 0 { &a } else { &b };
        for node in [own, &a, &b] {
            let (_, detail) = node
                .api()
                .get(&format!("/api/v1/agents/{}", agent.id))
                .await;
            let tasks = detail["tasks"].as_array().unwrap();
            assert_eq!(tasks.len(), 1, "agent {}: {tasks:?}", agent.id);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_on_one_node_reaches_downloads_under_way_on_the_other_every_time() {
    let Some(database) = Database::create("rollback_race") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path(), &database);
    let mut agents = Vec::new();
    for i in 0..6 {
        let node = if i % 2 == 0 { &a } else { &b };
        agents.push(ProtocolAgent::enroll(node, &format!("fp-race-{i}"), "1.0.0").await);
    }
    let shared = a.downloads();
    for round in 1..=20u32 {
        let version = format!("1.{round}.0");
        // The rollback comes from either node in turn.
        let (acting, other) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        publish(&shared, &version, Some("stable"), version.as_bytes());
        offered(&acting.api(), &version).await;
        offered(&other.api(), &version).await;

        // Every agent is sent the build and starts downloading it.
        let mut tasks: Vec<Option<String>> = vec![None; agents.len()];
        until_each(
            &mut agents,
            &format!("round {round}: every agent sent {version}"),
            |i, message| match message {
                ServerMessage::Update(update) if update.version == version => {
                    tasks[i] = Some(update.task_id);
                    true
                }
                _ => false,
            },
        )
        .await;
        for (agent, task) in agents.iter_mut().zip(&tasks) {
            agent
                .report(protocol::AgentMessage::UpdateProgress(
                    protocol::UpdateProgress {
                        task_id: task.clone().unwrap(),
                        stage: protocol::UpdateStage::Downloading,
                        bytes_done: 1,
                        bytes_total: version.len() as u64,
                        transfer: None,
                    },
                ))
                .await;
        }

        // Rolled back on one node mid-download: every agent, on either node, is told to
        // stop, and none is sent the build again.
        let (status, body) = acting
            .api()
            .post(&format!("/api/v1/rollouts/{version}/rollback"), None)
            .await;
        assert_eq!(status, 200, "round {round}: {body}");
        until_each(
            &mut agents,
            &format!("round {round}: every download of {version} cancelled"),
            |i, message| match message {
                ServerMessage::Cancel(cancel) if Some(&cancel.task_id) == tasks[i].as_ref() => {
                    assert!(cancel.reason.contains(&version), "{cancel:?}");
                    true
                }
                ServerMessage::Update(update) => panic!(
                    "round {round}: agent {i} was sent {} after {version} was rolled back",
                    update.version
                ),
                _ => false,
            },
        )
        .await;
        for (i, message) in listen(&mut agents, Duration::from_millis(600)).await {
            assert!(
                !matches!(message, ServerMessage::Update(_)),
                "round {round}: agent {i} was sent an update afterwards: {message:?}"
            );
        }
        // The store agrees: every task to the version ended cancelled.
        for agent in &agents {
            for task in tasks_of(acting, &agent.id).await {
                if task["to_version"] == version.as_str() {
                    assert_eq!(task["status"], "cancelled", "round {round}: {task}");
                }
            }
        }
    }
}

/// Runs a PostgreSQL client tool against the test server; panics with its output if it
/// fails.
fn pg_tool(tool: &str, args: &[&str]) {
    let output = std::process::Command::new(tool)
        .args(["-h", "127.0.0.1", "-U", "postgres"])
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("{tool} runs: {err}"));
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pg_dump_restored_into_a_fresh_database_serves_every_agent_as_itself() {
    let Some(source) = Database::create("dump_source") else {
        return;
    };
    let Some(restored) = Database::create("dump_restored") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for node in ["before", "after"] {
        std::fs::create_dir_all(dir.path().join(node)).unwrap();
    }
    let before = Server::start_with_args(&dir.path().join("before"), &["--database", &source.url]);
    let mut agents = Vec::new();
    for n in 0..3 {
        agents.push(ProtocolAgent::enroll(&before, &format!("fp-dumped-{n}"), "1.0.0").await);
    }
    all_online(&before.api(), 3).await;

    // The documented procedure: a custom-format dump while the server runs, restored
    // into a fresh database without the original's owners.
    let dump = dir.path().join("drover.dump");
    pg_tool(
        "pg_dump",
        &[
            "--format=custom",
            "-d",
            &source.name,
            "-f",
            dump.to_str().unwrap(),
        ],
    );
    drop(before);
    pg_tool(
        "pg_restore",
        &["--no-owner", "-d", &restored.name, dump.to_str().unwrap()],
    );

    let after = Server::start_with_args(&dir.path().join("after"), &["--database", &restored.url]);
    for agent in &mut agents {
        // Panics unless the restored server welcomes the agent's own credentials.
        agent.reconnect(&after, "1.0.0").await;
        agent.heartbeat().await;
    }
    let known = after.api().agents().await.expect("the agents list");
    let mut ids: Vec<&str> = known.iter().map(|a| a["id"].as_str().unwrap()).collect();
    ids.sort();
    let mut expected: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    expected.sort();
    assert_eq!(
        ids, expected,
        "every agent is known by its own id; none re-enrolled"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_build_is_one_check_per_node_not_one_per_pair_of_nodes() {
    let Some(database) = Database::create("checks") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path(), &database);
    let mut agents = Vec::new();
    for (n, node) in [&a, &b].into_iter().enumerate() {
        agents.push(ProtocolAgent::enroll(node, &format!("fp-checked-{n}"), "1.0.0").await);
    }
    const CHECK_ALL: &str = "drover_node_signals_received_total{signal=\"check_all\"}";
    let before = [a.counter(CHECK_ALL).await, b.counter(CHECK_ALL).await];
    let checks_before = [
        a.counter("drover_fleet_checks_total").await,
        b.counter("drover_fleet_checks_total").await,
    ];

    publish(
        &a.downloads(),
        "1.1.0",
        Some("beta"),
        b"a build both nodes see",
    );
    offered(&a.api(), "1.1.0").await;
    offered(&b.api(), "1.1.0").await;
    rollout_started(&a.api(), "1.1.0").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // No signal for the build itself (each node watches the downloads); one for each
    // change of its rollout, sent by the node that made it. The old way, every node
    // told every other of the build as well.
    let (_, rollouts) = a.api().get("/api/v1/rollouts?version=1.1.0").await;
    let mut changes = 0;
    for rollout in rollouts.as_array().unwrap() {
        let (_, detail) = a
            .api()
            .get(&format!(
                "/api/v1/rollouts/{}",
                rollout["id"].as_str().unwrap()
            ))
            .await;
        changes += detail["timeline"].as_array().unwrap().len() as u64;
    }
    let signals = a.counter(CHECK_ALL).await - before[0] + b.counter(CHECK_ALL).await - before[1];
    assert_eq!(signals, changes, "check_all signals between the two nodes");
    for (node, before) in [(&a, checks_before[0]), (&b, checks_before[1])] {
        let checks = node.counter("drover_fleet_checks_total").await - before;
        assert!(
            (1..=1 + changes).contains(&checks),
            "{checks} checks of one node's agents for 1 build and {changes} rollout changes"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_node_at_a_time_sweeps_for_silent_agents_and_another_takes_over_when_it_dies() {
    let Some(database) = Database::create("sweep") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A task without progress times out after 4 s: each node tries for the sweep's
    // lease every 2 s, and its holder keeps it for 6 s from each renewal.
    let (a, b) = two_nodes_with(dir.path(), &database, &["--task-timeout", "4s"]);
    let mut nodes = [a, b];
    const SWEEPS: &str = "drover_silent_task_sweeps_total";
    const TIMED_OUT: &str = "drover_task_endings_total{status=\"timed_out\"";
    let sweeps = || async {
        [
            metric_at(&nodes[0].url, SWEEPS).await,
            metric_at(&nodes[1].url, SWEEPS).await,
        ]
    };
    let first = eventually("a node to sweep", SOON, || async {
        let [Some(a), Some(b)] = sweeps().await else {
            return None;
        };
        (a + b > 0).then_some([a, b])
    })
    .await;
    let sweeper = if first[0] > 0 { 0 } else { 1 };
    let other = 1 - sweeper;

    // An agent on the other node goes silent with its update under way. The sweeper
    // times its task out; the other node, which never holds the lease, never sweeps.
    publish(
        &nodes[0].downloads(),
        "1.1.0",
        Some("stable"),
        b"a build nobody installs",
    );
    let mut agent = ProtocolAgent::enroll(&nodes[other], "fp-silent", "1.0.0").await;
    agent.next_update(SOON).await.expect("an update");
    let id = agent.id.clone();
    drop(agent);
    eventually("the silent agent's task to time out", SOON * 3, || async {
        let tasks = tasks_of(&nodes[other], &id).await;
        (tasks.first()?["status"] == "timed_out").then_some(())
    })
    .await;
    assert_eq!(tasks_of(&nodes[other], &id).await.len(), 1);
    assert_eq!(
        metric_at(&nodes[sweeper].url, TIMED_OUT).await,
        Some(1),
        "the sweeper ended it"
    );
    assert_eq!(
        metric_at(&nodes[other].url, TIMED_OUT).await,
        Some(0),
        "the other node did not"
    );
    let now = sweeps().await;
    assert_eq!(now[other], Some(0), "only one node swept: {now:?}");
    assert!(
        now[sweeper] > Some(first[sweeper]),
        "the holder kept sweeping: {first:?} then {now:?}"
    );

    // The sweeper dies: its lease runs out and the other node sweeps from then on.
    nodes[sweeper].kill9();
    eventually(
        "the other node to take the sweep over",
        SOON * 3,
        || async { (metric_at(&nodes[other].url, SWEEPS).await? > 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_is_one_check_of_the_other_nodes_agents() {
    let Some(database) = Database::create("rollback_checks") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path(), &database);
    let shared = a.downloads();
    publish(&shared, "1.0.0", Some("stable"), b"the build to go back to");
    publish(&shared, "1.1.0", Some("stable"), b"the build to roll back");
    for node in [&a, &b] {
        offered(&node.api(), "1.0.0").await;
        offered(&node.api(), "1.1.0").await;
    }
    let mut agents = Vec::new();
    for (n, node) in [&a, &b].into_iter().enumerate() {
        agents.push(ProtocolAgent::enroll(node, &format!("fp-back-{n}"), "1.1.0").await);
    }
    rollout_started(&a.api(), "1.1.0").await;
    // Whatever the builds' rollouts signalled has arrived.
    tokio::time::sleep(Duration::from_secs(2)).await;
    const CHECK_ALL: &str = "drover_node_signals_received_total{signal=\"check_all\"}";
    const BLOCKED: &str = "drover_node_signals_received_total{signal=\"blocked\"}";
    const FLEET_CHECKS: &str = "drover_fleet_checks_total";
    let before = [
        b.counter(CHECK_ALL).await,
        b.counter(BLOCKED).await,
        b.counter(FLEET_CHECKS).await,
    ];

    let (status, body) = a.api().post("/api/v1/rollouts/1.1.0/rollback", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["targeted"], 2, "{body}");
    // Both agents, the one on B too, are moved back.
    until_each(
        &mut agents,
        "every agent sent 1.0.0",
        |i, message| match message {
            ServerMessage::Update(update) => {
                assert_eq!(update.version, "1.0.0", "agent {i}: {update:?}");
                true
            }
            _ => false,
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = [
        b.counter(CHECK_ALL).await,
        b.counter(BLOCKED).await,
        b.counter(FLEET_CHECKS).await,
    ];
    // The block, then one check when the rollback's rollout is written. It was a check
    // for the block as well, while the rollout's targets were still being written.
    assert_eq!(
        [after[0] - before[0], after[1] - before[1]],
        [1, 1],
        "check_all and blocked signals B received for one rollback"
    );
    assert_eq!(
        after[2] - before[2],
        1,
        "checks of B's agents for one rollback"
    );
}

/// Keeps `agent` heartbeating for `period`, then reads it on `api`.
async fn after_heartbeats(
    agent: &mut ProtocolAgent,
    api: &Api,
    period: Duration,
) -> serde_json::Value {
    let until = tokio::time::Instant::now() + period;
    while tokio::time::Instant::now() < until {
        agent.heartbeat().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (status, view) = api.get(&format!("/api/v1/agents/{}", agent.id)).await;
    assert_eq!(status, 200, "{view}");
    view
}

/// The new session is welcomed before the old one ends (the old socket closes only
/// afterwards): the old session's cleanup must not undo the new session's claim.
async fn new_session_outlives_the_old(old_node: &Server, new_node: &Server) {
    let mut agent = ProtocolAgent::enroll(old_node, "fp-moving", "1.0.0").await;
    agent.heartbeat().await;
    agent.reconnect(new_node, "1.1.0").await;
    for api in [old_node.api(), new_node.api()] {
        let view = after_heartbeats(&mut agent, &api, Duration::from_secs(4)).await;
        let view = if view["agent"].is_object() {
            &view["agent"]
        } else {
            &view
        };
        assert_eq!(view["online"], true, "{view}");
        assert_eq!(view["version"], "1.1.0", "{view}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_cleanup_of_an_old_session_leaves_the_new_one_online_on_one_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    new_session_outlives_the_old(&server, &server).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_cleanup_of_an_old_session_leaves_the_new_one_online_across_two_nodes() {
    let Some(database) = Database::create("handover") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path(), &database);
    new_session_outlives_the_old(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_the_database_refuses_for_a_moment_is_written_again() {
    let Some(database) = Database::create("claim_retry") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path(), &database);
    let mut agent = ProtocolAgent::enroll(&a, "fp-claim-retry", "1.0.0").await;
    agent.heartbeat().await;
    // From now on every claim fails (a lost connection, a broken deadlock would too),
    // until the trigger is dropped a moment later.
    database.query(
        "CREATE FUNCTION refuse_claims() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'claims refused for a moment'; END $$; \
         CREATE TRIGGER refuse_claims BEFORE UPDATE OF node_id ON agents FOR EACH ROW \
         WHEN (NEW.node_id IS NOT NULL) EXECUTE FUNCTION refuse_claims()",
    );
    let drop_trigger = std::thread::spawn({
        let name = database.name.clone();
        move || {
            std::thread::sleep(Duration::from_millis(700));
            let dropped = psql(&name, "DROP TRIGGER refuse_claims ON agents").unwrap();
            assert!(dropped.status.success());
        }
    });
    // The agent moves to node b, whose claim is refused at first; node a releases its
    // own session once the old socket closes.
    agent.reconnect(&b, "1.0.1").await;
    drop_trigger.join().unwrap();
    assert!(
        b.log().contains("could not record the sessions"),
        "the first claim was refused"
    );
    // Node a knows where the agent is only from the row node b claimed.
    let view = after_heartbeats(&mut agent, &a.api(), Duration::from_secs(3)).await;
    assert_eq!(view["online"], true, "the claim was written again: {view}");
    assert_eq!(view["version"], "1.0.1", "{view}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_url_from_one_node_is_served_by_the_other() {
    let Some(database) = Database::create("download_grant") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path(), &database);
    let mut agent = ProtocolAgent::enroll(&a, "fp-grant-nodes", "1.0.0").await;
    publish(&a.downloads(), "1.1.0", Some("stable"), b"a shared build");
    offered(&b.api(), "1.1.0").await;
    let update = agent
        .next_update(SOON)
        .await
        .expect("an update from node a");
    assert!(update.url.starts_with(&a.url), "{}", update.url);
    // Behind a load balancer the download may reach any node: the grant's key is the
    // one every node read from the database.
    let on_b = update.url.replacen(&a.url, &b.url, 1);
    for url in [&update.url, &on_b] {
        let response = reqwest::get(url.as_str()).await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(response.bytes().await.unwrap().as_ref(), b"a shared build");
    }
    // A grant no node made is refused by both.
    let forged = on_b.replace("grant=", "grant=00");
    assert_eq!(reqwest::get(&forged).await.unwrap().status(), 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_goes_out_before_its_task_is_written_and_its_download_waits_for_it() {
    let Some(database) = Database::create("sent_first") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path(), &database);
    let mut agent = ProtocolAgent::enroll(&a, "fp-sent-first", "1.0.0").await;
    agent.heartbeat().await;
    database.slow_task_writes();
    publish(
        &a.downloads(),
        "1.1.0",
        Some("stable"),
        b"a build sent first",
    );
    offered(&b.api(), "1.1.0").await;
    let update = agent
        .next_update(SOON)
        .await
        .expect("the update, while its task is being written");
    assert_eq!(
        database.task_status(&update.task_id),
        "",
        "the task is not written yet"
    );

    // Another node does not know the task yet: come back in a moment.
    let on_b = update.url.replacen(&a.url, &b.url, 1);
    let early = reqwest::get(&on_b).await.unwrap();
    assert_eq!(early.status(), 503, "{}", early.text().await.unwrap());
    assert_eq!(early.headers()["retry-after"], "1");
    assert!(
        b.metrics()
            .await
            .contains("drover_downloads_refused_total{reason=\"unwritten\"} 1")
    );

    // The node writing it holds the download until the task exists, then serves it.
    let on_a = reqwest::get(update.url.as_str()).await.unwrap();
    assert_eq!(on_a.status(), 200);
    assert_ne!(
        database.task_status(&update.task_id),
        "",
        "the task was written first"
    );
    assert_eq!(on_a.bytes().await.unwrap().as_ref(), b"a build sent first");
    let later = reqwest::get(&on_b).await.unwrap();
    assert_eq!(later.status(), 200);

    // The agent's reports on it are recorded as for any task.
    agent
        .report(AgentMessage::UpdateProgress(protocol::UpdateProgress {
            task_id: update.task_id.clone(),
            stage: protocol::UpdateStage::Downloading,
            bytes_done: 6,
            bytes_total: 18,
            transfer: None,
        }))
        .await;
    eventually("the progress recorded", SOON, || async {
        (database.task_status(&update.task_id) == "downloading").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_that_starts_while_its_agents_task_is_written_picks_the_task_up() {
    let Some(database) = Database::create("sent_first_reconnect") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--database", &database.url]);
    let mut agent = ProtocolAgent::enroll(&server, "fp-sent-first-again", "1.0.0").await;
    agent.heartbeat().await;
    database.slow_task_writes();
    publish(&server.downloads(), "1.1.0", Some("stable"), b"a build");
    let update = agent.next_update(SOON).await.expect("the update");
    assert_eq!(
        database.task_status(&update.task_id),
        "",
        "the task is not written yet"
    );
    // The agent comes back on the new version before the task is written: its new
    // session reads the task once it is, and the task succeeds.
    agent.reconnect(&server, "1.1.0").await;
    let deadline = std::time::Instant::now() + SOON;
    while database.task_status(&update.task_id) != "succeeded" {
        assert!(
            std::time::Instant::now() < deadline,
            "the task is {:?}, not succeeded",
            database.task_status(&update.task_id)
        );
        agent.heartbeat().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_after_the_tasks_of_updates_already_sent_are_written() {
    let Some(database) = Database::create("sent_first_api") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--database", &database.url]);
    let api = server.api();
    let mut first = ProtocolAgent::enroll(&server, "fp-sent-first-api", "1.0.0").await;
    first.heartbeat().await;
    database.slow_task_writes();
    publish(&server.downloads(), "1.1.0", Some("stable"), b"a build");
    let offered = first.next_update(SOON).await.expect("the update");
    assert_eq!(
        database.task_status(&offered.task_id),
        "",
        "the task is not written yet"
    );

    // An operator's "update now" supersedes the task the agent holds, written or not
    // (the agent heartbeats meanwhile).
    let request = format!("/api/v1/agents/{}/update", first.id);
    let ((status, body), cancel) = tokio::join!(api.post(&request, None), first.next_message(SOON));
    assert_eq!(
        (status, &body["task"]["kind"]),
        (202, &json!("forced")),
        "{body}"
    );
    match cancel {
        Some(ServerMessage::Cancel(cancel)) => {
            assert_eq!(cancel.task_id, offered.task_id, "{cancel:?}");
            assert!(cancel.reason.contains("requested update"), "{cancel:?}");
        }
        other => panic!("expected the offered task to be cancelled, got {other:?}"),
    }
    let forced = first.next_update(SOON).await.expect("the requested update");
    assert_eq!(forced.task_id, body["task"]["id"].as_str().unwrap());

    // An agent that holds an update finds its task listed.
    let mut second = ProtocolAgent::enroll(&server, "fp-sent-first-api-2", "1.0.0").await;
    let update = second
        .next_update(SOON)
        .await
        .expect("the update on connect");
    assert_eq!(
        database.task_status(&update.task_id),
        "",
        "the task is not written yet"
    );
    let listed = tasks_of(&server, &second.id).await;
    assert_eq!(
        listed.first().map(|task| &task["id"]),
        Some(&json!(update.task_id)),
        "{listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_whose_task_cannot_be_written_is_taken_back_and_the_next_waits_for_its_write() {
    let Some(database) = Database::create("unwritten") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--database", &database.url]);
    let mut agent = ProtocolAgent::enroll(&server, "fp-unwritten", "1.0.0").await;
    agent.heartbeat().await;
    database.query(
        "CREATE FUNCTION refuse_tasks() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'tasks refused for a moment'; END $$; \
         CREATE TRIGGER refuse_tasks BEFORE INSERT ON update_tasks \
         FOR EACH STATEMENT EXECUTE FUNCTION refuse_tasks()",
    );
    publish(&server.downloads(), "1.1.0", Some("stable"), b"a build");
    let update = agent.next_update(SOON).await.expect("the update");
    match agent.next_message(SOON).await {
        Some(ServerMessage::Cancel(cancel)) => {
            assert_eq!(cancel.task_id, update.task_id);
            assert!(
                cancel.reason.contains("could not record the task"),
                "{}",
                cancel.reason
            );
        }
        other => panic!("expected the update taken back, got {other:?}"),
    }
    assert_eq!(
        database.query("SELECT count(*) FROM update_tasks"),
        "0",
        "no task was written"
    );

    // While tasks still cannot be written, the checks that follow write first: nothing
    // goes out that would be taken back.
    assert_eq!(
        agent.next_message(Duration::from_secs(3)).await,
        None,
        "an update was sent while its task could not be written"
    );
    // Once they can, the next update goes out with its task written and its download is
    // served.
    database.query("DROP TRIGGER refuse_tasks ON update_tasks");
    let again = agent.next_update(SOON).await.expect("the update, written");
    assert_ne!(again.task_id, update.task_id, "a task id used twice");
    assert_ne!(
        database.task_status(&again.task_id),
        "",
        "written before it was sent"
    );
    let download = reqwest::get(again.url.as_str()).await.unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.bytes().await.unwrap().as_ref(), b"a build");
    assert_eq!(database.query("SELECT count(*) FROM update_tasks"), "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_lost_the_others_rereads_only_the_agents_whose_change_it_missed() {
    let Some(database) = Database::create("relisten") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = two_nodes(dir.path(), &database);
    publish(&a.downloads(), "1.1.0", Some("beta"), b"a beta build");
    offered(&b.api(), "1.1.0").await;
    rollout_started(&b.api(), "1.1.0").await;
    let mut moved = ProtocolAgent::enroll(&b, "fp-moved", "1.0.0").await;
    let mut stayed = ProtocolAgent::enroll(&b, "fp-stayed", "1.0.0").await;
    stayed.heartbeat().await;

    // A change no node hears of: B's session keeps the agent on stable.
    let psql = |sql: &str| database.query(sql);
    psql(&format!(
        "UPDATE agents SET channel = 'beta' WHERE id = '{}'",
        moved.id
    ));
    assert!(
        moved.next_message(Duration::from_secs(2)).await.is_none(),
        "nothing told B's session of the change"
    );

    const REFRESHED: &str = "drover_sessions_rechecked_total{outcome=\"refreshed\"}";
    const UNCHANGED: &str = "drover_sessions_rechecked_total{outcome=\"unchanged\"}";
    let before = (b.counter(REFRESHED).await, b.counter(UNCHANGED).await);
    // The nodes' connection for signals drops, as a network blip or a PostgreSQL
    // restart would do: whatever was said meanwhile is lost.
    let dropped = psql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = '{}' AND query ILIKE 'LISTEN%'",
        database.name
    ));
    assert_eq!(dropped, "2", "one listener per node");

    let update = moved
        .next_update(SOON)
        .await
        .expect("B re-read the agent it missed a change of");
    assert_eq!(update.version, "1.1.0");
    assert_eq!(moved.channel.as_deref(), Some("beta"));
    let after = eventually("B's re-check", SOON, || async {
        let after = (b.counter(REFRESHED).await, b.counter(UNCHANGED).await);
        (after.0 + after.1 >= before.0 + before.1 + 2).then_some(after)
    })
    .await;
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1),
        "the changed agent re-read, the other only checked"
    );
    assert!(
        stayed.next_message(Duration::from_secs(1)).await.is_none(),
        "the unchanged stable agent is offered nothing"
    );
}

/// Drover 0.1.0: the schema before rollout records (server/tests/data/0.1.0).
const RELEASE_0_1_0: &str = "1823189";

/// The 0.1.0 `drover-server`: `DROVER_0_1_0_BIN` (its target/debug directory), or built
/// once from this repository's history into `target/drover-0.1.0`. `None`, with the
/// reason printed, where the history does not hold it (a shallow clone).
fn server_0_1_0() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DROVER_0_1_0_BIN") {
        return Some(PathBuf::from(dir).join("drover-server"));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = root.join("target/drover-0.1.0");
    let bin = source.join("target/debug/drover-server");
    if !source.join("Cargo.toml").exists() {
        let archive = Command::new("git")
            .args(["archive", "--format=tar", RELEASE_0_1_0])
            .current_dir(root)
            .output()
            .unwrap();
        if !archive.status.success() {
            eprintln!(
                "skipping the rolling upgrade from 0.1.0: this clone's history lacks {RELEASE_0_1_0} ({})",
                String::from_utf8_lossy(&archive.stderr).trim()
            );
            return None;
        }
        std::fs::create_dir_all(&source).unwrap();
        let mut untar = Command::new("tar")
            .arg("-x")
            .current_dir(&source)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(untar.stdin.as_mut().unwrap(), &archive.stdout).unwrap();
        assert!(untar.wait().unwrap().success());
    }
    let built = Command::new(env!("CARGO"))
        .args(["build", "-p", "drover", "--bin", "drover-server"])
        .env("CARGO_TARGET_DIR", source.join("target"))
        .current_dir(&source)
        .status()
        .unwrap();
    assert!(built.success(), "building drover-server 0.1.0 failed");
    Some(bin)
}

/// A free port on loopback, for a node whose successor must take the same one.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A 0.1.0 node, stopped with SIGTERM (as an upgrade stops it) when dropped.
struct OldNode {
    child: Child,
    url: String,
}

impl OldNode {
    fn start(bin: &Path, dir: &Path, port: u16, database: &Database, downloads: &Path) -> OldNode {
        std::fs::create_dir_all(dir).unwrap();
        let out = dir.join("server.out");
        let child = Command::new(bin)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database", &database.url])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--downloads")
            .arg(downloads)
            .args(["--heartbeat-interval", "1"])
            .env("DROVER_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("DROVER_ENROLL_TOKEN", ENROLL_TOKEN)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("start an agent")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "drover-server 0.1.0 did not start: {}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        OldNode {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for OldNode {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// Waits for a progress line of drover-sim, written after this call, that has all
/// `count` agents connected.
async fn sim_reports_connected(log: &Path, count: usize) {
    let lines = || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let seen = lines().len();
    let all = format!("connected {count}/{count} ");
    eventually("the fleet to be connected", SOON * 3, || async {
        lines()
            .get(seen..)?
            .iter()
            .any(|line| line.contains(&all))
            .then_some(())
    })
    .await;
}

/// Every task in the database, as `id status`, sorted.
fn tasks_in(database: &Database) -> Vec<String> {
    database
        .query("SELECT id || ' ' || status FROM update_tasks ORDER BY id")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_upgrade_from_0_1_0_keeps_every_agent_connected_and_every_task() {
    const FLEET: usize = 20;
    let Some(database) = Database::create("rolling_upgrade") else {
        return;
    };
    let Some(old_bin) = server_0_1_0() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let downloads = dir.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    publish(&downloads, "1.0.0", Some("stable"), b"build 1.0.0");
    let (port_a, port_b) = (free_port(), free_port());
    let mut node_a = Some(OldNode::start(
        &old_bin,
        &dir.path().join("a"),
        port_a,
        &database,
        &downloads,
    ));
    let node_b = OldNode::start(
        &old_bin,
        &dir.path().join("b"),
        port_b,
        &database,
        &downloads,
    );
    let old_api = Api::new(&node_b.url, ADMIN_TOKEN);

    // A fleet on both 0.1.0 nodes; each agent moves to the other node when its own goes.
    let sim_log = dir.path().join("sim.log");
    let _sim = Killed(
        Command::new(sim_bin())
            .args([
                "--server",
                &format!("{},{}", node_b.url, node_a.as_ref().unwrap().url),
            ])
            .args([
                "--enroll-token",
                ENROLL_TOKEN,
                "--agents",
                &FLEET.to_string(),
            ])
            .arg("--identities")
            .arg(dir.path().join("identities.json"))
            .args(["--report-every", "0.5"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&sim_log).unwrap())
            .spawn()
            .unwrap(),
    );
    all_online(&old_api, FLEET).await;
    // 0.1.0 updates them all to 1.1.0: tasks the upgrade must keep.
    publish(&downloads, "1.1.0", Some("stable"), b"build 1.1.0");
    let before = eventually("0.1.0 to update every agent", UPDATE_WAIT, || async {
        let tasks = tasks_in(&database);
        (tasks.len() == FLEET && tasks.iter().all(|t| t.ends_with(" succeeded"))).then_some(tasks)
    })
    .await;

    // Node A first: stopped, and started again as this version on its port. It migrates
    // the database while node B still runs 0.1.0 on it.
    drop(node_a.take());
    let new_a_dir = dir.path().join("new-a");
    std::fs::create_dir_all(&new_a_dir).unwrap();
    let shared = downloads.to_str().unwrap();
    let new_a = Server::start_on_port(
        &new_a_dir,
        port_a,
        &["--database", &database.url, "--downloads", shared],
    );
    // Connected, as the fleet sees it: the 0.1.0 node's own claims can read as offline
    // (its release of an agent's old session may undo the claim of its new one, a bug
    // this version fixed), which is not the upgrade's doing.
    sim_reports_connected(&sim_log, FLEET).await;
    let agents = new_a.api().agents().await.unwrap();
    assert_eq!(agents.len(), FLEET, "no agent enrolled again");
    assert_eq!(tasks_in(&database), before, "every task kept, as it was");
    let (status, _) = old_api.get("/api/v1/agents").await;
    assert_eq!(status, 200, "the 0.1.0 node still serves");

    // Then node B.
    drop(node_b);
    let new_b_dir = dir.path().join("new-b");
    std::fs::create_dir_all(&new_b_dir).unwrap();
    let new_b = Server::start_on_port(
        &new_b_dir,
        port_b,
        &["--database", &database.url, "--downloads", shared],
    );
    sim_reports_connected(&sim_log, FLEET).await;
    let listed = all_online(&new_b.api(), FLEET).await;
    assert_eq!(listed.len(), FLEET);
    assert_eq!(tasks_in(&database), before);

    // The upgraded nodes roll out the next build to everyone.
    publish(&downloads, "1.2.0", Some("stable"), b"build 1.2.0");
    eventually("every agent on 1.2.0", UPDATE_WAIT, || async {
        let agents = new_a.api().agents().await?;
        (agents.len() == FLEET && agents.iter().all(|a| a["version"] == "1.2.0")).then_some(())
    })
    .await;
    let after = tasks_in(&database);
    assert!(
        before.iter().all(|task| after.contains(task)),
        "no task lost"
    );
    assert_eq!(after.len(), FLEET * 2);
}
