//! An HTTP(S) server for an axum router: TLS with optional client
//! certificates (or plain HTTP, for OCSP, CRLs and metrics), the peer's
//! certificate handed to handlers as a request extension, a cap on
//! connections, a handshake and header timeout and graceful drain.
//!
//! None of these listeners can be locked by holding connections open:
//! one address may hold only so many connections and open them only so
//! fast, and when the cap is reached a new connection evicts the oldest one
//! that has not yet sent a request (a client doing real work is never
//! evicted, and one that only holds a socket open loses it to the next
//! newcomer, an operator included).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::net::{Accepted, Acceptor};
use tower::ServiceExt;

/// The client certificate a request came with, if any (already verified to
/// chain to the root by the TLS layer).
#[derive(Clone, Debug)]
pub struct PeerCert(pub Option<CertificateDer<'static>>);

/// Also the peer's address, for logs.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    /// Connections open at once from one address.
    pub max_per_ip: usize,
    /// New connections per second from one address.
    pub rate_per_ip: Option<crate::net::Rate>,
    pub handshake_timeout: Duration,
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_per_ip: 64,
            rate_per_ip: None,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// One open connection, as eviction sees it.
#[derive(Debug, Default)]
struct ConnState {
    /// Requests being answered now: a connection with one is never evicted.
    in_flight: std::sync::atomic::AtomicUsize,
    evict: tokio::sync::Notify,
}

/// Open connections, oldest first.
#[derive(Debug, Default)]
struct Open {
    next: u64,
    queue: VecDeque<(u64, Arc<ConnState>)>,
}

impl Open {
    fn add(&mut self) -> (u64, Arc<ConnState>) {
        self.next += 1;
        let state = Arc::new(ConnState::default());
        self.queue.push_back((self.next, state.clone()));
        (self.next, state)
    }

    fn remove(&mut self, id: u64) {
        self.queue.retain(|(i, _)| *i != id);
    }

    /// Tells the oldest connection with no request in flight to close;
    /// false if every connection is busy.
    fn evict_oldest(&mut self) -> bool {
        let idle = self
            .queue
            .iter()
            .position(|(_, c)| c.in_flight.load(std::sync::atomic::Ordering::Acquire) == 0);
        match idle.and_then(|i| self.queue.remove(i)) {
            Some((_, c)) => {
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

fn lock(open: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    // A plain queue: still usable after a panic elsewhere.
    open.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Takes a connection off [`Open`] when it ends.
struct Registered {
    open: Arc<Mutex<Open>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.open).remove(self.id);
    }
}

/// Counts a request in flight on its connection while it is answered.
fn counted<F: std::future::Future>(
    state: &Arc<ConnState>,
    fut: F,
) -> impl std::future::Future<Output = F::Output> {
    use std::sync::atomic::Ordering;
    let state = state.clone();
    state.in_flight.fetch_add(1, Ordering::AcqRel);
    async move {
        let out = fut.await;
        state.in_flight.fetch_sub(1, Ordering::AcqRel);
        out
    }
}

/// Serves `app` on `listener` (over TLS, or plain without `tls`) until
/// `shutdown` turns true, then waits up to `limits.drain_timeout` for open
/// requests to finish.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Option<watch::Receiver<Arc<ServerConfig>>>,
    app: axum::Router,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut incoming = Acceptor::new(
        name,
        listener,
        crate::net::AcceptLimits {
            max_connections: limits.max_connections,
            per_ip: limits.rate_per_ip,
            max_per_ip: Some(limits.max_per_ip.max(1)),
        },
        None,
    )
    .uncapped();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open = Arc::new(Mutex::new(Open::default()));
    let mut cap_warning = crate::net::LogThrottle::default();
    let graceful = GracefulShutdown::new();
    while let Some(Accepted { tcp, addr, permit }) = incoming.next(&mut shutdown).await {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // Full: the oldest connection that never sent a request
                // makes room, if there is one.
                let evicted = lock(&open).evict_oldest();
                let freed = match evicted {
                    true => tokio::time::timeout(
                        Duration::from_millis(200),
                        slots.clone().acquire_owned(),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok),
                    false => None,
                };
                if cap_warning.ready(std::time::Instant::now()) {
                    tracing::warn!(listener = name, max_connections = limits.max_connections, peer.addr = %addr, evicted, reason = "overloaded", "connection cap reached: evicting the oldest connection that has sent no request");
                }
                match freed {
                    Some(slot) => slot,
                    None => {
                        drop(tcp);
                        continue;
                    }
                }
            }
        };
        let acceptor = tls.as_ref().map(|t| TlsAcceptor::from(t.borrow().clone()));
        let app = app.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.handshake_timeout;
        let (id, state) = lock(&open).add();
        let registered = Registered {
            open: open.clone(),
            id,
        };
        tokio::spawn(async move {
            let _permit = (permit, slot, registered);
            let watched = state.clone();
            let mut evict = Box::pin(watched.evict.notified());
            let Some(acceptor) = acceptor else {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(PeerCert(None));
                    req.extensions_mut().insert(PeerAddr(addr));
                    counted(&state, app.clone().oneshot(req))
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(handshake_timeout)
                    .serve_connection(TokioIo::new(tcp), svc);
                tokio::select! {
                    r = watcher.watch(conn) => if let Err(e) = r {
                        tracing::debug!(listener = name, peer.addr = %addr, error = %e, "connection ended with an error");
                    },
                    _ = &mut evict => {
                        tracing::debug!(listener = name, peer.addr = %addr, "evicted: idle while the connection cap was reached");
                    }
                }
                return;
            };
            let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp));
            let handshake = tokio::select! {
                h = handshake => h,
                _ = &mut evict => {
                    tracing::info!(listener = name, peer.addr = %addr, "evicted during its TLS handshake: the connection cap was reached");
                    return;
                }
            };
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(listener = name, peer.addr = %addr, reason = %e, "refused: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(listener = name, peer.addr = %addr, "refused: TLS handshake timed out");
                    return;
                }
            };
            let peer = PeerCert(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.clone().into_owned()),
            );
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(peer.clone());
                req.extensions_mut().insert(PeerAddr(addr));
                counted(&state, app.clone().oneshot(req))
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(TokioIo::new(tls), svc);
            tokio::select! {
                r = watcher.watch(conn) => if let Err(e) = r {
                    tracing::debug!(listener = name, peer.addr = %addr, error = %e, "connection ended with an error");
                },
                _ = &mut evict => {
                    tracing::debug!(listener = name, peer.addr = %addr, "evicted: idle while the connection cap was reached");
                }
            }
        });
    }
    drop(incoming);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "connections still open after the drain timeout"
        );
    }
}
