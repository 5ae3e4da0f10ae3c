//! The agent's config file (`--config FILE` or `DROVER_AGENT_CONFIG`): `key = value`
//! lines whose keys are the long flag names of `drover-agent run` (`server`,
//! `enroll-token`, `state-dir`, `no-auto-update = true`, ...), spliced in after the
//! subcommand (see the `flagfile` crate): a flag on the command line wins, then the
//! file, then environment variables.

use std::ffi::OsString;

use flagfile::FlagFile;

/// The flags of `run` that take no value.
pub(crate) const SWITCHES: &[&str] = &["no-auto-update"];

const CONFIG: FlagFile = FlagFile {
    env: "DROVER_AGENT_CONFIG",
    switches: SWITCHES,
};

/// The command line with the config file's settings spliced in after the subcommand.
pub(crate) fn expand(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    match args
        .iter()
        .position(|a| a == "run" || a == "worker" || a == "service-main")
    {
        Some(command_at) => CONFIG.expand(args, command_at + 1),
        None => Ok(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_applies_to_the_run_and_worker_commands_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.conf");
        std::fs::write(&file, "server = https://a.example.com\n").unwrap();
        let path = file.to_str().unwrap();
        for command in ["run", "worker"] {
            let args = ["drover-agent", command, "--config", path].map(OsString::from);
            let expanded = expand(args.to_vec()).unwrap();
            assert_eq!(
                expanded[..4],
                ["drover-agent", command, "--server", "https://a.example.com"].map(OsString::from)
            );
        }
        let version = ["drover-agent", "--version"].map(OsString::from).to_vec();
        assert_eq!(expand(version.clone()).unwrap(), version);
    }
}
