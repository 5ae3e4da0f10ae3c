//! `drover`, the operator command line: a thin client of the REST API. This file holds
//! the command line and what each command asks the server; `api` does the HTTP and
//! `render` the printing.

mod api;
mod render;

use std::path::Path;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::api::Api;
use crate::render::{
    Agent, AgentDetail, ChannelChanged, Client, Listing, Release, Site, UpdateRequested,
    UpdatesSwitch, agent_details, agents_table, channel_line, client_created, clients_table,
    listing_view, paused_line, releases_view, site_created, sites_table, update_line, updates_line,
};

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
    /// Show one agent, request an update, or pause and resume its updates
    Agent {
        #[command(subcommand)]
        action: AgentAction,
    },
    /// List the builds offered to agents, or rescan the downloads directory
    Releases {
        /// Print the API's JSON instead of tables
        #[arg(long, global = true)]
        json: bool,
        /// Also list the files in the downloads directory that are not offered, and why
        #[arg(long)]
        skipped: bool,
        #[command(subcommand)]
        action: Option<ReleasesAction>,
    },
    /// Set or clear the release channel of an agent, a site or a client
    Channel {
        #[command(subcommand)]
        action: ChannelAction,
    },
    /// List clients, or create one
    Clients {
        /// Print the API's JSON instead of a table
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: Option<ClientsAction>,
    },
    /// List sites, or create one
    Sites {
        /// Print the API's JSON instead of a table
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: Option<SitesAction>,
    },
    /// Show whether updates are on server-wide, or switch them
    Updates {
        #[command(subcommand)]
        action: Option<UpdatesAction>,
    },
}

#[derive(Debug, Subcommand)]
enum AgentAction {
    /// Show the agent and its update tasks
    Show {
        id: String,
        /// Print the API's JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Update the agent now, even if paused (default: the newest build of its channel)
    Update {
        id: String,
        /// A version offered for the agent's platform
        #[arg(long)]
        version: Option<String>,
    },
    /// Stop automatic updates of the agent
    Pause { id: String },
    /// Let the agent update automatically again
    Resume { id: String },
}

#[derive(Debug, Subcommand)]
enum ReleasesAction {
    /// Rescan the downloads directory now and list the result
    Rescan,
}

#[derive(Debug, Subcommand)]
enum ChannelAction {
    /// Put an agent, a site or a client on a channel
    Set {
        #[command(flatten)]
        owner: ChannelOwner,
        /// stable or beta
        channel: String,
    },
    /// Inherit the channel from the level above again
    Clear {
        #[command(flatten)]
        owner: ChannelOwner,
    },
}

/// Where in the hierarchy a channel is set: exactly one of the three.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct ChannelOwner {
    /// One agent
    #[arg(long, value_name = "ID")]
    agent: Option<String>,
    /// Every agent of a site that has no channel of its own
    #[arg(long, value_name = "ID")]
    site: Option<String>,
    /// Every agent of a client whose site and agent set no channel
    #[arg(long, value_name = "ID")]
    client: Option<String>,
}

impl ChannelOwner {
    /// The owner's kind (`agent`, `site`, `client`) and id.
    fn kind_and_id(&self) -> (&'static str, &str) {
        match (&self.agent, &self.site, &self.client) {
            (Some(id), _, _) => ("agent", id),
            (_, Some(id), _) => ("site", id),
            (_, _, Some(id)) => ("client", id),
            (None, None, None) => unreachable!("clap requires one of --agent, --site, --client"),
        }
    }
}

#[derive(Debug, Subcommand)]
enum ClientsAction {
    /// Create a client
    Create { name: String },
}

