//! Turning a downloaded compressed copy, or a delta with the build it starts from, back
//! into the build: streaming, in bounded memory, and never beyond the build's declared
//! size, so a copy that inflates without end (a decompression bomb) fails instead of
//! filling the disk.

use std::io::{Read, Write};
use std::path::Path;

/// The largest zstd window accepted (16 MiB), which bounds what decompressing holds in
/// memory. The server compresses at levels that use at most 8 MiB.
const WINDOW_LOG_MAX: u32 = 24;

/// Bytes decompressed per step.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub(crate) enum DecompressError {
    /// The copy is not a zstd stream this agent can read (corrupt, truncated, or a
    /// window beyond `WINDOW_LOG_MAX`).
    #[error("the compressed copy does not decompress: {0}")]
    Corrupt(String),
    #[error("the compressed copy inflates beyond the build's {0} bytes")]
    TooLarge(u64),
    #[error("the compressed copy holds {got} of the build's {size} bytes")]
    Short { got: u64, size: u64 },
    /// A delta's base (the agent's own executable) could not be read.
    #[error("cannot read the delta's base {0}")]
    Base(String),
    /// This machine: the copy could not be read or the build not written (a full disk).
    #[error("{0}")]
    Io(std::io::Error),
}

/// Decompresses the zstd stream in `src` into `dst` (created or truncated), which then
/// holds exactly `size` bytes, flushed to disk. On any error `dst` is removed.
pub(crate) fn decompress_limited(src: &Path, dst: &Path, size: u64) -> Result<(), DecompressError> {
    limited(src, None, dst, size)
}

/// Rebuilds a build from the `zstd-patch` delta in `src` and the build it starts from
/// (the file `base`, read whole: the delta refers into it anywhere), into `dst` as
/// `decompress_limited` does. The window the delta may use follows from the two sizes
/// (`protocol::delta_window_log`).
pub(crate) fn patch_limited(
    src: &Path,
    base: &Path,
    dst: &Path,
    size: u64,
) -> Result<(), DecompressError> {
    let base = std::fs::read(base)
        .map_err(|err| DecompressError::Base(format!("{}: {err}", base.display())))?;
    limited(src, Some(&base), dst, size)
}

