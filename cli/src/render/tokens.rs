//! Tokens: API tokens for operators and scripts, and enrollment tokens for new agents.
//! A token's secret is in the server's answer only when it is created, so it is printed
//! on a line of its own, easy to copy.

use serde::Deserialize;

use super::{plain_table, plural};

#[derive(Debug, Deserialize)]
pub(crate) struct ApiToken {
    id: String,
    name: String,
    role: String,
    created_at: String,
    revoked: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct NewApiToken {
    id: String,
    name: String,
    role: String,
    token: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RevokedToken {
    id: String,
}

/// An enrollment token as listed (never the token itself).
#[derive(Debug, Deserialize)]
pub(crate) struct ListedEnrollmentToken {
    id: String,
    site_id: String,
    created_at: String,
    expires_at: Option<String>,
    max_uses: Option<i64>,
    uses: i64,
    state: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct EnrollmentToken {
    id: String,
    site_id: String,
    token: String,
    expires_at: Option<String>,
    max_uses: Option<usize>,
}

fn shown_once(intro: &str, token: &str) -> String {
    format!("{intro}; it is shown only once:\n{token}\n")
}

pub(crate) fn tokens_table(tokens: &[ApiToken]) -> String {
    let table = plain_table(
        ["ID", "NAME", "ROLE", "CREATED", "STATUS"],
        tokens.iter().map(|t| {
            let status = if t.revoked { "revoked" } else { "active" };
            [
                t.id.clone(),
                t.name.clone(),
                t.role.clone(),
                t.created_at.clone(),
                status.to_owned(),
            ]
        }),
    );
    let active = tokens.iter().filter(|t| !t.revoked).count();
    format!(
        "{table}\n{}, {active} active\n",
        plural(tokens.len(), "token")
    )
}

pub(crate) fn token_created(new: &NewApiToken) -> String {
    let intro = format!("created {} token {} ({})", new.role, new.name, new.id);
    shown_once(&intro, &new.token)
}

pub(crate) fn token_revoked(revoked: &RevokedToken) -> String {
    format!("token {} revoked\n", revoked.id)
}

/// Every enrollment token with its site, limits and whether it still enrolls.
pub(crate) fn enrollment_tokens_table(tokens: &[ListedEnrollmentToken]) -> String {
    let table = plain_table(
        ["ID", "SITE", "CREATED", "EXPIRES", "USES", "STATE"],
        tokens.iter().map(|t| {
            let uses = match t.max_uses {
                Some(max) => format!("{}/{max}", t.uses),
                None => t.uses.to_string(),
            };
            [
                t.id.clone(),
                t.site_id.clone(),
                t.created_at.clone(),
                t.expires_at.clone().unwrap_or_else(|| "never".into()),
                uses,
                t.state.replace('_', " "),
            ]
        }),
    );
    let usable = tokens.iter().filter(|t| t.state == "usable").count();
    format!(
        "{table}\n{}, {usable} usable\n",
        plural(tokens.len(), "enrollment token")
    )
}

pub(crate) fn enrollment_token_revoked(revoked: &RevokedToken) -> String {
    format!(
        "enrollment token {} revoked: it enrolls no more machines\n",
        revoked.id
    )
}

pub(crate) fn enrollment_token_created(new: &EnrollmentToken) -> String {
    let expiry = match &new.expires_at {
        Some(at) => format!("expires {at}"),
        None => "never expires".to_owned(),
    };
    let uses = match new.max_uses {
        Some(uses) => format!("up to {}", plural(uses, "use")),
        None => "unlimited uses".to_owned(),
    };
    let intro = format!(
        "created enrollment token {} for site {} ({expiry}, {uses})",
        new.id, new.site_id
    );
    shown_once(&intro, &new.token)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::render::tests::parse;

    #[test]
    fn tokens_table_shows_role_and_status() {
        let tokens: Vec<ApiToken> = parse(json!([
            {"id": "k1", "name": "ci", "role": "operator", "created_at": "2026-11-01", "revoked": false},
            {"id": "k2", "name": "old", "role": "admin", "created_at": "2026-10-01", "revoked": true},
        ]));
        let text = tokens_table(&tokens);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert!(lines[0].contains("ROLE") && lines[0].contains("STATUS"));
        assert!(lines[1].contains("ci") && lines[1].contains("operator"));
        assert!(lines[1].ends_with("active"));
        assert!(lines[2].contains("admin") && lines[2].ends_with("revoked"));
        assert_eq!(lines.last(), Some(&"2 tokens, 1 active"));
    }

    #[test]
    fn created_token_is_shown_once_on_its_own_line() {
        let new: NewApiToken =
            parse(json!({"id": "k3", "name": "ci", "role": "viewer", "token": "drv_secret"}));
        assert_eq!(
            token_created(&new),
            "created viewer token ci (k3); it is shown only once:\ndrv_secret\n"
        );
        let revoked: RevokedToken = parse(json!({"id": "k3", "revoked": true}));
        assert_eq!(token_revoked(&revoked), "token k3 revoked\n");
    }

    #[test]
    fn enrollment_tokens_table_shows_limits_uses_and_state() {
        let tokens: Vec<ListedEnrollmentToken> = parse(json!([
            {"id": "e1", "site_id": "s1", "created_at": "2026-11-01T00:00:00Z",
             "expires_at": "2026-11-08T00:00:00Z", "max_uses": null, "uses": 7,
             "revoked_at": null, "state": "expired"},
            {"id": "e2", "site_id": "s1", "created_at": "2026-11-02T00:00:00Z",
             "expires_at": null, "max_uses": 5, "uses": 5, "revoked_at": null,
             "state": "used_up"},
            {"id": "e3", "site_id": "s2", "created_at": "2026-11-03T00:00:00Z",
             "expires_at": null, "max_uses": null, "uses": 0, "revoked_at": null,
             "state": "usable"},
        ]));
        let text = enrollment_tokens_table(&tokens);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert!(lines[0].contains("EXPIRES") && lines[0].contains("STATE"));
        assert!(lines[1].contains("2026-11-08T00:00:00Z") && lines[1].ends_with("expired"));
        assert!(lines[2].contains("5/5") && lines[2].ends_with("used up"));
        assert!(lines[3].contains("never") && lines[3].ends_with("usable"));
        assert_eq!(lines.last(), Some(&"3 enrollment tokens, 1 usable"));
        let revoked: RevokedToken = parse(json!({"id": "e3", "revoked": true}));
        assert_eq!(
            enrollment_token_revoked(&revoked),
            "enrollment token e3 revoked: it enrolls no more machines\n"
        );
    }

    #[test]
    fn enrollment_token_shows_its_limits() {
        let limited: EnrollmentToken = parse(json!({"id": "e1", "site_id": "s1",
            "token": "enr_secret", "expires_at": "2026-12-02T12:00:00Z", "max_uses": 5}));
        assert_eq!(
            enrollment_token_created(&limited),
            "created enrollment token e1 for site s1 (expires 2026-12-02T12:00:00Z, \
             up to 5 uses); it is shown only once:\nenr_secret\n"
        );
        let open: EnrollmentToken = parse(json!({"id": "e2", "site_id": "s1",
            "token": "enr_other", "expires_at": null, "max_uses": null}));
        let text = enrollment_token_created(&open);
        assert!(text.contains("(never expires, unlimited uses)"));
        assert!(text.ends_with(":\nenr_other\n"));
    }
}