#[derive(Debug, Subcommand)]
enum SitesAction {
    /// Create a site under a client
    Create {
        #[arg(long, value_name = "ID")]
        client: String,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum UpdatesAction {
    /// Let the server dispatch updates again
    Enable,
    /// Stop all update dispatch and downloads, for every agent
    Disable,
}

/// The `drover` binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let token = match cli.token {
        Some(token) => token,
        None => default_token()?,
    };
    run(cli.command, &Api::new(&cli.server, token))
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

fn run(command: Command, api: &Api) -> anyhow::Result<()> {
    match command {
        Command::Agents { json } => show(api.get("/api/v1/agents")?, json, |agents: Vec<Agent>| {
            agents_table(&agents)
        }),
        Command::Agent { action } => run_agent(action, api),
        Command::Releases {
            json,
            skipped,
            action,
        } => {
            let body = match (action, skipped) {
                (Some(ReleasesAction::Rescan), _) => {
                    api.request(Method::POST, "/api/v1/releases/rescan", None)?
                }
                (None, true) => api.get("/api/v1/releases?include=skipped")?,
                (None, false) => {
                    return show(api.get("/api/v1/releases")?, json, |r: Vec<Release>| {
                        releases_view(&r, None)
                    });
                }
            };
            show(body, json, |listing: Listing| listing_view(&listing))
        }
        Command::Channel { action } => {
            let (owner, channel) = match &action {
                ChannelAction::Set { owner, channel } => (owner, Some(channel)),
                ChannelAction::Clear { owner } => (owner, None),
            };
            let (kind, id) = owner.kind_and_id();
            let path = format!("/api/v1/{kind}s/{id}/channel");
            let body = json!({ "channel": channel });
            let answer = api.request(Method::PUT, &path, Some(&body))?;
            show(answer, false, |change: ChannelChanged| {
                channel_line(kind, &change)
            })
        }
        Command::Clients { json, action } => match action {
            None => show(api.get("/api/v1/clients")?, json, |c: Vec<Client>| {
                clients_table(&c)
            }),
            Some(ClientsAction::Create { name }) => {
                let body = json!({ "name": name });
                let answer = api.request(Method::POST, "/api/v1/clients", Some(&body))?;
                show(answer, json, |client: Client| client_created(&client))
            }
        },
        Command::Sites { json, action } => match action {
            None => show(api.get("/api/v1/sites")?, json, |s: Vec<Site>| {
                sites_table(&s)
            }),
            Some(SitesAction::Create { client, name }) => {
                let body = json!({ "client_id": client, "name": name });
                let answer = api.request(Method::POST, "/api/v1/sites", Some(&body))?;
                show(answer, json, |site: Site| site_created(&site))
            }
        },
        Command::Updates { action } => {
            let answer = match action {
                None => api.get("/api/v1/updates")?,
                Some(action) => {
                    let body = json!({ "enabled": matches!(action, UpdatesAction::Enable) });
                    api.request(Method::PUT, "/api/v1/updates", Some(&body))?
                }
            };
            show(answer, false, |switch: UpdatesSwitch| updates_line(&switch))
        }
    }
}

fn run_agent(action: AgentAction, api: &Api) -> anyhow::Result<()> {
    let (verb, id) = match &action {
        AgentAction::Show { id, json } => {
            let answer = api.get(&format!("/api/v1/agents/{id}"))?;
            return show(answer, *json, |detail: AgentDetail| agent_details(&detail));
        }
        AgentAction::Update { id, version } => {
            let body = version
                .as_ref()
                .map(|version| json!({ "version": version }));
            let path = format!("/api/v1/agents/{id}/update");
            let answer = api.request(Method::POST, &path, body.as_ref())?;
            return show(answer, false, |update: UpdateRequested| {
                update_line(&update)
            });
        }
        AgentAction::Pause { id } => ("pause", id),
        AgentAction::Resume { id } => ("resume", id),
    };
    let answer = api.request(Method::POST, &format!("/api/v1/agents/{id}/{verb}"), None)?;
    show(answer, false, |agent: Agent| paused_line(&agent))
}

/// Prints the server's answer: as pretty JSON, or through `render` once it has the
/// shape `render` expects.
fn show<T: DeserializeOwned>(
    answer: Value,
    json: bool,
    render: impl FnOnce(T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        let answer = serde_json::from_value(answer).context("unexpected answer from the server")?;
        print!("{}", render(answer));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from([&["drover"], args].concat())
    }

    #[test]
    fn channel_set_needs_exactly_one_owner() {
        assert!(parse(&["channel", "set", "beta"]).is_err());
        assert!(parse(&["channel", "set", "--agent", "a1", "--site", "s1", "beta"]).is_err());
        assert!(parse(&["channel", "clear"]).is_err());
        assert!(parse(&["channel", "clear", "--site", "s1", "--client", "c1"]).is_err());
        for flag in ["--agent", "--site", "--client"] {
            let cli = parse(&["channel", "set", flag, "x1", "beta"]).unwrap();
            let Command::Channel {
                action: ChannelAction::Set { owner, channel },
            } = cli.command
            else {
                panic!("parsed as {:?}", cli.command);
            };
            assert_eq!(owner.kind_and_id(), (&flag[2..], "x1"));
            assert_eq!(channel, "beta");
        }
    }

    #[test]
    fn releases_takes_flags_with_or_without_rescan() {
        let cli = parse(&["releases", "--skipped"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Releases {
                json: false,
                skipped: true,
                action: None
            }
        ));
        let cli = parse(&["releases", "rescan", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Releases {
                json: true,
                action: Some(ReleasesAction::Rescan),
                ..
            }
        ));
    }

    #[test]
    fn agent_update_version_is_optional() {
        for (args, expected) in [
            (&["agent", "update", "a1"][..], None),
            (
                &["agent", "update", "a1", "--version", "1.2.0"][..],
                Some("1.2.0"),
            ),
        ] {
            let cli = parse(args).unwrap();
            let Command::Agent {
                action: AgentAction::Update { id, version },
            } = cli.command
            else {
                panic!("parsed as {:?}", cli.command);
            };
            assert_eq!((id.as_str(), version.as_deref()), ("a1", expected));
        }
    }
}
