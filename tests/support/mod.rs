//! Harness for end-to-end tests: starts the real `drover-server` and `drover-agent`
//! binaries in temporary directories, talks to them over real HTTP and WebSocket, and
//! waits with bounded polling instead of fixed sleeps.

#![allow(dead_code, unreachable_pub)] // each test file uses a different part of the harness

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use protocol::{AgentMessage, Hello, ServerMessage};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef01";
pub const ENROLL_TOKEN: &str = "test-enroll-token-0123456789abcdef0";
pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_drover-server");
pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_drover-agent");
pub const CLI_BIN: &str = env!("CARGO_BIN_EXE_drover");

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running `drover-server`. Killed (SIGKILL) when dropped.
pub struct Server {
    child: Child,
    pub port: u16,
    pub url: String,
    pub dir: PathBuf,
    /// Environment and extra flags given to every start of this server.
    env: Vec<(String, String)>,
    args: Vec<String>,
    /// The CA that signed a TLS server's certificate; `api()` and `run_cli` trust it.
    pub ca_file: Option<PathBuf>,
}

impl Server {
    /// Starts a server with the test tokens set through the environment.
    pub fn start(dir: &Path) -> Server {
        Server::start_with_env(
            dir,
            &[
                ("DROVER_ADMIN_TOKEN", ADMIN_TOKEN),
                ("DROVER_ENROLL_TOKEN", ENROLL_TOKEN),
            ],
        )
    }

    pub fn start_with_env(dir: &Path, env: &[(&str, &str)]) -> Server {
        Server::start_with(dir, env, &[])
    }

    /// Starts a server with the test tokens and extra flags.
    pub fn start_with_args(dir: &Path, args: &[&str]) -> Server {
        Server::start_with(
            dir,
            &[
                ("DROVER_ADMIN_TOKEN", ADMIN_TOKEN),
                ("DROVER_ENROLL_TOKEN", ENROLL_TOKEN),
            ],
            args,
        )
    }

    /// Starts a server on `port` (where another build of it ran: its agents look for it
    /// there), with the test tokens and extra flags.
    pub fn start_on_port(dir: &Path, port: u16, args: &[&str]) -> Server {
        Server::launch(
            dir,
            port,
            &[
                ("DROVER_ADMIN_TOKEN", ADMIN_TOKEN),
                ("DROVER_ENROLL_TOKEN", ENROLL_TOKEN),
            ],
            args,
        )
    }

    fn start_with(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Server {
        Server::launch(dir, 0, env, args)
    }

    fn launch(dir: &Path, port: u16, env: &[(&str, &str)], args: &[&str]) -> Server {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, port) = spawn_server(dir, port, &env, &args);
        Server {
            child,
            port,
            url: format!("http://127.0.0.1:{port}"),
            dir: dir.to_owned(),
            env,
            args,
            ca_file: None,
        }
    }

    /// Starts a server that serves HTTPS and WSS with `cert` and `key` (PEM), whose
    /// certificate `ca_file` signed; `url` is then `https://127.0.0.1:{port}`.
    pub fn start_tls(dir: &Path, cert: &Path, key: &Path, ca_file: &Path) -> Server {
        let mut server = Server::start_with_args(
            dir,
            &[
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
        );
        server.url = format!("https://127.0.0.1:{}", server.port);
        server.ca_file = Some(ca_file.to_owned());
        server
    }

    /// SIGTERM, and the exit status once the server has shut down.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                self.kill9();
                panic!("drover-server did not stop within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn downloads(&self) -> PathBuf {
        self.dir.join("downloads")
    }

    /// SIGKILL: no shutdown handler runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill9();
        let (child, _) = spawn_server(&self.dir, self.port, &self.env, &self.args);
        self.child = child;
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/api/v1/agent/ws", self.port)
    }

    /// The text of the server's `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A counter's value in the server's `/metrics`: the sample named exactly `sample`.
    pub async fn counter(&self, sample: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{sample} missing from /metrics:\n{text}"))
    }

