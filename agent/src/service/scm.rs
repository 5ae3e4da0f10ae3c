//! The Windows service: registered with the service control manager as `drover-agent`,
//! started at boot as LocalSystem, restarted on failure. The service manager starts
//! `drover-agent.exe service-main --config FILE`, which reports to it and runs the same
//! supervisor as `run`, stopping it on a service stop.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

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
    // Restart after every failure, a crash or an error exit alike.
    installed.update_failure_actions(ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(24 * 60 * 60)),
        reboot_msg: None,
        command: None,
        actions: Some(vec![
            ServiceAction {
                action_type: ServiceActionType::Restart,
                delay: Duration::from_secs(5),
            };
            3
        ]),
    })?;
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

pub(crate) fn uninstall(_unit_dir: Option<&Path>) -> anyhow::Result<()> {
    let manager = manager(ServiceManagerAccess::CONNECT)?;
    let service = manager
        .open_service(
            NAME,
            ServiceAccess::QUERY_STATUS | ServiceAccess::STOP | ServiceAccess::DELETE,
        )
        .context("the drover-agent service is not installed")?;
    service.delete()?;
    if service.query_status()?.current_state != ServiceState::Stopped {
        let _ = service.stop();
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
    let status = manager
        .open_service(NAME, ServiceAccess::QUERY_STATUS)?
        .query_status()?;
    println!(
        "{NAME}: {:?}{}",
        status.current_state,
        status
            .process_id
            .map(|pid| format!(" (pid {pid})"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Runs `supervise` as the service: tells the service manager it is running, cancels
/// the token on a stop or a shutdown, and reports the outcome. Blocks until stopped.
pub(crate) fn run_as_service(supervise: Supervise) -> anyhow::Result<()> {
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
