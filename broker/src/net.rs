//! Accepting TCP connections: a cap on open connections, back-off on accept
//! errors (EMFILE and friends) instead of a spin, TCP_NODELAY, and a stop on
//! shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub struct Acceptor {
    name: &'static str,
    listener: TcpListener,
    permits: Arc<Semaphore>,
    backoff: Duration,
}

/// An accepted connection; the permit frees its slot when dropped.
#[derive(Debug)]
pub struct Accepted {
    pub tcp: TcpStream,
    pub addr: SocketAddr,
    pub permit: OwnedSemaphorePermit,
}

const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl Acceptor {
    pub fn new(name: &'static str, listener: TcpListener, max_connections: usize) -> Self {
        Self {
            name,
            listener,
            permits: Arc::new(Semaphore::new(max_connections.max(1))),
            backoff: MIN_BACKOFF,
        }
    }

    /// The next connection, or `None` once `shutdown` turns true.
    pub async fn next(&mut self, shutdown: &mut watch::Receiver<bool>) -> Option<Accepted> {
        loop {
            if *shutdown.borrow() {
                return None;
            }
            let permit = tokio::select! {
                p = self.permits.clone().acquire_owned() => p.ok()?,
                _ = shutdown.changed() => return None,
            };
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = shutdown.changed() => return None,
            };
            match accepted {
                Ok((tcp, addr)) => {
                    self.backoff = MIN_BACKOFF;
                    let _ = tcp.set_nodelay(true);
                    return Some(Accepted { tcp, addr, permit });
                }
                Err(e) => {
                    tracing::warn!(listener = self.name, error = %e, backoff = ?self.backoff, "accept failed; backing off");
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
