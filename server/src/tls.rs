//! HTTPS and WSS on the server's own listener: the certificate and key from PEM files,
//! and the handshake each accepted connection makes in its own task (with a time limit),
//! so a slow or silent client delays no one else.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

/// A client that has not finished its handshake by then is dropped, so silent
/// connections cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a plain HTTP request to the TLS port is answered with, instead of a reset.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: text/plain; charset=utf-8\r\n\
connection: close\r\n\
content-length: 64\r\n\
\r\n\
this server speaks HTTPS only: use https:// (or wss://) instead\n";

/// The certificate chain and key the server presents, ready to serve.
#[derive(Clone)]
pub struct TlsConfig(Arc<ServerConfig>);

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsConfig")
    }
}

/// Reads a PEM certificate chain (server certificate first) and its PEM private key.
/// Every error names the file it is about.
pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<TlsConfig> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("while reading the TLS certificate {}", cert_file.display()))?;
    if certs.is_empty() {
        bail!(
            "the TLS certificate file {} holds no PEM certificate",
            cert_file.display()
        );
    }
    let key = match PrivateKeyDer::from_pem_file(key_file) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => bail!(
            "the TLS key file {} holds no PEM private key",
            key_file.display()
        ),
        Err(err) => {
            return Err(err)
                .with_context(|| format!("while reading the TLS key {}", key_file.display()));
        }
    };
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("the TLS library offers no protocol version")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "cannot use the TLS key {} with the certificate {}",
                key_file.display(),
                cert_file.display()
            )
        })?;
    // The server speaks HTTP/1.1 only (the WebSocket upgrade needs it).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConfig(Arc::new(config)))
}

/// Completes the TLS handshake of an accepted connection, wrapped by `wrap` once it is
/// known to speak TLS; `None` (and a debug line) when it fails or times out. A plain
/// HTTP request is answered with a 400 saying to use https.
pub(crate) async fn handshake<I>(
    config: &TlsConfig,
    tcp: TcpStream,
    peer: SocketAddr,
    wrap: impl FnOnce(TcpStream) -> I,
) -> Option<TlsStream<I>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = TlsAcceptor::from(config.0.clone());
    let attempt = async {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 1 && first[0] != TLS_HANDSHAKE_RECORD {
            let mut tcp = tcp;
            tcp.write_all(PLAIN_HTTP_ANSWER).await?;
            tcp.shutdown().await?;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "plain HTTP on the TLS port",
            ));
        }
        acceptor.accept(wrap(tcp)).await
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
        Ok(Ok(tls)) => Some(tls),
        // Scanners and misconfigured clients: worth a debug line, not a warning each.
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_declares_its_length() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let declared = format!("content-length: {}", body.len());
        assert!(head.lines().any(|line| line == declared), "{head}");
    }

    #[test]
    fn a_certificate_and_its_key_load() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "a");
        load(&cert, &key).unwrap();
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "a");
        let (_, other_key) = self_signed(dir.path(), "b");
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let cases = [
            (
                &missing,
                &key,
                "while reading the TLS certificate",
                &missing,
            ),
            (&garbage, &key, "holds no PEM certificate", &garbage),
            (&cert, &missing, "while reading the TLS key", &missing),
            (&cert, &garbage, "holds no PEM private key", &garbage),
            // A certificate in place of the key: no key in it.
            (&cert, &cert, "holds no PEM private key", &cert),
            (&cert, &other_key, "cannot use the TLS key", &other_key),
        ];
        for (cert, key, expected, named) in cases {
            let err = format!("{:#}", load(cert, key).unwrap_err());
            assert!(err.contains(expected), "{err}");
            assert!(err.contains(&named.display().to_string()), "{err}");
        }
    }

    /// Writes a self-signed certificate for localhost and its key as `<name>.crt/.key`.
    fn self_signed(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }
}
