//! TLS configuration: loading PEM files and building rustls configs.

pub use fleetgate_api::tls::{client_config, install_crypto_provider, load_certs, load_key};

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::server::{ProducesTickets, WebPkiClientVerifier};
use rustls::{CipherSuite, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;

pub fn root_store(ca: &CertificateDer<'static>) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).context("adding the root CA")?;
    Ok(Arc::new(roots))
}

/// The admin API's server config: our server certificate; client
/// certificates are verified against the root, and the issuing CA as a
/// trust anchor too (as on MQTT), so a leaf sent without its chain (what
/// EST's `simpleenroll` returns) is taken; and a request without one is
/// refused by the API with a clear error rather than a bare handshake
/// failure.
pub fn api_server_config(
    anchors: &[CertificateDer<'static>],
    cert: &Path,
    key: &Path,
) -> anyhow::Result<Arc<ServerConfig>> {
    let mut roots = RootCertStore::empty();
    for a in anchors {
        roots.add(a.clone()).context("adding a trust anchor")?;
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .context("building the client certificate verifier")?;
    let mut config = ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("server certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The listeners' TLS configs, rebuilt from the data dir on demand and
/// published through `watch` channels: each accept borrows the current one,
/// so a renewed server certificate applies to the next handshake and open
/// connections are left alone.
#[derive(Debug)]
pub struct ServerTls {
    /// Where the files are, and the CA (whose root and issuing CA
    /// generations are the API's client trust anchors).
    auth: Arc<provisioning::Authority>,
    mqtt_verifier: Arc<crate::mqtt::admission::RegistryVerifier>,
    api: tokio::sync::watch::Sender<Arc<ServerConfig>>,
    mqtt: tokio::sync::watch::Sender<Arc<MqttTls>>,
    /// The MQTT listener's session tickets' keys, kept across reloads.
    tickets: Arc<dyn ProducesTickets>,
}

impl ServerTls {
    pub fn load(
        auth: &Arc<provisioning::Authority>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        let mqtt_verifier = Arc::new(
            crate::mqtt::admission::RegistryVerifier::new(auth.clone(), metrics)
                .context("building the MQTT client verifier")?,
        );
        let tickets = rustls::crypto::ring::Ticketer::new().context("session ticket keys")?;
        let (api, mqtt) = build(&auth.paths, &anchors(auth), &mqtt_verifier, &tickets)?;
        Ok(Self {
            auth: auth.clone(),
            mqtt_verifier,
            api: tokio::sync::watch::channel(api).0,
            mqtt: tokio::sync::watch::channel(mqtt).0,
            tickets,
        })
    }

    pub fn api(&self) -> tokio::sync::watch::Receiver<Arc<ServerConfig>> {
        self.api.subscribe()
    }

    pub fn mqtt(&self) -> tokio::sync::watch::Receiver<Arc<MqttTls>> {
        self.mqtt.subscribe()
    }

    /// The MQTT listener's certificate verifier (and trust).
    pub fn mqtt_verifier(&self) -> Arc<crate::mqtt::admission::RegistryVerifier> {
        self.mqtt_verifier.clone()
    }

    /// Rebuilds the MQTT trust anchors after manufacturers changed; the next
    /// handshake sees them.
    pub fn reload_trust(&self) -> anyhow::Result<()> {
        self.mqtt_verifier.reload()
    }

    /// Rebuilds both configs from the files (and the MQTT trust from the
    /// CA); on error the old ones stay.
    pub fn reload(&self) -> anyhow::Result<()> {
        self.mqtt_verifier.reload()?;
        let (api, mqtt) = build(
            &self.auth.paths,
            &anchors(&self.auth),
            &self.mqtt_verifier,
            &self.tickets,
        )?;
        self.api.send_replace(api);
        self.mqtt.send_replace(mqtt);
        tracing::info!("reloaded the server certificate");
        Ok(())
    }
}

/// The API's client trust anchors: the root and every issuing CA
/// generation (an admin's certificate may come from an earlier one).
fn anchors(auth: &provisioning::Authority) -> Vec<CertificateDer<'static>> {
    let mut all = vec![auth.ca.root_der().clone()];
    all.extend(auth.ca.issuing_all().iter().map(|g| g.der.clone()));
    all
}

fn build(
    paths: &provisioning::ca::Paths,
    anchors: &[CertificateDer<'static>],
    mqtt_verifier: &Arc<crate::mqtt::admission::RegistryVerifier>,
    tickets: &Arc<dyn ProducesTickets>,
) -> anyhow::Result<(Arc<ServerConfig>, Arc<MqttTls>)> {
    let api = api_server_config(anchors, &paths.server_cert(), &paths.server_key())?;
    let mqtt = MqttTls::new(tickets, |provider| {
        ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_client_cert_verifier(mqtt_verifier.clone())
            .with_single_cert(
                load_certs(&paths.server_cert())?,
                load_key(&paths.server_key())?,
            )
            .context("server certificate and key")
    })?;
    Ok((api, Arc::new(mqtt)))
}

/// The MQTT listener's TLS: the server's own cipher suite order, one of
/// two, chosen at each ClientHello ([`MqttTls::for_client`]).
///
/// AES-128-GCM first: TLS 1.3's mandatory suite, as strong as the P-256
/// keys every certificate here has (128-bit), and cheaper than
/// AES-256-GCM-SHA384 at both ends: its key schedule and transcript hash
/// are SHA-256, which CPUs do in hardware, where SHA-384 is software, and
/// each record is 10 AES rounds, not 14. Clients (rustls, OpenSSL, mbedTLS)
/// ask for AES-256 first, so the server's order decides, as AWS IoT's
/// and Go's do. A client whose first choice is ChaCha20-Poly1305 says it
/// has no AES in hardware (BoringSSL and Go read it so too): it gets
/// ChaCha20. A client that offers only AES-256 still gets it.
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
