//! End-to-end: hostile network input against the real server. Floods, malformed and
//! oversized frames, enrollment guessing, clients that stop reading, path traversal,
//! huge headers and bodies, and bad JSON on every documented route each get a clear
//! refusal, and the agents that behave keep being served.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{AgentMessage, Heartbeat, RejectCode, ServerMessage};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;

/// How long the server and agents get to do something they do at once.
const SOON: Duration = Duration::from_secs(30);

/// A WebSocket to the server from `source` (any 127.x.y.z address is this machine).
async fn connect_from(server: &Server, source: Ipv4Addr) -> RawSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], server.port)))
        .await
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(server.ws_url(), MaybeTlsStream::Plain(stream))
        .await
        .expect("websocket connects");
    ws
}

/// Sends an enrollment hello from `source`; the server's first answer.
async fn enroll_from(
    server: &Server,
    source: Ipv4Addr,
    token: &str,
    fingerprint: &str,
) -> ServerMessage {
    let mut socket = connect_from(server, source).await;
    let mut hello = hello(fingerprint);
    hello.enroll_token = Some(token.into());
    send(&mut socket, AgentMessage::Hello(hello)).await;
    receive(&mut socket)
        .await
        .expect("the server answers a hello")
}

/// Enrolls from `source` as `enroll_from` does, and answers the welcome as an agent does
/// (a heartbeat), so the server knows the machine has its secret; the welcome, once the
/// server has written that heartbeat (its `last_seen` moved past the enrollment).
async fn enroll_answered_from(
    server: &Server,
    source: Ipv4Addr,
    token: &str,
    fingerprint: &str,
) -> protocol::Welcome {
    let mut socket = connect_from(server, source).await;
    let mut hello = hello(fingerprint);
    hello.enroll_token = Some(token.into());
    send(&mut socket, AgentMessage::Hello(hello)).await;
    let answer = receive(&mut socket).await;
    let Some(ServerMessage::Welcome(welcome)) = answer else {
        panic!("{fingerprint} is enrolled: {answer:?}");
    };
    // A millisecond later than the enrollment, so the heartbeat's write shows.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let beat = AgentMessage::Heartbeat(Heartbeat {
        seq: 1,
        version: "1.0.0".into(),
    });
    send(&mut socket, beat).await;
    let api = server.api();
    eventually("the heartbeat to be written", SOON, || async {
        let (_, agent) = api
            .get(&format!("/api/v1/agents/{}", welcome.agent_id))
            .await;
        (agent["last_seen"] != agent["enrolled_at"]).then_some(())
    })
    .await;
    welcome
}

