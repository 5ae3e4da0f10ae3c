//! The operating system's own id for this machine, which the fingerprint is derived
//! from: `/etc/machine-id` on Linux, `IOPlatformUUID` on macOS, the registry's
//! `HKLM\SOFTWARE\Microsoft\Cryptography\MachineGuid` on Windows.

pub(crate) use imp::read;

#[cfg(all(unix, not(target_os = "macos")))]
mod imp {
    use anyhow::Context;

    const MACHINE_ID_FILES: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];

    pub(crate) fn read() -> anyhow::Result<String> {
        MACHINE_ID_FILES
            .iter()
            .find_map(|path| std::fs::read_to_string(path).ok())
            .map(|text| text.trim().to_owned())
            .filter(|id| !id.is_empty())
            .context("cannot derive a machine fingerprint: no /etc/machine-id; pass --fingerprint")
    }
}

#[cfg(target_os = "macos")]
mod imp {
    use anyhow::Context;

    pub(crate) fn read() -> anyhow::Result<String> {
        let output = std::process::Command::new("/usr/sbin/ioreg")
            .args(["-rd1", "-c", "IOPlatformExpertDevice"])
            .output()
            .context("cannot run ioreg for the machine's IOPlatformUUID; pass --fingerprint")?;
        super::platform_uuid(&String::from_utf8_lossy(&output.stdout))
            .context("ioreg printed no IOPlatformUUID; pass --fingerprint")
    }
}

#[cfg(windows)]
#[allow(unsafe_code)]
mod imp {
    use anyhow::bail;
    use windows_sys::Win32::System::Registry::{HKEY_LOCAL_MACHINE, RRF_RT_REG_SZ, RegGetValueW};

    fn wide(text: &str) -> Vec<u16> {
        text.encode_utf16().chain(Some(0)).collect()
    }

    pub(crate) fn read() -> anyhow::Result<String> {
        let key = wide(r"SOFTWARE\Microsoft\Cryptography");
        let name = wide("MachineGuid");
        // A GUID is 36 characters; room to spare.
        let mut buffer = [0u16; 128];
        let mut bytes = std::mem::size_of_val(&buffer) as u32;
        // SAFETY: the strings are NUL-terminated; `bytes` is the buffer's size in bytes.
        let status = unsafe {
            RegGetValueW(
                HKEY_LOCAL_MACHINE,
                key.as_ptr(),
                name.as_ptr(),
                RRF_RT_REG_SZ,
                std::ptr::null_mut(),
                buffer.as_mut_ptr().cast(),
                &mut bytes,
            )
        };
        if status != 0 {
            bail!("cannot read the registry's MachineGuid (error {status}); pass --fingerprint");
        }
        let chars = (bytes as usize / 2).min(buffer.len());
        let text = String::from_utf16_lossy(&buffer[..chars]);
        let id = text.trim_end_matches('\0').trim().to_owned();
        if id.is_empty() {
            bail!("the registry's MachineGuid is empty; pass --fingerprint");
        }
        Ok(id)
    }
}

/// The `IOPlatformUUID` in `ioreg -rd1 -c IOPlatformExpertDevice` output.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
fn platform_uuid(ioreg: &str) -> Option<String> {
    ioreg
        .lines()
        .find(|line| line.contains("\"IOPlatformUUID\""))
        .and_then(|line| line.rsplit('"').nth(1))
        .map(str::to_owned)
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_platform_uuid_from_ioreg_output() {
        let ioreg = r#"+-o J316sAP  <class IOPlatformExpertDevice, id 0x100000212>
    {
      "IOPlatformSerialNumber" = "C02XXXXXXX"
      "IOPlatformUUID" = "8A1B2C3D-0000-1111-2222-333344445555"
      "model" = <"MacBookPro18,1">
    }"#;
        assert_eq!(
            super::platform_uuid(ioreg).as_deref(),
            Some("8A1B2C3D-0000-1111-2222-333344445555")
        );
        assert_eq!(super::platform_uuid("no such line"), None);
    }
}
