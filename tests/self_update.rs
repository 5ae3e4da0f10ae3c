//! End-to-end: real agents apply pushed updates, and no broken, corrupted or interrupted
//! update leaves them without a working agent.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

/// Publishes a "build" that is a shell script: a broken release.
fn publish_script(server: &Server, version: &str, script: &str) {
    publish(
        &server.downloads(),
        version,
        Some("stable"),
        script.as_bytes(),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_beta_agent_updates_itself_to_the_published_beta() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let exe = install_agent(dir.path());
    let _agent = Agent::start_installed(
        &server,
        &exe,
        dir.path(),
        "kilo",
        &[
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            "fp-kilo",
            "--probation-timeout",
            "30",
        ],
    );
    let id = enrolled_id(&server, "kilo").await;
    let (status, _) = server
        .api()
        .put(
            &format!("/api/v1/agents/{id}/channel"),
            json!({"channel": "beta"}),
        )
        .await;
    assert_eq!(status, 200);

    publish_agent(&server, dir.path(), "1.1.0", "beta");
    let task = task_reaches(&server, &id, "succeeded").await;
    assert_eq!(
        (task["from_version"].as_str(), task["to_version"].as_str()),
        (Some("1.0.0"), Some("1.1.0"))
    );

    let listed = eventually("the listing to show 1.1.0", UPDATE_WAIT, || async {
        let agent = agent_view(&server, "kilo").await?;
        (agent["version"] == "1.1.0" && agent["online"] == true).then_some(agent)
    })
    .await;
    assert_eq!(
        listed["id"],
        id.as_str(),
        "the identity survives the update"
    );
    installed(&exe, "1.1.0").await;
    assert_eq!(
        version_of(&exe.with_file_name("drover-agent.prev")),
        "1.0.0",
        "the previous binary is kept"
    );
    let state = dir.path().join("kilo");
    // The journal goes once the new build is promoted, the staging area right after.
    eventually(
        "the journal and the staging area to be cleared",
        Duration::from_secs(10),
        || async {
            (!state.join("update.json").exists() && !state.join("staging").exists()).then_some(())
        },
    )
    .await;
    assert_eq!(server.api().agents().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_corrupted_in_transit_fails_and_the_agent_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let contents = b"#!/bin/sh\nexit 0\n";
    let cdn = Cdn::start(CdnMode::Corrupt {
        size: contents.len() as u64,
    })
    .await;
    let server = Server::start_with_args(dir.path(), &["--public-url", &cdn.url]);
    publish(&server.downloads(), "1.1.0", Some("stable"), contents);
    let exe = install_agent(dir.path());
    let agent = Agent::start_installed(
        &server,
        &exe,
        dir.path(),
        "lima",
        &["--enroll-token", ENROLL_TOKEN, "--fingerprint", "fp-lima"],
    );
    let id = enrolled_id(&server, "lima").await;
    let task = task_reaches(&server, &id, "failed").await;
    assert!(
        task["error"]
            .as_str()
            .unwrap()
            .contains("checksum mismatch"),
        "{task}"
    );
    assert_eq!(
        version_of(&exe),
        "1.0.0",
        "the installed binary is untouched"
    );
    assert!(
        !agent.state_dir.join("staging").exists(),
        "the staging area is clean"
    );
    assert!(!cdn.served().is_empty());
    // Not retried: the failed version stays failed on this agent.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(tasks_of(&server, &id).await.len(), 1);
    assert_eq!(agent_view(&server, "lima").await.unwrap()["online"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_crashes_on_start_is_reverted_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let exe = install_agent(dir.path());
    let _agent = Agent::start_installed(
        &server,
        &exe,
        dir.path(),
        "mike",
        &[
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            "fp-mike",
            "--probation-timeout",
            "30",
        ],
    );
    let id = enrolled_id(&server, "mike").await;
    publish_script(
        &server,
        "1.1.0",
        "#!/bin/sh\necho broken build >&2\nexit 3\n",
    );

    let task = task_reaches(&server, &id, "rolled_back").await;
    assert!(task["error"].as_str().unwrap().contains("exited"), "{task}");
    assert_eq!(version_of(&exe), "1.0.0");
    let agent = eventually("the old version back online", UPDATE_WAIT, || async {
        let agent = agent_view(&server, "mike").await?;
        (agent["online"] == true).then_some(agent)
    })
    .await;
    assert_eq!(agent["version"], "1.0.0");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        tasks_of(&server, &id).await.len(),
        1,
        "a reverted version is not offered again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_never_reaches_the_server_is_reverted_after_probation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let exe = install_agent(dir.path());
    let _agent = Agent::start_installed(
        &server,
        &exe,
        dir.path(),
        "november",
        &[
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            "fp-november",
            "--probation-timeout",
            "3",
        ],
    );
    let id = enrolled_id(&server, "november").await;
    publish_script(&server, "1.1.0", "#!/bin/sh\nexec sleep 600\n");

    let task = task_reaches(&server, &id, "rolled_back").await;
    assert!(
        task["error"].as_str().unwrap().contains("did not connect"),
        "{task}"
    );
    assert_eq!(version_of(&exe), "1.0.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_probation_ends_on_a_consistent_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let exe = install_agent(dir.path());
    let mut agent = Agent::start_installed(
        &server,
        &exe,
        dir.path(),
        "oscar",
        &[
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            "fp-oscar",
            "--probation-timeout",
            "4",
        ],
    );
    let id = enrolled_id(&server, "oscar").await;
    publish_script(&server, "1.1.0", "#!/bin/sh\nexec sleep 600\n");
    let journal = agent.state_dir.join("update.json");
    eventually("the new build on probation", UPDATE_WAIT, || async {
        let text = std::fs::read_to_string(&journal).ok()?;
        text.contains("\"probation\"").then_some(())
    })
    .await;

    // Power cut: supervisor and worker die at once, mid-probation.
    agent.kill9_all();
    agent.restart();
    let task = task_reaches(&server, &id, "rolled_back").await;
    assert!(
        task["error"].as_str().unwrap().contains("did not connect"),
        "{task}"
    );
    assert_eq!(version_of(&exe), "1.0.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_download_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let build = dir.path().join("build-1.1.0");
    stamp_agent("1.1.0", &build);
    let size = std::fs::metadata(&build).unwrap().len();
    // Downloads go through a slow CDN (about 8 s for the build); the session goes to
    // the server directly.
    let cdn = Cdn::start(CdnMode::Throttle {
        bytes_per_sec: size / 8,
    })
    .await;
    let server = Server::start_with_args(dir.path(), &["--public-url", &cdn.url]);
    cdn.forward_to(&server.url);
    let exe = install_agent(dir.path());
    let mut agent = Agent::start_installed(
        &server,
        &exe,
        dir.path(),
        "quebec",
        &["--enroll-token", ENROLL_TOKEN, "--fingerprint", "fp-quebec"],
    );
    let id = enrolled_id(&server, "quebec").await;
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        &std::fs::read(&build).unwrap(),
    );

    eventually("a quarter of the build downloaded", UPDATE_WAIT, || async {
        let served = cdn.served();
        (served.len() == 1 && served[0].bytes > size / 4).then_some(())
    })
    .await;
    agent.kill9_all();
    let staged = std::fs::read_dir(agent.state_dir.join("staging"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum::<u64>();
    assert!(
        staged > 0 && staged < size,
        "a partial download is kept ({staged} of {size} bytes)"
    );

    agent.restart();
    task_reaches(&server, &id, "succeeded").await;
    installed(&exe, "1.1.0").await;
    let served = cdn.served();
    assert_eq!(served.len(), 2, "{served:?}");
    assert_eq!(served[0].range_start, 0);
    assert!(
        served[1].range_start > 0,
        "the second request resumes: {served:?}"
    );
    assert!(
        served[1].bytes < size,
        "fewer bytes the second time: {served:?}"
    );
    assert_eq!(served[1].range_start + served[1].bytes, size);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_auto_update_off_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let exe = install_agent(dir.path());
    let _agent = Agent::start_installed(
        &server,
        &exe,
        dir.path(),
        "papa",
        &[
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            "fp-papa",
            "--no-auto-update",
        ],
    );
    let id = enrolled_id(&server, "papa").await;
    let listed = agent_view(&server, "papa").await.unwrap();
    assert_eq!(listed["auto_update"], false, "shown as pinned by the agent");
    publish_agent(&server, dir.path(), "1.1.0", "stable");
    eventually(
        "the build to be offered",
        Duration::from_secs(10),
        || async {
            let (_, releases) = server.api().get("/api/v1/releases").await;
            (releases.as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(tasks_of(&server, &id).await.is_empty());
    let (_, explain) = server
        .api()
        .get(&format!("/api/v1/agents/{id}/explain"))
        .await;
    assert_eq!(explain["decision"], "hold");
    assert!(
        explain["reason"]
            .as_str()
            .unwrap()
            .contains("auto-update off"),
        "{explain}"
    );
    assert_eq!(version_of(&exe), "1.0.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_install_script_installs_a_verified_agent_that_runs_from_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    publish_agent(&server, dir.path(), "1.2.0", "stable");
    eventually(
        "the build to be offered",
        Duration::from_secs(10),
        || async {
            let (_, releases) = server.api().get("/api/v1/releases").await;
            (releases.as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    let root = dir.path().join("machine");
    // RFC 8032's first test key: any valid ed25519 public key will do here.
    const RELEASE_KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
    let token_file = dir.path().join("enroll-token");
    let script = |extra: &[&str], token: &str| {
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        std::process::Command::new("scripts/install.sh")
            .args(["--server", &server.url, "--no-systemd"])
            .arg("--prefix")
            .arg(root.join("usr"))
            .arg("--config-dir")
            .arg(root.join("etc"))
            .arg("--state-dir")
            .arg(root.join("state"))
            .args(extra)
            .env_remove("DROVER_ENROLL_TOKEN")
            .output()
            .unwrap()
    };
    let token_flag = ["--enroll-token-file", token_file.to_str().unwrap()];
    let install = |extra: &[&str], token: &str| {
        let mut args = vec!["--insecure", token_flag[0], token_flag[1]];
        args.extend_from_slice(extra);
        script(&args, token)
    };
    let refused_with = |output: std::process::Output, reason: &str| {
        assert!(!output.status.success(), "{output:?}");
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(text.contains(reason), "{reason}: {text}");
    };

    refused_with(
        install(&["--public-key", "not-a-key"], ENROLL_TOKEN),
        "64 hex digits",
    );
    refused_with(install(&[], "not-a-token"), "refused");
    // The token never on a command line, where every user reads it in ps.
    refused_with(
        script(
            &["--insecure", "--enroll-token", ENROLL_TOKEN],
            ENROLL_TOKEN,
        ),
        "--enroll-token-file",
    );
    // A plain http:// server only when the operator says so.
    refused_with(script(&token_flag, ENROLL_TOKEN), "--insecure");
    // A pinned key and an unsigned build: the agent could never update, so no install.
    refused_with(
        install(&["--public-key", RELEASE_KEY], ENROLL_TOKEN),
        "is not signed",
    );
    assert!(
        !root.join("usr/bin/drover-agent").exists(),
        "nothing installed"
    );

    // An existing state directory others can read is tightened.
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("state")).unwrap();
    std::fs::set_permissions(root.join("state"), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The token from the environment works as well as from a file.
    let installed = std::process::Command::new("scripts/install.sh")
        .args(["--server", &server.url, "--no-systemd", "--insecure"])
        .arg("--prefix")
        .arg(root.join("usr"))
        .arg("--config-dir")
        .arg(root.join("etc"))
        .arg("--state-dir")
        .arg(root.join("state"))
        .env("DROVER_ENROLL_TOKEN", ENROLL_TOKEN)
        .output()
        .unwrap();
    assert!(installed.status.success(), "{installed:?}");
    let exe = root.join("usr/bin/drover-agent");
    assert_eq!(version_of(&exe), "1.2.0");
    let config = root.join("etc/agent.conf");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(&format!("server = {}", server.url)), "{text}");
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(root.join("state"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700,
        "the state directory is tightened"
    );

    // The installed agent needs nothing but its config file.
    let mut agent = std::process::Command::new(&exe)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--fingerprint", "fp-romeo", "--hostname", "romeo"])
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_ENROLL_TOKEN")
        .env_remove("DROVER_STATE_DIR")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let online = eventually(
        "the installed agent online",
        Duration::from_secs(30),
        || async {
            let agent = agent_view(&server, "romeo").await?;
            (agent["online"] == true).then_some(agent)
        },
    )
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(online["version"], "1.2.0");
    assert!(root.join("state/identity.json").exists());
}
