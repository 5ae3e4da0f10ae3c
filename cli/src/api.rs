//! The HTTP side of `drover`: one authenticated request helper that turns the server's
//! error answers into errors.

use std::path::Path;

use anyhow::{Context, bail};
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub(crate) struct Api {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Api {
    /// With `ca_file`, only the CA certificates in that PEM file are trusted for TLS.
    pub(crate) fn new(server: &str, token: String, ca_file: Option<&Path>) -> anyhow::Result<Api> {
        let mut http = reqwest::blocking::Client::builder();
        if let Some(ca_file) = ca_file {
            let pem = std::fs::read(ca_file)
                .with_context(|| format!("while reading the CA file {}", ca_file.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("the CA file {} is not PEM", ca_file.display()))?;
            if certs.is_empty() {
                bail!("the CA file {} holds no PEM certificate", ca_file.display());
            }
            http = http.tls_built_in_root_certs(false);
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        Ok(Api {
            base: server.trim_end_matches('/').to_owned(),
            token,
            http: http.build().context("while setting up the HTTP client")?,
        })
    }

    pub(crate) fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.request(Method::GET, path, None)
    }

    /// A GET with query parameters; those that are `None` are left out.
    pub(crate) fn get_with_query(
        &self,
        path: &str,
        query: &[(&str, Option<String>)],
    ) -> anyhow::Result<Value> {
        let given: Vec<_> = query
            .iter()
            .filter_map(|(key, value)| Some((*key, value.as_deref()?)))
            .collect();
        self.send(Method::GET, path, &given, None)
    }

    /// A GET whose answer is bytes (a build), to be read as a stream; an error status is
    /// an error.
    pub(crate) fn download(&self, path: &str) -> anyhow::Result<reqwest::blocking::Response> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .with_context(|| format!("could not reach the server at {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.json::<Value>().unwrap_or(Value::Null);
        bail!(error_message(status, &body))
    }

    /// A GET of somewhere other than the server (a mirror): never with the token.
    pub(crate) fn fetch_elsewhere(
        &self,
        url: &str,
    ) -> reqwest::Result<reqwest::blocking::Response> {
        self.http.get(url).send()
    }

    /// Sends one API call; `body`, when given, goes as JSON.
    pub(crate) fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        self.send(method, path, &[], body)
    }

    fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .query(query)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .with_context(|| format!("could not reach the server at {}", self.base))?;
        let status = response.status();
        let text = response
            .text()
            .with_context(|| format!("could not read the server's answer to {method} {path}"))?;
        // A proxy in front of the server may answer errors with HTML, so a non-JSON error
        // still reports its status.
        match serde_json::from_str::<Value>(&text) {
            Ok(body) if status.is_success() => Ok(body),
            Ok(body) => bail!(error_message(status, &body)),
            Err(_) if status.is_success() => {
                bail!("the server's answer to {method} {path} is not JSON")
            }
            Err(_) => bail!("{status} from {method} {path}"),
        }
    }
}

/// `{"error": "...", "detail": ...}` as one line, e.g. `409 Conflict conflict: ...`.
fn error_message(status: StatusCode, body: &Value) -> String {
    let error = body["error"].as_str().unwrap_or("request failed");
    let detail = match &body["detail"] {
        Value::Null => String::new(),
        Value::String(s) => format!(": {s}"),
        other => format!(": {other}"),
    };
    format!("{status} {error}{detail}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bad_ca_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        for (file, expected) in [
            (&missing, "while reading the CA file"),
            (&empty, "holds no PEM certificate"),
        ] {
            let err = Api::new("https://127.0.0.1:1", "t".into(), Some(file))
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default();
            assert!(err.contains(expected), "{err}");
            assert!(err.contains(&file.display().to_string()), "{err}");
        }
    }

    #[test]
    fn error_message_shows_status_error_and_detail() {
        let cases = [
            (
                StatusCode::CONFLICT,
                json!({"error": "conflict", "detail": "the agent already runs 1.2.0"}),
                "409 Conflict conflict: the agent already runs 1.2.0",
            ),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "internal error", "detail": null}),
                "500 Internal Server Error internal error",
            ),
            (
                StatusCode::BAD_REQUEST,
                json!({"error": "bad request", "detail": {"field": "name"}}),
                r#"400 Bad Request bad request: {"field":"name"}"#,
            ),
            (
                StatusCode::NOT_FOUND,
                json!({}),
                "404 Not Found request failed",
            ),
        ];
        for (status, body, expected) in cases {
            assert_eq!(error_message(status, &body), expected);
        }
    }
}
