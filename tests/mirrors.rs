//! End-to-end: download mirrors. A real nginx serves a directory `drover mirror sync`
//! filled; real agents download from it, verify, and fall back to the server when it
//! serves wrong bytes or is down, without failing the update or the rollout. Without
//! nginx these tests skip, except under `CI=true`, where they must run.

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// A real nginx serving `root` on a loopback port; stopped when dropped.
struct Nginx {
    child: Child,
    url: String,
    root: PathBuf,
    access_log: PathBuf,
}

impl Nginx {
    /// `None` (the test skips, saying why) when nginx is not installed, unless under
    /// `CI=true`, where scripts/ci-setup installs it and its absence is a failure.
    fn start(dir: &Path) -> Option<Nginx> {
        let Some(binary) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true requires nginx (scripts/ci-setup installs it)"
            );
            eprintln!("skipped: nginx is not installed (apt-get install nginx-light)");
            return None;
        };
        let home = dir.join("nginx");
        let root = home.join("www");
        std::fs::create_dir_all(home.join("tmp")).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let access_log = home.join("access.log");
        let h = home.display();
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {h}/nginx.pid;\n\
             error_log {h}/error.log;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log {h}/access.log;\n  client_body_temp_path {h}/tmp;\n\
               proxy_temp_path {h}/tmp;\n  fastcgi_temp_path {h}/tmp;\n  uwsgi_temp_path {h}/tmp;\n\
               scgi_temp_path {h}/tmp;\n  default_type application/octet-stream;\n\
               server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
            root = root.display()
        );
        std::fs::write(home.join("nginx.conf"), config).unwrap();
        let child = Command::new(binary)
            .args(["-p", &h.to_string(), "-c", "nginx.conf", "-e", "error.log"])
            .current_dir(&home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nginx did not start: {}",
                std::fs::read_to_string(home.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Nginx {
            child,
            url: format!("http://127.0.0.1:{port}/drover"),
            root: root.join("drover"),
            access_log,
        })
    }

    /// The access log's lines that fetched `file`, with their status.
    fn requests_for(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(&format!("GET /drover/{file} ")))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn default_site(server: &Server) -> String {
    let (status, sites) = server.api().get("/api/v1/sites").await;
    assert_eq!(status, 200, "{sites}");
    sites[0]["id"].as_str().unwrap().to_owned()
}

