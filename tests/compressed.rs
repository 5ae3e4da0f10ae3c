//! End-to-end: compressed and delta transfer. The server makes a zstd copy of each build
//! once, and deltas to the newest builds from the versions its agents run; real agents
//! download a delta or the copy instead of the build, resume it after a cut, verify what
//! it rebuilds, and fall back (delta, then copy, then the build itself) when one is bad,
//! without failing the update.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

/// A quick level: the tests check the path, not the ratio (BENCHMARKS.md has that).
const LEVEL: &str = "3";

/// Waits until the build of `version` is offered with its compressed copy made.
async fn compressed_release(server: &Server, version: &str) -> Value {
    eventually(
        &format!("{version} to be offered compressed"),
        Duration::from_secs(60),
        || async {
            let (_, releases) = server.api().get("/api/v1/releases").await;
            releases
                .as_array()?
                .iter()
                .find(|r| r["version"] == version && r["compressed_size"].is_u64())
                .cloned()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_is_delivered_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--compression-level", LEVEL]);
    publish_agent(&server, dir.path(), "1.1.0", "stable");
    let release = compressed_release(&server, "1.1.0").await;
    let (size, compressed) = (
        release["size"].as_u64().unwrap(),
        release["compressed_size"].as_u64().unwrap(),
    );
    assert!(compressed < size, "{release}");
    let file = release["file"].as_str().unwrap();

    // The copy is served under the same rules as the build: a grant or a token.
    let url = format!("{}/downloads/{file}.zst", server.url);
    let anonymous = reqwest::get(&url).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let copy = reqwest::Client::new()
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(copy.len() as u64, compressed);

    let exe = install_agent(dir.path());
    let _agent = Agent::start_installed_enrolling(&server, &exe, dir.path(), "romeo", &[]);
    let id = enrolled_id(&server, "romeo").await;
    let task = task_reaches(&server, &id, "succeeded").await;
    installed(&exe, "1.1.0").await;
    assert_eq!(task["transfer"]["kind"], "compressed", "{task}");
    assert_eq!(task["transfer"]["source"], "server", "{task}");
    assert_eq!(task["transfer"]["bytes"], compressed, "{task}");
    assert!(
        std::fs::read(&exe).unwrap() == std::fs::read(dir.path().join("build-1.1.0")).unwrap(),
        "the installed executable is the build, byte for byte"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_compressed_download_resumes_and_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    // Downloads go through a slow CDN; the session goes to the server directly.
    let cdn = Cdn::start(CdnMode::Throttle {
        bytes_per_sec: 1 << 20,
    })
    .await;
    let server = Server::start_with_args(
        dir.path(),
        &["--public-url", &cdn.url, "--compression-level", LEVEL],
    );
    cdn.forward_to(&server.url);
    publish_agent(&server, dir.path(), "1.1.0", "stable");
    let release = compressed_release(&server, "1.1.0").await;
    let compressed = release["compressed_size"].as_u64().unwrap();

    let exe = install_agent(dir.path());
    let mut agent = Agent::start_installed_enrolling(&server, &exe, dir.path(), "sierra", &[]);
    let id = enrolled_id(&server, "sierra").await;
    eventually("a quarter of the copy downloaded", UPDATE_WAIT, || async {
        let served = cdn.served();
        (served.len() == 1 && served[0].bytes > compressed / 4).then_some(())
    })
    .await;
    agent.kill9_all();
    let part = std::fs::read_dir(agent.state_dir.join("staging"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".zst.part"))
        .expect("the compressed copy is downloaded to a .zst.part");
    let held = std::fs::metadata(&part).unwrap().len();
    assert!(held > 0 && held < compressed, "{held} of {compressed}");

    agent.restart();
    let task = task_reaches(&server, &id, "succeeded").await;
    installed(&exe, "1.1.0").await;
    assert_eq!(task["transfer"]["kind"], "compressed", "{task}");
    let served = cdn.served();
    assert_eq!(served.len(), 2, "{served:?}");
    assert_eq!(served[0].range_start, 0);
    assert!(
        served[1].range_start > 0,
        "the second request resumes: {served:?}"
    );
    assert_eq!(
        served[1].range_start + served[1].bytes,
        compressed,
        "only the copy's bytes crossed: {served:?}"
    );
    assert!(
        served.iter().map(|s| s.bytes).sum::<u64>() < release["size"].as_u64().unwrap(),
        "{served:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_compressed_copy_falls_back_to_the_build() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--compression-level", LEVEL]);
    publish_agent(&server, dir.path(), "1.1.0", "stable");
    let release = compressed_release(&server, "1.1.0").await;
    let size = release["size"].as_u64().unwrap();
    // The copy on disk goes bad after it was made (same size, other bytes).
    let copy = dir
        .path()
        .join("data/compressed")
        .join(format!("{}.zst", release["sha256"].as_str().unwrap()));
    let len = std::fs::metadata(&copy).unwrap().len();
    std::fs::write(&copy, vec![0x5a; len as usize]).unwrap();

    let exe = install_agent(dir.path());
    let agent = Agent::start_installed_enrolling(&server, &exe, dir.path(), "tango", &[]);
    let id = enrolled_id(&server, "tango").await;
    let task = task_reaches(&server, &id, "succeeded").await;
    installed(&exe, "1.1.0").await;
    assert_eq!(task["transfer"]["kind"], "full", "{task}");
    assert_eq!(task["transfer"]["bytes"], size, "{task}");
    assert_eq!(
        task["attempts"], 1,
        "one task, not failed and retried: {task}"
    );
    assert!(
        agent.log().contains("the compressed copy failed"),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_copy_is_offered_and_admitted_like_the_build() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--compression-level", LEVEL]);
    let build: Vec<u8> = (0..1 << 20u32).map(|i| (i % 251) as u8).collect();
    let file = publish(&server.downloads(), "1.1.0", Some("stable"), &build);
    let release = compressed_release(&server, "1.1.0").await;
    let mut agent = ProtocolAgent::enroll(&server, "fp-uniform", "1.0.0").await;
    let update = agent
        .next_update(Duration::from_secs(20))
        .await
        .expect("an update");
    let copy = update
        .compressed
        .clone()
        .expect("the update offers the copy");
    assert_eq!(copy.encoding, "zstd");
    assert_eq!(Some(copy.size), release["compressed_size"].as_u64());
    assert!(
        copy.url.contains(&format!("/downloads/{file}.zst?task=")),
        "{}",
        copy.url
    );

    // The update's grant opens the copy; its bytes are the offered digest and decompress
    // to the build; a Range resumes it.
    let http = reqwest::Client::new();
    let bytes = reqwest::get(&copy.url)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), copy.sha256);
    assert!(zstd::decode_all(&bytes[..]).unwrap() == build);
    let tail = http
        .get(&copy.url)
        .header("Range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap()[..], bytes[10..]);

    // A grant is for the name it was made for: the build's does not open the copy.
    let (_, build_grant) = update.url.split_once('?').unwrap();
    let swapped = reqwest::get(format!("{}/downloads/{file}.zst?{build_grant}", server.url))
        .await
        .unwrap();
    assert_eq!(swapped.status(), 403);

    // A rolled-back build's copy is not served either.
    let (status, body) = server
        .api()
        .post("/api/v1/rollouts/1.1.0/rollback", None)
        .await;
    assert!(status == 200 || status == 201, "{status} {body}");
    let blocked = http
        .get(format!("{}/downloads/{file}.zst", server.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(blocked.status(), 403);
}

/// Waits until the build of `version` is offered with its delta from `base` made;
/// answers the release and the delta's size.
async fn delta_release(server: &Server, version: &str, base: &str) -> (Value, u64) {
    eventually(
        &format!("a delta from {base} to {version}"),
        Duration::from_secs(60),
        || async {
            let (_, releases) = server.api().get("/api/v1/releases").await;
            let release = releases
                .as_array()?
                .iter()
                .find(|r| r["version"] == version)?
                .clone();
            let size = release["deltas"]
                .as_array()?
                .iter()
                .find(|d| d["from_version"] == base)?["size"]
                .as_u64()?;
            Some((release, size))
        },
    )
    .await
}

/// An agent that runs the published 1.0.0 build, online; 1.0.1 on beta with its
/// compressed copy and its delta from 1.0.0 made (each in its own time: a delta that
/// fails falls back to the copy). Answers the agent, its id, 1.0.1's release and the
/// delta's size.
async fn running_base_with_delta(
    server: &Server,
    dir: &std::path::Path,
    name: &str,
) -> (Agent, String, Value, u64) {
    publish_agent(server, dir, "1.0.0", "stable");
    let exe = install_agent(dir);
    assert!(
        std::fs::read(&exe).unwrap() == std::fs::read(dir.join("build-1.0.0")).unwrap(),
        "the installed agent is the published 1.0.0 build"
    );
    let agent = Agent::start_installed_enrolling(server, &exe, dir, name, &[]);
    let id = enrolled_id(server, name).await;
    // The fleet now runs 1.0.0: a new build gets a delta from it.
    publish_agent(server, dir, "1.0.1", "beta");
    compressed_release(server, "1.0.1").await;
    let (release, delta) = delta_release(server, "1.0.1", "1.0.0").await;
    (agent, id, release, delta)
}

async fn move_to_beta(server: &Server, id: &str) {
    let (status, body) = server
        .api()
        .put(
            &format!("/api/v1/agents/{id}/channel"),
            serde_json::json!({"channel": "beta"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_patch_release_is_delivered_as_a_delta() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--compression-level", LEVEL]);
    let (_agent, id, release, delta) =
        running_base_with_delta(&server, dir.path(), "uniform").await;
    let compressed = compressed_release(&server, "1.0.1").await["compressed_size"]
        .as_u64()
        .unwrap();
    let size = release["size"].as_u64().unwrap();
    assert!(
        delta * 10 <= compressed,
        "a patch release's delta is at most a tenth of the compressed build: {delta} of {compressed}"
    );

    move_to_beta(&server, &id).await;
    let task = task_reaches(&server, &id, "succeeded").await;
    let exe = dir.path().join("bin/drover-agent");
    installed(&exe, "1.0.1").await;
    assert_eq!(task["transfer"]["kind"], "delta", "{task}");
    assert_eq!(task["transfer"]["source"], "server", "{task}");
    assert_eq!(task["transfer"]["bytes"], delta, "{task}");
    assert!(delta < size);
    assert!(
        std::fs::read(&exe).unwrap() == std::fs::read(dir.path().join("build-1.0.1")).unwrap(),
        "the installed executable is the build, byte for byte"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_delta_falls_back_and_the_update_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--compression-level", LEVEL]);
    let (agent, id, release, _) = running_base_with_delta(&server, dir.path(), "victor").await;
    let compressed = compressed_release(&server, "1.0.1").await["compressed_size"]
        .as_u64()
        .unwrap();
    // The delta on disk goes bad after it was made (same size, other bytes): the server
    // still offers it, with the digest it was made with.
    let deltas: Vec<_> = std::fs::read_dir(dir.path().join("data/deltas"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(release["sha256"].as_str().unwrap())
        })
        .collect();
    assert_eq!(deltas.len(), 1, "{deltas:?}");
    let len = std::fs::metadata(&deltas[0]).unwrap().len();
    std::fs::write(&deltas[0], vec![0x5a; len as usize]).unwrap();

    move_to_beta(&server, &id).await;
    let task = task_reaches(&server, &id, "succeeded").await;
    installed(&dir.path().join("bin/drover-agent"), "1.0.1").await;
    assert_eq!(task["transfer"]["kind"], "compressed", "{task}");
    assert_eq!(task["transfer"]["bytes"], compressed, "{task}");
    assert_eq!(
        task["attempts"], 1,
        "one task, not failed and retried: {task}"
    );
    assert!(agent.log().contains("the delta failed"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_does_not_run_the_base_skips_the_delta() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--compression-level", LEVEL]);
    let (agent, id, _, _) = running_base_with_delta(&server, dir.path(), "whiskey").await;
    // The installed executable is changed behind the agent's back (it still runs): it
    // is no longer the 1.0.0 build the delta starts from.
    let exe = dir.path().join("bin/drover-agent");
    let changed = dir.path().join("bin/drover-agent.changed");
    std::fs::copy(&exe, &changed).unwrap();
    std::io::Write::write_all(
        &mut std::fs::OpenOptions::new()
            .append(true)
            .open(&changed)
            .unwrap(),
        b"\0",
    )
    .unwrap();
    std::fs::rename(&changed, &exe).unwrap();

    move_to_beta(&server, &id).await;
    let task = task_reaches(&server, &id, "succeeded").await;
    installed(&exe, "1.0.1").await;
    assert_eq!(task["transfer"]["kind"], "compressed", "{task}");
    assert_eq!(task["attempts"], 1, "{task}");
    let log = agent.log();
    assert!(
        log.contains("the delta failed") && log.contains("not to the delta's base"),
        "{log}"
    );
    // The base was checked first: the copy is the only download the server began.
    let metrics = server.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|line| line == "drover_downloads_served_total 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delta_is_offered_only_to_an_agent_that_runs_its_base() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--compression-level", LEVEL]);
    // Builds that compress poorly, so only a delta makes them small.
    let base: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
    let mut next = base.clone();
    next[4096..4104].copy_from_slice(b"v1.0.1!!");
    publish(&server.downloads(), "1.0.0", Some("stable"), &base);
    let mut on_base = ProtocolAgent::enroll(&server, "fp-on-base", "1.0.0").await;
    let mut on_other = ProtocolAgent::enroll(&server, "fp-on-other", "0.9.0").await;
    let file = publish(&server.downloads(), "1.0.1", Some("beta"), &next);
    let (_, size) = delta_release(&server, "1.0.1", "1.0.0").await;
    move_to_beta(&server, &on_base.id).await;
    move_to_beta(&server, &on_other.id).await;

    let update = on_base
        .next_update(Duration::from_secs(30))
        .await
        .expect("an update");
    let delta = update.delta.clone().expect("the update offers the delta");
    assert_eq!(delta.encoding, "zstd-patch");
    assert_eq!(delta.base_version, "1.0.0");
    assert_eq!(delta.base_sha256, hex::encode(sha2::Sha256::digest(&base)));
    assert_eq!(delta.size, size);
    assert!(
        delta
            .url
            .contains(&format!("/downloads/{file}.delta-from-1.0.0?task=")),
        "{}",
        delta.url
    );
    // The update's grant opens the delta; with the base it rebuilds the build.
    let bytes = reqwest::get(&delta.url)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), delta.sha256);
    let mut decoder = zstd::stream::read::Decoder::with_ref_prefix(&bytes[..], &base[..]).unwrap();
    decoder.window_log_max(30).unwrap();
    let mut rebuilt = Vec::new();
    std::io::copy(&mut decoder, &mut rebuilt).unwrap();
    assert!(rebuilt == next);
    // A grant is for the name it was made for: the build's does not open the delta.
    let (_, build_grant) = update.url.split_once('?').unwrap();
    let swapped = reqwest::get(format!(
        "{}/downloads/{file}.delta-from-1.0.0?{build_grant}",
        server.url
    ))
    .await
    .unwrap();
    assert_eq!(swapped.status(), 403);

    // An agent on a version with no build here gets no delta.
    let update = on_other
        .next_update(Duration::from_secs(30))
        .await
        .expect("an update");
    assert_eq!(update.delta, None, "{update:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copy_that_cannot_be_made_says_why_and_is_made_once_it_can() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the copies' directory goes: no copy can be written.
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("compressed"), b"in the way").unwrap();
    let server = Server::start_with_args(dir.path(), &["--compression-level", LEVEL]);
    let build: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    publish(&server.downloads(), "1.1.0", Some("stable"), &build);
    let failed = eventually(
        "the failed copy to be reported",
        Duration::from_secs(30),
        || async {
            let (_, releases) = server.api().get("/api/v1/releases").await;
            releases.as_array()?.first()?["compressed_error"]
                .as_str()
                .map(str::to_owned)
        },
    )
    .await;
    assert!(failed.contains("File exists"), "{failed}");
    let (_, releases) = server.api().get("/api/v1/releases").await;
    assert_eq!(releases[0]["compressed_size"], Value::Null, "{releases}");

    // Once the way is clear, the next change of the downloads directory makes it.
    std::fs::remove_file(data.join("compressed")).unwrap();
    publish(
        &server.downloads(),
        "1.2.0",
        Some("stable"),
        &build[..100_000],
    );
    let release = compressed_release(&server, "1.1.0").await;
    assert_eq!(release["compressed_error"], Value::Null, "{release}");
    assert!(release["compressed_size"].as_u64().unwrap() < build.len() as u64);
}
