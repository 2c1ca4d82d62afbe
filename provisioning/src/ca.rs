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
//! we refuse it rather than make a second CA over the first.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::csr::ValidatedCsr;
pub use crate::files::write_file;
use crate::files::{check_private, io, read, read_cert};
use crate::id::{fingerprint, Identity};
use crate::keys::{self, CaKey, Custody, Pin};
use crate::registry::{NewDevice, Registry};
use crate::{DeviceId, Error, Role, Serial};

const FORMAT: u32 = 1;
const MARKER: &str = "fleetgate.json";

/// Lifetimes of what the CA makes for itself.
const ROOT_LIFETIME: Duration = Duration::days(20 * 365);
const ISSUING_LIFETIME: Duration = Duration::days(10 * 365);
const SERVER_LIFETIME: Duration = Duration::days(365);
const ADMIN_LIFETIME: Duration = Duration::days(2 * 365);
/// A server certificate closer than this to expiry is renewed at start-up.
const SERVER_RENEW_BEFORE: Duration = Duration::days(30);
/// Backdating of `not_before`, for devices whose clocks run a little slow.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// The default lifetime of a device certificate.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::days(90);

/// The name of the first operator, made at init.
pub const FIRST_ADMIN: &str = "admin";

/// Where everything lives inside a data dir.
#[derive(Clone, Debug)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn marker(&self) -> PathBuf {
        self.dir.join(MARKER)
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn root_key(&self) -> PathBuf {
        self.dir.join("ca/root.key")
    }
    pub fn issuing_cert(&self) -> PathBuf {
        self.dir.join("ca/issuing.crt")
    }
    pub fn issuing_key(&self) -> PathBuf {
        self.dir.join("ca/issuing.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn admin_cert(&self) -> PathBuf {
        self.dir.join("admin.crt")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin.key")
    }
    pub fn registry(&self) -> PathBuf {
        self.dir.join("registry")
    }
    pub fn ocsp_cert(&self) -> PathBuf {
        self.dir.join("ocsp/signer.crt")
    }
    pub fn ocsp_key(&self) -> PathBuf {
        self.dir.join("ocsp/signer.key")
    }
    /// The root's delegated OCSP responder, certified at a root ceremony
    /// (only where the root is offline).
    pub fn root_ocsp_cert(&self) -> PathBuf {
        self.dir.join("ocsp/root-signer.crt")
    }
    pub fn root_ocsp_key(&self) -> PathBuf {
        self.dir.join("ocsp/root-signer.key")
    }
    /// The root's CRL as signed at its last ceremony (where the root is
    /// offline).
    pub fn root_crl(&self) -> PathBuf {
        self.dir.join("ca/root.crl")
    }
    pub fn cmp_cert(&self) -> PathBuf {
        self.dir.join("cmp/signer.crt")
    }
    pub fn cmp_key(&self) -> PathBuf {
        self.dir.join("cmp/signer.key")
    }
    pub fn manufacturer_dir(&self) -> PathBuf {
        self.dir.join("ca/manufacturers")
    }
    pub fn manufacturer_cert(&self, name: &str) -> PathBuf {
        self.manufacturer_dir().join(format!("{name}.crt"))
    }
    pub fn manufacturer_key(&self, name: &str) -> PathBuf {
        self.manufacturer_dir().join(format!("{name}.key"))
    }
}

#[derive(Serialize, Deserialize)]
struct Marker {
    format: u32,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

/// The registry `opts` names, which must belong to this data dir's CA: a
/// shared registry records the first node's root, and a node with another
/// refuses to start (its devices' certificates would not verify anywhere
/// else). The CA's private keys never leave the data dir.
fn open_registry(paths: &Paths, opts: &InitOptions, ca: &Ca) -> Result<Registry, Error> {
    let registry = match &opts.store {
        None => Registry::open(&paths.registry())?,
        Some(store) => Registry::over(
            store.clone(),
            crate::sessions::SessionStore::open_at(&paths.registry())?,
        )?,
    };
    let root = ring::digest::digest(&ring::digest::SHA256, ca.root_pem().trim().as_bytes());
    let root: String = root.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    if let Some(theirs) = registry.claim_root(&root)? {
        return Err(Error::DataDir {
            path: paths.dir.clone(),
            reason: format!(
                "this data dir's root CA (SHA-256 of ca.crt {root}) is not the registry's \
                 ({theirs}): every node of a cluster needs the same CA. Copy ca/, ca.crt, \
                 admin.crt and admin.key from a node of the cluster into an empty data dir \
                 (with a fleetgate.json), or start this node on its own registry"
            ),
        });
    }
    Ok(registry)
}

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
    root_der: CertificateDer<'static>,
    root_pem: String,
    /// The root's key where it is online (the default data dir); `None`
    /// where the root is kept offline and signs only at ceremonies.
    root: Option<Signer>,
    issuing: Signer,
    status_url: Option<String>,
}

