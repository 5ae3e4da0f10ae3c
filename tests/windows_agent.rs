//! End-to-end under Wine: the Windows build of the agent (`x86_64-pc-windows-gnu`,
//! cross-compiled here) against the real Linux `drover-server` on loopback. The update
//! story runs the agent as a console process (`drover-agent.exe run`); the service
//! story installs it with `service install` into Wine's service control manager, which
//! starts it as a service (`service-main`).
//!
//! Needs Wine and mingw-w64 (scripts/ci-setup installs them). With CI=true these tests
//! always run; elsewhere they are skipped, saying why, when Wine is missing.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use support::*;

const TARGET: &str = "x86_64-pc-windows-gnu";

/// What the tests need to run Windows programs.
#[derive(Clone)]
struct Wine {
    program: PathBuf,
    prefix: PathBuf,
    /// The cross-compiled, unstamped agent.
    agent_exe: PathBuf,
}

/// Wine, its prefix (with the ProcessPrng shim) and the Windows agent, prepared once;
/// `None`, after saying why, when this machine cannot run them outside CI.
fn wine() -> Option<&'static Wine> {
    static WINE: OnceLock<Result<Wine, String>> = OnceLock::new();
    match WINE.get_or_init(prepare) {
        Ok(wine) => Some(wine),
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!(
                "the Windows agent tests must run in CI: {reason} (scripts/ci-setup installs what they need)"
            )
        }
        Err(reason) => {
            eprintln!("skipped: {reason}");
            None
        }
    }
}

