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

/// Waits until this process's standard input ends (the worker's pipe from its
/// supervisor closes) and says how it ended.
pub(crate) async fn stdin_closed() -> String {
    imp::stdin_closed().await
}

/// Reads standard input until it ends, on the runtime's blocking pool: a thread that
/// stays for as long as the input lasts.
async fn stdin_closed_blocking() -> String {
    let mut sink = [0u8; 64];
    let mut stdin = tokio::io::stdin();
    loop {
        match tokio::io::AsyncReadExt::read(&mut stdin, &mut sink).await {
            Ok(0) => return "end of input".to_owned(),
            Ok(_) => {}
            Err(err) => return err.to_string(),
        }
    }
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

    /// A pipe (as the supervisor gives its worker) is read through the runtime's poller,
    /// so no thread waits on it; anything else (a terminal) on the blocking pool.
    pub(super) async fn stdin_closed() -> String {
        use std::os::fd::AsFd;

        let pipe = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .and_then(tokio::net::unix::pipe::Receiver::from_owned_fd);
        let Ok(mut pipe) = pipe else {
            return super::stdin_closed_blocking().await;
        };
        let mut sink = [0u8; 64];
        loop {
            match tokio::io::AsyncReadExt::read(&mut pipe, &mut sink).await {
                Ok(0) => return "end of input".to_owned(),
                Ok(_) => {}
                Err(err) => return err.to_string(),
            }
        }
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

    pub(super) async fn stdin_closed() -> String {
        super::stdin_closed_blocking().await
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