/// Sends a ping and waits for its pong: proof that the server is reading this session.
async fn ping_answered(socket: &mut RawSocket, round: u8) -> bool {
    let payload = vec![round; 8];
    if socket
        .send(Message::Ping(payload.clone().into()))
        .await
        .is_err()
    {
        return false;
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Pong(got)))) if got.as_ref() == payload.as_slice() => {
                return true;
            }
            Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) | Err(_) => return false,
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn agent_online(api: &Api, id: &str) -> Option<bool> {
    let (status, agent) = api.get(&format!("/api/v1/agents/{id}")).await;
    (status == 200).then(|| agent["online"] == true)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_session_is_closed_while_other_agents_keep_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut steady = ProtocolAgent::enroll(&server, "fp-steady", "1.0.0").await;
    let flooder = ProtocolAgent::enroll(&server, "fp-flood", "1.0.0").await;
    let flooder_id = flooder.id.clone();

    // The flooder writes heartbeats as fast as it can and then reads what it got back.
    let flood = tokio::spawn(async move {
        let (mut sink, mut stream) = flooder.socket.split();
        let mut sent = 0u64;
        for seq in 1..=1_000 {
            let beat = AgentMessage::Heartbeat(Heartbeat {
                seq,
                version: "1.0.0".into(),
            });
            if sink
                .send(Message::Binary(beat.encode().into()))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        let mut reject = None;
        let mut close = None;
        while let Ok(Some(Ok(frame))) =
            tokio::time::timeout(Duration::from_secs(10), stream.next()).await
        {
            match frame {
                Message::Binary(bytes) => {
                    if let Ok(ServerMessage::Reject(r)) = ServerMessage::decode(&bytes) {
                        reject = Some(r);
                    }
                }
                Message::Close(frame) => {
                    close = frame.map(|f| u16::from(f.code));
                    break;
                }
                _ => {}
            }
        }
        (sent, reject, close)
    });

    // Meanwhile the steady agent heartbeats and its pings are answered.
    for round in 0..10 {
        steady.heartbeat().await;
        assert!(
            ping_answered(&mut steady.socket, round).await,
            "the steady session is served during the flood (round {round})"
        );
    }
    let (sent, reject, close) = flood.await.unwrap();
    let reject = reject.expect("the flooder gets a reject");
    assert_eq!(reject.code, RejectCode::RateLimited, "{reject:?}");
    assert!(reject.message.contains("too many frames"), "{reject:?}");
    // The close frame can be lost: the server drops the socket with the rest of the
    // flood unread, which resets the connection.
    if let Some(close) = close {
        assert_eq!(close, 1008, "closed as a policy violation");
    }
    assert!(sent > 40, "the flood got past the burst before the close");

    // Afterwards: the flooder is offline, the steady agent online and still decided on
    // at every heartbeat (a newly published build reaches it).
    eventually(
        "the flooder to go offline",
        Duration::from_secs(15),
        || async { (agent_online(&api, &flooder_id).await == Some(false)).then_some(()) },
    )
    .await;
    publish(&server.downloads(), "1.1.0", Some("stable"), b"build 1.1.0");
    let update = steady
        .next_update(Duration::from_secs(20))
        .await
        .expect("the steady agent is offered the new build");
    assert_eq!(update.version, "1.1.0");
    assert_eq!(agent_online(&api, &steady.id).await, Some(true));
    assert!(server.log().contains("too many frames"));
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_nested_and_oversized_frames_close_only_their_own_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let mut steady = ProtocolAgent::enroll(&server, "fp-steady", "1.0.0").await;

    let golden_heartbeat =
        hex::decode("84a17601a474797065a9686561727462656174a37365712aa776657273696f6ea5312e302e30")
            .unwrap();
    let mut nested =
        b"\x85\xa1v\x01\xa4type\xa9heartbeat\xa3seq\x01\xa7version\xa51.0.0\xa1x".to_vec();
    nested.extend(std::iter::repeat_n(0x91, 50_000));
    nested.push(0x01);
    // What was sent, what it must be refused with, and the close code; the close frame
    // of the last case may be lost, since the server drops the socket with a megabyte
    // unread.
    let cases: Vec<(&str, Vec<u8>, RejectCode, u16)> = vec![
        (
            "a truncated heartbeat",
            golden_heartbeat[..golden_heartbeat.len() - 3].to_vec(),
            RejectCode::MalformedFrame,
            1007,
        ),
        (
            "50,000 nested arrays",
            nested,
            RejectCode::MalformedFrame,
            1007,
        ),
        (
            "a string claiming 4 GB",
            b"\x83\xa1v\x01\xa4type\xa9heartbeat\xa7version\xdb\xff\xff\xff\xffabc".to_vec(),
            RejectCode::MalformedFrame,
            1007,
        ),
        (
            "a frame over the protocol's limit",
            vec![0x90; protocol::MAX_FRAME_BYTES + 1],
            RejectCode::FrameTooLarge,
            1009,
        ),
        (
            "a frame over the WebSocket layer's limit of 1 MiB",
            vec![0x90; 1024 * 1024 + 1],
            RejectCode::FrameTooLarge,
            1009,
        ),
    ];
    for (what, frame, code, close) in cases {
        let mut socket = raw_connect(&server).await;
        send(
            &mut socket,
            AgentMessage::Hello(hello(&format!("fp-{what}"))),
        )
        .await;
        assert!(
            matches!(receive(&mut socket).await, Some(ServerMessage::Welcome(_))),
            "{what}: welcomed first"
        );
        socket.send(Message::Binary(frame.into())).await.unwrap();
        let Some(ServerMessage::Reject(reject)) = receive(&mut socket).await else {
            panic!("{what}: expected a reject");
        };
        assert_eq!(reject.code, code, "{what}: {reject:?}");
        assert!(!reject.message.is_empty(), "{what}");
        match close_frame(&mut socket).await {
            Some((got_close, reason)) => {
                assert_eq!(got_close, close, "{what}: {reason}");
                assert!(reason.len() <= 123, "{what}: close reason fits the limit");
            }
            None => assert_eq!(code, RejectCode::FrameTooLarge, "{what}: no close frame"),
        }
        // The steady agent is read and answered after each.
        steady.heartbeat().await;
        assert!(ping_answered(&mut steady.socket, 1).await, "after {what}");
    }
    assert_eq!(agent_online(&api, &steady.id).await, Some(true));
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_attempts_are_limited_per_source_address() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(
        dir.path(),
        &["--enroll-failure-limit", "3/1h", "--enroll-limit", "6/1h"],
    );
    let api = server.api();
    let guesser = Ipv4Addr::new(127, 0, 0, 2);
    let site = Ipv4Addr::new(127, 0, 0, 3);

    // Three wrong tokens are answered as such; then the address is locked out, even
    // with the right token, while the database is not even asked.
    for i in 0..3 {
        let answer = enroll_from(&server, guesser, "guess", &format!("fp-guess-{i}")).await;
        let ServerMessage::Reject(reject) = answer else {
            panic!("a wrong token is refused: {answer:?}");
        };
        assert_eq!(reject.code, RejectCode::BadEnrollToken);
    }
    for token in ["guess", ENROLL_TOKEN] {
        let answer = enroll_from(&server, guesser, token, "fp-guess-good").await;
        let ServerMessage::Reject(reject) = answer else {
            panic!("a locked-out address is refused: {answer:?}");
        };
        assert_eq!(reject.code, RejectCode::RateLimited, "{reject:?}");
        assert!(
            reject
                .message
                .contains("too many failed enrollment attempts from this address"),
            "{reject:?}"
        );
        assert!(reject.message.contains("retry later"), "{reject:?}");
    }

    // Another address is not affected; it gets six enrollments (one enrolling a
    // machine just enrolled again, which is refused as a fingerprint conflict, counts
    // too), then it is refused for the generous limit.
    let mut enrolled = Vec::new();
    for i in 0..4 {
        let fingerprint = format!("fp-site-{i}");
        match enroll_from(&server, site, ENROLL_TOKEN, &fingerprint).await {
            ServerMessage::Welcome(welcome) => enrolled.push(welcome),
            other => panic!("enrollment {i} is accepted: {other:?}"),
        }
    }
    enrolled.push(enroll_answered_from(&server, site, ENROLL_TOKEN, "fp-site-4").await);
    let answer = enroll_from(&server, site, ENROLL_TOKEN, "fp-site-4").await;
    let ServerMessage::Reject(reject) = answer else {
        panic!("a machine seen a moment ago, with its secret, is not re-bound: {answer:?}");
    };
    assert_eq!(reject.code, RejectCode::FingerprintConflict, "{reject:?}");
    let answer = enroll_from(&server, site, ENROLL_TOKEN, "fp-site-6").await;
    let ServerMessage::Reject(reject) = answer else {
        panic!("the seventh enrollment is refused: {answer:?}");
    };
    assert_eq!(reject.code, RejectCode::RateLimited);
    assert!(
        reject
            .message
            .contains("too many enrollment attempts from this address"),
        "{reject:?}"
    );

    // Enrolled agents reconnect with their credentials from the limited addresses.
    let first = &enrolled[0];
    for source in [site, guesser] {
        let mut socket = connect_from(&server, source).await;
        let mut hello = hello("fp-site-0");
        hello.enroll_token = None;
        hello.agent_id = Some(first.agent_id.clone());
        hello.secret = first.secret.clone();
        send(&mut socket, AgentMessage::Hello(hello)).await;
        assert!(
            matches!(receive(&mut socket).await, Some(ServerMessage::Welcome(_))),
            "credentials are not limited"
        );
    }

    // Refused attempts created nothing: five machines.
    let agents = api.agents().await.unwrap();
    assert_eq!(agents.len(), 5, "{agents:?}");
    assert!(server.log().contains("too many failed enrollment attempts"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_agent_refused_for_too_many_attempts_backs_off_and_enrolls_later() {
    let dir = tempfile::tempdir().unwrap();
    // Two failures at once, then one every 8 seconds: the agent starts well within that.
    let server = Server::start_with_args(dir.path(), &["--enroll-failure-limit", "2/16s"]);
    let here = Ipv4Addr::LOCALHOST;
    for i in 0..2 {
        let answer = enroll_from(&server, here, "guess", &format!("fp-guess-{i}")).await;
        assert!(matches!(answer, ServerMessage::Reject(_)), "{answer:?}");
    }
    let agent = Agent::start(&server, dir.path(), "patient");
    // Its backoff (full jitter, doubling) brings it back after the refill.
    let api = server.api();
    eventually("the agent to enroll", Duration::from_secs(90), || async {
        let agents = api.agents().await?;
        (agents.len() == 1 && agents[0]["online"] == true).then_some(())
    })
    .await;
    assert!(
        agent
            .log()
            .contains("too many failed enrollment attempts from this address"),
        "the agent was refused first and says why:\n{}",
        agent.log()
    );
}

/// A client whose TCP window is tiny and which stops reading after its welcome: the
/// server's writes to it stall.
async fn stalled_client(server: &Server) -> (RawSocket, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], server.port)))
        .await
        .unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(server.ws_url(), MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    send(&mut ws, AgentMessage::Hello(hello("fp-stalled"))).await;
    let Some(ServerMessage::Welcome(welcome)) = receive(&mut ws).await else {
        panic!("expected a welcome");
    };
    (ws, welcome.agent_id)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_dropped_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    // The harness's 1 s heartbeat interval makes the write limit 3 s. A long public URL
    // makes every update about 40 KB, so the kernel's buffers (megabytes on loopback)
    // fill after a few hundred.
    let public_url = format!("http://drover.invalid/{}", "p".repeat(40_000));
    let server = Server::start_with_args(dir.path(), &["--public-url", &public_url]);
    let api = server.api();
    publish(&server.downloads(), "1.1.0", Some("stable"), b"build 1.1.0");
    eventually(
        "the build to be offered",
        Duration::from_secs(15),
        || async {
            let (_, releases) = api.get("/api/v1/releases").await;
            (releases.as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    let (stalled, stalled_id) = stalled_client(&server).await;
    let mut steady = ProtocolAgent::enroll(&server, "fp-steady", "1.0.0").await;

    // It keeps heartbeating, so silence never ends it; it only stops reading.
    let (mut sink, _never_read) = stalled.split();
    let heartbeats = tokio::spawn(async move {
        for seq in 1.. {
            let beat = AgentMessage::Heartbeat(Heartbeat {
                seq,
                version: "1.0.0".into(),
            });
            if sink
                .send(Message::Binary(beat.encode().into()))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });

    // Every "update now" sends it a cancel and a new update: 300 of them are far more
    // than the kernel's buffers hold, so the server's write to it stalls.
    let mut last_beat = tokio::time::Instant::now();
    for _ in 0..300 {
        let (status, body) = api
            .post(&format!("/api/v1/agents/{stalled_id}/update"), None)
            .await;
        assert!(status < 500, "{status} {body}");
        if last_beat.elapsed() > Duration::from_millis(500) {
            steady.heartbeat().await;
            last_beat = tokio::time::Instant::now();
        }
    }
    // It is dropped, while the steady agent stays connected.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while agent_online(&api, &stalled_id).await != Some(false) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled session was never dropped"
        );
        steady.heartbeat().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        server.log().contains("agent stopped reading"),
        "dropped for its stalled writes:\n{}",
        server.log()
    );
    heartbeats.abort();

    // The steady agent noticed nothing.
    steady.heartbeat().await;
    assert!(ping_answered(&mut steady.socket, 7).await);
    assert_eq!(agent_online(&api, &steady.id).await, Some(true));
}

/// One raw HTTP/1.1 request exactly as written (no client normalises the path); the
/// status and the whole answer, or `None` when the server closed without one.
async fn raw_http(server: &Server, request: &[u8]) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.split();
    let write = async {
        // The server may answer and close before reading all of a huge request.
        let _ = writer.write_all(request).await;
        let _ = writer.flush().await;
    };
    let mut answer = Vec::new();
    let read = async {
        let _ =
            tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut answer)).await;
    };
    tokio::join!(write, read);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

/// A GET as an operator (downloads need a grant or an API token): no name reaches
/// outside the offered builds even for a caller allowed to download them.
async fn raw_get(server: &Server, path: &str) -> (u16, String) {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: drover\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
    );
    raw_http(server, request.as_bytes())
        .await
        .unwrap_or_else(|| panic!("GET {path}: no answer"))
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_never_serve_anything_outside_the_offered_builds() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let secret = "top secret outside the downloads directory";
    std::fs::write(dir.path().join("secret.txt"), secret).unwrap();
    let file = publish(
        &server.downloads(),
        "1.1.0",
        Some("stable"),
        b"the real build",
    );
    std::fs::write(server.downloads().join("stray.txt"), secret).unwrap();
    let url_path = format!("/downloads/{file}");
    eventually(
        "the build to be offered",
        Duration::from_secs(15),
        || async { (raw_get(&server, &url_path).await.0 == 200).then_some(()) },
    )
    .await;
    let (_, body) = raw_get(&server, &url_path).await;
    assert!(body.ends_with("the real build"));

    let attempts = [
        "/downloads/../secret.txt".to_owned(),
        "/downloads/..%2fsecret.txt".to_owned(),
        "/downloads/%2e%2e%2fsecret.txt".to_owned(),
        "/downloads/%2E%2E%2Fsecret.txt".to_owned(),
        "/downloads/%2e%2e/secret.txt".to_owned(),
        "/downloads/..%5csecret.txt".to_owned(),
        "/downloads/%252e%252e%252fsecret.txt".to_owned(),
        "/downloads/%c0%ae%c0%ae%2fsecret.txt".to_owned(),
        "/downloads/%2fetc%2fpasswd".to_owned(),
        "/downloads//etc/passwd".to_owned(),
        "/downloads/.".to_owned(),
        "/downloads/..".to_owned(),
        "/downloads/%2e%2e".to_owned(),
        "/downloads/stray.txt".to_owned(),
        format!("/downloads/{file}.sha256"),
        format!("/downloads/{file}.channel"),
        format!("/downloads/{file}%00"),
        format!("/downloads/{file}%00.sha256"),
        format!("/downloads/{file}/..%2f..%2fsecret.txt"),
        format!("/downloads/..%2f{file}"),
        "/downloads/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd".to_owned(),
    ];
    for path in attempts {
        let (status, body) = raw_get(&server, &path).await;
        assert!((400..500).contains(&status), "{path}: {status}\n{body}");
        assert!(!body.contains(secret), "{path} leaked the file");
        assert!(!body.contains("root:"), "{path} leaked /etc/passwd");
    }
    // Malformed names are told so, in the API's error shape.
    let (status, body) = raw_get(&server, "/downloads/..%2fsecret.txt").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"error\":\"bad request\""), "{body}");
    assert!(body.contains("not a file name"), "{body}");
    let (status, _) = raw_get(&server, &url_path).await;
    assert_eq!(status, 200, "the real build is still served");
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_headers_and_bodies_get_4xx_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = reqwest::Client::new();
    let base = &server.url;

    // A 100 KB header is within what the server reads: answered normally.
    let filler = "a".repeat(100 * 1024);
    let response = http
        .get(format!("{base}/api/v1/agents"))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-Filler", &filler)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = http
        .get(format!("{base}/api/v1/agents"))
        .bearer_auth(&filler)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    // Beyond it: refused with 431 (or the connection is closed), never a crash.
    let mut huge = b"GET /api/v1/agents HTTP/1.1\r\nHost: drover\r\nX-Filler: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 2 * 1024 * 1024));
    huge.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    if let Some((status, _)) = raw_http(&server, &huge).await {
        assert_eq!(status, 431);
    }
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: drover\r\n");
    for i in 0..500 {
        many += &format!("X-Header-{i}: {i}\r\n");
    }
    many += "Connection: close\r\n\r\n";
    let (status, _) = raw_http(&server, many.as_bytes()).await.expect("an answer");
    assert_eq!(status, 431, "500 headers");

    // Bodies over the API's limit: 413 in the JSON error shape, for JSON and raw bodies.
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(300 * 1024));
    for path in [
        "/api/v1/clients",
        "/api/v1/agents/some-agent/update",
        "/api/v1/session",
    ] {
        let response = http
            .post(format!("{base}{path}"))
            .bearer_auth(ADMIN_TOKEN)
            .header("Content-Type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413, "{path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "payload too large", "{path}: {body}");
        assert!(body["detail"].is_string(), "{path}: {body}");
    }

    let (status, health) = Api::new(base, "").get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_errors_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/clients", server.url);
    let cases: [(&str, Option<&str>, &str, u16, &str); 6] = [
        (
            "bad JSON",
            Some("application/json"),
            "{\"name\": ",
            400,
            "bad request",
        ),
        (
            "missing field",
            Some("application/json"),
            "{}",
            400,
            "bad request",
        ),
        (
            "wrong type",
            Some("application/json"),
            "{\"name\": 5}",
            400,
            "bad request",
        ),
        (
            "not an object",
            Some("application/json"),
            "[1, 2]",
            400,
            "bad request",
        ),
        (
            "text",
            Some("text/plain"),
            "{\"name\": \"x\"}",
            415,
            "unsupported media type",
        ),
        (
            "no content type",
            None,
            "{\"name\": \"x\"}",
            415,
            "unsupported media type",
        ),
    ];
    for (what, content_type, body, status, error) in cases {
        let mut request = http.post(&url).bearer_auth(ADMIN_TOKEN).body(body);
        if let Some(content_type) = content_type {
            request = request.header("Content-Type", content_type);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{what}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], error, "{what}: {answer}");
        assert!(
            answer["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}: {answer}"
        );
    }
    // A method a route does not have, too.
    let response = http
        .delete(format!("{}/api/v1/releases", server.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert!(response.headers().contains_key("allow"));
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"], "method not allowed", "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_route_answers_hostile_requests_without_a_server_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let (status, document) = api.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    // A fresh connection per request: one the server closed after an oversized body
    // must not fail the next request.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let oversized = format!("{{\"x\": \"{}\"}}", "x".repeat(300 * 1024));
    let bodies: [(&str, &str); 8] = [
        ("application/json", "{"),
        ("application/json", "{}"),
        ("application/json", "null"),
        (
            "application/json",
            "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
        ),
        (
            "application/json",
            "{\"name\": 5, \"version\": [], \"role\": {}, \"channel\": 1e999}",
        ),
        ("text/plain", "hello"),
        ("application/x-www-form-urlencoded", "name=x&version=1"),
        ("application/json", &oversized),
    ];
    let mut calls = 0;
    let routes = document["paths"].as_object().unwrap();
    let parameters = ["x", "..%2f%00%ff"];
    for (path, item) in routes
        .iter()
        .flat_map(|route| parameters.map(|p| (route, p)))
        .map(|((path, item), parameter)| {
            let path = path
                .split('/')
                .map(|s| if s.starts_with('{') { parameter } else { s })
                .collect::<Vec<_>>()
                .join("/");
            (path, item)
        })
    {
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_none() {
                continue;
            }
            for token in [Some(ADMIN_TOKEN), Some("wrong-token"), None] {
                for (content_type, body) in bodies {
                    let mut request = http
                        .request(
                            method.to_uppercase().parse().unwrap(),
                            format!("{}{path}", server.url),
                        )
                        .header("Content-Type", content_type)
                        .body(body.to_owned());
                    if let Some(token) = token {
                        request = request.bearer_auth(token);
                    }
                    calls += 1;
                    let response = match request.send().await {
                        Ok(response) => response,
                        // A route that reads no body may answer before the client has
                        // sent it all, and close; the server must still be there.
                        Err(err) if body.len() > 1024 => {
                            let (status, _) = Api::new(&server.url, "").get("/healthz").await;
                            assert_eq!(status, 200, "{method} {path}: {err}");
                            continue;
                        }
                        Err(err) => panic!("{method} {path}: no answer: {err:?}"),
                    };
                    let status = response.status().as_u16();
                    assert!(
                        status < 500,
                        "{method} {path} ({content_type}, token {token:?}): {status}"
                    );
                    // The event stream answers 200 and never ends; everything else is read.
                    if status >= 400 {
                        let answer: Value = response.json().await.unwrap_or_else(|e| {
                            panic!("{method} {path}: {status} without a JSON body: {e}")
                        });
                        assert!(answer["error"].is_string(), "{method} {path}: {answer}");
                    }
                }
            }
        }
    }
    assert!(calls > 200, "the document lists the routes ({calls} calls)");
    // Still serving, with nothing created or broken by the garbage.
    let (status, health) = Api::new(&server.url, "").get("/healthz").await;
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, clients) = api.get("/api/v1/clients").await;
    assert_eq!(status, 200);
    assert_eq!(clients.as_array().map(Vec::len), Some(1), "{clients}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_text_that_is_too_long_or_holds_control_characters_is_refused_and_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    type Change = Box<dyn Fn(&mut protocol::Hello)>;
    let cases: [(&str, Change, &str); 4] = [
        (
            "fp-long",
            Box::new(|h| h.hostname = "h".repeat(60_000)),
            "hostname is 60000 bytes long",
        ),
        (
            "fp-newline",
            Box::new(|h| h.hostname = "web-1\n2026-11-29T00:00:00Z  INFO forged".into()),
            "hostname holds control characters",
        ),
        (
            "fp-ansi",
            Box::new(|h| h.version = "1.0.0\u{1b}[31m".into()),
            "version holds control characters",
        ),
        (
            "fp-fat",
            Box::new(|h| h.fingerprint = "f".repeat(129)),
            "fingerprint is 129 bytes long",
        ),
    ];
    for (fingerprint, change, why) in cases {
        let mut socket = raw_connect(&server).await;
        let mut hello = hello(fingerprint);
        change(&mut hello);
        send(&mut socket, AgentMessage::Hello(hello)).await;
        match receive(&mut socket).await {
            Some(ServerMessage::Reject(reject)) => {
                assert_eq!(reject.code, RejectCode::MalformedFrame, "{fingerprint}");
                assert!(
                    reject.message.contains(why),
                    "{fingerprint}: {}",
                    reject.message
                );
            }
            other => panic!("{fingerprint}: expected a reject, got {other:?}"),
        }
    }
    assert_eq!(api.agents().await.unwrap().len(), 0, "nothing was stored");
    assert!(!server.log().contains("forged"), "the text reached the log");

    // A heartbeat whose version the hello would refuse is ignored: the version stays.
    let mut agent = ProtocolAgent::enroll(&server, "fp-fine", "1.0.0").await;
    agent.version = "2.0.0\u{7}".into();
    agent.heartbeat().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listed = api.agents().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["version"], "1.0.0", "{listed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn links_in_the_downloads_directory_publish_nothing_and_reveal_no_digest() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let downloads = server.downloads();
    // Any file the server can read, such as a token in its data directory.
    let secret = dir.path().join("data").join("a-secret");
    std::fs::write(&secret, "secret-0123456789abcdef").unwrap();

    // A build that is a link to the admin token, with a .sha256 claiming some digest: it
    // is skipped as a link, and no skip reason holds a digest of the file.
    let linked = "drover-agent-linux-amd64-9.9.9";
    std::os::unix::fs::symlink(&secret, downloads.join(linked)).unwrap();
    std::fs::write(
        downloads.join(format!("{linked}.sha256")),
        format!("{}  {linked}\n", "0".repeat(64)),
    )
    .unwrap();
    // And one whose bytes do not match its digest: the reason names only the expected one.
    publish(&downloads, "1.0.0", Some("stable"), b"a real build");
    std::fs::write(
        downloads.join("drover-agent-linux-amd64-1.0.0"),
        b"other bytes",
    )
    .unwrap();
    let (status, listing) = api.post("/api/v1/releases/rescan", None).await;
    assert_eq!(status, 200, "{listing}");
    let skipped = listing["skipped"].as_array().unwrap();
    let reason = |file: &str| {
        skipped
            .iter()
            .find(|s| s["file"] == file)
            .map(|s| s["reason"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("{file} not skipped: {listing}"))
    };
    assert!(reason(linked).starts_with("a symbolic link"), "{listing}");
    use sha2::Digest;
    let revealing = [
        hex::encode(sha2::Sha256::digest(std::fs::read(&secret).unwrap())),
        hex::encode(sha2::Sha256::digest(b"other bytes")),
    ];
    let text = listing.to_string();
    for digest in &revealing {
        assert!(
            !text.contains(digest.as_str()),
            "a file's digest is shown: {text}"
        );
    }
    assert!(reason("drover-agent-linux-amd64-1.0.0").starts_with("checksum mismatch"));

    // A build offered, then swapped for a link after the scan: never served.
    publish(
        &downloads,
        "1.1.0",
        Some("stable"),
        b"the build that was hashed",
    );
    let (_, listing) = api.post("/api/v1/releases/rescan", None).await;
    assert!(
        listing["releases"].to_string().contains("1.1.0"),
        "{listing}"
    );
    let file = downloads.join("drover-agent-linux-amd64-1.1.0");
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(&secret, &file).unwrap();
    let answer = reqwest::Client::new()
        .get(format!(
            "{}/downloads/drover-agent-linux-amd64-1.1.0",
            server.url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
    let body = answer.text().await.unwrap();
    assert!(
        !body.contains(&std::fs::read_to_string(&secret).unwrap()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_are_json_objects_never_arrays_of_positional_fields() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let (_, sites) = api.get("/api/v1/sites").await;
    let site = sites[0]["id"].as_str().unwrap().to_owned();
    for (path, body) in [
        (
            "/api/v1/tokens".to_owned(),
            serde_json::json!(["x", "viewer"]),
        ),
        (
            format!("/api/v1/sites/{site}/enrollment-tokens"),
            serde_json::json!([null, null]),
        ),
        ("/api/v1/clients".to_owned(), serde_json::json!(["acme"])),
        (
            "/api/v1/rollouts/1.0.0/promote".to_owned(),
            serde_json::json!([null, null, true]),
        ),
        ("/api/v1/clients".to_owned(), serde_json::json!("acme")),
    ] {
        let (status, answer) = api.post(&path, Some(body.clone())).await;
        assert_eq!(status, 400, "{path} {body}: {answer}");
        assert_eq!(
            answer["detail"], "the body must be a JSON object",
            "{path}: {answer}"
        );
    }
    let (_, tokens) = api.get("/api/v1/tokens").await;
    assert_eq!(
        tokens.as_array().unwrap().len(),
        1,
        "only the admin token: {tokens}"
    );
    let (_, clients) = api.get("/api/v1/clients").await;
    assert_eq!(clients.as_array().unwrap().len(), 1, "{clients}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_stream_ends_when_its_token_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let api = server.api();
    let (status, created) = api
        .post(
            "/api/v1/tokens",
            Some(serde_json::json!({"name": "wallboard", "role": "viewer"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    let mut stream = reqwest::Client::new()
        .get(format!("{}/api/v1/events", server.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream opens")
        .expect("a first chunk")
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("drover events"));

    // Still delivering while the token holds.
    let _agent = ProtocolAgent::enroll(&server, "fp-watched-live", "1.0.0").await;
    let note = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a note about the new agent")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&note).contains("\"kind\":\"agent\""));

    let (status, body) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream of a revoked token kept going");
}

/// Writes an agent config file holding the server and the enrollment token.
fn agent_config(server: &Server, path: &std::path::Path) {
    std::fs::write(
        path,
        format!(
            "# written by the test\nserver = {}\nenroll-token = {ENROLL_TOKEN}\n",
            server.url
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_agents_fingerprint_cannot_be_taken_over_and_clones_do_not_flap() {
    let dir = tempfile::tempdir().unwrap();
    // Re-binding is allowed 3 s after the record went quiet, so the test can see it.
    let server = Server::start_with_args(dir.path(), &["--rebind-after", "3s"]);
    let api = server.api();
    let config = dir.path().join("alpha.conf");
    agent_config(&server, &config);
    let mut alpha = Agent::start_with(
        &server,
        dir.path(),
        "alpha",
        &[
            "--config",
            config.to_str().unwrap(),
            "--fingerprint",
            "fp-shared",
        ],
    );
    let listed = all_online(&api, 1).await;
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    // Enrolled, the agent forgets its token: gone from its config file, the rest kept.
    let kept = eventually("the token to leave the config file", SOON, || async {
        let text = std::fs::read_to_string(&config).ok()?;
        (!text.contains("enroll-token")).then_some(text)
    })
    .await;
    assert!(kept.contains(&format!("server = {}", server.url)), "{kept}");
    assert!(
        alpha.log().contains("removed the enrollment token"),
        "{}",
        alpha.log()
    );

    // A clone with the same fingerprint and a valid token is refused while alpha lives,
    // again and again, and never disturbs it.
    let clone = Agent::start_with(
        &server,
        dir.path(),
        "clone",
        &["--enroll-token", ENROLL_TOKEN, "--fingerprint", "fp-shared"],
    );
    let answer = enroll_from(&server, Ipv4Addr::LOCALHOST, ENROLL_TOKEN, "fp-shared").await;
    let ServerMessage::Reject(reject) = answer else {
        panic!("a live agent's fingerprint does not enroll: {answer:?}");
    };
    assert_eq!(reject.code, RejectCode::FingerprintConflict, "{reject:?}");
    assert!(reject.message.contains(&id), "{reject:?}");
    eventually("the clone to be refused twice", SOON, || async {
        (clone.log().matches("FingerprintConflict").count() >= 2).then_some(())
    })
    .await;
    let (_, agent) = api.get(&format!("/api/v1/agents/{id}")).await;
    assert_eq!(agent["online"], true, "{agent}");
    assert_eq!(agent["hostname"], "alpha", "{agent}");
    let conflict = &agent["fingerprint_conflict"];
    assert!(conflict["attempts"].as_i64().unwrap() >= 3, "{agent}");
    assert!(conflict["last_at"].is_string(), "{agent}");
    assert!(
        ["clone", "fp-shared"].contains(&conflict["hostname"].as_str().unwrap()),
        "{agent}"
    );
    assert_eq!(api.agents().await.unwrap().len(), 1);
    assert_eq!(clone.stored_id(), None, "the clone got no identity");
    assert_eq!(
        alpha.log().matches("connected to").count(),
        1,
        "alpha kept its one session: {}",
        alpha.log()
    );
    let (_, audit) = api
        .get("/api/v1/audit?action=agent.fingerprint_conflict")
        .await;
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "audited once per conflict: {audit}");
    assert_eq!(entries[0]["target"], id.as_str());
    assert!(server.log().contains("fingerprint conflict"));

    // A machine whose record has been offline a while is re-bound (a reinstall).
    drop(clone);
    alpha.kill9_all();
    eventually("alpha to be offline", SOON, || async {
        let (_, agent) = api.get(&format!("/api/v1/agents/{id}")).await;
        (agent["online"] == false).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let answer = enroll_from(&server, Ipv4Addr::LOCALHOST, ENROLL_TOKEN, "fp-shared").await;
    let ServerMessage::Welcome(welcome) = answer else {
        panic!("a quiet record is re-bound: {answer:?}");
    };
    assert_eq!(welcome.agent_id, id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_machine_whose_welcome_was_lost_enrolls_again_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // The default `--rebind-after` (10 minutes): a record seen that recently is live
    // once its agent has shown it holds the secret.
    let server = Server::start(dir.path());
    let api = server.api();
    // The server enrolls the machine, but the welcome with its secret never reaches the
    // agent, which gave up waiting: nothing ever answers it.
    let answer = enroll_from(&server, Ipv4Addr::LOCALHOST, ENROLL_TOKEN, "fp-lost").await;
    let ServerMessage::Welcome(lost) = answer else {
        panic!("the machine is enrolled: {answer:?}");
    };
    eventually("the unanswered session to end", SOON, || async {
        (agent_online(&api, &lost.agent_id).await == Some(false)).then_some(())
    })
    .await;

    // The machine's agent enrolls again at once, re-bound to the same record.
    let agent = Agent::start_with(
        &server,
        dir.path(),
        "lost",
        &["--enroll-token", ENROLL_TOKEN, "--fingerprint", "fp-lost"],
    );
    let listed = all_online(&api, 1).await;
    assert_eq!(listed[0]["id"], lost.agent_id.as_str(), "{listed:?}");
    assert_eq!(agent.stored_id().as_deref(), Some(lost.agent_id.as_str()));
    assert!(
        !agent.log().contains("FingerprintConflict"),
        "never refused: {}",
        agent.log()
    );
    let (_, audit) = api.get("/api/v1/audit?action=agent.reenroll").await;
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1, "{audit}");

    // This agent answered its welcome: a clone of the machine is refused now.
    let answer = enroll_from(&server, Ipv4Addr::LOCALHOST, ENROLL_TOKEN, "fp-lost").await;
    let ServerMessage::Reject(reject) = answer else {
        panic!("a machine whose agent has its secret is not re-bound: {answer:?}");
    };
    assert_eq!(reject.code, RejectCode::FingerprintConflict, "{reject:?}");
    let (_, agent_now) = api.get(&format!("/api/v1/agents/{}", lost.agent_id)).await;
    assert_eq!(agent_now["online"], true, "{agent_now}");
}

/// A TCP connection from `source` with a small receive buffer, so a peer that stops
/// reading stalls the server's writes soon.
async fn tcp_from(server: &Server, source: Ipv4Addr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], server.port)))
        .await
        .unwrap()
}

/// Whether the server closed (or reset) the connection within `within`: a read that
/// ends rather than waits.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// The status of a GET of `url` as an operator.
async fn status_of(url: &str, token: Option<&str>) -> u16 {
    let mut request = reqwest::Client::new().get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_are_served_only_with_a_grant_for_a_live_task_or_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let mut agent = ProtocolAgent::enroll(&server, "fp-granted", "1.0.0").await;
    let file = publish(&server.downloads(), "1.1.0", Some("stable"), b"the build");
    let update = agent
        .next_update(Duration::from_secs(10))
        .await
        .expect("an update");
    assert!(
        update.url.contains(&format!("/downloads/{file}?")),
        "{}",
        update.url
    );

    // The update's URL serves the build, resumes included.
    let http = reqwest::Client::new();
    let whole = http.get(&update.url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.bytes().await.unwrap().as_ref(), b"the build");
    let resumed = http
        .get(&update.url)
        .header("Range", "bytes=4-")
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 206);
    assert_eq!(resumed.bytes().await.unwrap().as_ref(), b"build");

    // Without a grant: only an API token will do.
    let bare = format!("{}/downloads/{file}", server.url);
    assert_eq!(status_of(&bare, None).await, 401);
    assert_eq!(status_of(&bare, Some("not-a-token")).await, 401);
    assert_eq!(status_of(&bare, Some(ADMIN_TOKEN)).await, 200);
    // A grant is for its file and task only, and cannot be forged.
    let forged = format!(
        "{}{}",
        &update.url[..update.url.len() - 1],
        if update.url.ends_with('0') { '1' } else { '0' }
    );
    assert_eq!(status_of(&forged, None).await, 403);
    let other = publish(&server.downloads(), "1.0.5", Some("stable"), b"another");
    let other_url = format!("{}/downloads/{other}", server.url);
    eventually(
        "another build to be offered",
        Duration::from_secs(10),
        || async { (status_of(&other_url, Some(ADMIN_TOKEN)).await == 200).then_some(()) },
    )
    .await;
    let elsewhere = update.url.replace(&file, &other);
    assert_eq!(status_of(&elsewhere, None).await, 403);
    let other_task = update.url.replace(&update.task_id, "some-other-task");
    assert_eq!(status_of(&other_task, None).await, 403);

    // Once the task has ended, its URL serves nothing more.
    agent
        .report(AgentMessage::UpdateResult(protocol::UpdateResult {
            task_id: update.task_id.clone(),
            outcome: protocol::UpdateOutcome::Failed,
            version: "1.0.0".into(),
            error: Some("gave up".into()),
            failure_class: Some(protocol::FailureClass::Transient),
            transfer: None,
        }))
        .await;
    eventually(
        "the ended task's URL to be refused",
        Duration::from_secs(10),
        || async { (status_of(&update.url, None).await == 403).then_some(()) },
    )
    .await;

    // The install endpoint hands out a URL of its own, for an enrollment token holder.
    let install: Value = http
        .get(format!(
            "{}/api/v1/agent/install?os=linux&arch=amd64",
            server.url
        ))
        .bearer_auth(ENROLL_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = install["url"].as_str().unwrap();
    assert!(url.contains("until="), "{install}");
    assert_eq!(status_of(url, None).await, 200);
    let tampered = url.replace("until=", "until=9");
    assert_eq!(status_of(&tampered, None).await, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_stop_reading_lose_their_download_slots_and_no_address_takes_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(
        dir.path(),
        &[
            "--max-concurrent-downloads",
            "3",
            "--max-downloads-per-address",
            "2",
            "--write-timeout",
            "2s",
        ],
    );
    // Large enough that a client that never reads stalls the server's writes.
    let build: Vec<u8> = (0..48 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let file = publish(&server.downloads(), "1.1.0", Some("stable"), &build);
    drop(build);
    let bare = format!("{}/downloads/{file}", server.url);
    eventually(
        "the build to be offered",
        Duration::from_secs(30),
        || async { (status_of(&bare, Some(ADMIN_TOKEN)).await == 200).then_some(()) },
    )
    .await;
    let request = format!(
        "GET /downloads/{file} HTTP/1.1\r\nHost: drover\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
    );
    let stall = |source: Ipv4Addr| {
        let request = request.clone();
        let server = &server;
        async move {
            let mut stream = tcp_from(server, source).await;
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut head = [0u8; 12];
            stream.read_exact(&mut head).await.unwrap();
            assert_eq!(&head, b"HTTP/1.1 200", "a stalled download starts");
            stream
        }
    };
    // Two stalled downloads from one address: its share is taken, others still get one.
    let mut first = stall(Ipv4Addr::new(127, 0, 0, 2)).await;
    let mut second = stall(Ipv4Addr::new(127, 0, 0, 2)).await;
    let mut third = tcp_from(&server, Ipv4Addr::new(127, 0, 0, 2)).await;
    third.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    third.read_exact(&mut head).await.unwrap();
    assert_eq!(
        &head, b"HTTP/1.1 503",
        "one address holds at most two downloads"
    );
    drop(third);
    let mut elsewhere = stall(Ipv4Addr::new(127, 0, 0, 3)).await;

    // None of them reads: within the write timeout the server drops them all, and
    // their slots serve a download that does read.
    for stream in [&mut first, &mut second, &mut elsewhere] {
        assert!(
            closed_within(stream, Duration::from_secs(20)).await,
            "a download that makes no progress is dropped"
        );
    }
    let response = reqwest::Client::new()
        .get(&bare)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().len(), 48 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_half_sent_and_idle_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(dir.path(), &["--header-timeout", "2s"]);
    let source = Ipv4Addr::new(127, 0, 0, 4);
    // Half a request, never finished: closed after the header timeout.
    let mut half = tcp_from(&server, source).await;
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: dro")
        .await
        .unwrap();
    // A finished request, then nothing: the idle keep-alive connection is closed too.
    let mut idle = tcp_from(&server, source).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: drover\r\n\r\n")
        .await
        .unwrap();
    // A connection that sends nothing at all.
    let mut silent = tcp_from(&server, source).await;
    for stream in [&mut half, &mut idle, &mut silent] {
        assert!(
            closed_within(stream, Duration::from_secs(10)).await,
            "the server closes a connection that sends no request"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_address_holds_every_connection_and_the_server_keeps_below_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_args(
        dir.path(),
        &[
            "--max-connections",
            "40",
            "--max-connections-per-address",
            "10",
        ],
    );
    let source = Ipv4Addr::new(127, 0, 0, 4);
    // One address holds at most ten connections; the eleventh is closed at once, while
    // another address is still served.
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(tcp_from(&server, source).await);
    }
    let mut refused = tcp_from(&server, source).await;
    let _ = refused
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: drover\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), refused.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let mut other = tcp_from(&server, Ipv4Addr::new(127, 0, 0, 5)).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: drover\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    other.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Up to the server's cap of forty, then none from anywhere until some close.
    for i in 0..30u8 {
        held.push(tcp_from(&server, Ipv4Addr::new(127, 0, 1, i)).await);
    }
    let mut full = tcp_from(&server, Ipv4Addr::new(127, 0, 2, 1)).await;
    let _ = full
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: drover\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), full.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    drop(held);
    // Until the server has seen the closes, a new connection is still over the cap and
    // closed at once.
    eventually(
        "the server to serve again",
        Duration::from_secs(10),
        || async {
            let answer = reqwest::get(format!("{}/healthz", server.url)).await.ok()?;
            (answer.status() == 200).then_some(())
        },
    )
    .await;
}

/// A server started by `sh` with its open-files limit set by `ulimit ARGS` first; its
/// process and port. Killed by the caller.
fn server_under_ulimit(dir: &std::path::Path, ulimit: &str) -> (std::process::Child, u16) {
    use std::io::BufRead;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit {ulimit} && exec \"$0\" \"$@\""))
        .arg(SERVER_BIN)
        .args(["--listen", "127.0.0.1:0", "--header-timeout", "60s"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--downloads")
        .arg(dir.join("downloads"))
        .env_remove("DROVER_ADMIN_TOKEN")
        .env_remove("DROVER_ENROLL_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.join("server.log")).unwrap())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    // Read the whole banner (and anything after it): a server writing to a closed
    // pipe would stop.
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if let Some(addr) = line.split("listening on http://").nth(1) {
                let _ = tx.send(addr.rsplit(':').next().unwrap().trim().parse::<u16>().ok());
            }
        }
    });
    let port = rx.recv_timeout(Duration::from_secs(30)).ok().flatten();
    let port = port.unwrap_or_else(|| {
        panic!(
            "the server did not start: {}",
            std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
        )
    });
    (child, port)
}

/// `(soft, hard)` open-files limits of a process.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_owned(), fields[4].to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_raises_its_soft_open_files_limit_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _) = server_under_ulimit(dir.path(), "-Sn 256");
    let (soft, hard) = open_files_limits(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(soft, hard, "started with a soft limit of 256");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sockets_from_one_address_cannot_exhaust_the_open_files_limit() {
    let dir = tempfile::tempdir().unwrap();
    // 256 files at most, soft and hard: 126 connections, 63 from one address.
    let (mut child, port) = server_under_ulimit(dir.path(), "-n 256");
    let server_at = |source: Ipv4Addr| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
        socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
    };
    let healthz = || async {
        let mut stream = server_at(Ipv4Addr::new(127, 0, 3, 2)).await.ok()?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: drover\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer))
            .await
            .ok()?
            .ok()?;
        answer.starts_with(b"HTTP/1.1 200").then_some(())
    };
    eventually("the server to serve", Duration::from_secs(10), healthz).await;
    let mut idle = Vec::new();
    for _ in 0..250 {
        if let Ok(stream) = server_at(Ipv4Addr::new(127, 0, 3, 1)).await {
            idle.push(stream);
        }
    }
    // Health checks from elsewhere are still answered while the idle sockets stay
    // (they would be closed only after the 60 s header timeout), and the server never
    // ran out of files.
    let answered = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if healthz().await.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    drop(idle);
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(answered.is_ok(), "healthz did not answer: {log}");
    assert!(!log.contains("Too many open files"), "{log}");
}
