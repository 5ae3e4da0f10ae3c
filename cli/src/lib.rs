//! `drover`, the operator command line: a thin client of the REST API. This file holds
//! the command line and what each command asks the server, except the rollout-record
//! commands in `rollouts`; `api` does the HTTP and `render` the printing.

mod api;
mod mirrors;
mod render;
mod rollouts;
mod signing;

use std::path::Path;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::api::Api;
use crate::render::{
    Agent, AgentDetail, ApiToken, AuditPage, ChannelChanged, Client, EnrollmentToken, Explanation,
    ListedEnrollmentToken, Listing, NewApiToken, Promoted, Release, ResumeAnswer, RevokedToken,
    RolledBack, Site, Unblocked, UpdateRequested, UpdatesSwitch, WindowSet, agent_details,
    agents_table, audit_view, channel_line, client_created, clients_table,
    enrollment_token_created, enrollment_token_revoked, enrollment_tokens_table, explanation,
    listing_view, paused_line, promoted_view, releases_view, resume_view, rolled_back_view,
    site_created, sites_table, token_created, token_revoked, tokens_table, unblocked_line,
    update_line, updates_line, window_line,
};
use crate::rollouts::{ListArgs, PlanArgs, RolloutArgs};

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

    /// PEM file of the CA to trust for an https:// server, instead of the built-in roots
    #[arg(long, global = true, env = "DROVER_CA_FILE", value_name = "PATH")]
    ca_file: Option<std::path::PathBuf>,

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
    /// Set or clear the maintenance window of a site or a client: outside it, promote
    /// and targeted rollouts start none of its agents
    Window {
        #[command(subcommand)]
        action: WindowAction,
    },
    /// Download mirrors: set or clear a site's or client's, list their health, copy the
    /// offered builds to a mirror directory, or check a mirror
    Mirror {
        #[command(subcommand)]
        action: mirrors::MirrorAction,
    },
    /// Show whether updates are on server-wide, or switch them
    Updates {
        #[command(subcommand)]
        action: Option<UpdatesAction>,
    },
    /// List rollouts, newest first: how far each has gone, its failures, and whether a
    /// beta build may be promoted
    Rollouts(ListArgs),
    /// Show one rollout (drover rollout ID), list its agents, pause, resume, advance or
    /// abort it, or start a targeted one
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Rollout(RolloutArgs),
    /// Promote a beta version to stable once its gate passes, starting a rollout in waves
    Promote {
        version: String,
        #[command(flatten)]
        platform: Platform,
        /// Promote even though the gate blocks it
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        plan: PlanArgs,
        /// Start agents outside their sites' maintenance windows too
        #[arg(long)]
        ignore_windows: bool,
        /// Print the API's JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Block a version and start a rollout moving the agents that run it back to the
    /// newest other build of their channel
    Rollback {
        version: String,
        #[command(flatten)]
        plan: PlanArgs,
        /// Print the API's JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Offer a blocked version again
    Unblock { version: String },
    /// Let every paused or halted rollout of a version go on (or one rollout, by id)
    Resume {
        /// A version, or a rollout's id
        version: String,
        #[command(flatten)]
        platform: Platform,
    },
    /// Show who did what, newest first
    Audit {
        /// How many entries to show
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Only entries of this action, e.g. promote
        #[arg(long)]
        action: Option<String>,
        /// Only entries older than this one (from the `more:` hint)
        #[arg(long, value_name = "ID")]
        before: Option<i64>,
        /// Print the API's JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// List API tokens, or create or revoke one (admin only)
    Tokens {
        /// Print the API's JSON instead of a table
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: Option<TokensAction>,
    },
    /// List enrollment tokens (of one site with --site), or revoke one (admin only);
    /// `drover sites enroll-token SITE` makes one
    EnrollmentTokens {
        /// Only this site's tokens
        #[arg(long, value_name = "ID")]
        site: Option<String>,
        /// Print the API's JSON instead of a table
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: Option<EnrollmentTokensAction>,
    },
    /// Explain why an agent is or is not being updated
    Explain {
        agent_id: String,
        /// Print the API's JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Make an offline release signing key: FILE (private, mode 0600) and FILE.pub
    Keygen {
        /// Where to write the private key; never overwritten
        #[arg(long, value_name = "FILE", default_value = "drover-release.key")]
        out: std::path::PathBuf,
    },
    /// Sign a build (named drover-agent-{os}-{arch}-{version}) into FILE.sig
    Sign {
        /// The build to sign
        file: std::path::PathBuf,
        /// Private key from `drover keygen`
        #[arg(long, value_name = "KEYFILE")]
        key: std::path::PathBuf,
        /// Release counter: larger than every counter signed before, by any key
        #[arg(long, value_name = "N")]
        counter: u64,
        /// Allow agents on a newer version to go back to this build (an operator's
        /// rollback, signed with a new counter)
        #[arg(long)]
        rollback: bool,
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
    /// Update the agent now, through a targeted rollout of one agent (default: the newest
    /// build of its channel); the server refuses it while the agent is paused
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
enum WindowAction {
    /// Give a site or a client a weekly window, e.g. --days mon-fri --start 02:00
    /// --duration 3h --time-zone Europe/Berlin
    Set {
        #[command(flatten)]
        owner: ScopeOwner,
        /// The days it opens: mon,tue,... or a range such as mon-fri
        #[arg(long, value_name = "DAYS", value_delimiter = ',', required = true)]
        days: Vec<String>,
        /// When it opens on those days, HH:MM in its time zone
        #[arg(long, value_name = "HH:MM")]
        start: String,
        /// How long it stays open, e.g. 3h or 90m
        #[arg(long, value_name = "DURATION")]
        duration: String,
        /// An IANA time zone, e.g. Europe/Berlin
        #[arg(long, value_name = "ZONE", default_value = "UTC")]
        time_zone: String,
    },
    /// Remove the window: the agents follow their client's window, or none
    Clear {
        #[command(flatten)]
        owner: ScopeOwner,
    },
}

/// Where a site-or-client setting (a maintenance window, a download mirror) is set.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct ScopeOwner {
    /// Every agent of a site (wins over its client's setting)
    #[arg(long, value_name = "ID")]
    site: Option<String>,
    /// Every agent of a client whose site sets none
    #[arg(long, value_name = "ID")]
    client: Option<String>,
}

impl ScopeOwner {
    fn kind_and_id(&self) -> (&'static str, &str) {
        match (&self.site, &self.client) {
            (Some(id), _) => ("site", id),
            (_, Some(id)) => ("client", id),
            (None, None) => unreachable!("clap requires --site or --client"),
        }
    }
}

/// `mon-fri` as the days it names; other items as they are.
fn expand_days(items: &[String]) -> anyhow::Result<Vec<String>> {
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let index = |day: &str| {
        DAYS.iter()
            .position(|d| d.eq_ignore_ascii_case(day.trim()))
            .ok_or_else(|| anyhow::anyhow!("{day:?} is not a day: use mon, tue, ..., sun"))
    };
    let mut days = Vec::new();
    for item in items {
        match item.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (index(from)?, index(to)?);
                // A range may wrap over the week's end: fri-mon.
                let mut day = from;
                loop {
                    days.push(DAYS[day].to_owned());
                    if day == to {
                        break;
                    }
                    day = (day + 1) % 7;
                }
            }
            None => days.push(item.trim().to_owned()),
        }
    }
    Ok(days)
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
    /// Create a token that enrolls agents into a site; it is shown only once
    EnrollToken {
        site_id: String,
        /// How long the token is valid, e.g. 30m, 12h, 7d or seconds (default: forever)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires_in: Option<u64>,
        /// How many agents may enroll with it (default: any number)
        #[arg(long, value_name = "N")]
        max_uses: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum EnrollmentTokensAction {
    /// Revoke an enrollment token: it enrolls no more machines (enrolled agents stay)
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum TokensAction {
    /// Create an API token; it is shown only once
    Create {
        name: String,
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
    },
    /// Revoke an API token
    Revoke { id: String },
}

/// The platform a rollout command is limited to; without it, every platform.
#[derive(Debug, Args)]
struct Platform {
    /// Only this operating system, e.g. linux
    #[arg(long)]
    os: Option<String>,
    /// Only this architecture, e.g. amd64
    #[arg(long)]
    arch: Option<String>,
}

#[derive(Debug, Subcommand)]
enum UpdatesAction {
    /// Let the server dispatch updates again
    Enable,
    /// Stop all update dispatch and downloads, for every agent
    Disable,
}

/// `30m`, `12h`, `7d`, or a plain number of seconds, as seconds.
fn parse_duration(text: &str) -> Result<u64, String> {
    let invalid = || format!("invalid duration {text:?}: expected e.g. 30m, 12h, 7d or seconds");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(invalid()),
    };
    match number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
    {
        Some(0) => Err("a duration must be more than zero".to_owned()),
        Some(seconds) => Ok(seconds),
        None => Err(invalid()),
    }
}

/// The `drover` binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The offline commands need no server and no token.
    if let Some(done) = run_offline(&cli.command) {
        return done;
    }
    let token = match cli.token {
        Some(token) => token,
        None => default_token()?,
    };
    run(
        cli.command,
        &Api::new(&cli.server, token, cli.ca_file.as_deref())?,
    )
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

/// `keygen` and `sign`, which work without a server; `None` for every other command.
fn run_offline(command: &Command) -> Option<anyhow::Result<()>> {
    let done = match command {
        Command::Keygen { out } => signing::keygen(out).map(|key| {
            println!("private key: {} (keep it offline)", key.private.display());
            println!("public key:  {}", key.public.display());
            println!("key id:      {}", key.key_id);
            println!(
                "install agents with --public-key {} (or --public-key-2 while rotating)",
                key.public_hex
            );
        }),
        Command::Sign {
            file,
            key,
            counter,
            rollback,
        } => signing::sign(file, key, *counter, *rollback).map(|signed| {
            let release = &signed.document.release;
            println!(
                "signed {} {}/{} counter {}{} with key {}: {}",
                release.version,
                release.os,
                release.arch,
                release.counter,
                if release.rollback { " (rollback)" } else { "" },
                release.key_id,
                signed.path.display()
            );
        }),
        _ => return None,
    };
    Some(done)
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
        Command::Window { action } => {
            let (owner, window) = match &action {
                WindowAction::Set {
                    owner,
                    days,
                    start,
                    duration,
                    time_zone,
                } => (
                    owner,
                    json!({
                        "days": expand_days(days)?,
                        "start": start,
                        "duration": duration,
                        "time_zone": time_zone,
                    }),
                ),
                WindowAction::Clear { owner } => (owner, Value::Null),
            };
            let (kind, id) = owner.kind_and_id();
            let path = format!("/api/v1/{kind}s/{id}/maintenance-window");
            let answer = api.request(Method::PUT, &path, Some(&json!({ "window": window })))?;
            show(answer, false, |set: WindowSet| window_line(kind, &set))
        }
        Command::Mirror { action } => mirrors::run(action, api),
        Command::Clients { json, action } => match action {
            None => show(api.get("/api/v1/clients")?, json, |c: Vec<Client>| {
                clients_table(&c)
            }),
            Some(ClientsAction::Create { name }) => {
                let body = json!({ "name": name });
                post(api, "/api/v1/clients", Some(body), json, |c: Client| {
                    client_created(&c)
                })
            }
        },
        Command::Sites { json, action } => match action {
            None => show(api.get("/api/v1/sites")?, json, |s: Vec<Site>| {
                sites_table(&s)
            }),
            Some(SitesAction::Create { client, name }) => {
                let body = json!({ "client_id": client, "name": name });
                post(api, "/api/v1/sites", Some(body), json, |s: Site| {
                    site_created(&s)
                })
            }
            Some(SitesAction::EnrollToken {
                site_id,
                expires_in,
                max_uses,
            }) => {
                let body = given_fields([
                    ("expires_in_secs", json!(expires_in)),
                    ("max_uses", json!(max_uses)),
                ]);
                let path = format!("/api/v1/sites/{site_id}/enrollment-tokens");
                post(api, &path, Some(body), json, |t: EnrollmentToken| {
                    enrollment_token_created(&t)
                })
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
        Command::Rollouts(args) => rollouts::list(args, api),
        Command::Rollout(args) => rollouts::run(args, api),
        Command::Promote {
            version,
            platform,
            force,
            plan,
            ignore_windows,
            json,
        } => {
            let [waves, bake] = plan.fields();
            let body = given_fields([
                ("os", json!(platform.os)),
                ("arch", json!(platform.arch)),
                ("force", json!(force)),
                waves,
                bake,
                ("ignore_windows", json!(ignore_windows)),
            ]);
            let path = format!("/api/v1/rollouts/{version}/promote");
            post(api, &path, Some(body), json, |p: Promoted| {
                promoted_view(&p)
            })
        }
        Command::Rollback {
            version,
            plan,
            json,
        } => {
            let body = given_fields(plan.fields());
            // No body at all when no plan is given: the server's default, one wave.
            let body = (body != json!({})).then_some(body);
            let path = format!("/api/v1/rollouts/{version}/rollback");
            post(api, &path, body, json, |r: RolledBack| rolled_back_view(&r))
        }
        Command::Unblock { version } => {
            let path = format!("/api/v1/rollouts/{version}/unblock");
            post(api, &path, None, false, |u: Unblocked| unblocked_line(&u))
        }
        Command::Resume { version, platform } => {
            let body = given_fields([("os", json!(platform.os)), ("arch", json!(platform.arch))]);
            let version = rollouts::resolve_id(api, &version)?;
            let path = format!("/api/v1/rollouts/{version}/resume");
            post(api, &path, Some(body), false, |r: ResumeAnswer| {
                resume_view(&r)
            })
        }
        Command::Audit {
            limit,
            action,
            before,
            json,
        } => {
            let filters = [("limit", limit.map(|n| n.to_string())), ("action", action)];
            // The paging hint repeats the filters, so the next page is of the same kind.
            let again: String = filters
                .iter()
                .filter_map(|(key, value)| Some(format!(" --{key} {}", value.as_ref()?)))
                .collect();
            let mut query = filters.to_vec();
            query.push(("before", before.map(|id| id.to_string())));
            let answer = api.get_with_query("/api/v1/audit", &query)?;
            show(answer, json, |page: AuditPage| {
                audit_view(&page, &format!("drover audit{again}"))
            })
        }
        Command::Tokens { json, action } => match action {
            None => show(api.get("/api/v1/tokens")?, json, |t: Vec<ApiToken>| {
                tokens_table(&t)
            }),
            Some(TokensAction::Create { name, role }) => {
                let body = json!({ "name": name, "role": role });
                post(api, "/api/v1/tokens", Some(body), json, |t: NewApiToken| {
                    token_created(&t)
                })
            }
            Some(TokensAction::Revoke { id }) => {
                let path = format!("/api/v1/tokens/{id}");
                let answer = api.request(Method::DELETE, &path, None)?;
                show(answer, json, |t: RevokedToken| token_revoked(&t))
            }
        },
        Command::EnrollmentTokens { site, json, action } => match action {
            None => {
                let path = match site {
                    Some(site) => format!("/api/v1/sites/{site}/enrollment-tokens"),
                    None => "/api/v1/enrollment-tokens".to_owned(),
                };
                show(api.get(&path)?, json, |t: Vec<ListedEnrollmentToken>| {
                    enrollment_tokens_table(&t)
                })
            }
            Some(EnrollmentTokensAction::Revoke { id }) => {
                let path = format!("/api/v1/enrollment-tokens/{id}");
                let answer = api.request(Method::DELETE, &path, None)?;
                show(answer, json, |t: RevokedToken| enrollment_token_revoked(&t))
            }
        },
        Command::Explain { agent_id, json } => {
            let answer = api.get(&format!("/api/v1/agents/{agent_id}/explain"))?;
            show(answer, json, |e: Explanation| explanation(&e))
        }
        Command::Keygen { .. } | Command::Sign { .. } => run_offline(&command).unwrap_or(Ok(())),
    }
}

/// A JSON object of the fields that have a value: optional fields left unset are left
/// out rather than sent as null, so the server applies its own defaults.
fn given_fields<const N: usize>(fields: [(&str, Value); N]) -> Value {
    let given = fields
        .into_iter()
        .filter(|(_, value)| !value.is_null())
        .map(|(key, value)| (key.to_owned(), value));
    Value::Object(given.collect())
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
            return post(api, &path, body, false, |u: UpdateRequested| {
                update_line(&u)
            });
        }
        AgentAction::Pause { id } => ("pause", id),
        AgentAction::Resume { id } => ("resume", id),
    };
    let path = format!("/api/v1/agents/{id}/{verb}");
    post(api, &path, None, false, |agent: Agent| paused_line(&agent))
}

/// Sends `body`, if any, to `path` and prints the answer as `show` does.
fn post<T: DeserializeOwned>(
    api: &Api,
    path: &str,
    body: Option<Value>,
    json: bool,
    render: impl FnOnce(T) -> String,
) -> anyhow::Result<()> {
    show(
        api.request(Method::POST, path, body.as_ref())?,
        json,
        render,
    )
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
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_take_a_unit_or_plain_seconds() {
        for (text, expected) in [
            ("30m", Ok(1800)),
            ("12h", Ok(43_200)),
            ("7d", Ok(604_800)),
            ("45", Ok(45)),
            ("45s", Ok(45)),
        ] {
            assert_eq!(parse_duration(text), expected, "{text}");
        }
        for bad in [
            "",
            "d",
            "7w",
            "1.5h",
            "-5",
            "7 d",
            "0",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn window_set_expands_day_ranges_and_needs_one_owner() {
        assert!(
            parse(&[
                "window",
                "set",
                "--days",
                "mon",
                "--start",
                "02:00",
                "--duration",
                "1h"
            ])
            .is_err()
        );
        assert!(parse(&["window", "clear", "--site", "s1", "--client", "c1"]).is_err());
        let cli = parse(&[
            "window",
            "set",
            "--site",
            "s1",
            "--days",
            "mon-wed,sat",
            "--start",
            "02:00",
            "--duration",
            "3h",
            "--time-zone",
            "Europe/Berlin",
        ])
        .unwrap();
        let Command::Window {
            action:
                WindowAction::Set {
                    owner,
                    days,
                    time_zone,
                    ..
                },
        } = cli.command
        else {
            panic!("window set parsed wrongly");
        };
        assert_eq!(owner.kind_and_id(), ("site", "s1"));
        assert_eq!(time_zone, "Europe/Berlin");
        assert_eq!(expand_days(&days).unwrap(), ["mon", "tue", "wed", "sat"]);
        // A range wraps over the end of the week.
        assert_eq!(
            expand_days(&["fri-mon".to_owned()]).unwrap(),
            ["fri", "sat", "sun", "mon"]
        );
        assert!(expand_days(&["mon-funday".to_owned()]).is_err());
    }

    #[test]
    fn unset_fields_are_left_out_of_bodies() {
        let body = given_fields([
            ("os", json!(Some("linux"))),
            ("arch", json!(None::<String>)),
            ("force", json!(false)),
        ]);
        assert_eq!(body, json!({"os": "linux", "force": false}));
    }

    #[test]
    fn rollout_commands_take_a_version_and_optional_platform() {
        let cli = parse(&[
            "promote", "1.4.0", "--os", "linux", "--arch", "amd64", "--force",
        ]);
        let Command::Promote {
            version,
            platform,
            force: true,
            plan: PlanArgs {
                waves: None,
                bake: None,
            },
            ignore_windows: false,
            json: false,
        } = cli.unwrap().command
        else {
            panic!("promote parsed wrongly");
        };
        assert_eq!(version, "1.4.0");
        assert_eq!(platform.os.as_deref(), Some("linux"));
        assert_eq!(platform.arch.as_deref(), Some("amd64"));

        let cli = parse(&["resume", "1.4.0"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Resume { version, platform: Platform { os: None, arch: None } }
                if version == "1.4.0"
        ));
        assert!(matches!(
            parse(&["rollback", "1.4.0"]).unwrap().command,
            Command::Rollback { version, plan: PlanArgs { waves: None, bake: None }, .. }
                if version == "1.4.0"
        ));
        assert!(matches!(
            parse(&["unblock", "1.4.0"]).unwrap().command,
            Command::Unblock { version } if version == "1.4.0"
        ));
        assert!(parse(&["promote"]).is_err());
        assert!(parse(&["rollback"]).is_err());
    }

    #[test]
    fn audit_takes_paging_and_filter_flags() {
        let cli = parse(&[
            "audit", "--limit", "20", "--action", "promote", "--before", "41",
        ]);
        assert!(matches!(
            cli.unwrap().command,
            Command::Audit { limit: Some(20), action: Some(action), before: Some(41), json: false }
                if action == "promote"
        ));
        assert!(parse(&["audit", "--limit", "many"]).is_err());
    }

    #[test]
    fn tokens_list_create_and_revoke() {
        assert!(matches!(
            parse(&["tokens", "--json"]).unwrap().command,
            Command::Tokens {
                json: true,
                action: None
            }
        ));
        let cli = parse(&["tokens", "create", "ci", "--role", "operator"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Tokens { action: Some(TokensAction::Create { name, role }), .. }
                if name == "ci" && role == "operator"
        ));
        assert!(parse(&["tokens", "create", "ci"]).is_err());
        assert!(parse(&["tokens", "create", "ci", "--role", "root"]).is_err());
        assert!(matches!(
            parse(&["tokens", "revoke", "k1"]).unwrap().command,
            Command::Tokens { action: Some(TokensAction::Revoke { id }), .. } if id == "k1"
        ));
    }

    #[test]
    fn enroll_token_parses_its_limits() {
        let cli = parse(&[
            "sites",
            "enroll-token",
            "s1",
            "--expires-in",
            "7d",
            "--max-uses",
            "5",
        ]);
        assert!(matches!(
            cli.unwrap().command,
            Command::Sites {
                action: Some(SitesAction::EnrollToken {
                    site_id,
                    expires_in: Some(604_800),
                    max_uses: Some(5),
                }),
                ..
            } if site_id == "s1"
        ));
        let cli = parse(&["sites", "enroll-token", "s1"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Sites {
                action: Some(SitesAction::EnrollToken {
                    expires_in: None,
                    max_uses: None,
                    ..
                }),
                ..
            }
        ));
        assert!(parse(&["sites", "enroll-token", "s1", "--expires-in", "soon"]).is_err());
    }

    #[test]
    fn explain_takes_an_agent_id() {
        assert!(matches!(
            parse(&["explain", "a1", "--json"]).unwrap().command,
            Command::Explain { agent_id, json: true } if agent_id == "a1"
        ));
        assert!(parse(&["explain"]).is_err());
    }

    #[test]
    fn sign_needs_a_file_a_key_and_a_counter() {
        assert!(matches!(
            parse(&[
                "sign",
                "build",
                "--key",
                "k",
                "--counter",
                "7",
                "--rollback"
            ])
            .unwrap()
            .command,
            Command::Sign {
                counter: 7,
                rollback: true,
                ..
            }
        ));
        assert!(parse(&["sign", "build", "--key", "k"]).is_err());
        assert!(parse(&["sign", "build", "--counter", "7"]).is_err());
        assert!(parse(&["sign", "build", "--key", "k", "--counter", "-1"]).is_err());
        assert!(matches!(
            parse(&["keygen"]).unwrap().command,
            Command::Keygen { out } if out.as_os_str() == "drover-release.key"
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
