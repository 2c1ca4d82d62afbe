//! An HTTP(S) server for an axum router: TLS with optional client
//! certificates (or plain HTTP, for OCSP, CRLs and metrics), the peer's
//! certificate handed to handlers as a request extension, a cap on
//! connections, a handshake and header timeout and graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
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
    pub handshake_timeout: Duration,
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
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
            per_ip: None,
        },
        None,
    );
    let graceful = GracefulShutdown::new();
    while let Some(Accepted { tcp, addr, permit }) = incoming.next(&mut shutdown).await {
        let acceptor = tls.as_ref().map(|t| TlsAcceptor::from(t.borrow().clone()));
        let app = app.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let Some(acceptor) = acceptor else {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(PeerCert(None));
                    req.extensions_mut().insert(PeerAddr(addr));
                    app.clone().oneshot(req)
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(handshake_timeout)
                    .serve_connection(TokioIo::new(tcp), svc);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(listener = name, peer.addr = %addr, error = %e, "connection ended with an error");
                }
                return;
            };
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
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
                app.clone().oneshot(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(listener = name, peer.addr = %addr, error = %e, "connection ended with an error");
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