/// The name of fleetgate's own issuing CA in status URLs (`/crl/issuing.crl`).
pub const ISSUING_CRL_NAME: &str = "issuing";
/// The root's CRL (`/crl/root.crl`): it lists revoked manufacturer CAs.
pub const ROOT_CRL_NAME: &str = "root";

/// How long a delegated signer (OCSP, CMP) certificate lasts.
const SIGNER_LIFETIME: Duration = Duration::days(30);
/// A delegated signer is renewed when it has less than this left.
pub const OCSP_SIGNER_RENEW_BEFORE: Duration = Duration::days(7);
/// CRLs are valid this long; re-signed on every change and at least daily.
pub const CRL_VALIDITY: Duration = Duration::days(2);

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("Ca")
            .field("issuer", &self.issuing.name)
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
    /// The issuing CA's subject, RFC 4514: the issuer of what it signs.
    pub fn issuing_name(&self) -> &str {
        &self.issuing.name
    }
    pub fn issuing_der(&self) -> &CertificateDer<'static> {
        &self.issuing.der
    }
    pub fn issuing_pem(&self) -> &str {
        &self.issuing.pem
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

    /// Whether the root's key is online here.
    pub fn root_online(&self) -> bool {
        self.root.is_some()
    }

    pub fn issuing(&self) -> &Signer {
        &self.issuing
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
        let signer = signer.unwrap_or(&self.issuing);
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
    fn issue_ocsp_signer(&self, key: &impl PublicKeyData) -> Result<IssuedCert, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "fleetgate OCSP responder");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::OcspSigning];
        // id-pkix-ocsp-nocheck, value NULL.
        params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 5, 5, 7, 48, 1, 5],
            vec![0x05, 0x00],
        )];
        sign_leaf(&self.issuing, params, key, SIGNER_LIFETIME)
    }

    /// The CMP signer's certificate (RFC 9483 3.1: responses are signed
    /// by a key the issuing CA certifies): EKU id-kp-cmcRA, signed by the
    /// issuing CA.
    fn issue_cmp_signer(&self, key: &impl PublicKeyData) -> Result<IssuedCert, Error> {
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
        sign_leaf(&self.issuing, params, key, SIGNER_LIFETIME)
    }

    /// A CRL for the issuing CA listing `listed`, numbered `number`.
    pub fn crl(&self, listed: &[crate::registry::Listed], number: u64) -> Result<Vec<u8>, Error> {
        crl(&self.issuing, listed, number)
    }
}

/// A CRL signed by `signer` listing `listed`, numbered `number`.
pub fn crl(
    signer: &Signer,
    listed: &[crate::registry::Listed],
    number: u64,
) -> Result<Vec<u8>, Error> {
    crl_valid_for(signer, listed, number, CRL_VALIDITY)
}

