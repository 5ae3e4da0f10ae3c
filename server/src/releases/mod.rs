//! Agent builds in the downloads directory: which are offered, and which are skipped and why.
//! `scan` reads the directory, `watch` keeps a current `ReleaseIndex` fresh.

mod scan;
mod watch;

pub(crate) use scan::{ScanOptions, Scanner};
pub(crate) use watch::{Releases, WatchOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Channel {
    Stable,
    Beta,
}

impl Channel {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Channel::Stable => "stable",
            Channel::Beta => "beta",
        }
    }

    /// Exactly `stable` or `beta`.
    pub(crate) fn parse(text: &str) -> Option<Channel> {
        match text {
            "stable" => Some(Channel::Stable),
            "beta" => Some(Channel::Beta),
            _ => None,
        }
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A build that is offered: its checksum matched and its sidecars were in order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Release {
    pub(crate) version: semver::Version,
    /// `linux`, `windows` or `macos`.
    pub(crate) os: String,
    /// `amd64` or `arm64`.
    pub(crate) arch: String,
    pub(crate) channel: Channel,
    /// Lower-case hex.
    pub(crate) sha256: String,
    pub(crate) size: u64,
    /// File name within the downloads directory.
    pub(crate) file: String,
    /// The release signature document from `<file>.sig`, rendered canonically
    /// (`protocol::release_signature`); agents verify it, the server does not.
    pub(crate) signature: Option<String>,
}

/// A file in the downloads directory that is not offered, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Skipped {
    pub(crate) file: String,
    pub(crate) reason: String,
}

/// The outcome of one scan: releases sorted by (os, arch, version descending), skipped
/// files sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ReleaseIndex {
    pub(crate) releases: Vec<Release>,
    pub(crate) skipped: Vec<Skipped>,
}

impl ReleaseIndex {
    /// Sorts both lists into the order the index promises.
    pub(crate) fn new(mut releases: Vec<Release>, mut skipped: Vec<Skipped>) -> ReleaseIndex {
        releases.sort_by(|a, b| {
            (&a.os, &a.arch)
                .cmp(&(&b.os, &b.arch))
                .then_with(|| b.version.cmp(&a.version))
                .then_with(|| a.file.cmp(&b.file))
        });
        skipped.sort_by(|a, b| a.file.cmp(&b.file));
        ReleaseIndex { releases, skipped }
    }

    pub(crate) fn by_file(&self, file: &str) -> Option<&Release> {
        self.releases.iter().find(|r| r.file == file)
    }

    pub(crate) fn find(&self, version: &semver::Version, os: &str, arch: &str) -> Option<&Release> {
        self.releases
            .iter()
            .find(|r| r.version == *version && r.os == os && r.arch == arch)
    }

    /// The newest release for `os`/`arch` that `accept` admits.
    pub(crate) fn newest(
        &self,
        os: &str,
        arch: &str,
        accept: impl Fn(&Release) -> bool,
    ) -> Option<&Release> {
        // Not relying on the sort order: the fields are public within the crate.
        self.releases
            .iter()
            .filter(|r| r.os == os && r.arch == arch && accept(r))
            .max_by(|a, b| a.version.cmp(&b.version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str, os: &str, arch: &str, channel: Channel) -> Release {
        Release {
            version: semver::Version::parse(version).unwrap(),
            os: os.to_string(),
            arch: arch.to_string(),
            channel,
            sha256: "00".repeat(32),
            size: 1,
            file: format!("drover-agent-{os}-{arch}-{version}"),
            signature: None,
        }
    }

    fn index() -> ReleaseIndex {
        ReleaseIndex::new(
            vec![
                release("1.9.0", "linux", "amd64", Channel::Stable),
                release("1.10.0", "linux", "amd64", Channel::Stable),
                release("1.2.0-beta.1", "linux", "arm64", Channel::Beta),
                release("1.2.0", "linux", "arm64", Channel::Stable),
                release("1.11.0-rc.1", "linux", "amd64", Channel::Beta),
                release("2.0.0", "windows", "amd64", Channel::Stable),
            ],
            Vec::new(),
        )
    }

    fn newest_version(
        index: &ReleaseIndex,
        os: &str,
        arch: &str,
        channel: Channel,
    ) -> Option<String> {
        index
            .newest(os, arch, |r| {
                channel == Channel::Beta || r.channel == Channel::Stable
            })
            .map(|r| r.version.to_string())
    }

    #[test]
    fn newest_honours_os_arch_filter_and_semver_order() {
        let index = index();
        let cases = [
            ("linux", "amd64", Channel::Stable, Some("1.10.0")),
            ("linux", "amd64", Channel::Beta, Some("1.11.0-rc.1")),
            ("linux", "arm64", Channel::Stable, Some("1.2.0")),
            ("linux", "arm64", Channel::Beta, Some("1.2.0")),
            ("windows", "amd64", Channel::Stable, Some("2.0.0")),
            ("windows", "arm64", Channel::Beta, None),
            ("macos", "amd64", Channel::Beta, None),
        ];
        for (os, arch, channel, expected) in cases {
            assert_eq!(
                newest_version(&index, os, arch, channel).as_deref(),
                expected,
                "{os}/{arch} on {channel}"
            );
        }
        assert!(index.newest("linux", "amd64", |_| false).is_none());
    }

    #[test]
    fn index_is_sorted_by_os_arch_and_version_descending() {
        let order: Vec<String> = index()
            .releases
            .iter()
            .map(|r| format!("{}-{}-{}", r.os, r.arch, r.version))
            .collect();
        assert_eq!(
            order,
            [
                "linux-amd64-1.11.0-rc.1",
                "linux-amd64-1.10.0",
                "linux-amd64-1.9.0",
                "linux-arm64-1.2.0",
                "linux-arm64-1.2.0-beta.1",
                "windows-amd64-2.0.0",
            ]
        );
    }

    #[test]
    fn finds_by_file_and_by_version() {
        let index = index();
        let version = semver::Version::parse("1.2.0-beta.1").unwrap();
        let found = index.find(&version, "linux", "arm64").unwrap();
        assert_eq!(found.file, "drover-agent-linux-arm64-1.2.0-beta.1");
        assert!(index.find(&version, "linux", "amd64").is_none());
        assert_eq!(
            index
                .by_file("drover-agent-windows-amd64-2.0.0")
                .map(|r| r.version.to_string()),
            Some("2.0.0".to_string())
        );
        assert!(index.by_file("drover-agent-windows-amd64-2.0.1").is_none());
    }

    #[test]
    fn channels_parse_exactly() {
        for channel in [Channel::Stable, Channel::Beta] {
            assert_eq!(Channel::parse(channel.as_str()), Some(channel));
        }
        for text in ["", "Beta", " beta", "alpha"] {
            assert_eq!(Channel::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn release_serializes_version_and_channel_as_strings() {
        let json =
            serde_json::to_value(release("1.2.0-beta.1", "linux", "amd64", Channel::Beta)).unwrap();
        assert_eq!(json["version"], "1.2.0-beta.1");
        assert_eq!(json["channel"], "beta");
        assert_eq!(json["signature"], serde_json::Value::Null);
    }
}