fn limited(src: &Path, base: Option<&[u8]>, dst: &Path, size: u64) -> Result<(), DecompressError> {
    let result = decompress_into(src, base, dst, size);
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn decompress_into(
    src: &Path,
    base: Option<&[u8]>,
    dst: &Path,
    size: u64,
) -> Result<(), DecompressError> {
    let input = std::io::BufReader::new(std::fs::File::open(src).map_err(DecompressError::Io)?);
    let decoder = match base {
        None => {
            zstd::stream::read::Decoder::with_buffer(input).map(|decoder| (decoder, WINDOW_LOG_MAX))
        }
        Some(base) => zstd::stream::read::Decoder::with_ref_prefix(input, base)
            .map(|decoder| (decoder, protocol::delta_window_log(base.len() as u64, size))),
    };
    let mut decoder = decoder
        .and_then(|(mut decoder, window_log)| {
            decoder.window_log_max(window_log)?;
            Ok(decoder)
        })
        .map_err(DecompressError::Io)?;
    let mut output = std::fs::File::create(dst).map_err(DecompressError::Io)?;
    let mut buffer = vec![0; CHUNK];
    let mut got = 0u64;
    loop {
        let n = match decoder.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(DecompressError::Corrupt(err.to_string())),
        };
        got += n as u64;
        if got > size {
            return Err(DecompressError::TooLarge(size));
        }
        output
            .write_all(&buffer[..n])
            .map_err(DecompressError::Io)?;
    }
    if got != size {
        return Err(DecompressError::Short { got, size });
    }
    output
        .flush()
        .and_then(|()| output.sync_all())
        .map_err(DecompressError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build() -> Vec<u8> {
        (0..300_000u32)
            .flat_map(|i| (i % 97).to_be_bytes())
            .collect()
    }

    /// (what is in the copy, the declared size, what should happen)
    #[test]
    fn only_a_copy_of_exactly_the_declared_size_decompresses() {
        let build = build();
        let copy = zstd::encode_all(&build[..], 19).unwrap();
        let size = build.len() as u64;
        let mut truncated = copy.clone();
        truncated.truncate(copy.len() / 2);
        let mut flipped = copy.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0xff;
        let cases: [(&str, Vec<u8>, u64, &str); 7] = [
            ("the build", copy.clone(), size, "ok"),
            (
                "one byte short of declared",
                copy.clone(),
                size - 1,
                "too large",
            ),
            (
                "a bomb",
                zstd::encode_all(&vec![0u8; 16 << 20][..], 3).unwrap(),
                size,
                "too large",
            ),
            ("more declared than held", copy.clone(), size + 1, "short"),
            ("truncated", truncated, size, "corrupt"),
            ("a flipped byte", flipped, size, "corrupt"),
            (
                "not zstd",
                b"#!/bin/sh\necho hello\n".to_vec(),
                size,
                "corrupt",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("copy.zst"), dir.path().join("build.part"));
        for (what, bytes, declared, expected) in cases {
            std::fs::write(&src, &bytes).unwrap();
            std::fs::write(&dst, b"left from before").unwrap();
            let outcome = match decompress_limited(&src, &dst, declared) {
                Ok(()) => "ok",
                Err(DecompressError::TooLarge(_)) => "too large",
                Err(DecompressError::Short { .. }) => "short",
                Err(DecompressError::Corrupt(_)) => "corrupt",
                Err(err @ (DecompressError::Io(_) | DecompressError::Base(_))) => {
                    panic!("{what}: {err}")
                }
            };
            // A flipped byte inside a block may decode to wrong bytes of the right length;
            // the build's digest is checked after, so either is a refusal in the end.
            if what == "a flipped byte" && outcome == "ok" {
                assert_ne!(std::fs::read(&dst).unwrap(), build, "{what}");
                continue;
            }
            assert_eq!(outcome, expected, "{what}");
            if outcome == "ok" {
                assert_eq!(std::fs::read(&dst).unwrap(), build, "{what}");
            } else {
                assert!(
                    !dst.exists(),
                    "{what}: nothing is left to resume or install"
                );
            }
        }
    }

    #[test]
    fn a_delta_rebuilds_the_build_only_from_its_own_base() {
        // Incompressible on its own: only the base can supply its bytes.
        let base: Vec<u8> = (0..300_000).map(|_| rand::random::<u8>()).collect();
        let mut next = base.clone();
        next[5000..5008].copy_from_slice(b"1.0.1 ok");
        let size = next.len() as u64;
        let mut encoder = zstd::stream::Encoder::with_ref_prefix(Vec::new(), 3, &base).unwrap();
        encoder
            .window_log(protocol::delta_window_log(base.len() as u64, size))
            .unwrap();
        std::io::Write::write_all(&mut encoder, &next).unwrap();
        let delta = encoder.finish().unwrap();
        assert!(delta.len() < 200, "{} bytes", delta.len());
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("delta"), dir.path().join("build.part"));
        std::fs::write(&src, &delta).unwrap();
        // The base as a file, as the agent's executable is.
        let base_file = |bytes: &[u8]| {
            let path = dir.path().join("base");
            std::fs::write(&path, bytes).unwrap();
            path
        };
        patch_limited(&src, &base_file(&base), &dst, size).unwrap();
        assert!(std::fs::read(&dst).unwrap() == next);

        // Another base rebuilds other bytes (or none); the build's digest decides after.
        let mut other = base.clone();
        other[100] ^= 0xff;
        match patch_limited(&src, &base_file(&other), &dst, size) {
            Ok(()) => assert!(std::fs::read(&dst).unwrap() != next),
            Err(DecompressError::Corrupt(_)) => assert!(!dst.exists()),
            Err(err) => panic!("{err}"),
        }
        // A shorter base cannot hold what the delta refers to.
        let err = patch_limited(&src, &base_file(&base[..1000]), &dst, size).unwrap_err();
        assert!(matches!(err, DecompressError::Corrupt(_)), "{err}");
        assert!(!dst.exists());
        // A delta that claims more than the build is refused as it inflates.
        let err = patch_limited(&src, &base_file(&base), &dst, size - 1).unwrap_err();
        assert!(matches!(err, DecompressError::TooLarge(_)), "{err}");
        // A base that cannot be read is the delta's failure, not this machine's.
        let err = patch_limited(&src, &dir.path().join("none"), &dst, size).unwrap_err();
        assert!(matches!(err, DecompressError::Base(_)), "{err}");
    }

    #[test]
    fn a_window_beyond_the_limit_is_refused() {
        let data = vec![7u8; 1 << 20];
        let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        encoder.window_log(WINDOW_LOG_MAX + 1).unwrap();
        // Without a content size the frame must declare its window.
        encoder.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut encoder, &data).unwrap();
        let copy = encoder.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("copy.zst"), dir.path().join("build.part"));
        std::fs::write(&src, copy).unwrap();
        let err = decompress_limited(&src, &dst, data.len() as u64).unwrap_err();
        assert!(matches!(err, DecompressError::Corrupt(_)), "{err}");
    }

    #[test]
    fn a_missing_copy_is_this_machines_error() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            decompress_limited(&dir.path().join("none"), &dir.path().join("out"), 10).unwrap_err();
        assert!(matches!(err, DecompressError::Io(_)), "{err}");
    }
}
