//! Where an installed agent keeps its state (identity, journal, staged downloads) on
//! each system, and where the installers put its executable and config file.
//!
//! | | executable | config | state |
//! |---|---|---|---|
//! | Linux | `/usr/local/bin/drover-agent` | `/etc/drover-agent/agent.conf` | `/var/lib/drover-agent` |
//! | macOS | `/usr/local/bin/drover-agent` | `/Library/Application Support/Drover/agent.conf` | `/Library/Application Support/Drover/Agent` |
//! | Windows | `%ProgramFiles%\Drover\drover-agent.exe` | `%ProgramData%\Drover\agent.conf` | `%ProgramData%\Drover\Agent` |

use std::path::PathBuf;

/// The default state directory.
pub(crate) fn state_dir() -> PathBuf {
    imp::state_dir()
}

/// Where `service install` writes the agent's config file by default.
pub(crate) fn config_file() -> PathBuf {
    imp::config_file()
}

#[cfg(all(unix, not(target_os = "macos")))]
mod imp {
    use super::*;

    pub(super) fn state_dir() -> PathBuf {
        PathBuf::from("/var/lib/drover-agent")
    }

    pub(super) fn config_file() -> PathBuf {
        PathBuf::from("/etc/drover-agent/agent.conf")
    }
}

#[cfg(target_os = "macos")]
mod imp {
    use super::*;

    const SUPPORT: &str = "/Library/Application Support/Drover";

    pub(super) fn state_dir() -> PathBuf {
        PathBuf::from(SUPPORT).join("Agent")
    }

    pub(super) fn config_file() -> PathBuf {
        PathBuf::from(SUPPORT).join("agent.conf")
    }
}

#[cfg(windows)]
mod imp {
    use super::*;

    /// `%ProgramData%`, or its usual place when the variable is unset.
    fn program_data() -> PathBuf {
        std::env::var_os("ProgramData")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(r"C:\ProgramData"))
    }

    pub(super) fn state_dir() -> PathBuf {
        program_data().join(r"Drover\Agent")
    }

    pub(super) fn config_file() -> PathBuf {
        program_data().join(r"Drover\agent.conf")
    }
}
