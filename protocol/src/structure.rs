//! A cheap, iterative pass over a frame's MessagePack structure before serde sees it. It
//! bounds what decoding can cost: nesting deeper than `MAX_NESTING` (serde recurses once
//! per level) and lengths that claim more bytes or items than the frame holds (which
//! could otherwise size an allocation) are refused here, without recursion or allocation.

use crate::DecodeError;

/// The deepest nesting of arrays and maps a frame may have. Messages of version 1 are one
/// flat map; the margin leaves room for structured fields that newer peers may add.
pub const MAX_NESTING: usize = 32;

/// Checks that `frame` starts with one complete MessagePack value, nested at most
/// `MAX_NESTING` levels, whose every declared length fits in the frame.
pub(crate) fn check(frame: &[u8]) -> Result<(), DecodeError> {
    // Items still to read in each open array or map (a map's pairs count twice).
    let mut open = [0u64; MAX_NESTING];
    let mut depth = 0;
    let mut reader = Reader { frame, pos: 0 };
    loop {
        let at = reader.pos;
        let items = reader.value_header()?;
        if items > 0 {
            if depth == MAX_NESTING {
                return Err(malformed(format!(
                    "arrays and maps nested deeper than {MAX_NESTING} levels at byte {at}"
                )));
            }
            // Every item takes at least one byte.
            if items > reader.remaining() as u64 {
                return Err(malformed(format!(
                    "the array or map at byte {at} declares {items} items, more than the \
                     {} bytes left in the frame",
                    reader.remaining()
                )));
            }
            open[depth] = items;
            depth += 1;
            continue;
        }
        // A value is complete; so is every container whose last item it was.
        loop {
            if depth == 0 {
                return Ok(());
            }
            open[depth - 1] -= 1;
            if open[depth - 1] > 0 {
                break;
            }
            depth -= 1;
        }
    }
}

fn malformed(detail: String) -> DecodeError {
    DecodeError::Malformed(detail)
}

struct Reader<'a> {
    frame: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.frame.len() - self.pos
    }

    /// Reads one value's header and skips its payload; returns how many nested items
    /// follow (0 for a scalar or an empty container).
    fn value_header(&mut self) -> Result<u64, DecodeError> {
        let at = self.pos;
        let marker = self.take(1)?[0];
        let (items, payload) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (2 * u64::from(marker & 0x0f), 0),
            0x90..=0x9f => (u64::from(marker & 0x0f), 0),
            0xa0..=0xbf => (0, u64::from(marker & 0x1f)),
            0xc4 | 0xd9 => (0, self.length(1)?),
            0xc5 | 0xda => (0, self.length(2)?),
            0xc6 | 0xdb => (0, self.length(4)?),
            // ext: a length, then a type byte, then the data.
            0xc7 => (0, self.length(1)? + 1),
            0xc8 => (0, self.length(2)? + 1),
            0xc9 => (0, self.length(4)? + 1),
            0xca => (0, 4),
            0xcb => (0, 8),
            0xcc | 0xd0 => (0, 1),
            0xcd | 0xd1 => (0, 2),
            0xce | 0xd2 => (0, 4),
            0xcf | 0xd3 => (0, 8),
            0xd4 => (0, 2),
            0xd5 => (0, 3),
            0xd6 => (0, 5),
            0xd7 => (0, 9),
            0xd8 => (0, 17),
            0xdc => (self.length(2)?, 0),
            0xdd => (self.length(4)?, 0),
            0xde => (2 * self.length(2)?, 0),
            0xdf => (2 * self.length(4)?, 0),
            0xc1 => {
                return Err(malformed(format!(
                    "byte {at} is 0xc1, which MessagePack never uses"
                )));
            }
        };
        if payload > self.remaining() as u64 {
            return Err(malformed(format!(
                "the value at byte {at} declares {payload} bytes, more than the {} left in \
                 the frame",
                self.remaining()
            )));
        }
        // Fits in usize: it is at most the frame's remaining length.
        self.pos += payload as usize;
        Ok(items)
    }

    /// A big-endian length of `width` bytes.
    fn length(&mut self, width: usize) -> Result<u64, DecodeError> {
        Ok(self
            .take(width)?
            .iter()
            .fold(0u64, |n, byte| n << 8 | u64::from(*byte)))
    }

    fn take(&mut self, count: usize) -> Result<&[u8], DecodeError> {
        if count > self.remaining() {
            return Err(malformed(format!(
                "the frame ends at byte {} in the middle of a value",
                self.frame.len()
            )));
        }
        let bytes = &self.frame[self.pos..self.pos + count];
        self.pos += count;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> Vec<u8> {
        let mut frame = vec![0x91; depth];
        frame.push(0x01);
        frame
    }

    #[test]
    fn accepts_complete_values_and_refuses_the_rest() {
        let cases: [(&[u8], bool); 14] = [
            (b"\x01", true),
            (b"\x90", true),
            (b"\x80", true),
            (b"\x92\x01\x81\xa1k\xc0", true),
            (b"\xdb\x00\x00\x00\x02ok", true),
            (b"\xd8\x010123456789abcdef", true),
            (b"", false),
            (b"\xc1", false),
            (b"\x92\x01", false),
            (b"\xa3ab", false),
            (b"\xdb\xff\xff\xff\xff", false),
            (b"\xdd\xff\xff\xff\xff\x01", false),
            (b"\xdf\x00\x00\x00\x01\x01", false),
            (b"\xc9\xff\xff\xff\xff\x01", false),
        ];
        for (frame, ok) in cases {
            assert_eq!(check(frame).is_ok(), ok, "{frame:02x?}: {:?}", check(frame));
        }
    }

    #[test]
    fn nesting_is_bounded() {
        assert_eq!(check(&nested(MAX_NESTING)), Ok(()));
        let err = check(&nested(MAX_NESTING + 1)).unwrap_err();
        assert!(err.to_string().contains("nested deeper"), "{err}");
    }

    #[test]
    fn trailing_bytes_after_the_value_are_not_its_concern() {
        assert_eq!(check(b"\x01\xc1"), Ok(()));
    }
}
