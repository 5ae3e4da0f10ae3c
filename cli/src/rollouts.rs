//! The rollout-record commands (`drover rollouts`, `drover rollout ...`): their
//! arguments, how a short rollout id is found, and what each asks the server.

use anyhow::bail;
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::Api;
use crate::render::{
    ResumeAnswer, Rollout, RolloutAgents, RolloutDetail, created_view, resume_view,
    rollout_agents_view, rollout_state_line, rollout_view, rollouts_view,
};
use crate::{given_fields, post, show};

/// The longest page the server's rollout listing gives.
const MAX_PAGE: usize = 200;

/// `drover rollouts`.
#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only rollouts in this state: running, waiting, paused, halted, completed, aborted
    /// or superseded
    #[arg(long)]
    state: Option<String>,
    /// Only rollouts of this version
    #[arg(long)]
    version: Option<String>,
    /// How many rollouts to show, newest first (the server's default is 50)
    #[arg(long, value_name = "N")]
    limit: Option<u32>,
    /// Skip this many of the newest rollouts
    #[arg(long, value_name = "N")]
    offset: Option<u32>,
    /// Print the API's JSON instead of a table
    #[arg(long)]
    json: bool,
}

/// `drover rollout ID`, or one of its actions.
#[derive(Debug, Args)]
pub(crate) struct RolloutArgs {
    /// The rollout's id, or the start of it as `drover rollouts` shows it
    #[arg(required = true)]
    id: Option<String>,
    /// Print the API's JSON instead of text
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: Option<RolloutAction>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RolloutAction {
    /// Show one rollout: its waves, failures by class, skipped agents and timeline
    Show(Target),
    /// List a rollout's agents and where each stands
    Agents {
        /// The rollout's id, or the start of it
        id: String,
        /// Only agents in this stage: waiting, queued, downloading, installing,
        /// succeeded, failed, rolled_back, cancelled or skipped
        #[arg(long)]
        stage: Option<String>,
        /// Only agents of this wave (1 is the first)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        wave: Option<u32>,
        /// How many agents to show (the server's default is 100)
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Skip this many agents (from the `more` hint)
        #[arg(long, value_name = "N", default_value_t = 0)]
        offset: usize,
        /// Print the API's JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Start no one new; updates under way go on
    Pause(Target),
    /// Let a paused or halted rollout go on; earlier build failures no longer count
    /// toward a halt
    Resume(Target),
    /// Start the next wave now, without waiting for the bake
    Advance(Target),
    /// End the rollout and cancel the updates it has under way
    Abort(Target),
    /// Start a targeted rollout: move the selected agents to a version
    Create {
        version: String,
        #[command(flatten)]
        selector: Selector,
        #[command(flatten)]
        plan: PlanArgs,
        /// Start agents outside their sites' maintenance windows too
        #[arg(long)]
        ignore_windows: bool,
        /// Print the API's JSON instead of text
        #[arg(long)]
        json: bool,
    },
}

/// One rollout to act on.
#[derive(Debug, Args)]
pub(crate) struct Target {
    /// The rollout's id, or the start of it
    id: String,
    /// Print the API's JSON instead of text
    #[arg(long)]
    json: bool,
}

/// Which agents a targeted rollout moves: every filter given must match.
#[derive(Debug, Args)]
#[group(required = true, multiple = true)]
pub(crate) struct Selector {
    /// These agents (repeat the flag, or separate ids with commas)
    #[arg(long = "agent", value_name = "ID", value_delimiter = ',')]
    agents: Vec<String>,
    /// The agents of this site
    #[arg(long, value_name = "ID")]
    site: Option<String>,
    /// The agents of this client
    #[arg(long, value_name = "ID")]
    client: Option<String>,
    /// Agents on this operating system, e.g. linux
    #[arg(long)]
    os: Option<String>,
    /// Agents on this architecture, e.g. amd64
    #[arg(long)]
    arch: Option<String>,
    /// Agents running exactly this version
    #[arg(long, value_name = "VERSION")]
    running: Option<String>,
}

impl Selector {
    fn body(&self) -> Value {
        let agent_ids = (!self.agents.is_empty()).then_some(&self.agents);
        given_fields([
            ("agent_ids", json!(agent_ids)),
            ("site_id", json!(self.site)),
            ("client_id", json!(self.client)),
            ("os", json!(self.os)),
            ("arch", json!(self.arch)),
            ("running", json!(self.running)),
        ])
    }
}

/// The waves and bake of a rollout to start; the server's defaults for those not given.
#[derive(Debug, Args)]
pub(crate) struct PlanArgs {
    /// Cumulative wave shares, e.g. 1%,10%,50%,100% (a plain number is a count of agents)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub(crate) waves: Option<Vec<String>>,
    /// Bake time after each wave before the next starts, e.g. 10m
    #[arg(long, value_name = "DURATION")]
    pub(crate) bake: Option<String>,
}

impl PlanArgs {
    /// The `waves` and `bake` fields of a request body, those given.
    pub(crate) fn fields(&self) -> [(&'static str, Value); 2] {
        [("waves", json!(self.waves)), ("bake", json!(self.bake))]
    }
}

pub(crate) fn list(args: ListArgs, api: &Api) -> anyhow::Result<()> {
    let query = [
        ("state", args.state),
        ("version", args.version),
        ("limit", args.limit.map(|n| n.to_string())),
        ("offset", args.offset.map(|n| n.to_string())),
    ];
    let answer = api.get_with_query("/api/v1/rollouts", &query)?;
    show(answer, args.json, |r: Vec<Rollout>| rollouts_view(&r))
}

pub(crate) fn run(args: RolloutArgs, api: &Api) -> anyhow::Result<()> {
    let action = match (args.action, args.id) {
        (Some(action), _) => action,
        (None, Some(id)) => RolloutAction::Show(Target {
            id,
            json: args.json,
        }),
        (None, None) => bail!("name a rollout: drover rollout ID"),
    };
    let (verb, target) = match action {
        RolloutAction::Show(Target { id, json }) => {
            let id = resolve_id(api, &id)?;
            let answer = api.get(&format!("/api/v1/rollouts/{id}"))?;
            return show(answer, json, |r: RolloutDetail| rollout_view(&r));
        }
        RolloutAction::Agents {
            id,
            stage,
            wave,
            limit,
            offset,
            json,
        } => {
            let id = resolve_id(api, &id)?;
            let query = [
                ("stage", stage.map(|s| s.replace('-', "_"))),
                // The server counts waves from 0.
                ("wave", wave.map(|n| (n - 1).to_string())),
                ("limit", limit.map(|n| n.to_string())),
                ("offset", (offset > 0).then(|| offset.to_string())),
            ];
            let answer = api.get_with_query(&format!("/api/v1/rollouts/{id}/agents"), &query)?;
            return show(answer, json, |page: RolloutAgents| {
                rollout_agents_view(&page, offset)
            });
        }
        RolloutAction::Create {
            version,
            selector,
            plan,
            ignore_windows,
            json,
        } => {
            let [waves, bake] = plan.fields();
            let body = given_fields([
                ("version", json!(version)),
                ("selector", selector.body()),
                waves,
                bake,
                ("ignore_windows", json!(ignore_windows)),
            ]);
            return post(api, "/api/v1/rollouts", Some(body), json, |r: Rollout| {
                created_view(&r)
            });
        }
        RolloutAction::Resume(target) => {
            let id = resolve_id(api, &target.id)?;
            let path = format!("/api/v1/rollouts/{id}/resume");
            return post(api, &path, None, target.json, |r: ResumeAnswer| {
                resume_view(&r)
            });
        }
        RolloutAction::Pause(target) => ("pause", target),
        RolloutAction::Advance(target) => ("advance", target),
        RolloutAction::Abort(target) => ("abort", target),
    };
    let id = resolve_id(api, &target.id)?;
    let path = format!("/api/v1/rollouts/{id}/{verb}");
    post(api, &path, None, target.json, |r: Rollout| {
        rollout_state_line(&r)
    })
}

/// Whether `given` can only be the start of a random rollout id: hex digits and dashes,
/// shorter than a whole one. Readable ids (`beta-1.4.0-linux-amd64`) and versions are
/// used as they are.
fn is_id_prefix(given: &str) -> bool {
    !given.is_empty()
        && given.len() < 36
        && given.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// The one id among `ids` that starts with `prefix`.
fn match_prefix(ids: &[String], prefix: &str) -> anyhow::Result<String> {
    let prefix = prefix.to_ascii_lowercase();
    let matching: Vec<&String> = ids.iter().filter(|id| id.starts_with(&prefix)).collect();
    match matching.as_slice() {
        [] => bail!("no rollout id starts with {prefix}"),
        [id] => Ok((*id).clone()),
        many => {
            let names: Vec<&str> = many.iter().map(|id| id.as_str()).collect();
            bail!(
                "{prefix} is the start of {} rollout ids ({}); give more of it",
                many.len(),
                names.join(", ")
            )
        }
    }
}

/// The whole id of the rollout `given` names, looking a short one up in the listing.
pub(crate) fn resolve_id(api: &Api, given: &str) -> anyhow::Result<String> {
    #[derive(Deserialize)]
    struct Listed {
        id: String,
    }
    if !is_id_prefix(given) {
        return Ok(given.to_owned());
    }
    let mut ids = Vec::new();
    loop {
        let query = [
            ("limit", Some(MAX_PAGE.to_string())),
            ("offset", Some(ids.len().to_string())),
        ];
        let page: Vec<Listed> =
            serde_json::from_value(api.get_with_query("/api/v1/rollouts", &query)?)
                .map_err(|e| anyhow::anyhow!("unexpected rollout listing from the server: {e}"))?;
        let full = page.len() == MAX_PAGE;
        ids.extend(page.into_iter().map(|r| r.id));
        if !full {
            break;
        }
    }
    match_prefix(&ids, given)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from([&["drover"], args].concat()).map(|cli| cli.command)
    }

    fn action(args: &[&str]) -> RolloutAction {
        match parse(args) {
            Ok(Command::Rollout(RolloutArgs {
                action: Some(action),
                ..
            })) => action,
            other => panic!("{args:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn rollouts_takes_filters_and_paging() {
        let Ok(Command::Rollouts(args)) = parse(&[
            "rollouts",
            "--state",
            "halted",
            "--version",
            "1.4.0",
            "--limit",
            "5",
            "--json",
        ]) else {
            panic!("rollouts parsed wrongly");
        };
        assert_eq!(args.state.as_deref(), Some("halted"));
        assert_eq!(args.version.as_deref(), Some("1.4.0"));
        assert_eq!((args.limit, args.offset, args.json), (Some(5), None, true));
        assert!(parse(&["rollouts", "--limit", "all"]).is_err());
    }

    #[test]
    fn rollout_id_alone_shows_it_and_actions_take_an_id() {
        let Ok(Command::Rollout(args)) = parse(&["rollout", "3f2a9c1e", "--json"]) else {
            panic!("rollout ID parsed wrongly");
        };
        assert_eq!(args.id.as_deref(), Some("3f2a9c1e"));
        assert!(args.json && args.action.is_none());
        assert!(parse(&["rollout"]).is_err(), "an id or an action is needed");
        assert!(matches!(
            action(&["rollout", "show", "r1"]),
            RolloutAction::Show(Target { id, json: false }) if id == "r1"
        ));
        for verb in ["pause", "resume", "advance", "abort"] {
            let parsed = action(&["rollout", verb, "r1"]);
            let target = match parsed {
                RolloutAction::Pause(t)
                | RolloutAction::Resume(t)
                | RolloutAction::Advance(t)
                | RolloutAction::Abort(t) => t,
                other => panic!("{verb} parsed as {other:?}"),
            };
            assert_eq!(target.id, "r1");
            assert!(parse(&["rollout", verb]).is_err(), "{verb} needs an id");
        }
    }

    #[test]
    fn rollout_agents_counts_waves_from_one() {
        let RolloutAction::Agents {
            id,
            stage,
            wave,
            limit,
            offset,
            json,
        } = action(&[
            "rollout", "agents", "r1", "--stage", "failed", "--wave", "2", "--offset", "100",
        ])
        else {
            panic!("agents parsed wrongly");
        };
        assert_eq!((id.as_str(), stage.as_deref()), ("r1", Some("failed")));
        assert_eq!((wave, limit, offset, json), (Some(2), None, 100, false));
        assert!(parse(&["rollout", "agents", "r1", "--wave", "0"]).is_err());
    }

    #[test]
    fn rollout_create_needs_a_selector_and_takes_a_plan() {
        let RolloutAction::Create {
            version,
            selector,
            plan,
            ..
        } = action(&[
            "rollout", "create", "1.4.1", "--agent", "a1,a2", "--agent", "a3", "--waves", "1,100%",
            "--bake", "5m",
        ])
        else {
            panic!("create parsed wrongly");
        };
        assert_eq!(version, "1.4.1");
        assert_eq!(selector.agents, ["a1", "a2", "a3"]);
        assert_eq!(
            plan.waves.as_deref(),
            Some(&["1".to_owned(), "100%".to_owned()][..])
        );
        assert_eq!(plan.bake.as_deref(), Some("5m"));
        let RolloutAction::Create { selector, .. } = action(&[
            "rollout", "create", "1.4.1", "--os", "linux", "--arch", "arm64",
        ]) else {
            panic!("create parsed wrongly");
        };
        assert_eq!(selector.body(), json!({"os": "linux", "arch": "arm64"}));
        assert!(
            parse(&["rollout", "create", "1.4.1"]).is_err(),
            "no selector"
        );
        assert!(
            parse(&["rollout", "create", "--site", "s1"]).is_err(),
            "no version"
        );
    }

    #[test]
    fn promote_and_rollback_take_waves_and_bake() {
        let Ok(Command::Promote { plan, .. }) = parse(&[
            "promote",
            "1.4.0",
            "--waves",
            "1%,10%,50%,100%",
            "--bake",
            "10m",
        ]) else {
            panic!("promote parsed wrongly");
        };
        assert_eq!(
            given_fields(plan.fields()),
            json!({"waves": ["1%", "10%", "50%", "100%"], "bake": "10m"})
        );
        let Ok(Command::Rollback { plan, .. }) = parse(&["rollback", "1.4.0", "--waves", "100%"])
        else {
            panic!("rollback parsed wrongly");
        };
        assert_eq!(
            given_fields(plan.fields()),
            json!({"waves": ["100%"]}),
            "an unset bake is left to the server"
        );
    }

    #[test]
    fn short_hex_ids_are_prefixes_and_everything_else_is_used_as_given() {
        for prefix in ["3f2a9c1e", "3F2A", "3f2a9c1e-7", "b"] {
            assert!(is_id_prefix(prefix), "{prefix}");
        }
        for whole in [
            "",
            "3f2a9c1e-0000-4000-8000-000000000001",
            "beta-1.4.0-linux-amd64",
            "1.4.0",
            "targeted-x",
        ] {
            assert!(!is_id_prefix(whole), "{whole}");
        }
    }

    #[test]
    fn a_prefix_names_exactly_one_rollout() {
        let ids: Vec<String> = [
            "3f2a9c1e-0000-4000-8000-000000000001",
            "3f2a9c1e-7000-4000-8000-000000000002",
            "b71d04aa-0000-4000-8000-000000000003",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(match_prefix(&ids, "B71D").unwrap(), ids[2]);
        assert_eq!(match_prefix(&ids, "3f2a9c1e-7").unwrap(), ids[1]);
        let ambiguous = match_prefix(&ids, "3f2a9c1e").unwrap_err().to_string();
        assert!(
            ambiguous.starts_with("3f2a9c1e is the start of 2 rollout ids (")
                && ambiguous.ends_with("); give more of it"),
            "{ambiguous}"
        );
        assert_eq!(
            match_prefix(&ids, "ffff").unwrap_err().to_string(),
            "no rollout id starts with ffff"
        );
    }

    #[test]
    fn selectors_send_only_the_filters_given() {
        let selector = Selector {
            agents: vec!["a1".into(), "a2".into()],
            site: None,
            client: None,
            os: Some("linux".into()),
            arch: None,
            running: Some("1.3.0".into()),
        };
        assert_eq!(
            selector.body(),
            json!({"agent_ids": ["a1", "a2"], "os": "linux", "running": "1.3.0"})
        );
        let site = Selector {
            agents: Vec::new(),
            site: Some("s1".into()),
            client: None,
            os: None,
            arch: None,
            running: None,
        };
        assert_eq!(site.body(), json!({"site_id": "s1"}));
    }
}
