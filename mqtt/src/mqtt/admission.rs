//! Who a client is, decided once per connection in two steps, as
//! linkerd2-proxy does it (TLS establishes identity; a check then runs
//! against policy):
//!
//! 1. **At the TLS handshake** ([`RegistryVerifier`]), with no IO: the
//!    certificate must chain to our root (or to a manufacturer CA
//!    registered with its own root), be in date, name EKU clientAuth,
//!    allow digitalSignature and name a fleetgate identity a client may
//!    use. Each refusal becomes the TLS alert [`certificate_error`] gives
//!    it and a log line with the reason. What it found (identity,
//!    certificate key, parsed certificate, manufacturer) is handed to
//!    this connection's task through a task-local slot
//!    ([`handshake`]): no map shared between connections, no second parse.
//! 2. **Before CONNACK** (`Shared::admit`), one registry read: the
//!    certificate and its device in good standing now (a manufacturer's
//!    new device registered just in time), refused with a CONNACK code.
//!
//! Manufacturer CAs fleetgate issued are intermediates under the root, so
//! webpki enforces their pathLen, validity and name constraints like any
//! relying party would; they are offered to path building alongside what
//! the client sent (a device may send its leaf alone). fleetgate's own
//! issuing CA is an anchor (one signature to verify for its devices). A
//! registered CA (the manufacturer's own root) is a trust anchor, and
//! webpki checks nothing about an anchor itself: its validity and pathLen
//! are checked here.
//!
//! A resumed TLS session skips the verifier: its chain (as the client sent
//! it the first time) is checked again, the same way, after the handshake.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use provisioning::ca::{inspect_certificate, CertInfo};
use provisioning::manufacturer::{jit_identity, CaKind};
use provisioning::{Authority, CertKey, DeviceId, Identity, Role, Standing};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::recent::Recent;
use super::signatures::SignatureCache;
use crate::metrics::{Metrics, Refusal};

/// A registered manufacturer CA, used as a trust anchor: what webpki does
/// not check about anchors.
#[derive(Debug)]
struct AnchorLimits {
    name: DeviceId,
    not_before: u64,
    not_after: u64,
    /// basicConstraints pathLenConstraint: CAs allowed below it.
    path_len: Option<u32>,
}

/// What a client certificate may chain to, rebuilt when manufacturers change.
#[derive(Debug, Default)]
struct Trust {
    /// The root, the issuing CA, and registered manufacturer CAs.
    anchors: Vec<TrustAnchor<'static>>,
    /// The manufacturer CAs the root issued.
    intermediates: Vec<CertificateDer<'static>>,
    /// SHA-256 of a manufacturer CA's SubjectPublicKeyInfo -> its name.
    manufacturers: HashMap<[u8; 32], DeviceId>,
    /// Registered CAs by SPKI hash.
    registered: HashMap<[u8; 32], AnchorLimits>,
}

pub struct RegistryVerifier {
    /// Hints and handshake signatures; chains are verified below.
    webpki: Arc<dyn ClientCertVerifier>,
    auth: Arc<Authority>,
    trust: RwLock<Arc<Trust>>,
    metrics: Arc<Metrics>,
    /// Chain signatures verified once ([`super::signatures`]).
    signatures: SignatureCache,
    /// Certificates parsed once, by the SHA-256 of their DER: what a
    /// certificate says does not change, and a device presents the same
    /// one at every connect.
    certificates: Recent<[u8; 32], Arc<CertInfo>>,
}

/// Chain signatures remembered, at most: a device's certificate is one (a
/// manufacturer's device's, two); 32 bytes each and the set's own.
const SIGNATURES_KEPT: usize = 1 << 16;

/// Parsed certificates remembered, at most: a connected device's is held
/// by its session anyway (the same `Arc`); a few hundred bytes for one
/// that left.
const CERTIFICATES_KEPT: usize = 1 << 16;

/// What the handshake established about a client: the certificate parsed
/// once, the identity it names, its registry key, and the manufacturer
/// whose CA its chain runs through, if any.
#[derive(Clone, Debug)]
pub struct Verified {
    pub identity: Identity,
    pub key: CertKey,
    pub info: Arc<CertInfo>,
    pub manufacturer: Option<DeviceId>,
}

