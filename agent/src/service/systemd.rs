//! The systemd unit: `drover-agent.service` in /etc/systemd/system, running the
//! supervisor, restarted always, stopped together with its worker.

#![cfg_attr(not(all(unix, not(target_os = "macos"))), allow(dead_code))]

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{NAME, Service, system};

const SYSTEM_UNIT_DIR: &str = "/etc/systemd/system";

/// The unit file's text.
pub(crate) fn unit(service: &Service) -> String {
    format!(
        "\
# systemd unit for the Drover agent, written by `drover-agent service install`.
# `drover-agent run` is a supervisor: it starts the session worker, restarts it, and
# applies updates (a new build runs on probation and replaces the executable only once
# it has reached the server), so the service stays up across updates.
[Unit]
Description=Drover update agent
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
ExecStart={exe} run --config {config}
Restart=always
RestartSec=5
# Stop the supervisor and its worker together; every update step is journaled, so a
# stop at any moment is safe.
KillMode=control-group

[Install]
WantedBy=multi-user.target
",
        exe = quote(&service.exe),
        config = quote(&service.config),
    )
}

/// A path as one word of a unit's command line.
fn quote(path: &Path) -> String {
    let text = path.display().to_string();
    if text.contains([' ', '"', '\\', '\'']) {
        format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        text
    }
}

fn unit_path(unit_dir: Option<&Path>) -> PathBuf {
    unit_dir
        .unwrap_or(Path::new(SYSTEM_UNIT_DIR))
        .join(format!("{NAME}.service"))
}

pub(crate) fn install(service: &Service, start: bool) -> anyhow::Result<()> {
    let path = unit_path(service.unit_dir.as_deref());
    std::fs::create_dir_all(crate::atomic_file::parent(&path))?;
    crate::atomic_file::write(&path, unit(service).as_bytes())
        .with_context(|| format!("while writing {}", path.display()))?;
    // atomic_file writes 0600; systemd reads units as root, but tools read them as users.
    crate::platform::permissions::make_readable(&path)?;
    println!("wrote {}", path.display());
    if service.unit_dir.is_some() {
        return Ok(());
    }
    system("systemctl", &["daemon-reload"])?;
    if start {
        system("systemctl", &["enable", "--now", NAME])
    } else {
        system("systemctl", &["enable", NAME])
    }
}

pub(crate) fn uninstall(unit_dir: Option<&Path>) -> anyhow::Result<()> {
    if unit_dir.is_none() {
        // Not installed is fine: the unit file is removed either way.
        let _ = system("systemctl", &["disable", "--now", NAME]);
    }
    let path = unit_path(unit_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => println!("removed {}", path.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            println!("{} was not installed", path.display());
        }
        Err(err) => return Err(err).with_context(|| format!("while removing {}", path.display())),
    }
    if unit_dir.is_none() {
        system("systemctl", &["daemon-reload"])?;
    }
    Ok(())
}

pub(crate) fn start() -> anyhow::Result<()> {
    system("systemctl", &["start", NAME])
}

pub(crate) fn stop() -> anyhow::Result<()> {
    system("systemctl", &["stop", NAME])
}

pub(crate) fn status() -> anyhow::Result<()> {
    system("systemctl", &["status", "--no-pager", NAME])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(exe: &str, config: &str) -> Service {
        Service {
            exe: exe.into(),
            config: config.into(),
            unit_dir: None,
        }
    }

    /// `key=value` pairs of one section of a unit file.
    fn section(unit: &str, name: &str) -> Vec<(String, String)> {
        unit.lines()
            .skip_while(|line| *line != format!("[{name}]"))
            .skip(1)
            .take_while(|line| !line.starts_with('['))
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| {
                let (key, value) = line.split_once('=').unwrap();
                (key.to_owned(), value.to_owned())
            })
            .collect()
    }

    #[test]
    fn the_unit_runs_the_supervisor_with_the_config_and_restarts_it() {
        let unit = unit(&service(
            "/usr/local/bin/drover-agent",
            "/etc/drover-agent/agent.conf",
        ));
        let service = section(&unit, "Service");
        let get = |key: &str| {
            service
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            get("ExecStart"),
            Some("/usr/local/bin/drover-agent run --config /etc/drover-agent/agent.conf")
        );
        assert_eq!(get("Restart"), Some("always"));
        assert_eq!(get("KillMode"), Some("control-group"));
        assert_eq!(
            section(&unit, "Install"),
            [("WantedBy".to_owned(), "multi-user.target".to_owned())]
        );
    }

    #[test]
    fn paths_with_spaces_are_quoted() {
        let unit = unit(&service("/opt/drover agent/drover-agent", "/etc/a b.conf"));
        assert!(
            unit.contains(
                "ExecStart=\"/opt/drover agent/drover-agent\" run --config \"/etc/a b.conf\""
            ),
            "{unit}"
        );
    }

    #[test]
    fn the_unit_goes_to_the_given_directory() {
        assert_eq!(
            unit_path(None),
            Path::new("/etc/systemd/system/drover-agent.service")
        );
        assert_eq!(
            unit_path(Some(Path::new("/tmp/units"))),
            Path::new("/tmp/units/drover-agent.service")
        );
    }
}
