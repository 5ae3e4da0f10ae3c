//! `drover`, the operator command line: a thin client of the REST API.

use std::path::Path;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use comfy_table::Table;
use serde::Deserialize;
use serde_json::Value;

/// Where `drover-server` writes a generated admin token, relative to where it runs.
const DEFAULT_TOKEN_FILE: &str = "drover-data/admin-token";

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "Operate a Drover fleet through the server's REST API"
)]
struct Cli {
    /// Server URL
    #[arg(
        long,
        global = true,
        env = "DROVER_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,

    /// API token (default: the contents of ./drover-data/admin-token, if present)
    #[arg(long, global = true, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List agents
    Agents {
        /// Print the API's JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Deserialize)]
struct Agent {
    id: String,
    hostname: String,
    version: String,
    os: String,
    arch: String,
    channel: String,
    channel_source: String,
    online: bool,
    last_seen: String,
    paused: bool,
    auto_update: bool,
}

/// The `drover` binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let token = match cli.token.clone() {
        Some(token) => token,
        None => default_token()?,
    };
    let client = Client {
        base: cli.server.trim_end_matches('/').to_owned(),
        token,
        http: reqwest::blocking::Client::new(),
    };
    match cli.command {
        Command::Agents { json } => {
            let body = client.get("/api/v1/agents")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                let agents: Vec<Agent> =
                    serde_json::from_value(body).context("unexpected answer from the server")?;
                print!("{}", agents_table(&agents));
            }
        }
    }
    Ok(())
}

fn default_token() -> anyhow::Result<String> {
    let path = Path::new(DEFAULT_TOKEN_FILE);
    match std::fs::read_to_string(path) {
        Ok(token) => Ok(token.trim().to_owned()),
        Err(_) => bail!(
            "no API token: pass --token or set DROVER_TOKEN (the server prints where its admin token is)"
        ),
    }
}

struct Client {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Client {
    fn get(&self, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .with_context(|| format!("could not reach the server at {}", self.base))?;
        let status = response.status();
        let body: Value = response
            .json()
            .with_context(|| format!("the server's answer to GET {path} is not JSON"))?;
        if !status.is_success() {
            let error = body["error"].as_str().unwrap_or("request failed");
            let detail = match &body["detail"] {
                Value::Null => String::new(),
                Value::String(s) => format!(": {s}"),
                other => format!(": {other}"),
            };
            bail!("{status} {error}{detail}");
        }
        Ok(body)
    }
}

fn agents_table(agents: &[Agent]) -> String {
    let mut table = Table::new();
    table.load_preset(comfy_table::presets::NOTHING);
    table.set_header([
        "ID",
        "HOSTNAME",
        "VERSION",
        "PLATFORM",
        "CHANNEL",
        "STATUS",
        "LAST SEEN",
        "UPDATES",
    ]);
    for agent in agents {
        let updates = match (agent.paused, agent.auto_update) {
            (true, _) => "paused",
            (false, false) => "off (agent)",
            (false, true) => "auto",
        };
        table.add_row([
            agent.id.clone(),
            agent.hostname.clone(),
            agent.version.clone(),
            format!("{}/{}", agent.os, agent.arch),
            format!("{} ({})", agent.channel, agent.channel_source),
            if agent.online { "online" } else { "offline" }.to_owned(),
            agent.last_seen.clone(),
            updates.to_owned(),
        ]);
    }
    let online = agents.iter().filter(|a| a.online).count();
    format!("{table}\n{} agents, {online} online\n", agents.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_status_channel_and_update_mode() {
        let agents = [
            Agent {
                id: "a1".into(),
                hostname: "till-01".into(),
                version: "1.2.0".into(),
                os: "linux".into(),
                arch: "amd64".into(),
                channel: "beta".into(),
                channel_source: "site".into(),
                online: true,
                last_seen: "2026-11-25T12:00:00.000Z".into(),
                paused: false,
                auto_update: false,
            },
            Agent {
                id: "a2".into(),
                hostname: "till-02".into(),
                version: "1.1.0".into(),
                os: "windows".into(),
                arch: "arm64".into(),
                channel: "stable".into(),
                channel_source: "default".into(),
                online: false,
                last_seen: "2026-11-24T08:00:00.000Z".into(),
                paused: true,
                auto_update: true,
            },
        ];
        let text = agents_table(&agents);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("HOSTNAME"));
        assert!(lines[1].contains("till-01") && lines[1].contains("beta (site)"));
        assert!(lines[1].contains("online") && lines[1].contains("off (agent)"));
        assert!(lines[2].contains("windows/arm64") && lines[2].contains("offline"));
        assert!(lines[2].contains("paused"));
        assert_eq!(lines.last(), Some(&"2 agents, 1 online"));
    }
}