async fn switch_updates(server: &Server, enabled: bool) {
    let (status, body) = server
        .api()
        .put("/api/v1/updates", json!({ "enabled": enabled }))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Publishes 1.1.0 of the agent while updates are off, so that the mirror can be filled
/// before any agent is sent to it; returns the build's file name.
async fn publish_quietly(server: &Server, dir: &Path) -> String {
    switch_updates(server, false).await;
    publish_agent(server, dir, "1.1.0", "stable");
    let (ok, out) = run_cli(server, &["releases", "rescan"]);
    assert!(ok, "{out}");
    "drover-agent-linux-amd64-1.1.0".to_owned()
}

/// A metric's value in the server's `/metrics` (the first sample whose line starts
/// with `series`).
async fn metric(server: &Server, series: &str) -> Option<f64> {
    let text = server.metrics().await;
    text.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

async fn mirrors(server: &Server) -> Value {
    let (status, body) = server.api().get("/api/v1/mirrors").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sites_agents_download_from_its_mirror_and_the_server_serves_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nginx) = Nginx::start(dir.path()) else {
        return;
    };
    let server = Server::start(dir.path());
    let exe = install_agent(dir.path());
    let _agent = Agent::start_installed_enrolling(&server, &exe, dir.path(), "oslo", &[]);
    let id = enrolled_id(&server, "oslo").await;
    let site = default_site(&server).await;

    let file = publish_quietly(&server, dir.path()).await;
    let root = nginx.root.display().to_string();
    let (ok, out) = run_cli(&server, &["mirror", "sync", &root]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("copied {file}")), "{out}");
    for sidecar in ["sha256", "channel"] {
        assert!(nginx.root.join(format!("{file}.{sidecar}")).exists());
    }
    let (ok, out) = run_cli(&server, &["mirror", "check", &nginx.url]);
    assert!(ok, "{out}");
    let (ok, out) = run_cli(&server, &["mirror", "set", "--site", &site, &nginx.url]);
    assert!(ok, "{out}");
    assert!(out.contains("1 agent affected"), "{out}");
    let (_, sites) = server.api().get("/api/v1/sites").await;
    assert_eq!(sites[0]["download_mirror"], nginx.url.as_str());

    switch_updates(&server, true).await;
    let task = task_reaches(&server, &id, "succeeded").await;
    assert_eq!(task["to_version"], "1.1.0");
    assert_eq!(
        task["transfer"],
        json!({"kind": "full", "bytes": std::fs::metadata(nginx.root.join(&file)).unwrap().len(),
               "source": "mirror", "mirror": nginx.url, "fallback": null, "fallback_error": null}),
        "{task}"
    );
    let fetched = nginx.requests_for(&file);
    assert!(
        fetched.iter().any(|line| line.contains("\" 200 ")),
        "nginx served the build: {fetched:?}"
    );
    assert_eq!(
        metric(&server, "drover_downloads_served_total").await,
        Some(0.0),
        "the server sent none of the build's bytes"
    );
    let listed = mirrors(&server).await;
    let mirror = &listed["mirrors"][0];
    assert_eq!(
        (
            &mirror["url"],
            &mirror["served"],
            &mirror["fell_back"],
            &mirror["failing"]
        ),
        (&json!(nginx.url), &json!(1), &json!(0), &json!(false)),
        "{listed}"
    );
    assert_eq!(mirror["used_by"][0]["scope"], "site");
    assert_eq!(
        metric(
            &server,
            &format!(
                "drover_mirror_downloads{{mirror=\"{}\",result=\"served\"",
                nginx.url
            )
        )
        .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_mirror_copy_is_rejected_and_the_server_serves_the_build() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nginx) = Nginx::start(dir.path()) else {
        return;
    };
    let server = Server::start(dir.path());
    let exe = install_agent(dir.path());
    let _agent = Agent::start_installed_enrolling(&server, &exe, dir.path(), "riga", &[]);
    let id = enrolled_id(&server, "riga").await;
    let site = default_site(&server).await;
    let file = publish_quietly(&server, dir.path()).await;
    let (ok, out) = run_cli(
        &server,
        &["mirror", "sync", &nginx.root.display().to_string()],
    );
    assert!(ok, "{out}");
    // Same length, different bytes: only the digest can tell.
    let copy = nginx.root.join(&file);
    let mut bytes = std::fs::read(&copy).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&copy, &bytes).unwrap();
    let (ok, out) = run_cli(&server, &["mirror", "check", &nginx.url]);
    assert!(!ok, "check must fail on a corrupted copy: {out}");
    assert!(
        out.contains(&format!("PROBLEM    {file}: corrupted")),
        "{out}"
    );
    let (ok, out) = run_cli(&server, &["mirror", "set", "--site", &site, &nginx.url]);
    assert!(ok, "{out}");

    switch_updates(&server, true).await;
    let task = task_reaches(&server, &id, "succeeded").await;
    let transfer = &task["transfer"];
    assert_eq!(
        (
            &transfer["source"],
            &transfer["mirror"],
            &transfer["fallback"]
        ),
        (&json!("server"), &json!(nginx.url), &json!("wrong_bytes")),
        "{task}"
    );
    assert!(
        transfer["fallback_error"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{task}"
    );
    assert!(
        !nginx.requests_for(&file).is_empty(),
        "the mirror was tried"
    );
    assert_eq!(
        metric(&server, "drover_downloads_served_total").await,
        Some(1.0),
        "the server served the build after the fallback"
    );
    // Not the build's fault: the rollout counts no failure and goes on.
    let rollout_id = task["rollout_id"].as_str().unwrap();
    let (_, rollout) = server
        .api()
        .get(&format!("/api/v1/rollouts/{rollout_id}"))
        .await;
    assert_eq!(rollout["failures"]["build"], 0, "{rollout}");
    assert_ne!(rollout["state"], "halted", "{rollout}");
    let listed = mirrors(&server).await;
    let mirror = &listed["mirrors"][0];
    assert_eq!(
        (
            &mirror["served"],
            &mirror["fell_back"],
            &mirror["fallbacks"]
        ),
        (&json!(0), &json!(1), &json!({"wrong_bytes": 1})),
        "{listed}"
    );
    assert_eq!(mirror["last_fallback"]["reason"], "wrong_bytes");
    let (ok, out) = run_cli(&server, &["mirror", "list"]);
    assert!(ok && out.contains("1 (wrong_bytes 1)"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_that_is_down_falls_back_without_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    // The server-wide mirror: a port nobody listens on.
    let down = {
        let probe = TcpListener::bind("127.0.0.1:0").unwrap();
        format!(
            "http://127.0.0.1:{}/drover",
            probe.local_addr().unwrap().port()
        )
    };
    let server = Server::start_with_args(dir.path(), &["--download-url", &down]);
    let exe = install_agent(dir.path());
    let _agent = Agent::start_installed_enrolling(&server, &exe, dir.path(), "kiev", &[]);
    let id = enrolled_id(&server, "kiev").await;
    publish_agent(&server, dir.path(), "1.1.0", "stable");
    let task = task_reaches(&server, &id, "succeeded").await;
    assert_eq!(
        (&task["transfer"]["source"], &task["transfer"]["fallback"]),
        (&json!("server"), &json!("unreachable")),
        "{task}"
    );
    assert_eq!(task["failure_class"], Value::Null);
    assert_eq!(tasks_of(&server, &id).await.len(), 1, "one task, no retry");
    let listed = mirrors(&server).await;
    assert_eq!(listed["download_url"], down.as_str());
    assert_eq!(listed["mirrors"][0]["used_by"][0]["scope"], "server");
    assert_eq!(listed["mirrors"][0]["fallbacks"], json!({"unreachable": 1}));
}

#[tokio::test(flavor = "multi_thread")]
async fn mirror_check_names_each_missing_and_corrupted_build_and_sync_repairs_them() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nginx) = Nginx::start(dir.path()) else {
        return;
    };
    let server = Server::start(dir.path());
    let first = publish(&server.downloads(), "1.1.0", Some("stable"), b"one build");
    let second = publish(&server.downloads(), "1.2.0", Some("beta"), b"another build");
    let (ok, out) = run_cli(&server, &["releases", "rescan"]);
    assert!(ok, "{out}");
    let root = nginx.root.display().to_string();
    let (ok, out) = run_cli(&server, &["mirror", "sync", &root]);
    assert!(ok, "{out}");
    assert!(out.contains("2 builds copied"), "{out}");
    assert_eq!(
        std::fs::read_to_string(nginx.root.join(format!("{second}.channel"))).unwrap(),
        "beta\n"
    );

    std::fs::remove_file(nginx.root.join(&first)).unwrap();
    std::fs::write(nginx.root.join(&second), b"another bui1d").unwrap();
    let (ok, out) = run_cli(&server, &["mirror", "check", &nginx.url]);
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("{first}: missing (404)")), "{out}");
    assert!(out.contains(&format!("{second}: corrupted")), "{out}");
    assert!(out.contains("does not serve 2 of 2"), "{out}");

    // A stale build is kept unless asked; sync repairs what is wrong.
    std::fs::write(nginx.root.join("drover-agent-linux-amd64-0.9.0"), b"old").unwrap();
    let (ok, out) = run_cli(&server, &["mirror", "sync", &root]);
    assert!(ok, "{out}");
    assert!(out.contains("2 builds copied"), "{out}");
    assert!(out.contains("kept drover-agent-linux-amd64-0.9.0"), "{out}");
    let (ok, out) = run_cli(&server, &["mirror", "sync", "--delete", &root]);
    assert!(ok, "{out}");
    assert!(out.contains("0 builds copied"), "{out}");
    assert!(!nginx.root.join("drover-agent-linux-amd64-0.9.0").exists());
    let (ok, out) = run_cli(&server, &["mirror", "check", &nginx.url]);
    assert!(ok, "{out}");
    assert!(
        out.contains("serves all 2 offered builds correctly"),
        "{out}"
    );

    // A mirror URL that is no usable mirror is refused with the reason.
    let site = default_site(&server).await;
    let (ok, out) = run_cli(
        &server,
        &[
            "mirror",
            "set",
            "--site",
            &site,
            "https://u:p@m.example.com",
        ],
    );
    assert!(!ok && out.contains("credentials"), "{out}");
}

