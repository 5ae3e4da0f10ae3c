//! How the agent learns it should stop: SIGTERM or SIGINT on Unix (systemd, launchd, a
//! terminal), Ctrl+C, Ctrl+Break, console close or system shutdown on Windows (the
//! service control manager's stop arrives through `service` and cancels the same token).

use tokio_util::sync::CancellationToken;

/// A token cancelled when the operating system asks the agent to stop.
pub(crate) fn stop_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        imp::stop_requested().await;
        stop.cancel();
    });
    shutdown
}

/// Whether a process with this id runs, where the system says so cheaply (Linux's
/// /proc); `None` where it cannot be told without more machinery.
pub(crate) fn is_running(pid: u64) -> Option<bool> {
    if cfg!(target_os = "linux") {
        Some(std::path::Path::new("/proc").join(pid.to_string()).exists())
    } else {
        None
    }
}

/// Whether the supervisor can hand over to a new executable in its own process (exec,
/// keeping the PID the service manager watches). Windows cannot; there the supervisor
/// promotes the new executable and the new supervisor takes over at the next service
/// start.
pub(crate) const CAN_REPLACE_ITSELF: bool = cfg!(unix);

/// Replaces this process with `program args`, `env` added, keeping its PID. Returns only
/// on failure.
pub(crate) fn replace_self(
    program: &std::path::Path,
    args: &[String],
    env: (&str, &std::path::Path),
) -> std::io::Error {
    imp::replace_self(program, args, env)
}

#[cfg(unix)]
mod imp {
    use std::os::unix::process::CommandExt;

    use tokio::signal::unix::{SignalKind, signal};

    pub(super) fn replace_self(
        program: &std::path::Path,
        args: &[String],
        (key, value): (&str, &std::path::Path),
    ) -> std::io::Error {
        std::process::Command::new(program)
            .args(args)
            .env(key, value)
            .exec()
    }

    pub(super) async fn stop_requested() {
        let mut terminate = signal(SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match terminate.as_mut() {
                    Some(s) => { s.recv().await; }
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

#[cfg(windows)]
mod imp {
    use tokio::signal::windows::{ctrl_break, ctrl_close, ctrl_shutdown};

    pub(super) fn replace_self(
        _program: &std::path::Path,
        _args: &[String],
        _env: (&str, &std::path::Path),
    ) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "a Windows process cannot replace itself",
        )
    }

    pub(super) async fn stop_requested() {
        async fn wait(signal: std::io::Result<impl Recv>) {
            match signal {
                Ok(mut signal) => signal.recv_one().await,
                Err(_) => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = wait(ctrl_break()) => {}
            () = wait(ctrl_close()) => {}
            () = wait(ctrl_shutdown()) => {}
        }
    }

    /// The console events tokio offers share no trait; this is the one method we need.
    trait Recv {
        async fn recv_one(&mut self);
    }
    impl Recv for tokio::signal::windows::CtrlBreak {
        async fn recv_one(&mut self) {
            self.recv().await;
        }
    }
    impl Recv for tokio::signal::windows::CtrlClose {
        async fn recv_one(&mut self) {
            self.recv().await;
        }
    }
    impl Recv for tokio::signal::windows::CtrlShutdown {
        async fn recv_one(&mut self) {
            self.recv().await;
        }
    }
}