/// [`crl`], valid for `validity` (a root's, signed at a ceremony, lasts).
pub fn crl_valid_for(
    signer: &Signer,
    listed: &[crate::registry::Listed],
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
fn sign_leaf(
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
    fn issue_server(&self, key: &KeyPair, sans: &[String]) -> Result<IssuedCert, Error> {
        let mut params = CertificateParams::new(sans.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "fleetgate server");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        sign_leaf(&self.issuing, params, key, SERVER_LIFETIME)
    }
}

/// The CA, the registry and where they live.
#[derive(Debug)]
pub struct Authority {
    pub paths: Paths,
    pub ca: Ca,
    pub registry: Registry,
    /// Manufacturer CAs fleetgate issued, loaded on first use.
    pub(crate) signers: crate::manufacturer::Signers,
    /// The PIN of the token keys are in, if any (never written anywhere).
    pub(crate) pin: Option<Pin>,
}

impl Authority {
    /// A new principal of fleetgate's own CA: a certificate for `key`
    /// naming `identity`, and the registry entry to enroll it with (for
    /// `manufacturer`'s fleet, if any).
    pub fn issue_new(
        &self,
        key: &KeyPair,
        identity: &Identity,
        manufacturer: Option<&str>,
        lifetime: Duration,
    ) -> Result<(NewDevice, IssuedCert), Error> {
        let cert = self.ca.issue(key, identity, lifetime)?;
        let new = NewDevice {
            id: identity.id.clone(),
            role: identity.role,
            manufacturer: manufacturer.map(str::to_owned),
        };
        Ok((new, cert))
    }

    /// Opens the data dir at `dir`, creating a new CA there if it is missing or
    /// empty. A dir that is neither complete nor empty is an error.
    pub fn open_or_init(dir: &Path, opts: &InitOptions) -> Result<Self, Error> {
        let paths = Paths::new(dir);
        if paths.marker().exists() {
            return Self::load(paths, opts);
        }
        let empty = match fs::read_dir(dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(io(dir, e)),
        };
        if !empty {
            return Err(Error::DataDir {
                path: dir.to_owned(),
                reason: format!(
                    "has files but no {MARKER}: an earlier initialization was interrupted or this \
                     is not a fleetgate data dir; move it away to create a new CA"
                ),
            });
        }
        Self::init(paths, opts)
    }

    /// Opens an existing, complete data dir; never creates one.
    pub fn open(dir: &Path, opts: &InitOptions) -> Result<Self, Error> {
        let paths = Paths::new(dir);
        if !paths.marker().exists() {
            return Err(Error::DataDir {
                path: dir.to_owned(),
                reason: format!("no {MARKER}: not an initialized fleetgate data dir"),
            });
        }
        Self::load(paths, opts)
    }

    fn init(paths: Paths, opts: &InitOptions) -> Result<Self, Error> {
        mkdir_private(&paths.dir.join("ca"))?;
        // `recursive` leaves an existing (empty) dir's mode alone.
        fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io(&paths.dir, e))?;

        let now = OffsetDateTime::now_utc();
        // The root: in the data dir (the one-command start), or offline in
        // its own dir, where only ceremonies open it.
        let root_dir = opts.root_out.as_deref().map(crate::ceremony::RootDir::new);
        let (root_key_path, root_custody) = match &root_dir {
            Some(r) => {
                r.create()?;
                (r.key(), &opts.root_custody)
            }
            None => (paths.root_key(), &opts.custody),
        };
        let root_key = keys::generate(&root_key_path, "root-ca", root_custody)?;
        let mut root = ca_params("fleetgate root CA", 1, now, ROOT_LIFETIME);
        root.serial_number = Some(rcgen::SerialNumber::from_slice(
            Serial::random()?.as_bytes(),
        ));
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, &root_key);

        let issuing_object = match &opts.custody {
            Custody::Token { base, .. } => base.object.clone(),
            Custody::Files => String::new(),
        };
        let issuing_key = keys::generate(&paths.issuing_key(), &issuing_object, &opts.custody)?;
        let issuing = issuing_ca_params("fleetgate issuing CA 1", now, opts.status_url.as_deref())?;
        let issuing_cert = issuing.signed_by(&issuing_key, &root_issuer)?;

        write_file(&paths.issuing_cert(), issuing_cert.pem().as_bytes(), false)?;
        write_file(&paths.ca_cert(), root_cert.pem().as_bytes(), false)?;
        if let Some(r) = &root_dir {
            write_file(&r.cert(), root_cert.pem().as_bytes(), false)?;
            // The first ceremony: what the node serves for the root while
            // the root is away.
            let root = Signer::new(
                root_cert.der().clone(),
                root_cert.pem(),
                root_key.clone(),
                ROOT_CRL_NAME,
                None,
            )?;
            crate::ceremony::sign_for_node(&root, &paths, &opts.custody, &[])?;
        }

        let ca = load_ca(&paths, opts)?;
        let registry = open_registry(&paths, opts, &ca)?;
        let auth = Self {
            paths,
            ca,
            registry,
            signers: Default::default(),
            pin: opts.pin.clone().or_else(|| opts.custody.pin().cloned()),
        };
        auth.write_server_cert(&server_sans(opts))?;

        // The first operator, registered like any other principal.
        let admin_key = KeyPair::generate()?;
        let admin_id = Identity {
            role: Role::Admin,
            id: DeviceId::try_new(FIRST_ADMIN)?,
        };
        let (admin, admin_cert) = auth.issue_new(&admin_key, &admin_id, None, ADMIN_LIFETIME)?;
        auth.registry.enroll(&admin, &admin_cert, "system")?;
        write_file(
            &auth.paths.admin_key(),
            admin_key.serialize_pem().as_bytes(),
            true,
        )?;
        write_file(
            &auth.paths.admin_cert(),
            admin_cert.chain_pem.as_bytes(),
            false,
        )?;

        let marker = Marker {
            format: FORMAT,
            created_at: now,
        };
        let marker = serde_json::to_vec_pretty(&marker)
            .map_err(|e| Error::Corrupt(format!("marker: {e}")))?;
        write_file(&auth.paths.marker(), &marker, false)?;
        tracing::info!(dir = %auth.paths.dir.display(), "created a new CA and registry");
        Ok(auth)
    }

    fn load(paths: Paths, opts: &InitOptions) -> Result<Self, Error> {
        let marker: Marker =
            serde_json::from_slice(&read(&paths.marker())?).map_err(|e| Error::DataDir {
                path: paths.marker(),
                reason: format!("does not parse: {e}"),
            })?;
        if marker.format != FORMAT {
            return Err(Error::DataDir {
                path: paths.marker(),
                reason: format!("format {} (this build reads {FORMAT})", marker.format),
            });
        }
        // The root and issuing keys are checked as `load_ca` reads them.
        for key in [paths.server_key(), paths.admin_key()] {
            check_private(&key)?;
        }
        let ca = load_ca(&paths, opts)?;
        let registry = open_registry(&paths, opts, &ca)?;
        let auth = Self {
            paths,
            ca,
            registry,
            signers: Default::default(),
            pin: opts.pin.clone().or_else(|| opts.custody.pin().cloned()),
        };
        auth.renew_server_cert_if_needed(&server_sans(opts))?;
        Ok(auth)
    }

    /// Where new keys are made: in the token the issuing CA's key is in,
    /// else files. (Read from the data dir, so every node of a cluster and
    /// every restart agrees.)
    pub fn custody(&self) -> Custody {
        match (keys::kept(&self.paths.issuing_key()), &self.pin) {
            (Ok(keys::Kept::Token(base)), Some(pin)) => Custody::Token {
                base,
                pin: pin.clone(),
            },
            _ => Custody::Files,
        }
    }

    /// The CMP signer's key and certificate (DER), made or renewed as
    /// needed.
    pub fn cmp_signer(&self) -> Result<(CaKey, Vec<u8>), Error> {
        self.delegated_signer(
            "CMP signing",
            "cmp-signer",
            &self.paths.cmp_cert(),
            &self.paths.cmp_key(),
            |key| self.ca.issue_cmp_signer(key),
        )
    }

    /// A signing key the issuing CA certifies for one purpose, kept in
    /// `cert_path` and at `key_path` (a 0600 file, or a token key named by
    /// its `.uri`): read back while it has more than a week left, else made
    /// anew where new keys are made (`object`-<time> in a token, whose old
    /// key is then deleted).
    fn delegated_signer(
        &self,
        what: &str,
        object: &str,
        cert_path: &Path,
        key_path: &Path,
        issue: impl FnOnce(&CaKey) -> Result<IssuedCert, Error>,
    ) -> Result<(CaKey, Vec<u8>), Error> {
        let old = self.current_signer(cert_path, key_path)?;
        if let Some((key, der, left)) = &old {
            if *left > OCSP_SIGNER_RENEW_BEFORE {
                return Ok((key.clone(), der.clone()));
            }
        }
        if let Some(dir) = cert_path.parent() {
            mkdir_private(dir)?;
        }
        let label = format!("{object}-{}", OffsetDateTime::now_utc().unix_timestamp());
        let old_uri = match keys::kept(key_path)? {
            keys::Kept::Token(uri) => Some(uri),
            _ => None,
        };
        let key = keys::generate(key_path, &label, &self.custody())?;
        let cert = issue(&key)?;
        write_file(cert_path, cert.chain_pem.as_bytes(), false)?;
        if key.in_memory().is_some() {
            // Back to files (the token was given up): no stale URI.
            let _ = fs::remove_file(keys::uri_path(key_path));
        }
        if let (Some(uri), Some(pin)) = (old_uri, &self.pin) {
            if uri.object != label {
                match keys::TokenKey::open(&uri, pin).and_then(keys::TokenKey::destroy) {
                    Ok(()) => tracing::info!(key = %uri, "deleted the superseded {what} key"),
                    Err(e) => {
                        tracing::warn!(key = %uri, error = %e, "could not delete the superseded {what} key")
                    }
                }
            }
        }
        tracing::info!(serial = %cert.serial, key = %key.location(), "issued a new {what} certificate");
        Ok((key, cert.der))
    }

    /// The delegated signer kept at `cert_path` and `key_path`, if both are
    /// there and match, with the time it has left.
    fn current_signer(
        &self,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Option<(CaKey, Vec<u8>, Duration)>, Error> {
        let Ok(cert) = read(cert_path) else {
            return Ok(None);
        };
        if !keys::exists(key_path) {
            return Ok(None);
        }
        let der = CertificateDer::from_pem_slice(&cert).map_err(|e| Error::DataDir {
            path: cert_path.to_owned(),
            reason: format!("no certificate in it: {e}"),
        })?;
        let (_, parsed) = X509Certificate::from_der(&der).map_err(|e| Error::DataDir {
            path: cert_path.to_owned(),
            reason: format!("does not parse: {e}"),
        })?;
        let left = parsed.validity().not_after.to_datetime() - OffsetDateTime::now_utc();
        let key = match keys::load(key_path, self.pin.as_ref()) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(key = %key_path.display(), error = %e, "unusable signer key: making a new one");
                return Ok(None);
            }
        };
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Ok(None);
        }
        Ok(Some((key, der.to_vec(), left)))
    }

    /// Reissues the server certificate if it is near expiry, or lacks a SAN
    /// that was asked for. Returns whether it did.
    pub fn renew_server_cert_if_needed(&self, sans: &[String]) -> Result<bool, Error> {
        let (have, not_after) = self.server_cert_sans()?;
        let missing = sans.iter().any(|s| !have.contains(s));
        if not_after - OffsetDateTime::now_utc() > SERVER_RENEW_BEFORE && !missing {
            return Ok(false);
        }
        let mut all = have;
        for s in sans {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        self.write_server_cert(&all)?;
        tracing::info!(sans = ?all, "renewed the server certificate");
        Ok(true)
    }

    /// The OCSP responder for the issuing CA, its signing certificate made
    /// or renewed as needed.
    pub fn ocsp_responder(&self) -> Result<crate::ocsp::Responder, Error> {
        let (key, der) = self.delegated_signer(
            "OCSP signing",
            "ocsp-signer",
            &self.paths.ocsp_cert(),
            &self.paths.ocsp_key(),
            |key| self.ca.issue_ocsp_signer(key),
        )?;
        use crate::manufacturer::CaKind;
        use crate::ocsp::{IssuerHashes, Unit};
        let manufacturers = self.registry.manufacturers()?;
        // The delegated responder: the issuing CA, and registered
        // manufacturer CAs (whose keys we do not hold). Each issuer has one
        // unit, so their order does not matter.
        let mut delegated = vec![IssuerHashes::from_cert(self.ca.issuing_der())?];
        let mut units = Vec::new();
        // The root answers for the CAs it issued.
        let mut root = IssuerHashes::from_cert(self.ca.root_der())?;
        let mut known = std::collections::HashMap::new();
        known.insert(
            inspect_certificate(self.ca.issuing_der())?.serial,
            None::<crate::registry::Revocation>,
        );
        for m in &manufacturers {
            let der = m.ca_der()?;
            match m.kind {
                CaKind::Registered => {
                    delegated.push(IssuerHashes::from_cert(&der)?.of_manufacturer(m.name.as_str()))
                }
                CaKind::Issued => {
                    known.insert(m.serial.clone(), m.revocation);
                    let key_file = self.paths.manufacturer_key(m.name.as_str());
                    if !keys::exists(&key_file) {
                        // Created on another node of a cluster: its key stays
                        // in that node's data dir (no key is ever in the
                        // shared store) until the operator copies it here.
                        tracing::warn!(
                            manufacturer = %m.name,
                            key = %key_file.display(),
                            "this node does not hold the manufacturer's CA key: OCSP for its \
                             devices answers unauthorized here until the manufacturer's files \
                             are copied from the node that created it"
                        );
                        continue;
                    }
                    let signer = self.held_signer(m)?.ok_or_else(|| {
                        Error::Corrupt(format!("manufacturer {} has no key", m.name))
                    })?;
                    units.push(Unit::new(
                        vec![IssuerHashes::from_cert(&der)?.of_manufacturer(m.name.as_str())],
                        signer.key().clone(),
                        &der,
                    )?);
                }
            }
        }
        root.known = Some(known);
        // The root answers itself where it is online; where it is offline,
        // a responder it certified at its last ceremony answers for it.
        match &self.ca.root {
            Some(r) => units.push(Unit::new(vec![root], r.key().clone(), self.ca.root_der())?),
            None => {
                let (cert, _) = read_cert(&self.paths.root_ocsp_cert())?;
                let key = keys::load(&self.paths.root_ocsp_key(), self.pin.as_ref())?;
                units.push(Unit::new(vec![root], key, &cert)?);
            }
        }
        let expires = X509Certificate::from_der(&der)
            .map(|(_, c)| c.validity().not_after.to_datetime())
            .map_err(|e| Error::Certificate(format!("OCSP signer: {e}")))?;
        units.push(Unit::new(delegated, key, &der)?);
        let mut responder = crate::ocsp::Responder::new(units);
        responder.signer_expires = Some(expires);
        Ok(responder)
    }

    /// A freshly signed CRL of the issuing CA (DER).
    pub fn issuing_crl(&self) -> Result<Vec<u8>, Error> {
        let listed = self
            .registry
            .revoked_by_issuer(None, &self.ca.issuing.name)?;
        let number = self.registry.next_crl_number(ISSUING_CRL_NAME)?;
        self.ca.crl(&listed, number)
    }

    /// Reissues the server certificate now, with a new key and the same SANs.
    pub fn reissue_server_cert(&self) -> Result<(), Error> {
        let (sans, _) = self.server_cert_sans()?;
        self.write_server_cert(&sans)?;
        tracing::info!(sans = ?sans, "reissued the server certificate");
        Ok(())
    }

    /// The current server certificate's DNS and IP SANs, and its expiry.
    fn server_cert_sans(&self) -> Result<(Vec<String>, OffsetDateTime), Error> {
        let pem = read(&self.paths.server_cert())?;
        let der = CertificateDer::from_pem_slice(&pem).map_err(|e| Error::DataDir {
            path: self.paths.server_cert(),
            reason: format!("no certificate in it: {e}"),
        })?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| Error::DataDir {
            path: self.paths.server_cert(),
            reason: format!("does not parse: {e}"),
        })?;
        let sans = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some(d.to_string()),
                        GeneralName::IPAddress(ip) => ip_string(ip),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((sans, cert.validity().not_after.to_datetime()))
    }

    fn write_server_cert(&self, sans: &[String]) -> Result<(), Error> {
        let key = KeyPair::generate()?;
        let cert = self.ca.issue_server(&key, sans)?;
        // Key first: a crash between the two leaves a key that matches no
        // certificate, which the loader reports, never a silent mismatch.
        write_file(
            &self.paths.server_key(),
            key.serialize_pem().as_bytes(),
            true,
        )?;
        write_file(&self.paths.server_cert(), cert.chain_pem.as_bytes(), false)?;
        Ok(())
    }
}