fn prepare() -> Result<Wine, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let program = ["wine64", "wine"]
        .iter()
        .find_map(|name| which(name))
        .or_else(|| {
            let debian = PathBuf::from("/usr/lib/wine/wine64");
            debian.exists().then_some(debian)
        })
        .ok_or("no Wine (Debian: apt-get install wine64)")?;
    if which("x86_64-w64-mingw32-gcc").is_none() {
        return Err("no mingw-w64 (Debian: apt-get install gcc-mingw-w64-x86-64)".into());
    }
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l == TARGET)
        })
        .unwrap_or(false);
    if !installed {
        return Err(format!(
            "no Rust target {TARGET} (rustup target add {TARGET})"
        ));
    }
    let output = Command::new(root.join("scripts/wine-prefix"))
        .output()
        .map_err(|err| format!("scripts/wine-prefix: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "scripts/wine-prefix failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let prefix = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    // A target directory of its own: the one `cargo test` runs from stays locked.
    let target_dir = root.join("target/windows-agent");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .args(["build", "--bin", "drover-agent", "--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(root)
        .status()
        .map_err(|err| format!("cargo build: {err}"))?;
    assert!(built.success(), "the Windows agent does not build");
    Ok(Wine {
        program,
        prefix,
        agent_exe: target_dir.join(TARGET).join("debug/drover-agent.exe"),
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    })
}

/// A Unix path as Windows programs under Wine see it (drive Z: is `/`).
fn windows_path(path: &Path) -> String {
    format!("Z:{}", path.display()).replace('/', "\\")
}

impl Wine {
    fn command(&self, exe: &Path) -> Command {
        let mut command = Command::new(&self.program);
        command
            .arg(exe)
            .env("WINEPREFIX", &self.prefix)
            .env("WINEDEBUG", "-all")
            .env_remove("DROVER_SERVER")
            .env_remove("DROVER_ENROLL_TOKEN");
        command
    }

    /// What `exe --version` prints, without the program name.
    fn version_of(&self, exe: &Path) -> String {
        let output = self.command(exe).arg("--version").output().unwrap();
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .rsplit(' ')
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `exe args` to completion; success and all it printed. Output goes through a
    /// file: a service started by the command inherits its handles, and a pipe would
    /// stay open as long as the service runs.
    fn run(&self, exe: &Path, args: &[&str]) -> (bool, String) {
        let out = tempfile::NamedTempFile::new().unwrap();
        let status = self
            .command(exe)
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(out.reopen().unwrap())
            .stderr(out.reopen().unwrap())
            .status()
            .unwrap();
        (
            status.success(),
            std::fs::read_to_string(out.path()).unwrap_or_default(),
        )
    }

    /// A copy of the Windows agent that reports `version` (scripts/stamp-agent).
    fn stamp(&self, version: &str, out: &Path) {
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let status = Command::new("scripts/stamp-agent")
            .args([
                version,
                out.to_str().unwrap(),
                self.agent_exe.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "stamp-agent {version} failed");
    }
}

/// `drover-agent.exe run` under Wine; killed when dropped (its worker stops when the
/// supervisor's pipe closes).
struct WindowsAgent {
    child: Child,
    log: PathBuf,
}

impl WindowsAgent {
    fn start(wine: &Wine, server: &Server, exe: &Path, dir: &Path, name: &str) -> WindowsAgent {
        let log = dir.join(format!("{name}.log"));
        let child = wine
            .command(exe)
            .arg("run")
            .args(["--server", &server.url])
            .args(["--state-dir", &windows_path(&dir.join(name))])
            .args(["--hostname", name])
            .args(["--enroll-token", ENROLL_TOKEN])
            .args(["--probation-timeout", "60"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        WindowsAgent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `check` until it returns `Some`; on a timeout, fails with the agent's log.
    async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + UPDATE_WAIT;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; agent log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for WindowsAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes the Windows build at `file` as `version` on stable with scripts/publish.
fn publish_windows(server: &Server, version: &str, file: &Path) {
    let status = Command::new("scripts/publish")
        .arg(file)
        .args([version, "stable", "--os", "windows", "--arch", "amd64"])
        .env("DROVER_DOWNLOADS", server.downloads())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "publish {version} failed");
    assert!(
        server
            .downloads()
            .join(format!("drover-agent-windows-amd64-{version}.exe.sha256"))
            .exists()
    );
}

/// A Windows program made by mingw-w64 from C `source`, as `dir/name.exe`.
fn compile_c(dir: &Path, name: &str, source: &str) -> PathBuf {
    let file = dir.join(format!("{name}.c"));
    let exe = dir.join(format!("{name}.exe"));
    std::fs::write(&file, source).unwrap();
    let status = Command::new("x86_64-w64-mingw32-gcc")
        .arg("-o")
        .arg(&exe)
        .arg(&file)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "x86_64-w64-mingw32-gcc failed on {name}.c"
    );
    exe
}

/// A Windows program that exits with status 3 at once: a broken build.
fn broken_build(dir: &Path) -> PathBuf {
    compile_c(dir, "broken", "int main(void) { return 3; }\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_windows_agent_enrolls_updates_through_probation_and_reverts_a_build_that_exits() {
    let Some(wine) = wine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let exe = dir.path().join("Drover/drover-agent.exe");
    wine.stamp("1.0.0", &exe);
    assert_eq!(wine.version_of(&exe), "1.0.0");

    // No --fingerprint: the agent derives it from the registry's MachineGuid.
    let agent = WindowsAgent::start(wine, &server, &exe, dir.path(), "win-1");
    let id = agent
        .until("the Windows agent to enroll", || async {
            agent_view(&server, "win-1").await
        })
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let listed = agent_view(&server, "win-1").await.unwrap();
    assert_eq!(
        (listed["os"].as_str(), listed["arch"].as_str()),
        (Some("windows"), Some("amd64")),
        "{listed}"
    );
    assert_eq!(listed["version"], "1.0.0");

    // 1.1.0 goes through probation and replaces the running executable.
    let build = dir.path().join("build-1.1.0.exe");
    wine.stamp("1.1.0", &build);
    publish_windows(&server, "1.1.0", &build);
    let task = agent
        .until("the update to 1.1.0 to succeed", || async {
            let tasks = tasks_of(&server, &id).await;
            let task = tasks.first()?.clone();
            assert!(
                task["status"] != "rolled_back" && task["status"] != "failed",
                "the update failed: {task}\nagent log:\n{}",
                agent.log()
            );
            (task["status"] == "succeeded").then_some(task)
        })
        .await;
    assert_eq!(
        (task["from_version"].as_str(), task["to_version"].as_str()),
        (Some("1.0.0"), Some("1.1.0"))
    );
    agent
        .until("the listing to show 1.1.0", || async {
            let agent = agent_view(&server, "win-1").await?;
            (agent["version"] == "1.1.0" && agent["online"] == true).then_some(())
        })
        .await;
    agent
        .until("the executable to be 1.1.0", || async {
            (wine.version_of(&exe) == "1.1.0").then_some(())
        })
        .await;
    assert_eq!(
        wine.version_of(&exe.with_file_name("drover-agent.exe.prev")),
        "1.0.0",
        "the previous executable is kept"
    );

    // 1.2.0 exits at once: it is reverted and 1.1.0 keeps running.
    publish_windows(&server, "1.2.0", &broken_build(dir.path()));
    let task = eventually(
        "the update to 1.2.0 to be rolled back",
        UPDATE_WAIT,
        || async {
            let tasks = tasks_of(&server, &id).await;
            let task = tasks.iter().find(|t| t["to_version"] == "1.2.0")?.clone();
            if task["status"] == "succeeded" {
                panic!("a build that exits passed probation: {task}");
            }
            (task["status"] == "rolled_back").then_some(task)
        },
    )
    .await;
    assert!(
        task["error"]
            .as_str()
            .unwrap_or_default()
            .contains("exited"),
        "{task}"
    );
    let back = agent
        .until("1.1.0 back online", || async {
            let agent = agent_view(&server, "win-1").await?;
            (agent["online"] == true && agent["version"] == "1.1.0").then_some(agent)
        })
        .await;
    assert_eq!(back["id"], id.as_str(), "the identity survives");
    assert_eq!(wine.version_of(&exe), "1.1.0");
    assert!(!exe.with_file_name("drover-agent.exe.next").exists());
    assert_eq!(server.api().agents().await.unwrap().len(), 1);
    drop(agent);
}

/// A build whose supervisor cannot start: `service-main` (and `run`) exit with status 3
/// at once, while `worker` runs `worker`, a real agent whose probation would pass.
fn broken_supervisor_build(dir: &Path, worker: &Path) -> PathBuf {
    let worker = windows_path(worker).replace('\\', "\\\\");
    compile_c(
        dir,
        "broken-supervisor",
        &format!(
            "#include <process.h>\n#include <string.h>\n\
             int main(int argc, char **argv) {{\n\
                 if (argc > 1 && strcmp(argv[1], \"worker\") == 0) {{\n\
                     argv[0] = \"{worker}\";\n\
                     return (int)_spawnv(_P_WAIT, argv[0], (const char *const *)argv);\n\
                 }}\n\
                 return 3;\n\
             }}\n"
        ),
    )
}

/// An ordinary Wine process that sleeps until dropped. Wine ends its session, services
/// included, when the last ordinary process exits, and treats a service's own process as
/// a system one: without this, the session would end when a service's worker exits to
/// restart (Windows has no such rule).
struct WineSession {
    child: Child,
}

impl WineSession {
    fn keep(wine: &Wine, dir: &Path) -> WineSession {
        let exe = compile_c(
            dir,
            "sleeper",
            "#include <windows.h>\nint main(void) { Sleep(INFINITE); return 0; }\n",
        );
        let child = wine
            .command(&exe)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        WineSession { child }
    }
}

impl Drop for WineSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A new Wine prefix at `dir`, made by scripts/wine-prefix.
fn own_prefix(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(root.join("scripts/wine-prefix"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "scripts/wine-prefix failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// Ends every Wine process of a prefix when dropped (`wineserver -k`).
struct EndSession(Wine);

impl Drop for EndSession {
    fn drop(&mut self) {
        let server = self.0.program.with_file_name("wineserver");
        let server = if server.exists() {
            server
        } else {
            PathBuf::from("wineserver")
        };
        let _ = Command::new(server)
            .arg("-k")
            .env("WINEPREFIX", &self.0.prefix)
            .status();
    }
}

/// Removes the test's service from the Wine prefix, however the test ends.
struct InstalledService<'a> {
    wine: &'a Wine,
    exe: PathBuf,
}

impl Drop for InstalledService<'_> {
    fn drop(&mut self) {
        let _ = self.wine.run(&self.exe, &["service", "uninstall"]);
    }
}

/// One story, as the service is one per Wine prefix: installed, the service runs the
/// agent; a new build's supervisor takes over by a service restart; a build whose
/// supervisor cannot start is reverted by the old one; uninstall removes the service.
#[tokio::test(flavor = "multi_thread")]
async fn the_windows_service_runs_the_agent_and_its_supervisor_updates_itself() {
    let Some(wine) = wine() else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let exe = dir.path().join("Drover/drover-agent.exe");
    wine.stamp("1.0.0", &exe);
    // A prefix of its own, made for this run: its service manager knows no service from
    // an earlier run, and its session ends with the test.
    let wine = &Wine {
        prefix: own_prefix(&dir.path().join("prefix")),
        ..wine.clone()
    };
    let _prefix = EndSession(wine.clone());
    let session = WineSession::keep(wine, dir.path());

    let config = windows_path(&dir.path().join("Drover/agent.conf"));
    let state = windows_path(&dir.path().join("state"));
    let (ok, out) = wine.run(
        &exe,
        &[
            "service",
            "install",
            "--config",
            &config,
            "--",
            "--server",
            &server.url,
            "--enroll-token",
            ENROLL_TOKEN,
            "--state-dir",
            &state,
            "--hostname",
            "win-svc",
        ],
    );
    let service = InstalledService {
        wine,
        exe: exe.clone(),
    };
    assert!(ok, "{out}");
    assert!(out.contains("installed the drover-agent service"), "{out}");

    let listed = eventually("the service's agent online", UPDATE_WAIT, || async {
        let agent = agent_view(&server, "win-svc").await?;
        (agent["online"] == true).then_some(agent)
    })
    .await;
    assert_eq!(listed["os"], "windows");
    assert_eq!(listed["version"], "1.0.0");
    let (ok, out) = wine.run(&exe, &["service", "status"]);
    assert!(ok && out.contains("Running"), "{out}");
    assert!(
        dir.path().join("state/identity.json").exists(),
        "the service keeps its identity in the configured state directory"
    );
    let state_dir = dir.path().join("state");
    let id = listed["id"].as_str().unwrap().to_owned();
    let (first_pid, version) = supervisor_of(&state_dir).unwrap();
    assert_eq!(version, "1.0.0");
    // The program the service starts, from `service status`.
    let started_program = || {
        let (ok, out) = wine.run(&exe, &["service", "status"]);
        assert!(ok, "{out}");
        let line = out.lines().find_map(|l| l.strip_prefix("starts: "));
        let line = line.unwrap_or_else(|| panic!("no program in {out}"));
        match line.strip_prefix('"') {
            Some(quoted) => quoted.split('"').next().unwrap().to_owned(),
            None => line.split(' ').next().unwrap().to_owned(),
        }
    };
    let installed = windows_path(&exe);
    assert_eq!(started_program(), installed);

    // 1.1.0 passes probation; the service restarts into its supervisor, which takes
    // over: the supervisor itself runs 1.1.0, and the service starts `<exe>` again.
    let build = dir.path().join("build-1.1.0.exe");
    wine.stamp("1.1.0", &build);
    publish_windows(&server, "1.1.0", &build);
    let (pid, _) = eventually("the supervisor to run 1.1.0", UPDATE_WAIT, || async {
        supervisor_of(&state_dir).filter(|(_, version)| version == "1.1.0")
    })
    .await;
    assert_ne!(
        pid, first_pid,
        "a new supervisor process, started by the service"
    );
    let task = task_reaches(&server, &id, "succeeded").await;
    assert_eq!(task["to_version"], "1.1.0");
    eventually("the executable to be 1.1.0", UPDATE_WAIT, || async {
        (wine.version_of(&exe) == "1.1.0").then_some(())
    })
    .await;
    assert_eq!(
        wine.version_of(&exe.with_file_name("drover-agent.exe.prev")),
        "1.0.0"
    );
    assert_eq!(started_program(), installed, "pointed back at <exe>");
    assert!(!exe.with_file_name("drover-agent.exe.next").exists());
    eventually("1.1.0 online", UPDATE_WAIT, || async {
        let agent = agent_view(&server, "win-svc").await?;
        (agent["online"] == true && agent["version"] == "1.1.0").then_some(())
    })
    .await;

    // 1.2.0's worker would pass probation, but its supervisor exits at once: the
    // watcher the old supervisor left starts 1.1.0 again, which reverts the build.
    let worker = dir.path().join("worker-1.2.0.exe");
    wine.stamp("1.2.0", &worker);
    publish_windows(
        &server,
        "1.2.0",
        &broken_supervisor_build(dir.path(), &worker),
    );
    let wait = UPDATE_WAIT * 3;
    let failed = eventually("1.2.0 to end as a build failure", wait, || async {
        // The success its worker reported taken back, or a new offer refused.
        tasks_of(&server, &id).await.into_iter().find(|t| {
            t["to_version"] == "1.2.0" && (t["status"] == "rolled_back" || t["status"] == "failed")
        })
    })
    .await;
    assert_eq!(failed["failure_class"], "build", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or_default()
            .contains("supervisor did not take over"),
        "{failed}"
    );
    eventually("1.1.0 back online", wait, || async {
        let agent = agent_view(&server, "win-svc").await?;
        (agent["online"] == true && agent["version"] == "1.1.0").then_some(())
    })
    .await;
    assert_eq!(supervisor_of(&state_dir).unwrap().1, "1.1.0");
    assert_eq!(wine.version_of(&exe), "1.1.0");
    assert_eq!(started_program(), installed, "pointed back at <exe>");
    assert!(!exe.with_file_name("drover-agent.exe.next").exists());
    let log = std::fs::read_to_string(state_dir.join("hand-over.log")).unwrap_or_default();
    assert!(log.contains("did not take over"), "{log}");

    // Uninstall stops the service for good (no failure actions left to restart it),
    // then removes it.
    let (ok, out) = wine.run(&exe, &["service", "uninstall"]);
    assert!(ok, "{out}");
    eventually("the service's agent offline", UPDATE_WAIT, || async {
        let agent = agent_view(&server, "win-svc").await?;
        (agent["online"] == false).then_some(())
    })
    .await;
    // Deleted: gone, or (Wine) kept stopped until its service manager lets it go; not
    // started again either way.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (ok, out) = wine.run(&exe, &["service", "status"]);
    assert!(
        !ok && out.contains("not installed") || ok && out.contains("Stopped"),
        "the service is gone: {out}"
    );
    let listed = agent_view(&server, "win-svc").await.unwrap();
    assert_eq!(listed["online"], false, "not started again");
    drop(session);
    drop(service);
}
