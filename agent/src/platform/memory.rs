//! The agent's resident memory after start-up. Starting touches code it never runs
//! again (parsing the command line, setting up logging and the runtime, enrolling, the
//! first TLS handshake); the kernel keeps each such page of the executable mapped, and
//! maps the cached pages around each one it faulted in as well. Once a process is past
//! its start (the supervisor's worker is running; the worker is connected), it gives
//! back the pages of its executable that hold nothing but the file's own bytes: on
//! Linux, `madvise(MADV_DONTNEED)` on each read-only mapping of the executable with no
//! private (copied) page in it. Those pages are the file's; the code it still runs is
//! read back in, from the page cache, on its next use. Elsewhere this does nothing.

pub(crate) use imp::release_start_up_pages;

#[cfg(target_os = "linux")]
mod imp {
    use std::os::unix::fs::MetadataExt;

    /// Gives back the pages of the executable touched so far that it keeps no change
    /// in; how many bytes of mappings that covered (0 if it could not tell which).
    pub(crate) fn release_start_up_pages() -> usize {
        let (Ok(exe), Ok(smaps)) = (
            std::fs::metadata("/proc/self/exe"),
            std::fs::read_to_string("/proc/self/smaps"),
        ) else {
            return 0;
        };
        let dev = exe.dev();
        // Linux's encoding of a device number (the C library's `major` and `minor`).
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let mut released = 0;
        for (start, len) in super::clean_mappings(&smaps, (major, minor), exe.ino()) {
            #[allow(unsafe_code)]
            // SAFETY: the range is a whole read-only mapping of the executable file
            // (it cannot be written, and `clean_mappings` checked that none of its
            // pages is a private copy), so MADV_DONTNEED only unmaps pages whose
            // contents the file holds: any later access faults the same bytes back
            // in. Nothing unmaps or remaps the executable while the process runs.
            let status =
                unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
            if status == 0 {
                released += len;
            }
        }
        released
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub(crate) fn release_start_up_pages() -> usize {
        0
    }
}

/// The mappings (start address, length) in `smaps` (the text of `/proc/self/smaps`) of
/// the file with device `(major, minor)` and inode `inode` that are read-only and hold
/// no anonymous (copied-on-write) page.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn clean_mappings(smaps: &str, (major, minor): (u64, u64), inode: u64) -> Vec<(usize, usize)> {
    let mut clean = Vec::new();
    // The mapping being read: its range, when it is a read-only one of the file.
    let mut current = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            current = mapping_of_file(start, end, fields, (major, minor), inode);
        } else if first == "Anonymous:"
            && let Some((start, end)) = current.take()
            && fields.next() == Some("0")
        {
            clean.push((start, end - start));
        }
    }
    clean
}

/// The range of a mapping header's line (`start-end perms offset major:minor inode
/// path`) when it maps the file read-only.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn mapping_of_file<'a>(
    start: &str,
    end: &str,
    mut fields: impl Iterator<Item = &'a str>,
    (major, minor): (u64, u64),
    inode: u64,
) -> Option<(usize, usize)> {
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    let _offset = fields.next()?;
    let (dev_major, dev_minor) = fields.next()?.split_once(':')?;
    let same_file = u64::from_str_radix(dev_major, 16).ok()? == major
        && u64::from_str_radix(dev_minor, 16).ok()? == minor
        && fields.next()?.parse::<u64>().ok()? == inode;
    (same_file && perms.starts_with('r') && !perms.contains('w') && end > start)
        .then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5600000000-5600002000 r--p 00000000 fe:00 77 /opt/drover-agent
Size:                  8 kB
Rss:                   8 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
5600002000-5600008000 r-xp 00002000 fe:00 77 /opt/drover-agent
Size:                 24 kB
Rss:                 12 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
5600008000-560000a000 r--p 00008000 fe:00 77 /opt/drover-agent
Size:                  8 kB
Anonymous:             4 kB
5600009000-560000b000 rw-p 00009000 fe:00 77 /opt/drover-agent
Anonymous:             0 kB
560000b000-560000c000 r--p 00000000 fe:00 78 /opt/other
Anonymous:             0 kB
560000c000-560000d000 r--p 00000000 fe:01 77 /mnt/same-inode
Anonymous:             0 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Anonymous:           132 kB
";

    #[test]
    fn only_read_only_unchanged_mappings_of_the_executable_are_released() {
        assert_eq!(
            clean_mappings(SMAPS, (0xfe, 0), 77),
            vec![(0x56_0000_0000, 0x2000), (0x56_0000_2000, 0x6000)],
            "the relocated read-only mapping (anonymous pages), the writable one, other files \
             and another device's inode 77 stay"
        );
        assert!(clean_mappings(SMAPS, (0xfe, 0), 79).is_empty());
        assert!(clean_mappings("", (0xfe, 0), 77).is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_unmaps_pages_of_this_executable_and_code_still_runs() {
        fn resident_exe_kib() -> u64 {
            let exe = std::fs::read_link("/proc/self/exe").unwrap();
            let exe = exe.to_string_lossy();
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let mut total = 0;
            let mut ours = false;
            for line in smaps.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.first().is_some_and(|f| f.contains('-')) {
                    ours = line.ends_with(exe.as_ref()) && !fields[1].contains('w');
                } else if ours && fields.first() == Some(&"Rss:") {
                    total += fields[1].parse::<u64>().unwrap();
                }
            }
            total
        }
        let parsed = clean_mappings(SMAPS, (0xfe, 0), 77);
        let before = resident_exe_kib();
        assert!(before > 0, "the test binary's code is mapped");
        assert!(release_start_up_pages() > 0);
        let after = resident_exe_kib();
        assert!(
            after < before,
            "resident pages of the executable: {before} KiB before, {after} KiB after"
        );
        // Code whose pages were given back is read back in and runs as before.
        assert_eq!(clean_mappings(SMAPS, (0xfe, 0), 77), parsed);
    }
}
