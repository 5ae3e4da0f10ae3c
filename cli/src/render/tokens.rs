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
