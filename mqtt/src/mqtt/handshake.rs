//! A connection's TLS handshake, from its accept: run with the verifier
//! and a timeout, its failure logged, and who its peer turned out to be;
//! and the connection's slot ([`Open`]), held until its session ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::admission::{self, RegistryVerifier};
use super::session::Peer;
use super::{conn, Shared};
use crate::metrics::Refusal;

/// A connection from its accept to its session's end: its slot, and the
/// gauge of open connections. A session that panics drops this as it
/// unwinds, and says so (tokio keeps the panic's words for a join that
/// nobody makes).
pub(super) struct Open {
    _permit: crate::net::Permit,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Open {
    pub(super) fn new(permit: crate::net::Permit, metrics: &Arc<crate::metrics::Metrics>) -> Self {
        metrics.connections_open.fetch_add(1, Ordering::Relaxed);
        Self {
            _permit: permit,
            metrics: metrics.clone(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
        if std::thread::panicking() {
            tracing::error!("mqtt: a connection task panicked; its connection was dropped");
        }
    }
}

/// Moves a connection's socket to the session runtime; false (and logged)
/// if it could not.
pub(super) fn moved(conn: &mut conn::Conn, shared: &Shared, addr: std::net::SocketAddr) -> bool {
    match conn.move_to(&shared.sessions_rt) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(peer.addr = %addr, error = %e, "mqtt: the connection could not move to the session runtime; closing");
            false
        }
    }
}

/// Runs `session` on the session runtime with its connection's slot,
/// counted by `sessions`. Boxed: the task's block would otherwise hold the
/// session's future twice (as what it captured and as what it awaits).
pub(super) fn spawn_session(
    sessions: &tokio_util::task::TaskTracker,
    shared: &Shared,
    open: Open,
    session: impl std::future::Future + Send + 'static,
) {
    let session = Box::pin(session);
    sessions.spawn_on(
        async move {
            let _open = open;
            session.await;
        },
        &shared.sessions_rt,
    );
}

/// A handshake task that panicked has dropped its connection; say so.
pub(super) fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "mqtt: a connection task panicked; its connection was dropped");
        }
    }
}

/// Runs the TLS handshake of a connection from `addr`: the stream, if it
/// completed, and what the verifier found. The ClientHello is read first,
/// to answer it with the config its cipher suites call for
/// ([`crate::mqtt_tls::MqttTls::for_client`]). A function of its own so that
/// nothing of the handshake's (a TLS stream is 1.3 KiB) stays in the
/// connection's task while its session runs.
pub(super) async fn accept(
    tls: Arc<crate::mqtt_tls::MqttTls>,
    tcp: conn::Conn,
    addr: std::net::SocketAddr,
    shared: &Shared,
) -> (
    Option<tokio_rustls::server::TlsStream<conn::Conn>>,
    Option<admission::Verified>,
) {
    let metrics = &shared.metrics;
    // A refusal the verifier logs names the peer's address.
    let handshake = async {
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        let config = tls.for_client(start.client_hello().cipher_suites());
        start.into_stream(config).await
    };
    let (accepted, verified) = admission::handshake(
        addr,
        tokio::time::timeout(shared.cfg.handshake_timeout, handshake),
    )
    .await;
    let stream = match accepted {
        Ok(Ok(mut s)) => {
            s.get_mut().0.handshake_over();
            Some(s)
        }
        Ok(Err(e)) => {
            if e.to_string().contains("peer sent no certificates") {
                metrics.refused(Refusal::NoCertificate);
            }
            tracing::info!(peer.addr = %addr, reason = %e, "mqtt: TLS handshake failed");
            None
        }
        Err(_) => {
            metrics.refused(Refusal::HandshakeTimeout);
            tracing::info!(peer.addr = %addr, "mqtt: refused: TLS handshake timed out");
            None
        }
    };
    (stream, verified)
}

/// Who the peer of a handshake is: what the verifier found, or on a
/// resumed TLS session (which skips the verifier) the same checks again on
/// the chain it presented the first time. `None`, refused (counted and
/// logged by the verifier).
pub(super) fn peer_of(
    stream: &tokio_rustls::server::TlsStream<conn::Conn>,
    addr: std::net::SocketAddr,
    verifier: &RegistryVerifier,
    verified: Option<admission::Verified>,
) -> Option<Peer> {
    let v = match verified {
        Some(v) => v,
        None => {
            let chain = stream.get_ref().1.peer_certificates().unwrap_or_default();
            verifier
                .verify_again(chain, rustls_pki_types::UnixTime::now())
                .ok()?
        }
    };
    Some(Peer {
        addr,
        identity: v.identity,
        key: v.key,
        info: v.info,
        manufacturer: v.manufacturer,
    })
}
