//! End-to-end: signed releases. A real server that requires signatures, a real agent
//! pinned to a release key, and builds signed with the real `drover keygen` and
//! `drover sign`. Whatever reaches the agent unsigned, altered, signed by another key,
//! relabelled for another platform or replayed is refused, and leaves the installed
//! binary, the stored release counter and the staging area as they were; an operator's
//! rollback signed with `--rollback` and a new counter is installed.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// Runs the real `drover` CLI; panics with its output unless it succeeds.
fn drover(args: &[&str]) -> String {
    let output = Command::new(CLI_BIN)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "drover {args:?} failed: {text}");
    text
}

/// A new key pair from `drover keygen`: the private key file and the public key hex.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let private = dir.join(name);
    drover(&["keygen", "--out", private.to_str().unwrap()]);
    let public = std::fs::read_to_string(dir.join(format!("{name}.pub"))).unwrap();
    (private, public.trim().to_owned())
}

fn sign(file: &Path, key: &Path, counter: u64, rollback: bool) {
    let counter = counter.to_string();
    let mut args = vec![
        "sign",
        file.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--counter",
        &counter,
    ];
    if rollback {
        args.push("--rollback");
    }
    drover(&args);
}

fn build_name(version: &str) -> String {
    format!("drover-agent-linux-amd64-{version}")
}

/// A stamped agent build at `version`, in the test directory.
fn build(dir: &Path, version: &str) -> PathBuf {
    let path = dir.join(format!("build-{version}"));
    if !path.exists() {
        stamp_agent(version, &path);
    }
    path
}

/// Publishes a signed build the way an operator does, with `scripts/publish --key`.
fn publish_signed(server: &Server, dir: &Path, version: &str, key: &Path, counter: u64) {
    let output = Command::new("scripts/publish")
        .arg(build(dir, version))
        .args([version, "stable", "--key"])
        .arg(key)
        .args(["--counter", &counter.to_string()])
        .env("DROVER_DOWNLOADS", server.downloads())
        .env("DROVER_CLI", CLI_BIN)
        .output()
        .unwrap();
    assert!(output.status.success(), "publish failed: {output:?}");
}

/// Copies a build into the downloads directory under its name, without a checksum, so
/// the server does not offer it yet; returns its path there.
fn stage(server: &Server, dir: &Path, version: &str) -> PathBuf {
    let path = server.downloads().join(build_name(version));
    std::fs::copy(build(dir, version), &path).unwrap();
    std::fs::write(
        path.with_file_name(format!("{}.channel", build_name(version))),
        "stable\n",
    )
    .unwrap();
    path
}

/// Writes the checksum of the file as it is now: from here on the server offers it.
/// (This is what anyone with write access to the downloads directory, or a compromised
/// server, can do; only the signature key is out of their reach.)
fn offer(path: &Path) {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()));
    let mut checksum = path.as_os_str().to_owned();
    checksum.push(".sha256");
    std::fs::write(checksum, format!("{digest}\n")).unwrap();
}

/// Removes a build and its sidecars, so later rollbacks cannot pick it.
fn withdraw(server: &Server, version: &str) {
    let name = build_name(version);
    for suffix in ["", ".sha256", ".channel", ".sig"] {
        let _ = std::fs::remove_file(server.downloads().join(format!("{name}{suffix}")));
    }
}

/// Waits for a finished task to `version` with `status`; returns it.
async fn task_to(server: &Server, id: &str, version: &str, status: &str) -> Value {
    eventually(
        &format!("a task to {version} to be {status}"),
        UPDATE_WAIT,
        || async {
            tasks_of(server, id)
                .await
                .into_iter()
                .find(|t| t["to_version"] == version && t["status"] == status)
        },
    )
    .await
}

/// Waits until the executable reports `version` (the supervisor promotes a build once
/// it passed probation) and the update is fully finished.
async fn installed(exe: &Path, state: &Path, version: &str) {
    eventually(
        &format!("{} to be {version}", exe.display()),
        UPDATE_WAIT,
        || async {
            let done = version_of(exe) == version && !state.join("update.json").exists();
            done.then_some(())
        },
    )
    .await;
}

fn stored_counter(state: &Path) -> Option<String> {
    std::fs::read_to_string(state.join("release-counter"))
        .ok()
        .map(|text| text.trim().to_owned())
}

