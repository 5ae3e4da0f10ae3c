//! End-to-end over TLS: the server terminates TLS itself with a certificate from a test
//! CA made here; an agent that pins that CA enrolls and updates itself over `wss://` and
//! `https://`, and agents that trust anything else never get in.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::Value;
use support::*;

/// A CA and a server certificate it signed for 127.0.0.1 and localhost, as PEM files.
struct TestCa {
    ca_cert: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

fn make_ca(dir: &Path, name: &str) -> TestCa {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "drover test server");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &ca).unwrap();

    let made = TestCa {
        ca_cert: dir.join(format!("{name}-ca.pem")),
        server_cert: dir.join(format!("{name}-server.pem")),
        server_key: dir.join(format!("{name}-server.key")),
    };
    std::fs::write(&made.ca_cert, ca.pem()).unwrap();
    std::fs::write(&made.server_cert, server_cert.pem()).unwrap();
    std::fs::write(&made.server_key, server_key.serialize_pem()).unwrap();
    made
}

fn start_tls_server(dir: &Path, ca: &TestCa) -> Server {
    Server::start_tls(dir, &ca.server_cert, &ca.server_key, &ca.ca_cert)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_pinning_the_ca_updates_itself_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "fleet");
    let server = start_tls_server(dir.path(), &ca);
    let banner = std::fs::read_to_string(dir.path().join("server.out")).unwrap();
    assert!(
        banner.contains(&format!("listening on https://127.0.0.1:{}", server.port)),
        "{banner}"
    );
    assert!(
        banner.contains(&format!(
            "agent endpoint:    wss://127.0.0.1:{}/api/v1/agent/ws",
            server.port
        )),
        "{banner}"
    );

    let exe = dir.path().join("bin/drover-agent");
    stamp_agent("1.0.0", &exe);
    let ca_file = ca.ca_cert.to_str().unwrap();
    let agent = Agent::start_installed(
        &server,
        &exe,
        dir.path(),
        "tango",
        &[
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            "fp-tango",
            "--ca-file",
            ca_file,
            "--probation-timeout",
            "30",
        ],
    );
    let id = enrolled_id(&server, "tango").await;

    // The download URL the server hands out is https:// on the TLS port, so the build
    // can only arrive over TLS.
    publish_agent(&server, dir.path(), "1.1.0", "stable");
    let task = task_reaches(&server, &id, "succeeded").await;
    assert_eq!(
        (task["from_version"].as_str(), task["to_version"].as_str()),
        (Some("1.0.0"), Some("1.1.0"))
    );
    let listed = eventually("the listing to show 1.1.0", UPDATE_WAIT, || async {
        let agent = agent_view(&server, "tango").await?;
        (agent["version"] == "1.1.0" && agent["online"] == true).then_some(agent)
    })
    .await;
    assert_eq!(
        listed["id"],
        id.as_str(),
        "the identity survives the update"
    );
    eventually(
        "the installed agent to be 1.1.0",
        Duration::from_secs(10),
        || async { (version_of(&exe) == "1.1.0").then_some(()) },
    )
    .await;
    assert!(
        !agent.log().contains("invalid peer certificate"),
        "{}",
        agent.log()
    );

    // The operator CLI reaches the same server with the same pinned CA.
    let (ok, out) = run_cli(&server, &["agents", "--json"]);
    assert!(ok, "{out}");
    let agents: Value = serde_json::from_str(&out).expect("the CLI prints JSON");
    assert_eq!(agents[0]["version"], "1.1.0", "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_that_do_not_trust_the_servers_ca_never_connect() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "fleet");
    let rogue = make_ca(dir.path(), "rogue");
    let server = start_tls_server(dir.path(), &ca);
    let base = ["--enroll-token", ENROLL_TOKEN];

    // The built-in web roots do not include a private CA.
    let unpinned = Agent::start_with(
        &server,
        dir.path(),
        "unpinned",
        &[&base[..], &["--fingerprint", "fp-unpinned"]].concat(),
    );
    let wrong_ca = Agent::start_with(
        &server,
        dir.path(),
        "wrong-ca",
        &[
            &base[..],
            &[
                "--fingerprint",
                "fp-wrong-ca",
                "--ca-file",
                rogue.ca_cert.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    let _pinned = Agent::start_with(
        &server,
        dir.path(),
        "pinned",
        &[
            &base[..],
            &[
                "--fingerprint",
                "fp-pinned",
                "--ca-file",
                ca.ca_cert.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    enrolled_id(&server, "pinned").await;

    for agent in [&unpinned, &wrong_ca] {
        eventually(
            "the agent to refuse the server's certificate",
            Duration::from_secs(30),
            || async {
                agent
                    .log()
                    .contains("invalid peer certificate")
                    .then_some(())
            },
        )
        .await;
        assert_eq!(agent.stored_id(), None, "it never enrolled");
    }
    let agents = server.api().agents().await.unwrap();
    let names: Vec<&str> = agents
        .iter()
        .filter_map(|a| a["hostname"].as_str())
        .collect();
    assert_eq!(names, ["pinned"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_to_the_tls_port_fails_with_a_clear_answer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "fleet");
    let server = start_tls_server(dir.path(), &ca);

    let (status, body) = server.api().get("/healthz").await;
    assert_eq!((status, &body["status"]), (200, &Value::from("ok")));

    let plain = format!("http://127.0.0.1:{}/healthz", server.port);
    let answer = reqwest::get(&plain).await.expect("the server answers");
    assert_eq!(answer.status(), 400);
    let text = answer.text().await.unwrap();
    assert!(text.contains("https://"), "{text}");

    let socket = format!("ws://127.0.0.1:{}/api/v1/agent/ws", server.port);
    let refused = tokio_tungstenite::connect_async(&socket).await;
    assert!(refused.is_err(), "a plain WebSocket must not connect");

    // Plain requests cost the TLS server nothing: it still serves.
    let (status, _) = server.api().get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_server_with_a_connected_agent_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "fleet");
    let mut server = start_tls_server(dir.path(), &ca);
    let _agent = Agent::start_with(
        &server,
        dir.path(),
        "sierra",
        &[
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            "fp-sierra",
            "--ca-file",
            ca.ca_cert.to_str().unwrap(),
        ],
    );
    enrolled_id(&server, "sierra").await;
    let status = server.terminate();
    assert!(status.success(), "{status:?}\n{}", server.log());
}

#[test]
fn bad_tls_settings_stop_the_server_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = make_ca(dir.path(), "fleet");
    let missing = dir.path().join("missing.pem");
    let cert = ca.server_cert.to_str().unwrap();
    let key = ca.server_key.to_str().unwrap();
    let missing = missing.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--tls-cert", cert], "--tls-key"),
        (&["--tls-key", key], "--tls-cert"),
        (&["--tls-cert", missing, "--tls-key", key], missing),
        // A key where the certificate belongs, and the other way round.
        (&["--tls-cert", key, "--tls-key", cert], key),
    ];
    for (args, expected) in cases {
        let output = Command::new(SERVER_BIN)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--downloads")
            .arg(dir.path().join("downloads"))
            .args(args)
            .env_remove("DROVER_TLS_CERT")
            .env_remove("DROVER_TLS_KEY")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert!(
        !dir.path().join("data").exists(),
        "a bad certificate leaves nothing behind"
    );
}
