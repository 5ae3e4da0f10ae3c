//! Property tests: every message survives encode then decode unchanged, and no byte
//! string makes the decoder panic.

use proptest::prelude::*;
use protocol::*;

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn stage() -> impl Strategy<Value = UpdateStage> {
    prop_oneof![
        Just(UpdateStage::Downloading),
        Just(UpdateStage::Verifying),
        Just(UpdateStage::Installing),
        Just(UpdateStage::Restarting),
    ]
}

fn outcome() -> impl Strategy<Value = UpdateOutcome> {
    prop_oneof![
        Just(UpdateOutcome::Succeeded),
        Just(UpdateOutcome::Failed),
        Just(UpdateOutcome::RolledBack),
    ]
}

fn reject_code() -> impl Strategy<Value = RejectCode> {
    prop_oneof![
        Just(RejectCode::BadCredentials),
        Just(RejectCode::BadEnrollToken),
        Just(RejectCode::ExpectedHello),
        Just(RejectCode::UnsupportedProtocol),
        Just(RejectCode::MalformedFrame),
        Just(RejectCode::FrameTooLarge),
        Just(RejectCode::Replaced),
        Just(RejectCode::Timeout),
        Just(RejectCode::ServerError),
        Just(RejectCode::RateLimited),
    ]
}

fn agent_message() -> impl Strategy<Value = AgentMessage> {
    let hello = (
        (
            proptest::option::of(text()),
            proptest::option::of(text()),
            proptest::option::of(text()),
        ),
        (text(), text(), text(), text(), text()),
        any::<bool>(),
    )
        .prop_map(
            |(
                (agent_id, secret, enroll_token),
                (fingerprint, hostname, version, os, arch),
                auto_update,
            )| {
                AgentMessage::Hello(Hello {
                    agent_id,
                    secret,
                    enroll_token,
                    fingerprint,
                    hostname,
                    version,
                    os,
                    arch,
                    auto_update,
                })
            },
        );
    let heartbeat = (any::<u64>(), text())
        .prop_map(|(seq, version)| AgentMessage::Heartbeat(Heartbeat { seq, version }));
    let kind = prop_oneof![
        Just(TransferKind::Full),
        Just(TransferKind::Compressed),
        Just(TransferKind::Delta),
    ];
    let transfer =
        proptest::option::of((kind, proptest::option::of(any::<u64>()))).prop_map(|transfer| {
            transfer.map(|(kind, bytes)| Transfer {
                source: TransferSource::Server,
                fallback: None,
                fallback_error: None,
                kind,
                bytes,
            })
        });
    let progress = (text(), stage(), any::<u64>(), any::<u64>(), transfer).prop_map(
        |(task_id, stage, bytes_done, bytes_total, transfer)| {
            AgentMessage::UpdateProgress(UpdateProgress {
                task_id,
                stage,
                bytes_done,
                bytes_total,
                transfer,
            })
        },
    );
    let class = prop_oneof![
        Just(FailureClass::Build),
        Just(FailureClass::Environment),
        Just(FailureClass::Transient),
    ];
    let result = (
        text(),
        outcome(),
        text(),
        proptest::option::of(text()),
        proptest::option::of(class),
    )
        .prop_map(|(task_id, outcome, version, error, failure_class)| {
            AgentMessage::UpdateResult(UpdateResult {
                task_id,
                outcome,
                version,
                error,
                failure_class,
                transfer: None,
            })
        });
    prop_oneof![hello, heartbeat, progress, result]
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    let welcome = (
        text(),
        proptest::option::of(text()),
        any::<u32>(),
        text(),
        proptest::option::of(text()),
    )
        .prop_map(
            |(agent_id, secret, heartbeat_interval_secs, server_version, channel)| {
                ServerMessage::Welcome(Welcome {
                    agent_id,
                    secret,
                    heartbeat_interval_secs,
                    server_version,
                    channel,
                })
            },
        );
    let channel = text().prop_map(|channel| ServerMessage::Channel(ChannelNotice { channel }));
    let update = (
        (text(), text(), text(), text()),
        (
            any::<u64>(),
            proptest::option::of(text()),
            any::<bool>(),
            any::<u64>(),
        ),
        proptest::option::of((text(), text(), any::<u64>(), text())),
        proptest::option::of(((text(), text(), text()), (text(), any::<u64>(), text()))),
    )
        .prop_map(
            |(
                (task_id, version, url, sha256),
                (size, signature, rollback, sent_at_ms),
                compressed,
                delta,
            )| {
                ServerMessage::Update(Box::new(Update {
                    task_id,
                    version,
                    url,
                    sha256,
                    size,
                    signature,
                    rollback,
                    sent_at_ms,
                    mirror_url: None,
                    compressed: compressed.map(|(encoding, url, size, sha256)| CompressedBuild {
                        encoding,
                        url,
                        size,
                        sha256,
                    }),
                    delta: delta.map(
                        |((encoding, base_version, base_sha256), (url, size, sha256))| DeltaBuild {
                            encoding,
                            base_version,
                            base_sha256,
                            url,
                            size,
                            sha256,
                        },
                    ),
                }))
            },
        );
    let cancel = (text(), text())
        .prop_map(|(task_id, reason)| ServerMessage::Cancel(Cancel { task_id, reason }));
    let reject = (reject_code(), text())
        .prop_map(|(code, message)| ServerMessage::Reject(Reject { code, message }));
    prop_oneof![welcome, update, cancel, reject, channel]
}

proptest! {
    #[test]
    fn agent_messages_round_trip(message in agent_message()) {
        prop_assert_eq!(AgentMessage::decode(&message.encode()), Ok(message));
    }

    #[test]
    fn server_messages_round_trip(message in server_message()) {
        prop_assert_eq!(ServerMessage::decode(&message.encode()), Ok(message));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = AgentMessage::decode(&bytes);
        let _ = ServerMessage::decode(&bytes);
    }
}
