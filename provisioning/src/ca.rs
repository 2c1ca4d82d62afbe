//! The certificate authority and its data dir.
//!
//! ```text
//! fleetgate-data/            0700
//!   fleetgate.json           written last: its presence means "complete"
//!   ca.crt                   the root: what clients trust
//!   ca/root.key              0600
//!   ca/issuing.crt           the issuing CA (signed by the root)
//!   ca/issuing.key           0600
//!   server.crt, server.key   the listeners' certificate (+ issuing CA), 0600 key
//!   admin.crt, admin.key     the first operator's credentials, 0600 key
//!   ocsp/signer.crt, .key    the delegated OCSP responder (made on demand,
//!                            renewed a week before it expires), 0600 key
//!   cmp/signer.crt, .key     the CMP signer that protects CMP responses
//!                            (made and renewed the same way), 0600 key
//!   ca/manufacturers/<name>.crt, .key
//!                            manufacturer CAs fleetgate issued, 0600 key
//!   registry/                sled
//! ```
//!
//! A dir with files but no `fleetgate.json` is a start-up that was interrupted:
//! we refuse it rather than make a second CA over the first. Opening and
//! creating it is [`crate::authority`]; where each key is kept (a file, or
//! a token named by `<key>.uri`), [`crate::keys`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::csr::ValidatedCsr;
use crate::files::read_cert;
pub(crate) use crate::files::{mkdir_private, MARKER};
pub use crate::files::{write_file, Paths};
use crate::id::{fingerprint, Identity};
use crate::keys::{self, CaKey, Custody, Pin};
use crate::{Error, Serial};

/// A certificate a CRL lists: revoked, or on hold while its device is
/// suspended (`reason` None means certificateHold).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub serial: Serial,
    pub at: OffsetDateTime,
    pub reason: Option<crate::lifecycle::RevocationReason>,
}

/// Lifetimes of what the CA makes for itself.
pub(crate) const ROOT_LIFETIME: Duration = Duration::days(20 * 365);
pub(crate) const ISSUING_LIFETIME: Duration = Duration::days(10 * 365);
pub(crate) const SERVER_LIFETIME: Duration = Duration::days(365);
pub(crate) const ADMIN_LIFETIME: Duration = Duration::days(2 * 365);
/// A server certificate closer than this to expiry is renewed at start-up.
pub(crate) const SERVER_RENEW_BEFORE: Duration = Duration::days(30);
/// Backdating of `not_before`, for devices whose clocks run a little slow.
pub(crate) const CLOCK_SKEW: Duration = Duration::minutes(5);

/// The default lifetime of a device certificate.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::days(90);

/// The name of the first operator, made at init.
pub const FIRST_ADMIN: &str = "admin";

/// Options for opening (and, the first time, creating) a data dir.
#[derive(Clone, Debug, Default)]
pub struct InitOptions {
    /// Extra SANs for the server certificate, beyond localhost and 127.0.0.1.
    pub server_sans: Vec<String>,
    /// The public base URL of the OCSP/CRL service (`http://host:port`),
    /// written into issued certificates' AIA and CRL Distribution Points.
    pub status_url: Option<String>,
    /// Where the registry lives: `None` for the embedded sled registry in
    /// the data dir; a shared store (etcd) for a node of a cluster, whose
    /// devices' MQTT sessions stay in the data dir.
    pub store: Option<std::sync::Arc<dyn crate::store::Store>>,
    /// Where new CA and signer keys are made (files, or a PKCS#11 token).
    pub custody: Custody,
    /// The PIN of the token the data dir's keys are in, if any.
    pub pin: Option<Pin>,
    /// At creation only: keep the root offline, its key (and a copy of its
    /// certificate) in this dir and nowhere in the data dir.
    pub root_out: Option<PathBuf>,
    /// At creation with `root_out`: make the root's key in this token
    /// object instead of a file there.
    pub root_custody: Custody,
    /// The bound on the data dir's sled page cache (the registry, or a
    /// cluster node's MQTT sessions); sled's default (1 GiB) if `None`.
    pub cache_bytes: Option<u64>,
}

/// A certificate the CA just issued.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub serial: Serial,
    pub der: Vec<u8>,
    /// The leaf, then the issuing CA: what a client presents.
    pub chain_pem: String,
    pub issuer: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub fingerprint: String,
    /// The manufacturer whose CA signed it; `None` for fleetgate's own.
    pub manufacturer: Option<String>,
}

impl IssuedCert {
    /// Its key in the registry.
    pub fn key(&self) -> crate::CertKey {
        crate::CertKey::new(
            self.manufacturer.as_deref(),
            &self.issuer,
            self.serial.clone(),
        )
    }
}

