//! A client's connection to the proxy: the byte stream (plain TCP or TLS)
//! with its receive and send buffers, and framed reads.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::wire::{self, Frame, PgError, ProtocolError};

/// A client's byte stream: plain TCP or TLS.
pub enum ClientStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS through rustls.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Momentarily detached while TLS is being negotiated.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream detached")
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            ClientStream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            ClientStream::Detached => Poll::Ready(Ok(())),
        }
    }
}

/// How much the receive buffer grows by when it runs low.
const READ_CHUNK: usize = 4096;

/// Why a client connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Network failure.
    #[error("client I/O error: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol.
    #[error("client protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    /// The client closed the connection.
    #[error("client disconnected")]
    Closed,
    /// The proxy reported a fatal error to the client and closed.
    #[error("{0}")]
    Fatal(PgError),
}

/// A client connection with its buffers.
pub struct ClientConn {
    /// The byte stream (replaced by TLS during negotiation).
    pub(super) stream: ClientStream,
    /// Bytes received and not yet framed.
    pub rbuf: BytesMut,
    /// Bytes to send; written by [`ClientConn::flush`].
    pub wbuf: BytesMut,
    /// The client's address.
    pub peer: SocketAddr,
}

impl ClientConn {
    /// Wraps a stream.
    pub fn new(stream: ClientStream, peer: SocketAddr) -> Self {
        ClientConn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            peer,
        }
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, ClientStream::Tls(_))
    }

    /// Splits one complete message off the receive buffer, if any.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        wire::split_frame(&mut self.rbuf, wire::MAX_MESSAGE_LEN)
    }

    /// Whether a complete message (or a malformed header) is buffered.
    pub fn has_frame(&self) -> bool {
        if self.rbuf.len() < 5 {
            return false;
        }
        let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
        len < 4 || len as usize > wire::MAX_MESSAGE_LEN || self.rbuf.len() > len as usize
    }

    /// Reads more bytes into the receive buffer (cancel-safe). Fails with
    /// [`ClientError::Closed`] at end of stream.
    pub async fn fill(&mut self) -> Result<(), ClientError> {
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            if let ClientStream::Plain(s) = &self.stream {
                if self.rbuf.capacity() == 0 {
                    // An idle client holds no buffer: wait for its bytes
                    // first (cancel-safe, as the read below).
                    s.readable().await?;
                }
            }
            self.rbuf.reserve(READ_CHUNK);
        }
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// Frees both buffers while they are empty (the client is idle): an
    /// idle client then costs no buffer memory; the next read allocates
    /// [`READ_CHUNK`] bytes again.
    pub fn release_buffers(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.is_empty() && self.wbuf.capacity() > 0 {
            self.wbuf = BytesMut::new();
        }
    }

    /// Reads one complete message.
    pub async fn read_frame(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Writes out the send buffer.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let r = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        r?;
        self.stream.flush().await
    }

    /// Sends a fatal error and closes (best effort).
    pub async fn fatal(&mut self, err: &PgError) {
        err.encode(&mut self.wbuf);
        let _ = tokio::time::timeout(Duration::from_secs(2), self.flush()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.stream.shutdown()).await;
    }
}
