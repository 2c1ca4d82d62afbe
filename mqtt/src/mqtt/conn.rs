//! Where a connection runs: its TLS handshake on the process's runtime
//! (every core, for a connect storm's cryptography), and its CONNECT,
//! CONNACK and first moments there too; then, if it is still open
//! `--session-settle-ms` (500) after its CONNACK, its session on the
//! session runtime, of `--session-threads` workers (one by default). A
//! short connection (a device that connects, publishes and leaves) never
//! moves, and no connect pays for a handoff (waking the session thread
//! for each new session, and two more epoll registrations: about 5% of a
//! connect's CPU in a storm). 0 moves every session before its CONNECT.
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
///
/// It also holds back what rustls writes in a TLS 1.3 handshake once it
/// has verified the client's certificate (its session ticket), and sends
/// it with the next write after it (the CONNACK): one write and one
/// segment fewer a connect, and the client's CONNECT, which it sends
/// without waiting for a ticket, is read meanwhile
/// ([`super::admission::holds_writes`]; never in TLS 1.2, whose client
/// waits for the server's Finished). What is still held when the
/// connection is dropped (an alert for a handshake that failed after all)
/// is written then, without waiting.
#[derive(Debug)]
pub struct Conn {
    tcp: Option<TcpStream>,
    held: Vec<u8>,
    /// Whether a write now is held back; `None` once the handshake is
    /// over.
    hold: Option<fn() -> bool>,
}

impl Conn {
    pub fn new(tcp: TcpStream) -> Self {
        Self::holding_while(tcp, super::admission::holds_writes)
    }

    fn holding_while(tcp: TcpStream, hold: fn() -> bool) -> Self {
        Self {
            tcp: Some(tcp),
            held: Vec::new(),
            hold: Some(hold),
        }
    }

    /// The handshake is over: no write is held from here on (what is
    /// held still goes with the next).
    pub fn handshake_over(&mut self) {
        self.hold = None;
    }

    fn holding(&self) -> bool {
        self.hold.is_some_and(|h| h())
    }

    /// Re-registers the socket with `rt`'s reactor: from here on it is
    /// read and written only on `rt`.
    pub fn move_to(&mut self, rt: &Handle) -> io::Result<()> {
        let tcp = self
            .tcp
            .take()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the socket is gone"))?;
        let std = tcp.into_std()?;
        let _in = rt.enter();
        self.tcp = Some(TcpStream::from_std(std)?);
        Ok(())
    }

    fn tcp(self: Pin<&mut Self>) -> io::Result<Pin<&mut TcpStream>> {
        tcp(&mut self.get_mut().tcp)
    }
}

