//! TLS configuration: loading PEM files and building rustls configs.

pub use fleetgate_api::tls::{client_config, install_crypto_provider, load_certs, load_key};

use std::sync::Arc;

use anyhow::Context;
use rustls::server::{ProducesTickets, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::mqtt_tls::MqttTls;

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
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
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
        .with_single_cert(certs, key)
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
    // Read once for the API's config and both of the MQTT listener's: the
    // same certificate in each, even if a renewal replaces the files
    // meanwhile.
    let certs = load_certs(&paths.server_cert())?;
    let key = load_key(&paths.server_key())?;
    let api = api_server_config(anchors, certs.clone(), key.clone_key())?;
    let mqtt = MqttTls::new(tickets, |provider| {
        ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_client_cert_verifier(mqtt_verifier.clone())
            .with_single_cert(certs.clone(), key.clone_key())
            .context("server certificate and key")
    })?;
    Ok((api, Arc::new(mqtt)))
}
