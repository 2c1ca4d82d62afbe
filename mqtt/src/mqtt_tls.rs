//! The MQTT listener's TLS: its cipher suite order, chosen at each
//! ClientHello, and its session tickets. Apart from `tls` (which builds
//! it from the data dir, with the MQTT verifier) so that the MQTT front,
//! which reads a ClientHello with it, does not name `tls`.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::ProducesTickets;
use rustls::{CipherSuite, ServerConfig};

/// The MQTT listener's TLS: the server's own cipher suite order, one of
/// two, chosen at each ClientHello ([`MqttTls::for_client`]).
///
/// AES-128-GCM first: TLS 1.3's mandatory suite, as strong as the P-256
/// keys every certificate here has (128-bit), and cheaper than
/// AES-256-GCM-SHA384 at both ends: its key schedule and transcript hash
/// are SHA-256, which current CPUs do in hardware (x86 SHA-NI, ARMv8
/// SHA2) where SHA-384 is software, and each record is 10 AES rounds, not
/// 14. Clients (rustls, OpenSSL) ask for AES-256 first, so the server's
/// order decides, as Go's does. A client whose first choice is
/// ChaCha20-Poly1305 says it has no AES in hardware (BoringSSL and Go read
/// it so too): it gets ChaCha20. A client that offers only AES-256 still
/// gets it.
///
/// One TLS 1.3 session ticket a connect, stateless (its session sealed
/// with a key of this process's, rotated every 6 hours, so it costs the
/// server no memory and any device of a fleet can resume): rustls's
/// default, two tickets kept in a cache of 256 sessions, forgot a
/// fleet's sessions as fast as they came. A resumed session is admitted
/// as a full one is (`handshake::peer_of`).
#[derive(Debug)]
pub struct MqttTls {
    aes: Arc<ServerConfig>,
    chacha: Arc<ServerConfig>,
}

impl MqttTls {
    /// Both configs, from `build` given a provider with its suites in the
    /// order wanted, sealing tickets with `tickets`; they share it and one
    /// session cache (TLS 1.2's), so a session resumes whichever the
    /// client picks next time.
    pub fn new(
        tickets: &Arc<dyn ProducesTickets>,
        build: impl Fn(CryptoProvider) -> anyhow::Result<ServerConfig>,
    ) -> anyhow::Result<Self> {
        let mut aes = build(ordered(Bulk::Aes128))?;
        let mut chacha = build(ordered(Bulk::ChaCha20))?;
        chacha.session_storage = aes.session_storage.clone();
        for c in [&mut aes, &mut chacha] {
            c.ignore_client_order = true;
            c.ticketer = tickets.clone();
            c.send_tls13_tickets = 1;
        }
        Ok(Self {
            aes: Arc::new(aes),
            chacha: Arc::new(chacha),
        })
    }

    /// The config for a client that offered `suites`, in its order.
    pub fn for_client(&self, suites: &[CipherSuite]) -> Arc<ServerConfig> {
        let ours = &self.aes.crypto_provider().cipher_suites;
        let first = suites
            .iter()
            .find(|s| ours.iter().any(|o| o.suite() == **s));
        match first.map(|s| bulk(*s)) {
            Some(Bulk::ChaCha20) => self.chacha.clone(),
            _ => self.aes.clone(),
        }
    }
}

/// A suite's cipher, as far as its order goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bulk {
    Aes128,
    ChaCha20,
    Other,
}

fn bulk(s: CipherSuite) -> Bulk {
    match s {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Bulk::Aes128,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Bulk::ChaCha20,
        _ => Bulk::Other,
    }
}

/// The process's provider (ring) with its suites in the order `first`,
/// then the other of AES-128 and ChaCha20, then the rest (AES-256) as they
/// were; TLS 1.3's before TLS 1.2's.
fn ordered(first: Bulk) -> CryptoProvider {
    let mut provider = CryptoProvider::get_default()
        .map(|p| (**p).clone())
        .unwrap_or_else(rustls::crypto::ring::default_provider);
    let rank = |b: Bulk| match b {
        _ if b == first => 0,
        Bulk::Other => 2,
        _ => 1,
    };
    provider.cipher_suites.sort_by_key(|s| {
        (
            s.version().version != rustls::ProtocolVersion::TLSv1_3,
            rank(bulk(s.suite())),
        )
    });
    provider
}
