//! The Windows service: registered with the service control manager as `drover-agent`,
//! started at boot as LocalSystem, restarted on failure. The service manager starts
//! `drover-agent.exe service-main --config FILE`, which reports to it and runs the same
//! supervisor as `run`, stopping it on a service stop.
//!
//! The hand-over to a new build's supervisor is a service restart: the old supervisor
//! points the service at `<exe>.next` (`start_from`), starts `watch_take_over` from the
//! untouched `<exe>` and stops; the service manager (or the watcher) starts the new
//! supervisor, which promotes itself and points the service back at `<exe>`. If it has
//! not taken over within `TAKE_OVER_WAIT`, the watcher points the service back at
//! `<exe>` and restarts it: the old supervisor reverts the build.

use std::ffi::{OsStr, OsString};
use std::os::windows::ffi::OsStrExt;
use std::os::windows::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

use super::{NAME, Service};
use crate::journal::{self, Step};

/// How long the new supervisor has to take over before the old one is started again.
const TAKE_OVER_WAIT: Duration = Duration::from_secs(60);
/// How long a stopped service is given to start again.
const RESTART_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(500);
/// Set once the service control manager started this process (`run_as_service`).
static AS_SERVICE: AtomicBool = AtomicBool::new(false);

fn manager(access: ServiceManagerAccess) -> anyhow::Result<ServiceManager> {
    ServiceManager::local_computer(None::<&str>, access)
        .context("cannot reach the service control manager (run as Administrator)")
}

pub(crate) fn install(service: &Service, start: bool) -> anyhow::Result<()> {
    let info = ServiceInfo {
        name: OsString::from(NAME),
        display_name: OsString::from("Drover update agent"),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: service.exe.clone(),
        launch_arguments: vec![
            OsString::from("service-main"),
            OsString::from("--config"),
            service.config.clone().into_os_string(),
        ],
        dependencies: vec![],
        // LocalSystem.
        account_name: None,
        account_password: None,
    };
    let manager = manager(ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE)?;
    let installed = manager
        .create_service(
            &info,
            ServiceAccess::CHANGE_CONFIG | ServiceAccess::START | ServiceAccess::QUERY_STATUS,
        )
        .context("cannot create the drover-agent service")?;
    installed.set_description("Keeps this machine's Drover agent connected and up to date")?;
    installed.update_failure_actions(failure_actions(service))?;
    if let Err(err) = installed.set_failure_actions_on_non_crash_failures(true) {
        // Crashes are still restarted; Wine, for one, does not know this setting.
        tracing::warn!(%err, "the service is restarted after crashes only, not after error exits");
    }
    println!("installed the {NAME} service");
    if start {
        installed.start::<&str>(&[])?;
        println!("started it");
    }
    Ok(())
}

/// After a failure, a crash or an error exit alike: restart twice, then (and on every
/// failure after, until a day without one) run `watch-take-over` from the installed
/// executable, which restarts the service and, if a hand-over to a new build's
/// supervisor was cut short (a power cut took its watcher, and the new supervisor
/// cannot start), points the service back at this executable.
fn failure_actions(service: &Service) -> ServiceFailureActions {
    let restart = ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(5),
    };
    let watch = ServiceAction {
        action_type: ServiceActionType::RunCommand,
        delay: Duration::from_secs(5),
    };
    let mut command = OsString::from("\"");
    command.push(&service.exe);
    command.push("\" service watch-take-over --config \"");
    command.push(&service.config);
    command.push("\"");
    ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 60 * 60)),
        reboot_msg: None,
        command: Some(command),
        actions: Some(vec![restart.clone(), restart, watch]),
    }
}

pub(crate) fn uninstall(_unit_dir: Option<&Path>) -> anyhow::Result<()> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager
        .open_service(
            NAME,
            ServiceAccess::QUERY_STATUS
                | ServiceAccess::STOP
                | ServiceAccess::DELETE
                | ServiceAccess::CHANGE_CONFIG,
        )
        .context("the drover-agent service is not installed")?;
    // Not restarted once stopped: no failure actions left, and marked for deletion
    // first (the service manager removes it as it stops).
    let _ = service.update_failure_actions(ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::Never,
        reboot_msg: None,
        command: None,
        actions: Some(vec![]),
    });
    service.delete()?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        let _ = service.stop();
        let deadline = Instant::now() + RESTART_WAIT;
        while service.query_status()?.current_state != ServiceState::Stopped
            && Instant::now() < deadline
        {
            std::thread::sleep(POLL);
        }
    }
    println!("removed the {NAME} service");
    Ok(())
}

