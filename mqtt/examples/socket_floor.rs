//! The least a tokio + rustls server pays for a full connect over real
//! sockets: the floor of `benches/handshake.rs` plus what the kernel and
//! the runtime add (accept, reads, writes, epoll, close), with nothing of
//! a broker (no registry, session, log or metrics). It accepts on
//! 127.0.0.1, completes the mTLS handshake (rustls with ring, the client
//! verified against `ca`, the MQTT listener's cipher suite order as
//! fleetgate picks it for the loader: `fleetgate_mqtt::mqtt_tls::MqttTls`,
//! without reading the ClientHello first), answers any
//! first record with an MQTT 3.1.1 CONNACK, and closes at DISCONNECT or
//! EOF. `bench/connect-floor.sh` runs the same loader against it, beside
//! fleetgate and Mosquitto.
//!
//!   cargo run --release -p fleetgate-mqtt --example socket_floor -- \
//!       CA.crt SERVER.crt SERVER.key

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ca, cert, key] = args.as_slice() else {
        return Err("usage: socket_floor CA.crt SERVER.crt SERVER.key".into());
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots)).build()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let tickets = rustls::crypto::ring::Ticketer::new()?;
    let configs = fleetgate_mqtt::mqtt_tls::MqttTls::new(&tickets, |provider| {
        Ok(
            rustls::ServerConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier.clone())
                .with_single_cert(chain.clone(), key.clone_key())?,
        )
    })
    .map_err(|e| e.to_string())?;
    // The loader is a rustls client with its default suites.
    let offered: Vec<_> = rustls::crypto::ring::default_provider()
        .cipher_suites
        .iter()
        .map(|s| s.suite())
        .collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(configs.for_client(&offered));
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening mqtt={}", listener.local_addr()?);
        loop {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                if !matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {
                    return;
                }
                if tls.write_all(&[0x20, 2, 0, 0]).await.is_err() {
                    return;
                }
                // Until DISCONNECT (0xe0) or the end.
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    if buf[..n].first() == Some(&0xe0) {
                        break;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    })
}