/// Download admission counts only downloads this server serves: agents sent to a mirror
/// are all pushed at once, and one takes a slot only when it falls back.
#[tokio::test(flavor = "multi_thread")]
async fn admission_counts_only_the_downloads_that_fall_back_to_the_server() {
    use protocol::{
        AgentMessage, MirrorFailure, Transfer, TransferKind, TransferSource, UpdateProgress,
        UpdateStage,
    };
    let dir = tempfile::tempdir().unwrap();
    // One download slot: two pushes at once (a tenth more, at least one).
    let server = Server::start_with_args(dir.path(), &["--max-concurrent-downloads", "1"]);
    let site = default_site(&server).await;
    let (status, body) = server
        .api()
        .put(
            &format!("/api/v1/sites/{site}/download-mirror"),
            json!({"url": "http://127.0.0.1:9/drover"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut agents = Vec::new();
    for n in 0..4 {
        agents.push(ProtocolAgent::enroll(&server, &format!("fp-adm-{n}"), "1.0.0").await);
    }
    publish(&server.downloads(), "1.1.0", Some("stable"), b"a build");
    let mut tasks = Vec::new();
    for agent in &mut agents {
        let update = agent
            .next_update(Duration::from_secs(20))
            .await
            .expect("every agent sent to the mirror is pushed at once");
        assert!(update.mirror_url.is_some());
        tasks.push(update.task_id);
    }
    // Two of them fall back to the server: both slots are theirs.
    for (agent, task) in agents.iter_mut().zip(&tasks).take(2) {
        agent
            .report(AgentMessage::UpdateProgress(UpdateProgress {
                task_id: task.clone(),
                stage: UpdateStage::Downloading,
                bytes_done: 0,
                bytes_total: 7,
                transfer: Some(Transfer {
                    source: TransferSource::Server,
                    fallback: Some(MirrorFailure::Unreachable),
                    fallback_error: Some("connection refused".into()),
                    kind: TransferKind::Full,
                    bytes: None,
                }),
            }))
            .await;
    }
    for agent in &agents[..2] {
        eventually("the fallback to be recorded", UPDATE_WAIT, || async {
            let newest = tasks_of(&server, &agent.id).await.first()?.clone();
            (newest["status"] == "downloading" && newest["transfer"]["fallback"] == "unreachable")
                .then_some(())
        })
        .await;
    }
    // Without a mirror now, a new agent waits for a slot.
    let (status, _) = server
        .api()
        .put(
            &format!("/api/v1/sites/{site}/download-mirror"),
            json!({"url": null}),
        )
        .await;
    assert_eq!(status, 200);
    let mut late = ProtocolAgent::enroll(&server, "fp-adm-late", "1.0.0").await;
    eventually(
        "the late agent's task to be queued",
        UPDATE_WAIT,
        || async {
            let newest = tasks_of(&server, &late.id).await.first()?.clone();
            (newest["status"] == "queued").then_some(())
        },
    )
    .await;
    assert!(
        late.next_update(Duration::from_secs(2)).await.is_none(),
        "no slot is free while two fallbacks download"
    );
    // One fallback has its bytes: its slot goes to the agent in line.
    agents[0]
        .report(AgentMessage::UpdateProgress(UpdateProgress {
            task_id: tasks[0].clone(),
            stage: UpdateStage::Verifying,
            bytes_done: 7,
            bytes_total: 7,
            transfer: None,
        }))
        .await;
    let update = late
        .next_update(UPDATE_WAIT)
        .await
        .expect("pushed once a slot freed");
    assert_eq!(update.mirror_url, None, "the site's mirror is cleared");
}
