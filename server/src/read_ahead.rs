//! [`ReadAhead`]: reads a socket in chunks while it is busy, and holds no buffer while it is idle.
//!
//! tungstenite reads a frame into a buffer sized for that frame: once it has a frame's header it
//! asks the socket for exactly the rest of that frame. A client that pipelines 16 sends of ~640
//! bytes, written in one `write`, was read back with 16 or more `recvfrom` calls
//! (docs/BENCHMARKS.md, issue #8). A bigger tungstenite read buffer would fix that but is
//! allocated per socket for the socket's whole life, and idle sockets must stay cheap.
//!
//! `ReadAhead` sits between tungstenite and the socket. A small read is served from a chunk of up
//! to [`CHUNK`] bytes read in one call; the chunk is allocated when a read finds it empty and
//! freed as soon as the socket has nothing more to give (the inner read is pending), so an idle
//! socket holds nothing. Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much one read of the socket takes at most: a dozen pipelined chat frames.
pub const CHUNK: usize = 8 * 1024;

/// A socket read in chunks of up to [`CHUNK`] bytes; see the module documentation.
pub struct ReadAhead<S> {
    inner: S,
    /// Read from the socket, not yet handed on. Empty, with no allocation, while idle.
    ahead: BytesMut,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            ahead: BytesMut::new(),
        }
    }

    /// Bytes held for the next reads (0 for a socket whose reader has caught up).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.ahead.len()
    }

    /// Memory held by the chunk (0 for a socket that is idle).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.ahead.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ahead.is_empty() {
            if out.remaining() >= CHUNK {
                // A large read gains nothing from a copy.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            // Reuses the chunk's memory while the socket stays busy.
            this.ahead.reserve(CHUNK);
            let mut chunk = (&mut this.ahead).limit(CHUNK);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut chunk) {
                Poll::Pending => {
                    // Nothing more for now: an idle socket keeps no buffer.
                    this.ahead = BytesMut::new();
                    return Poll::Pending;
                }
                // 0 bytes: the end of the stream, passed on as a read of nothing.
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
        let n = out.remaining().min(this.ahead.len());
        out.put_slice(&this.ahead[..n]);
        this.ahead.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use tokio::io::AsyncReadExt;

    /// A socket that has `bursts` to give, one burst per read at most (a read takes as much of
    /// the front burst as fits), then is pending; counts the reads that reached it.
    struct Bursts {
        bursts: VecDeque<Vec<u8>>,
        reads: usize,
        eof: bool,
    }

    impl Bursts {
        fn new(bursts: Vec<Vec<u8>>, eof: bool) -> Self {
            Self {
                bursts: bursts.into(),
                reads: 0,
                eof,
            }
        }
    }

    impl AsyncRead for Bursts {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.reads += 1;
            let Some(front) = this.bursts.front_mut() else {
                return if this.eof {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            };
            let n = out.remaining().min(front.len());
            out.put_slice(&front[..n]);
            front.drain(..n);
            if front.is_empty() {
                this.bursts.pop_front();
            }
            Poll::Ready(Ok(()))
        }
    }

    fn poll_once(reader: &mut ReadAhead<Bursts>, want: usize) -> Poll<io::Result<Vec<u8>>> {
        let mut storage = vec![0u8; want];
        let mut out = ReadBuf::new(&mut storage);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(reader)
            .poll_read(&mut cx, &mut out)
            .map_ok(|()| out.filled().to_vec())
    }

    #[test]
    fn sixteen_pipelined_frames_are_read_from_the_socket_once() {
        // 16 frames of 640 bytes, written together: one burst of 10,240 bytes.
        let burst: Vec<u8> = (0..16 * 640).map(|i| (i % 251) as u8).collect();
        let mut reader = ReadAhead::new(Bursts::new(vec![burst.clone()], false));
        let mut got = Vec::new();
        // tungstenite's pattern: a header's worth, then the rest of the frame.
        while got.len() < burst.len() {
            for want in [2, 638] {
                match poll_once(&mut reader, want) {
                    Poll::Ready(Ok(bytes)) => got.extend(bytes),
                    other => panic!("a read of buffered bytes was {other:?}"),
                }
            }
        }
        assert_eq!(got, burst);
        // 10,240 bytes in chunks of 8 KiB: two reads of the socket, not 32.
        assert_eq!(reader.inner.reads, 2);
    }

    #[test]
    fn an_idle_socket_holds_no_buffer() {
        let mut reader = ReadAhead::new(Bursts::new(vec![vec![7u8; 100]], false));
        assert_eq!(reader.held(), 0);
        assert!(matches!(poll_once(&mut reader, 40), Poll::Ready(Ok(b)) if b == vec![7u8; 40]));
        assert_eq!(reader.buffered(), 60);
        assert!(matches!(poll_once(&mut reader, 100), Poll::Ready(Ok(b)) if b == vec![7u8; 60]));
        // Caught up: the next read finds the socket pending and lets the chunk go.
        assert!(poll_once(&mut reader, 100).is_pending());
        assert_eq!((reader.buffered(), reader.held()), (0, 0));
    }

    #[test]
    fn a_large_read_goes_straight_to_the_socket() {
        let mut reader = ReadAhead::new(Bursts::new(vec![vec![1u8; 3 * CHUNK]], false));
        match poll_once(&mut reader, 3 * CHUNK) {
            Poll::Ready(Ok(bytes)) => assert_eq!(bytes.len(), 3 * CHUNK),
            other => panic!("{other:?}"),
        }
        assert_eq!(reader.held(), 0, "nothing was copied through the chunk");
    }

    #[test]
    fn end_of_stream_reads_as_zero_bytes_after_the_data() {
        let mut reader = ReadAhead::new(Bursts::new(vec![b"bye".to_vec()], true));
        assert!(matches!(poll_once(&mut reader, 10), Poll::Ready(Ok(b)) if b == b"bye"));
        assert!(matches!(poll_once(&mut reader, 10), Poll::Ready(Ok(b)) if b.is_empty()));
    }

    #[test]
    fn errors_from_the_socket_come_through() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            }
        }
        let mut reader = ReadAhead::new(Broken);
        let mut storage = [0u8; 16];
        let mut out = ReadBuf::new(&mut storage);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(&mut reader).poll_read(&mut cx, &mut out) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        /// Whatever the bursts and read sizes, the bytes come out whole and in order.
        #[test]
        fn bytes_come_out_in_order(
            bursts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..3 * CHUNK), 1..8),
            sizes in proptest::collection::vec(1usize..2 * CHUNK, 1..64),
        ) {
            let expected: Vec<u8> = bursts.concat();
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
            let got = runtime.block_on(async {
                let mut reader = ReadAhead::new(Bursts::new(bursts, true));
                let mut got = Vec::new();
                let mut i = 0;
                loop {
                    let mut storage = vec![0u8; sizes[i % sizes.len()]];
                    i += 1;
                    let n = reader.read(&mut storage).await.expect("the test socket does not fail");
                    if n == 0 {
                        break got;
                    }
                    got.extend_from_slice(&storage[..n]);
                }
            });
            prop_assert_eq!(got, expected);
        }
    }
}
