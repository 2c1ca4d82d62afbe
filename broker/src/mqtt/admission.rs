//! Admission at the TLS handshake: a client certificate must chain to our
//! root, be in date, have EKU clientAuth (webpki checks all three), name a
//! fleetgate device or service, and be in good standing in the registry now.
//! Each refusal becomes the matching TLS alert and a log line with the reason.

use std::sync::Arc;

use provisioning::ca::inspect_certificate;
use provisioning::{Registry, Role, Standing};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::metrics::{Metrics, Refusal};

#[derive(Debug)]
pub struct RegistryVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    registry: Registry,
    metrics: Arc<Metrics>,
}

impl RegistryVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        registry: Registry,
        metrics: Arc<Metrics>,
    ) -> Result<Self, rustls::server::VerifierBuilderError> {
        Ok(Self {
            webpki: WebPkiClientVerifier::builder(roots).build()?,
            registry,
            metrics,
        })
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
}

/// The refusal reason a webpki error stands for.
fn classify(e: &rustls::Error) -> Refusal {
    use CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => Refusal::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => Refusal::NotYetValid,
            C::UnknownIssuer => Refusal::UnknownCa,
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => Refusal::WrongUsage,
            C::Revoked => Refusal::Revoked,
            _ => Refusal::BadCertificate,
        },
        _ => Refusal::BadCertificate,
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
        if let Err(e) = self
            .webpki
            .verify_client_cert(end_entity, intermediates, now)
        {
            let refusal = classify(&e);
            self.metrics.refused(refusal);
            tracing::warn!(reason = refusal.as_str(), detail = %e, "mqtt: refused at handshake");
            // webpki's other refusals (a CA certificate as a client, bad
            // extensions) would go out as certificate_unknown: say bad_certificate.
            return Err(match e {
                rustls::Error::InvalidCertificate(CertificateError::Other(_)) => {
                    rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
                }
                e => e,
            });
        }
        let info = inspect_certificate(end_entity).map_err(|e| {
            self.refuse(
                Refusal::BadCertificate,
                CertificateError::BadEncoding,
                &e.to_string(),
            )
        })?;
        let Some(identity) = info.identity else {
            return Err(self.refuse(
                Refusal::BadCertificate,
                CertificateError::BadEncoding,
                "certificate names no fleetgate identity",
            ));
        };
        if identity.role == Role::Admin {
            return Err(self.refuse(
                Refusal::WrongIdentity,
                CertificateError::ApplicationVerificationFailure,
                "admin certificates are not MQTT identities",
            ));
        }
        let standing = self.registry.standing(&info.serial).map_err(|e| {
            tracing::error!(error = %e, "registry lookup failed");
            self.refuse(
                Refusal::Internal,
                CertificateError::ApplicationVerificationFailure,
                "registry lookup failed",
            )
        })?;
        let detail = |what: &str| {
            format!(
                "{} {} serial {}: {what}",
                identity.role, identity.id, info.serial
            )
        };
        match standing {
            None => Err(self.refuse(
                Refusal::UnknownSerial,
                CertificateError::BadEncoding,
                &detail("serial not in the registry"),
            )),
            Some((rec, _)) if rec.device_id != identity.id || rec.role != identity.role => {
                Err(self.refuse(
                    Refusal::WrongIdentity,
                    CertificateError::BadEncoding,
                    &detail("certificate identity does not match the registry"),
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
            Some((_, Standing::Revoked(r))) => Err(self.refuse(
                Refusal::Revoked,
                CertificateError::Revoked,
                &detail(&format!("revoked ({})", r.reason)),
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
