//! Who may read what the agent keeps. The state directory holds the agent's secret:
//! on Unix it is mode 0700 (files in it are created 0600); on Windows its ACL grants
//! access to SYSTEM, Administrators and the directory's owner only, and each file the
//! agent writes carries that ACL too. New builds are made executable where that is a
//! file mode.
//!
//! A directory is restricted only when it is the agent's own: one it creates, one that
//! exists and is empty, or the default config directory, the agent's by its name. An
//! existing directory holding files (the agent's from an earlier start, or a mistyped
//! `--state-dir C:\ProgramData`) is never re-permissioned, which could break everything
//! else kept there. On Unix one every user may write in (`/tmp`) is refused, since
//! anyone could plant files where the agent reads its identity, as is one another user
//! owns, and one others may list gets a warning; on Windows each file the agent writes
//! carries its own ACL.

use std::io;
use std::path::Path;

pub(crate) use imp::{make_executable, make_readable, restrict_file};

/// Creates `dir` (and its parents) readable by the agent only, or checks that an
/// existing one may hold the agent's secret (see the module's rule).
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    match std::fs::read_dir(dir).map(|mut entries| entries.next().is_none()) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => imp::create_restricted(dir),
        Err(err) => Err(err),
        Ok(true) => imp::restrict_dir(dir),
        Ok(false) => imp::check_existing(dir),
    }
}

/// Creates `dir` (and its parents) private, and restricts it even when it holds files:
/// only for a directory the agent owns by its name (the default config directory).
pub(crate) fn create_owned_dir(dir: &Path) -> io::Result<()> {
    imp::create_restricted(dir)?;
    imp::restrict_dir(dir)
}

/// Creates `dir` (and its parents) private when it is missing; an existing directory is
/// left as it is. For a file that carries its own restriction (`restrict_file`), such as
/// the config file, whose directory may be shared.
pub(crate) fn create_dir_for_private_file(dir: &Path) -> io::Result<()> {
    if dir.exists() {
        return Ok(());
    }
    imp::create_restricted(dir)
}

#[cfg(unix)]
mod imp {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};

    use super::*;

    pub(super) fn create_restricted(dir: &Path) -> io::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    }

    pub(super) fn restrict_dir(dir: &Path) -> io::Result<()> {
        owned(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }

    /// The directory's metadata, when the agent's user owns it; one another user owns
    /// is refused: whatever mode the agent gives it, its owner could open it up again
    /// and read the agent's secret.
    fn owned(dir: &Path) -> io::Result<std::fs::Metadata> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir)?;
        let owner = meta.uid();
        #[allow(unsafe_code)]
        // SAFETY: geteuid has no preconditions and cannot fail.
        let agent = unsafe { libc::geteuid() };
        if owner == agent {
            return Ok(meta);
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to user {owner}, not to the agent's user ({agent}), who could \
                 open it up again: chown it, or give a directory of the agent's own",
                dir.display()
            ),
        ))
    }

    pub(super) fn check_existing(dir: &Path) -> io::Result<()> {
        let mode = owned(dir)?.permissions().mode();
        if mode & 0o002 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} holds other files and every user may write in it; the agent keeps \
                     its secret only in a directory of its own: give a new or empty one",
                    dir.display()
                ),
            ));
        }
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{:o}", mode & 0o777),
                "other users may list the state directory (its files are readable by the agent only); chmod 700 it"
            );
        }
        Ok(())
    }

    /// Files are created 0600 already (as `tempfile` makes them).
    pub(crate) fn restrict_file(_path: &Path) -> io::Result<()> {
        Ok(())
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
    /// The same for one file.
    const PRIVATE_FILE_SDDL: &str = "D:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FA;;;OW)";

    fn wide(text: &std::ffi::OsStr) -> Vec<u16> {
        text.encode_wide().chain(Some(0)).collect()
    }

    pub(super) fn create_restricted(dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        restrict_dir(dir)
    }

    pub(super) fn restrict_dir(dir: &Path) -> io::Result<()> {
        set_acl(dir, PRIVATE_DIR_SDDL)
    }

    /// An existing folder holding files keeps its ACL: stripping a shared folder's
    /// inheritance could break everything else kept there. Each file the agent writes
    /// carries its own private ACL (`restrict_file`) instead.
    pub(super) fn check_existing(_dir: &Path) -> io::Result<()> {
        Ok(())
    }

    pub(crate) fn restrict_file(path: &Path) -> io::Result<()> {
        set_acl(path, PRIVATE_FILE_SDDL)
    }

    /// Replaces the ACL of `path` with `sddl`'s, inheriting nothing from above.
    fn set_acl(path: &Path, sddl: &str) -> io::Result<()> {
        let sddl = wide(sddl.as_ref());
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
        let path = wide(path.as_os_str());
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

// What Wine keeps of an ACL cannot be read back, so the rule is tested where modes are.
#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A directory with a file in it that is not the agent's.
    fn shared_dir(root: &Path) -> std::path::PathBuf {
        let shared = root.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("someone-else's"), b"kept").unwrap();
        shared
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_new_or_empty_directory_is_made_private() {
        let root = tempfile::tempdir().unwrap();
        let new = root.path().join("a/b/state");
        create_private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        set_mode(&empty, 0o755);
        create_private_dir(&empty).unwrap();
        assert_eq!(mode(&empty), 0o700);
    }

    #[test]
    fn a_directory_holding_other_files_is_never_re_permissioned() {
        let root = tempfile::tempdir().unwrap();
        let shared = shared_dir(root.path());
        set_mode(&shared, 0o755);
        create_private_dir(&shared).unwrap();
        assert_eq!(mode(&shared), 0o755, "left as it was");

        // Like /tmp: anyone could plant files where the secret would be kept.
        set_mode(&shared, 0o1777);
        let err = create_private_dir(&shared).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("every user may write"), "{err}");
        assert!(err.to_string().contains("shared"), "{err}");
        assert_eq!(mode(&shared), 0o777);
        set_mode(&shared, 0o755);
    }

    #[test]
    fn a_directory_another_user_owns_is_refused_however_it_looks() {
        #[allow(unsafe_code)]
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: only root can give a directory to another user");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let empty = root.path().join("theirs");
        std::fs::create_dir(&empty).unwrap();
        set_mode(&empty, 0o755);
        std::os::unix::fs::chown(&empty, Some(65_534), None).unwrap();
        let err = create_private_dir(&empty).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("belongs to user 65534"), "{err}");
        assert_eq!(mode(&empty), 0o755, "left as it was");
        let shared = shared_dir(root.path());
        std::os::unix::fs::chown(&shared, Some(65_534), None).unwrap();
        assert!(create_private_dir(&shared).is_err());
        assert!(create_owned_dir(&shared).is_err());
    }

    #[test]
    fn a_directory_owned_by_name_is_made_private_whatever_it_holds() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("Drover");
        create_owned_dir(&missing).unwrap();
        assert_eq!(mode(&missing), 0o700);
        let installed = shared_dir(root.path());
        set_mode(&installed, 0o755);
        create_owned_dir(&installed).unwrap();
        assert_eq!(mode(&installed), 0o700);
    }

    #[test]
    fn a_private_file_s_directory_is_created_private_or_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let missing = root.path().join("etc/drover");
        create_dir_for_private_file(&missing).unwrap();
        assert_eq!(mode(&missing), 0o700);
        let shared = shared_dir(root.path());
        set_mode(&shared, 0o1777);
        create_dir_for_private_file(&shared).unwrap();
        assert_eq!(mode(&shared), 0o777, "left as it was");
        set_mode(&shared, 0o755);
    }
}