fn tcp(t: &mut Option<TcpStream>) -> io::Result<Pin<&mut TcpStream>> {
    match t.as_mut() {
        Some(t) => Ok(Pin::new(t)),
        None => Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the socket did not move to the session runtime",
        )),
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let (false, Some(t)) = (self.held.is_empty(), self.tcp.as_ref()) {
            let _ = t.try_write(&self.held);
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

/// Writes what is held until none is left (ready) or the socket can take
/// no more now (pending).
fn send_held(
    mut t: Pin<&mut TcpStream>,
    held: &mut Vec<u8>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !held.is_empty() {
        let n = std::task::ready!(t.as_mut().poll_write(cx, held))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        held.drain(..n);
    }
    Poll::Ready(Ok(()))
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let holding = self.holding();
        let Conn { tcp: t, held, .. } = self.get_mut();
        if held.is_empty() && !holding {
            return match tcp(t) {
                Ok(t) => t.poll_write_vectored(cx, bufs),
                Err(e) => Poll::Ready(Err(e)),
            };
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        if holding {
            for b in bufs {
                held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        // What was held, and this, in one write.
        let t = match tcp(t) {
            Ok(t) => t,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let mut all = Vec::with_capacity(bufs.len() + 1);
        all.push(io::IoSlice::new(held));
        all.extend_from_slice(bufs);
        let n = std::task::ready!(t.poll_write_vectored(cx, &all))?;
        if n < held.len() {
            held.drain(..n);
            // Nothing of this write went yet; its caller tries again.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = n - std::mem::take(held).len();
        if n == 0 && len > 0 {
            // Only what was held went: this write, the next time.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.holding() {
            return Poll::Ready(Ok(()));
        }
        let Conn { tcp: t, held, .. } = self.get_mut();
        let mut t = match tcp(t) {
            Ok(t) => t,
            Err(e) => return Poll::Ready(Err(e)),
        };
        std::task::ready!(send_held(t.as_mut(), held, cx))?;
        t.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.as_mut().poll_flush(cx))?;
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
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl SessionRuntime {
    /// A runtime of `workers` workers (at least one).
    pub fn start(workers: usize) -> io::Result<Self> {
        // One thread: a current-thread runtime that thread drives, with
        // none of the work-stealing scheduler's bookkeeping. More: workers
        // of their own, and a thread that only waits to stop them.
        let (mut builder, thread) = if workers <= 1 {
            (
                tokio::runtime::Builder::new_current_thread(),
                "fleetgate-session",
            )
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(workers).thread_name("fleetgate-session");
            (b, "fleetgate-sessions")
        };
        let rt = builder.enable_all().build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                // Until the broker drops this (or its sender goes).
                let _ = rt.block_on(stopped);
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

    static HOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    fn hold() -> bool {
        HOLD.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What is written while held (a handshake's tickets) goes with the
    /// next write after (the CONNACK), first; a flush while held sends
    /// nothing; what is held when the connection drops is still sent.
    #[tokio::test]
    async fn held_writes_go_with_the_next_one_or_at_the_end() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = Conn::holding_while(tcp, hold);

        HOLD.store(true, std::sync::atomic::Ordering::Relaxed);
        conn.write_all(b"tickets ").await.unwrap();
        conn.flush().await.unwrap();
        assert_eq!(conn.held, b"tickets ");
        HOLD.store(false, std::sync::atomic::Ordering::Relaxed);
        conn.write_all(b"connack ").await.unwrap();
        assert!(conn.held.is_empty());
        let mut got = [0u8; 16];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"tickets connack ");

        HOLD.store(true, std::sync::atomic::Ordering::Relaxed);
        conn.write_all(b"alert").await.unwrap();
        HOLD.store(false, std::sync::atomic::Ordering::Relaxed);
        drop(conn);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"alert");
    }

    static HOLD_2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    fn hold_2() -> bool {
        HOLD_2.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The server reads the client's CONNECT with its tickets still held:
    /// a read that waits sends nothing, and the tickets go with the
    /// CONNACK.
    #[tokio::test]
    async fn a_read_that_waits_keeps_what_is_held_for_the_next_write() {
        use std::io::{Read, Write};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = Conn::holding_while(tcp, hold_2);
        HOLD_2.store(true, std::sync::atomic::Ordering::Relaxed);
        conn.write_all(b"tickets ").await.unwrap();
        conn.flush().await.unwrap();
        HOLD_2.store(false, std::sync::atomic::Ordering::Relaxed);
        // One read that finds nothing and waits.
        std::future::poll_fn(|cx| {
            let mut b = [0u8; 7];
            let mut buf = ReadBuf::new(&mut b);
            assert!(Pin::new(&mut conn).poll_read(cx, &mut buf).is_pending());
            Poll::Ready(())
        })
        .await;
        client.set_nonblocking(true).unwrap();
        let mut b = [0u8; 16];
        let early = client.read(&mut b);
        assert!(
            matches!(&early, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "nothing sent while the server waited: {early:?}"
        );
        client.set_nonblocking(false).unwrap();
        client.write_all(b"connect").unwrap();
        let mut got = [0u8; 7];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"connect");
        conn.write_all(b"connack ").await.unwrap();
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"tickets connack ");
    }

    fn always() -> bool {
        true
    }

    /// Once the handshake is over nothing more is held, whatever the
    /// handshake's predicate would say.
    #[tokio::test]
    async fn after_the_handshake_nothing_is_held() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = Conn::holding_while(tcp, always);
        conn.write_all(b"ticket ").await.unwrap();
        assert_eq!(conn.held, b"ticket ");
        conn.handshake_over();
        conn.write_all(b"connack").await.unwrap();
        assert!(conn.held.is_empty());
        let mut got = [0u8; 14];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ticket connack");
    }
}
