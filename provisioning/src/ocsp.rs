//! RFC 6960 OCSP: requests in, signed responses out. Statuses come from a
//! [`StandingLookup`] (the registry, or a node's view of a shared store);
//! the responder does no IO of its own. The HTTP and MQTT front ends live
//! in `broker`.
//!
//! Each issuer is answered for by one [`Unit`]: fleetgate's issuing CA by a
//! delegated responder certificate (EKU OCSPSigning, id-pkix-ocsp-nocheck)
//! that it issued; the root (for the manufacturer CAs it issued) and each
//! manufacturer CA fleetgate issued by the CA's own key. Responses carry the
//! signer's certificate, so `openssl ocsp -CAfile ca.crt` verifies them.
//! Registered manufacturer CAs (keys we do not hold) are answered for by the
//! delegated responder, which a relying party must trust explicitly
//! (`openssl ocsp -VAfile ocsp/signer.crt`).
//! CertIDs with SHA-1 or SHA-256 hashes are recognised. A request without a
//! nonce gets a cacheable response (RFC 5019), cached by the CertIDs it
//! asks about (not by its bytes, which a client may vary at will), only
//! when every status is known, and within a bound in bytes; the cache is
//! cleared whenever the registry changes. Nonces must be 1 to 128 octets
//! (RFC 9654), and a request with a critical extension we do not know is
//! refused (RFC 6960 4.4).

use std::collections::HashMap;
use std::sync::Mutex;

use der::asn1::{BitString, GeneralizedTime, Null, ObjectIdentifier, OctetString};
use der::{Decode, Encode};
use rcgen::SigningKey;

use crate::keys::CaKey;
use time::{Duration, OffsetDateTime};
use x509_cert::ext::pkix::CrlReason;
use x509_cert::ext::Extension;
use x509_cert::spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;
use x509_ocsp::{
    BasicOcspResponse, CertId, CertStatus, OcspGeneralizedTime, OcspRequest, OcspResponse,
    ResponderId, ResponseData, RevokedInfo, SingleResponse,
};

use crate::lifecycle::{RevocationReason, Standing};
use crate::{Error, Serial};

/// Largest request body accepted.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// Most certificates asked about in one request.
pub const MAX_CERTS_PER_REQUEST: usize = 128;
/// How long a response is good for (nextUpdate - thisUpdate).
pub const RESPONSE_VALIDITY: Duration = Duration::hours(1);
/// Bytes of cached responses (and their keys) kept at most.
pub const CACHE_BYTES: usize = 8 * 1024 * 1024;
/// RFC 9654: a nonce is 1 to 128 octets.
pub const MAX_NONCE_LEN: usize = 128;

const SHA1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.14.3.2.26");
const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const NONCE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.48.1.2");

/// A CA the responder answers for, with its CertID hashes.
#[derive(Debug, Clone)]
pub struct IssuerHashes {
    /// The issuer's name as the registry records it.
    pub name: String,
    /// The manufacturer whose CA this is (`None`: fleetgate's own): with
    /// the name, where its certificates are in the registry.
    pub manufacturer: Option<String>,
    sha1: ([u8; 20], [u8; 20]),
    sha256: ([u8; 32], [u8; 32]),
    /// Where statuses come from: the registry, or (for the root) a fixed
    /// list of the CAs it issued.
    pub known: Option<HashMap<Serial, Option<crate::lifecycle::Revocation>>>,
}

/// One signing key and the issuers it answers for.
pub struct Unit {
    pub issuers: Vec<IssuerHashes>,
    key: CaKey,
    cert: Certificate,
    responder_id: ResponderId,
}

impl std::fmt::Debug for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unit")
            .field("issuers", &self.issuers)
            .finish_non_exhaustive()
    }
}

impl Unit {
    /// `key` signs; `cert_der` is its certificate, sent with each response.
    pub fn new(issuers: Vec<IssuerHashes>, key: CaKey, cert_der: &[u8]) -> Result<Self, Error> {
        let cert = Certificate::from_der(cert_der)
            .map_err(|e| Error::Certificate(format!("OCSP signer: {e}")))?;
        let key_hash = ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            key.public_key_raw(),
        );
        let responder_id = ResponderId::ByKey(
            OctetString::new(key_hash.as_ref()).map_err(|e| Error::Certificate(e.to_string()))?,
        );
        Ok(Self {
            issuers,
            key,
            cert,
            responder_id,
        })
    }
}

