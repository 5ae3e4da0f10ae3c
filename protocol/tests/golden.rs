//! Golden frames: the exact bytes of every message as version 1 writes them, checked in
//! under `protocol/golden/v1/` as hex. Old agents in the field send these bytes forever, so
//! a change that stops them decoding (or changes what is written) must fail here.
//! `DROVER_BLESS=1 cargo test -p protocol --test golden` writes missing files.

use std::path::PathBuf;

use protocol::*;

enum Sample {
    Agent(AgentMessage),
    Server(ServerMessage),
}

fn samples() -> Vec<(&'static str, Sample)> {
    use Sample::{Agent, Server};
    vec![
        (
            "hello-enroll",
            Agent(AgentMessage::Hello(Hello {
                agent_id: None,
                secret: None,
                enroll_token: Some("enr_0123456789abcdef".into()),
                fingerprint: "4c4c4544-0042-3510-8051-b4c04f4e4d32".into(),
                hostname: "till-07".into(),
                version: "1.0.0".into(),
                os: "linux".into(),
                arch: "amd64".into(),
                auto_update: true,
            })),
        ),
        (
            "hello-credentials",
            Agent(AgentMessage::Hello(Hello {
                agent_id: Some("0b7c6f2e-2f55-4c83-9a65-5d1d2a1e0f3b".into()),
                secret: Some("sec_fedcba9876543210".into()),
                enroll_token: None,
                fingerprint: "4c4c4544-0042-3510-8051-b4c04f4e4d32".into(),
                hostname: "till-07".into(),
                version: "1.1.0-beta.1".into(),
                os: "windows".into(),
                arch: "arm64".into(),
                auto_update: false,
            })),
        ),
        (
            "update-progress-fallback",
            Agent(AgentMessage::UpdateProgress(UpdateProgress {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                stage: UpdateStage::Downloading,
                bytes_done: 0,
                bytes_total: 52_428_800,
                transfer: Some(Transfer {
                    source: TransferSource::Server,
                    fallback: Some(MirrorFailure::WrongBytes),
                    fallback_error: Some("checksum mismatch".into()),
                    kind: TransferKind::Full,
                    bytes: None,
                }),
            })),
        ),
        (
            "heartbeat",
            Agent(AgentMessage::Heartbeat(Heartbeat {
                seq: 42,
                version: "1.0.0".into(),
            })),
        ),
        (
            "update-progress",
            Agent(AgentMessage::UpdateProgress(UpdateProgress {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                stage: UpdateStage::Downloading,
                bytes_done: 1_048_576,
                bytes_total: 52_428_800,
                transfer: None,
            })),
        ),
        (
            "update-result-succeeded",
            Agent(AgentMessage::UpdateResult(UpdateResult {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                outcome: UpdateOutcome::Succeeded,
                version: "1.1.0".into(),
                error: None,
                failure_class: None,
                transfer: None,
            })),
        ),
        (
            "update-result-rolled-back",
            Agent(AgentMessage::UpdateResult(UpdateResult {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                outcome: UpdateOutcome::RolledBack,
                version: "1.0.0".into(),
                error: Some("new version exited with status 3 during probation".into()),
                failure_class: None,
                transfer: None,
            })),
        ),
        (
            "update-result-failed-build",
            Agent(AgentMessage::UpdateResult(UpdateResult {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                outcome: UpdateOutcome::RolledBack,
                version: "1.0.0".into(),
                error: Some("new version exited with status 3 during probation".into()),
                failure_class: Some(FailureClass::Build),
                transfer: None,
            })),
        ),
        (
            "update-result-failed-transient",
            Agent(AgentMessage::UpdateResult(UpdateResult {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                outcome: UpdateOutcome::Failed,
                version: "1.0.0".into(),
                error: Some("download refused: 503 Service Unavailable".into()),
                failure_class: Some(FailureClass::Transient),
                transfer: None,
            })),
        ),
        (
            "welcome",
            Server(ServerMessage::Welcome(Welcome {
                agent_id: "0b7c6f2e-2f55-4c83-9a65-5d1d2a1e0f3b".into(),
                secret: Some("sec_fedcba9876543210".into()),
                heartbeat_interval_secs: 30,
                server_version: "0.1.0".into(),
                channel: None,
            })),
        ),
        (
            "welcome-channel",
            Server(ServerMessage::Welcome(Welcome {
                agent_id: "0b7c6f2e-2f55-4c83-9a65-5d1d2a1e0f3b".into(),
                secret: None,
                heartbeat_interval_secs: 30,
                server_version: "0.2.0".into(),
                channel: Some("beta".into()),
            })),
        ),
        (
            "channel",
            Server(ServerMessage::Channel(ChannelNotice {
                channel: "stable".into(),
            })),
        ),
        (
            "update",
            Server(ServerMessage::Update(Box::new(Update {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                version: "1.1.0".into(),
                url: "https://updates.example.com/downloads/drover-agent-linux-amd64-1.1.0".into(),
                sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
                size: 52_428_800,
                signature: None,
                rollback: false,
                sent_at_ms: 1_764_072_000_000,
                mirror_url: None,
                compressed: None,
                delta: None,
            }))),
        ),
        (
            "update-mirror",
            Server(ServerMessage::Update(Box::new(Update {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                version: "1.1.0".into(),
                url: "https://updates.example.com/downloads/drover-agent-linux-amd64-1.1.0".into(),
                sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
                size: 52_428_800,
                signature: None,
                rollback: false,
                sent_at_ms: 1_764_072_000_000,
                mirror_url: Some(
                    "http://mirror.branch.example/drover/drover-agent-linux-amd64-1.1.0".into(),
                ),
                compressed: None,
                delta: None,
            }))),
        ),
        (
            "update-compressed",
            Server(ServerMessage::Update(Box::new(Update {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                version: "1.1.0".into(),
                url: "https://updates.example.com/downloads/drover-agent-linux-amd64-1.1.0?task=7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11&grant=00112233445566778899aabbccddeeff".into(),
                sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
                size: 52_428_800,
                signature: None,
                rollback: false,
                sent_at_ms: 1_764_072_000_000,
                mirror_url: None,
                compressed: Some(CompressedBuild {
                    encoding: ENCODING_ZSTD.into(),
                    url: "https://updates.example.com/downloads/drover-agent-linux-amd64-1.1.0.zst?task=7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11&grant=8899aabbccddeeff0011223344556677".into(),
                    size: 20_971_520,
                    sha256: "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752".into(),
                }),
                delta: None,
            }))),
        ),
        (
            "update-delta",
            Server(ServerMessage::Update(Box::new(Update {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                version: "1.1.0".into(),
                url: "https://updates.example.com/downloads/drover-agent-linux-amd64-1.1.0?task=7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11&grant=00112233445566778899aabbccddeeff".into(),
                sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
                size: 52_428_800,
                signature: None,
                rollback: false,
                sent_at_ms: 1_764_072_000_000,
                mirror_url: None,
                compressed: None,
                delta: Some(DeltaBuild {
                    encoding: ENCODING_ZSTD_PATCH.into(),
                    base_version: "1.0.0".into(),
                    base_sha256: "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae".into(),
                    url: "https://updates.example.com/downloads/drover-agent-linux-amd64-1.1.0.delta-from-1.0.0?task=7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11&grant=44556677889900112233aabbccddeeff".into(),
                    size: 1_048_576,
                    sha256: "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9".into(),
                }),
            }))),
        ),
        (
            "update-result-delta",
            Agent(AgentMessage::UpdateResult(UpdateResult {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                outcome: UpdateOutcome::Succeeded,
                version: "1.1.0".into(),
                error: None,
                failure_class: None,
                transfer: Some(Transfer {
                    source: TransferSource::Server,
                    fallback: None,
                    fallback_error: None,
                    kind: TransferKind::Delta,
                    bytes: Some(1_048_576),
                }),
            })),
        ),
        (
            "update-result-compressed",
            Agent(AgentMessage::UpdateResult(UpdateResult {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                outcome: UpdateOutcome::Succeeded,
                version: "1.1.0".into(),
                error: None,
                failure_class: None,
                transfer: Some(Transfer {
                    source: TransferSource::Server,
                    fallback: None,
                    fallback_error: None,
                    kind: TransferKind::Compressed,
                    bytes: Some(20_971_520),
                }),
            })),
        ),
        (
            "cancel",
            Server(ServerMessage::Cancel(Cancel {
                task_id: "7d1f0c7a-3b1e-4e57-8f55-1b9a7f0b2c11".into(),
                reason: "version 1.1.0 was rolled back".into(),
            })),
        ),
        (
            "reject",
            Server(ServerMessage::Reject(Reject {
                code: RejectCode::BadCredentials,
                message: "unknown agent or wrong secret".into(),
            })),
        ),
    ]
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("golden/v1/{name}.hex"))
}

