//! End-to-end: operator workflows against real servers and agents. Promote behind the
//! health gate, rollback, auto-halt, the stale-stable warning, identity continuity,
//! roles and the audit log.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const WAIT: Duration = Duration::from_secs(90);

/// Starts `names` as real agents at 1.0.0, each installed in its own directory.
fn start_fleet(server: &Server, dir: &Path, names: &[&str]) -> Vec<(Agent, PathBuf)> {
    names
        .iter()
        .map(|name| {
            let exe = dir.join(format!("{name}-bin/drover-agent"));
            stamp_agent("1.0.0", &exe);
            let agent = Agent::start_installed(
                server,
                &exe,
                dir,
                name,
                &[
                    "--enroll-token",
                    ENROLL_TOKEN,
                    "--fingerprint",
                    &format!("fp-{name}"),
                ],
            );
            (agent, exe)
        })
        .collect()
}

async fn versions(api: &Api) -> Vec<(String, String)> {
    let mut agents: Vec<(String, String)> = api
        .agents()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|a| a["online"] == true)
        .map(|a| {
            (
                a["hostname"].as_str().unwrap().to_owned(),
                a["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    agents.sort();
    agents
}

/// Waits until exactly these agents are online at these versions.
async fn fleet_at(api: &Api, expected: &[(&str, &str)]) {
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(h, v)| (h.to_string(), v.to_string()))
        .collect();
    eventually(&format!("the fleet at {expected:?}"), WAIT, || async {
        (versions(api).await == expected).then_some(())
    })
    .await;
}

/// Waits until the agents of `fleet` named in `names` are through their hand-over to
/// `version`: its supervisor runs and its worker reported the update (the journal is
/// cleared). The server counts a success at the first heartbeat of the build on
/// probation, whose worker the hand-over then replaces; until that worker is back, its
/// agent is between sessions and its success is not settled, so the gate can read one
/// settled success fewer for a moment.
async fn handed_over(fleet: &[(Agent, PathBuf)], names: &[&str], version: &str) {
    let agents: Vec<&Agent> = fleet
        .iter()
        .map(|(agent, _)| agent)
        .filter(|agent| {
            let name = agent.state_dir.file_name().and_then(|n| n.to_str());
            name.is_some_and(|name| names.contains(&name))
        })
        .collect();
    assert_eq!(agents.len(), names.len(), "{names:?} in the fleet");
    eventually(
        &format!("{names:?} handed over to {version}"),
        WAIT,
        || async {
            agents
                .iter()
                .all(|agent| {
                    let running = supervisor_of(&agent.state_dir).map(|(_, v)| v);
                    running.as_deref() == Some(version)
                        && !agent.state_dir.join("update.json").exists()
                })
                .then_some(())
        },
    )
    .await;
}

/// The newest rollout of `version` of this kind.
async fn find_rollout(api: &Api, version: &str, kind: &str) -> Option<Value> {
    let (status, rollouts) = api
        .get(&format!("/api/v1/rollouts?version={version}"))
        .await;
    assert_eq!(status, 200, "{rollouts}");
    rollouts
        .as_array()?
        .iter()
        .find(|r| r["kind"] == kind)
        .cloned()
}

async fn rollout(api: &Api, version: &str, kind: &str) -> Value {
    find_rollout(api, version, kind)
        .await
        .unwrap_or_else(|| panic!("no {kind} rollout of {version}"))
}

/// The stages of a rollout add up to its targets, and no more succeeded than targeted.
fn assert_adds_up(record: &Value) {
    let n = |k: &str| {
        record[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {record}"))
    };
    let stages = [
        "waiting",
        "queued",
        "in_progress",
        "succeeded",
        "failed",
        "rolled_back",
        "cancelled",
        "skipped",
    ];
    assert_eq!(
        stages.iter().map(|k| n(k)).sum::<u64>(),
        n("targeted"),
        "{record}"
    );
    assert!(n("succeeded") <= n("targeted"), "{record}");
}

/// Waits until the scanner offers `version` and its rollout has started.
async fn offered(api: &Api, version: &str) {
    eventually(
        &format!("{version} to be offered"),
        Duration::from_secs(15),
        || async {
            let (_, releases) = api.get("/api/v1/releases").await;
            let listed = releases.as_array()?.iter().any(|r| r["version"] == version);
            // The scanner lists a build a moment before its rollout starts; a promote in
            // that moment is rightly refused with "no beta rollout".
            let (_, rollouts) = api
                .get(&format!("/api/v1/rollouts?version={version}"))
                .await;
            let started = !rollouts.as_array()?.is_empty();
            (listed && started).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_full_story_beta_promote_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    // A long heartbeat interval: promote and rollback must not wait for heartbeats.
    let server = Server::start_with_args(
        dir.path(),
        &["--heartbeat-interval", "60", "--gate-min-successes", "2"],
    );
    let api = server.api();
    publish_agent(&server, dir.path(), "1.0.0", "stable");
    let fleet = start_fleet(&server, dir.path(), &["s1", "s2", "s3", "b1", "b2"]);
    fleet_at(
        &api,
        &[
            ("b1", "1.0.0"),
            ("b2", "1.0.0"),
            ("s1", "1.0.0"),
            ("s2", "1.0.0"),
            ("s3", "1.0.0"),
        ],
    )
    .await;
    let ids: Vec<(String, String)> = api
        .agents()
        .await
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["hostname"].as_str().unwrap().to_owned(),
                a["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (name, id) in &ids {
        if name.starts_with('b') {
            api.put(
                &format!("/api/v1/agents/{id}/channel"),
                json!({"channel": "beta"}),
            )
            .await;
        }
    }

    publish_agent(&server, dir.path(), "1.1.0", "beta");
    offered(&api, "1.1.0").await;
    // Refused while the gate has too few successes.
    let (status, body) = api.post("/api/v1/rollouts/1.1.0/promote", None).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("beta successes"),
        "{body}"
    );

    fleet_at(
        &api,
        &[
            ("b1", "1.1.0"),
            ("b2", "1.1.0"),
            ("s1", "1.0.0"),
            ("s2", "1.0.0"),
            ("s3", "1.0.0"),
        ],
    )
    .await;
    handed_over(&fleet, &["b1", "b2"], "1.1.0").await;
    let record = eventually("two beta successes", WAIT, || async {
        let record = find_rollout(&api, "1.1.0", "beta").await?;
        (record["succeeded"] == 2 && record["gate"]["pass"] == true).then_some(record)
    })
    .await;
    assert_eq!(record["targeted"], 2, "only the beta agents: {record}");
    assert_adds_up(&record);

    let (status, body) = api.post("/api/v1/rollouts/1.1.0/promote", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["promoted"].as_array().unwrap().len(), 1);
    // The promote moves the three stable agents; the beta ones run it already.
    assert_eq!(body["rollout"]["kind"], "promote", "{body}");
    assert_eq!(body["rollout"]["targeted"], 3, "{body}");
    fleet_at(
        &api,
        &[
            ("b1", "1.1.0"),
            ("b2", "1.1.0"),
            ("s1", "1.1.0"),
            ("s2", "1.1.0"),
            ("s3", "1.1.0"),
        ],
    )
    .await;
    let record = eventually("the promote to complete", WAIT, || async {
        let record = find_rollout(&api, "1.1.0", "promote").await?;
        (record["state"] == "completed").then_some(record)
    })
    .await;
    assert_eq!(
        (&record["succeeded"], &record["targeted"]),
        (&json!(3), &json!(3))
    );
    assert_adds_up(&record);

    let (status, body) = api.post("/api/v1/rollouts/1.1.0/rollback", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (
            &body["targeted"],
            &body["agents_rolled_back"],
            &body["no_build"]
        ),
        (&json!(5), &json!(5), &json!([])),
        "{body}"
    );
    fleet_at(
        &api,
        &[
            ("b1", "1.0.0"),
            ("b2", "1.0.0"),
            ("s1", "1.0.0"),
            ("s2", "1.0.0"),
            ("s3", "1.0.0"),
        ],
    )
    .await;
    let back = eventually("the rollback to complete", WAIT, || async {
        let record = find_rollout(&api, "1.1.0", "rollback").await?;
        (record["succeeded"] == 5).then_some(record)
    })
    .await;
    assert_adds_up(&back);
    let promote = rollout(&api, "1.1.0", "promote").await;
    assert_eq!(
        promote["state"], "completed",
        "a completed rollout stays so: {promote}"
    );
    let (_, releases) = api.get("/api/v1/releases").await;
    let blocked = releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == "1.1.0")
        .unwrap();
    assert_eq!(blocked["blocked"], true);
    let (_, tasks) = api.get(&format!("/api/v1/agents/{}", ids[0].1)).await;
    assert_eq!(tasks["tasks"][0]["kind"], "rollback", "{tasks}");
    assert_eq!(tasks["tasks"][0]["status"], "succeeded", "{tasks}");

    // Never offered again while blocked; offered once unblocked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        versions(&api)
            .await
            .iter()
            .filter(|(_, v)| v == "1.1.0")
            .count(),
        0
    );
    let (status, _) = api.post("/api/v1/rollouts/1.1.0/unblock", None).await;
    assert_eq!(status, 200);
    fleet_at(
        &api,
        &[
            ("b1", "1.1.0"),
            ("b2", "1.1.0"),
            ("s1", "1.1.0"),
            ("s2", "1.1.0"),
            ("s3", "1.1.0"),
        ],
    )
    .await;

    let (_, audit) = api.get("/api/v1/audit?limit=100").await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in [
        "rollout.promote",
        "rollout.rollback",
        "rollout.unblock",
        "agent.channel",
    ] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_reverts_everywhere_halts_its_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let names = ["h1", "h2", "h3", "h4", "h5"];
    let _fleet = start_fleet(&server, dir.path(), &names);
    fleet_at(&api, &names.map(|n| (n, "1.0.0"))).await;
    publish(
        &server.downloads(),
        "1.2.0",
        Some("stable"),
        b"#!/bin/sh\nexit 7\n",
    );

    let record = eventually("the rollout to halt", WAIT, || async {
        let record = find_rollout(&api, "1.2.0", "promote").await?;
        (record["state"] == "halted").then_some(record)
    })
    .await;
    assert_eq!(record["rolled_back"], 5, "{record}");
    assert_eq!(record["failures"]["build"], 5, "{record}");
    assert!(
        record["reason"]
            .as_str()
            .unwrap()
            .contains("5 of 5 finished updates failed"),
        "{record}"
    );
    assert_adds_up(&record);

    // No further dispatch: a new agent is not sent the halted build.
    let _late = start_fleet(&server, dir.path(), &["h6"]);
    fleet_at(
        &api,
        &[
            ("h1", "1.0.0"),
            ("h2", "1.0.0"),
            ("h3", "1.0.0"),
            ("h4", "1.0.0"),
            ("h5", "1.0.0"),
            ("h6", "1.0.0"),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let record = rollout(&api, "1.2.0", "promote").await;
    assert_eq!(
        (
            &record["targeted"],
            &record["in_progress"],
            &record["queued"]
        ),
        (&json!(5), &json!(0), &json!(0)),
        "{record} {}",
        server.log()
    );

    let metrics = server.metrics().await;
    assert!(
        metrics.contains("drover_rollout_halted{version=\"1.2.0\",os=\"linux\",arch=\"amd64\"} 1"),
        "{metrics}"
    );
    let (_, audit) = api.get("/api/v1/audit?action=rollout.halt").await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1, "{audit}");

    let (status, body) = api.post("/api/v1/rollouts/1.2.0/resume", None).await;
    assert_eq!((status, &body["resumed"]), (200, &json!(1)), "{body}");
    assert_eq!(rollout(&api, "1.2.0", "promote").await["state"], "running");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_beta_is_reported_in_the_listing_and_in_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--stale-stable-after", "1s"]);
    let api = server.api();
    publish(&server.downloads(), "1.0.0", Some("stable"), b"stable");
    publish(&server.downloads(), "1.1.0", Some("beta"), b"beta");
    let record = eventually(
        "the stale-stable warning",
        Duration::from_secs(15),
        || async {
            let (_, rollouts) = api.get("/api/v1/rollouts").await;
            let record = rollouts
                .as_array()?
                .iter()
                .find(|r| r["version"] == "1.1.0")?
                .clone();
            (record["stale_stable"] == true).then_some(record)
        },
    )
    .await;
    assert!(record["stable_lag_seconds"].as_i64().unwrap() >= 1);
    assert_eq!(
        rollout(&api, "1.0.0", "promote").await["stale_stable"],
        false
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("drover_stable_lag_seconds{os=\"linux\",arch=\"amd64\",beta=\"1.1.0\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("drover_stable_stale{os=\"linux\",arch=\"amd64\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn re_enrolling_a_machine_keeps_one_record_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // A reinstalled machine is re-bound as soon as its old record is offline.
    let server = Server::start_with_args(dir.path(), &["--rebind-after", "0s"]);
    let api = server.api();
    let mut first = Agent::start(&server, dir.path(), "sierra");
    let listed = all_online(&api, 1).await;
    first.kill9_all();
    let _again = Agent::start_with(
        &server,
        &dir.path().join("reinstalled"),
        "sierra",
        &["--enroll-token", ENROLL_TOKEN, "--fingerprint", "fp-sierra"],
    );
    let again = all_online(&api, 1).await;
    assert_eq!(again[0]["id"], listed[0]["id"]);
    let entries = eventually(
        "the re-enrollment in the audit log",
        Duration::from_secs(15),
        || async {
            let (_, audit) = api.get("/api/v1/audit?action=agent.reenroll").await;
            let entries = audit["entries"].as_array()?.clone();
            (!entries.is_empty()).then_some(entries)
        },
    )
    .await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["target"], listed[0]["id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_bound_what_each_token_may_do() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let admin = server.api();
    publish(&server.downloads(), "1.0.0", Some("beta"), b"build");
    offered(&admin, "1.0.0").await;
    let mint = |role: &'static str| {
        let admin = &admin;
        async move {
            let (status, body) = admin
                .post("/api/v1/tokens", Some(json!({"name": role, "role": role})))
                .await;
            assert_eq!(status, 201, "{body}");
            body["token"].as_str().unwrap().to_owned()
        }
    };
    let viewer = Api::new(&server.url, &mint("viewer").await);
    let operator = Api::new(&server.url, &mint("operator").await);
    let nobody = Api::new(&server.url, "");

    let (status, _) = viewer.get("/api/v1/rollouts").await;
    assert_eq!(status, 200, "viewers read");
    let (status, body) = viewer.post("/api/v1/rollouts/1.0.0/promote", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("operator"));
    let (status, _) = nobody.post("/api/v1/rollouts/1.0.0/promote", None).await;
    assert_eq!(status, 401);
    let (status, _) = operator
        .post(
            "/api/v1/tokens",
            Some(json!({"name": "x", "role": "admin"})),
        )
        .await;
    assert_eq!(status, 403, "operators cannot mint tokens");
    let (status, _) = operator.get("/api/v1/tokens").await;
    assert_eq!(status, 403);
    let (status, body) = operator.post("/api/v1/rollouts/9.9.9/promote", None).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = operator
        .post(
            "/api/v1/rollouts/1.0.0/promote",
            Some(json!({"force": true})),
        )
        .await;
    assert_eq!((status, &body["forced"]), (200, &json!(true)), "{body}");

    // A revoked token stops working at once.
    let (_, tokens) = admin.get("/api/v1/tokens").await;
    let viewer_id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "viewer")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = admin
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/tokens/{viewer_id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = viewer.get("/api/v1/rollouts").await;
    assert_eq!(status, 401);

    // Enrollment tokens with a use limit.
    let (_, sites) = admin.get("/api/v1/sites").await;
    let site = sites[0]["id"].as_str().unwrap();
    let (status, body) = operator
        .post(
            &format!("/api/v1/sites/{site}/enrollment-tokens"),
            Some(json!({"max_uses": 1})),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = admin
        .post(
            &format!("/api/v1/sites/{site}/enrollment-tokens"),
            Some(json!({"max_uses": 1, "expires_in_secs": 3600})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let once = body["token"].as_str().unwrap().to_owned();
    let mut first = ProtocolAgent::enroll_with(&server, "fp-once-1", &once)
        .await
        .expect("first use");
    first.heartbeat().await;
    assert!(
        ProtocolAgent::enroll_with(&server, "fp-once-2", &once)
            .await
            .is_none(),
        "used up"
    );

    let (_, audit) = admin.get("/api/v1/audit").await;
    let entries = audit["entries"].as_array().unwrap();
    let forced = entries
        .iter()
        .find(|e| e["action"] == "rollout.promote")
        .unwrap();
    assert!(
        forced["result"].as_str().unwrap().contains("forced"),
        "{forced}"
    );
    assert!(
        forced["actor"].as_str().unwrap().starts_with("operator"),
        "{forced}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_work_from_the_cli_and_see_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    publish(&server.downloads(), "1.0.0", Some("stable"), b"one");
    publish(&server.downloads(), "1.1.0", Some("beta"), b"two");
    offered(&api, "1.1.0").await;
    offered(&api, "1.0.0").await;
    let mut agent = ProtocolAgent::enroll(&server, "fp-tango", "1.0.0").await;
    agent.heartbeat().await;
    let cli = |args: &[&str]| run_cli(&server, args);

    let (ok, text) = cli(&["rollouts"]);
    assert!(
        ok && text.contains("1.1.0") && text.contains("beta"),
        "{text}"
    );
    let (ok, text) = cli(&["promote", "1.1.0"]);
    assert!(
        !ok && text.contains("409") && text.contains("beta successes"),
        "{text}"
    );

    let (ok, text) = cli(&["explain", &agent.id]);
    assert!(ok, "{text}");
    assert!(
        text.contains("stable") && text.contains("default"),
        "{text}"
    );
    assert!(
        text.contains("a beta build; the agent follows stable"),
        "{text}"
    );
    let (_, explained) = api
        .get(&format!("/api/v1/agents/{}/explain", agent.id))
        .await;
    assert_eq!(explained["decision"], "hold", "{explained}");
    assert_eq!(explained["channel_trace"].as_array().unwrap().len(), 4);

    let (ok, text) = cli(&["promote", "1.1.0", "--force"]);
    assert!(ok && text.contains("forced"), "{text}");
    assert!(
        text.contains("waves 100%, 1 agent in wave 1 of 1 targeted"),
        "{text}"
    );
    let update = agent
        .next_update(Duration::from_secs(5))
        .await
        .expect("promoted builds are pushed at once");
    assert_eq!(update.version, "1.1.0");

    // The promote's rollout, by the short id the listing shows.
    let (_, listed) = api.get("/api/v1/rollouts?version=1.1.0").await;
    let id = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "promote")
        .and_then(|r| r["id"].as_str())
        .unwrap_or_else(|| panic!("a promote rollout: {listed}"))
        .to_owned();
    let short = &id[..8];
    let (ok, text) = cli(&["rollouts", "--version", "1.1.0"]);
    assert!(
        ok && text.contains(short) && text.contains("promote"),
        "{text}"
    );
    let (ok, text) = cli(&["rollout", short]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("rollout:   {id}")) && text.contains("1.1.0 (promote)"),
        "{text}"
    );
    assert!(text.contains("past the health gate"), "{text}");
    let (ok, text) = cli(&["rollout", "agents", short]);
    assert!(ok && text.contains(&agent.id), "{text}");
    let (ok, text) = cli(&["rollout", "pause", short]);
    assert!(ok && text.contains(": paused,"), "{text}");
    let (ok, text) = cli(&["rollout", "resume", short]);
    assert!(ok && !text.contains("paused"), "{text}");
    let (ok, text) = cli(&["rollout", "pause", "ffffffff"]);
    assert!(
        !ok && text.contains("no rollout id starts with ffffffff"),
        "{text}"
    );

    let (ok, text) = cli(&["rollback", "1.1.0"]);
    assert!(ok && text.contains("rolled back 1.1.0: blocked"), "{text}");
    let (_, explained) = api
        .get(&format!("/api/v1/agents/{}/explain", agent.id))
        .await;
    let candidate = explained["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["version"] == "1.1.0")
        .unwrap()
        .clone();
    assert!(
        candidate["reason"].as_str().unwrap().contains("blocked"),
        "{explained}"
    );

    let (ok, text) = cli(&["audit", "--action", "rollout.promote"]);
    assert!(ok && text.contains("forced"), "{text}");
    let (ok, text) = cli(&["tokens", "create", "ci", "--role", "viewer"]);
    assert!(ok && text.contains("shown only once"), "{text}");
    let token = text.lines().last().unwrap().trim().to_owned();
    let (status, _) = Api::new(&server.url, &token).get("/api/v1/rollouts").await;
    assert_eq!(status, 200);
}

/// Mints an API token of `role` with the admin's API.
async fn token_of(admin: &Api, role: &str) -> String {
    let (status, body) = admin
        .post("/api/v1/tokens", Some(json!({"name": role, "role": role})))
        .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_without_the_role_hears_403_whatever_the_body_holds() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let admin = server.api();
    let viewer = token_of(&admin, "viewer").await;
    let http = reqwest::Client::new();
    let (_, sites) = admin.get("/api/v1/sites").await;
    let site = sites[0]["id"].as_str().unwrap().to_owned();
    // Each malformed in another way: an array, not JSON, no content type, too large.
    let cases: Vec<(&str, String, Option<&str>, Vec<u8>)> = vec![
        (
            "POST",
            "/api/v1/tokens".into(),
            Some("application/json"),
            br#"["x","admin"]"#.to_vec(),
        ),
        (
            "POST",
            "/api/v1/clients".into(),
            Some("text/plain"),
            b"name=x".to_vec(),
        ),
        (
            "POST",
            "/api/v1/clients".into(),
            None,
            b"{\"name\": \"x\"}".to_vec(),
        ),
        (
            "PUT",
            "/api/v1/updates".into(),
            Some("application/json"),
            b"{\"enabled\":".to_vec(),
        ),
        (
            "POST",
            "/api/v1/rollouts".into(),
            Some("application/json"),
            b"[]".to_vec(),
        ),
        (
            "POST",
            "/api/v1/rollouts/1.0.0/promote".into(),
            Some("application/json"),
            b"{bad".to_vec(),
        ),
        (
            "POST",
            "/api/v1/rollouts/1.0.0/rollback".into(),
            Some("application/json"),
            vec![b'x'; 300 * 1024],
        ),
        (
            "POST",
            format!("/api/v1/sites/{site}/enrollment-tokens"),
            Some("application/json"),
            b"[null,null]".to_vec(),
        ),
    ];
    for (method, path, content_type, body) in cases {
        let mut request = http
            .request(method.parse().unwrap(), format!("{}{path}", server.url))
            .bearer_auth(&viewer)
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert_eq!(answer["error"], "forbidden", "{method} {path}: {answer}");
    }
    // With the role, the same malformed bodies are judged.
    let (status, body) = admin
        .call(
            reqwest::Method::POST,
            "/api/v1/tokens",
            Some(json!(["x", "admin"])),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn repeating_a_promote_or_a_rollback_changes_nothing_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    publish(&server.downloads(), "1.0.0", Some("beta"), b"build");
    offered(&api, "1.0.0").await;
    let promote = Some(json!({"force": true}));

    let (status, first) = api
        .post("/api/v1/rollouts/1.0.0/promote", promote.clone())
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["unchanged"], false, "{first}");
    assert_eq!(first["promoted"].as_array().unwrap().len(), 1, "{first}");
    for _ in 0..2 {
        let (status, again) = api
            .post("/api/v1/rollouts/1.0.0/promote", promote.clone())
            .await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["unchanged"], true, "{again}");
        assert_eq!(again["promoted"], json!([]), "{again}");
        assert_eq!(again["rollout"]["id"], first["rollout"]["id"], "{again}");
    }

    let (status, first) = api.post("/api/v1/rollouts/1.0.0/rollback", None).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["unchanged"], false, "{first}");
    let (status, again) = api.post("/api/v1/rollouts/1.0.0/rollback", None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (&again["unchanged"], &again["blocked"]),
        (&json!(true), &json!(true)),
        "{again}"
    );

    let (_, audit) = api.get("/api/v1/audit?limit=100").await;
    let count = |action: &str| {
        audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == action)
            .count()
    };
    assert_eq!(count("rollout.promote"), 1, "{audit}");
    assert_eq!(count("rollout.rollback"), 1, "{audit}");
    let (_, rollouts) = api.get("/api/v1/rollouts?version=1.0.0").await;
    let promotes = rollouts
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "promote")
        .count();
    assert_eq!(promotes, 1, "{rollouts}");

    // The CLI says so too.
    let (ok, out) = run_cli(&server, &["rollback", "1.0.0"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("1.0.0 was rolled back already; nothing changed"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_tokens_are_listed_expire_and_are_revoked_wherever_they_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    publish(&server.downloads(), "1.0.0", None, b"build");
    offered(&api, "1.0.0").await;
    // The bootstrap token expires, and the banner says when.
    let banner = std::fs::read_to_string(dir.path().join("server.out")).unwrap();
    let line = banner
        .lines()
        .find(|l| l.contains("enrollment token:"))
        .unwrap();
    assert!(line.contains("(expires 20"), "{line}");
    let (_, sites) = api.get("/api/v1/sites").await;
    let site = sites[0]["id"].as_str().unwrap().to_owned();
    let (status, listed) = api
        .get(&format!("/api/v1/sites/{site}/enrollment-tokens"))
        .await;
    assert_eq!(status, 200, "{listed}");
    let bootstrap = &listed[0];
    assert_eq!(bootstrap["state"], "usable", "{listed}");
    assert!(bootstrap["expires_at"].is_string(), "{listed}");
    assert!(bootstrap.get("token").is_none() && bootstrap.get("token_hash").is_none());

    let mint = |body: Value| {
        let api = &api;
        let site = &site;
        async move {
            let (status, made) = api
                .post(
                    &format!("/api/v1/sites/{site}/enrollment-tokens"),
                    Some(body),
                )
                .await;
            assert_eq!(status, 201, "{made}");
            (
                made["id"].as_str().unwrap().to_owned(),
                made["token"].as_str().unwrap().to_owned(),
            )
        }
    };
    let install = |token: String| {
        let url = format!("{}/api/v1/agent/install?os=linux&arch=amd64", server.url);
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let (kept_id, kept) = mint(json!({"max_uses": 5})).await;
    let (short_id, short) = mint(json!({"expires_in_secs": 1})).await;
    assert_eq!(install(kept.clone()).await, 200);
    assert_eq!(install(short.clone()).await, 200);
    let mut first = ProtocolAgent::enroll_with(&server, "fp-kept-1", &kept)
        .await
        .expect("a usable token enrolls");
    first.heartbeat().await;

    // Revoked from the CLI: listed as such, refused by install and enrollment alike.
    let (ok, out) = run_cli(&server, &["enrollment-tokens", "revoke", &kept_id]);
    assert!(ok, "{out}");
    assert!(out.contains("revoked"), "{out}");
    let (ok, again) = run_cli(&server, &["enrollment-tokens", "revoke", &kept_id]);
    assert!(!ok, "revoked once: {again}");
    assert_eq!(install(kept.clone()).await, 401);
    assert!(
        ProtocolAgent::enroll_with(&server, "fp-kept-2", &kept)
            .await
            .is_none()
    );
    // Expired: refused the same way.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(install(short.clone()).await, 401);
    assert!(
        ProtocolAgent::enroll_with(&server, "fp-short", &short)
            .await
            .is_none()
    );
    let (status, all) = api.get("/api/v1/enrollment-tokens").await;
    assert_eq!(status, 200, "{all}");
    let state_of = |id: &str| {
        all.as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .map(|t| (t["state"].clone(), t["uses"].clone()))
            .unwrap()
    };
    assert_eq!(state_of(&kept_id), (json!("revoked"), json!(1)), "{all}");
    assert_eq!(state_of(&short_id).0, "expired", "{all}");
    let (ok, table) = run_cli(&server, &["enrollment-tokens", "--site", &site]);
    assert!(ok, "{table}");
    assert!(
        table.contains(&kept_id) && table.contains("revoked"),
        "{table}"
    );
    assert!(table.contains("1/5"), "{table}");
    // The agent enrolled with the revoked token keeps its identity.
    first.reconnect(&server, "1.0.0").await;

    let (_, audit) = api
        .get("/api/v1/audit?action=enrollment_token.revoke")
        .await;
    assert_eq!(audit["entries"][0]["target"], kept_id.as_str(), "{audit}");
    // Admins only.
    let viewer = Api::new(&server.url, &token_of(&api, "viewer").await);
    let (status, _) = viewer.get("/api/v1/enrollment-tokens").await;
    assert_eq!(status, 403);
    let (status, _) = viewer
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/enrollment-tokens/{short_id}"),
            None,
        )
        .await;
    assert_eq!(status, 403);
}