/// The handshake a connection's task is running, as its verifier sees it.
struct Handshake {
    /// Whom a refusal names (a field of its log line rather than a span
    /// around the handshake: a span costs every connect its creation and
    /// an entry and exit on each poll).
    peer: std::net::SocketAddr,
    /// What the verifier found.
    verified: Option<Verified>,
    /// Whether the handshake is TLS 1.2 (the client's CertificateVerify
    /// came as TLS 1.2's).
    tls12: bool,
}

tokio::task_local! {
    /// The handshake this task is running.
    static HANDSHAKE: RefCell<Handshake>;
}

/// Runs a TLS handshake (`accept`) from `peer` so that what the verifier
/// finds comes back with it: the connection's own slot, not a map shared
/// by all. `None` if the verifier did not run (a resumed session) or
/// refused.
pub async fn handshake<F: std::future::Future>(
    peer: std::net::SocketAddr,
    accept: F,
) -> (F::Output, Option<Verified>) {
    let slot = RefCell::new(Handshake {
        peer,
        verified: None,
        tls12: false,
    });
    HANDSHAKE
        .scope(slot, async {
            let out = accept.await;
            (out, HANDSHAKE.with(|h| h.borrow_mut().verified.take()))
        })
        .await
}

/// Whether what the server writes now, in this task's handshake, may wait
/// for its next write: in TLS 1.3, once the verifier has taken the client's
/// certificate, what follows within the handshake is the session ticket
/// (or an alert), which no client waits for before its CONNECT, and which
/// [`super::conn::Conn`] sends with the CONNACK. Never in TLS 1.2: there
/// it is the server's Finished, which the client does wait for.
pub fn holds_writes() -> bool {
    HANDSHAKE
        .try_with(|h| {
            let h = h.borrow();
            h.verified.is_some() && !h.tls12
        })
        .unwrap_or(false)
}

impl std::fmt::Debug for RegistryVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryVerifier").finish_non_exhaustive()
    }
}

fn spki_hash(spki: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, spki).as_ref());
    out
}

/// The limits of a registered CA certificate.
fn anchor_limits(name: &DeviceId, der: &[u8]) -> anyhow::Result<AnchorLimits> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| anyhow::anyhow!("manufacturer {name} CA: {e}"))?;
    let secs = |t: i64| u64::try_from(t).unwrap_or(0);
    Ok(AnchorLimits {
        name: name.clone(),
        not_before: secs(cert.validity().not_before.timestamp()),
        not_after: secs(cert.validity().not_after.timestamp()),
        path_len: cert
            .basic_constraints()
            .ok()
            .flatten()
            .and_then(|bc| bc.value.path_len_constraint),
    })
}

impl RegistryVerifier {
    pub fn new(auth: Arc<Authority>, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        // For hints and handshake signatures only.
        let mut roots = RootCertStore::empty();
        roots.add(auth.ca.root_der().clone())?;
        let v = Self {
            webpki: WebPkiClientVerifier::builder(Arc::new(roots)).build()?,
            auth,
            trust: RwLock::new(Arc::default()),
            metrics,
            signatures: SignatureCache::new(SIGNATURES_KEPT),
            certificates: Recent::new(CERTIFICATES_KEPT),
        };
        v.reload()?;
        Ok(v)
    }