pub(crate) fn start() -> anyhow::Result<()> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    manager
        .open_service(NAME, ServiceAccess::START)?
        .start::<&str>(&[])?;
    Ok(())
}

pub(crate) fn stop() -> anyhow::Result<()> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    manager.open_service(NAME, ServiceAccess::STOP)?.stop()?;
    Ok(())
}

pub(crate) fn status() -> anyhow::Result<()> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager
        .open_service(
            NAME,
            ServiceAccess::QUERY_STATUS | ServiceAccess::QUERY_CONFIG,
        )
        .context("the drover-agent service is not installed (or is being removed)")?;
    let status = service.query_status()?;
    println!(
        "{NAME}: {:?}{}\nstarts: {}",
        status.current_state,
        status
            .process_id
            .map(|pid| format!(" (pid {pid})"))
            .unwrap_or_default(),
        service.query_config()?.executable_path.display()
    );
    Ok(())
}

/// Makes `<state_dir>/agent.log` this process's standard error, which its workers
/// inherit: the service control manager gives a service none. Without the file the
/// lines are lost, as before.
pub(crate) fn log_to_file(state_dir: &Path) {
    use std::os::windows::io::IntoRawHandle;
    use windows_sys::Win32::System::Console::{STD_ERROR_HANDLE, SetStdHandle};

    if let Ok(file) = super::open_log(state_dir) {
        // SAFETY: the handle is an open file's, given up to be the standard error for
        // the rest of the process.
        unsafe { SetStdHandle(STD_ERROR_HANDLE, file.into_raw_handle()) };
    }
}

/// Whether the service control manager started this process.
pub(crate) fn running_as_service() -> bool {
    AS_SERVICE.load(Ordering::Relaxed)
}

/// Makes the service start `program` (with the same arguments) from now on, if this
/// process runs as the service; `false` otherwise (a console `run` leaves the service
/// alone).
pub(crate) fn start_from(program: &Path) -> anyhow::Result<bool> {
    if !running_as_service() {
        return Ok(false);
    }
    point_at(program)?;
    Ok(true)
}

/// The service's command line with `program` in place of the program it starts.
fn with_program(command_line: &OsStr, program: &Path) -> anyhow::Result<OsString> {
    let line = command_line
        .to_str()
        .context("the service's command line is not Unicode")?;
    let arguments = match line.strip_prefix('"') {
        Some(quoted) => quoted.split_once('"').map_or("", |(_, rest)| rest),
        None => line.find(' ').map_or("", |space| &line[space..]),
    };
    let mut changed = OsString::from("\"");
    changed.push(program);
    changed.push("\"");
    changed.push(arguments);
    Ok(changed)
}