/// A CA that signs: its key, its certificate, and the name certificates it
/// signs carry as issuer.
pub struct Signer {
    pub(crate) issuer: Issuer<'static, CaKey>,
    pub der: CertificateDer<'static>,
    pub pem: String,
    /// Subject, RFC 4514: what [`IssuedCert::issuer`] records.
    pub name: String,
    /// The name in status URLs (`/crl/<crl_name>.crl`).
    pub crl_name: String,
    pub manufacturer: Option<String>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Signer")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// From a CA certificate and its key, checking that they match.
    pub fn new(
        der: CertificateDer<'static>,
        pem: String,
        key: CaKey,
        crl_name: &str,
        manufacturer: Option<String>,
    ) -> Result<Self, Error> {
        let (_, parsed) = X509Certificate::from_der(&der)
            .map_err(|e| Error::Certificate(format!("CA certificate does not parse: {e}")))?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::Certificate(
                "CA key does not match its certificate".into(),
            ));
        }
        let name = parsed.subject().to_string();
        let issuer =
            Issuer::from_ca_cert_der(&der, key).map_err(|e| Error::Certificate(e.to_string()))?;
        Ok(Self {
            issuer,
            der,
            pem,
            name,
            crl_name: crl_name.to_owned(),
            manufacturer,
        })
    }

    pub fn key(&self) -> &CaKey {
        self.issuer.key()
    }
}

/// The issuing side of the CA.
pub struct Ca {
    pub(crate) root_der: CertificateDer<'static>,
    pub(crate) root_pem: String,
    /// The root's key where it is online (the default data dir); `None`
    /// where the root is kept offline and signs only at ceremonies.
    pub(crate) root: Option<Signer>,
    /// The issuing CA generations, newest first (see [`crate::rollover`]).
    pub(crate) issuing: std::sync::RwLock<Arc<Vec<Arc<Signer>>>>,
    pub(crate) status_url: Option<String>,
    /// Whether this node's clock may date certificates.
    pub(crate) clock: crate::clock::ClockTrust,
}

/// The name of fleetgate's own issuing CA in status URLs (`/crl/issuing.crl`).
pub const ISSUING_CRL_NAME: &str = "issuing";
/// The root's CRL (`/crl/root.crl`): it lists revoked manufacturer CAs.
pub const ROOT_CRL_NAME: &str = "root";

/// How long a delegated signer (OCSP, CMP) certificate lasts.
pub(crate) const SIGNER_LIFETIME: Duration = Duration::days(30);
/// A delegated signer is renewed when it has less than this left.
pub const OCSP_SIGNER_RENEW_BEFORE: Duration = Duration::days(7);
/// CRLs are valid this long; re-signed on every change and at least daily.
pub const CRL_VALIDITY: Duration = Duration::days(2);

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("Ca")
            .field("issuer", &self.issuing().name)
            .finish_non_exhaustive()
    }
}

/// What a certificate says about its holder, read without trusting it: the
/// caller verifies the chain first.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub identity: Option<Identity>,
    pub serial: Serial,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub fingerprint: String,
    pub is_ca: bool,
    /// The subject's common name, if it has one.
    pub common_name: Option<String>,
    /// The issuer's name, RFC 4514.
    pub issuer: String,
    /// Whether a key usage extension is present without digitalSignature
    /// (such a key may not sign a TLS handshake).
    pub lacks_digital_signature: bool,
    /// Whether an extended key usage extension names clientAuth. (webpki
    /// accepts a certificate with no EKU at all for any purpose; fleetgate
    /// asks for clientAuth by name.)
    pub client_auth: bool,
}

/// The first common name of a distinguished name, if it is a string.
pub fn common_name<'a>(name: &'a x509_parser::x509::X509Name<'_>) -> Option<&'a str> {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
}

/// Reads identity and serial from a DER certificate.
pub fn inspect_certificate(der: &[u8]) -> Result<CertInfo, Error> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::Certificate(format!("does not parse: {e}")))?;
    let mut identity = None;
    let mut is_ca = false;
    let mut lacks_digital_signature = false;
    let mut client_auth = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                identity = san.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(uri) => Identity::from_uri(uri),
                    _ => None,
                });
            }
            ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
            ParsedExtension::KeyUsage(ku) => lacks_digital_signature = !ku.digital_signature(),
            ParsedExtension::ExtendedKeyUsage(eku) => client_auth = eku.client_auth,
            _ => {}
        }
    }
    Ok(CertInfo {
        common_name: common_name(cert.subject()).map(str::to_owned),
        issuer: cert.issuer().to_string(),
        lacks_digital_signature,
        client_auth,
        identity,
        serial: Serial::from_bytes(cert.raw_serial())?,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        fingerprint: fingerprint(der),
        is_ca,
    })
}

