//! Config files for Drover's commands (`drover-server --config FILE`,
//! `drover-agent run --config FILE`): `key = value` lines whose keys are the command's
//! long flag names (`listen = 0.0.0.0:8080`, `require-signatures = true`). The file's
//! settings are turned into flags and spliced into the command line, except those the
//! command line gives itself: a flag on the command line wins, then the file, then
//! environment variables (which clap reads for flags that are absent).

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, bail};

/// How one command reads its config file.
#[derive(Debug, Clone, Copy)]
pub struct FlagFile {
    /// The environment variable that names the file when `--config` is not given.
    pub env: &'static str,
    /// Settings that are switches (`true`/`false`) rather than values.
    pub switches: &'static [&'static str],
}

impl FlagFile {
    /// `args` with the config file's settings inserted at `at` (just after the program
    /// name, or after a subcommand); the flags from `at` on are the command's own. The
    /// arguments come back unchanged when no config file is named.
    pub fn expand(&self, args: Vec<OsString>, at: usize) -> anyhow::Result<Vec<OsString>> {
        let at = at.min(args.len());
        let given = &args[at..];
        let Some(path) = self.path(given) else {
            return Ok(args);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("while reading the config file {}", path.to_string_lossy()))?;
        let settings = self
            .parse(&text)
            .with_context(|| format!("in {}", path.to_string_lossy()))?;
        let mut expanded: Vec<OsString> = args[..at].to_vec();
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
        expanded.extend(given.iter().cloned());
        Ok(expanded)
    }

    fn path(&self, args: &[OsString]) -> Option<OsString> {
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            if arg == "--config" {
                return args.next().cloned();
            }
            if let Some(path) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
                return Some(path.into());
            }
        }
        std::env::var_os(self.env).filter(|p| !p.is_empty() && Path::new(p).exists())
    }

    /// The file's settings as flags, each with its value (switches have none).
    fn parse(&self, text: &str) -> anyhow::Result<Vec<(String, Option<String>)>> {
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
            if self.switches.contains(&key.as_str()) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: FlagFile = FlagFile {
        env: "DROVER_TEST_CONFIG_UNSET",
        switches: &["no-auto-update"],
    };

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(Into::into).collect()
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
        let path = file.to_str().unwrap();
        let args = os(&[
            "drover-agent",
            "run",
            "--config",
            path,
            "--hostname",
            "h",
            "--state-dir=/tmp/mine",
        ]);
        assert_eq!(
            strings(&AGENT.expand(args, 2).unwrap()),
            [
                "drover-agent",
                "run",
                "--server",
                "https://a.example.com,https://b.example.com",
                "--no-auto-update",
                "--config",
                path,
                "--hostname",
                "h",
                "--state-dir=/tmp/mine",
            ]
        );
    }

    #[test]
    fn a_switch_set_false_adds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.conf");
        std::fs::write(&file, "no-auto-update = off\nlisten = 0.0.0.0:80\n").unwrap();
        let config = format!("--config={}", file.to_str().unwrap());
        let args = os(&["drover-server", &config]);
        assert_eq!(
            strings(&AGENT.expand(args, 1).unwrap()),
            ["drover-server", "--listen", "0.0.0.0:80", config.as_str()]
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
            let err = AGENT.parse(text).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let args = os(&["drover-server", "--config", "/nonexistent/drover.conf"]);
        let err = format!("{:#}", AGENT.expand(args, 1).unwrap_err());
        assert!(err.contains("/nonexistent/drover.conf"), "{err}");
    }

    #[test]
    fn without_a_config_file_the_arguments_are_unchanged() {
        let args = os(&["drover-agent", "--version"]);
        assert_eq!(AGENT.expand(args.clone(), 1).unwrap(), args);
    }
}
