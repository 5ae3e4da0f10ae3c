//! How `drover mirror` answers print: the mirrors' health, and a mirror set or cleared.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{or_dash, plain_table, plural};

#[derive(Debug, Deserialize)]
pub(crate) struct MirrorSet {
    id: String,
    download_mirror: Option<String>,
    agents_affected: usize,
}

pub(crate) fn mirror_line(kind: &str, set: &MirrorSet) -> String {
    let what = match &set.download_mirror {
        Some(url) => format!("download mirror {url}"),
        None => "download mirror cleared".to_owned(),
    };
    let affected = plural(set.agents_affected, "agent");
    format!("{kind} {}: {what} ({affected} affected)\n", set.id)
}

#[derive(Debug, Deserialize)]
pub(crate) struct MirrorList {
    download_url: Option<String>,
    mirrors: Vec<Mirror>,
}

#[derive(Debug, Deserialize)]
struct Mirror {
    url: String,
    used_by: Vec<MirrorUser>,
    served: i64,
    fell_back: i64,
    fallbacks: BTreeMap<String, i64>,
    last_fallback: Option<Fallback>,
    failing: bool,
}

#[derive(Debug, Deserialize)]
struct MirrorUser {
    scope: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct Fallback {
    at: String,
    reason: String,
    error: Option<String>,
}

pub(crate) fn mirrors_view(list: &MirrorList) -> String {
    let mut out = format!(
        "server-wide mirror (--download-url): {}\n",
        or_dash(list.download_url.as_deref())
    );
    if list.mirrors.is_empty() {
        out.push_str("no download mirrors: every agent downloads from the server\n");
        return out;
    }
    let rows = list.mirrors.iter().map(|m| {
        let used_by = m
            .used_by
            .iter()
            .map(|u| format!("{} {}", u.scope, u.name))
            .collect::<Vec<_>>()
            .join(", ");
        let reasons = m
            .fallbacks
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        [
            m.url.clone(),
            if m.failing { "FAILING" } else { "ok" }.to_owned(),
            m.served.to_string(),
            if reasons.is_empty() {
                m.fell_back.to_string()
            } else {
                format!("{} ({reasons})", m.fell_back)
            },
            if used_by.is_empty() {
                "(no longer set)".to_owned()
            } else {
                used_by
            },
        ]
    });
    let table = plain_table(
        ["MIRROR", "HEALTH", "SERVED 24H", "FELL BACK 24H", "USED BY"],
        rows,
    );
    out.push_str(&format!("{table}\n"));
    for m in list.mirrors.iter() {
        if let Some(last) = &m.last_fallback {
            out.push_str(&format!(
                "last fallback from {} at {}: {}{}\n",
                m.url,
                last.at,
                last.reason,
                last.error
                    .as_deref()
                    .map(|e| format!(" ({})", super::printable(e)))
                    .unwrap_or_default()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_failing_mirror_says_so_and_why() {
        let list: MirrorList = serde_json::from_value(json!({
            "download_url": null,
            "mirrors": [{
                "url": "http://10.0.0.5/drover",
                "used_by": [{"scope": "site", "id": "s1", "name": "Berlin"}],
                "served": 2, "fell_back": 3, "fallbacks": {"wrong_bytes": 3},
                "last_fallback": {"at": "2026-11-29T08:00:00Z", "reason": "wrong_bytes",
                    "error": "checksum mismatch\u{1b}[31m"},
                "failing": true
            }]
        }))
        .unwrap();
        let text = mirrors_view(&list);
        assert!(
            text.contains("server-wide mirror (--download-url): -"),
            "{text}"
        );
        assert!(text.contains("FAILING"), "{text}");
        assert!(text.contains("3 (wrong_bytes 3)"), "{text}");
        assert!(text.contains("site Berlin"), "{text}");
        assert!(
            text.contains("at 2026-11-29T08:00:00Z: wrong_bytes (checksum mismatch\\u{1b}[31m)"),
            "{text}"
        );
        let set: MirrorSet = serde_json::from_value(
            json!({"id": "s1", "download_mirror": null, "agents_affected": 1}),
        )
        .unwrap();
        assert_eq!(
            mirror_line("site", &set),
            "site s1: download mirror cleared (1 agent affected)\n"
        );
    }
}
