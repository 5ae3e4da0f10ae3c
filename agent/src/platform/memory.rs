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

    use super::{File, releasable};

    /// Gives back the pages of the executable touched so far that it keeps no change
    /// in; how many bytes of mappings that covered (0 if it could not tell which).
    pub(crate) fn release_start_up_pages() -> usize {
        let Some((exe, smaps)) = executable() else {
            return 0;
        };
        let mut released = 0;
        for mapping in releasable(&smaps, exe) {
            #[allow(unsafe_code)]
            // SAFETY: the range is a whole read-only mapping of the executable file
            // (it cannot be written, and none of its pages is a private copy), so
            // MADV_DONTNEED only unmaps pages whose contents the file holds: any later
            // access faults the same bytes back in. Nothing unmaps or remaps the
            // executable while the process runs.
            let status = unsafe {
                libc::madvise(
                    mapping.start as *mut libc::c_void,
                    mapping.len,
                    libc::MADV_DONTNEED,
                )
            };
            if status == 0 {
                released += mapping.len;
            }
        }
        released
    }

    /// The executable's file, and the text of `/proc/self/smaps`.
    pub(super) fn executable() -> Option<(File, String)> {
        let exe = std::fs::metadata("/proc/self/exe").ok()?;
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let dev = exe.dev();
        let file = File {
            major: u64::from(libc::major(dev)),
            minor: u64::from(libc::minor(dev)),
            inode: exe.ino(),
        };
        Some((file, smaps))
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub(crate) fn release_start_up_pages() -> usize {
        0
    }
}

/// A file, as `/proc/PID/smaps` names it: its device's numbers and its inode.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct File {
    major: u64,
    minor: u64,
    inode: u64,
}

/// A read-only mapping of a file, from `/proc/PID/smaps`.
#[derive(Debug, PartialEq, Eq)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct Mapping {
    start: usize,
    len: usize,
    rss_kib: u64,
    /// Pages of it that are private copies (relocated at load, or written).
    anonymous_kib: u64,
}

/// The read-only mappings of `file` in `smaps` that hold no private copy: those whose
/// pages can be given back.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn releasable(smaps: &str, file: File) -> Vec<Mapping> {
    let mut mappings = read_only_mappings(smaps, file);
    mappings.retain(|m| m.anonymous_kib == 0);
    mappings
}

/// The mappings in `smaps` (the text of `/proc/PID/smaps`) of `file` that are
/// read-only.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn read_only_mappings(smaps: &str, file: File) -> Vec<Mapping> {
    let mut mappings = Vec::new();
    // Whether the mapping being read is one of them (the last pushed).
    let mut current = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-') {
            let mapping = read_only_of(start, end, fields, file);
            current = mapping.is_some();
            mappings.extend(mapping);
        } else if current && let Some(last) = mappings.last_mut() {
            let kib = fields.next().and_then(|n| n.parse::<u64>().ok());
            match first {
                "Rss:" => last.rss_kib = kib.unwrap_or(0),
                // Unknown counts as copied: such a mapping is never given back.
                "Anonymous:" => last.anonymous_kib = kib.unwrap_or(u64::MAX),
                _ => {}
            }
        }
    }
    mappings
}

/// The mapping of a header's line (`start-end perms offset major:minor inode path`)
/// when it maps `file` read-only; its counts are those of the lines after it.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn read_only_of<'a>(
    start: &str,
    end: &str,
    mut fields: impl Iterator<Item = &'a str>,
    file: File,
) -> Option<Mapping> {
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    let _offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let same_file = u64::from_str_radix(major, 16).ok()? == file.major
        && u64::from_str_radix(minor, 16).ok()? == file.minor
        && fields.next()?.parse::<u64>().ok()? == file.inode;
    (same_file && perms.starts_with('r') && !perms.contains('w') && end > start).then_some(
        Mapping {
            start,
            len: end - start,
            rss_kib: 0,
            // Until its line says otherwise.
            anonymous_kib: u64::MAX,
        },
    )
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
Rss:                   4 kB
Anonymous:             4 kB
5600009000-560000b000 rw-p 00009000 fe:00 77 /opt/drover-agent
Anonymous:             0 kB
560000b000-560000c000 r--p 00000000 fe:00 78 /opt/other
Anonymous:             0 kB
560000c000-560000d000 r--p 00000000 fe:01 77 /mnt/same-inode
Anonymous:             0 kB
560000d000-560000e000 r--p 0000d000 fe:00 77 /opt/drover-agent
Rss:                   4 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Anonymous:           132 kB
";

    const AGENT: File = File {
        major: 0xfe,
        minor: 0,
        inode: 77,
    };

    fn mapping(start: usize, len: usize, rss_kib: u64, anonymous_kib: u64) -> Mapping {
        Mapping {
            start,
            len,
            rss_kib,
            anonymous_kib,
        }
    }

    #[test]
    fn the_read_only_mappings_of_the_executable_are_found_with_their_copied_pages() {
        assert_eq!(
            read_only_mappings(SMAPS, AGENT),
            vec![
                mapping(0x56_0000_0000, 0x2000, 8, 0),
                mapping(0x56_0000_2000, 0x6000, 12, 0),
                // Relocated at load: never given back.
                mapping(0x56_0000_8000, 0x2000, 4, 4),
                // No count of its copied pages: taken as copied.
                mapping(0x56_0000_d000, 0x1000, 4, u64::MAX),
            ],
            "the writable mapping, other files and another device's inode 77 are not the \
             executable's read-only mappings"
        );
        assert_eq!(
            releasable(SMAPS, AGENT),
            vec![
                mapping(0x56_0000_0000, 0x2000, 8, 0),
                mapping(0x56_0000_2000, 0x6000, 12, 0)
            ],
            "only mappings without a private copy are given back"
        );
        let other = File { inode: 79, ..AGENT };
        assert!(read_only_mappings(SMAPS, other).is_empty());
        assert!(read_only_mappings("", AGENT).is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_unmaps_pages_of_this_executable_and_code_still_runs() {
        let resident_kib = || {
            let (exe, smaps) = imp::executable().unwrap();
            read_only_mappings(&smaps, exe)
                .iter()
                .map(|m| m.rss_kib)
                .sum::<u64>()
        };
        let parsed = read_only_mappings(SMAPS, AGENT);
        let before = resident_kib();
        assert!(before > 0, "the test binary's code is mapped");
        assert!(release_start_up_pages() > 0);
        let after = resident_kib();
        assert!(
            after < before,
            "resident pages of the executable: {before} KiB before, {after} KiB after"
        );
        // Code whose pages were given back is read back in and runs as before.
        assert_eq!(read_only_mappings(SMAPS, AGENT), parsed);
    }
}
