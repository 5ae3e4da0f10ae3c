//! The audit log: who did what to what, newest first, a page at a time.

use serde::Deserialize;

use super::{or_dash, plain_table};

/// `GET /api/v1/audit`: one page; `next_before` is where the next, older page starts.
#[derive(Debug, Deserialize)]
pub(crate) struct AuditPage {
    entries: Vec<AuditEntry>,
    next_before: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct AuditEntry {
    at: String,
    actor: String,
    action: String,
    target: String,
    detail: Option<String>,
    result: String,
}

/// `again` is the command that asked for this page, repeated with `--before` in the hint
/// for the next one so that its filters carry over.
pub(crate) fn audit_view(page: &AuditPage, again: &str) -> String {
    let mut text = if page.entries.is_empty() {
        "no audit entries\n".to_owned()
    } else {
        let table = plain_table(
            ["WHEN", "ACTOR", "ACTION", "TARGET", "RESULT", "DETAIL"],
            page.entries.iter().map(|e| {
                [
                    e.at.clone(),
                    e.actor.clone(),
                    e.action.clone(),
                    e.target.clone(),
                    e.result.clone(),
                    or_dash(e.detail.as_deref()),
                ]
            }),
        );
        format!("{table}\n")
    };
    if let Some(before) = page.next_before {
        text.push_str(&format!("more: {again} --before {before}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::render::tests::parse;

    #[test]
    fn audit_table_then_a_hint_for_the_next_page() {
        let page: AuditPage = parse(json!({
            "entries": [
                {"id": 42, "at": "2026-11-25T12:00:00Z", "actor": "ops-laptop",
                 "action": "promote", "target": "1.4.0", "detail": "forced", "result": "ok"},
                {"id": 41, "at": "2026-11-25T11:00:00Z", "actor": "admin",
                 "action": "rollback", "target": "1.3.9", "detail": null, "result": "refused"},
            ],
            "next_before": 41
        }));
        let text = audit_view(&page, "drover audit --action promote");
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        for column in ["WHEN", "ACTOR", "ACTION", "TARGET", "RESULT", "DETAIL"] {
            assert!(lines[0].contains(column), "missing {column}");
        }
        assert!(lines[1].contains("ops-laptop") && lines[1].contains("promote"));
        assert!(lines[1].contains("1.4.0") && lines[1].ends_with("forced"));
        assert!(lines[2].contains("refused") && lines[2].ends_with(" -"));
        assert_eq!(
            lines.last(),
            Some(&"more: drover audit --action promote --before 41")
        );
    }

    #[test]
    fn last_audit_page_has_no_hint() {
        let page: AuditPage = parse(json!({"entries": [], "next_before": null}));
        assert_eq!(audit_view(&page, "drover audit"), "no audit entries\n");
    }
}
