//! Where a connection runs: its TLS handshake on the process's runtime
//! (every core, for a connect storm's cryptography), then its session on
//! the session runtime, of `--session-threads` workers (one by default).
//!
//! Why apart: a session's work per message is small and its wake-ups many.
//! On a runtime of two workers, a wake-up that finds two tasks ready wakes
//! the other worker, which steals one and parks again: at 10,000 devices
//! sending 0.1 msg/s, a futex wake and a park for every second message
//! (`bench/README.md`, stop 45, with what that saves and costs as
//! measured so far). One worker serves each wake-up's tasks itself. A
//! handshake costs a hundred times a message, so handshakes keep both
//! cores.
//!
//! The socket moves with its session: [`Conn`] is the TCP stream under the
//! TLS stream, taken out of the first runtime's reactor and registered with
//! the session runtime's, with nothing read lost (what rustls buffered is
//! in the TLS stream; what the kernel holds, epoll reports at once on
//! registration).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::runtime::Handle;

/// A connection's TCP stream, movable to another runtime.
#[derive(Debug)]
pub struct Conn(Option<TcpStream>);

impl Conn {
    pub fn new(tcp: TcpStream) -> Self {
        Self(Some(tcp))
    }

    /// Re-registers the socket with `rt`'s reactor: from here on it is
    /// read and written only on `rt`.
    pub fn move_to(&mut self, rt: &Handle) -> io::Result<()> {
        let tcp = self
            .0
            .take()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the socket is gone"))?;
        let std = tcp.into_std()?;
        let _in = rt.enter();
        self.0 = Some(TcpStream::from_std(std)?);
        Ok(())
    }

    fn tcp(self: Pin<&mut Self>) -> io::Result<Pin<&mut TcpStream>> {
        match self.get_mut().0.as_mut() {
            Some(t) => Ok(Pin::new(t)),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the socket did not move to the session runtime",
            )),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(t) => t.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.tcp() {
            Ok(t) => t.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.tcp() {
            Ok(t) => t.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(t) => t.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.tcp() {
            Ok(t) => t.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// The runtime sessions run on, on threads of its own; stopped when
/// dropped (its thread drops it, outside any runtime).
#[derive(Debug)]
pub struct SessionRuntime {
    handle: Handle,
    stop: Option<std::sync::mpsc::Sender<()>>,
}

impl SessionRuntime {
    /// A runtime of `workers` workers (at least one).
    pub fn start(workers: usize) -> io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("fleetgate-session")
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("fleetgate-sessions".into())
            .spawn(move || {
                // Until the broker drops this (or its sender goes).
                let _ = stopped.recv();
                rt.shutdown_background();
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for SessionRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A socket accepted on one runtime is read and written on another,
    /// losing nothing that arrived before it moved.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_socket_moves_to_the_session_runtime_with_what_it_holds() {
        let sessions = SessionRuntime::start(1).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        client.write_all(b"before").await.unwrap();
        let mut conn = Conn::new(tcp);
        conn.move_to(sessions.handle()).unwrap();
        let served = sessions.handle().spawn(async move {
            let mut got = [0u8; 6];
            conn.read_exact(&mut got).await.unwrap();
            conn.write_all(b"after").await.unwrap();
            (got, std::thread::current().name().map(str::to_owned))
        });
        let (got, thread) = served.await.unwrap();
        assert_eq!(&got, b"before");
        assert_eq!(thread.as_deref(), Some("fleetgate-session"));
        let mut back = [0u8; 5];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"after");
    }
}