#[test]
fn every_message_matches_its_golden_frame() {
    let bless = std::env::var_os("DROVER_BLESS").is_some();
    for (name, sample) in samples() {
        let path = golden_path(name);
        let bytes = match &sample {
            Sample::Agent(m) => m.encode(),
            Sample::Server(m) => m.encode(),
        };
        if bless && !path.exists() {
            std::fs::write(&path, hex::encode(&bytes) + "\n").unwrap();
        }
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (DROVER_BLESS=1 writes it)", path.display()));
        let golden = hex::decode(text.trim()).unwrap();
        assert_eq!(
            hex::encode(&bytes),
            hex::encode(&golden),
            "{name}: encoding changed"
        );
        match sample {
            Sample::Agent(m) => assert_eq!(AgentMessage::decode(&golden).unwrap(), m, "{name}"),
            Sample::Server(m) => assert_eq!(ServerMessage::decode(&golden).unwrap(), m, "{name}"),
        }
    }
}

#[test]
fn every_golden_file_has_a_sample() {
    let names: Vec<_> = samples()
        .into_iter()
        .map(|(n, _)| format!("{n}.hex"))
        .collect();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/v1");
    for entry in std::fs::read_dir(dir).unwrap() {
        let file = entry.unwrap().file_name().into_string().unwrap();
        assert!(names.contains(&file), "golden/v1/{file} has no sample");
    }
}

