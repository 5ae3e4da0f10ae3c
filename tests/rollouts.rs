//! End-to-end: rollouts against the real server, with scripted agents speaking the real
//! protocol. Failures that are not the build's (a refused download, a full disk, a
//! cancel, a reconnect) never halt a rollout and never block a version, while as many
//! build failures do halt it; the promote gate counts only beta-channel successes that
//! came through the success bake; a rollback obeys pauses, agents that decline updates
//! and the server-wide switch, and names the agents it cannot move; an operator's change
//! reaches an update already under way; and a promote's waves start, bake, pause,
//! advance and abort as an operator expects, with counts that always add up.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use protocol::{
    AgentMessage, Cancel, FailureClass, Hello, ServerMessage, Update, UpdateOutcome,
    UpdateProgress, UpdateResult, UpdateStage,
};
use serde_json::{Value, json};
use support::*;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// How long a message the server owes an agent may take on a busy machine.
const SOON: Duration = Duration::from_secs(15);
/// How long the tests wait to see that something does not happen.
const QUIET: Duration = Duration::from_secs(2);
/// How often a kept agent heartbeats (the harness's interval is 1 s; 3 s of silence ends
/// a session).
const BEAT: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------------------
// Agents kept alive in the background
// ---------------------------------------------------------------------------------------

/// What a kept agent heard: a message, or why its session ended.
type Heard = Result<ServerMessage, String>;