impl Ca {
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }
    /// The current issuing CA's subject, RFC 4514: the issuer of what it
    /// signs.
    pub fn issuing_name(&self) -> String {
        self.issuing().name.clone()
    }
    pub fn issuing_der(&self) -> CertificateDer<'static> {
        self.issuing().der.clone()
    }
    pub fn issuing_pem(&self) -> String {
        self.issuing().pem.clone()
    }
    /// Every issuing CA generation, newest first: the first signs, all
    /// validate.
    pub fn issuing_all(&self) -> Arc<Vec<Arc<Signer>>> {
        self.issuing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
    /// The issuing CA generation called `name` (RFC 4514), if it is one.
    pub fn issuing_named(&self, name: &str) -> Option<Arc<Signer>> {
        self.issuing_all().iter().find(|s| s.name == name).cloned()
    }
    /// The first generation: what the bus seal's key comes from, so that a
    /// rollover does not change it under a running cluster.
    pub fn first_issuing(&self) -> Arc<Signer> {
        let all = self.issuing_all();
        all.last().cloned().unwrap_or_else(|| self.issuing())
    }
    pub(crate) fn set_issuing(&self, all: Vec<Arc<Signer>>) {
        *self
            .issuing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(all);
    }
    /// The root, to sign `what`: refused where the root is offline, with
    /// the ceremony command that does it instead.
    pub fn root(&self, what: &str, ceremony: &str) -> Result<&Signer, Error> {
        self.root.as_ref().ok_or_else(|| Error::RootOffline {
            what: what.to_owned(),
            ceremony: ceremony.to_owned(),
        })
    }

    /// The public base URL of the status service, if configured.
    pub fn status_url(&self) -> Option<&str> {
        self.status_url.as_deref()
    }

    /// Refuses `cert` (`what`, back from a root ceremony) unless this root
    /// signed it and it is a CA with pathLen 0; `hint` follows the latter
    /// refusal.
    pub(crate) fn check_root_issued(
        &self,
        cert: &X509Certificate<'_>,
        what: &str,
        hint: &str,
    ) -> Result<(), Error> {
        let (_, root) = X509Certificate::from_der(self.root_der())
            .map_err(|e| Error::Certificate(e.to_string()))?;
        let bad = |why: String| Error::InvalidInput {
            reason: format!("{what}: {why}"),
        };
        if cert.issuer() != root.subject()
            || cert.verify_signature(Some(root.public_key())).is_err()
        {
            return Err(bad("not signed by this CA's root".into()));
        }
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca && bc.value.path_len_constraint == Some(0) => Ok(()),
            _ => Err(bad(format!("not a CA with pathLen 0{hint}"))),
        }
    }

    /// Whether the root's key is online here.
    pub fn root_online(&self) -> bool {
        self.root.is_some()
    }

    /// Whether this node's clock may date certificates: set by what
    /// compares it with the cluster's.
    pub fn clock(&self) -> &crate::clock::ClockTrust {
        &self.clock
    }

    /// The current issuing CA: what signs new certificates.
    pub fn issuing(&self) -> Arc<Signer> {
        self.issuing_all()
            .first()
            .cloned()
            .expect("a CA has at least one issuing CA generation")
    }

    /// Issues a certificate for a verified CSR's key to `identity`.
    pub fn issue_for_csr(
        &self,
        csr: &ValidatedCsr,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<IssuedCert, Error> {
        self.issue(&csr.public_key, identity, lifetime)
    }

    /// Issues a client certificate: CN = id, SAN URI `urn:fleetgate:<role>:<id>`,
    /// EKU clientAuth only, random 20-octet serial.
    pub fn issue(
        &self,
        key: &impl PublicKeyData,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<IssuedCert, Error> {
        self.issue_by(None, key, identity, lifetime)
    }

    /// [`Ca::issue`], signed by `signer` (a manufacturer's CA), or by the
    /// issuing CA without one.
    pub fn issue_by(
        &self,
        signer: Option<&Signer>,
        key: &impl PublicKeyData,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<IssuedCert, Error> {
        self.clock.check()?;
        let current = self.issuing();
        let signer = signer.unwrap_or(&current);
        if lifetime <= Duration::ZERO {
            return Err(Error::InvalidInput {
                reason: "certificate lifetime must be positive".into(),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.id.as_str());
        params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if let Some(url) = &self.status_url {
            params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
                uris: vec![format!("{url}/crl/{}.crl", signer.crl_name)],
            }];
            params.custom_extensions = vec![aia_ocsp(url)];
        }
        sign_leaf(signer, params, key, lifetime)
    }

    /// A manufacturer's intermediate CA, signed by the root: pathLen 0, EKU
    /// clientAuth only, and name constraints that exclude every DNS name and
    /// IP address, so it can never vouch for a server.
    pub fn issue_manufacturer_ca(
        &self,
        key: &impl PublicKeyData,
        name: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, Error> {
        self.clock.check()?;
        let params = manufacturer_ca_params(name, self.status_url.as_deref());
        let root = self.root(
            "issuing a manufacturer CA",
            "fleetgate manufacturer create NAME --root-dir ROOTDIR",
        )?;
        // The CA alone, not a chain: what the factory's tools take as -CA.
        let mut cert = sign(root, params, key, lifetime)?;
        cert.manufacturer = Some(name.to_owned());
        Ok(cert)
    }

    /// The delegated OCSP responder certificate: EKU OCSPSigning and
    /// id-pkix-ocsp-nocheck, signed by the issuing CA.
    pub(crate) fn issue_ocsp_signer(&self, key: &impl PublicKeyData) -> Result<IssuedCert, Error> {
        let params = ocsp_responder_params("fleetgate OCSP responder");
        sign_leaf(&self.issuing(), params, key, SIGNER_LIFETIME)
    }

    /// The CMP signer's certificate (RFC 9483 3.1: responses are signed
    /// by a key the issuing CA certifies): EKU id-kp-cmcRA, signed by the
    /// issuing CA.
    pub(crate) fn issue_cmp_signer(&self, key: &impl PublicKeyData) -> Result<IssuedCert, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "fleetgate CMP signer");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(vec![
            1, 3, 6, 1, 5, 5, 7, 3, 28,
        ])];
        sign_leaf(&self.issuing(), params, key, SIGNER_LIFETIME)
    }

    /// A CRL for the issuing CA listing `listed`, numbered `number`.
    pub fn crl(&self, listed: &[Listed], number: u64) -> Result<Vec<u8>, Error> {
        crl(&self.issuing(), listed, number)
    }
}