/// A refused update left everything as it was.
fn untouched(exe: &Path, state: &Path, version: &str, counter: &str, label: &str) {
    assert_eq!(version_of(exe), version, "{label}: the installed binary");
    assert_eq!(
        stored_counter(state).as_deref(),
        Some(counter),
        "{label}: the stored counter"
    );
    assert!(
        !state.join("staging").exists(),
        "{label}: the staging area is clean"
    );
    assert!(
        !exe.with_file_name("drover-agent.next").exists(),
        "{label}: nothing staged to run"
    );
}

async fn skipped_reason(server: &Server, file: &str) -> Option<String> {
    let (_, body) = server.api().get("/api/v1/releases?include=skipped").await;
    body["skipped"]
        .as_array()?
        .iter()
        .find(|s| s["file"] == file)
        .and_then(|s| s["reason"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread")]
async fn only_builds_signed_for_this_agent_are_installed_and_never_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (key, public) = keygen(dir, "release.key");
    let (stranger_key, _) = keygen(dir, "stranger.key");
    let server = Server::start_with_args(dir, &["--require-signatures"]);
    std::fs::create_dir_all(server.downloads()).unwrap();

    // With signatures required, an unsigned build is listed as skipped, never offered.
    publish(
        &server.downloads(),
        "1.0.5",
        Some("stable"),
        &std::fs::read(build(dir, "1.0.5")).unwrap(),
    );
    let unsigned = "unsigned build and signatures are required";
    eventually(
        "the unsigned build to be skipped",
        Duration::from_secs(10),
        || async {
            let reason = skipped_reason(&server, &build_name("1.0.5")).await;
            (reason.as_deref() == Some(unsigned)).then_some(())
        },
    )
    .await;

    let exe = dir.join("bin/drover-agent");
    stamp_agent("1.0.0", &exe);
    let agent = Agent::start_installed(
        &server,
        &exe,
        dir,
        "sierra",
        &[
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            "fp-sierra",
            "--public-key",
            &public,
            "--probation-timeout",
            "30",
        ],
    );
    let state = agent.state_dir.clone();
    let id = eventually("the agent online", Duration::from_secs(30), || async {
        let agents = server.api().agents().await?;
        let agent = agents.iter().find(|a| a["hostname"] == "sierra")?;
        (agent["online"] == true).then(|| agent["id"].as_str().unwrap().to_owned())
    })
    .await;

    // A correctly signed build is installed, and its counter stored.
    publish_signed(&server, dir, "1.1.0", &key, 1);
    task_to(&server, &id, "1.1.0", "succeeded").await;
    installed(&exe, &state, "1.1.0").await;
    assert_eq!(stored_counter(&state).as_deref(), Some("1"));

    // Each attack reaches the agent through the real server and is refused.
    struct Attack {
        label: &'static str,
        version: &'static str,
        /// Prepares the staged build and its signature.
        prepare: fn(&Path, &Path, &Path, &Path),
        refusal: &'static str,
    }
    let attacks = [
        Attack {
            label: "a flipped bit",
            version: "1.2.0",
            prepare: |file, key, _, _| {
                sign(file, key, 2, false);
                let mut bytes = std::fs::read(file).unwrap();
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x01;
                std::fs::write(file, bytes).unwrap();
            },
            refusal: "not the signed bytes",
        },
        Attack {
            label: "a truncated file",
            version: "1.3.0",
            prepare: |file, key, _, _| {
                sign(file, key, 3, false);
                let bytes = std::fs::read(file).unwrap();
                std::fs::write(file, &bytes[..bytes.len() - 4096]).unwrap();
            },
            refusal: "not the signed bytes",
        },
        Attack {
            label: "another key",
            version: "1.4.0",
            prepare: |file, _, stranger, _| sign(file, stranger, 4, false),
            refusal: "does not trust",
        },
        Attack {
            label: "a signature for another platform, relabelled",
            version: "1.5.0",
            prepare: |file, key, _, scratch| {
                let arm = scratch.join("drover-agent-linux-arm64-1.5.0");
                std::fs::copy(file, &arm).unwrap();
                sign(&arm, key, 5, false);
                let document =
                    std::fs::read_to_string(scratch.join("drover-agent-linux-arm64-1.5.0.sig"))
                        .unwrap();
                assert!(document.contains("arch: arm64"), "{document}");
                let relabelled = document.replace("arch: arm64", "arch: amd64");
                std::fs::write(
                    file.with_file_name(format!("{}.sig", build_name("1.5.0"))),
                    relabelled,
                )
                .unwrap();
            },
            refusal: "bad signature",
        },
        Attack {
            label: "a replayed counter",
            version: "1.6.0",
            prepare: |file, key, _, _| sign(file, key, 1, false),
            refusal: "counter 1 is not above 1",
        },
    ];
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    for attack in attacks {
        let file = stage(&server, dir, attack.version);
        (attack.prepare)(&file, &key, &stranger_key, &scratch);
        offer(&file);
        let task = task_to(&server, &id, attack.version, "failed").await;
        let error = task["error"].as_str().unwrap_or_default();
        assert!(error.contains(attack.refusal), "{}: {task}", attack.label);
        untouched(&exe, &state, "1.1.0", "1", attack.label);
        withdraw(&server, attack.version);
    }

    // An arm64 signature that is not relabelled never leaves the server.
    let file = stage(&server, dir, "1.5.1");
    let arm = scratch.join("drover-agent-linux-arm64-1.5.1");
    std::fs::copy(&file, &arm).unwrap();
    sign(&arm, &key, 6, false);
    std::fs::copy(
        scratch.join("drover-agent-linux-arm64-1.5.1.sig"),
        file.with_file_name(format!("{}.sig", build_name("1.5.1"))),
    )
    .unwrap();
    offer(&file);
    let misplaced =
        "bad signature file: it signs 1.5.1 linux/arm64, the file name says 1.5.1 linux/amd64";
    eventually(
        "the misplaced signature to be skipped",
        Duration::from_secs(10),
        || async {
            let reason = skipped_reason(&server, &build_name("1.5.1")).await;
            (reason.as_deref() == Some(misplaced)).then_some(())
        },
    )
    .await;
    withdraw(&server, "1.5.1");

    // The agent still takes the next good build.
    publish_signed(&server, dir, "1.7.0", &key, 7);
    task_to(&server, &id, "1.7.0", "succeeded").await;
    installed(&exe, &state, "1.7.0").await;
    assert_eq!(stored_counter(&state).as_deref(), Some("7"));

    // The operator rolls 1.7.0 back. The server offers 1.1.0 with the signature it was
    // released with: an old counter, not a rollback signature. Refused.
    let (status, _) = server
        .api()
        .post("/api/v1/rollouts/1.7.0/rollback", None)
        .await;
    assert_eq!(status, 200);
    let task = task_to(&server, &id, "1.1.0", "failed").await;
    assert_eq!(task["kind"], "rollback", "{task}");
    assert!(
        task["error"]
            .as_str()
            .unwrap_or_default()
            .contains("counter 1 is not above 7"),
        "{task}"
    );
    untouched(
        &exe,
        &state,
        "1.7.0",
        "7",
        "an old signature replayed for a rollback",
    );
    // Refused once, it is not offered again on every heartbeat (one a second here).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let refused = tasks_of(&server, &id)
        .await
        .into_iter()
        .filter(|t| t["to_version"] == "1.1.0" && t["kind"] == "rollback")
        .count();
    assert_eq!(
        refused, 1,
        "one refused rollback task, not one per heartbeat"
    );

    // That build failure halted the rollback rollout. The key holder signs the rollback
    // explicitly, with a new counter, and the operator resumes it: installed.
    let (_, rollouts) = server.api().get("/api/v1/rollouts?version=1.7.0").await;
    let rollback = rollouts
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "rollback")
        .unwrap_or_else(|| panic!("no rollback rollout: {rollouts}"));
    assert_eq!(rollback["state"], "halted", "{rollback}");
    sign(&server.downloads().join(build_name("1.1.0")), &key, 8, true);
    let (status, _) = server.api().post("/api/v1/releases/rescan", None).await;
    assert_eq!(status, 200);
    let (status, body) = server
        .api()
        .post("/api/v1/rollouts/1.7.0/resume", None)
        .await;
    assert_eq!(
        (status, &body["resumed"]),
        (200, &serde_json::json!(1)),
        "{body}"
    );
    eventually("the signed rollback to succeed", UPDATE_WAIT, || async {
        tasks_of(&server, &id)
            .await
            .into_iter()
            .find(|t| t["kind"] == "rollback" && t["status"] == "succeeded")
    })
    .await;
    installed(&exe, &state, "1.1.0").await;
    assert_eq!(stored_counter(&state).as_deref(), Some("8"));
    assert!(!state.join("staging").exists());
    let log = agent.log();
    assert!(log.contains("signature verified"), "{log}");
}

/// Installs the newest stable build with `scripts/install.sh`, pinning `public`, into
/// `root` (binary in `root/usr/bin`) with the state directory `state`.
fn install_script(server: &Server, root: &Path, state: &Path, public: &str) {
    let token_file = root.join("enroll-token");
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(&token_file, ENROLL_TOKEN).unwrap();
    let output = Command::new("scripts/install.sh")
        .args(["--server", &server.url, "--insecure", "--no-systemd"])
        .arg("--enroll-token-file")
        .arg(&token_file)
        .args(["--public-key", public])
        .arg("--prefix")
        .arg(root.join("usr"))
        .arg("--config-dir")
        .arg(root.join("etc"))
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    assert!(output.status.success(), "install.sh failed: {output:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_freshly_installed_agent_knows_its_counter_and_refuses_an_old_rollback_signature() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (key, public) = keygen(dir, "release.key");
    let server = Server::start_with_args(dir, &["--require-signatures"]);
    std::fs::create_dir_all(server.downloads()).unwrap();
    publish_signed(&server, dir, "1.5.0", &key, 16);
    eventually("1.5.0 to be offered", Duration::from_secs(10), || async {
        let (_, releases) = server.api().get("/api/v1/releases").await;
        (releases.as_array()?.len() == 1).then_some(())
    })
    .await;

    // Installed by the script: it checks the signature and records counter 16.
    let machine = dir.join("machine");
    install_script(&server, &machine, &dir.join("tango"), &public);
    let exe = machine.join("usr/bin/drover-agent");
    assert_eq!(version_of(&exe), "1.5.0");
    assert_eq!(stored_counter(&dir.join("tango")).as_deref(), Some("16"));
    // Installed by hand: the same build with the key, but no counter known.
    let by_hand = dir.join("bin/drover-agent");
    stamp_agent("1.5.0", &by_hand);
    let flags = |fingerprint: &'static str| {
        [
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            fingerprint,
            "--public-key",
            public.as_str(),
        ]
    };
    let _tango = Agent::start_installed(&server, &exe, dir, "tango", &flags("fp-tango"));
    let _uniform = Agent::start_installed(&server, &by_hand, dir, "uniform", &flags("fp-uniform"));
    let tango = enrolled_id(&server, "tango").await;
    let uniform = enrolled_id(&server, "uniform").await;

    // A compromised server replays an old build with an old rollback signature
    // (1.3.0, counter 15) as a rollback of 1.5.0.
    let file = stage(&server, dir, "1.3.0");
    sign(&file, &key, 15, true);
    offer(&file);
    eventually("1.3.0 to be offered", Duration::from_secs(10), || async {
        let (_, releases) = server.api().get("/api/v1/releases").await;
        (releases.as_array()?.len() == 2).then_some(())
    })
    .await;
    let (status, body) = server
        .api()
        .post("/api/v1/rollouts/1.5.0/rollback", None)
        .await;
    assert_eq!(status, 200, "{body}");

    for (id, exe, state, refusal) in [
        (
            &tango,
            &exe,
            dir.join("tango"),
            "counter 15 is not above 16",
        ),
        (
            &uniform,
            &by_hand,
            dir.join("uniform"),
            "does not know the release counter",
        ),
    ] {
        let task = task_to(&server, id, "1.3.0", "failed").await;
        assert_eq!(task["kind"], "rollback", "{task}");
        let error = task["error"].as_str().unwrap_or_default();
        assert!(error.contains(refusal), "{task}");
        assert_eq!(version_of(exe), "1.5.0", "still the newer build");
        assert!(!state.join("staging").exists(), "nothing staged");
    }
    assert_eq!(stored_counter(&dir.join("tango")).as_deref(), Some("16"));
    assert_eq!(stored_counter(&dir.join("uniform")), None);
}