    pub fn api(&self) -> Api {
        match &self.ca_file {
            None => Api::new(&self.url, ADMIN_TOKEN),
            Some(ca_file) => Api::trusting(&self.url, ADMIN_TOKEN, ca_file),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn spawn_server(dir: &Path, port: u16, env: &[(String, String)], args: &[String]) -> (Child, u16) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    let mut child = Command::new(SERVER_BIN)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--downloads")
        .arg(dir.join("downloads"))
        .args(["--heartbeat-interval", "1"])
        // Stories that are not about waves or bakes see a build go everywhere at once and
        // count a success as soon as it heartbeats; a test's own flags come after these
        // and win.
        .args([
            "--default-waves",
            "100%",
            "--wave-bake",
            "0s",
            "--success-bake",
            "0s",
        ])
        .args(["--retry-delay", "2s"])
        // Builds go as they are unless a test asks for compressed copies (tests/compressed.rs):
        // compressing every debug build at the production level would cost minutes of CPU,
        // and stories that count bytes on the wire count the build's.
        .args(["--compression-level", "0"])
        .args(args)
        .env_remove("DROVER_ADMIN_TOKEN")
        .env_remove("DROVER_ENROLL_TOKEN")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("drover-server starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let banner = dir.join("server.out");
    std::thread::spawn(move || {
        let mut sent = false;
        let mut port: Option<u16> = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&banner)
                .and_then(|mut f| {
                    std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes())
                });
            if let Some(addr) = line
                .split("listening on http://")
                .nth(1)
                .or_else(|| line.split("listening on https://").nth(1))
            {
                port = addr.rsplit(':').next().unwrap().trim().parse().ok();
            }
            // The banner's last line: everything it says has been written.
            if !sent
                && line.contains("start an agent:")
                && let Some(port) = port
            {
                let _ = tx.send(port);
                sent = true;
            }
        }
    });
    let port = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            panic!(
                "drover-server did not start; log:\n{}",
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            )
        });
    (child, port)
}

/// A running `drover-agent run`. Killed (SIGKILL) when dropped.
pub struct Agent {
    child: Child,
    exe: PathBuf,
    pub state_dir: PathBuf,
    pub log_path: PathBuf,
    args: Vec<String>,
}

impl Agent {
    pub fn start(server: &Server, dir: &Path, name: &str) -> Agent {
        Agent::start_with(
            server,
            dir,
            name,
            &[
                "--enroll-token",
                ENROLL_TOKEN,
                "--fingerprint",
                &format!("fp-{name}"),
            ],
        )
    }

    /// Starts an agent with its state in `dir/name`, hostname `name`, and `extra` flags.
    pub fn start_with(server: &Server, dir: &Path, name: &str, extra: &[&str]) -> Agent {
        Agent::start_installed(server, Path::new(AGENT_BIN), dir, name, extra)
    }

