//! Admission at the TLS handshake: a client certificate must chain to our
//! root (or to a manufacturer CA), be in date, have EKU clientAuth (webpki
//! checks all three), allow digitalSignature, name a fleetgate identity, and
//! be in good standing in the registry now. Each refusal becomes the
//! matching TLS alert and a log line with the reason.
//!
//! A certificate from a manufacturer CA that the registry has never seen is
//! registered here, just in time, as the manufacturer's policy says.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use provisioning::ca::{inspect_certificate, CertInfo};
use provisioning::manufacturer::{jit_identity, ManufacturerRecord, ManufacturerStatus};
use provisioning::{Authority, DeviceId, Error, Identity, Role, Standing};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};

use crate::metrics::{Metrics, Refusal};

/// What a client certificate may chain to, rebuilt when manufacturers change.
#[derive(Debug, Default)]
struct Trust {
    anchors: Vec<TrustAnchor<'static>>,
    /// SHA-256 of a manufacturer CA's SubjectPublicKeyInfo -> its name.
    manufacturers: HashMap<[u8; 32], DeviceId>,
}

/// Called after admission wrote to the registry (a just-in-time device).
pub type OnChange = Arc<dyn Fn() + Send + Sync>;

pub struct RegistryVerifier {
    /// Hints and handshake signatures; chains are verified below.
    webpki: Arc<dyn ClientCertVerifier>,
    auth: Arc<Authority>,
    trust: RwLock<Arc<Trust>>,
    metrics: Arc<Metrics>,
    on_change: OnChange,
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

impl RegistryVerifier {
    pub fn new(
        auth: Arc<Authority>,
        metrics: Arc<Metrics>,
        on_change: OnChange,
    ) -> anyhow::Result<Self> {
        // For hints and handshake signatures only.
        let mut roots = RootCertStore::empty();
        roots.add(auth.ca.root_der().clone())?;
        roots.add(auth.ca.issuing_der().clone())?;
        let v = Self {
            webpki: WebPkiClientVerifier::builder(Arc::new(roots)).build()?,
            auth,
            trust: RwLock::new(Arc::default()),
            metrics,
            on_change,
        };
        v.reload()?;
        Ok(v)
    }