enum Order {
    Report(AgentMessage),
    Reconnect {
        hello: Box<Hello>,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// A `ProtocolAgent` owned by a task of its own, so a whole fleet heartbeats while the
/// test looks at one agent: it collects what the server sends, and reports or reconnects
/// when the test says so.
struct Kept {
    id: String,
    name: String,
    secret: String,
    heard: mpsc::UnboundedReceiver<Heard>,
    orders: mpsc::UnboundedSender<Order>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl Kept {
    async fn enroll(server: &Server, name: &str, version: &str) -> Kept {
        let agent = ProtocolAgent::enroll(server, name, version).await;
        Kept::keep(server, agent, name)
    }

    /// Enrolls with a site's enrollment token, at 1.0.0.
    async fn enroll_with(server: &Server, name: &str, token: &str) -> Kept {
        let agent = ProtocolAgent::enroll_with(server, name, token)
            .await
            .expect("the token enrolls");
        Kept::keep(server, agent, name)
    }

    fn keep(server: &Server, agent: ProtocolAgent, name: &str) -> Kept {
        let (heard_tx, heard) = mpsc::unbounded_channel();
        let (orders, orders_rx) = mpsc::unbounded_channel();
        let (id, secret) = (agent.id.clone(), agent.secret.clone());
        let keeper = tokio::spawn(keep(agent, server.ws_url(), heard_tx, orders_rx));
        Kept {
            id,
            name: name.to_owned(),
            secret,
            heard,
            orders,
            keeper,
        }
    }

    /// The next message within `within`; panics if the session ended.
    async fn next(&mut self, within: Duration) -> Option<ServerMessage> {
        match tokio::time::timeout(within, self.heard.recv()).await {
            Err(_) => None,
            Ok(None) => panic!("{}: the agent's keeper stopped", self.name),
            Ok(Some(Ok(message))) => Some(message),
            Ok(Some(Err(why))) => panic!("{}: {why}", self.name),
        }
    }

    async fn update(&mut self, within: Duration) -> Update {
        match self.next(within).await {
            Some(ServerMessage::Update(update)) => *update,
            Some(other) => panic!("{}: expected an update, got {other:?}", self.name),
            None => panic!("{}: no update within {within:?}", self.name),
        }
    }

    async fn cancel(&mut self, within: Duration) -> Cancel {
        match self.next(within).await {
            Some(ServerMessage::Cancel(cancel)) => cancel,
            Some(other) => panic!("{}: expected a cancel, got {other:?}", self.name),
            None => panic!("{}: no cancel within {within:?}", self.name),
        }
    }

    /// Everything heard so far, without waiting.
    fn heard_so_far(&mut self) -> Vec<ServerMessage> {
        let mut all = Vec::new();
        while let Ok(heard) = self.heard.try_recv() {
            match heard {
                Ok(message) => all.push(message),
                Err(why) => panic!("{}: {why}", self.name),
            }
        }
        all
    }

    fn assert_heard_nothing(&mut self, when: &str) {
        let heard = self.heard_so_far();
        assert!(heard.is_empty(), "{} {when}: heard {heard:?}", self.name);
    }

    fn report(&self, message: AgentMessage) {
        self.orders
            .send(Order::Report(message))
            .expect("the keeper runs");
    }

    fn downloading(&self, task_id: &str) {
        self.report(AgentMessage::UpdateProgress(UpdateProgress {
            task_id: task_id.into(),
            stage: UpdateStage::Downloading,
            bytes_done: 10,
            bytes_total: 100,
            transfer: None,
        }));
    }

    fn fail(&self, task_id: &str, class: FailureClass, error: &str) {
        self.report(AgentMessage::UpdateResult(UpdateResult {
            task_id: task_id.into(),
            outcome: UpdateOutcome::Failed,
            version: "1.0.0".into(),
            error: Some(error.into()),
            failure_class: Some(class),
            transfer: None,
        }));
    }

    fn rolled_back(&self, task_id: &str) {
        self.report(AgentMessage::UpdateResult(UpdateResult {
            task_id: task_id.into(),
            outcome: UpdateOutcome::RolledBack,
            version: "1.0.0".into(),
            error: Some("the new version exited during probation".into()),
            failure_class: Some(FailureClass::Build),
            transfer: None,
        }));
    }

    /// A new session with the agent's credentials, reporting `version`; it heartbeats at
    /// once, which is how an update proves itself.
    async fn reconnect(&self, version: &str) {
        self.reconnect_with(version, |_| {}).await;
    }

    async fn reconnect_with(&self, version: &str, change: impl FnOnce(&mut Hello)) {
        let mut hello = hello(&self.name);
        hello.enroll_token = None;
        hello.agent_id = Some(self.id.clone());
        hello.secret = Some(self.secret.clone());
        hello.version = version.into();
        change(&mut hello);
        let (done, answer) = oneshot::channel();
        self.orders
            .send(Order::Reconnect {
                hello: Box::new(hello),
                done,
            })
            .expect("the keeper runs");
        if let Err(why) = answer.await.expect("the keeper answers") {
            panic!("{}: reconnect failed: {why}", self.name);
        }
    }
}

async fn keep(
    mut agent: ProtocolAgent,
    ws_url: String,
    heard: mpsc::UnboundedSender<Heard>,
    mut orders: mpsc::UnboundedReceiver<Order>,
) {
    let mut beat = tokio::time::interval(BEAT);
    let mut lost = false;
    loop {
        tokio::select! {
            _ = beat.tick(), if !lost => agent.heartbeat().await,
            frame = agent.socket.next(), if !lost => match frame {
                Some(Ok(Message::Binary(bytes))) => {
                    let message = ServerMessage::decode(&bytes)
                        .map_err(|e| format!("a frame did not decode: {e:?}"));
                    // A channel notice is informational: what it means for updates
                    // follows in messages of its own.
                    if !matches!(message, Ok(ServerMessage::Channel(_))) {
                        let _ = heard.send(message);
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    lost = true;
                    let _ = heard.send(Err(format!("the server closed the session: {frame:?}")));
                }
                None | Some(Err(_)) => {
                    lost = true;
                    let _ = heard.send(Err("the session was lost".into()));
                }
                Some(Ok(_)) => {}
            },
            order = orders.recv() => match order {
                None => return,
                Some(Order::Report(message)) => agent.report(message).await,
                Some(Order::Reconnect { hello, done }) => {
                    let version = hello.version.clone();
                    match session(&ws_url, *hello).await {
                        Ok(socket) => {
                            agent.socket = socket;
                            agent.version = version;
                            lost = false;
                            agent.heartbeat().await;
                            let _ = done.send(Ok(()));
                        }
                        Err(why) => {
                            let _ = done.send(Err(why));
                        }
                    }
                }
            },
        }
    }
}

async fn session(ws_url: &str, hello: Hello) -> Result<RawSocket, String> {
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .map_err(|e| e.to_string())?;
    send(&mut socket, AgentMessage::Hello(hello)).await;
    match receive(&mut socket).await {
        Some(ServerMessage::Welcome(_)) => Ok(socket),
        other => Err(format!("expected a welcome, got {other:?}")),
    }
}

async fn enroll_fleet(server: &Server, prefix: &str, count: usize, version: &str) -> Vec<Kept> {
    let mut fleet = Vec::with_capacity(count);
    for n in 0..count {
        fleet.push(Kept::enroll(server, &format!("{prefix}-{n}"), version).await);
    }
    fleet
}

// ---------------------------------------------------------------------------------------
// Reading rollouts
// ---------------------------------------------------------------------------------------

const STAGES: [&str; 11] = [
    "waiting",
    "queued",
    "outside_window",
    "downloading",
    "installing",
    "probation",
    "succeeded",
    "failed",
    "rolled_back",
    "cancelled",
    "skipped",
];

/// What is wrong with a rollout's counts, if anything: every target is in exactly one
/// stage, overall and in each wave, and succeeded never exceeds targeted.
fn count_problem(rollout: &Value) -> Option<String> {
    let check = |counts: &Value, what: &str| -> Option<String> {
        let targeted = counts["targeted"].as_u64()?;
        let mut sum = 0;
        for stage in STAGES {
            sum += counts[stage].as_u64()?;
        }
        if sum != targeted {
            return Some(format!("{what}: stages add up to {sum}, not {targeted}"));
        }
        if counts["succeeded"].as_u64()? > targeted {
            return Some(format!("{what}: more succeeded than targeted"));
        }
        None
    };
    let malformed = || Some(format!("counts missing: {rollout}"));
    if rollout["targeted"].as_u64().is_none() {
        return malformed();
    }
    if let Some(problem) = check(rollout, "the rollout") {
        return Some(problem);
    }
    let mut wave_targets = 0;
    for wave in rollout["waves"].as_array()? {
        let what = format!("wave {}", wave["index"]);
        if wave["counts"]["targeted"].as_u64().is_none() {
            return malformed();
        }
        if let Some(problem) = check(&wave["counts"], &what) {
            return Some(problem);
        }
        wave_targets += wave["counts"]["targeted"].as_u64()?;
    }
    if Some(wave_targets) != rollout["targeted"].as_u64() {
        return Some(format!(
            "the waves hold {wave_targets} targets, the rollout {}",
            rollout["targeted"]
        ));
    }
    None
}

fn assert_counts(rollout: &Value) {
    if let Some(problem) = count_problem(rollout) {
        panic!("{problem}: {rollout}");
    }
}

/// One rollout by id, its counts checked.
async fn rollout(api: &Api, id: &str) -> Value {
    let (status, body) = api.get(&format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_counts(&body);
    body
}

/// The version's rollout of `kind`, its counts checked.
async fn rollout_of(api: &Api, version: &str, kind: &str) -> Option<Value> {
    let (status, body) = api
        .get(&format!("/api/v1/rollouts?version={version}"))
        .await;
    assert_eq!(status, 200, "{body}");
    let found = body.as_array()?.iter().find(|r| r["kind"] == kind)?.clone();
    assert_counts(&found);
    Some(found)
}

/// The agents of a rollout in `filter` (`stage=waiting`, `wave=0`).
async fn rollout_agents(api: &Api, id: &str, filter: &str) -> Vec<String> {
    let (status, body) = api
        .get(&format!("/api/v1/rollouts/{id}/agents?{filter}"))
        .await;
    assert_eq!(status, 200, "{body}");
    let agents: Vec<String> = body["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(body["total"].as_u64(), Some(agents.len() as u64), "{body}");
    agents
}

/// Polls a version's rollouts in the background, remembering every state they were
/// seen in and any count that did not add up.
struct Watch {
    seen: Arc<Mutex<Vec<String>>>,
    problems: Arc<Mutex<Vec<String>>>,
    poller: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(server: &Server, version: &str) -> Watch {
        let api = Api::new(&server.url, ADMIN_TOKEN);
        let path = format!("/api/v1/rollouts?version={version}");
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let problems: Arc<Mutex<Vec<String>>> = Arc::default();
        let (seen_by, problems_by) = (seen.clone(), problems.clone());
        let poller = tokio::spawn(async move {
            loop {
                let (status, body) = api.get(&path).await;
                if status != 200 {
                    problems_by
                        .lock()
                        .unwrap()
                        .push(format!("{status}: {body}"));
                }
                for rollout in body.as_array().into_iter().flatten() {
                    let state = format!("{} {}", rollout["kind"], rollout["state"]);
                    let mut seen = seen_by.lock().unwrap();
                    if seen.last() != Some(&state) {
                        seen.push(state);
                    }
                    if let Some(problem) = count_problem(rollout) {
                        problems_by
                            .lock()
                            .unwrap()
                            .push(format!("{problem}: {rollout}"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        });
        Watch {
            seen,
            problems,
            poller,
        }
    }

    /// Stops polling; the states seen, in order (repeats dropped).
    fn stop(self) -> Vec<String> {
        self.poller.abort();
        let problems = self.problems.lock().unwrap().clone();
        assert!(problems.is_empty(), "{problems:#?}");
        self.seen.lock().unwrap().clone()
    }
}

async fn task_status(server: &Server, agent: &str, task: &str, status: &str) -> Value {
    eventually(&format!("task {task} to be {status}"), SOON, || async {
        let found = tasks_of(server, agent)
            .await
            .into_iter()
            .find(|t| t["id"] == task)?;
        (found["status"] == status).then_some(found)
    })
    .await
}

/// Waits until the server offers these builds.
async fn offered(api: &Api, builds: &[(&str, &str)]) {
    eventually("the builds to be offered", SOON, || async {
        let (_, releases) = api.get("/api/v1/releases").await;
        let releases = releases.as_array()?.clone();
        builds
            .iter()
            .all(|(version, arch)| {
                releases
                    .iter()
                    .any(|r| r["version"] == *version && r["arch"] == *arch)
            })
            .then_some(())
    })
    .await;
}

/// Publishes a build for another platform than the harness's linux/amd64.
fn publish_for(downloads: &std::path::Path, arch: &str, version: &str, contents: &[u8]) {
    use sha2::Digest;
    let file = format!("drover-agent-linux-{arch}-{version}");
    std::fs::write(downloads.join(&file), contents).unwrap();
    std::fs::write(downloads.join(format!("{file}.channel")), "stable\n").unwrap();
    let digest = hex::encode(sha2::Sha256::digest(contents));
    std::fs::write(
        downloads.join(format!("{file}.sha256")),
        format!("{digest}  {file}\n"),
    )
    .unwrap();
}

fn detail(body: &Value) -> String {
    body["detail"].as_str().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------------------
// 1. Failures that are not the build's
// ---------------------------------------------------------------------------------------

/// A target that restarted into the new build is on probation, apart from installing,
/// until its new version heartbeats; then it has succeeded.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_target_is_on_probation_until_the_new_build_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut fleet = enroll_fleet(&server, "fp-probe", 2, "1.0.0").await;
    publish(&server.downloads(), "1.1.0", Some("stable"), b"a build");
    let mut tasks = Vec::new();
    for agent in &mut fleet {
        tasks.push(agent.update(SOON).await.task_id);
    }
    for stage in [UpdateStage::Installing, UpdateStage::Restarting] {
        fleet[0].report(AgentMessage::UpdateProgress(UpdateProgress {
            task_id: tasks[0].clone(),
            stage,
            bytes_done: 7,
            bytes_total: 7,
            transfer: None,
        }));
    }
    let counts = eventually("a target on probation", SOON, || async {
        let r = rollout_of(&api, "1.1.0", "promote").await?;
        (r["probation"] == 1).then_some(r)
    })
    .await;
    assert_eq!(
        (
            &counts["installing"],
            &counts["downloading"],
            &counts["in_progress"],
            &counts["succeeded"]
        ),
        (&json!(0), &json!(1), &json!(2), &json!(0)),
        "{counts}"
    );
    assert_eq!(count_problem(&counts), None);
    fleet[0].reconnect("1.1.0").await;
    let done = eventually("the probation to end in success", SOON, || async {
        let r = rollout_of(&api, "1.1.0", "promote").await?;
        (r["succeeded"] == 1).then_some(r)
    })
    .await;
    assert_eq!(done["probation"], 0, "{done}");
    assert_eq!(count_problem(&done), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_that_are_not_the_builds_never_halt_and_never_block_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut fleet = enroll_fleet(&server, "fp-weather", 6, "1.0.0").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"a good build",
    );
    let mut first = Vec::new();
    for agent in &mut fleet {
        let update = agent.update(SOON).await;
        assert_eq!(update.version, "1.1.0");
        first.push(update.task_id);
    }
    let watch = Watch::start(&server, "1.1.0");

    // Two downloads refused by a busy server, two full disks.
    let failed_at = tokio::time::Instant::now();
    for (agent, task) in fleet.iter().zip(&first).take(2) {
        agent.fail(task, FailureClass::Transient, "download refused: 503");
    }
    for (agent, task) in fleet.iter().zip(&first).skip(2).take(2) {
        agent.fail(task, FailureClass::Environment, "disk full");
    }

    // One agent is paused while it downloads: its task is cancelled, and resuming it
    // starts the same version again at once.
    fleet[4].downloading(&first[4]);
    task_status(&server, &fleet[4].id, &first[4], "downloading").await;
    let (status, body) = api
        .post(&format!("/api/v1/agents/{}/pause", fleet[4].id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let cancel = fleet[4].cancel(SOON).await;
    assert_eq!(cancel.task_id, first[4]);
    assert!(cancel.reason.contains("paused"), "{cancel:?}");
    let cancelled = task_status(&server, &fleet[4].id, &first[4], "cancelled").await;
    assert_eq!(cancelled["failure_class"], "transient", "{cancelled}");
    let (status, body) = api
        .post(&format!("/api/v1/agents/{}/resume", fleet[4].id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let again = fleet[4].update(SOON).await;
    assert_eq!(again.version, "1.1.0");
    assert_ne!(again.task_id, first[4], "a new task after the resume");

    // One agent loses its connection three times mid-download: the same task is sent
    // again each time, and none of that is an attempt or a failure.
    fleet[5].downloading(&first[5]);
    task_status(&server, &fleet[5].id, &first[5], "downloading").await;
    for _ in 0..3 {
        fleet[5].reconnect("1.0.0").await;
        let resent = fleet[5].update(SOON).await;
        assert_eq!(resent.task_id, first[5], "the same task is sent again");
    }
    let tasks = tasks_of(&server, &fleet[5].id).await;
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["attempts"], 1, "{tasks:?}");

    // The failed agents are offered the same version again, after the retry delay.
    for (agent, task) in fleet.iter_mut().zip(&first).take(4) {
        let retry = agent.update(SOON).await;
        assert_eq!(retry.version, "1.1.0", "{}", agent.name);
        assert_ne!(&retry.task_id, task, "{}: a new task", agent.name);
    }
    assert!(
        failed_at.elapsed() >= Duration::from_millis(1900),
        "retried after {:?}, before the 2 s retry delay",
        failed_at.elapsed()
    );

    let promote = rollout_of(&api, "1.1.0", "promote").await.unwrap();
    assert_eq!(promote["state"], "running", "{promote}");
    assert_eq!(
        promote["failures"],
        json!({"build": 0, "environment": 2, "transient": 3}),
        "two refused downloads and a cancel are transient, two full disks environment: {promote}"
    );
    assert_eq!(promote["failed"], 0, "{promote}");

    // Everyone gets there in the end, and the rollout completes.
    for agent in &fleet {
        agent.reconnect("1.1.0").await;
    }
    let done = eventually("the rollout to complete", SOON, || async {
        let promote = rollout_of(&api, "1.1.0", "promote").await?;
        (promote["state"] == "completed").then_some(promote)
    })
    .await;
    assert_eq!(
        (done["targeted"].as_u64(), done["succeeded"].as_u64()),
        (Some(6), Some(6)),
        "{done}"
    );
    assert_eq!(done["failures"]["build"], 0, "{done}");
    let seen = watch.stop();
    assert!(
        !seen.iter().any(|s| s.contains("halted")),
        "the rollout halted on failures that were not the build's: {seen:?}\n{}",
        server.log()
    );
    assert!(seen.iter().any(|s| s.contains("running")), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn as_many_build_failures_halt_the_rollout_and_block_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut fleet = enroll_fleet(&server, "fp-broken", 6, "1.0.0").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"a broken build",
    );
    let mut tasks = Vec::new();
    for agent in &mut fleet {
        tasks.push(agent.update(SOON).await.task_id);
    }
    for (agent, task) in fleet.iter().zip(&tasks) {
        agent.rolled_back(task);
    }
    let halted = eventually("the rollout to halt", SOON, || async {
        let promote = rollout_of(&api, "1.1.0", "promote").await?;
        (promote["state"] == "halted").then_some(promote)
    })
    .await;
    let reason = halted["reason"].as_str().unwrap_or_default();
    // "wave 1: 5 of 5 finished updates failed (100%, over the 10% limit)": it may halt
    // at the fifth failure, before the sixth is read.
    let counts = reason
        .strip_prefix("wave 1: ")
        .and_then(|rest| rest.split(" finished updates failed").next())
        .unwrap_or_default();
    assert!(
        counts == "5 of 5" || counts == "6 of 6",
        "the reason names the wave and the counts: {reason:?}"
    );
    assert!(reason.contains("over the 10% limit"), "{reason:?}");
    let all = eventually("every failure counted", SOON, || async {
        let promote = rollout_of(&api, "1.1.0", "promote").await?;
        (promote["failures"]["build"] == 6).then_some(promote)
    })
    .await;
    assert_eq!(all["state"], "halted", "{all}");
    assert_eq!(all["rolled_back"], 6, "{all}");

    // Past the retry delay, none of them is offered the build again.
    tokio::time::sleep(QUIET + Duration::from_secs(1)).await;
    for agent in &mut fleet {
        agent.assert_heard_nothing("after its build failure");
    }
}

// ---------------------------------------------------------------------------------------
// 2. The promote gate
// ---------------------------------------------------------------------------------------

async fn set_channel(api: &Api, agent: &str, channel: &str) {
    let (status, body) = api
        .put(
            &format!("/api/v1/agents/{agent}/channel"),
            json!({ "channel": channel }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Beta agents, on the beta channel before the build lands, so they are its targets.
async fn beta_fleet(server: &Server, prefix: &str, count: usize) -> Vec<Kept> {
    let fleet = enroll_fleet(server, prefix, count, "1.0.0").await;
    for agent in &fleet {
        set_channel(&server.api(), &agent.id, "beta").await;
    }
    fleet
}

/// Builds that land together (here: found at a start, as after an upgrade or on a
/// downloads directory filled while the server was down) start their rollouts oldest
/// first: the newest of each kind is the one under way, the older ones superseded by it.
#[tokio::test(flavor = "multi_thread")]
async fn builds_that_land_together_leave_the_newest_rollout_under_way() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    drop(enroll_fleet(&server, "fp-together-stable", 1, "1.0.0").await);
    drop(beta_fleet(&server, "fp-together-beta", 1).await);
    server.terminate();
    for version in ["1.1.0", "1.3.0", "1.2.0"] {
        publish(
            &server.downloads(),
            version,
            Some("beta"),
            version.as_bytes(),
        );
    }
    for version in ["2.1.0", "2.0.0"] {
        publish(
            &server.downloads(),
            version,
            Some("stable"),
            version.as_bytes(),
        );
    }
    let server = Server::start(dir.path());
    let api = server.api();
    let state = |rollout: Option<Value>| rollout.map(|r| r["state"].as_str().unwrap().to_owned());
    let superseded = Some("superseded".to_owned());
    eventually("every build's rollout", SOON, || async {
        let (beta, promote) = (
            state(rollout_of(&api, "1.3.0", "beta").await),
            state(rollout_of(&api, "2.1.0", "promote").await),
        );
        (beta.is_some() && promote.is_some()).then_some(())
    })
    .await;
    for (version, kind) in [("1.1.0", "beta"), ("1.2.0", "beta"), ("2.0.0", "promote")] {
        assert_eq!(
            state(rollout_of(&api, version, kind).await),
            superseded,
            "{version}"
        );
    }
    for (version, kind) in [("1.3.0", "beta"), ("2.1.0", "promote")] {
        let under_way = state(rollout_of(&api, version, kind).await);
        assert!(
            matches!(under_way.as_deref(), Some("running" | "waiting")),
            "{version}: {under_way:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gate_counts_only_beta_agents_that_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut stable = enroll_fleet(&server, "fp-gate-stable", 3, "1.0.0").await;
    let mut beta = beta_fleet(&server, "fp-gate-beta", 3).await;
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    let mut beta_tasks = Vec::new();
    for agent in &mut beta {
        let update = agent.update(SOON).await;
        assert_eq!(update.version, "1.1.0");
        beta_tasks.push(update.task_id);
    }

    // Three stable agents forced onto the beta build, and all three succeed.
    for agent in &mut stable {
        let (status, body) = api
            .post(
                &format!("/api/v1/agents/{}/update", agent.id),
                Some(json!({"version": "1.1.0"})),
            )
            .await;
        assert!(
            (200..300).contains(&status),
            "{status}: {body}\n{}",
            server.log()
        );
        let update = agent.update(SOON).await;
        assert_eq!(update.version, "1.1.0");
        agent.reconnect("1.1.0").await;
        task_status(&server, &agent.id, &update.task_id, "succeeded").await;
    }
    let (status, body) = api.post("/api/v1/rollouts/1.1.0/promote", None).await;
    assert_eq!(
        status, 409,
        "forced stable successes are not beta successes: {body}"
    );
    let reason = detail(&body);
    assert!(
        reason.contains("0 of the 3 beta successes needed"),
        "the reason names the beta successes needed: {reason:?}"
    );
    let beta_rollout = rollout_of(&api, "1.1.0", "beta").await.unwrap();
    assert_eq!(beta_rollout["gate"]["pass"], false, "{beta_rollout}");
    assert_eq!(beta_rollout["targeted"], 3, "{beta_rollout}");
    // The listing counts its rollouts together; each says what it says alone.
    let (_, listed) = api.get("/api/v1/rollouts?version=1.1.0").await;
    let listed = listed.as_array().unwrap();
    assert_eq!(
        listed.len(),
        4,
        "one beta and three targeted rollouts: {listed:?}"
    );
    for entry in listed {
        let alone = rollout(&api, entry["id"].as_str().unwrap()).await;
        for field in ["targeted", "succeeded", "in_progress", "waves", "gate"] {
            assert!(
                field == "gate" || !entry[field].is_null(),
                "{field} of {entry}"
            );
            assert_eq!(entry[field], alone[field], "{field} of {entry}");
        }
    }

    // The three beta agents succeed: the gate opens.
    for (agent, task) in beta.iter().zip(&beta_tasks) {
        agent.reconnect("1.1.0").await;
        task_status(&server, &agent.id, task, "succeeded").await;
    }
    let (status, body) = api.post("/api/v1/rollouts/1.1.0/promote", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["gate"]["pass"], true, "{body}");
    assert_eq!(body["forced"], false, "{body}");
    assert_eq!(body["rollout"]["kind"], "promote", "{body}");
    assert_counts(&body["rollout"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gate_waits_for_beta_successes_to_bake() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--success-bake", "3s"]);
    let api = server.api();
    let mut beta = beta_fleet(&server, "fp-bake", 3).await;
    publish(&server.downloads(), "1.1.0", Some("beta"), b"a beta build");
    let mut tasks = Vec::new();
    for agent in &mut beta {
        tasks.push(agent.update(SOON).await.task_id);
    }
    for (agent, task) in beta.iter().zip(&tasks) {
        agent.reconnect("1.1.0").await;
        task_status(&server, &agent.id, task, "succeeded").await;
    }
    let (status, body) = api.post("/api/v1/rollouts/1.1.0/promote", None).await;
    assert_eq!(
        status, 409,
        "three fresh successes are still baking: {body}"
    );
    let reason = detail(&body);
    assert!(
        reason.contains("still in the success bake"),
        "the reason says the successes are baking: {reason:?}"
    );

    // They stay connected on the new version through the bake: then the gate opens.
    let open = eventually("the gate to open", SOON, || async {
        let beta = rollout_of(&api, "1.1.0", "beta").await?;
        (beta["gate"]["pass"] == true).then_some(beta)
    })
    .await;
    assert_eq!(open["succeeded"], 3, "{open}");
    let (status, body) = api.post("/api/v1/rollouts/1.1.0/promote", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["gate"]["pass"], true, "{body}");
}

// ---------------------------------------------------------------------------------------
// 3. Rollback
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_obeys_pauses_and_agents_that_decline_and_names_those_with_no_build() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut fleet = enroll_fleet(&server, "fp-back", 5, "1.0.0").await;
    // An arm64 machine for which only 1.1.0 was ever published.
    let mut lone = Kept::enroll(&server, "fp-back-arm", "1.0.0").await;
    lone.reconnect_with("1.1.0", |h| h.arch = "arm64".into())
        .await;
    publish(
        &server.downloads(),
        "1.0.0",
        Some("stable"),
        b"the old build",
    );
    publish_for(&server.downloads(), "arm64", "1.1.0", b"the new arm build");
    offered(&api, &[("1.0.0", "amd64"), ("1.1.0", "arm64")]).await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"the new build",
    );
    for agent in &mut fleet {
        let update = agent.update(SOON).await;
        assert_eq!(update.version, "1.1.0");
        agent.reconnect("1.1.0").await;
        task_status(&server, &agent.id, &update.task_id, "succeeded").await;
    }

    // One agent is paused; another comes back with auto-update switched off.
    let (status, body) = api
        .post(&format!("/api/v1/agents/{}/pause", fleet[0].id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    fleet[1]
        .reconnect_with("1.1.0", |h| h.auto_update = false)
        .await;
    eventually("the agent to decline updates", SOON, || async {
        let (_, agent) = api.get(&format!("/api/v1/agents/{}", fleet[1].id)).await;
        (agent["auto_update"] == false).then_some(())
    })
    .await;
    for agent in fleet.iter_mut().chain([&mut lone]) {
        agent.heard_so_far();
    }
    // The promote of 1.1.0 is paused, so that nothing but the rollback changes it: the
    // rollback aborts it and starts its own, and the fleet hears of both at once.
    let promote = rollout_of(&api, "1.1.0", "promote").await.unwrap();
    let (status, body) = api
        .post(
            &format!("/api/v1/rollouts/{}/pause", promote["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(QUIET).await;
    let checks_before = server.counter("drover_fleet_checks_total").await;

    let (status, answer) = api.post("/api/v1/rollouts/1.1.0/rollback", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["targeted"], 5, "{answer}");
    assert_eq!(
        answer["skipped"],
        json!({"paused": 1, "declines_updates": 1, "updates_off": 0}),
        "{answer}"
    );
    assert_eq!(answer["agents_rolled_back"], 3, "{answer}");
    assert_eq!(answer["offline"], 0, "{answer}");
    assert_eq!(answer["no_build"], json!([lone.id]), "{answer}");
    assert_eq!(answer["rollout"]["kind"], "rollback", "{answer}");
    assert_counts(&answer["rollout"]);

    for agent in &mut fleet[2..] {
        let update = agent.update(SOON).await;
        assert!(update.rollback, "{update:?}");
        assert_eq!(update.version, "1.0.0");
    }
    tokio::time::sleep(QUIET).await;
    for agent in fleet.iter_mut().chain([&mut lone]) {
        agent.assert_heard_nothing("after the rollback");
    }
    assert_eq!(
        server.counter("drover_fleet_checks_total").await - checks_before,
        1,
        "checks of the fleet for one rollback"
    );
    let promote = rollout(&api, promote["id"].as_str().unwrap()).await;
    assert_eq!(promote["state"], "aborted", "{promote}");

    // The three go back; the paused and the declining one are counted as skipped.
    for agent in &fleet[2..] {
        agent.reconnect("1.0.0").await;
    }
    let id = answer["rollout"]["id"].as_str().unwrap();
    let moved = eventually("three agents back on 1.0.0", SOON, || async {
        let back = rollout(&api, id).await;
        (back["succeeded"] == 3).then_some(back)
    })
    .await;
    assert_eq!(moved["skipped"], 2, "{moved}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_updates_off_a_rollback_sends_nothing_until_they_are_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    publish(
        &server.downloads(),
        "1.0.0",
        Some("stable"),
        b"the old build",
    );
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"the new build",
    );
    offered(&api, &[("1.0.0", "amd64"), ("1.1.0", "amd64")]).await;
    let mut fleet = enroll_fleet(&server, "fp-off", 3, "1.1.0").await;
    let (status, body) = api.put("/api/v1/updates", json!({"enabled": false})).await;
    assert_eq!(status, 200, "{body}");

    let (status, answer) = api.post("/api/v1/rollouts/1.1.0/rollback", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["targeted"], 3, "{answer}");
    assert_eq!(
        answer["skipped"],
        json!({"paused": 0, "declines_updates": 0, "updates_off": 3}),
        "{answer}"
    );
    assert_eq!(answer["agents_rolled_back"], 0, "{answer}");
    tokio::time::sleep(QUIET).await;
    for agent in &mut fleet {
        agent.assert_heard_nothing("while updates are off");
    }

    // Switched back on, the rollback goes ahead.
    let (status, body) = api.put("/api/v1/updates", json!({"enabled": true})).await;
    assert_eq!(status, 200, "{body}");
    for agent in &mut fleet {
        let update = agent.update(SOON).await;
        assert!(update.rollback, "{update:?}");
        assert_eq!(update.version, "1.0.0");
    }
}

// ---------------------------------------------------------------------------------------
// 4. Operator changes reach tasks under way
// ---------------------------------------------------------------------------------------

/// The explanation agrees with the cancel the agent was sent.
async fn explain_holds_for(api: &Api, agent: &str, reason: &str) {
    let (status, explained) = api.get(&format!("/api/v1/agents/{agent}/explain")).await;
    assert_eq!(status, 200, "{explained}");
    assert_eq!(explained["decision"], "hold", "{explained}");
    assert_eq!(explained["reason"], reason, "{explained}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pausing_an_agent_cancels_its_download() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut agent = Kept::enroll(&server, "fp-halfway", "1.0.0").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"a stable build",
    );
    let update = agent.update(SOON).await;
    agent.downloading(&update.task_id);
    task_status(&server, &agent.id, &update.task_id, "downloading").await;

    let (status, body) = api
        .post(&format!("/api/v1/agents/{}/pause", agent.id), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let cancel = agent.cancel(SOON).await;
    assert_eq!(cancel.task_id, update.task_id);
    assert!(cancel.reason.contains("paused"), "{cancel:?}");
    let task = task_status(&server, &agent.id, &update.task_id, "cancelled").await;
    assert_eq!(task["failure_class"], "transient", "{task}");
    explain_holds_for(&api, &agent.id, &cancel.reason).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_a_beta_agent_to_stable_cancels_its_beta_download() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut agent = Kept::enroll(&server, "fp-mover", "1.0.0").await;
    set_channel(&api, &agent.id, "beta").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("beta"),
        b"a beta-only build",
    );
    let update = agent.update(SOON).await;
    agent.downloading(&update.task_id);
    task_status(&server, &agent.id, &update.task_id, "downloading").await;

    set_channel(&api, &agent.id, "stable").await;
    let cancel = agent.cancel(SOON).await;
    assert_eq!(cancel.task_id, update.task_id);
    assert!(!cancel.reason.is_empty(), "{cancel:?}");
    let task = task_status(&server, &agent.id, &update.task_id, "cancelled").await;
    assert_eq!(task["failure_class"], "transient", "{task}");
    assert_eq!(task["error"], cancel.reason.as_str(), "{task}");
    explain_holds_for(&api, &agent.id, &cancel.reason).await;
}

// ---------------------------------------------------------------------------------------
// 5. Waves
// ---------------------------------------------------------------------------------------

fn wave_states(rollout: &Value) -> Vec<String> {
    rollout["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["state"].as_str().unwrap().to_owned())
        .collect()
}

/// A promote tells a node's agents once its builds read stable, when they can move: no
/// check of the whole fleet for nothing before, and each agent hears its update once.
#[tokio::test(flavor = "multi_thread")]
async fn a_promote_checks_the_fleet_once_its_builds_read_stable() {
    const CHECKS: &str = "drover_fleet_checks_total";
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut fleet = enroll_fleet(&server, "fp-told", 3, "1.0.0").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("beta"),
        b"the build to promote",
    );
    offered(&api, &[("1.1.0", "amd64")]).await;
    eventually("the beta rollout", SOON, || async {
        rollout_of(&api, "1.1.0", "beta").await
    })
    .await;
    tokio::time::sleep(QUIET).await;
    let before = server.counter(CHECKS).await;

    let (status, promoted) = api
        .post(
            "/api/v1/rollouts/1.1.0/promote",
            Some(json!({"waves": ["100%"], "force": true})),
        )
        .await;
    assert_eq!(status, 200, "{promoted}");
    for agent in &mut fleet {
        assert_eq!(agent.update(SOON).await.version, "1.1.0");
    }
    tokio::time::sleep(QUIET).await;
    for agent in &mut fleet {
        agent.assert_heard_nothing("after its update");
    }
    // The promote's own check, and at most the one the scanner makes when it sees the
    // builds' new channel; a check before the builds read stable would be a third.
    let checks = server.counter(CHECKS).await - before;
    assert!(
        (1..=2).contains(&checks),
        "{checks} checks of the fleet for one promote"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promote_goes_wave_by_wave_and_obeys_pause_advance_and_abort() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut fleet = enroll_fleet(&server, "fp-wave", 20, "1.0.0").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("beta"),
        b"the next build",
    );
    offered(&api, &[("1.1.0", "amd64")]).await;

    let (status, promoted) = api
        .post(
            "/api/v1/rollouts/1.1.0/promote",
            Some(json!({"waves": ["10%", "50%", "100%"], "bake": "2s", "force": true})),
        )
        .await;
    assert_eq!(status, 200, "{promoted}");
    assert_eq!(promoted["forced"], true, "{promoted}");
    let id = promoted["rollout"]["id"].as_str().unwrap().to_owned();
    let started = rollout(&api, &id).await;
    assert_eq!(started["targeted"], 20, "{started}");
    let sizes: Vec<u64> = started["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [2, 8, 10], "{started}");
    assert_eq!(wave_states(&started), ["running", "pending", "pending"]);
    assert_eq!(rollout_agents(&api, &id, "stage=waiting").await.len(), 18);

    let mut waves: Vec<Vec<usize>> = Vec::new();
    for wave in 0..3 {
        let members = rollout_agents(&api, &id, &format!("wave={wave}")).await;
        waves.push(
            members
                .iter()
                .map(|m| fleet.iter().position(|a| a.id == *m).unwrap())
                .collect(),
        );
    }
    assert_eq!(waves.iter().map(Vec::len).collect::<Vec<_>>(), [2, 8, 10]);

    // Wave 1 only.
    let mut tasks: Vec<Option<String>> = vec![None; fleet.len()];
    for &n in &waves[0] {
        let update = fleet[n].update(SOON).await;
        assert_eq!(update.version, "1.1.0");
        tasks[n] = Some(update.task_id);
    }
    tokio::time::sleep(QUIET).await;
    for &n in waves[1].iter().chain(&waves[2]) {
        fleet[n].assert_heard_nothing("before its wave started");
    }

    // Wave 1 succeeds and bakes; nobody else starts during the bake.
    for &n in &waves[0] {
        fleet[n].reconnect("1.1.0").await;
    }
    let baking = eventually("wave 1 to bake", SOON, || async {
        let now = rollout(&api, &id).await;
        (wave_states(&now)[0] == "baking").then_some(now)
    })
    .await;
    assert_eq!(wave_states(&baking), ["baking", "pending", "pending"]);
    for &n in waves[1].iter().chain(&waves[2]) {
        fleet[n].assert_heard_nothing("while wave 1 baked");
    }

    // After the bake, wave 2 starts by itself, and only wave 2.
    let second = eventually("wave 2 to start", SOON, || async {
        let now = rollout(&api, &id).await;
        (wave_states(&now)[1] == "running").then_some(now)
    })
    .await;
    assert_eq!(wave_states(&second), ["passed", "running", "pending"]);
    assert_eq!(second["succeeded"], 2, "{second}");
    for &n in &waves[1] {
        let update = fleet[n].update(SOON).await;
        assert_eq!(update.version, "1.1.0");
        tasks[n] = Some(update.task_id);
    }
    let waiting = rollout_agents(&api, &id, "stage=waiting").await;
    assert_eq!(waiting.len(), 10, "{waiting:?}");
    for &n in &waves[2] {
        assert!(waiting.contains(&fleet[n].id));
        fleet[n].assert_heard_nothing("while wave 2 runs");
    }

    // Advance: wave 3 starts before wave 2 has passed.
    let (status, advanced) = api
        .post(&format!("/api/v1/rollouts/{id}/advance"), None)
        .await;
    assert_eq!(status, 200, "{advanced}");
    assert_counts(&advanced);
    assert_eq!(wave_states(&advanced), ["passed", "running", "running"]);
    for &n in &waves[2] {
        let update = fleet[n].update(SOON).await;
        assert_eq!(update.version, "1.1.0");
        tasks[n] = Some(update.task_id);
    }
    assert!(rollout_agents(&api, &id, "stage=waiting").await.is_empty());

    // Pause: nothing new starts (a transient failure is not retried past the retry
    // delay), while updates under way go on and may succeed.
    let (status, paused) = api
        .post(&format!("/api/v1/rollouts/{id}/pause"), None)
        .await;
    assert_eq!(status, 200, "{paused}");
    assert_eq!(paused["state"], "paused", "{paused}");
    let flaky = waves[2][0];
    fleet[flaky].fail(
        tasks[flaky].as_ref().unwrap(),
        FailureClass::Transient,
        "download refused: 503",
    );
    let finishers = &waves[1][..2];
    for &n in finishers {
        fleet[n].reconnect("1.1.0").await;
    }
    eventually("updates under way to go on while paused", SOON, || async {
        (rollout(&api, &id).await["succeeded"] == 4).then_some(())
    })
    .await;
    tokio::time::sleep(QUIET + Duration::from_secs(1)).await;
    for agent in &mut fleet {
        agent.assert_heard_nothing("while the rollout is paused");
    }
    let still = rollout(&api, &id).await;
    assert_eq!(still["state"], "paused", "{still}");
    let (status, body) = api
        .post(&format!("/api/v1/rollouts/{id}/advance"), None)
        .await;
    assert_eq!(status, 409, "a paused rollout does not advance: {body}");

    // Resume: the failed agent is retried.
    let (status, body) = api
        .post(&format!("/api/v1/rollouts/{id}/resume"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let retry = fleet[flaky].update(SOON).await;
    assert_ne!(Some(&retry.task_id), tasks[flaky].as_ref());
    tasks[flaky] = Some(retry.task_id);

    // Abort: every unfinished task is cancelled, on the agent too.
    let unfinished: Vec<usize> = waves[1][2..].iter().chain(&waves[2]).copied().collect();
    let (status, aborted) = api
        .post(&format!("/api/v1/rollouts/{id}/abort"), None)
        .await;
    assert_eq!(status, 200, "{aborted}");
    assert_eq!(aborted["state"], "aborted", "{aborted}");
    for &n in &unfinished {
        let cancel = fleet[n].cancel(SOON).await;
        assert_eq!(
            Some(&cancel.task_id),
            tasks[n].as_ref(),
            "{}",
            fleet[n].name
        );
        assert!(cancel.reason.contains("aborted"), "{cancel:?}");
    }
    let ended = eventually("the cancels counted", SOON, || async {
        let now = rollout(&api, &id).await;
        (now["cancelled"] == unfinished.len()).then_some(now)
    })
    .await;
    assert_eq!(ended["succeeded"], 4, "{ended}");
    assert_eq!(ended["in_progress"], 0, "{ended}");
    tokio::time::sleep(QUIET).await;
    for agent in &mut fleet {
        agent.assert_heard_nothing("after the abort");
    }
}

// ---------------------------------------------------------------------------------------
// 6. Maintenance windows
// ---------------------------------------------------------------------------------------

/// `HH:MM` in UTC, `offset_minutes` from now.
fn utc_clock(offset_minutes: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let minutes = (now / 60 + offset_minutes).rem_euclid(24 * 60);
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// Sets a site's window every day at `start` (UTC) for `duration`; returns the answer.
async fn set_site_window(api: &Api, site: &str, start: &str, duration: &str) -> Value {
    let (status, body) = api
        .put(
            &format!("/api/v1/sites/{site}/maintenance-window"),
            json!({"window": {
                "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                "start": start, "duration": duration, "time_zone": "UTC"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_maintenance_window_holds_a_sites_agents_until_it_opens() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let (_, clients) = api.get("/api/v1/clients").await;
    let client = clients[0]["id"].as_str().unwrap().to_owned();
    let (status, site) = api
        .post(
            "/api/v1/sites",
            Some(json!({"client_id": client, "name": "night shift"})),
        )
        .await;
    assert_eq!(status, 201, "{site}");
    let night_site = site["id"].as_str().unwrap().to_owned();
    let (status, token) = api
        .post(
            &format!("/api/v1/sites/{night_site}/enrollment-tokens"),
            None,
        )
        .await;
    assert_eq!(status, 201, "{token}");
    let token = token["token"].as_str().unwrap().to_owned();

    let mut day = enroll_fleet(&server, "fp-day", 2, "1.0.0").await;
    let mut night = Vec::new();
    for n in 0..3 {
        night.push(Kept::enroll_with(&server, &format!("fp-night-{n}"), &token).await);
    }

    // Bad schedules are refused with the reason; nothing is stored.
    let (status, body) = api
        .put(
            &format!("/api/v1/sites/{night_site}/maintenance-window"),
            json!({"window": {"days": ["mon"], "start": "25:00", "duration": "1h",
                "time_zone": "UTC"}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(detail(&body).contains("HH:MM"), "{body}");

    // The night site's window opens in two hours: closed now.
    let set = set_site_window(&api, &night_site, &utc_clock(120), "1h").await;
    assert_eq!(set["agents_affected"], 3, "{set}");
    assert_eq!(set["maintenance_window"]["open"], false, "{set}");
    let opens_at = set["maintenance_window"]["until"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, sites) = api.get("/api/v1/sites").await;
    let listed = sites
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == night_site.as_str())
        .unwrap();
    assert_eq!(
        listed["maintenance_window"]["until"],
        opens_at.as_str(),
        "{listed}"
    );

    publish(
        &server.downloads(),
        "1.1.0",
        Some("beta"),
        b"the next build",
    );
    offered(&api, &[("1.1.0", "amd64")]).await;
    let (status, promoted) = api
        .post(
            "/api/v1/rollouts/1.1.0/promote",
            Some(json!({"waves": ["100%"], "force": true})),
        )
        .await;
    assert_eq!(status, 200, "{promoted}");
    let id = promoted["rollout"]["id"].as_str().unwrap().to_owned();
    assert_eq!(promoted["rollout"]["obeys_windows"], true, "{promoted}");

    // The day site's agents are started; the night site's are not, and say why.
    for agent in &mut day {
        assert_eq!(agent.update(SOON).await.version, "1.1.0");
    }
    tokio::time::sleep(QUIET).await;
    for agent in &mut night {
        agent.assert_heard_nothing("outside its window");
    }
    let held = rollout(&api, &id).await;
    assert_eq!(held["outside_window"], 3, "{held}");
    let mut outside = rollout_agents(&api, &id, "stage=outside_window").await;
    outside.sort();
    let mut night_ids: Vec<String> = night.iter().map(|a| a.id.clone()).collect();
    night_ids.sort();
    assert_eq!(outside, night_ids);
    let (_, explained) = api
        .get(&format!("/api/v1/agents/{}/explain", night[2].id))
        .await;
    assert_eq!(explained["decision"], "hold", "{explained}");
    let reason = explained["reason"].as_str().unwrap();
    assert!(
        reason.contains("outside the maintenance window of its site")
            && reason.ends_with(&format!("waiting for the window opening at {opens_at}")),
        "{explained}"
    );

    // A targeted rollout that overrides windows starts its agent now; one that does not
    // waits like the promote.
    let (status, overriding) = api
        .post(
            "/api/v1/rollouts",
            Some(
                json!({"version": "1.1.0", "selector": {"agent_ids": [night[0].id]},
                "ignore_windows": true}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{overriding}");
    assert_eq!(overriding["obeys_windows"], false, "{overriding}");
    assert_eq!(night[0].update(SOON).await.version, "1.1.0");
    let (status, obeying) = api
        .post(
            "/api/v1/rollouts",
            Some(json!({"version": "1.1.0", "selector": {"agent_ids": [night[1].id]}})),
        )
        .await;
    assert_eq!(status, 201, "{obeying}");
    tokio::time::sleep(QUIET).await;
    night[1].assert_heard_nothing("on a targeted rollout outside its window");
    night[2].assert_heard_nothing("outside its window");
    let obeying = rollout(&api, obeying["id"].as_str().unwrap()).await;
    assert_eq!(obeying["outside_window"], 1, "{obeying}");

    // The window opens (an hour ago, for three hours): both are started at once.
    let set = set_site_window(&api, &night_site, &utc_clock(-60), "3h").await;
    assert_eq!(set["maintenance_window"]["open"], true, "{set}");
    assert_eq!(night[1].update(SOON).await.version, "1.1.0");
    assert_eq!(night[2].update(SOON).await.version, "1.1.0");
    let open = rollout(&api, &id).await;
    assert_eq!(open["outside_window"], 0, "{open}");
}

// ---------------------------------------------------------------------------------------
// 7. A success the agent takes back
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_success_whose_supervisor_did_not_take_over_becomes_a_build_failure() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut agent = Kept::enroll(&server, "fp-handover", "1.0.0").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"a build that will not stay",
    );
    let update = agent.update(SOON).await;
    agent.reconnect("1.1.0").await;
    task_status(&server, &agent.id, &update.task_id, "succeeded").await;
    let rollout_id = rollout_of(&api, "1.1.0", "promote").await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Still on the new version: a "rolled back" cannot be true, and changes nothing.
    agent.rolled_back(&update.task_id);
    tokio::time::sleep(QUIET).await;
    task_status(&server, &agent.id, &update.task_id, "succeeded").await;

    // Back on the old version, the agent says the new one did not take over.
    agent.reconnect("1.0.0").await;
    agent.rolled_back(&update.task_id);
    let task = task_status(&server, &agent.id, &update.task_id, "rolled_back").await;
    assert_eq!(task["failure_class"], "build", "{task}");
    let after = rollout(&api, &rollout_id).await;
    assert_eq!(
        (
            &after["succeeded"],
            &after["rolled_back"],
            &after["failures"]["build"]
        ),
        (&json!(0), &json!(1), &json!(1)),
        "{after}"
    );
    // Coming back, it was sent the build again before it said why; that update is
    // cancelled, and the version is not offered to it again.
    let again = agent.update(SOON).await;
    assert_eq!(again.version, "1.1.0");
    let cancel = agent.cancel(SOON).await;
    assert_eq!(cancel.task_id, again.task_id);
    assert!(
        cancel.reason.contains("1.1.0 failed on this agent"),
        "{cancel:?}"
    );
    tokio::time::sleep(QUIET).await;
    agent.assert_heard_nothing("after its build was taken back");
    let still = rollout(&api, &rollout_id).await;
    assert_eq!(
        still["rolled_back"], 1,
        "the build failure is where it stands: {still}"
    );
    let (_, explained) = api
        .get(&format!("/api/v1/agents/{}/explain", agent.id))
        .await;
    assert_eq!(explained["decision"], "hold", "{explained}");
}