impl IssuerHashes {
    /// From the issuer's DER certificate.
    pub fn from_cert(der: &[u8]) -> Result<Self, Error> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::Certificate(format!("issuer does not parse: {e}")))?;
        let name = cert.subject().as_raw();
        let key = cert.public_key().subject_public_key.data.as_ref();
        let h1 = |b: &[u8]| {
            let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, b);
            let mut out = [0u8; 20];
            out.copy_from_slice(d.as_ref());
            out
        };
        let h256 = |b: &[u8]| {
            let d = ring::digest::digest(&ring::digest::SHA256, b);
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            out
        };
        Ok(Self {
            name: cert.subject().to_string(),
            manufacturer: None,
            sha1: (h1(name), h1(key)),
            sha256: (h256(name), h256(key)),
            known: None,
        })
    }

    /// The same issuer, a manufacturer's CA.
    pub fn of_manufacturer(self, name: &str) -> Self {
        Self {
            manufacturer: Some(name.to_owned()),
            ..self
        }
    }

    fn matches(&self, id: &CertId) -> bool {
        let (n, k) = (
            id.issuer_name_hash.as_bytes(),
            id.issuer_key_hash.as_bytes(),
        );
        if id.hash_algorithm.oid == SHA1 {
            n == self.sha1.0 && k == self.sha1.1
        } else if id.hash_algorithm.oid == SHA256 {
            n == self.sha256.0 && k == self.sha256.1
        } else {
            false
        }
    }
}

/// Why a request got no successful response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `malformedRequest`, with the reason for the log.
    Malformed(String),
    /// `unauthorized`: we are not the responder for that issuer.
    Unauthorized,
    /// `internalError`.
    Internal(String),
}

/// Responses to nonce-less requests, by the DER of the CertIDs asked
/// about: the answer and its validity, within [`CACHE_BYTES`].
#[derive(Debug, Default)]
struct Cache {
    map: HashMap<Vec<u8>, Answered>,
    bytes: usize,
}

/// A signed answer and the window it speaks for.
#[derive(Debug, Clone)]
struct Answered {
    der: Vec<u8>,
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
}

impl Cache {
    fn insert(&mut self, key: Vec<u8>, a: Answered) {
        let size = key.len() + a.der.len();
        if size > CACHE_BYTES {
            return;
        }
        if let Some(old) = self.map.remove(&key) {
            self.bytes -= key.len() + old.der.len();
        }
        if self.bytes + size > CACHE_BYTES {
            // Everything in it was made from one registry state; starting
            // over costs a few signatures, never unbounded memory.
            self.clear();
        }
        self.bytes += size;
        self.map.insert(key, a);
    }

    fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

/// What [`Responder::respond`] answered.
#[derive(Debug, Clone)]
pub struct Answer {
    /// A DER `OCSPResponse`, always (refusals are OCSP statuses too).
    pub der: Vec<u8>,
    /// Why there was no successful response, for the log.
    pub refusal: Option<Refusal>,
    /// For a successful response: its thisUpdate and nextUpdate (HTTP
    /// caching headers, RFC 5019 6.2).
    pub this_update: Option<OffsetDateTime>,
    pub next_update: Option<OffsetDateTime>,
}

/// The responder: its signing units and a cache.
pub struct Responder {
    units: Vec<Unit>,
    cache: Mutex<Cache>,
    /// When the delegated signing certificate expires, if there is one.
    pub signer_expires: Option<OffsetDateTime>,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("units", &self.units)
            .finish_non_exhaustive()
    }
}

impl Responder {
    pub fn new(units: Vec<Unit>) -> Self {
        Self {
            units,
            cache: Mutex::new(Cache::default()),
            signer_expires: None,
        }
    }

    /// Bytes held by the cache now.
    pub fn cache_bytes(&self) -> usize {
        self.lock_cache().bytes
    }

