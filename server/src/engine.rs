//! Deciding an update: given what an agent runs and which builds are offered, which build
//! (if any) is due. Pure: no I/O, no clock, so every rule is a table test.

use std::collections::HashSet;

use semver::Version;

use crate::releases::{Channel, Release, ReleaseIndex};
use crate::store::{AgentRecord, CandidateRecord};

/// What the decision needs to know about one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentPosition {
    pub(crate) version: String,
    pub(crate) os: String,
    pub(crate) arch: String,
    pub(crate) channel: Channel,
    pub(crate) paused: bool,
    /// False when the agent itself declines updates (`--no-auto-update`).
    pub(crate) auto_update: bool,
    /// Versions that failed on this agent because of the build (class `build`).
    pub(crate) failed_versions: HashSet<String>,
}

/// Server-wide conditions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy<'a> {
    pub(crate) updates_enabled: bool,
    pub(crate) blocked_versions: &'a HashSet<String>,
}

impl Policy<'_> {
    /// Whether a build may be dispatched at all. A halted rollout holds its build at
    /// admission (`rollouts::book`), not here.
    pub(crate) fn allows(&self, release: &Release) -> bool {
        !self.blocked_versions.contains(&release.version.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    Offer(Release),
    Hold(HoldReason),
}

/// Why nothing is offered; shown to operators so nobody has to read logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HoldReason {
    UpdatesDisabled,
    Paused,
    AgentDeclines,
    UnparsableVersion(String),
    NoBuildForPlatform,
    UpToDate,
    FailedBefore(String),
}

impl HoldReason {
    pub(crate) fn describe(&self) -> String {
        match self {
            HoldReason::UpdatesDisabled => "updates are disabled server-wide".into(),
            HoldReason::Paused => "updates are paused for this agent".into(),
            HoldReason::AgentDeclines => "the agent runs with auto-update off".into(),
            HoldReason::UnparsableVersion(v) => format!("the agent's version {v:?} is not semver"),
            HoldReason::NoBuildForPlatform => {
                "no offered build for this os/arch and channel".into()
            }
            HoldReason::UpToDate => "already on the newest build of its channel".into(),
            HoldReason::FailedBefore(v) => {
                format!(
                    "the newest build {v} failed on this agent; it is retried only when forced or superseded"
                )
            }
        }
    }
}

/// The channel an agent follows and where it comes from (`agent`, `site`, `client` or
/// `default`): the most specific level that sets one.
pub(crate) fn resolve_channel(agent: &AgentRecord) -> (Channel, &'static str) {
    resolve_channels(
        agent.agent_channel.as_deref(),
        agent.site_channel.as_deref(),
        agent.client_channel.as_deref(),
    )
}

/// `resolve_channel` of the part of an agent's record a rollout's start reads.
pub(crate) fn resolve_candidate_channel(agent: &CandidateRecord) -> Channel {
    resolve_channels(
        agent.agent_channel.as_deref(),
        agent.site_channel.as_deref(),
        agent.client_channel.as_deref(),
    )
    .0
}

/// `resolve_channel` from the channels set on the agent, its site and its client.
pub(crate) fn resolve_channels(
    agent: Option<&str>,
    site: Option<&str>,
    client: Option<&str>,
) -> (Channel, &'static str) {
    [(agent, "agent"), (site, "site"), (client, "client")]
        .into_iter()
        .find_map(|(channel, source)| channel.and_then(Channel::parse).map(|c| (c, source)))
        .unwrap_or((Channel::Stable, "default"))
}

/// Whether a build is visible to a channel: beta agents see beta and stable builds.
pub(crate) fn channel_admits(agent: Channel, build: Channel) -> bool {
    agent == Channel::Beta || build == Channel::Stable
}

