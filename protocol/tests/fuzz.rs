//! Hostile frames: random bytes, mutated golden frames, deep nesting and lengths that
//! claim gigabytes go to both decoders. Each must come back as a message or a
//! `DecodeError` whose reject code the peer can be told: never a panic, a stack overflow
//! or an allocation sized by the attacker. Decoding runs on a thread with a small stack,
//! so unbounded recursion would fail here rather than in a server.

use std::path::PathBuf;

use proptest::prelude::*;
use protocol::*;

/// Far less than a server's worker threads get; decoding must fit in it.
const DECODER_STACK: usize = 256 * 1024;

/// Decodes `frame` both ways on a small-stack thread; returns each decoder's error, or
/// `None` where the frame decoded.
fn decode_both(frame: Vec<u8>) -> [Option<DecodeError>; 2] {
    std::thread::Builder::new()
        .stack_size(DECODER_STACK)
        .spawn(move || {
            let agent = AgentMessage::decode(&frame).err();
            let server = ServerMessage::decode(&frame).err();
            [agent, server]
        })
        .unwrap()
        .join()
        .expect("decoding never panics")
}

/// An error must name a reject code and say what is wrong.
fn assert_clear(errors: &[Option<DecodeError>; 2]) {
    for err in errors.iter().flatten() {
        assert_ne!(err.reject_code(), RejectCode::Unknown);
        assert!(!err.to_string().trim().is_empty());
    }
}

fn golden_frames() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/v1");
    let mut frames: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            hex::decode(text.trim()).unwrap()
        })
        .collect();
    frames.sort();
    assert!(frames.len() >= 10, "golden frames are missing");
    frames
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    Insert {
        at: usize,
        byte: u8,
    },
    Delete {
        at: usize,
    },
    Truncate {
        at: usize,
    },
    /// Bytes that start long or nested values, or are not MessagePack at all.
    Overwrite {
        at: usize,
        byte: u8,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop::sample::select(vec![
        0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc6, 0xc9, 0xcf, 0xd3, 0xd9,
        0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xff,
    ]);
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        any::<usize>().prop_map(|at| Mutation::Delete { at }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), interesting).prop_map(|(at, byte)| Mutation::Overwrite { at, byte }),
    ]
}

fn mutate(mut frame: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = frame.len().max(1);
        match *m {
            Mutation::FlipBit { at, bit } => {
                if let Some(byte) = frame.get_mut(at % len) {
                    *byte ^= 1 << bit;
                }
            }
            Mutation::Insert { at, byte } => frame.insert(at % (frame.len() + 1), byte),
            Mutation::Delete { at } => {
                if !frame.is_empty() {
                    frame.remove(at % len);
                }
            }
            Mutation::Truncate { at } => frame.truncate(at % len),
            Mutation::Overwrite { at, byte } => {
                if let Some(slot) = frame.get_mut(at % len) {
                    *slot = byte;
                }
            }
        }
    }
    frame
}

/// `{"v": 1, "type": "heartbeat", "seq": 1, "version": "1.0.0", "extra": <value>}`: a
/// valid heartbeat carrying `value` under a key this version does not know.
fn heartbeat_with_extra(value: &[u8]) -> Vec<u8> {
    let mut frame =
        b"\x85\xa1v\x01\xa4type\xa9heartbeat\xa3seq\x01\xa7version\xa51.0.0\xa5extra".to_vec();
    frame.extend_from_slice(value);
    frame
}