    /// Forgets every cached response: call on any registry change.
    pub fn invalidate(&self) {
        self.lock_cache().clear();
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A poisoned cache is still a valid map.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Answers a DER request with a DER `OCSPResponse`, always: refusals are
    /// OCSP statuses too. The `Refusal` is for the log.
    pub fn respond(&self, request: &[u8], registry: &dyn StandingLookup) -> Answer {
        match self.try_respond(request, registry) {
            Ok(a) => Answer {
                der: a.der,
                refusal: None,
                this_update: Some(a.this_update),
                next_update: Some(a.next_update),
            },
            Err(r) => {
                let resp = match &r {
                    Refusal::Malformed(_) => OcspResponse::malformed_request(),
                    Refusal::Unauthorized => OcspResponse::unauthorized(),
                    Refusal::Internal(_) => OcspResponse::internal_error(),
                };
                Answer {
                    // A status-only OCSPResponse always encodes.
                    der: resp.to_der().unwrap_or_default(),
                    refusal: Some(r),
                    this_update: None,
                    next_update: None,
                }
            }
        }
    }

    fn try_respond(&self, der: &[u8], registry: &dyn StandingLookup) -> Result<Answered, Refusal> {
        if der.len() > MAX_REQUEST_LEN {
            return Err(Refusal::Malformed(format!("{} bytes", der.len())));
        }
        let req = OcspRequest::from_der(der)
            .map_err(|e| Refusal::Malformed(format!("not an OCSPRequest: {e}")))?;
        let list = &req.tbs_request.request_list;
        if list.is_empty() {
            return Err(Refusal::Malformed("no certificates asked about".into()));
        }
        if list.len() > MAX_CERTS_PER_REQUEST {
            return Err(Refusal::Malformed(format!(
                "{} certificates asked about (at most {MAX_CERTS_PER_REQUEST})",
                list.len()
            )));
        }
        let mut nonce: Option<Extension> = None;
        for e in req.tbs_request.request_extensions.iter().flatten() {
            if e.extn_id == NONCE {
                check_nonce(e)?;
                nonce = Some(e.clone());
            } else if e.critical {
                return Err(Refusal::Malformed(format!(
                    "unknown critical request extension {}",
                    e.extn_id
                )));
            }
        }
        for r in list {
            if let Some(e) = r
                .single_request_extensions
                .iter()
                .flatten()
                .find(|e| e.critical)
            {
                return Err(Refusal::Malformed(format!(
                    "unknown critical extension {} on a certificate asked about",
                    e.extn_id
                )));
            }
        }

        let now = OffsetDateTime::now_utc();
        // Only answers to nonce-less requests may be replayed (RFC 5019);
        // they are found again by what they are about.
        let cache_key = match nonce {
            Some(_) => None,
            None => {
                let mut key = Vec::new();
                for r in list {
                    r.req_cert
                        .encode_to_vec(&mut key)
                        .map_err(|e| Refusal::Internal(format!("encoding: {e}")))?;
                }
                Some(key)
            }
        };
        if let Some(key) = &cache_key {
            if let Some(a) = self.lock_cache().map.get(key) {
                if a.next_update > now + Duration::minutes(5) {
                    return Ok(a.clone());
                }
            }
        }

        let (this_update, next_update) = (gtime(now)?, gtime(now + RESPONSE_VALIDITY)?);
        // The unit that answers for the first certificate we know signs;
        // certificates of other issuers in the same request are `unknown`.
        let Some(unit) = list.iter().find_map(|r| {
            self.units
                .iter()
                .find(|u| u.issuers.iter().any(|i| i.matches(&r.req_cert)))
        }) else {
            return Err(Refusal::Unauthorized);
        };
        let mut responses = Vec::with_capacity(list.len());
        let mut all_known = true;
        for r in list {
            let id = &r.req_cert;
            let status = match unit.issuers.iter().find(|i| i.matches(id)) {
                None => CertStatus::unknown(),
                Some(issuer) => status_of(issuer, id, registry)?,
            };
            all_known &= !matches!(status, CertStatus::Unknown(_));
            responses.push(SingleResponse {
                cert_id: id.clone(),
                cert_status: status,
                this_update,
                next_update: Some(next_update),
                single_extensions: None,
            });
        }
        let tbs = ResponseData {
            version: Default::default(),
            responder_id: unit.responder_id.clone(),
            produced_at: this_update,
            responses,
            response_extensions: nonce.map(|n| vec![n]),
        };
        let tbs_der = tbs
            .to_der()
            .map_err(|e| Refusal::Internal(format!("encoding: {e}")))?;
        let sig = unit
            .key
            .sign(&tbs_der)
            .map_err(|e| Refusal::Internal(format!("signing: {e}")))?;
        let basic = BasicOcspResponse {
            tbs_response_data: tbs,
            signature_algorithm: AlgorithmIdentifierOwned {
                oid: ECDSA_SHA256,
                parameters: None,
            },
            signature: BitString::from_bytes(&sig)
                .map_err(|e| Refusal::Internal(format!("encoding: {e}")))?,
            certs: Some(vec![unit.cert.clone()]),
        };
        let resp = OcspResponse::successful(basic)
            .and_then(|r| r.to_der())
            .map_err(|e| Refusal::Internal(format!("encoding: {e}")))?;
        let answered = Answered {
            der: resp,
            this_update: seconds(now),
            next_update: seconds(now + RESPONSE_VALIDITY),
        };
        // Answers about serials nobody issued are not kept: anyone can ask
        // about as many of those as they like.
        if let (Some(key), true) = (cache_key, all_known) {
            self.lock_cache().insert(key, answered.clone());
        }
        Ok(answered)
    }
}

/// RFC 9654: the nonce is an OCTET STRING of 1 to 128 octets (carried
/// DER-wrapped in the extension's value; a bare value is read as is).
fn check_nonce(e: &Extension) -> Result<(), Refusal> {
    let raw = e.extn_value.as_bytes();
    let len = match OctetString::from_der(raw) {
        Ok(inner) => inner.as_bytes().len(),
        Err(_) => raw.len(),
    };
    if len == 0 || len > MAX_NONCE_LEN {
        return Err(Refusal::Malformed(format!(
            "nonce of {len} octets (1 to {MAX_NONCE_LEN})"
        )));
    }
    Ok(())
}

/// `t` to the second, as GeneralizedTime carries it.
fn seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// Where the responder's statuses come from: the registry on one node, a
/// node's view of the shared store on several. The responder decides
/// nothing about standing and does no IO of its own.
pub trait StandingLookup {
    /// The standing of the certificate `key` and, for a hold, since when;
    /// `None` for a certificate the registry does not know.
    fn lookup(&self, key: &crate::CertKey) -> Result<Option<Looked>, crate::Error>;
}

/// A certificate's standing as the responder needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Looked {
    pub standing: Standing,
    /// When a hold (suspended or pending device) began: its device's last
    /// update.
    pub held_since: OffsetDateTime,
}

