//! Sends one build file as an HTTP response: opened once and checked to be the regular
//! file that was scanned, then the whole of it or one byte range, read straight into
//! the buffers hyper sends. `tokio::fs::File` reads into a buffer of its own and copies
//! out of it, which at loopback speeds costs a fifth of a download's CPU; reading on
//! the blocking pool into a fresh buffer per chunk costs that copy nothing.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::RangeInclusive;
use std::path::Path;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;

/// Bytes read per chunk. Every read is a trip to tokio's blocking pool, so small reads
/// cost a core at loopback speeds; 256 KiB keeps the buffer a download holds small.
pub(crate) const CHUNK_BYTES: usize = 256 * 1024;

/// A build file opened for sending.
pub(crate) struct Opened {
    file: File,
    len: u64,
}

/// Opens `path` if it is still a regular file of `len` bytes, the very file that was
/// looked at: a link, or a file swapped in between the look and the open, is `None`.
pub(crate) fn open(path: &Path, len: u64) -> io::Result<Option<Opened>> {
    let before = std::fs::symlink_metadata(path)?;
    if !before.file_type().is_file() || before.len() != len {
        return Ok(None);
    }
    let file = File::open(path)?;
    let opened = file.metadata()?;
    if !opened.file_type().is_file() || opened.len() != len || !same_file(&before, &opened) {
        return Ok(None);
    }
    Ok(Some(Opened { file, len }))
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    true
}

/// The response to a GET (or HEAD) of `opened`, whose content's strong validator is
/// `etag` (the build's digest): the whole file, the one range asked for (`206`), or
/// `416` for a range outside it or several ranges at once. An `If-Range` that does not
/// name `etag` gets the whole file.
pub(crate) fn respond(opened: Opened, request: &HeaderMap, etag: &str) -> Response {
    let etag = format!("\"{etag}\"");
    let len = opened.len;
    let range = match request.get(header::RANGE) {
        Some(value) if if_range_holds(request, &etag) => match byte_range(value, len) {
            Ok(range) => Some(range),
            Err(()) => {
                return Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                    .header(header::ACCEPT_RANGES, "bytes")
                    .body(Body::from("the range asked for is not within the file"))
                    .unwrap_or_default();
            }
        },
        _ => None,
    };
    let (status, start, count) = match &range {
        Some(range) => (
            StatusCode::PARTIAL_CONTENT,
            *range.start(),
            range.end() - range.start() + 1,
        ),
        None => (StatusCode::OK, 0, len),
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, count)
        .header(header::ETAG, &etag);
    if let Some(range) = range {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{len}", range.start(), range.end()),
        );
    }
    builder
        .body(Body::from_stream(chunks(opened.file, start, count)))
        .unwrap_or_default()
}

/// Whether a `Range` applies: always without `If-Range`, and with it only when it names
/// this content's entity tag (a date never does: no dates are sent).
fn if_range_holds(request: &HeaderMap, etag: &str) -> bool {
    request
        .get(header::IF_RANGE)
        .is_none_or(|value| value.as_bytes() == etag.as_bytes())
}

/// The one range a `Range` header asks for within `len` bytes, or `Err` for anything
/// that cannot be served as one range (malformed, outside the file, several ranges).
fn byte_range(value: &HeaderValue, len: u64) -> Result<RangeInclusive<u64>, ()> {
    let text = value.to_str().map_err(|_| ())?;
    let ranges = http_range_header::parse_range_header(text)
        .and_then(|parsed| parsed.validate(len))
        .map_err(|_| ())?;
    match ranges.as_slice() {
        [range] => Ok(range.clone()),
        _ => Err(()),
    }
}