fn server_sans(opts: &InitOptions) -> Vec<String> {
    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for s in &opts.server_sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    sans
}

fn ip_string(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv4Addr::from(b).to_string()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv6Addr::from(b).to_string()),
        _ => None,
    }
}

fn ca_params(cn: &str, path_len: u8, now: OffsetDateTime, lifetime: Duration) -> CertificateParams {
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

fn load_ca(paths: &Paths, opts: &InitOptions) -> Result<Ca, Error> {
    let pin = opts.pin.as_ref().or(opts.custody.pin());
    let (root_der, root_pem) = read_cert(&paths.ca_cert())?;
    let root = if keys::exists(&paths.root_key()) {
        Some(load_signer(
            &paths.ca_cert(),
            &paths.root_key(),
            ROOT_CRL_NAME,
            None,
            pin,
        )?)
    } else {
        None
    };
    Ok(Ca {
        root_der,
        root_pem,
        root,
        issuing: load_signer(
            &paths.issuing_cert(),
            &paths.issuing_key(),
            ISSUING_CRL_NAME,
            None,
            pin,
        )?,
        status_url: opts.status_url.clone(),
    })
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

/// Makes a 0700 dir (and its parents).
pub(crate) fn mkdir_private(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))
}

fn rcgen_reason(r: crate::RevocationReason) -> rcgen::RevocationReason {
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
fn aia_ocsp(url: &str) -> rcgen::CustomExtension {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::{new_key_and_csr, validate_csr, KeyKind};

    fn device(id: &str) -> Identity {
        Identity {
            role: Role::Device,
            id: DeviceId::try_new(id).unwrap(),
        }
    }

    #[test]
    fn init_writes_private_keys_and_reloads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let first = Authority::open_or_init(&dir, &InitOptions::default()).unwrap();
        let paths = first.paths.clone();
        for key in [
            paths.root_key(),
            paths.issuing_key(),
            paths.server_key(),
            paths.admin_key(),
        ] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let root = first.ca.root_der().clone();
        let admin = first
            .registry
            .device(&DeviceId::try_new("admin").unwrap())
            .unwrap();
        assert_eq!(admin.role, Role::Admin);
        drop(first);

        // A second start reuses everything.
        let second = Authority::open_or_init(&dir, &InitOptions::default()).unwrap();
        assert_eq!(second.ca.root_der(), &root);
        assert_eq!(second.registry.device_count(), 1);
    }

    #[test]
    fn half_written_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        Authority::open_or_init(&dir, &InitOptions::default()).unwrap();
        fs::remove_file(dir.join(MARKER)).unwrap();
        let err = Authority::open_or_init(&dir, &InitOptions::default()).unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
    }

    #[test]
    fn corrupt_or_exposed_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let auth = Authority::open_or_init(&dir, &InitOptions::default()).unwrap();
        let paths = auth.paths.clone();
        drop(auth);

        fs::set_permissions(paths.issuing_key(), fs::Permissions::from_mode(0o644)).unwrap();
        let err = Authority::open_or_init(&dir, &InitOptions::default()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");

        fs::set_permissions(paths.issuing_key(), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(paths.issuing_key(), "garbage").unwrap();
        let err = Authority::open_or_init(&dir, &InitOptions::default()).unwrap_err();
        assert!(err.to_string().contains("issuing.key"), "{err}");
    }

    #[test]
    fn issued_certificate_chains_to_the_root_with_webpki() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let (_key, csr) = new_key_and_csr(KeyKind::EcdsaP256, "whatever-the-csr-says").unwrap();
        let csr = validate_csr(csr.as_bytes()).unwrap();
        let cert = auth
            .ca
            .issue_for_csr(&csr, &device("dev-1"), DEFAULT_CERT_LIFETIME)
            .unwrap();

        let anchor = webpki::anchor_from_trusted_cert(auth.ca.root_der()).unwrap();
        let der = CertificateDer::from(cert.der.clone());
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        let now = rustls_pki_types::UnixTime::now();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[auth.ca.issuing_der().clone()],
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
        // Not for servers.
        assert!(ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &[webpki::anchor_from_trusted_cert(auth.ca.root_der()).unwrap()],
                &[auth.ca.issuing_der().clone()],
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .is_err());

        let info = inspect_certificate(&cert.der).unwrap();
        assert_eq!(info.identity, Some(device("dev-1")));
        assert_eq!(info.serial, cert.serial);
        assert!(!info.is_ca);
        assert_eq!(info.serial.as_bytes().len(), 20);
        assert_eq!(
            (info.not_after - info.not_before).whole_days(),
            DEFAULT_CERT_LIFETIME.whole_days()
        );
        let (_, parsed) = X509Certificate::from_der(&cert.der).unwrap();
        assert_eq!(parsed.subject().to_string(), "CN=dev-1");
    }

    #[test]
    fn server_cert_is_renewed_for_a_new_san() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let sans = server_sans(&InitOptions::default());
        assert!(!auth.renew_server_cert_if_needed(&sans).unwrap());
        let mut more = sans.clone();
        more.push("broker.example".into());
        assert!(auth.renew_server_cert_if_needed(&more).unwrap());
        assert!(!auth.renew_server_cert_if_needed(&more).unwrap());
    }
}
