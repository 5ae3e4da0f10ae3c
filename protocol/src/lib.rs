//! The Drover wire protocol: the messages agents and servers exchange over a WebSocket,
//! and their MessagePack codec. `PROTOCOL.md` at the repository root is the prose version.
//!
//! Every frame is one WebSocket binary message holding one MessagePack map:
//! `{"v": PROTOCOL_VERSION, "type": "<message type>", ...fields}`. Fields are only ever
//! added, never renamed or removed, and every added field has a default, so frames from
//! older and newer peers keep decoding. `v` changes only on an incompatible change.

pub mod release_signature;
mod structure;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks, carried in every frame as `v`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The largest frame either side accepts. Real messages are a few hundred bytes.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

/// Where a server takes agent sessions, below its base URL.
pub const AGENT_SOCKET_PATH: &str = "/api/v1/agent/ws";

/// The agent endpoint for a server URL: `http://h:p` becomes `ws://h:p/api/v1/agent/ws`
/// (`https` and `wss` become `wss`); a `ws://` or `wss://` URL with a path is used as
/// given, for a proxy that maps the endpoint elsewhere.
pub fn agent_socket_url(server: &str) -> String {
    let server = server.trim().trim_end_matches('/');
    let (scheme, rest) = server.split_once("://").unwrap_or(("http", server));
    let scheme = match scheme {
        "https" | "wss" => "wss",
        _ => "ws",
    };
    if server.starts_with("ws") && rest.contains('/') {
        return format!("{scheme}://{rest}");
    }
    format!("{scheme}://{rest}{AGENT_SOCKET_PATH}")
}

pub use structure::MAX_NESTING;

/// Messages an agent sends to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First frame of every session. Since version 1.
    Hello(Hello),
    /// Sent every heartbeat interval. Since version 1.
    Heartbeat(Heartbeat),
    /// Progress of an update task. Since version 1.
    UpdateProgress(UpdateProgress),
    /// Final outcome of an update task. Since version 1.
    UpdateResult(UpdateResult),
    /// A message type this version does not know (sent by a newer peer); ignored.
    #[serde(other)]
    Unknown,
}

/// Messages the server sends to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to an accepted hello. Since version 1.
    Welcome(Welcome),
    /// Install a build. Since version 1. Boxed: by far the largest message.
    Update(Box<Update>),
    /// Stop working on a task. Since version 1.
    Cancel(Cancel),
    /// The session is refused or ended; the server closes the socket after it. Since version 1.
    Reject(Reject),
    /// The channel the agent's updates come from changed during the session. Since
    /// version 1 (optional: older agents ignore it).
    Channel(ChannelNotice),
    /// A message type this version does not know (sent by a newer peer); ignored.
    #[serde(other)]
    Unknown,
}

/// Credentials and facts about the agent. Either `agent_id` and `secret` (an enrolled
/// agent) or `enroll_token` (first contact) must be present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub enroll_token: Option<String>,
    pub fingerprint: String,
    pub hostname: String,
    pub version: String,
    pub os: String,
    pub arch: String,
    /// False when the agent was told not to apply updates (`--no-auto-update`).
    #[serde(default = "default_true")]
    pub auto_update: bool,
}

/// The longest each text field of a `hello` (and a heartbeat's `version`) may be, in
/// bytes: (field, limit). Every one must also be free of control characters.
pub const HELLO_FIELD_LIMITS: [(&str, usize); 8] = [
    ("agent_id", 64),
    ("secret", 128),
    ("enroll_token", 128),
    ("fingerprint", 128),
    ("hostname", 253),
    ("version", 64),
    ("os", 16),
    ("arch", 16),
];

