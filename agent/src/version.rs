//! The version this agent reports. It lives in a fixed-size slot in the binary, after a
//! marker, so `scripts/stamp-agent` can make copies reporting other versions without
//! recompiling (tests and pre-release checks build 1.0.0, 1.1.0, ... from one binary).

const MARKER: &[u8] = b"@@DROVER-AGENT-VERSION@@";
const SLOT_LEN: usize = 64;
/// Read at run time instead of `MARKER.len()`, which an unoptimised build can compile
/// into a second copy of the marker (Windows builds did), and stamping needs exactly one.
const MARKER_LEN: usize = MARKER.len();

const fn slot() -> [u8; SLOT_LEN] {
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    let mut out = [0u8; SLOT_LEN];
    let mut i = 0;
    while i < MARKER.len() {
        out[i] = MARKER[i];
        i += 1;
    }
    let mut j = 0;
    while j < version.len() {
        out[MARKER.len() + j] = version[j];
        j += 1;
    }
    out
}

#[used]
static VERSION_SLOT: [u8; SLOT_LEN] = slot();

/// The version stamped into this binary: the bytes after the marker, up to the first NUL.
pub fn current() -> &'static str {
    // Read through an opaque reference so the compiler cannot fold the build-time value
    // in: the stamped bytes must be what is read.
    let slot: &'static [u8; SLOT_LEN] = std::hint::black_box(&VERSION_SLOT);
    let value = &slot[MARKER_LEN..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    std::str::from_utf8(&value[..end]).unwrap_or("0.0.0-invalid")
}

#[cfg(test)]
mod tests {
    #[test]
    fn unstamped_binary_reports_the_package_version() {
        assert_eq!(super::current(), env!("CARGO_PKG_VERSION"));
    }
}
