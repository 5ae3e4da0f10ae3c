//! The agent's config file (`--config FILE` or `DROVER_AGENT_CONFIG`): `key = value`
//! lines whose keys are the long flag names of `drover-agent run` (`server`,
//! `enroll-token`, `state-dir`, `no-auto-update = true`, ...). The file's settings are
//! turned into flags, except those the command line gives itself: a flag on the command
//! line wins, then the file, then environment variables.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, bail};

const CONFIG_ENV: &str = "DROVER_AGENT_CONFIG";
/// Settings that are switches rather than values.
const SWITCHES: [&str; 1] = ["no-auto-update"];

/// The command line with the config file's settings spliced in after the subcommand.
pub(crate) fn expand(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(command_at) = args.iter().position(|a| a == "run" || a == "worker") else {
        return Ok(args);
    };
    let Some(path) = config_path(&args[command_at + 1..]) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("while reading the config file {}", path.to_string_lossy()))?;
    let given = &args[command_at + 1..];
    let settings = parse(&text).with_context(|| format!("in {}", path.to_string_lossy()))?;
    let mut expanded: Vec<OsString> = args[..=command_at].to_vec();
    for (flag, value) in settings {
        let on_command_line = given.iter().any(|a| {
            a.to_str()
                .is_some_and(|a| a == flag || a.starts_with(&format!("{flag}=")))
        });
        if !on_command_line {
            expanded.push(flag.into());
            expanded.extend(value.map(OsString::from));
        }
    }
    expanded.extend(args[command_at + 1..].iter().cloned());
    Ok(expanded)
}

fn config_path(args: &[OsString]) -> Option<OsString> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            return args.next().cloned();
        }
        if let Some(path) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            return Some(path.into());
        }
    }
    std::env::var_os(CONFIG_ENV).filter(|p| !p.is_empty() && Path::new(p).exists())
}

/// The file's settings as flags, each with its value (switches have none).
fn parse(text: &str) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let mut flags = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            bail!(
                "line {}: expected `key = value`, found {line:?}",
                number + 1
            );
        };
        let key = key.trim().replace('_', "-").to_ascii_lowercase();
        let value = value.trim().trim_matches('"');
        if key == "config" || key.is_empty() {
            bail!(
                "line {}: {key:?} cannot be set in a config file",
                number + 1
            );
        }
        if SWITCHES.contains(&key.as_str()) {
            match value {
                "true" | "yes" | "1" | "on" => flags.push((format!("--{key}"), None)),
                "false" | "no" | "0" | "off" => {}
                other => bail!(
                    "line {}: {key} must be true or false, not {other:?}",
                    number + 1
                ),
            }
        } else {
            flags.push((format!("--{key}"), Some(value.to_owned())));
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn settings_become_flags_unless_the_command_line_gives_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.conf");
        std::fs::write(
            &file,
            "# Drover agent\nserver = https://a.example.com,https://b.example.com\nstate_dir = \"/var/lib/drover-agent\"\nno-auto-update = true\n\n",
        )
        .unwrap();
        let args: Vec<OsString> = [
            "drover-agent",
            "run",
            "--config",
            file.to_str().unwrap(),
            "--hostname",
            "h",
            "--state-dir=/tmp/mine",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let expanded = strings(&expand(args).unwrap());
        assert_eq!(
            expanded,
            [
                "drover-agent",
                "run",
                "--server",
                "https://a.example.com,https://b.example.com",
                "--no-auto-update",
                "--config",
                file.to_str().unwrap(),
                "--hostname",
                "h",
                "--state-dir=/tmp/mine",
            ]
        );
    }

    #[test]
    fn bad_lines_are_errors_with_their_line_number() {
        let cases = [
            ("server https://x", "line 1: expected `key = value`"),
            (
                "\nno-auto-update = maybe",
                "line 2: no-auto-update must be true or false",
            ),
            ("config = /etc/other", "line 1: \"config\" cannot be set"),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn without_a_config_file_the_arguments_are_unchanged() {
        let args: Vec<OsString> = ["drover-agent", "--version"]
            .iter()
            .map(Into::into)
            .collect();
        assert_eq!(expand(args.clone()).unwrap(), args);
    }
}