/// The newest build of the agent's channel and platform that is neither blocked nor
/// halted, strictly newer than what it runs, and has not failed on it.
pub(crate) fn needs_update(
    agent: &AgentPosition,
    index: &ReleaseIndex,
    policy: &Policy<'_>,
) -> Decision {
    if !policy.updates_enabled {
        return Decision::Hold(HoldReason::UpdatesDisabled);
    }
    if agent.paused {
        return Decision::Hold(HoldReason::Paused);
    }
    if !agent.auto_update {
        return Decision::Hold(HoldReason::AgentDeclines);
    }
    let Ok(running) = Version::parse(&agent.version) else {
        return Decision::Hold(HoldReason::UnparsableVersion(agent.version.clone()));
    };
    let eligible = |release: &Release| {
        channel_admits(agent.channel, release.channel) && policy.allows(release)
    };
    let Some(newest) = index.newest(&agent.os, &agent.arch, eligible) else {
        return Decision::Hold(HoldReason::NoBuildForPlatform);
    };
    if newest.version <= running {
        return Decision::Hold(HoldReason::UpToDate);
    }
    let untried = |release: &Release| {
        eligible(release)
            && release.version > running
            && !agent.failed_versions.contains(&release.version.to_string())
    };
    match index.newest(&agent.os, &agent.arch, untried) {
        Some(release) => Decision::Offer(release.clone()),
        None => Decision::Hold(HoldReason::FailedBefore(newest.version.to_string())),
    }
}

