//! Who may read what the agent keeps. The state directory holds the agent's secret:
//! on Unix it is mode 0700 (files in it are created 0600); on Windows its ACL grants
//! access to SYSTEM, Administrators and the directory's owner only, and files inherit
//! it. New builds are made executable where that is a file mode.

use std::io;
use std::path::Path;

pub(crate) use imp::{create_private_dir, make_executable, make_readable};

#[cfg(unix)]
mod imp {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

    use super::*;

    /// Creates `dir` (and its parents) readable by its owner only.
    pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }

    pub(crate) fn make_executable(path: &Path) -> io::Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
    }

    /// Readable by everyone, writable by the owner (0644): service definitions.
    pub(crate) fn make_readable(path: &Path) -> io::Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
    }
}

#[cfg(windows)]
#[allow(unsafe_code)]
mod imp {
    use std::os::windows::ffi::OsStrExt;

    use windows_sys::Win32::Foundation::{HLOCAL, LocalFree};
    use windows_sys::Win32::Security::Authorization::{
        ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
    };
    use windows_sys::Win32::Security::{
        DACL_SECURITY_INFORMATION, PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR,
        SetFileSecurityW,
    };

    use super::*;

    /// Full control for SYSTEM, Administrators and the owner; inherited by files and
    /// folders below; nothing inherited from above.
    const PRIVATE_DIR_SDDL: &str = "D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;FA;;;OW)";

    fn wide(text: &std::ffi::OsStr) -> Vec<u16> {
        text.encode_wide().chain(Some(0)).collect()
    }

    /// Creates `dir` (and its parents) and restricts it to SYSTEM, Administrators and
    /// its owner, also when it existed already.
    pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let sddl = wide(PRIVATE_DIR_SDDL.as_ref());
        let mut descriptor: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
        // SAFETY: `sddl` is NUL-terminated; the descriptor is freed below.
        let parsed = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                sddl.as_ptr(),
                SDDL_REVISION_1,
                &mut descriptor,
                std::ptr::null_mut(),
            )
        };
        if parsed == 0 {
            return Err(io::Error::last_os_error());
        }
        let path = wide(dir.as_os_str());
        // SAFETY: `path` is NUL-terminated and `descriptor` is a valid descriptor.
        let set = unsafe {
            SetFileSecurityW(
                path.as_ptr(),
                DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
                descriptor,
            )
        };
        let result = if set == 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        // SAFETY: allocated by ConvertStringSecurityDescriptorToSecurityDescriptorW.
        unsafe { LocalFree(descriptor as HLOCAL) };
        result
    }

    /// Windows runs any image it is asked to; there is no mode to set.
    pub(crate) fn make_executable(_path: &Path) -> io::Result<()> {
        Ok(())
    }

    /// Files inherit their directory's ACL; there is no mode to set.
    pub(crate) fn make_readable(_path: &Path) -> io::Result<()> {
        Ok(())
    }
}