    /// Rebuilds the trust anchors: the root, the issuing CA (for clients
    /// that send only their leaf) and every manufacturer CA, revoked ones
    /// included so that their devices are refused as revoked, by name.
    pub fn reload(&self) -> anyhow::Result<()> {
        let mut ders: Vec<CertificateDer<'static>> = vec![
            self.auth.ca.root_der().clone(),
            self.auth.ca.issuing_der().clone(),
        ];
        let mut manufacturers = HashMap::new();
        for m in self.auth.registry.manufacturers()? {
            let der = m.ca_der()?;
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| anyhow::anyhow!("manufacturer {} CA: {e}", m.name))?;
            manufacturers.insert(
                spki_hash(webpki::spki_for_anchor(&anchor).as_ref()),
                m.name.clone(),
            );
            ders.push(der);
        }
        let anchors = ders
            .iter()
            .map(|d| {
                webpki::anchor_from_trusted_cert(d)
                    .map(|a| a.to_owned())
                    .map_err(|e| anyhow::anyhow!("trust anchor: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        *self
            .trust
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(Trust {
            anchors,
            manufacturers,
        });
        Ok(())
    }

    fn trust(&self) -> Arc<Trust> {
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn refuse(&self, refusal: Refusal, err: CertificateError, detail: &str) -> rustls::Error {
        self.metrics.refused(refusal);
        tracing::warn!(
            reason = refusal.as_str(),
            detail,
            "mqtt: refused at handshake"
        );
        rustls::Error::InvalidCertificate(err)
    }

    /// Verifies the chain; returns the manufacturer it runs through, if any.
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Option<DeviceId>, rustls::Error> {
        let trust = self.trust();
        let refuse = |e: webpki::Error| {
            let (refusal, err) = classify(&e);
            self.refuse(refusal, err, &e.to_string())
        };
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(refuse)?;
        let path = ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &trust.anchors,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map_err(refuse)?;
        let manufacturer = path
            .intermediate_certificates()
            .map(|c| spki_hash(c.subject_public_key_info().as_ref()))
            .chain(std::iter::once(spki_hash(
                webpki::spki_for_anchor(path.anchor()).as_ref(),
            )))
            .find_map(|h| trust.manufacturers.get(&h).cloned());
        Ok(manufacturer)
    }
}

/// The refusal reason and TLS alert for a webpki error.
fn classify(e: &webpki::Error) -> (Refusal, CertificateError) {
    use webpki::Error as W;
    match e {
        W::CertExpired { .. } => (Refusal::Expired, CertificateError::Expired),
        W::CertNotValidYet { .. } => (Refusal::NotYetValid, CertificateError::NotValidYet),
        W::UnknownIssuer => (Refusal::UnknownCa, CertificateError::UnknownIssuer),
        #[allow(deprecated)]
        W::RequiredEkuNotFound | W::RequiredEkuNotFoundContext(_) => {
            (Refusal::WrongUsage, CertificateError::InvalidPurpose)
        }
        W::InvalidSignatureForPublicKey => {
            (Refusal::BadCertificate, CertificateError::BadSignature)
        }
        // A CA certificate as a client, bad extensions, name constraints:
        // bad_certificate (not the vaguer certificate_unknown).
        _ => (Refusal::BadCertificate, CertificateError::BadEncoding),
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
        let manufacturer = self.verify_chain(end_entity, intermediates, now)?;
        let info = inspect_certificate(end_entity).map_err(|e| {
            self.refuse(
                Refusal::BadCertificate,
                CertificateError::BadEncoding,
                &e.to_string(),
            )
        })?;
        if info.lacks_digital_signature {
            return Err(self.refuse(
                Refusal::WrongUsage,
                CertificateError::InvalidPurpose,
                &format!(
                    "serial {}: key usage lacks digitalSignature, so the key may not sign",
                    info.serial
                ),
            ));
        }
        let (identity, manufacturer) = match &manufacturer {
            Some(m) => {
                let (identity, rec) = self.manufacturer_identity(m, &info)?;
                (identity, Some(rec))
            }
            None => {
                let identity = info.identity.clone().ok_or_else(|| {
                    self.refuse(
                        Refusal::BadCertificate,
                        CertificateError::BadEncoding,
                        "certificate names no fleetgate identity",
                    )
                })?;
                (identity, None)
            }
        };
        if identity.role == Role::Admin {
            return Err(self.refuse(
                Refusal::WrongIdentity,
                CertificateError::ApplicationVerificationFailure,
                "admin certificates are not MQTT identities",
            ));
        }
        let lookup = |r: Result<_, Error>| {
            r.map_err(|e| {
                tracing::error!(error = %e, "registry lookup failed");
                self.refuse(
                    Refusal::Internal,
                    CertificateError::ApplicationVerificationFailure,
                    "registry lookup failed",
                )
            })
        };
        let detail = |what: &str| {
            format!(
                "{} {} serial {}: {what}",
                identity.role, identity.id, info.serial
            )
        };
        let mut standing = lookup(
            self.metrics
                .registry_lookups
                .time(|| self.auth.registry.standing(&info.serial)),
        )?;
        if let (None, Some(rec)) = (&standing, &manufacturer) {
            standing = Some(self.register_jit(rec, &identity, &info, &detail)?);
        }
        match standing {
            None => Err(self.refuse(
                Refusal::UnknownSerial,
                CertificateError::BadEncoding,
                &detail("serial not in the registry"),
            )),
            Some((rec, _))
                if rec.device_id != identity.id
                    || rec.role != identity.role
                    || rec.fingerprint != info.fingerprint =>
            {
                Err(self.refuse(
                    Refusal::WrongIdentity,
                    CertificateError::BadEncoding,
                    &detail("certificate does not match the registry's record of its serial"),
                ))
            }
            Some((_, Standing::Good)) => {
                tracing::debug!(device.id = %identity.id, serial = %info.serial, "admitted");
                Ok(ClientCertVerified::assertion())
            }
            Some((_, Standing::Suspended)) => Err(self.refuse(
                Refusal::Suspended,
                CertificateError::Revoked,
                &detail("device is suspended"),
            )),
            Some((_, Standing::Pending)) => Err(self.refuse(
                Refusal::Pending,
                CertificateError::ApplicationVerificationFailure,
                &detail("device is pending an operator's approval (fleetgate device approve)"),
            )),
            Some((rec, Standing::Revoked(r))) => Err(self.refuse(
                Refusal::Revoked,
                CertificateError::Revoked,
                &detail(&match &rec.manufacturer {
                    Some(m) if r.reason == provisioning::RevocationReason::CaCompromise => {
                        format!("revoked ({}; manufacturer {m})", r.reason)
                    }
                    _ => format!("revoked ({})", r.reason),
                }),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
    /// The identity a manufacturer's certificate names (a device only), and
    /// the manufacturer, checked to be in good standing.
    fn manufacturer_identity(
        &self,
        m: &DeviceId,
        info: &CertInfo,
    ) -> Result<(Identity, ManufacturerRecord), rustls::Error> {
        let rec = match self.auth.registry.manufacturer(m.as_str()) {
            Ok(Some(rec)) if rec.status == ManufacturerStatus::Revoked => {
                return Err(self.refuse(
                    Refusal::Revoked,
                    CertificateError::Revoked,
                    &format!("serial {}: manufacturer {m} is revoked", info.serial),
                ))
            }
            Ok(Some(rec)) => rec,
            Ok(None) | Err(_) => {
                return Err(self.refuse(
                    Refusal::Internal,
                    CertificateError::ApplicationVerificationFailure,
                    &format!("manufacturer {m} is trusted but not in the registry"),
                ))
            }
        };
        let id = jit_identity(info).map_err(|e| {
            self.refuse(
                Refusal::WrongIdentity,
                CertificateError::BadEncoding,
                &format!("serial {} of manufacturer {m}: {e}", info.serial),
            )
        })?;
        Ok((
            Identity {
                role: Role::Device,
                id,
            },
            rec,
        ))
    }

    /// Registers a new device of manufacturer `rec` on its first connect.
    fn register_jit(
        &self,
        rec: &ManufacturerRecord,
        identity: &Identity,
        info: &CertInfo,
        detail: &dyn Fn(&str) -> String,
    ) -> Result<(provisioning::CertRecord, Standing), rustls::Error> {
        let internal = |e: Error| {
            tracing::error!(error = %e, "just-in-time registration failed");
            self.refuse(
                Refusal::Internal,
                CertificateError::ApplicationVerificationFailure,
                &detail("just-in-time registration failed"),
            )
        };
        let registered = match self.auth.register_jit(rec, &identity.id, info) {
            Ok(_) => true,
            // The id is taken: by this very certificate if the same device
            // connected twice at once, else by another.
            Err(Error::AlreadyExists { .. }) => false,
            Err(e) => return Err(internal(e)),
        };
        if registered {
            self.metrics
                .jit_registrations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (self.on_change)();
        }
        match self
            .auth
            .registry
            .standing(&info.serial)
            .map_err(internal)?
        {
            Some((c, s)) if c.fingerprint == info.fingerprint => Ok((c, s)),
            _ if registered => Err(internal(Error::Storage(
                "just-registered serial missing".into(),
            ))),
            _ => Err(self.refuse(
                Refusal::WrongIdentity,
                CertificateError::BadEncoding,
                &detail("a device with this id is already registered with another certificate"),
            )),
        }
    }
}