/// A CRL signed by `signer` listing `listed`, numbered `number`.
pub fn crl(signer: &Signer, listed: &[Listed], number: u64) -> Result<Vec<u8>, Error> {
    crl_valid_for(signer, listed, number, CRL_VALIDITY)
}

/// [`crl`], valid for `validity` (a root's, signed at a ceremony, lasts).
pub fn crl_valid_for(
    signer: &Signer,
    listed: &[Listed],
    number: u64,
    validity: Duration,
) -> Result<Vec<u8>, Error> {
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let params = rcgen::CertificateRevocationListParams {
        this_update: now,
        next_update: now + validity,
        crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: listed
            .iter()
            .map(|l| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(l.serial.as_bytes()),
                revocation_time: l.at,
                reason_code: Some(match l.reason {
                    None => rcgen::RevocationReason::CertificateHold,
                    Some(r) => rcgen_reason(r),
                }),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&signer.issuer)?.der().to_vec())
}

/// What a delegated OCSP responder's certificate says: `cn`, EKU
/// OCSPSigning and id-pkix-ocsp-nocheck (dates are set when it is signed).
pub(crate) fn ocsp_responder_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::OcspSigning];
    // id-pkix-ocsp-nocheck, value NULL.
    params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        &[1, 3, 6, 1, 5, 5, 7, 48, 1, 5],
        vec![0x05, 0x00],
    )];
    params
}