/// Checks one text field against `HELLO_FIELD_LIMITS`; the error names the field and
/// says what is wrong, without echoing the text.
pub fn check_field(field: &str, value: &str) -> Result<(), String> {
    let limit = HELLO_FIELD_LIMITS
        .iter()
        .find(|(name, _)| *name == field)
        .map_or(64, |(_, limit)| *limit);
    if value.len() > limit {
        return Err(format!(
            "{field} is {} bytes long; at most {limit} are allowed",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} holds control characters"));
    }
    Ok(())
}

impl Hello {
    /// Checks every text field (see `HELLO_FIELD_LIMITS`).
    pub fn check(&self) -> Result<(), String> {
        let optional = [
            ("agent_id", &self.agent_id),
            ("secret", &self.secret),
            ("enroll_token", &self.enroll_token),
        ];
        for (field, value) in optional {
            if let Some(value) = value {
                check_field(field, value)?;
            }
        }
        for (field, value) in [
            ("fingerprint", &self.fingerprint),
            ("hostname", &self.hostname),
            ("version", &self.version),
            ("os", &self.os),
            ("arch", &self.arch),
        ] {
            check_field(field, value)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Counts up from 1 within a session.
    pub seq: u64,
    /// The version the agent is running.
    pub version: String,
}

/// Stages an agent reports while it works on an update task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateStage {
    Downloading,
    Verifying,
    Installing,
    Restarting,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateProgress {
    pub task_id: String,
    pub stage: UpdateStage,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    /// Where the build's bytes come from (and why a mirror was given up), as far as the
    /// download got. Absent from agents older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
}

/// Where an agent fetched a build from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferSource {
    /// The server's own `/downloads` (the `update`'s `url`).
    Server,
    /// The mirror the `update` offered (`mirror_url`).
    Mirror,
    #[serde(other)]
    Unknown,
}

impl TransferSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferSource::Server => "server",
            TransferSource::Mirror => "mirror",
            TransferSource::Unknown => "unknown",
        }
    }
}

/// Why an agent gave up on a mirror and fell back to the server. Never the build's
/// fault: a mirror is untrusted storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorFailure {
    /// No connection, or it broke, at every attempt.
    Unreachable,
    /// The mirror answered 404 or 410: it does not hold the build.
    NotFound,
    /// The mirror answered another error status.
    HttpError,
    /// The bytes are not the build: wrong digest, or more bytes than the build has.
    WrongBytes,
    /// The download made no progress for too long.
    Stalled,
    #[serde(other)]
    Unknown,
}

impl MirrorFailure {
    pub const ALL: [MirrorFailure; 5] = [
        MirrorFailure::Unreachable,
        MirrorFailure::NotFound,
        MirrorFailure::HttpError,
        MirrorFailure::WrongBytes,
        MirrorFailure::Stalled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MirrorFailure::Unreachable => "unreachable",
            MirrorFailure::NotFound => "not_found",
            MirrorFailure::HttpError => "http_error",
            MirrorFailure::WrongBytes => "wrong_bytes",
            MirrorFailure::Stalled => "stalled",
            MirrorFailure::Unknown => "unknown",
        }
    }

    pub fn parse(text: &str) -> Option<MirrorFailure> {
        MirrorFailure::ALL.into_iter().find(|f| f.as_str() == text)
    }
}

/// How a build reached the agent. Since version 1 (optional).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The source that is serving (or served) the bytes.
    pub source: TransferSource,
    /// Set once the agent gave up on the offered mirror; `source` is then `server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<MirrorFailure>,
    /// What went wrong with the mirror, for people (at most `TRANSFER_ERROR_LIMIT` bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_error: Option<String>,
    /// What crosses the wire: the build itself, its compressed copy (`compressed`), or a
    /// delta from the build the agent ran (`delta`). Since version 1 (optional; absent
    /// means `full`).
    #[serde(default, skip_serializing_if = "TransferKind::is_full")]
    pub kind: TransferKind,
    /// Bytes of what crosses the wire (the compressed copy's size, the delta's, or the
    /// build's). Since version 1 (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// What an agent fetches: the build as it is, or the server's compressed copy of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferKind {
    /// The build's own bytes.
    #[default]
    Full,
    /// The `update`'s `compressed` copy, decompressed by the agent.
    Compressed,
    /// The `update`'s `delta`, applied by the agent to the build it runs.
    Delta,
    #[serde(other)]
    Unknown,
}

impl TransferKind {
    pub fn is_full(&self) -> bool {
        *self == TransferKind::Full
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::Full | TransferKind::Unknown => "full",
            TransferKind::Compressed => "compressed",
            TransferKind::Delta => "delta",
        }
    }

    /// The kind `as_str` names; anything else (absent, unknown) is `Full`.
    pub fn parse(text: &str) -> TransferKind {
        [TransferKind::Compressed, TransferKind::Delta]
            .into_iter()
            .find(|k| k.as_str() == text)
            .unwrap_or(TransferKind::Full)
    }
}

/// The most bytes of `Transfer::fallback_error` a peer sends or keeps.
pub const TRANSFER_ERROR_LIMIT: usize = 512;

/// How an update task ended on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateOutcome {
    /// The new version started, connected and heartbeated.
    Succeeded,
    /// The update was not installed (download, verification or install failed).
    Failed,
    /// The new version was installed but did not prove itself; the previous one runs again.
    RolledBack,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateResult {
    pub task_id: String,
    pub outcome: UpdateOutcome,
    /// The version the agent runs after the task.
    pub version: String,
    #[serde(default)]
    pub error: Option<String>,
    /// Why a task that did not succeed failed; absent from a success and from agents
    /// older than the field (the server then classes the failure itself). Since version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_class: Option<FailureClass>,
    /// Where the build's bytes came from, when the download began (as in
    /// `UpdateProgress`). Since version 1 (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<Transfer>,
}