    /// Like `start_with`, running the agent installed at `exe` (a copy the agent may
    /// replace when it updates).
    pub fn start_installed(
        server: &Server,
        exe: &Path,
        dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> Agent {
        let state_dir = dir.join(name);
        let mut args: Vec<String> = vec![
            "run".into(),
            "--server".into(),
            server.url.clone(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--hostname".into(),
            name.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        std::fs::create_dir_all(dir).unwrap();
        let log_path = dir.join(format!("{name}.log"));
        let child = spawn(exe, &args, &log_path);
        Agent {
            child,
            exe: exe.to_owned(),
            state_dir,
            log_path,
            args,
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.child = spawn(&self.exe, &self.args, &self.log_path);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The id the agent stored at enrollment.
    pub fn stored_id(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.state_dir.join("identity.json")).ok()?;
        let value: Value = serde_json::from_str(&text).ok()?;
        value["agent_id"].as_str().map(str::to_owned)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn spawn(exe: &Path, args: &[String], log_path: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap();
    Command::new(exe)
        .args(args)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_ENROLL_TOKEN")
        .env_remove("DROVER_STATE_DIR")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("drover-agent starts")
}

/// The REST API as an operator calls it.
pub struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, token: &str) -> Api {
        Api {
            base: base.to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Like `new`, trusting only the CA in the PEM file `ca_file` for TLS.
    pub fn trusting(base: &str, token: &str, ca_file: &Path) -> Api {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(ca_file).unwrap()).unwrap();
        Api {
            base: base.to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::builder()
                .tls_built_in_root_certs(false)
                .add_root_certificate(ca)
                .build()
                .unwrap(),
        }
    }

    /// GET with the token; returns the status and the JSON body (Null when not JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, body).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("server answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The agent listing; `None` while the server is not answering.
    pub async fn agents(&self) -> Option<Vec<Value>> {
        let response = self
            .http
            .get(format!("{}/api/v1/agents", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }
}

/// How long an end-to-end update (download, verify, probation) may take.
pub const UPDATE_WAIT: Duration = Duration::from_secs(60);

/// The agent's update tasks, newest first.
pub async fn tasks_of(server: &Server, id: &str) -> Vec<Value> {
    let (_, body) = server.api().get(&format!("/api/v1/agents/{id}")).await;
    body["tasks"].as_array().cloned().unwrap_or_default()
}

/// Waits for the agent's newest task to reach `status`; returns it.
pub async fn task_reaches(server: &Server, id: &str, status: &str) -> Value {
    eventually(&format!("the task to be {status}"), UPDATE_WAIT, || async {
        let newest = tasks_of(server, id).await.first()?.clone();
        (newest["status"] == status).then_some(newest)
    })
    .await
}

/// The listed agent with this hostname, if any.
pub async fn agent_view(server: &Server, name: &str) -> Option<Value> {
    let agents = server.api().agents().await?;
    agents.into_iter().find(|a| a["hostname"] == name)
}

/// Waits until the agent with this hostname is online; returns its id.
pub async fn enrolled_id(server: &Server, name: &str) -> String {
    eventually(
        &format!("{name} online"),
        Duration::from_secs(30),
        || async {
            let agent = agent_view(server, name).await?;
            (agent["online"] == true).then(|| agent["id"].as_str().unwrap().to_owned())
        },
    )
    .await
}

/// Waits until the listing holds exactly `count` agents, all online; returns them.
pub async fn all_online(api: &Api, count: usize) -> Vec<Value> {
    eventually(
        &format!("{count} agents online"),
        Duration::from_secs(30),
        || async {
            let agents = api.agents().await?;
            let online = agents.iter().filter(|a| a["online"] == true).count();
            (agents.len() == count && online == count).then_some(agents)
        },
    )
    .await
}

pub type RawSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A hand-driven protocol client, for frames a real agent would never send.
pub async fn raw_connect(server: &Server) -> RawSocket {
    let (socket, _) = tokio_tungstenite::connect_async(server.ws_url())
        .await
        .expect("websocket connects");
    socket
}

pub fn hello(fingerprint: &str) -> Hello {
    Hello {
        agent_id: None,
        secret: None,
        enroll_token: Some(ENROLL_TOKEN.into()),
        fingerprint: fingerprint.into(),
        hostname: fingerprint.into(),
        version: "1.0.0".into(),
        os: "linux".into(),
        arch: "amd64".into(),
        auto_update: true,
    }
}

pub async fn send(socket: &mut RawSocket, message: AgentMessage) {
    socket
        .send(Message::Binary(message.encode().into()))
        .await
        .expect("frame sent");
}

/// The next protocol message, skipping control frames; `None` once the server closed.
pub async fn receive(socket: &mut RawSocket) -> Option<ServerMessage> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("server answers within 10s");
        match frame {
            Some(Ok(Message::Binary(bytes))) => {
                return Some(ServerMessage::decode(&bytes).expect("server frames decode"));
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Reads until the server closes; returns the close code and reason, if a close frame came.
pub async fn close_frame(socket: &mut RawSocket) -> Option<(u16, String)> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("server closes within 10s");
        match frame {
            Some(Ok(Message::Close(Some(frame)))) => {
                return Some((frame.code.into(), frame.reason.to_string()));
            }
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Publishes a build the way an operator should: binary first, sidecars after.
pub fn publish(downloads: &Path, version: &str, channel: Option<&str>, contents: &[u8]) -> String {
    use sha2::Digest;
    let file = format!("drover-agent-linux-amd64-{version}");
    std::fs::create_dir_all(downloads).unwrap();
    std::fs::write(downloads.join(&file), contents).unwrap();
    // The channel before the checksum: a build is offered once its checksum exists, and
    // must never be seen as stable for a moment on its way to beta.
    if let Some(channel) = channel {
        std::fs::write(
            downloads.join(format!("{file}.channel")),
            format!("{channel}\n"),
        )
        .unwrap();
    }
    let digest = hex::encode(sha2::Sha256::digest(contents));
    std::fs::write(
        downloads.join(format!("{file}.sha256")),
        format!("{digest}  {file}\n"),
    )
    .unwrap();
    file
}

/// An agent driven by the test through the real protocol: it heartbeats while waiting
/// and reports whatever the test tells it to.
pub struct ProtocolAgent {
    pub socket: RawSocket,
    pub id: String,
    pub secret: String,
    pub version: String,
    /// The channel the server last named (at the welcome or in a `channel` notice,
    /// which `next_message` takes in without returning it).
    pub channel: Option<String>,
    seq: u64,
}

impl ProtocolAgent {
    pub async fn enroll(server: &Server, fingerprint: &str, version: &str) -> ProtocolAgent {
        let mut socket = raw_connect(server).await;
        let mut hello = hello(fingerprint);
        hello.version = version.into();
        send(&mut socket, AgentMessage::Hello(hello)).await;
        let Some(ServerMessage::Welcome(welcome)) = receive(&mut socket).await else {
            panic!("expected a welcome");
        };
        ProtocolAgent {
            socket,
            id: welcome.agent_id,
            secret: welcome.secret.expect("enrollment returns a secret"),
            version: version.into(),
            channel: welcome.channel,
            seq: 0,
        }
    }

    /// Enrolls with `token`; `None` when the server rejects it.
    pub async fn enroll_with(
        server: &Server,
        fingerprint: &str,
        token: &str,
    ) -> Option<ProtocolAgent> {
        let mut socket = raw_connect(server).await;
        let mut hello = hello(fingerprint);
        hello.enroll_token = Some(token.into());
        send(&mut socket, AgentMessage::Hello(hello)).await;
        match receive(&mut socket).await? {
            ServerMessage::Welcome(welcome) => Some(ProtocolAgent {
                socket,
                id: welcome.agent_id,
                secret: welcome.secret.expect("enrollment returns a secret"),
                version: "1.0.0".into(),
                channel: welcome.channel,
                seq: 0,
            }),
            _ => None,
        }
    }

    /// A new session with the stored credentials, reporting `version`.
    pub async fn reconnect(&mut self, server: &Server, version: &str) {
        let mut socket = raw_connect(server).await;
        let mut hello = hello(&format!("fp-{}", self.id));
        hello.enroll_token = None;
        hello.agent_id = Some(self.id.clone());
        hello.secret = Some(self.secret.clone());
        hello.version = version.into();
        send(&mut socket, AgentMessage::Hello(hello)).await;
        let Some(ServerMessage::Welcome(welcome)) = receive(&mut socket).await else {
            panic!("expected a welcome");
        };
        self.channel = welcome.channel;
        self.socket = socket;
        self.version = version.into();
        self.seq = 0;
    }

    pub async fn heartbeat(&mut self) {
        self.seq += 1;
        let beat = AgentMessage::Heartbeat(protocol::Heartbeat {
            seq: self.seq,
            version: self.version.clone(),
        });
        send(&mut self.socket, beat).await;
    }

    pub async fn report(&mut self, message: AgentMessage) {
        send(&mut self.socket, message).await;
    }

    /// Heartbeats every 300 ms until a server message arrives or `within` passes.
    pub async fn next_message(&mut self, within: Duration) -> Option<ServerMessage> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.heartbeat().await;
            let wait = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .min(Duration::from_millis(300));
            if wait.is_zero() {
                return None;
            }
            match tokio::time::timeout(wait, self.socket.next()).await {
                Ok(Some(Ok(Message::Binary(bytes)))) => {
                    match ServerMessage::decode(&bytes).expect("server frames decode") {
                        ServerMessage::Channel(notice) => self.channel = Some(notice.channel),
                        message => return Some(message),
                    }
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    panic!("server closed the session: {frame:?}")
                }
                Ok(None) | Ok(Some(Err(_))) => panic!("session lost"),
                Ok(Some(Ok(_))) | Err(_) => {}
            }
        }
    }

    /// The next `update`, failing on any other message.
    pub async fn next_update(&mut self, within: Duration) -> Option<protocol::Update> {
        match self.next_message(within).await {
            None => None,
            Some(ServerMessage::Update(update)) => Some(*update),
            Some(other) => panic!("expected an update, got {other:?}"),
        }
    }
}

impl Agent {
    /// SIGKILL to the supervisor and its worker together, as a power cut would. The
    /// supervisor is stopped first, so it cannot see its worker die before it does.
    pub fn kill9_all(&mut self) {
        let _ = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status();
        if let Ok(pid) = std::fs::read_to_string(self.state_dir.join("worker.pid")) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
        self.kill9();
    }
}

/// Writes a copy of the agent binary that reports `version` (scripts/stamp-agent).
pub fn stamp_agent(version: &str, out: &Path) {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let status = Command::new("scripts/stamp-agent")
        .args([version, out.to_str().unwrap(), AGENT_BIN])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "stamp-agent {version} failed");
}

/// Publishes a copy of the agent binary that reports `version`.
pub fn publish_agent(server: &Server, dir: &Path, version: &str, channel: &str) {
    let build = dir.join(format!("build-{version}"));
    stamp_agent(version, &build);
    publish(
        &server.downloads(),
        version,
        Some(channel),
        &std::fs::read(&build).unwrap(),
    );
}

/// Runs `drover` against `server` with the admin token; success and all it printed.
pub fn run_cli(server: &Server, args: &[&str]) -> (bool, String) {
    let mut command = Command::new(CLI_BIN);
    command
        .args(args)
        .env("DROVER_SERVER", &server.url)
        .env("DROVER_TOKEN", ADMIN_TOKEN)
        .env("RUST_BACKTRACE", "0");
    if let Some(ca_file) = &server.ca_file {
        command.env("DROVER_CA_FILE", ca_file);
    }
    let output = command.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// What `exe --version` prints, without the program name.
pub fn version_of(exe: &Path) -> String {
    let output = Command::new(exe).arg("--version").output().unwrap();
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// One request a `Cdn` answered: where its Range started and how many bytes it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub range_start: u64,
    pub bytes: u64,
}

/// A stand-in for what sits between agents and the server in the field (a CDN, a
/// proxy): it either forwards downloads slowly, or serves corrupted bytes.
pub struct Cdn {
    pub url: String,
    served: Shared<Vec<Served>>,
    origin: Shared<String>,
}

type Shared<T> = std::sync::Arc<std::sync::Mutex<T>>;

pub enum CdnMode {
    /// Forward to the origin (`forward_to`) at this many bytes per second.
    Throttle { bytes_per_sec: u64 },
    /// Answer every request with this many bytes of garbage.
    Corrupt { size: u64 },
}

impl Cdn {
    pub async fn start(mode: CdnMode) -> Cdn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let served: Shared<Vec<Served>> = Default::default();
        let origin: Shared<String> = Default::default();
        let mode = std::sync::Arc::new(mode);
        let (log, upstream) = (served.clone(), origin.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let origin = upstream.lock().unwrap().clone();
                tokio::spawn(serve_one(stream, mode.clone(), origin, log.clone()));
            }
        });
        Cdn {
            url,
            served,
            origin,
        }
    }

    /// Where a throttling CDN fetches from.
    pub fn forward_to(&self, origin: &str) {
        *self.origin.lock().unwrap() = origin.to_owned();
    }

    pub fn served(&self) -> Vec<Served> {
        self.served.lock().unwrap().clone()
    }
}

async fn serve_one(
    mut stream: tokio::net::TcpStream,
    mode: std::sync::Arc<CdnMode>,
    origin: String,
    log: Shared<Vec<Served>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let range = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Range: ")
                .or_else(|| l.strip_prefix("range: "))
        })
        .map(str::to_owned);
    let range_start: u64 = range
        .as_deref()
        .and_then(|r| r.trim().strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let index = log.lock().unwrap().len();
    log.lock().unwrap().push(Served {
        range_start,
        bytes: 0,
    });
    match &*mode {
        CdnMode::Corrupt { size } => {
            let header =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(header.as_bytes()).await;
            let _ = stream.write_all(&vec![0xAB; *size as usize]).await;
            log.lock().unwrap()[index].bytes = *size;
        }
        CdnMode::Throttle { bytes_per_sec } => {
            let mut request = reqwest::Client::new().get(format!("{origin}{path}"));
            if let Some(range) = &range {
                request = request.header("Range", range.trim());
            }
            let Ok(mut response) = request.send().await else {
                return;
            };
            let mut header = format!("HTTP/1.1 {}\r\nConnection: close\r\n", response.status());
            for name in ["content-length", "content-range", "retry-after"] {
                if let Some(value) = response.headers().get(name) {
                    header += &format!("{name}: {}\r\n", value.to_str().unwrap());
                }
            }
            header += "\r\n";
            if stream.write_all(header.as_bytes()).await.is_err() {
                return;
            }
            let tick = Duration::from_millis(50);
            let per_tick = (*bytes_per_sec / 20).max(1) as usize;
            let mut pending = Vec::new();
            loop {
                while pending.len() < per_tick {
                    match response.chunk().await {
                        Ok(Some(chunk)) => pending.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                if pending.is_empty() {
                    return;
                }
                let take = pending.len().min(per_tick);
                if stream.write_all(&pending[..take]).await.is_err() {
                    return;
                }
                log.lock().unwrap()[index].bytes += take as u64;
                pending.drain(..take);
                tokio::time::sleep(tick).await;
            }
        }
    }
}

/// Reads what the server sends each agent for `window`, visiting them in turn (each
/// visit heartbeats, so no session goes silent).
pub async fn listen(
    agents: &mut [ProtocolAgent],
    window: Duration,
) -> Vec<(usize, protocol::ServerMessage)> {
    let mut heard = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < deadline {
        for (i, agent) in agents.iter_mut().enumerate() {
            if let Some(message) = agent.next_message(Duration::from_millis(100)).await {
                heard.push((i, message));
            }
        }
    }
    heard
}

/// A copy of the agent at 1.0.0 installed at `dir/bin/drover-agent`, for tests in which
/// the agent replaces itself.
pub fn install_agent(dir: &Path) -> PathBuf {
    let exe = dir.join("bin/drover-agent");
    stamp_agent("1.0.0", &exe);
    exe
}

/// Waits until the executable at `exe` reports `version`: the supervisor promotes a new
/// build once it has seen it pass probation.
pub async fn installed(exe: &Path, version: &str) {
    eventually(
        &format!("{} to be {version}", exe.display()),
        Duration::from_secs(10),
        || async { (version_of(exe) == version).then_some(()) },
    )
    .await;
}

impl Agent {
    /// The agent installed at `exe`, enrolling as `name` with fingerprint `fp-{name}`,
    /// with `extra` flags after those.
    pub fn start_installed_enrolling(
        server: &Server,
        exe: &Path,
        dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> Agent {
        let fingerprint = format!("fp-{name}");
        let mut args = vec![
            "--enroll-token",
            ENROLL_TOKEN,
            "--fingerprint",
            &fingerprint,
        ];
        args.extend_from_slice(extra);
        Agent::start_installed(server, exe, dir, name, &args)
    }
}

/// The simulator lives in another package, so Cargo does not build it for these tests;
/// build it here (a no-op when it is fresh) next to the other binaries.
pub fn sim_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let agent = Path::new(AGENT_BIN);
        let mut build = Command::new(env!("CARGO"));
        build.args(["build", "-p", "sim", "--bin", "drover-sim"]);
        if agent.parent().is_some_and(|dir| dir.ends_with("release")) {
            build.arg("--release");
        }
        let status = build.status().expect("cargo runs");
        assert!(status.success(), "building drover-sim failed");
        agent.with_file_name("drover-sim")
    })
    .clone()
}

/// What the running supervisor wrote about itself (`supervisor.json` in its state
/// directory): its PID and version.
pub fn supervisor_of(state_dir: &Path) -> Option<(u64, String)> {
    let text = std::fs::read_to_string(state_dir.join("supervisor.json")).ok()?;
    let about: Value = serde_json::from_str(&text).ok()?;
    Some((
        about["pid"].as_u64()?,
        about["version"].as_str()?.to_owned(),
    ))
}
