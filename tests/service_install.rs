//! End-to-end: `drover-agent service install` on Linux writes the agent's config file
//! and a systemd unit that works, and `service uninstall` removes the unit. The unit
//! goes to a temporary directory (`--unit-dir`), so systemd itself is not touched; the
//! unit's own command line is started, as systemd would, against the real server.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::*;

/// Runs `drover-agent service ARGS`; success and all it printed.
fn service(args: &[&str]) -> (bool, String) {
    let output = Command::new(AGENT_BIN)
        .arg("service")
        .args(args)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_ENROLL_TOKEN")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

/// The `key=value` of `key` in a unit file.
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
}

/// Starts a unit's `ExecStart` command line (words without quotes, as this test's paths
/// are), as systemd would.
fn exec_start(unit: &str, log: &Path) -> Child {
    let line = unit_value(unit, "ExecStart").expect("the unit has an ExecStart");
    let mut words = line.split_whitespace();
    Command::new(words.next().unwrap())
        .args(words)
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_ENROLL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn service_install_writes_a_working_systemd_unit_and_uninstall_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let units = dir.path().join("units");
    let config = dir.path().join("etc/agent.conf");
    let state = dir.path().join("state");
    let (ok, out) = service(&[
        "install",
        "--unit-dir",
        units.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--no-start",
        "--",
        "--server",
        &server.url,
        "--enroll-token",
        ENROLL_TOKEN,
        "--state-dir",
        state.to_str().unwrap(),
        "--hostname",
        "svc-1",
        "--fingerprint",
        "fp-svc-1",
    ]);
    assert!(ok, "{out}");

    let unit_file = units.join("drover-agent.service");
    let unit = std::fs::read_to_string(&unit_file).unwrap();
    assert_eq!(
        unit_value(&unit, "ExecStart"),
        Some(format!("{AGENT_BIN} run --config {}", config.display()).as_str()),
        "{unit}"
    );
    assert_eq!(unit_value(&unit, "Restart"), Some("always"));
    assert_eq!(unit_value(&unit, "WantedBy"), Some("multi-user.target"));
    if let Ok(verify) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_file)
        .output()
    {
        assert!(
            verify.status.success(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
    }

    // The config file holds the enrollment token: its owner's only.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&config).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "config mode {mode:o}");
    }

    // What systemd would start enrolls with the settings install was given.
    let log = dir.path().join("svc-1.log");
    let mut agent = exec_start(&unit, &log);
    let id = enrolled_id(&server, "svc-1").await;
    assert!(
        std::fs::read_to_string(state.join("identity.json"))
            .map(|text| text.contains(&id))
            .unwrap_or(false),
        "the agent keeps its identity in the configured state directory; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = agent.kill();
    let _ = agent.wait();

    let (ok, out) = service(&["uninstall", "--unit-dir", units.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(!unit_file.exists(), "uninstall removes the unit");
    assert!(config.exists(), "uninstall keeps the config file");
    let (ok, out) = service(&["uninstall", "--unit-dir", units.to_str().unwrap()]);
    assert!(ok, "uninstalling twice is fine: {out}");
}

#[test]
fn service_install_refuses_flags_that_run_would_refuse_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let units = dir.path().join("units");
    let config = dir.path().join("agent.conf");
    let (ok, out) = service(&[
        "install",
        "--unit-dir",
        units.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--no-start",
        "--",
        "--server",
        "https://a.example.com",
        "--probation-timeout",
        "soon",
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("probation-timeout"), "{out}");
    assert!(!config.exists() && !units.exists());
}

/// PowerShell does not run here, so the Windows install script is read: the token may
/// go into a request header (inside PowerShell) and the config file, never onto the
/// command line of a program it starts, where any user could read it.
#[test]
fn install_ps1_never_puts_the_token_on_a_command_line() {
    let script = std::fs::read_to_string("scripts/install.ps1").unwrap();
    let uses: Vec<&str> = script
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && line.contains("$token"))
        .collect();
    assert!(
        uses.iter()
            .any(|l| l.starts_with("Add-Content -Path $config")),
        "the token goes into the config file: {uses:#?}"
    );
    for line in &uses {
        let allowed = line.starts_with("$token =")
            || line.starts_with("if (-not $token)")
            || line.contains("Authorization = \"Bearer $token\"")
            || line.starts_with("Add-Content -Path $config");
        assert!(
            allowed,
            "the token where a command line could show it: {line}"
        );
    }
    for line in script.lines().filter(|l| l.contains("$flags")) {
        assert!(!line.contains("enroll-token"), "{line}");
    }
}
