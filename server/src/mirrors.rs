//! Download mirrors: web servers (a CDN, a branch office's nginx) that hold copies of the
//! offered builds, so agents need not pull every build through this server. A mirror is
//! untrusted storage: agents verify what it serves exactly as the server's own bytes and
//! fall back to the server on any failure. This module owns what a mirror base URL may
//! be, which mirror an agent uses (site, then client, then the server-wide one), a
//! build's address on it, and when a mirror counts as failing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use protocol::MirrorFailure;

use crate::AppState;
use crate::clock::now_ms;
use crate::store::StoreResult;

/// Where an agent's mirror was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum MirrorSource {
    Site,
    Client,
    /// `--download-url`.
    Server,
}

impl MirrorSource {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MirrorSource::Site => "site",
            MirrorSource::Client => "client",
            MirrorSource::Server => "server",
        }
    }
}

/// The longest mirror base URL accepted.
pub(crate) const MAX_URL_BYTES: usize = 512;

/// Checks a mirror base URL and returns its normal form (no trailing slash): `http` or
/// `https`, a host, and no credentials, query or fragment (the URL is shown to viewers
/// and sent to agents, and a build's file name is appended to it).
pub(crate) fn check_base(url: &str) -> Result<String, String> {
    let trimmed = url.trim();
    if trimmed.len() > MAX_URL_BYTES {
        return Err(format!(
            "a mirror URL is at most {MAX_URL_BYTES} bytes long"
        ));
    }
    let parsed = url::Url::parse(trimmed).map_err(|e| format!("{trimmed:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "a mirror URL must be http:// or https://, not {}://",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("a mirror URL needs a host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "a mirror URL may not hold credentials (it is shown to viewers and sent to agents)"
                .into(),
        );
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("a mirror URL may not have a query or a fragment".into());
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// The mirror an agent downloads from: its site's, else its client's, else the
/// server-wide one; `None` downloads from the server itself.
pub(crate) fn resolve<'a>(
    site: Option<&'a str>,
    client: Option<&'a str>,
    server_wide: Option<&'a str>,
) -> Option<(&'a str, MirrorSource)> {
    [
        (site, MirrorSource::Site),
        (client, MirrorSource::Client),
        (server_wide, MirrorSource::Server),
    ]
    .into_iter()
    .find_map(|(base, source)| base.filter(|b| !b.is_empty()).map(|b| (b, source)))
}

/// The address of a build's file on a mirror.
pub(crate) fn build_url(base: &str, file: &str) -> String {
    format!("{}/{file}", base.trim_end_matches('/'))
}

/// What an agent said went wrong with a mirror, fit to store and show: at most
/// `TRANSFER_ERROR_LIMIT` bytes, control characters blanked.
pub(crate) fn clean_error(text: &str) -> String {
    let mut end = text.len().min(protocol::TRANSFER_ERROR_LIMIT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Downloads a failing mirror's recent record must hold: fewer say too little.
pub(crate) const FAILING_AFTER: usize = 3;

/// A mirror is failing when each of its last `FAILING_AFTER` downloads (newest first)
/// fell back to the server.
pub(crate) fn failing(newest_first: &[Option<MirrorFailure>]) -> bool {
    newest_first.len() >= FAILING_AFTER && newest_first[..FAILING_AFTER].iter().all(Option::is_some)
}

/// The period mirror health counts downloads over.
pub(crate) const HEALTH_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// Who set a mirror.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct MirrorUser {
    pub(crate) scope: MirrorSource,
    pub(crate) id: String,
    pub(crate) name: String,
}

/// One mirror: who uses it and how its downloads went over `HEALTH_PERIOD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MirrorHealth {
    pub(crate) url: String,
    /// The sites and clients that set it (and the server, for `--download-url`); empty
    /// for a mirror no longer set whose downloads are still within the period.
    pub(crate) used_by: Vec<MirrorUser>,
    /// Downloads it served (verified bytes).
    pub(crate) served: i64,
    /// Downloads that fell back to the server, by reason.
    pub(crate) fell_back: BTreeMap<&'static str, i64>,
    /// The newest fallback ever recorded: when, why and what the agent saw.
    pub(crate) last_fallback: Option<(i64, String, Option<String>)>,
    /// Its last `FAILING_AFTER` downloads all fell back.
    pub(crate) failing: bool,
}

impl MirrorHealth {
    pub(crate) fn fell_back_total(&self) -> i64 {
        self.fell_back.values().sum()
    }
}

/// Every mirror set now, and every mirror with downloads in the period, with its health.
pub(crate) async fn health(state: &AppState) -> StoreResult<Vec<MirrorHealth>> {
    let mut users: BTreeMap<String, BTreeSet<MirrorUser>> = BTreeMap::new();
    if let Some(url) = &state.settings.download_url {
        users.entry(url.clone()).or_default().insert(MirrorUser {
            scope: MirrorSource::Server,
            id: String::new(),
            name: "--download-url".into(),
        });
    }
    for client in state.store.list_clients().await? {
        if let Some(url) = client.download_mirror {
            users.entry(url).or_default().insert(MirrorUser {
                scope: MirrorSource::Client,
                id: client.id,
                name: client.name,
            });
        }
    }
    for site in state.store.list_sites().await? {
        if let Some(url) = site.download_mirror {
            users.entry(url).or_default().insert(MirrorUser {
                scope: MirrorSource::Site,
                id: site.id,
                name: site.name,
            });
        }
    }
    let since = now_ms() - i64::try_from(HEALTH_PERIOD.as_millis()).unwrap_or(0);
    let mut counts: BTreeMap<String, (i64, BTreeMap<&'static str, i64>)> = BTreeMap::new();
    for row in state.store.mirror_counts(since).await? {
        let entry = counts.entry(row.mirror).or_default();
        match row.fallback.as_deref() {
            None if row.source == "mirror" => entry.0 += row.tasks,
            None => {}
            Some(reason) => {
                let reason = MirrorFailure::parse(reason).map_or("unknown", MirrorFailure::as_str);
                *entry.1.entry(reason).or_default() += row.tasks;
            }
        }
    }
    let urls: BTreeSet<String> = users.keys().chain(counts.keys()).cloned().collect();
    let mut mirrors = Vec::with_capacity(urls.len());
    for url in urls {
        let recent = state
            .store
            .mirror_transfers(&url, false, FAILING_AFTER as i64)
            .await?;
        let outcomes: Vec<Option<MirrorFailure>> = recent
            .iter()
            .map(|t| {
                t.fallback
                    .as_deref()
                    .map(|f| MirrorFailure::parse(f).unwrap_or(MirrorFailure::Unknown))
            })
            .collect();
        let last_fallback = match recent.iter().find(|t| t.fallback.is_some()) {
            Some(t) => Some(t.clone()),
            None => state.store.mirror_transfers(&url, true, 1).await?.pop(),
        }
        .map(|t| (t.at_ms, t.fallback.unwrap_or_default(), t.error));
        let (served, fell_back) = counts.remove(&url).unwrap_or_default();
        mirrors.push(MirrorHealth {
            used_by: users.remove(&url).unwrap_or_default().into_iter().collect(),
            url,
            served,
            fell_back,
            last_fallback,
            failing: failing(&outcomes),
        });
    }
    Ok(mirrors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_urls_are_checked_and_normalised() {
        for (input, expected) in [
            (
                "https://cdn.example.com/drover/",
                "https://cdn.example.com/drover",
            ),
            ("http://10.0.0.5:8081", "http://10.0.0.5:8081"),
            ("  https://m.example.org/a/b  ", "https://m.example.org/a/b"),
        ] {
            assert_eq!(check_base(input).as_deref(), Ok(expected), "{input}");
        }
        for (input, complaint) in [
            ("ftp://m.example.com", "http:// or https://"),
            ("https://user:pw@m.example.com", "credentials"),
            ("https://m.example.com/?token=1", "query"),
            ("https://m.example.com/#x", "fragment"),
            ("m.example.com", "not a URL"),
            ("file:///srv/downloads", "http:// or https://"),
        ] {
            let err = check_base(input).unwrap_err();
            assert!(err.contains(complaint), "{input}: {err}");
        }
        assert!(check_base(&format!("https://m.example.com/{}", "a".repeat(600))).is_err());
    }

    #[test]
    fn a_site_mirror_wins_over_its_client_and_the_server_wide_one() {
        let (site, client, server) = (Some("https://s"), Some("https://c"), Some("https://g"));
        assert_eq!(
            resolve(site, client, server),
            Some(("https://s", MirrorSource::Site))
        );
        assert_eq!(
            resolve(None, client, server),
            Some(("https://c", MirrorSource::Client))
        );
        assert_eq!(
            resolve(None, None, server),
            Some(("https://g", MirrorSource::Server))
        );
        assert_eq!(resolve(None, None, None), None);
        assert_eq!(build_url("https://m/x/", "a.bin"), "https://m/x/a.bin");
    }

    #[test]
    fn agent_errors_are_bounded_and_blanked() {
        assert_eq!(
            clean_error("404\nforged: line\x1b[31m"),
            "404 forged: line [31m"
        );
        let long = "é".repeat(400);
        let cleaned = clean_error(&long);
        assert!(cleaned.len() <= protocol::TRANSFER_ERROR_LIMIT);
        assert!(long.starts_with(&cleaned));
    }

    #[test]
    fn a_mirror_fails_when_its_last_downloads_all_fell_back() {
        let bad = Some(MirrorFailure::WrongBytes);
        assert!(failing(&[bad, bad, bad]));
        assert!(failing(&[bad, bad, bad, None]));
        assert!(!failing(&[None, bad, bad, bad]), "the newest was served");
        assert!(!failing(&[bad, bad]), "too few to say");
        assert!(!failing(&[]));
    }
}