/// Changes the program of the service's command line, durably (the registry key is
/// flushed: a power cut right after still starts `program`).
fn point_at(program: &Path) -> anyhow::Result<()> {
    use windows_sys::Win32::System::Registry::{
        HKEY, HKEY_LOCAL_MACHINE, KEY_READ, RegCloseKey, RegFlushKey, RegOpenKeyExW,
    };
    use windows_sys::Win32::System::Services::{ChangeServiceConfigW, SERVICE_NO_CHANGE};

    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager
        .open_service(
            NAME,
            ServiceAccess::QUERY_CONFIG | ServiceAccess::CHANGE_CONFIG,
        )
        .context("cannot open the drover-agent service")?;
    let current = service.query_config()?.executable_path;
    let line = with_program(current.as_os_str(), program)?;
    if line == current.as_os_str() {
        return Ok(());
    }
    let wide: Vec<u16> = line.encode_wide().chain(Some(0)).collect();
    // SAFETY: the handle is the open service's; the string is NUL-terminated UTF-16 that
    // outlives the call; every other parameter says "no change".
    let changed = unsafe {
        ChangeServiceConfigW(
            service.raw_handle(),
            SERVICE_NO_CHANGE,
            SERVICE_NO_CHANGE,
            SERVICE_NO_CHANGE,
            wide.as_ptr(),
            std::ptr::null(),
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if changed == 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot point the service at {}", program.display()));
    }
    let key: Vec<u16> = OsStr::new(&format!(r"SYSTEM\CurrentControlSet\Services\{NAME}"))
        .encode_wide()
        .chain(Some(0))
        .collect();
    let mut handle: HKEY = std::ptr::null_mut();
    // SAFETY: a NUL-terminated key name and an out-pointer to a handle, closed below.
    if unsafe { RegOpenKeyExW(HKEY_LOCAL_MACHINE, key.as_ptr(), 0, KEY_READ, &mut handle) } == 0 {
        // SAFETY: the handle was just opened.
        unsafe {
            RegFlushKey(handle);
            RegCloseKey(handle);
        }
    }
    tracing::info!(program = %program.display(), "the service starts this program now");
    Ok(())
}

/// Hands over to the new build's supervisor by a service restart: points the service at
/// `next` and starts `watch_take_over` from `exe` (the old build, untouched until the
/// new supervisor promotes itself), its log in `<state_dir>/hand-over.log`. The caller
/// then stops. On error the service starts `exe` again.
pub(crate) fn restart_into(next: &Path, exe: &Path, state_dir: &Path) -> anyhow::Result<()> {
    use windows_sys::Win32::System::Threading::{CREATE_NEW_PROCESS_GROUP, DETACHED_PROCESS};

    point_at(next)?;
    let spawned = std::fs::File::create(state_dir.join("hand-over.log")).and_then(|log| {
        std::process::Command::new(exe)
            .args(["service", "watch-take-over", "--state-dir"])
            .arg(state_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            // Outlives this process, which the service manager is about to see stop.
            .creation_flags(DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP)
            .spawn()
    });
    if let Err(err) = spawned {
        let _ = point_at(exe);
        return Err(err).context("cannot start the hand-over's watcher");
    }
    Ok(())
}

/// Whether the new supervisor has taken over: the journal moved past `hand_over`.
fn taken_over(state_dir: &Path) -> bool {
    !matches!(journal::load(state_dir), Ok(Some(journal)) if journal.step == Step::HandOver)
}

/// The hand-over's watcher, run from the old build: sees the service start again (the
/// new supervisor), and if that has not taken over within `TAKE_OVER_WAIT`, points the
/// service back at this executable and restarts it, so that the old supervisor reverts
/// the build.
pub(crate) fn watch_take_over(state_dir: &Path) -> anyhow::Result<()> {
    let exe = crate::install::installed_path(
        std::env::current_exe().context("cannot find this agent's executable")?,
    );
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager.open_service(
        NAME,
        ServiceAccess::QUERY_STATUS | ServiceAccess::START | ServiceAccess::STOP,
    )?;
    let mut starter = Starter::default();
    if taken_over(state_dir) {
        // Run as a failure action with no hand-over under way: only restart.
        return starter.start_if_stopped(&service);
    }
    let deadline = Instant::now() + TAKE_OVER_WAIT;
    while Instant::now() < deadline {
        if taken_over(state_dir) {
            tracing::info!("the new supervisor took over");
            return Ok(());
        }
        // The old supervisor stopped, or the new one failed: start the service (again).
        starter.start_if_stopped(&service)?;
        std::thread::sleep(POLL);
    }
    tracing::error!(
        "the new supervisor did not take over within {}s; starting {} again",
        TAKE_OVER_WAIT.as_secs(),
        exe.display()
    );
    point_at(&exe)?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        let _ = service.stop();
    }
    let deadline = Instant::now() + RESTART_WAIT;
    while service.query_status()?.current_state != ServiceState::Running {
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the service did not start again within {}s",
                RESTART_WAIT.as_secs()
            );
        }
        starter.start_if_stopped(&service)?;
        std::thread::sleep(POLL);
    }
    tracing::info!("the service runs {} again", exe.display());
    Ok(())
}

/// Starts a stopped service, at most once per `START_RETRY`: a start the service
/// manager is still waiting on must not be doubled.
#[derive(Default)]
struct Starter {
    last: Option<Instant>,
}

/// Longer than a service manager waits for a started service to connect (Wine: 10 s).
const START_RETRY: Duration = Duration::from_secs(12);

impl Starter {
    fn start_if_stopped(
        &mut self,
        service: &windows_service::service::Service,
    ) -> anyhow::Result<()> {
        if service.query_status()?.current_state != ServiceState::Stopped
            || self.last.is_some_and(|last| last.elapsed() < START_RETRY)
        {
            return Ok(());
        }
        self.last = Some(Instant::now());
        match service.start::<&str>(&[]) {
            Ok(()) => tracing::info!("started the service"),
            Err(err) => tracing::warn!(%err, "could not start the service"),
        }
        Ok(())
    }
}

