//! Which servers the agent trusts over TLS. By default the built-in web roots (what
//! reqwest and tokio-tungstenite ship); with `--ca-file` only that CA, for the WebSocket
//! and the downloads alike.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::crypto::ring;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

/// A client configuration trusting only the CA certificates in the PEM file `ca_file`.
pub(crate) fn pinned(ca_file: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("while reading the CA file {}", ca_file.display()))?;
    if certs.is_empty() {
        bail!("the CA file {} holds no PEM certificate", ca_file.display());
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).with_context(|| {
            format!(
                "the CA file {} holds a certificate that cannot be used",
                ca_file.display()
            )
        })?;
    }
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("the TLS library offers no protocol version")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let cases = [
            (&missing, "while reading the CA file"),
            (&empty, "holds no PEM certificate"),
            (&broken, "cannot be used"),
        ];
        for (file, expected) in cases {
            let err = format!("{:#}", pinned(file).unwrap_err());
            assert!(err.contains(expected), "{err}");
            assert!(err.contains(&file.display().to_string()), "{err}");
        }
    }
}
