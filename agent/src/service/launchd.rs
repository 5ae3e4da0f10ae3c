//! The launchd job: a `LaunchDaemon` plist in /Library/LaunchDaemons that runs the
//! supervisor at boot and keeps it alive.

#![cfg_attr(not(target_os = "macos"), allow(dead_code))]

use std::path::{Path, PathBuf};

use anyhow::Context;

use super::Service;

/// The job's label, and the plist's file name.
const LABEL: &str = "com.drover.agent";
const SYSTEM_DAEMON_DIR: &str = "/Library/LaunchDaemons";
const LOG: &str = "/Library/Logs/drover-agent.log";

/// The plist's text.
pub(crate) fn plist(service: &Service) -> String {
    let string = |text: &str| format!("<string>{}</string>", escape(text));
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
    <key>Label</key>
    {label}
    <key>ProgramArguments</key>
    <array>
        {exe}
        <string>run</string>
        <string>--config</string>
        {config}
    </array>
    <key>RunAtLoad</key>
    <true/>
    <key>KeepAlive</key>
    <true/>
    <key>ThrottleInterval</key>
    <integer>5</integer>
    <key>StandardErrorPath</key>
    {log}
</dict>
</plist>
"#,
        label = string(LABEL),
        exe = string(&service.exe.display().to_string()),
        config = string(&service.config.display().to_string()),
        log = string(LOG),
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn plist_path(dir: Option<&Path>) -> PathBuf {
    dir.unwrap_or(Path::new(SYSTEM_DAEMON_DIR))
        .join(format!("{LABEL}.plist"))
}

fn target() -> String {
    format!("system/{LABEL}")
}

pub(crate) fn install(service: &Service, start: bool) -> anyhow::Result<()> {
    let path = plist_path(service.unit_dir.as_deref());
    std::fs::create_dir_all(crate::atomic_file::parent(&path))?;
    crate::atomic_file::write(&path, plist(service).as_bytes())
        .with_context(|| format!("while writing {}", path.display()))?;
    // launchd refuses plists that others can write; 0644 as Apple ships its own.
    crate::platform::permissions::make_readable(&path)?;
    println!("wrote {}", path.display());
    if service.unit_dir.is_some() || !start {
        return Ok(());
    }
    super::system(
        "launchctl",
        &["bootstrap", "system", &path.display().to_string()],
    )
}

pub(crate) fn uninstall(dir: Option<&Path>) -> anyhow::Result<()> {
    if dir.is_none() {
        let _ = super::system("launchctl", &["bootout", &target()]);
    }
    let path = plist_path(dir);
    match std::fs::remove_file(&path) {
        Ok(()) => println!("removed {}", path.display()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            println!("{} was not installed", path.display());
        }
        Err(err) => return Err(err).with_context(|| format!("while removing {}", path.display())),
    }
    Ok(())
}

pub(crate) fn start() -> anyhow::Result<()> {
    let path = plist_path(None).display().to_string();
    // Loaded already: kickstart it; bootstrap fails then, and that is fine.
    let _ = super::system("launchctl", &["bootstrap", "system", &path]);
    super::system("launchctl", &["kickstart", &target()])
}

pub(crate) fn stop() -> anyhow::Result<()> {
    // KeepAlive would restart a killed job: unload it (the plist stays for the next boot).
    super::system("launchctl", &["bootout", &target()])
}

pub(crate) fn status() -> anyhow::Result<()> {
    super::system("launchctl", &["print", &target()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plist_runs_the_supervisor_at_boot_and_keeps_it_alive() {
        let plist = plist(&Service {
            exe: "/usr/local/bin/drover-agent".into(),
            config: "/Library/Application Support/Drover/agent.conf".into(),
            unit_dir: None,
        });
        let compact: String = plist.split_whitespace().collect();
        assert!(
            compact.contains(
                "<key>ProgramArguments</key><array><string>/usr/local/bin/drover-agent</string>\
                 <string>run</string><string>--config</string>\
                 <string>/Library/ApplicationSupport/Drover/agent.conf</string></array>"
            ),
            "{plist}"
        );
        assert!(compact.contains("<key>KeepAlive</key><true/>"), "{plist}");
        assert!(compact.contains("<key>RunAtLoad</key><true/>"), "{plist}");
        assert!(
            compact.contains("<key>Label</key><string>com.drover.agent</string>"),
            "{plist}"
        );
    }

    #[test]
    fn paths_are_escaped_as_xml() {
        let plist = plist(&Service {
            exe: "/opt/a&b/<drover>".into(),
            config: "/etc/x.conf".into(),
            unit_dir: None,
        });
        assert!(
            plist.contains("<string>/opt/a&amp;b/&lt;drover&gt;</string>"),
            "{plist}"
        );
    }

    #[test]
    fn the_plist_is_a_launch_daemon() {
        assert_eq!(
            plist_path(None),
            Path::new("/Library/LaunchDaemons/com.drover.agent.plist")
        );
    }
}
