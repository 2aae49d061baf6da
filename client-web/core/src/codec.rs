//! The one binary codec of the protocol: big-endian integers and u32-length-prefixed byte strings.
//!
//! `Writer` appends; `Reader` consumes and never panics: every short or malformed input is a
//! [`DecodeError`]. Every frame, envelope and stored state of chat-core is written with these two.

use thiserror::Error;

/// Why a byte string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("input ended early: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("length {len} at offset {offset} exceeds the limit of {limit} bytes")]
    TooLong {
        offset: usize,
        len: usize,
        limit: usize,
    },
    #[error("{0} trailing bytes after the end of the value")]
    TrailingBytes(usize),
    #[error("unknown {what} tag {tag}")]
    UnknownTag { what: &'static str, tag: u8 },
    #[error("unsupported {what} version {version}")]
    UnsupportedVersion { what: &'static str, version: u8 },
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Appends values to a byte buffer.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
        }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Fixed-size bytes, written without a length (the reader knows the size).
    pub fn fixed(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Variable-size bytes with a u32 length prefix.
    ///
    /// # Panics
    /// Never in practice: inputs over 4 GiB are not representable in the protocol and are
    /// truncated to `u32::MAX` length by the caller's own limits long before.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.u32(len);
        self.buf.extend_from_slice(&v[..len as usize]);
        self
    }

    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    /// Optional bytes: a presence byte (0 or 1) then the value.
    pub fn opt_fixed(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            Some(v) => self.u8(1).fixed(v),
            None => self.u8(0),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// Consumes values from a byte slice; every method returns `Err` rather than panic.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, offset: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.offset
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                offset: self.offset,
                needed: n - self.remaining(),
            });
        }
        let out = &self.buf[self.offset..self.offset + n];
        self.offset += n;
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid("boolean")),
        }
    }

    /// Exactly `N` bytes.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A u32-length-prefixed byte string of at most `limit` bytes.
    pub fn bytes(&mut self, limit: usize) -> Result<&'a [u8], DecodeError> {
        let offset = self.offset;
        let len = self.u32()? as usize;
        if len > limit {
            return Err(DecodeError::TooLong { offset, len, limit });
        }
        self.take(len)
    }

    /// A u32-length-prefixed UTF-8 string of at most `limit` bytes.
    pub fn str(&mut self, limit: usize) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes(limit)?).map_err(|_| DecodeError::Invalid("UTF-8 string"))
    }

    pub fn opt_array<const N: usize>(&mut self) -> Result<Option<[u8; N]>, DecodeError> {
        if self.bool()? {
            Ok(Some(self.array()?))
        } else {
            Ok(None)
        }
    }

    /// Skips exactly `n` bytes and returns them.
    pub fn skip(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        self.take(n)
    }

    /// The bytes consumed since offset `start` (an earlier [`Reader::offset`]).
    pub fn since(&self, start: usize) -> &'a [u8] {
        &self.buf[start.min(self.offset)..self.offset]
    }

    /// Succeeds only when every byte was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips_every_kind_of_value() {
        let mut w = Writer::new();
        w.u8(7).u16(513).u32(70_000).u64(1 << 40).bool(true);
        w.fixed(&[1, 2, 3])
            .bytes(b"hello")
            .str("wörld")
            .opt_fixed(None);
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8(), Ok(7));
        assert_eq!(r.u16(), Ok(513));
        assert_eq!(r.u32(), Ok(70_000));
        assert_eq!(r.u64(), Ok(1 << 40));
        assert_eq!(r.bool(), Ok(true));
        assert_eq!(r.array::<3>(), Ok([1, 2, 3]));
        assert_eq!(r.bytes(16), Ok(&b"hello"[..]));
        assert_eq!(r.str(16), Ok("wörld"));
        assert_eq!(r.opt_array::<4>(), Ok(None));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn refuses_a_length_over_the_limit() {
        let mut w = Writer::new();
        w.bytes(&[0; 10]);
        let bytes = w.into_bytes();
        assert!(matches!(
            Reader::new(&bytes).bytes(9),
            Err(DecodeError::TooLong { len: 10, .. })
        ));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_input(input in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&input);
            let _ = r.u8();
            let _ = r.bytes(32);
            let _ = r.str(8);
            let _ = r.opt_array::<16>();
            let _ = r.u64();
            let _ = r.finish();
        }
    }
}