fn status_of(
    issuer: &IssuerHashes,
    id: &CertId,
    registry: &dyn StandingLookup,
) -> Result<CertStatus, Refusal> {
    let Ok(serial) = Serial::from_bytes(id.serial_number.as_bytes()) else {
        return Ok(CertStatus::unknown());
    };
    if let Some(known) = &issuer.known {
        return Ok(match known.get(&serial) {
            None => CertStatus::unknown(),
            Some(None) => CertStatus::good(),
            Some(Some(r)) => CertStatus::revoked(RevokedInfo {
                revocation_time: gtime(r.at)?,
                revocation_reason: Some(crl_reason(r.reason)),
            }),
        });
    }
    let key = crate::CertKey::new(issuer.manufacturer.as_deref(), &issuer.name, serial);
    let found = registry
        .lookup(&key)
        .map_err(|e| Refusal::Internal(format!("registry: {e}")))?;
    Ok(match found.map(|l| (l.standing, l.held_since)) {
        None => CertStatus::unknown(),
        Some((Standing::Good, _)) => CertStatus::good(),
        // A hold placed when the device was suspended (its last update).
        Some((Standing::Suspended | Standing::Pending, since)) => {
            CertStatus::revoked(RevokedInfo {
                revocation_time: gtime(since)?,
                revocation_reason: Some(CrlReason::CertificateHold),
            })
        }
        Some((Standing::Revoked(r), _)) => CertStatus::revoked(RevokedInfo {
            revocation_time: gtime(r.at)?,
            revocation_reason: Some(crl_reason(r.reason)),
        }),
    })
}

pub fn crl_reason(r: RevocationReason) -> CrlReason {
    match r {
        RevocationReason::Unspecified => CrlReason::Unspecified,
        RevocationReason::KeyCompromise => CrlReason::KeyCompromise,
        RevocationReason::CaCompromise => CrlReason::CaCompromise,
        RevocationReason::AffiliationChanged => CrlReason::AffiliationChanged,
        RevocationReason::Superseded => CrlReason::Superseded,
        RevocationReason::CessationOfOperation => CrlReason::CessationOfOperation,
        RevocationReason::PrivilegeWithdrawn => CrlReason::PrivilegeWithdrawn,
        RevocationReason::AaCompromise => CrlReason::AaCompromise,
    }
}

