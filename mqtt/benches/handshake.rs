//! The floor under a connect: full TLS 1.3 handshakes with client
//! certificates (P-256 keys, ECDSA, rustls with ring as in `serve`),
//! client and server in one thread and in memory: no sockets, no MQTT, no
//! registry. Prints each side's time per handshake, which on one thread is
//! its CPU time: with the MQTT listener's own cipher suite order
//! (`fleetgate_mqtt::mqtt_tls::MqttTls`: AES-128-GCM-SHA256 for a client with
//! rustls's defaults; `server_us_per_handshake`), and with rustls's
//! default server configuration (the client's first choice,
//! AES-256-GCM-SHA384; `server_us_per_handshake_default`), the floor
//! stops before 50 measured.
//! `bench/connect-floor.sh` sets the broker's CPU per connect beside it.
//!
//!   cargo bench -p fleetgate-mqtt --bench handshake [-- HANDSHAKES]

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// A leaf for `name` signed by `issuer`, with its key.
fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("sign");
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// Moves what `from` has to write into `to`, timing each side's work.
fn pass(from: &mut dyn FnMut(&mut Vec<u8>) -> usize, to: &mut dyn FnMut(&[u8])) -> bool {
    let mut buf = Vec::new();
    if from(&mut buf) == 0 {
        return false;
    }
    to(&buf);
    true
}

fn main() {
    let n: u32 = std::env::args()
        .skip(1)
        .find(|a| a != "--bench")
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let _ = rustls::crypto::ring::default_provider().install_default();

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca, ca_key);
    let mut roots = RootCertStore::empty();
    roots.add(ca_cert.der().clone()).expect("root");
    let roots = Arc::new(roots);

    let (server_cert, server_key) = leaf(&issuer, "localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf(&issuer, "dev-1", ExtendedKeyUsagePurpose::ClientAuth);
    let verifier = WebPkiClientVerifier::builder(roots.clone())
        .build()
        .expect("verifier");
    let default = Arc::new(
        ServerConfig::builder()
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(vec![server_cert.clone()], server_key.clone_key())
            .expect("server config"),
    );
    let tickets = rustls::crypto::ring::Ticketer::new().expect("ticket keys");
    let ours = fleetgate_mqtt::mqtt_tls::MqttTls::new(&tickets, |provider| {
        Ok(ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(vec![server_cert.clone()], server_key.clone_key())?)
    })
    .expect("the MQTT listener's configs");
    let mut client = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![client_cert], client_key)
        .expect("client config");
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);
    let offered: Vec<_> = client
        .crypto_provider()
        .cipher_suites
        .iter()
        .map(|s| s.suite())
        .collect();
    let ours = ours.for_client(&offered);

    let (server_us, suite) = handshakes(n, &ours, &client);
    let (default_us, default_suite) = handshakes(n, &default, &client);
    println!("server_us_per_handshake={server_us:.1} ({suite:?})");
    println!("server_us_per_handshake_default={default_us:.1} ({default_suite:?})");
}

/// `n` handshakes between `server` and `client`: the server's time per
/// handshake in microseconds, and the suite they agreed on; prints both
/// sides' time.
fn handshakes(
    n: u32,
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
) -> (f64, Option<rustls::CipherSuite>) {
    let name = ServerName::try_from("localhost").expect("name");
    let mut suite = None;
    let (mut on_server, mut on_client) = (Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    for _ in 0..n {
        let mut c = ClientConnection::new(client.clone(), name.clone()).expect("client");
        let mut s = ServerConnection::new(server.clone()).expect("server");
        c.writer().write_all(b"x").expect("write");
        let mut moved = true;
        while moved || c.is_handshaking() || s.is_handshaking() {
            moved = false;
            moved |= pass(
                &mut |buf| {
                    let t = Instant::now();
                    let w = c.write_tls(buf).expect("client write");
                    on_client += t.elapsed();
                    w
                },
                &mut |bytes| {
                    let t = Instant::now();
                    let mut r = bytes;
                    while !r.is_empty() {
                        s.read_tls(&mut r).expect("server read");
                    }
                    s.process_new_packets().expect("server handshake");
                    on_server += t.elapsed();
                },
            );
            moved |= pass(
                &mut |buf| {
                    let t = Instant::now();
                    let w = s.write_tls(buf).expect("server write");
                    on_server += t.elapsed();
                    w
                },
                &mut |bytes| {
                    let t = Instant::now();
                    let mut r = bytes;
                    while !r.is_empty() {
                        c.read_tls(&mut r).expect("client read");
                    }
                    c.process_new_packets().expect("client handshake");
                    on_client += t.elapsed();
                },
            );
        }
        let mut got = [0u8; 1];
        s.reader().read_exact(&mut got).expect("the client's byte");
        suite = s.negotiated_cipher_suite().map(|s| s.suite());
    }
    let total = started.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(n);
    println!(
        "{n} full TLS 1.3 mTLS handshakes (P-256, in memory, one thread, {suite:?}): \
         server {:.0} us each, client {:.0} us each, {:.0} handshakes/s on one core",
        per(on_server),
        per(on_client),
        f64::from(n) / total.as_secs_f64()
    );
    (per(on_server), suite)
}
