//! Length padding applied to every plaintext before encryption, so ciphertext sizes reveal only
//! a bucket, not the exact length.
//!
//! Scheme: ISO/IEC 7816-4 — append one `0x80` byte, then `0x00` bytes up to the bucket size.
//! Buckets: 64, 128, 256, 512, 1024, 2048, 4096 bytes, then the next multiple of 4096. The
//! padded length is the smallest bucket holding `len + 1`, so the overhead is 1 to 64 bytes for
//! short messages, at most half the padded size below 4 KiB, and at most 4096 bytes above.
//! [`unpad`] refuses anything that does not end in `0x80 0x00*`.

use thiserror::Error;

/// The smallest bucket.
pub const MIN_BUCKET: usize = 64;
/// Buckets double up to this size, then grow in steps of it.
pub const LARGE_STEP: usize = 4096;

/// Padding that is not `0x80` followed by zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("malformed padding: no 0x80 marker before the trailing zeros")]
pub struct PaddingError;

/// The padded length for a plaintext of `len` bytes.
pub fn padded_len(len: usize) -> usize {
    let needed = len.saturating_add(1);
    if needed <= LARGE_STEP {
        needed.next_power_of_two().max(MIN_BUCKET)
    } else {
        needed.div_ceil(LARGE_STEP).saturating_mul(LARGE_STEP)
    }
}

/// Pads `plaintext` to its bucket.
pub fn pad(plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(padded_len(plaintext.len()));
    pad_into(plaintext, &mut out);
    out
}

/// Appends `plaintext`, padded to its bucket, to `out` (so it can be encrypted in place there).
pub fn pad_into(plaintext: &[u8], out: &mut Vec<u8>) {
    let end = out.len() + padded_len(plaintext.len());
    out.reserve(end - out.len());
    out.extend_from_slice(plaintext);
    out.push(0x80);
    out.resize(end, 0);
}

/// Whether `word` is eight zero bytes (one 64-bit compare, also in wasm at opt-level "z").
fn is_zero_word(word: &[u8]) -> bool {
    <[u8; 8]>::try_from(word).is_ok_and(|w| u64::from_ne_bytes(w) == 0)
}

/// Removes the padding, refusing a buffer without the `0x80` marker.
pub fn unpad(padded: &[u8]) -> Result<&[u8], PaddingError> {
    // Up to a bucket of zeros precede the marker: skip them eight at a time (one word compare
    // instead of eight byte compares; the bytes are public after the AEAD tag verified).
    let mut zeros_end = padded.len();
    while zeros_end >= 8 && is_zero_word(&padded[zeros_end - 8..zeros_end]) {
        zeros_end -= 8;
    }
    let end = padded[..zeros_end]
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(PaddingError)?;
    if padded[end] != 0x80 {
        return Err(PaddingError);
    }
    Ok(&padded[..end])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lengths_fall_into_the_documented_buckets() {
        assert_eq!(padded_len(0), 64);
        assert_eq!(padded_len(63), 64);
        assert_eq!(padded_len(64), 128);
        assert_eq!(padded_len(1000), 1024);
        assert_eq!(padded_len(4095), 4096);
        assert_eq!(padded_len(4096), 8192);
        assert_eq!(padded_len(8192), 12288);
    }

    #[test]
    fn refuses_all_zero_buffer() {
        assert_eq!(unpad(&[0; 64]), Err(PaddingError));
        assert_eq!(unpad(&[]), Err(PaddingError));
    }

    #[test]
    fn refuses_buffer_whose_last_nonzero_byte_is_not_0x80() {
        let mut p = pad(b"hi");
        p[2] = 0x81;
        assert_eq!(unpad(&p), Err(PaddingError));
    }

    #[test]
    fn finds_the_marker_at_every_offset_from_the_end() {
        // Exercises the word-at-a-time zero skip: the marker at each position of a 64-byte
        // bucket, with non-zero and zero bytes before it.
        for marker in 0..64 {
            for fill in [0x00, 0x80, 0xff] {
                let mut p = vec![fill; 64];
                p[marker] = 0x80;
                p[marker + 1..].fill(0);
                assert_eq!(
                    unpad(&p).unwrap().len(),
                    marker,
                    "marker {marker} fill {fill}"
                );
                p[marker] = 0x01;
                assert_eq!(unpad(&p), Err(PaddingError), "marker {marker} fill {fill}");
            }
        }
        assert_eq!(unpad(&[0x80]).unwrap(), &[] as &[u8]);
        assert_eq!(unpad(&[0; 9]), Err(PaddingError));
    }

    proptest! {
        #[test]
        fn unpad_matches_a_bytewise_scan(buf in proptest::collection::vec(prop_oneof![3 => Just(0u8), 1 => Just(0x80u8), 1 => any::<u8>()], 0..80)) {
            let expected = match buf.iter().rposition(|&b| b != 0) {
                Some(end) if buf[end] == 0x80 => Ok(&buf[..end]),
                _ => Err(PaddingError),
            };
            prop_assert_eq!(unpad(&buf), expected);
        }

        #[test]
        fn pad_then_unpad_returns_the_plaintext(msg in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let padded = pad(&msg);
            prop_assert_eq!(padded.len(), padded_len(msg.len()));
            prop_assert_eq!(unpad(&padded).unwrap(), &msg[..]);
        }
    }
}