    /// Rebuilds the trust: the root and the issuing CA as anchors, every
    /// manufacturer CA the root issued as an intermediate, and registered
    /// manufacturer CAs as anchors with their limits. Revoked manufacturers
    /// are included so that their devices are refused as revoked, by name.
    pub fn reload(&self) -> anyhow::Result<()> {
        let anchor = |d: &CertificateDer<'_>| {
            webpki::anchor_from_trusted_cert(d)
                .map(|a| a.to_owned())
                .map_err(|e| anyhow::anyhow!("trust anchor: {e}"))
        };
        // The issuing CA is an anchor too: our own devices' chains then
        // verify with one signature, not two (a handshake's largest cost
        // after the key exchange).
        let mut trust = Trust {
            anchors: vec![anchor(self.auth.ca.root_der())?],
            ..Trust::default()
        };
        // Every issuing CA generation: after a rollover, devices of the
        // earlier ones still verify until their certificates run out.
        for g in self.auth.ca.issuing_all().iter() {
            trust.anchors.push(anchor(&g.der)?);
        }
        for m in self.auth.registry.manufacturers()? {
            let der = m.ca_der()?;
            let ca = anchor(&der)?;
            let spki = spki_hash(webpki::spki_for_anchor(&ca).as_ref());
            trust.manufacturers.insert(spki, m.name.clone());
            match m.kind {
                CaKind::Issued => trust.intermediates.push(der),
                CaKind::Registered => {
                    trust.registered.insert(spki, anchor_limits(&m.name, &der)?);
                    trust.anchors.push(ca);
                }
            }
        }
        *self
            .trust
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(trust);
        Ok(())
    }

    fn trust(&self) -> Arc<Trust> {
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The handshake's checks again, for a resumed TLS session (which
    /// skipped the verifier): the chain as the client sent it the first
    /// time, leaf first. Counts and logs a refusal.
    pub fn verify_again(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Verified, Refusal> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(Refusal::NoCertificate);
        };
        self.check(leaf, intermediates, now)
            .map_err(|(refusal, detail)| {
                let _ = self.refuse(refusal, &detail);
                refusal
            })
    }

    fn refuse(&self, refusal: Refusal, detail: &str) -> rustls::Error {
        self.metrics.refused(refusal);
        // Outside a handshake's task (a resumed session checked again),
        // the line has no address.
        let peer = HANDSHAKE.try_with(|h| h.borrow().peer).ok();
        tracing::warn!(
            peer.addr = peer.map(tracing::field::display),
            reason = refusal.as_str(),
            detail = %crate::printable(detail),
            "mqtt: refused at handshake"
        );
        rustls::Error::InvalidCertificate(certificate_error(refusal))
    }

    /// The manufacturer whose CA a verified chain runs through (`None`:
    /// fleetgate's own), or why the chain does not verify. Neither logs
    /// nor counts.
    fn path_manufacturer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Option<DeviceId>, (Refusal, String)> {
        let trust = self.trust();
        let webpki_error = |e: webpki::Error| (classify(&e), describe(&e));
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        // What the client sent first, then the CAs we know.
        let offered: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .cloned()
            .chain(trust.intermediates.iter().cloned())
            .collect();
        let algs = self.signatures.wrap(webpki::ALL_VERIFICATION_ALGS);
        let algs: Vec<&dyn SignatureVerificationAlgorithm> = algs
            .iter()
            .map(|a| a as &dyn SignatureVerificationAlgorithm)
            .collect();
        let path = ee
            .verify_for_usage(
                &algs,
                &trust.anchors,
                &offered,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(webpki_error)?;
        let anchor = spki_hash(webpki::spki_for_anchor(path.anchor()).as_ref());
        let below_anchor = path.intermediate_certificates().count();
        if let Some(limits) = trust.registered.get(&anchor) {
            let t = now.as_secs();
            if t > limits.not_after {
                return Err((
                    Refusal::Expired,
                    format!("manufacturer {}'s CA has expired", limits.name),
                ));
            }
            if t < limits.not_before {
                return Err((
                    Refusal::NotYetValid,
                    format!("manufacturer {}'s CA is not valid yet", limits.name),
                ));
            }
            if let Some(max) = limits.path_len.filter(|max| below_anchor > *max as usize) {
                return Err((Refusal::BadCertificate, format!(
                        "{below_anchor} CAs below manufacturer {}'s CA, whose pathLenConstraint allows {max}",
                        limits.name,
                    ),
                ));
            }
        }
        Ok(path
            .intermediate_certificates()
            .map(|c| spki_hash(c.subject_public_key_info().as_ref()))
            .chain(std::iter::once(anchor))
            .find_map(|h| trust.manufacturers.get(&h).cloned()))
    }
}

/// A webpki error in words for an operator, times in RFC 3339.
fn describe(e: &webpki::Error) -> String {
    use webpki::Error as W;
    let at = |t: &UnixTime| {
        i64::try_from(t.as_secs())
            .ok()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| format!("{}s after 1970", t.as_secs()))
    };
    match e {
        W::CertExpired { time, not_after } => format!(
            "the certificate expired at {} (it is {} here)",
            at(not_after),
            at(time)
        ),
        W::CertNotValidYet { time, not_before } => format!(
            "the certificate is valid from {} only (it is {} here)",
            at(not_before),
            at(time)
        ),
        W::UnknownIssuer => "its issuer is no CA this broker trusts (fleetgate's issuing CA, \
                             or a registered or issued manufacturer CA)"
            .to_owned(),
        #[allow(deprecated)]
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => {
            "its extended key usage does not allow client authentication".to_owned()
        }
        other => format!("{other}"),
    }
}

