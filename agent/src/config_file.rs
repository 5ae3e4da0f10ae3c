//! The agent's config file (`--config FILE` or `DROVER_AGENT_CONFIG`): `key = value`
//! lines whose keys are the long flag names of `drover-agent run` (`server`,
//! `enroll-token`, `state-dir`, `no-auto-update = true`, ...), spliced in after the
//! subcommand (see the `flagfile` crate): a flag on the command line wins, then the
//! file, then environment variables.

use std::ffi::OsString;
use std::path::Path;

use anyhow::Context;
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

/// Removes every `enroll-token` setting from the config file, durably (a crash leaves
/// the old file or the new one) and keeping every other line as it was. False when the
/// file held none.
pub(crate) fn forget_enroll_token(path: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("while reading {}", path.display()))?;
    let is_token = |line: &str| {
        let line = line.trim();
        !line.starts_with('#')
            && line.split_once('=').is_some_and(|(key, _)| {
                key.trim()
                    .replace('_', "-")
                    .eq_ignore_ascii_case("enroll-token")
            })
    };
    if !text.lines().any(is_token) {
        return Ok(false);
    }
    let mut kept = String::with_capacity(text.len());
    for line in text.lines().filter(|line| !is_token(line)) {
        kept.push_str(line);
        kept.push('\n');
    }
    crate::atomic_file::write(path, kept.as_bytes())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enrollment_token_is_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.conf");
        std::fs::write(
            &file,
            "# Drover agent\nserver = https://a.example.com\nenroll-token = drv_enroll_x\n\
             # enroll-token = kept as a comment\nENROLL_TOKEN=again\nstate-dir = /var/lib/x\n",
        )
        .unwrap();
        assert!(forget_enroll_token(&file).unwrap());
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "# Drover agent\nserver = https://a.example.com\n\
             # enroll-token = kept as a comment\nstate-dir = /var/lib/x\n"
        );
        assert!(
            !forget_enroll_token(&file).unwrap(),
            "nothing left to remove"
        );
        assert!(forget_enroll_token(&dir.path().join("missing.conf")).is_err());
    }

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