/// Runs `supervise` as the service: tells the service manager it is running, cancels
/// the token on a stop or a shutdown, and reports the outcome. Blocks until stopped.
pub(crate) fn run_as_service(supervise: Supervise) -> anyhow::Result<()> {
    AS_SERVICE.store(true, Ordering::Relaxed);
    *SUPERVISE.lock().unwrap_or_else(|e| e.into_inner()) = Some(supervise);
    windows_service::service_dispatcher::start(NAME, ffi_service_main)
        .context("not started by the service control manager (use `run` in a console)")
}

type Supervise = Box<dyn FnOnce(CancellationToken) -> anyhow::Result<()> + Send>;

/// Handed from `run_as_service` to the thread the service manager calls back on.
static SUPERVISE: std::sync::Mutex<Option<Supervise>> = std::sync::Mutex::new(None);

// The service manager's entry point (an `extern "system"` function over raw arguments).
windows_service::define_windows_service!(ffi_service_main, service_main);

fn service_main(_arguments: Vec<OsString>) {
    if let Err(err) = serve() {
        tracing::error!(error = %format!("{err:#}"), "the service failed");
    }
}

fn serve() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let handle = service_control_handler::register(NAME, move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            stop.cancel();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    })?;
    let report = |state, code| {
        handle.set_service_status(ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: if state == ServiceState::Running {
                ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
            } else {
                ServiceControlAccept::empty()
            },
            exit_code: ServiceExitCode::Win32(code),
            checkpoint: 0,
            wait_hint: Duration::from_secs(10),
            process_id: None,
        })
    };
    report(ServiceState::Running, 0)?;
    let supervise = SUPERVISE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .context("no supervisor to run")?;
    let outcome = supervise(shutdown);
    // A non-zero exit code makes the service manager apply the restart actions.
    report(ServiceState::Stopped, if outcome.is_ok() { 0 } else { 1 })?;
    outcome
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn failures_restart_the_service_then_run_the_watcher_from_the_installed_executable() {
        let actions = failure_actions(&Service {
            exe: PathBuf::from(r"C:\Program Files\Drover\drover-agent.exe"),
            config: PathBuf::from(r"C:\ProgramData\Drover\agent.conf"),
            unit_dir: None,
        });
        let kinds: Vec<_> = actions
            .actions
            .unwrap()
            .iter()
            .map(|action| action.action_type)
            .collect();
        assert_eq!(
            kinds,
            [
                ServiceActionType::Restart,
                ServiceActionType::Restart,
                ServiceActionType::RunCommand
            ]
        );
        assert_eq!(
            actions.command.unwrap(),
            r#""C:\Program Files\Drover\drover-agent.exe" service watch-take-over --config "C:\ProgramData\Drover\agent.conf""#
        );
    }

    #[test]
    fn the_service_is_pointed_at_another_program_with_the_same_arguments() {
        let installed = r#""C:\Program Files\Drover\drover-agent.exe" service-main --config "C:\ProgramData\Drover\agent.conf""#;
        let next = with_program(
            OsStr::new(installed),
            Path::new(r"C:\Program Files\Drover\drover-agent.exe.next"),
        )
        .unwrap();
        assert_eq!(
            next,
            r#""C:\Program Files\Drover\drover-agent.exe.next" service-main --config "C:\ProgramData\Drover\agent.conf""#
        );
        let back = with_program(
            &next,
            Path::new(r"C:\Program Files\Drover\drover-agent.exe"),
        )
        .unwrap();
        assert_eq!(back, installed);

        // A command line written by hand, unquoted, and one without arguments.
        let plain = with_program(
            OsStr::new(r"C:\Drover\drover-agent.exe service-main --config C:\agent.conf"),
            Path::new(r"C:\Drover\drover-agent.exe.next"),
        )
        .unwrap();
        assert_eq!(
            plain,
            r#""C:\Drover\drover-agent.exe.next" service-main --config C:\agent.conf"#
        );
        let bare = with_program(
            OsStr::new(r"C:\Drover\drover-agent.exe"),
            Path::new(r"D:\x.exe"),
        )
        .unwrap();
        assert_eq!(bare, r#""D:\x.exe""#);
    }
}