/// Who a refused certificate says it is: its subject and issuer, as far
/// as it parses.
fn presented(cert: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(cert.as_ref()) {
        Ok((_, c)) => format!(
            "subject \"{}\", issuer \"{}\", serial {}",
            c.subject(),
            c.issuer(),
            c.raw_serial_as_string()
        ),
        Err(_) => "a certificate that does not parse".to_owned(),
    }
}

/// The refusal reason for a webpki error.
fn classify(e: &webpki::Error) -> Refusal {
    use webpki::Error as W;
    match e {
        W::CertExpired { .. } => Refusal::Expired,
        W::CertNotValidYet { .. } => Refusal::NotYetValid,
        W::UnknownIssuer => Refusal::UnknownCa,
        #[allow(deprecated)]
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => Refusal::WrongUsage,
        // A bad signature, a CA certificate as a client, bad extensions,
        // name constraints, a path too long.
        _ => Refusal::BadCertificate,
    }
}

/// The one table from a refusal at the handshake to what rustls is told,
/// and so to the TLS alert the client gets (rustls maps each
/// `CertificateError` to one alert, `From<CertificateError> for
/// AlertDescription`): certificate_expired, unknown_ca,
/// unsupported_certificate, certificate_revoked (a suspension too: a hold,
/// as OCSP says), bad_certificate (not the vaguer certificate_unknown), and
/// access_denied for a valid certificate the registry does not let in.
pub fn certificate_error(r: Refusal) -> CertificateError {
    match r {
        Refusal::Expired => CertificateError::Expired,
        Refusal::NotYetValid => CertificateError::NotValidYet,
        Refusal::UnknownCa => CertificateError::UnknownIssuer,
        Refusal::WrongUsage => CertificateError::InvalidPurpose,
        Refusal::Revoked | Refusal::Suspended => CertificateError::Revoked,
        Refusal::BadCertificate | Refusal::UnknownSerial | Refusal::NoCertificate => {
            CertificateError::BadEncoding
        }
        Refusal::WrongIdentity
        | Refusal::Pending
        | Refusal::Internal
        | Refusal::Acl
        | Refusal::Protocol
        | Refusal::HandshakeTimeout
        | Refusal::RateLimited
        | Refusal::Overloaded
        | Refusal::JitRateLimited
        | Refusal::JitQuotaExceeded
        | Refusal::Quota => CertificateError::ApplicationVerificationFailure,
    }
}

impl ClientCertVerifier for RegistryVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified =
            self.check(end_entity, intermediates, now)
                .map_err(|(refusal, detail)| {
                    self.refuse(refusal, &format!("{detail}; {}", presented(end_entity)))
                })?;
        tracing::debug!(device.id = %verified.identity.id, serial = %verified.info.serial, "verified at handshake");
        // For this connection's task; outside one (a test calling the
        // verifier directly) there is nowhere to put it.
        let _ = HANDSHAKE.try_with(|h| h.borrow_mut().verified = Some(verified));
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // From here on the server writes its Finished: not held.
        let _ = HANDSHAKE.try_with(|h| h.borrow_mut().tls12 = true);
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

impl RegistryVerifier {
    /// Everything the handshake checks, without IO: the chain (and the
    /// manufacturer it runs through), the certificate's uses, the
    /// identity it names.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Verified, (Refusal, String)> {
        let manufacturer = self.path_manufacturer(end_entity, intermediates, now)?;
        let info = self.inspect(end_entity)?;
        if info.lacks_digital_signature {
            return Err((
                Refusal::WrongUsage,
                format!(
                    "serial {}: key usage lacks digitalSignature, so the key may not sign",
                    info.serial
                ),
            ));
        }
        if !info.client_auth {
            return Err((
                Refusal::WrongUsage,
                format!(
                    "serial {}: no extendedKeyUsage clientAuth (a client certificate must name it)",
                    info.serial
                ),
            ));
        }
        let identity = identity(manufacturer.as_ref(), &info)?;
        let key = CertKey::new(
            manufacturer.as_ref().map(DeviceId::as_str),
            &info.issuer,
            info.serial.clone(),
        );
        Ok(Verified {
            identity,
            key,
            info,
            manufacturer,
        })
    }

    /// What a certificate says ([`inspect_certificate`]), parsed once for
    /// each certificate seen lately. Only a certificate that parses is
    /// kept.
    fn inspect(&self, der: &CertificateDer<'_>) -> Result<Arc<CertInfo>, (Refusal, String)> {
        let mut digest = [0u8; 32];
        digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, der).as_ref());
        if let Some(info) = self.certificates.get(&digest) {
            return Ok(info);
        }
        let info = Arc::new(
            inspect_certificate(der).map_err(|e| (Refusal::BadCertificate, e.to_string()))?,
        );
        self.certificates.insert(digest, info.clone());
        Ok(info)
    }
}