/// Whose fault a failed update was. Only `build` failures say anything about the build:
/// they count toward a rollout's gates and halts, and stop the version from being offered
/// to that agent again. The others are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The build itself: it exited or failed probation, crashed, or its bytes failed
    /// verification (digest, signature, size).
    Build,
    /// The machine: disk full, no permission.
    Environment,
    /// Nobody's fault, or not yet: server busy, network, updates switched off, the agent
    /// declines updates, the task was cancelled or superseded.
    Transient,
    /// A class this version does not know (sent by a newer peer); treated as transient.
    #[serde(other)]
    Unknown,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Build => "build",
            FailureClass::Environment => "environment",
            FailureClass::Transient | FailureClass::Unknown => "transient",
        }
    }

    pub fn parse(text: &str) -> Option<FailureClass> {
        [
            FailureClass::Build,
            FailureClass::Environment,
            FailureClass::Transient,
        ]
        .into_iter()
        .find(|c| c.as_str() == text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub agent_id: String,
    /// Present only when the hello enrolled the agent; the agent must store it.
    #[serde(default)]
    pub secret: Option<String>,
    pub heartbeat_interval_secs: u32,
    #[serde(default)]
    pub server_version: String,
    /// The channel the agent's updates come from (its own, its site's, its client's,
    /// else stable), for the agent to show; it decides nothing on the agent. Since
    /// version 1 (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

/// A new channel for the agent's updates (an operator moved it, its site or its client).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelNotice {
    pub channel: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    pub task_id: String,
    pub version: String,
    /// Absolute URL of the build on the server itself: the source, or the fallback when
    /// `mirror_url` is given.
    pub url: String,
    /// The same build on a mirror (untrusted storage), to try first; the agent verifies
    /// what it serves exactly as the server's and falls back to `url` on any failure.
    /// Since version 1 (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_url: Option<String>,
    /// Lower-case hex SHA-256 of the build.
    pub sha256: String,
    pub size: u64,
    /// The build's release signature document (`<build>.sig`, see `release_signature`),
    /// passed on unchanged, when the server has one.
    #[serde(default)]
    pub signature: Option<String>,
    /// True when this is an operator's rollback: the agent accepts an older version.
    #[serde(default)]
    pub rollback: bool,
    /// Server clock when the message was sent, Unix milliseconds.
    #[serde(default)]
    pub sent_at_ms: u64,
    /// A compressed copy of the build on the server itself, which an agent that knows its
    /// encoding may fetch instead of `url` (never instead of a mirror). The agent checks
    /// the copy's digest, decompresses it (never beyond `size`), and then checks
    /// `sha256` and the signature exactly as for `url`; on any failure of the copy it
    /// fetches `url`. Since version 1 (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed: Option<CompressedBuild>,
    /// A delta from the build the agent runs to this one, which an agent whose
    /// executable hashes to `base_sha256` may fetch and apply instead of `url` (never
    /// instead of a mirror). Only the rebuilt build's `sha256` and signature decide, as
    /// for `url`; on any failure of the delta the agent fetches `compressed` or `url`.
    /// Since version 1 (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<DeltaBuild>,
}

/// A compressed copy of a build, offered in an `update`. Since version 1 (optional).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressedBuild {
    /// How the copy is compressed; `zstd` (one or more zstd frames) is the only one
    /// there is. An agent ignores an encoding it does not know.
    pub encoding: String,
    /// Absolute URL of the copy on the server, with the same grant as the `url`.
    pub url: String,
    /// Size of the copy in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the copy (not of the build).
    pub sha256: String,
}

/// The encoding of a `CompressedBuild` this version knows.
pub const ENCODING_ZSTD: &str = "zstd";

/// A delta from one build to another, offered in an `update`. Since version 1 (optional).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaBuild {
    /// How the delta rebuilds the build; `zstd-patch` (zstd frames made with the base
    /// build as their reference prefix) is the only one there is. An agent ignores an
    /// encoding it does not know.
    pub encoding: String,
    /// The version of the build the delta starts from.
    pub base_version: String,
    /// Lower-case hex SHA-256 of that build: the agent's own executable must hash to it.
    pub base_sha256: String,
    /// Absolute URL of the delta on the server, with the same grant as the `url`.
    pub url: String,
    /// Size of the delta in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the delta (not of the build).
    pub sha256: String,
}