/// What a manufacturer CA says (dates are set when it is signed).
pub fn manufacturer_ca_params(name: &str, status_url: Option<&str>) -> CertificateParams {
    let mut params = ca_params(
        &format!("{name} manufacturer CA"),
        0,
        OffsetDateTime::now_utc(),
        Duration::ZERO,
    );
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.name_constraints = Some(rcgen::NameConstraints {
        permitted_subtrees: vec![],
        excluded_subtrees: vec![
            rcgen::GeneralSubtree::DnsName(String::new()),
            rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4([0; 4], [0; 4])),
            rcgen::GeneralSubtree::IpAddress(rcgen::CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    if let Some(url) = status_url {
        params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
            uris: vec![format!("{url}/crl/{ROOT_CRL_NAME}.crl")],
        }];
        params.custom_extensions = vec![aia_ocsp(url)];
    }
    params
}

/// Signs a leaf: its chain is the leaf then `signer`'s certificate.
pub(crate) fn sign_leaf(
    signer: &Signer,
    params: CertificateParams,
    key: &impl PublicKeyData,
    lifetime: Duration,
) -> Result<IssuedCert, Error> {
    let mut cert = sign(signer, params, key, lifetime)?;
    cert.chain_pem.push_str(&signer.pem);
    Ok(cert)
}

/// Signs `params` for `key` with `signer`: a random 20-octet serial, dates
/// from now (backdated for slow clocks) for `lifetime`, an authority key
/// identifier. `chain_pem` is the certificate alone.
pub(crate) fn sign(
    signer: &Signer,
    mut params: CertificateParams,
    key: &impl PublicKeyData,
    lifetime: Duration,
) -> Result<IssuedCert, Error> {
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let serial = Serial::random()?;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(serial.as_bytes()));
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + lifetime;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(key, &signer.issuer)?;
    let der = cert.der().to_vec();
    Ok(IssuedCert {
        fingerprint: fingerprint(&der),
        chain_pem: cert.pem(),
        serial,
        der,
        issuer: signer.name.clone(),
        not_before: params.not_before,
        not_after: params.not_after,
        manufacturer: signer.manufacturer.clone(),
    })
}

impl Ca {
    pub(crate) fn issue_server(&self, key: &KeyPair, sans: &[String]) -> Result<IssuedCert, Error> {
        let mut params = CertificateParams::new(sans.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "fleetgate server");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sign_leaf(&self.issuing(), params, key, SERVER_LIFETIME)
    }
}

pub(crate) fn ca_params(
    cn: &str,
    path_len: u8,
    now: OffsetDateTime,
    lifetime: Duration,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "fleetgate");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now - CLOCK_SKEW;
    p.not_after = now + lifetime;
    p
}

/// What an issuing CA says: pathLen 0 under the root, and where a relying
/// party checks it (the root's OCSP answers and CRL).
pub fn issuing_ca_params(
    cn: &str,
    now: OffsetDateTime,
    status_url: Option<&str>,
) -> Result<CertificateParams, Error> {
    let mut issuing = ca_params(cn, 0, now, ISSUING_LIFETIME);
    issuing.serial_number = Some(rcgen::SerialNumber::from_slice(
        Serial::random()?.as_bytes(),
    ));
    issuing.use_authority_key_identifier_extension = true;
    if let Some(url) = status_url {
        issuing.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
            uris: vec![format!("{url}/crl/{ROOT_CRL_NAME}.crl")],
        }];
        issuing.custom_extensions = vec![aia_ocsp(url)];
    }
    Ok(issuing)
}

/// A CA certificate and its key (a file, or a token key its `.uri` names).
pub(crate) fn load_signer(
    cert: &Path,
    key: &Path,
    crl_name: &str,
    manufacturer: Option<String>,
    pin: Option<&Pin>,
) -> Result<Signer, Error> {
    let (der, pem) = read_cert(cert)?;
    let key_ = keys::load(key, pin)?;
    Signer::new(der, pem, key_, crl_name, manufacturer).map_err(|e| Error::DataDir {
        path: key.to_owned(),
        reason: e.to_string(),
    })
}

pub(crate) fn rcgen_reason(r: crate::RevocationReason) -> rcgen::RevocationReason {
    use crate::RevocationReason as R;
    match r {
        R::Unspecified => rcgen::RevocationReason::Unspecified,
        R::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
        R::CaCompromise => rcgen::RevocationReason::CaCompromise,
        R::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
        R::Superseded => rcgen::RevocationReason::Superseded,
        R::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
        R::PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
        R::AaCompromise => rcgen::RevocationReason::AaCompromise,
    }
}

/// Authority Information Access with one OCSP responder URL (RFC 5280
/// 4.2.2.1): SEQUENCE { SEQUENCE { id-ad-ocsp, [6] IA5String } }.
pub(crate) fn aia_ocsp(url: &str) -> rcgen::CustomExtension {
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = content.len();
        if n < 0x80 {
            out.push(n as u8);
        } else if n < 0x100 {
            out.extend_from_slice(&[0x81, n as u8]);
        } else {
            out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
        }
        out.extend_from_slice(content);
        out
    }
    const ID_AD_OCSP: [u8; 10] = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01];
    let mut access = ID_AD_OCSP.to_vec();
    access.extend(tlv(0x86, url.as_bytes()));
    let der = tlv(0x30, &tlv(0x30, &access));
    rcgen::CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 1, 1], der)
}