/// The identity a certificate names: a manufacturer's may only name a
/// device (by URI or CN); ours name any role but admin (and node).
fn identity(
    manufacturer: Option<&DeviceId>,
    info: &CertInfo,
) -> Result<Identity, (Refusal, String)> {
    let identity = match manufacturer {
        Some(m) => Identity {
            role: Role::Device,
            id: jit_identity(info).map_err(|e| {
                (
                    Refusal::WrongIdentity,
                    format!("serial {} of manufacturer {m}: {e}", info.serial),
                )
            })?,
        },
        None => info.identity.clone().ok_or_else(|| {
            (
                Refusal::BadCertificate,
                "certificate names no fleetgate identity".to_owned(),
            )
        })?,
    };
    if matches!(identity.role, Role::Admin | Role::Node) {
        return Err((
            Refusal::WrongIdentity,
            format!("{} certificates are not MQTT identities", identity.role),
        ));
    }
    Ok(identity)
}

/// Why a registered certificate in `standing` may not connect, if it may
/// not: the refusal reason and the words for the log.
pub fn refusal_for(
    rec: &provisioning::CertRecord,
    standing: Standing,
) -> Option<(Refusal, String)> {
    match standing {
        Standing::Good => None,
        Standing::Suspended => Some((Refusal::Suspended, "device is suspended".into())),
        Standing::Pending => Some((
            Refusal::Pending,
            "device is pending an operator's approval (fleetgate device approve)".into(),
        )),
        Standing::Revoked(r) => Some((
            Refusal::Revoked,
            match rec.manufacturers().next() {
                Some(m) if r.reason == provisioning::RevocationReason::CaCompromise => {
                    format!("manufacturer {m} is revoked ({})", r.reason)
                }
                _ => format!("revoked ({})", r.reason),
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::AlertDescription as A;

    #[test]
    fn each_refusal_has_one_alert() {
        let alert = |r| A::from(certificate_error(r));
        // What a client sees for each reason (tests/tests/broker.rs checks
        // the same with real handshakes).
        assert_eq!(alert(Refusal::Expired), A::CertificateExpired);
        assert_eq!(alert(Refusal::NotYetValid), A::CertificateExpired);
        assert_eq!(alert(Refusal::UnknownCa), A::UnknownCA);
        assert_eq!(alert(Refusal::WrongUsage), A::UnsupportedCertificate);
        assert_eq!(alert(Refusal::Revoked), A::CertificateRevoked);
        assert_eq!(alert(Refusal::Suspended), A::CertificateRevoked);
        assert_eq!(alert(Refusal::BadCertificate), A::BadCertificate);
        assert_eq!(alert(Refusal::UnknownSerial), A::BadCertificate);
        // A wrong identity is one alert wherever it is found.
        assert_eq!(alert(Refusal::WrongIdentity), A::AccessDenied);
        assert_eq!(alert(Refusal::Pending), A::AccessDenied);
        assert_eq!(alert(Refusal::Internal), A::AccessDenied);
        for r in Refusal::ALL {
            // Every reason has its entry (the match is exhaustive); none
            // is the vague certificate_unknown.
            assert_ne!(alert(r), A::CertificateUnknown, "{r:?}");
        }
    }

    #[test]
    fn webpki_errors_are_classified_by_what_went_wrong() {
        use webpki::Error as W;
        assert_eq!(classify(&W::UnknownIssuer), Refusal::UnknownCa);
        assert_eq!(
            classify(&W::InvalidSignatureForPublicKey),
            Refusal::BadCertificate
        );
        assert_eq!(classify(&W::CaUsedAsEndEntity), Refusal::BadCertificate);
    }
}