/// For every build of the agent's platform, why it is not offered to the agent (`None`
/// for the one that is, or would be once the agent-level holds are lifted).
pub(crate) fn why_not(
    agent: &AgentPosition,
    index: &ReleaseIndex,
    policy: &Policy<'_>,
) -> Vec<(Release, Option<String>)> {
    let running = Version::parse(&agent.version).ok();
    let chosen = match needs_update(
        &AgentPosition {
            paused: false,
            auto_update: true,
            ..agent.clone()
        },
        index,
        &Policy {
            updates_enabled: true,
            ..*policy
        },
    ) {
        Decision::Offer(release) => Some(release.version),
        Decision::Hold(_) => None,
    };
    index
        .releases
        .iter()
        .filter(|r| r.os == agent.os && r.arch == agent.arch)
        .map(|release| {
            let version = release.version.to_string();
            let reason = if !channel_admits(agent.channel, release.channel) {
                Some(format!(
                    "a {} build; the agent follows {}",
                    release.channel.as_str(),
                    agent.channel.as_str()
                ))
            } else if policy.blocked_versions.contains(&version) {
                Some("blocked: rolled back by an operator".to_owned())
            } else if running
                .as_ref()
                .is_none_or(|running| release.version <= *running)
            {
                Some(format!("not newer than {}", agent.version))
            } else if agent.failed_versions.contains(&version) {
                Some("failed on this agent before".to_owned())
            } else if chosen.as_ref() != Some(&release.version) {
                Some("a newer build is offered instead".to_owned())
            } else {
                None
            };
            (release.clone(), reason)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str, channel: Channel) -> Release {
        release_for(version, channel, "linux", "amd64")
    }

    fn release_for(version: &str, channel: Channel, os: &str, arch: &str) -> Release {
        Release {
            version: Version::parse(version).unwrap(),
            os: os.into(),
            arch: arch.into(),
            channel,
            sha256: "00".repeat(32),
            size: 10,
            file: format!("drover-agent-{os}-{arch}-{version}"),
            signature: None,
        }
    }

    fn index(releases: Vec<Release>) -> ReleaseIndex {
        let mut releases = releases;
        releases.sort_by(|a, b| {
            (&a.os, &a.arch)
                .cmp(&(&b.os, &b.arch))
                .then(b.version.cmp(&a.version))
        });
        ReleaseIndex {
            releases,
            skipped: Vec::new(),
        }
    }

    fn agent(version: &str, channel: Channel) -> AgentPosition {
        AgentPosition {
            version: version.into(),
            os: "linux".into(),
            arch: "amd64".into(),
            channel,
            paused: false,
            auto_update: true,
            failed_versions: HashSet::new(),
        }
    }

    static NOTHING_BLOCKED: std::sync::LazyLock<HashSet<String>> =
        std::sync::LazyLock::new(HashSet::new);

    fn enabled() -> Policy<'static> {
        Policy {
            updates_enabled: true,
            blocked_versions: &NOTHING_BLOCKED,
        }
    }

    fn offered(decision: Decision) -> Option<String> {
        match decision {
            Decision::Offer(release) => Some(release.version.to_string()),
            Decision::Hold(_) => None,
        }
    }

    fn record(agent: Option<&str>, site: Option<&str>, client: Option<&str>) -> AgentRecord {
        AgentRecord {
            id: "a".into(),
            site_id: "s".into(),
            fingerprint: "f".into(),
            hostname: "h".into(),
            version: "1.0.0".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            paused: false,
            auto_update: true,
            enrolled_at_ms: 0,
            last_seen_ms: 0,
            agent_channel: agent.map(Into::into),
            site_channel: site.map(Into::into),
            client_channel: client.map(Into::into),
            site_window: None,
            client_window: None,
            site_mirror: None,
            client_mirror: None,
            node_id: None,
            node_last_beat_ms: None,
            conflict_at_ms: None,
            conflict_count: 0,
            conflict_hostname: None,
        }
    }

    #[test]
    fn channel_resolves_agent_then_site_then_client_then_stable() {
        use Channel::{Beta, Stable};
        let cases = [
            (
                record(Some("beta"), Some("stable"), Some("stable")),
                (Beta, "agent"),
            ),
            (record(None, Some("beta"), Some("stable")), (Beta, "site")),
            (record(None, None, Some("beta")), (Beta, "client")),
            (record(None, None, None), (Stable, "default")),
            (
                record(Some("stable"), Some("beta"), None),
                (Stable, "agent"),
            ),
            (record(None, Some("stable"), Some("beta")), (Stable, "site")),
        ];
        for (agent, expected) in cases {
            assert_eq!(resolve_channel(&agent), expected, "{agent:?}");
        }
    }

    #[test]
    fn channels_see_their_builds() {
        use Channel::{Beta, Stable};
        let builds = index(vec![
            release("1.0.0", Stable),
            release("1.1.0", Stable),
            release("1.2.0-beta.1", Beta),
            release("1.2.0", Beta),
            release_for("9.0.0", Stable, "windows", "amd64"),
            release_for("9.0.0", Stable, "linux", "arm64"),
        ]);
        let cases = [
            // (running, channel, expected offer)
            ("1.0.0", Stable, Some("1.1.0")),
            ("1.0.0", Beta, Some("1.2.0")),
            ("1.1.0", Stable, None),
            ("1.2.0-beta.1", Beta, Some("1.2.0")),
            ("1.2.0", Beta, None),
            ("1.3.0", Beta, None),
            ("0.9.0", Stable, Some("1.1.0")),
        ];
        for (running, channel, expected) in cases {
            let decision = needs_update(&agent(running, channel), &builds, &enabled());
            assert_eq!(
                offered(decision),
                expected.map(String::from),
                "{running} on {channel:?}"
            );
        }
    }

    #[test]
    fn only_forward_never_a_downgrade() {
        let builds = index(vec![release("1.0.0", Channel::Stable)]);
        assert_eq!(
            needs_update(&agent("2.0.0", Channel::Stable), &builds, &enabled()),
            Decision::Hold(HoldReason::UpToDate)
        );
        assert_eq!(
            needs_update(&agent("1.0.0", Channel::Stable), &builds, &enabled()),
            Decision::Hold(HoldReason::UpToDate)
        );
    }

    #[test]
    fn holds_and_their_reasons() {
        let builds = index(vec![release("1.1.0", Channel::Stable)]);
        let running = agent("1.0.0", Channel::Stable);
        let paused = AgentPosition {
            paused: true,
            ..running.clone()
        };
        let declines = AgentPosition {
            auto_update: false,
            ..running.clone()
        };
        let other_platform = AgentPosition {
            os: "macos".into(),
            ..running.clone()
        };
        let odd_version = agent("dev-build", Channel::Stable);
        let disabled = Policy {
            updates_enabled: false,
            ..enabled()
        };
        let cases = [
            (&running, &disabled, HoldReason::UpdatesDisabled),
            (&paused, &enabled(), HoldReason::Paused),
            (&declines, &enabled(), HoldReason::AgentDeclines),
            (&other_platform, &enabled(), HoldReason::NoBuildForPlatform),
            (
                &odd_version,
                &enabled(),
                HoldReason::UnparsableVersion("dev-build".into()),
            ),
        ];
        for (position, policy, reason) in cases {
            assert_eq!(
                needs_update(position, &builds, policy),
                Decision::Hold(reason)
            );
        }
        assert!(!HoldReason::Paused.describe().is_empty());
    }

    #[test]
    fn blocked_versions_are_never_offered() {
        let builds = index(vec![
            release("1.1.0", Channel::Stable),
            release("1.2.0", Channel::Stable),
        ]);
        let blocked = HashSet::from(["1.2.0".to_owned()]);
        let policy = Policy {
            blocked_versions: &blocked,
            ..enabled()
        };
        let decision = needs_update(&agent("1.0.0", Channel::Stable), &builds, &policy);
        assert_eq!(offered(decision), Some("1.1.0".into()));
        let decision = needs_update(&agent("1.1.0", Channel::Stable), &builds, &policy);
        assert_eq!(decision, Decision::Hold(HoldReason::UpToDate));
    }

    #[test]
    fn every_build_not_offered_says_why() {
        let builds = index(vec![
            release("0.9.0", Channel::Stable),
            release("1.1.0", Channel::Stable),
            release("1.2.0", Channel::Stable),
            release("1.3.0", Channel::Stable),
            release("1.4.0", Channel::Beta),
            release_for("2.0.0", Channel::Stable, "windows", "amd64"),
        ]);
        let mut position = agent("1.0.0", Channel::Stable);
        position.failed_versions.insert("1.3.0".into());
        position.paused = true;
        let blocked = HashSet::from(["1.2.0".to_owned()]);
        let policy = Policy {
            blocked_versions: &blocked,
            ..enabled()
        };
        let reasons: Vec<(String, Option<String>)> = why_not(&position, &builds, &policy)
            .into_iter()
            .map(|(r, why)| (r.version.to_string(), why))
            .collect();
        let expected = [
            ("1.4.0", Some("a beta build; the agent follows stable")),
            ("1.3.0", Some("failed on this agent before")),
            ("1.2.0", Some("blocked: rolled back by an operator")),
            ("1.1.0", None),
            ("0.9.0", Some("not newer than 1.0.0")),
        ];
        let expected: Vec<(String, Option<String>)> = expected
            .iter()
            .map(|(v, why)| (v.to_string(), why.map(String::from)))
            .collect();
        assert_eq!(reasons, expected);
    }

    #[test]
    fn failed_versions_are_not_retried_until_superseded() {
        let mut builds = vec![release("1.1.0", Channel::Stable)];
        let mut position = agent("1.0.0", Channel::Stable);
        position.failed_versions.insert("1.1.0".into());
        assert_eq!(
            needs_update(&position, &index(builds.clone()), &enabled()),
            Decision::Hold(HoldReason::FailedBefore("1.1.0".into()))
        );
        builds.push(release("1.1.1", Channel::Stable));
        assert_eq!(
            offered(needs_update(&position, &index(builds), &enabled())),
            Some("1.1.1".into())
        );
    }
}