/// `count` bytes of `file` from `start`, a chunk at a time. A file that turns out
/// shorter ends the body with an error, so the peer sees a cut, never a short success.
fn chunks(
    file: File,
    start: u64,
    count: u64,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send {
    let first = Reading {
        file,
        position: Some(start),
        left: count,
    };
    futures_util::stream::try_unfold(first, |reading| async move {
        if reading.left == 0 {
            return Ok(None);
        }
        let (reading, chunk) = tokio::task::spawn_blocking(move || reading.next_chunk())
            .await
            .map_err(io::Error::other)??;
        Ok(Some((chunk, reading)))
    })
}

struct Reading {
    file: File,
    /// Where to seek before the next read; `None` once there.
    position: Option<u64>,
    left: u64,
}

impl Reading {
    fn next_chunk(mut self) -> io::Result<(Reading, Bytes)> {
        if let Some(position) = self.position.take() {
            self.file.seek(SeekFrom::Start(position))?;
        }
        let want = usize::try_from(self.left).map_or(CHUNK_BYTES, |left| left.min(CHUNK_BYTES));
        let mut chunk = Vec::with_capacity(want);
        (&mut self.file).take(want as u64).read_to_end(&mut chunk)?;
        if chunk.len() < want {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the build file got shorter while it was being sent",
            ));
        }
        self.left -= want as u64;
        Ok((self, Bytes::from(chunk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(value: &str, len: u64) -> Result<RangeInclusive<u64>, ()> {
        byte_range(&HeaderValue::from_str(value).unwrap(), len)
    }

    #[test]
    fn one_range_within_the_file_is_served_and_anything_else_is_not() {
        assert_eq!(range("bytes=0-0", 10), Ok(0..=0));
        assert_eq!(range("bytes=4-", 10), Ok(4..=9));
        assert_eq!(range("bytes=-3", 10), Ok(7..=9));
        assert_eq!(range("bytes=2-5", 10), Ok(2..=5));
        assert_eq!(range("bytes=10-", 10), Err(()));
        assert_eq!(range("bytes=5-2", 10), Err(()));
        assert_eq!(range("bytes=0-1,4-5", 10), Err(()));
        assert_eq!(range("items=0-1", 10), Err(()));
        assert_eq!(range("bytes=x-", 10), Err(()));
    }

    async fn body_of(response: Response) -> Result<Vec<u8>, axum::Error> {
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await?;
        Ok(bytes.to_vec())
    }

    fn file_of(dir: &Path, content: &[u8]) -> std::path::PathBuf {
        let path = dir.join("build");
        std::fs::write(&path, content).unwrap();
        path
    }

    #[tokio::test]
    async fn the_whole_file_and_ranges_come_back_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        // Several chunks and a part of one.
        let content: Vec<u8> = (0..(CHUNK_BYTES * 3 + 1234) as u32)
            .map(|i| (i % 251) as u8)
            .collect();
        let path = file_of(dir.path(), &content);
        let len = content.len() as u64;

        let whole = respond(open(&path, len).unwrap().unwrap(), &HeaderMap::new(), "d");
        assert_eq!(whole.status(), StatusCode::OK);
        assert_eq!(whole.headers()[header::CONTENT_LENGTH], len.to_string());
        assert_eq!(whole.headers()[header::ETAG], "\"d\"");
        assert_eq!(body_of(whole).await.unwrap(), content);

        let mut asked = HeaderMap::new();
        asked.insert(
            header::RANGE,
            HeaderValue::from_static("bytes=262000-600000"),
        );
        let part = respond(open(&path, len).unwrap().unwrap(), &asked, "d");
        assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            part.headers()[header::CONTENT_RANGE],
            format!("bytes 262000-600000/{len}")
        );
        assert_eq!(body_of(part).await.unwrap(), &content[262_000..=600_000]);

        // A stale If-Range gets the whole file; a matching one the range.
        asked.insert(header::IF_RANGE, HeaderValue::from_static("\"other\""));
        let stale = respond(open(&path, len).unwrap().unwrap(), &asked, "d");
        assert_eq!(stale.status(), StatusCode::OK);
        asked.insert(header::IF_RANGE, HeaderValue::from_static("\"d\""));
        let fresh = respond(open(&path, len).unwrap().unwrap(), &asked, "d");
        assert_eq!(fresh.status(), StatusCode::PARTIAL_CONTENT);

        asked.insert(header::RANGE, HeaderValue::from_static("bytes=999999999-"));
        let outside = respond(open(&path, len).unwrap().unwrap(), &asked, "d");
        assert_eq!(outside.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(
            outside.headers()[header::CONTENT_RANGE],
            format!("bytes */{len}")
        );
    }

    #[tokio::test]
    async fn a_file_cut_short_while_sent_ends_the_body_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let content = vec![7u8; CHUNK_BYTES * 2];
        let path = file_of(dir.path(), &content);
        let opened = open(&path, content.len() as u64).unwrap().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(100)
            .unwrap();
        let response = respond(opened, &HeaderMap::new(), "d");
        assert!(body_of(response).await.is_err());
    }

    #[test]
    fn only_the_regular_file_of_the_scanned_size_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_of(dir.path(), b"0123456789");
        assert!(open(&path, 10).unwrap().is_some());
        assert!(open(&path, 11).unwrap().is_none(), "another size");
        assert!(open(dir.path(), 10).unwrap().is_none(), "a directory");
        #[cfg(unix)]
        {
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&path, &link).unwrap();
            assert!(open(&link, 10).unwrap().is_none(), "a link");
        }
        assert!(open(&dir.path().join("gone"), 10).is_err());
    }
}
