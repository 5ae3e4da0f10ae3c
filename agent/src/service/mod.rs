//! `drover-agent service install|uninstall|start|stop|status`: the agent as a system
//! service that starts at boot and restarts on failure, through the system's own
//! service manager: systemd on Linux (`systemd`), launchd on macOS (`launchd`), the
//! service control manager on Windows (`scm`). `install` writes the flags it is given,
//! the same as `drover-agent run` takes, to the agent's config file; the service runs
//! `drover-agent run --config FILE` (`service-main` on Windows).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod launchd;
// The service manager's entry point is an unsafe FFI callback (define_windows_service!).
#[cfg(windows)]
#[allow(unsafe_code)]
mod scm;
mod systemd;

#[cfg(target_os = "macos")]
use launchd as manager;
#[cfg(windows)]
use scm as manager;
#[cfg(all(unix, not(target_os = "macos")))]
use systemd as manager;

/// The service's name wherever the system asks for one.
pub(crate) const NAME: &str = "drover-agent";

#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCommand {
    /// Write the config file and install the service (started at boot, restarted on
    /// failure), then start it. Give the flags of `drover-agent run` after `--`, e.g.
    /// `service install -- --server https://updates.example.com --enroll-token TOKEN`
    Install(InstallArgs),
    /// Stop and remove the service (the config file and state stay)
    Uninstall(UnitArgs),
    /// Start the installed service
    Start,
    /// Stop the installed service
    Stop,
    /// Show what the service manager says about the service
    Status,
    /// Windows: watch a hand-over to a new build's supervisor (the old supervisor starts
    /// it; not for direct use)
    #[command(hide = true)]
    WatchTakeOver {
        /// The agent's state directory
        #[arg(long, conflicts_with = "config")]
        state_dir: Option<PathBuf>,
        /// Or the config file naming it (the service's failure action passes this)
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct InstallArgs {
    /// Where to write the agent's config file [default: /etc/drover-agent/agent.conf,
    /// %ProgramData%\Drover\agent.conf, /Library/Application Support/Drover/agent.conf]
    #[arg(long, default_value_os_t = crate::platform::paths::config_file(), hide_default_value = true)]
    config: PathBuf,

    /// Install the service without starting it
    #[arg(long)]
    no_start: bool,

    #[command(flatten)]
    unit: UnitArgs,

    /// The flags of `drover-agent run` the service runs with
    #[arg(last = true, required = true, value_name = "RUN FLAGS")]
    run_flags: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct UnitArgs {
    /// Directory for the systemd unit or launchd plist instead of the system's; the
    /// service manager is then not told about it (for tests and packaging)
    #[arg(long, value_name = "DIR")]
    unit_dir: Option<PathBuf>,
}

/// What a service manager needs to know to run the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Service {
    /// The agent's executable.
    pub(crate) exe: PathBuf,
    /// Its config file.
    pub(crate) config: PathBuf,
    /// Where the unit or plist goes; `None` for the system's own place.
    pub(crate) unit_dir: Option<PathBuf>,
}

pub(crate) fn run(command: ServiceCommand) -> anyhow::Result<()> {
    match command {
        ServiceCommand::Install(args) => {
            let flags = config_lines(&args.run_flags)?;
            write_config(&args.config, &flags)?;
            println!("wrote {}", args.config.display());
            let exe = std::env::current_exe().context("cannot find this agent's executable")?;
            let service = Service {
                exe,
                config: args.config,
                unit_dir: args.unit.unit_dir,
            };
            manager::install(&service, !args.no_start)
        }
        ServiceCommand::Uninstall(args) => manager::uninstall(args.unit_dir.as_deref()),
        ServiceCommand::Start => manager::start(),
        ServiceCommand::Stop => manager::stop(),
        ServiceCommand::Status => manager::status(),
        ServiceCommand::WatchTakeOver { state_dir, config } => {
            let state_dir = match state_dir {
                Some(dir) => dir,
                None => state_dir_of(config.as_deref())?,
            };
            watch_take_over(&state_dir)
        }
    }
}

// How a supervisor hands over to a new build's supervisor where it cannot exec in place
// (Windows): a service restart (see `scm`). Elsewhere the service is never re-pointed.
#[cfg(windows)]
pub(crate) use scm::{log_to_file, restart_into, running_as_service, start_from, watch_take_over};

/// Where a service without a terminal (Windows) writes its log lines: `agent.log` in the
/// state directory, the one before kept as `agent.log.1` once it passes this size.
#[cfg_attr(not(windows), allow(dead_code))]
const LOG_FILE: &str = "agent.log";
#[cfg_attr(not(windows), allow(dead_code))]
const LOG_ROTATE_BYTES: u64 = 10 * 1024 * 1024;

/// Opens the service's log file for appending, rotating it first if it grew too large.
#[cfg_attr(not(windows), allow(dead_code))]
fn open_log(state_dir: &Path) -> std::io::Result<std::fs::File> {
    crate::platform::permissions::create_private_dir(state_dir)?;
    let path = state_dir.join(LOG_FILE);
    if std::fs::metadata(&path).is_ok_and(|meta| meta.len() > LOG_ROTATE_BYTES) {
        let mut old = path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&path, old)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// A service under systemd or launchd logs to standard error, which they keep.
#[cfg(not(windows))]
pub(crate) fn log_to_file(_state_dir: &Path) {}

/// Whether the service manager started this process; only then can a hand-over restart
/// the service.
#[cfg(not(windows))]
pub(crate) fn running_as_service() -> bool {
    false
}

/// Makes the service start `program` from now on; `false`: nothing to do here (the
/// executable is replaced by one atomic rename, so it is never missing).
#[cfg(not(windows))]
pub(crate) fn start_from(_program: &Path) -> anyhow::Result<bool> {
    Ok(false)
}

#[cfg(not(windows))]
pub(crate) fn restart_into(_next: &Path, _exe: &Path, _state_dir: &Path) -> anyhow::Result<()> {
    bail!("a hand-over by service restart is for Windows; Unix supervisors exec in place")
}

#[cfg(not(windows))]
fn watch_take_over(_state_dir: &Path) -> anyhow::Result<()> {
    bail!("a hand-over by service restart is for Windows; Unix supervisors exec in place")
}

/// The state directory `drover-agent run --config FILE` uses.
fn state_dir_of(config: Option<&Path>) -> anyhow::Result<PathBuf> {
    let mut command = vec![OsString::from("drover-agent"), OsString::from("run")];
    if let Some(config) = config {
        command.extend([OsString::from("--config"), config.as_os_str().to_owned()]);
    }
    let command = crate::config_file::expand(command)?;
    match crate::Cli::try_parse_from(command)?.command {
        crate::Command::Run(args) => Ok(args.state_dir),
        _ => bail!("not the run command"),
    }
}

/// The config file's `key = value` lines for `drover-agent run` flags, checked by
/// parsing them as `run` would.
fn config_lines(flags: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut command = vec![OsString::from("drover-agent"), OsString::from("run")];
    command.extend(flags.iter().map(OsString::from));
    if let Err(err) = crate::Cli::try_parse_from(&command) {
        bail!("these are not flags `drover-agent run` takes: {err}");
    }
    let mut lines = Vec::new();
    let mut flags = flags.iter().peekable();
    while let Some(flag) = flags.next() {
        let Some(name) = flag.strip_prefix("--") else {
            bail!("unexpected {flag:?}: give flags as --name value");
        };
        let (key, value) = match name.split_once('=') {
            Some((key, value)) => (key.to_owned(), value.to_owned()),
            None if crate::config_file::SWITCHES.contains(&name) => {
                (name.to_owned(), "true".to_owned())
            }
            None => {
                let value = flags
                    .next()
                    .with_context(|| format!("--{name} needs a value"))?;
                (name.to_owned(), value.clone())
            }
        };
        if key == "config" {
            bail!("--config names the file this command writes; give its settings instead");
        }
        if value.contains('\n') {
            bail!("--{key} holds a line break");
        }
        lines.push((key, value));
    }
    Ok(lines)
}

/// Writes the config file privately (it holds the enrollment token), atomically. The
/// default config directory is the agent's and made private; another is made private
/// only if it is created here, since it may be a shared one (`C:\ProgramData`).
fn write_config(path: &Path, lines: &[(String, String)]) -> anyhow::Result<()> {
    let dir = crate::atomic_file::parent(path);
    let default = crate::platform::paths::config_file();
    if default.parent() == Some(dir) {
        crate::platform::permissions::create_owned_dir(dir)
    } else {
        crate::platform::permissions::create_dir_for_private_file(dir)
    }
    .with_context(|| format!("while creating {}", dir.display()))?;
    let mut text =
        String::from("# Drover agent settings: keys are the long flags of `drover-agent run`.\n");
    for (key, value) in lines {
        text.push_str(&format!("{key} = {value}\n"));
    }
    crate::atomic_file::write(path, text.as_bytes())
}

/// Runs `supervise` as the Windows service the service control manager started
/// (`drover-agent service-main`); the token is cancelled on a service stop.
pub(crate) fn serve(
    supervise: impl FnOnce(tokio_util::sync::CancellationToken) -> anyhow::Result<()> + Send + 'static,
) -> anyhow::Result<()> {
    #[cfg(windows)]
    return scm::run_as_service(Box::new(supervise));
    #[cfg(not(windows))]
    {
        let _ = supervise;
        bail!("service-main is how the Windows service manager starts the agent; use run")
    }
}

/// Runs a service manager's command, failing with what it printed.
#[cfg_attr(windows, allow(dead_code))]
fn system(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_state_directory_is_read_from_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.conf");
        let state = dir.path().join("state");
        std::fs::write(
            &config,
            format!(
                "server = http://127.0.0.1:1\nstate-dir = {}\n",
                state.display()
            ),
        )
        .unwrap();
        assert_eq!(state_dir_of(Some(&config)).unwrap(), state);
    }

    #[test]
    fn run_flags_become_config_lines() {
        let lines = config_lines(&strings(&[
            "--server",
            "https://a.example.com",
            "--enroll-token=t-1",
            "--no-auto-update",
            "--state-dir",
            "/srv/drover",
        ]))
        .unwrap();
        assert_eq!(
            lines,
            [
                ("server", "https://a.example.com"),
                ("enroll-token", "t-1"),
                ("no-auto-update", "true"),
                ("state-dir", "/srv/drover"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn flags_run_would_refuse_are_refused() {
        for flags in [
            &["--server", "https://a", "--no-such-flag", "x"][..],
            &["--server", "https://a", "--probation-timeout", "soon"],
            &["--server", "https://a", "--config", "/etc/other.conf"],
        ] {
            assert!(config_lines(&strings(flags)).is_err(), "{flags:?}");
        }
    }

    #[test]
    fn the_config_file_reads_back_as_the_same_run_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conf/agent.conf");
        let lines = config_lines(&strings(&[
            "--server",
            "https://a.example.com",
            "--no-auto-update",
        ]))
        .unwrap();
        write_config(&path, &lines).unwrap();
        let expanded = crate::config_file::expand(
            ["drover-agent", "run", "--config", path.to_str().unwrap()]
                .map(OsString::from)
                .to_vec(),
        )
        .unwrap();
        let expanded: Vec<_> = expanded.iter().map(|a| a.to_str().unwrap()).collect();
        assert!(
            expanded
                .windows(2)
                .any(|w| w == ["--server", "https://a.example.com"]),
            "{expanded:?}"
        );
        assert!(expanded.contains(&"--no-auto-update"), "{expanded:?}");
    }
}