fn gtime(t: OffsetDateTime) -> Result<OcspGeneralizedTime, Refusal> {
    let secs = u64::try_from(t.unix_timestamp())
        .map_err(|_| Refusal::Internal("time before 1970".into()))?;
    let dt = der::DateTime::from_unix_duration(std::time::Duration::from_secs(secs))
        .map_err(|e| Refusal::Internal(format!("time: {e}")))?;
    Ok(OcspGeneralizedTime(GeneralizedTime::from_date_time(dt)))
}

/// A request for `serials` issued by the CA with certificate `issuer_der`
/// (SHA-1 CertIDs, as `openssl ocsp` makes them), with an optional nonce.
/// For clients and tests.
pub fn build_request(
    issuer_der: &[u8],
    serials: &[Serial],
    nonce: Option<&[u8]>,
) -> Result<Vec<u8>, Error> {
    let h = IssuerHashes::from_cert(issuer_der)?;
    let enc = |e: der::Error| Error::Certificate(e.to_string());
    let request_list = serials
        .iter()
        .map(|s| {
            Ok(x509_ocsp::Request {
                req_cert: CertId {
                    hash_algorithm: AlgorithmIdentifierOwned {
                        oid: SHA1,
                        parameters: Some(Null.into()),
                    },
                    issuer_name_hash: OctetString::new(h.sha1.0.to_vec()).map_err(enc)?,
                    issuer_key_hash: OctetString::new(h.sha1.1.to_vec()).map_err(enc)?,
                    serial_number: x509_cert::serial_number::SerialNumber::new(s.as_bytes())
                        .map_err(enc)?,
                },
                single_request_extensions: None,
            })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let request_extensions = match nonce {
        Some(n) => Some(vec![Extension {
            extn_id: NONCE,
            critical: false,
            extn_value: OctetString::new(OctetString::new(n).map_err(enc)?.to_der().map_err(enc)?)
                .map_err(enc)?,
        }]),
        None => None,
    };
    let req = OcspRequest {
        tbs_request: x509_ocsp::TbsRequest {
            version: Default::default(),
            requestor_name: None,
            request_list,
            request_extensions,
        },
        optional_signature: None,
    };
    req.to_der().map_err(enc)
}

/// What a response says, unverified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// OCSPResponseStatus: 0 successful, 1 malformedRequest, 6 unauthorized...
    pub status: u8,
    /// Each certificate: (serial, "good" | "revoked" | "unknown").
    pub certs: Vec<(Serial, &'static str)>,
}

/// Reads a DER OCSPResponse. For clients and tests; the signature is not
/// checked here (openssl does that in the tests).
pub fn read_response(der: &[u8]) -> Result<Summary, Error> {
    let resp = OcspResponse::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
    let status = resp.response_status as u8;
    let Some(bytes) = resp.response_bytes else {
        return Ok(Summary {
            status,
            certs: Vec::new(),
        });
    };
    let basic = BasicOcspResponse::from_der(bytes.response.as_bytes())
        .map_err(|e| Error::Certificate(e.to_string()))?;
    let mut out = Vec::new();
    for r in basic.tbs_response_data.responses {
        let s = match r.cert_status {
            CertStatus::Good(_) => "good",
            CertStatus::Revoked(_) => "revoked",
            CertStatus::Unknown(_) => "unknown",
        };
        out.push((Serial::from_bytes(r.cert_id.serial_number.as_bytes())?, s));
    }
    Ok(Summary { status, certs: out })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::csr::{new_key_and_csr, KeyKind};
    use crate::{Authority, DeviceId, EnrollRequest, InitOptions, Role, DEFAULT_CERT_LIFETIME};

    fn authority() -> (tempfile::TempDir, Authority, Serial) {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let (_k, csr) = new_key_and_csr(KeyKind::EcdsaP256, "x").unwrap();
        let (_, cert) = auth
            .enroll(
                &EnrollRequest {
                    id: DeviceId::try_new("dev-1").unwrap(),
                    role: Role::Device,
                    manufacturer: None,
                    csr: csr.into_bytes(),
                    lifetime: DEFAULT_CERT_LIFETIME,
                },
                "test",
            )
            .unwrap();
        (tmp, auth, cert.serial)
    }

    /// A request with `extensions` in place of the usual ones.
    fn with_extensions(auth: &Authority, serial: &Serial, extensions: Vec<Extension>) -> Vec<u8> {
        let der =
            build_request(&auth.ca.issuing_der(), std::slice::from_ref(serial), None).unwrap();
        let mut req = OcspRequest::from_der(&der).unwrap();
        req.tbs_request.request_extensions = Some(extensions);
        req.to_der().unwrap()
    }

    fn nonce(len: usize) -> Extension {
        Extension {
            extn_id: NONCE,
            critical: false,
            extn_value: OctetString::new(
                OctetString::new(vec![7u8; len]).unwrap().to_der().unwrap(),
            )
            .unwrap(),
        }
    }

    #[test]
    fn nonces_of_1_to_128_octets_only() {
        let (_tmp, auth, serial) = authority();
        let r = auth.ocsp_responder().unwrap();
        for (len, ok) in [(0, false), (1, true), (32, true), (128, true), (129, false)] {
            let req = with_extensions(&auth, &serial, vec![nonce(len)]);
            let a = r.respond(&req, &auth.registry);
            match ok {
                true => assert!(a.refusal.is_none(), "{len}: {:?}", a.refusal),
                false => assert!(
                    matches!(a.refusal, Some(Refusal::Malformed(ref why)) if why.contains("nonce")),
                    "{len}: {:?}",
                    a.refusal
                ),
            }
            assert_eq!(
                read_response(&a.der).unwrap().status,
                if ok { 0 } else { 1 }
            );
        }
    }

    #[test]
    fn unknown_critical_extensions_are_refused() {
        let (_tmp, auth, serial) = authority();
        let r = auth.ocsp_responder().unwrap();
        let unknown = |critical| Extension {
            extn_id: ObjectIdentifier::new_unwrap("1.2.3.4.5"),
            critical,
            extn_value: OctetString::new(vec![0x05, 0x00]).unwrap(),
        };
        let a = r.respond(
            &with_extensions(&auth, &serial, vec![unknown(true)]),
            &auth.registry,
        );
        assert!(
            matches!(a.refusal, Some(Refusal::Malformed(_))),
            "{:?}",
            a.refusal
        );
        let a = r.respond(
            &with_extensions(&auth, &serial, vec![unknown(false)]),
            &auth.registry,
        );
        assert!(a.refusal.is_none(), "{:?}", a.refusal);
    }

    #[test]
    fn the_cache_is_keyed_by_cert_ids_and_bounded() {
        let (_tmp, auth, serial) = authority();
        let r = auth.ocsp_responder().unwrap();
        let plain =
            build_request(&auth.ca.issuing_der(), std::slice::from_ref(&serial), None).unwrap();
        let first = r.respond(&plain, &auth.registry);
        let held = r.cache_bytes();
        assert!(held > 0);
        // Other bytes, the same question (a non-critical extension added):
        // the cached answer, and no new entry.
        let other = with_extensions(
            &auth,
            &serial,
            vec![Extension {
                extn_id: ObjectIdentifier::new_unwrap("1.2.3.4.5"),
                critical: false,
                extn_value: OctetString::new(vec![0x05, 0x00]).unwrap(),
            }],
        );
        assert_ne!(other, plain);
        assert_eq!(r.respond(&other, &auth.registry).der, first.der);
        assert_eq!(r.cache_bytes(), held);
        // Questions about serials nobody issued are answered, not kept.
        for i in 0..2000u32 {
            let s = Serial::from_bytes(&(i + 1).to_be_bytes()).unwrap();
            let req = build_request(&auth.ca.issuing_der(), &[s], None).unwrap();
            let a = r.respond(&req, &auth.registry);
            assert_eq!(read_response(&a.der).unwrap().certs[0].1, "unknown");
        }
        assert_eq!(r.cache_bytes(), held);
        // And whatever is kept stays within its bound.
        let mut cache = Cache::default();
        for i in 0..100_000u32 {
            cache.insert(
                i.to_be_bytes().to_vec(),
                Answered {
                    der: vec![0; 300],
                    this_update: OffsetDateTime::now_utc(),
                    next_update: OffsetDateTime::now_utc(),
                },
            );
            assert!(cache.bytes <= CACHE_BYTES);
        }
        assert_eq!(
            cache.bytes,
            cache
                .map
                .iter()
                .map(|(k, v)| k.len() + v.der.len())
                .sum::<usize>()
        );
    }
}
