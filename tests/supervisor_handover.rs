//! End-to-end: the supervisor updates itself. A new build's probation runs under its
//! own supervisor, which the old one hands over to in the same process (exec, keeping
//! the PID a service manager watches); a build whose supervisor cannot start is
//! reverted, and the old executable keeps running.

mod support;

use std::path::Path;
use std::time::Duration;

use support::*;

/// The installed agent, enrolling; a probation long enough for a loaded machine.
fn start(server: &Server, exe: &Path, dir: &Path, name: &str) -> Agent {
    Agent::start_installed_enrolling(server, exe, dir, name, &["--probation-timeout", "30"])
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_build_hands_over_and_the_supervisor_runs_the_new_version_in_the_same_process() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let exe = install_agent(dir.path());
    let agent = start(&server, &exe, dir.path(), "oscar");
    let id = enrolled_id(&server, "oscar").await;
    let (pid, version) = supervisor_of(&agent.state_dir).unwrap();
    assert_eq!(version, "1.0.0");

    publish_agent(&server, dir.path(), "1.1.0", "stable");
    let task = task_reaches(&server, &id, "succeeded").await;
    assert_eq!(task["to_version"], "1.1.0");
    let after = eventually(
        "the supervisor to run 1.1.0",
        Duration::from_secs(20),
        || async { supervisor_of(&agent.state_dir).filter(|(_, version)| version == "1.1.0") },
    )
    .await;
    assert_eq!(
        after.0, pid,
        "the new supervisor took over in the same process"
    );
    assert_eq!(version_of(&exe), "1.1.0");
    assert_eq!(
        version_of(&exe.with_file_name("drover-agent.prev")),
        "1.0.0"
    );
    assert!(!exe.with_file_name("drover-agent.next").exists());
    eventually(
        "the journal to be cleared",
        Duration::from_secs(10),
        || async { (!agent.state_dir.join("update.json").exists()).then_some(()) },
    )
    .await;
    let listed = agent_view(&server, "oscar").await.unwrap();
    assert_eq!(listed["version"], "1.1.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_whose_supervisor_cannot_start_is_reverted_and_the_old_one_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let exe = install_agent(dir.path());
    let mut agent = start(&server, &exe, dir.path(), "papa");
    let id = enrolled_id(&server, "papa").await;
    // The server counts the update a success once 1.1.0's worker has heartbeated; the
    // agent, back on 1.0.0, takes it back (the server then records a build failure), and
    // refuses the build should it be offered again before that report lands.

    // 1.1.0's worker is a real agent that would pass probation; its `run` exits at once.
    let worker = dir.path().join("worker-1.1.0");
    stamp_agent("1.1.0", &worker);
    let build = format!(
        "#!/bin/sh\nif [ \"$1\" = worker ]; then exec {} \"$@\"; fi\necho broken supervisor >&2\nexit 3\n",
        worker.display()
    );
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        build.as_bytes(),
    );

    eventually(
        "the handed-over supervisor to exit",
        UPDATE_WAIT,
        || async { agent.log().contains("broken supervisor").then_some(()) },
    )
    .await;
    assert_eq!(
        version_of(&exe),
        "1.0.0",
        "nothing is promoted before the new supervisor takes over"
    );
    // The service manager starts the executable again, as systemd's Restart=always does.
    agent.restart();

    eventually("the old supervisor to revert", UPDATE_WAIT, || async {
        agent
            .log()
            .contains("the new version's supervisor did not take over")
            .then_some(())
    })
    .await;
    assert_eq!(version_of(&exe), "1.0.0");
    assert_eq!(supervisor_of(&agent.state_dir).unwrap().1, "1.0.0");

    // The build ends as a build failure on this agent, whichever way the server learns
    // it: the success taken back (`rolled_back`) or a new offer refused (`failed`).
    let failed = eventually(
        "the build to end as a build failure",
        UPDATE_WAIT,
        || async {
            let tasks = tasks_of(&server, &id).await;
            let ended: Vec<_> = tasks
                .iter()
                .filter(|t| t["to_version"] == "1.1.0")
                .filter(|t| t["status"] == "rolled_back" || t["status"] == "failed")
                .cloned()
                .collect();
            (!ended.is_empty() && tasks.iter().all(|t| t["status"] != "succeeded")).then_some(ended)
        },
    )
    .await;
    for task in &failed {
        assert_eq!(task["failure_class"], "build", "{task}");
        assert!(
            task["error"]
                .as_str()
                .unwrap_or_default()
                .contains("supervisor did not take over"),
            "{task}"
        );
    }
    let listed = eventually("1.0.0 back online", UPDATE_WAIT, || async {
        let agent = agent_view(&server, "papa").await?;
        (agent["online"] == true && agent["version"] == "1.0.0").then_some(agent)
    })
    .await;
    assert_eq!(listed["id"], id.as_str());
    assert_eq!(version_of(&exe), "1.0.0");
    assert!(!exe.with_file_name("drover-agent.next").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_is_not_a_program_fails_its_probation_and_the_supervisor_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let exe = install_agent(dir.path());
    let agent = start(&server, &exe, dir.path(), "quebec");
    let id = enrolled_id(&server, "quebec").await;
    let (pid, _) = supervisor_of(&agent.state_dir).unwrap();

    // Not an executable format: the system refuses to start it at all.
    publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"\x00\x01 not a program\n",
    );
    let task = task_reaches(&server, &id, "rolled_back").await;
    assert!(
        task["error"]
            .as_str()
            .unwrap_or_default()
            .contains("while starting"),
        "{task}"
    );
    let listed = eventually("1.0.0 back online", UPDATE_WAIT, || async {
        let agent = agent_view(&server, "quebec").await?;
        (agent["online"] == true && agent["version"] == "1.0.0").then_some(agent)
    })
    .await;
    assert_eq!(listed["id"], id.as_str());
    assert_eq!(
        supervisor_of(&agent.state_dir).unwrap(),
        (pid, "1.0.0".to_owned()),
        "the same supervisor carried on"
    );
    assert!(!exe.with_file_name("drover-agent.next").exists());
}