/// A newer peer adds fields; this version must still read its frames.
#[test]
fn frames_with_added_fields_still_decode() {
    #[derive(serde::Serialize)]
    struct HeartbeatFromTheFuture {
        v: u32,
        r#type: &'static str,
        seq: u64,
        version: &'static str,
        load_average: f64,
        disks: Vec<&'static str>,
    }
    let frame = rmp_serde::to_vec_named(&HeartbeatFromTheFuture {
        v: PROTOCOL_VERSION,
        r#type: "heartbeat",
        seq: 3,
        version: "2.0.0",
        load_average: 0.25,
        disks: vec!["/", "/var"],
    })
    .unwrap();
    assert_eq!(
        AgentMessage::decode(&frame).unwrap(),
        AgentMessage::Heartbeat(Heartbeat {
            seq: 3,
            version: "2.0.0".into()
        })
    );
}

/// An older peer omits fields added later; their defaults apply.
#[test]
fn frames_without_later_fields_take_defaults() {
    #[derive(serde::Serialize)]
    struct MinimalUpdate {
        v: u32,
        r#type: &'static str,
        task_id: &'static str,
        version: &'static str,
        url: &'static str,
        sha256: &'static str,
        size: u64,
    }
    let frame = rmp_serde::to_vec_named(&MinimalUpdate {
        v: PROTOCOL_VERSION,
        r#type: "update",
        task_id: "t1",
        version: "1.0.1",
        url: "http://h/downloads/f",
        sha256: "00",
        size: 10,
    })
    .unwrap();
    let ServerMessage::Update(update) = ServerMessage::decode(&frame).unwrap() else {
        panic!("not an update");
    };
    assert_eq!(update.signature, None);
    assert!(!update.rollback);
    assert_eq!(update.sent_at_ms, 0);
}