/// The encoding of a `DeltaBuild` this version knows.
pub const ENCODING_ZSTD_PATCH: &str = "zstd-patch";

/// The zstd window (its log) a `zstd-patch` delta from a base of `base` bytes to a build
/// of `build` bytes is made with, and the largest its reader accepts: a power of two at
/// least twice the larger of the two, so a match reaches anywhere in the base, within
/// zstd's portable limit (1 GiB).
pub fn delta_window_log(base: u64, build: u64) -> u32 {
    (65 - base.max(build).leading_zeros()).clamp(10, 30)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub task_id: String,
    #[serde(default)]
    pub reason: String,
}

/// Why the server refused or ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// Unknown agent id or wrong secret.
    BadCredentials,
    /// The enrollment token is unknown or revoked.
    BadEnrollToken,
    /// The first frame was not a hello, or the hello lacked credentials.
    ExpectedHello,
    /// The frame's `v` is not a protocol version the server speaks.
    UnsupportedProtocol,
    /// The frame is not valid MessagePack or not a known message shape.
    MalformedFrame,
    /// The frame exceeds `MAX_FRAME_BYTES`.
    FrameTooLarge,
    /// Another session for the same agent took over.
    Replaced,
    /// No frame arrived within the heartbeat deadline.
    Timeout,
    /// The server failed (for example its database); retry later with backoff.
    ServerError,
    /// Too many frames from this session, or too many enrollment attempts from this
    /// address; retry later with backoff. Older agents read it as `Unknown`.
    RateLimited,
    /// An enrollment from a machine whose record in the site is live (online, or seen
    /// recently): it is not re-bound, so a clone or an impostor cannot take over that
    /// identity. Retry with backoff; it is re-bound once the record has been quiet long
    /// enough. Older agents read it as `Unknown`.
    FingerprintConflict,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    pub code: RejectCode,
    #[serde(default)]
    pub message: String,
}

fn default_true() -> bool {
    true
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u32),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// The reject code a peer is told when its frame fails to decode.
    pub fn reject_code(&self) -> RejectCode {
        match self {
            DecodeError::TooLarge { .. } => RejectCode::FrameTooLarge,
            DecodeError::UnsupportedVersion(_) => RejectCode::UnsupportedProtocol,
            DecodeError::Malformed(_) => RejectCode::MalformedFrame,
        }
    }
}

#[derive(Serialize)]
struct FrameOut<'a, M> {
    v: u32,
    #[serde(flatten)]
    message: &'a M,
}

#[derive(Deserialize)]
struct FrameIn<M> {
    v: u32,
    #[serde(flatten)]
    message: M,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

impl AgentMessage {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        decode(frame)
    }
}

impl ServerMessage {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        decode(frame)
    }
}

fn encode<M: Serialize>(message: &M) -> Vec<u8> {
    let frame = FrameOut {
        v: PROTOCOL_VERSION,
        message,
    };
    // Plain structs of strings, integers and booleans always serialize into a Vec.
    rmp_serde::to_vec_named(&frame).expect("protocol messages always serialize")
}