/// `depth` arrays or maps inside each other around a 1.
fn nested(depth: usize, maps: bool) -> Vec<u8> {
    let mut value = Vec::with_capacity(depth * 3 + 1);
    for _ in 0..depth {
        if maps {
            value.extend_from_slice(b"\x81\xa1k");
        } else {
            value.push(0x91);
        }
    }
    value.push(0x01);
    value
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_decode_or_fail_clearly(frame in prop::collection::vec(any::<u8>(), 0..600)) {
        assert_clear(&decode_both(frame));
    }

    /// Bytes that at least start like a frame (a map, then MessagePack-ish content) get
    /// further into the decoder than uniform noise does.
    #[test]
    fn map_shaped_noise_decodes_or_fails_clearly(
        pairs in 0u8..16,
        body in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut frame = vec![0x80 | pairs, 0xa1, b'v', 0x01];
        frame.extend(body);
        assert_clear(&decode_both(frame));
    }

    #[test]
    fn mutated_golden_frames_decode_or_fail_clearly(
        which in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let frames = golden_frames();
        let frame = mutate(frames[which.index(frames.len())].clone(), &mutations);
        assert_clear(&decode_both(frame));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Nesting within the limit is an unknown field like any other; deeper is refused
    /// before serde recurses into it, up to the deepest a 64 KiB frame can hold.
    #[test]
    fn deep_nesting_is_refused_without_recursion(depth in 0usize..20_000, maps in any::<bool>()) {
        let [agent, server] = decode_both(heartbeat_with_extra(&nested(depth, maps)));
        // The frame's own map is the first level.
        if depth < MAX_NESTING {
            prop_assert_eq!(agent, None);
            prop_assert_eq!(server, None);
        } else {
            for err in [agent, server] {
                let err = err.expect("too deep to decode");
                prop_assert_eq!(err.reject_code(), RejectCode::MalformedFrame);
                prop_assert!(err.to_string().contains("nested deeper"), "{}", err);
            }
        }
        // Bare nesting, not a frame at all.
        assert_clear(&decode_both(nested(depth, maps)));
    }
}

#[test]
fn the_deepest_nesting_a_frame_can_hold_is_refused() {
    let frame = vec![0x91; MAX_FRAME_BYTES];
    for err in decode_both(frame) {
        let err = err.expect("not a message");
        assert_eq!(err.reject_code(), RejectCode::MalformedFrame);
        assert!(err.to_string().contains("nested deeper"), "{err}");
    }
}

/// A header claiming 4 GB (or 4 billion items) with a handful of bytes behind it, in
/// every place a value can stand: refused for what it claims, before anything is
/// allocated for it.
#[test]
fn lengths_claiming_gigabytes_are_refused_before_allocation() {
    let headers: [(&str, &[u8]); 6] = [
        ("str32", b"\xdb\xff\xff\xff\xff"),
        ("bin32", b"\xc6\xff\xff\xff\xff"),
        ("ext32", b"\xc9\xff\xff\xff\xff\x01"),
        ("array32", b"\xdd\xff\xff\xff\xff"),
        ("map32", b"\xdf\xff\xff\xff\xff"),
        ("array16", b"\xdc\xff\xff"),
    ];
    for (name, header) in headers {
        let mut tail = header.to_vec();
        tail.extend_from_slice(b"\x01\x02\x03abc");
        let placements = [
            ("the whole frame", tail.clone()),
            ("an unknown field", heartbeat_with_extra(&tail)),
            ("the version field", {
                let mut frame =
                    b"\x84\xa1v\x01\xa4type\xa9heartbeat\xa3seq\x01\xa7version".to_vec();
                frame.extend_from_slice(&tail);
                frame
            }),
            ("a key", {
                let mut frame = b"\x83\xa1v\x01\xa4type\xa9heartbeat".to_vec();
                frame.extend_from_slice(&tail);
                frame.push(0x01);
                frame
            }),
            ("the map of the frame", {
                let mut frame = b"\xdf\xff\xff\xff\xff\xa1v\x01\xa4type\xa9heartbeat".to_vec();
                frame.extend_from_slice(&tail);
                frame
            }),
        ];
        for (place, frame) in placements {
            for err in decode_both(frame) {
                let err = err.unwrap_or_else(|| panic!("{name} in {place} decoded"));
                assert_eq!(
                    err.reject_code(),
                    RejectCode::MalformedFrame,
                    "{name} in {place}"
                );
                let text = err.to_string();
                assert!(
                    text.contains("more than the") || text.contains("left in the frame"),
                    "{name} in {place}: {text}"
                );
            }
        }
    }
}

/// The checks before decoding refuse nothing that version 1 writes.
#[test]
fn golden_frames_still_decode() {
    for frame in golden_frames() {
        let [agent, server] = decode_both(frame.clone());
        assert!(
            agent.is_none() || server.is_none(),
            "{}: {agent:?} {server:?}",
            hex::encode(&frame)
        );
    }
}