fn decode<M: DeserializeOwned>(frame: &[u8]) -> Result<M, DecodeError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge {
            size: frame.len(),
            limit: MAX_FRAME_BYTES,
        });
    }
    // Bounds what serde may recurse into or allocate, before it sees the frame.
    structure::check(frame)?;
    // One pass for a good frame. A frame that does not decode may come from a peer of
    // another version, which should hear that rather than what its shape lacks, so only
    // then is the version read on its own.
    match rmp_serde::from_slice::<FrameIn<M>>(frame) {
        Ok(decoded) if decoded.v == PROTOCOL_VERSION => Ok(decoded.message),
        Ok(decoded) => Err(DecodeError::UnsupportedVersion(decoded.v)),
        Err(err) => match rmp_serde::from_slice::<VersionOnly>(frame) {
            Ok(version) if version.v != PROTOCOL_VERSION => {
                Err(DecodeError::UnsupportedVersion(version.v))
            }
            _ => Err(DecodeError::Malformed(err.to_string())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_kind_reads_back_what_it_writes() {
        for kind in [
            TransferKind::Full,
            TransferKind::Compressed,
            TransferKind::Delta,
        ] {
            assert_eq!(TransferKind::parse(kind.as_str()), kind);
        }
        assert_eq!(TransferKind::parse("bsdiff"), TransferKind::Full);
        assert_eq!(TransferKind::parse(""), TransferKind::Full);
    }

    #[test]
    fn a_delta_window_reaches_across_the_base_and_the_build() {
        for (base, build) in [
            (1u64, 1u64),
            (1000, 3000),
            (7 << 20, 8 << 20),
            (45 << 20, 1),
        ] {
            let window = 1u64 << delta_window_log(base, build);
            assert!(window >= base + build, "{base} + {build}: {window}");
            assert!(
                window <= 4 * base.max(build).max(256),
                "{base}, {build}: {window}"
            );
        }
        assert_eq!(delta_window_log(u64::MAX, 1), 30, "zstd's portable limit");
    }

    #[test]
    fn a_peer_of_another_version_hears_so_whatever_its_frame_holds() {
        // {"v": 2, "type": "heartbeat", "seq": 1}: a good shape from version 2.
        let shaped = b"\x83\xa1v\x02\xa4type\xa9heartbeat\xa3seq\x01";
        // {"v": 2}: a shape version 1 cannot read (no type).
        let odd = b"\x81\xa1v\x02";
        for frame in [&shaped[..], &odd[..]] {
            assert!(matches!(
                AgentMessage::decode(frame),
                Err(DecodeError::UnsupportedVersion(2))
            ));
        }
        // {"v": 1}: this version, a bad shape.
        assert!(matches!(
            AgentMessage::decode(b"\x81\xa1v\x01"),
            Err(DecodeError::Malformed(_))
        ));
        // {"type": "heartbeat"}: no version at all.
        assert!(matches!(
            AgentMessage::decode(b"\x81\xa4type\xa9heartbeat"),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn agent_socket_urls() {
        let cases = [
            (
                "http://127.0.0.1:8080",
                "ws://127.0.0.1:8080/api/v1/agent/ws",
            ),
            (
                "http://127.0.0.1:8080/",
                "ws://127.0.0.1:8080/api/v1/agent/ws",
            ),
            (
                "https://updates.example.com",
                "wss://updates.example.com/api/v1/agent/ws",
            ),
            (
                "updates.example.com:8080",
                "ws://updates.example.com:8080/api/v1/agent/ws",
            ),
            ("http://[::1]:9000", "ws://[::1]:9000/api/v1/agent/ws"),
            (
                "wss://lb.example.com/custom/ws",
                "wss://lb.example.com/custom/ws",
            ),
            ("ws://lb.example.com", "ws://lb.example.com/api/v1/agent/ws"),
        ];
        for (input, expected) in cases {
            assert_eq!(agent_socket_url(input), expected, "{input}");
        }
    }

    fn heartbeat() -> AgentMessage {
        AgentMessage::Heartbeat(Heartbeat {
            seq: 7,
            version: "1.2.3".into(),
        })
    }

    #[test]
    fn frames_are_maps_with_version_and_type() {
        let bytes = heartbeat().encode();
        let value: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
            rmp_serde::from_slice(&bytes).unwrap();
        let keys: Vec<_> = value.keys().map(String::as_str).collect();
        assert_eq!(keys, ["seq", "type", "v", "version"]);
    }

    #[test]
    fn rejects_oversized_frames_before_parsing() {
        let frame = vec![0x90; MAX_FRAME_BYTES + 1];
        assert_eq!(
            AgentMessage::decode(&frame),
            Err(DecodeError::TooLarge {
                size: MAX_FRAME_BYTES + 1,
                limit: MAX_FRAME_BYTES
            })
        );
    }

    #[test]
    fn rejects_garbage_and_wrong_versions() {
        let cases: [(&[u8], RejectCode); 4] = [
            (b"", RejectCode::MalformedFrame),
            (b"\xc1\xc1\xc1", RejectCode::MalformedFrame),
            // {"v": 2, "type": "heartbeat"}
            (
                b"\x82\xa1v\x02\xa4type\xa9heartbeat",
                RejectCode::UnsupportedProtocol,
            ),
            // {"v": 1, "type": "heartbeat"} without its fields
            (
                b"\x82\xa1v\x01\xa4type\xa9heartbeat",
                RejectCode::MalformedFrame,
            ),
        ];
        for (frame, code) in cases {
            let err = AgentMessage::decode(frame).unwrap_err();
            assert_eq!(err.reject_code(), code, "frame {frame:?}: {err}");
        }
    }

    #[test]
    fn unknown_message_types_decode_as_unknown() {
        // {"v": 1, "type": "telemetry", "cpu": 3}
        let frame = b"\x83\xa1v\x01\xa4type\xa9telemetry\xa3cpu\x03";
        assert_eq!(AgentMessage::decode(frame), Ok(AgentMessage::Unknown));
        assert_eq!(ServerMessage::decode(frame), Ok(ServerMessage::Unknown));
    }
}
