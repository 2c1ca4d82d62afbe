//! Lightweight CMP (RFC 9483) messages, sans network: reading a request
//! (its protection and its proof of possession checked against the keys
//! the message names), and writing signed responses. The HTTP side, who
//! may do what and the registry are the broker's (`api::cmp`).
//!
//! The message types are RustCrypto's `cmpv2` and `crmf`. Two are our
//! own: `cmpv2` 0.2 numbers `PKIFailureInfo` as masks rather than bit
//! positions and keeps `ErrorMsgContent`'s fields private, so an error
//! body is written here ([`ErrorContent`]) with the failure as a named
//! bit (RFC 4210 5.2.3). The protection is checked over the exact bytes
//! of the header and body as they were received ([`Incoming::parse`]),
//! not over a re-encoding.

use cmpv2::body::PkiBody;
use cmpv2::certified_key_pair::{CertOrEncCert, CertifiedKeyPair};
use cmpv2::gen::InfoTypeAndValue;
use cmpv2::header::{PkiHeader, Pvno};
use cmpv2::message::PkiMessage;
use cmpv2::response::{CertRepMessage, CertResponse};
use cmpv2::rev::RevRepContent;
use cmpv2::status::{PkiStatus, PkiStatusInfo};
use crmf::pop::ProofOfPossession;
use crmf::request::CertReqMessages;
use der::asn1::{
    Any, AnyRef, BitString, ContextSpecific, GeneralizedTime, Int, Null, ObjectIdentifier,
    OctetString,
};
use der::{Decode, Encode, Sequence, TagMode, TagNumber};
use rcgen::{KeyPair, SigningKey};

use crate::keys::CaKey;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::name::Name;
use x509_cert::spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;
use x509_parser::prelude::FromDer;

use crate::csr::ValidatedCsr;
use crate::Error;

pub mod validity;

/// The largest CMP message accepted. An `ir` with a P-256 key and a
/// three-certificate chain is about 2 KiB.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// id-it-implicitConfirm (RFC 4210 5.1.1.1).
const IMPLICIT_CONFIRM: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.4.13");
/// id-it-caCerts (RFC 9483 4.3.1).
const CA_CERTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.4.17");
/// ecdsa-with-SHA256: how fleetgate's CMP signer signs.
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
/// id-ce-cRLReasons.
const CRL_REASON: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.21");

/// Why a request is refused: the PKIFailureInfo bit that names it (RFC
/// 4210 5.2.3), and words for people.
#[derive(Clone, Debug)]
pub struct Failure {
    pub info: FailInfo,
    pub reason: String,
}

impl Failure {
    pub fn new(info: FailInfo, reason: impl Into<String>) -> Self {
        Self {
            info,
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.info.name(), self.reason)
    }
}

/// The PKIFailureInfo bits fleetgate answers with, by their bit number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FailInfo {
    BadAlg = 0,
    BadMessageCheck = 1,
    BadRequest = 2,
    BadTime = 3,
    BadCertId = 4,
    BadDataFormat = 5,
    WrongAuthority = 6,
    BadPop = 9,
    CertRevoked = 10,
    BadRecipientNonce = 13,
    BadCertTemplate = 19,
    SignerNotTrusted = 20,
    TransactionIdInUse = 21,
    UnsupportedVersion = 22,
    NotAuthorized = 23,
    SystemUnavail = 24,
    SystemFailure = 25,
    DuplicateCertReq = 26,
}

impl FailInfo {
    /// Its name in RFC 4210.
    pub fn name(self) -> &'static str {
        match self {
            FailInfo::BadAlg => "badAlg",
            FailInfo::BadMessageCheck => "badMessageCheck",
            FailInfo::BadRequest => "badRequest",
            FailInfo::BadTime => "badTime",
            FailInfo::BadCertId => "badCertId",
            FailInfo::BadDataFormat => "badDataFormat",
            FailInfo::WrongAuthority => "wrongAuthority",
            FailInfo::BadPop => "badPOP",
            FailInfo::CertRevoked => "certRevoked",
            FailInfo::BadRecipientNonce => "badRecipientNonce",
            FailInfo::BadCertTemplate => "badCertTemplate",
            FailInfo::SignerNotTrusted => "signerNotTrusted",
            FailInfo::TransactionIdInUse => "transactionIdInUse",
            FailInfo::UnsupportedVersion => "unsupportedVersion",
            FailInfo::NotAuthorized => "notAuthorized",
            FailInfo::SystemUnavail => "systemUnavail",
            FailInfo::SystemFailure => "systemFailure",
            FailInfo::DuplicateCertReq => "duplicateCertReq",
        }
    }

    /// As a DER named-bit BIT STRING: bit n is the n-th bit from the
    /// first octet's most significant, trailing zero bits dropped.
    fn bits(self) -> Result<BitString, der::Error> {
        let n = self as usize;
        let mut octets = vec![0u8; n / 8 + 1];
        octets[n / 8] = 0x80 >> (n % 8);
        BitString::new((7 - n % 8) as u8, octets)
    }
}

/// The CMP failure a registry error stands for.
pub fn failure_of(e: &Error) -> Failure {
    let info = match e {
        Error::MalformedCsr { .. } | Error::UnsupportedKey { .. } | Error::InvalidId { .. } => {
            FailInfo::BadCertTemplate
        }
        Error::CsrBadSignature => FailInfo::BadPop,
        Error::CsrWeakSignature { .. } => FailInfo::BadAlg,
        Error::AlreadyExists { .. } => FailInfo::DuplicateCertReq,
        Error::NotFound { .. } => FailInfo::BadCertId,
        Error::ClaimExhausted { .. } | Error::ManufacturerRevoked { .. } => FailInfo::NotAuthorized,
        Error::InvalidTransition { .. } => FailInfo::CertRevoked,
        Error::Unavailable { .. } | Error::ClockSkew(_) => FailInfo::SystemUnavail,
        Error::InvalidInput { .. } | Error::TooLarge { .. } => FailInfo::BadRequest,
        _ => FailInfo::SystemFailure,
    };
    Failure::new(info, e.to_string())
}

fn malformed(what: &str) -> impl Fn(der::Error) -> Failure + '_ {
    move |e| Failure::new(FailInfo::BadDataFormat, format!("{what}: {e}"))
}

/// A PKIMessage with its header and body kept as received.
#[derive(Sequence)]
struct RawMessage<'a> {
    header: AnyRef<'a>,
    body: AnyRef<'a>,
    #[asn1(
        context_specific = "0",
        tag_mode = "EXPLICIT",
        constructed = "false",
        optional = "true"
    )]
    protection: Option<BitString>,
    #[asn1(
        context_specific = "1",
        tag_mode = "EXPLICIT",
        constructed = "true",
        optional = "true"
    )]
    extra_certs: Option<Vec<AnyRef<'a>>>,
}

/// ProtectedPart (RFC 4210 5.1.3): what a message's protection signs.
#[derive(Sequence)]
struct ProtectedPart<'a> {
    header: AnyRef<'a>,
    body: AnyRef<'a>,
}

/// A request as received: the parsed message, and the bytes its
/// protection covers.
#[derive(Debug)]
pub struct Incoming<'a> {
    pub msg: PkiMessage<'a>,
    protected: Vec<u8>,
    /// The validity its certificate template asked for, if any.
    pub requested: Option<validity::Requested>,
    /// Its certificate request as sent, when `msg` is a copy without the
    /// template's validity ([`validity::take`]): what the proof of
    /// possession signs.
    sent_cert_req: Option<Vec<u8>>,
}

impl<'a> Incoming<'a> {
    /// Parses a DER PKIMessage (nothing after it).
    pub fn parse(der: &'a [u8]) -> Result<Self, Failure> {
        Self::parse_taken(der, der, None)
    }

    /// Parses `parsed`, the message `der` with its template's validity
    /// `taken` out (or `der` itself): its protection still over `der`.
    pub fn parse_taken(
        der: &[u8],
        parsed: &'a [u8],
        taken: Option<&validity::Taken>,
    ) -> Result<Self, Failure> {
        if der.len() > MAX_MESSAGE {
            return Err(Failure::new(
                FailInfo::BadRequest,
                format!("{} bytes: at most {MAX_MESSAGE}", der.len()),
            ));
        }
        let msg = PkiMessage::from_der(parsed).map_err(malformed("not a CMP PKIMessage"))?;
        let raw = RawMessage::from_der(der).map_err(malformed("not a CMP PKIMessage"))?;
        let protected = ProtectedPart {
            header: raw.header,
            body: raw.body,
        }
        .to_der()
        .map_err(malformed("the protected part"))?;
        Ok(Self {
            msg,
            protected,
            requested: taken.map(|t| t.requested),
            sent_cert_req: taken.map(|t| t.cert_req.clone()),
        })
    }

    /// The one certificate request of an `ir`, `cr` or `kur`
    /// ([`cert_request`]), its proof of possession checked over what was
    /// sent.
    pub fn cert_request(&self, msgs: &CertReqMessages) -> Result<CertRequest, Failure> {
        cert_request_sent(msgs, self.sent_cert_req.as_deref())
    }

    /// The header of a message whose whole does not parse (a body this
    /// crate cannot read), if the header does: so that the error answer
    /// still carries its transactionID and nonces, and the requester sees
    /// why.
    pub fn header_of(der: &'a [u8]) -> Option<PkiHeader<'a>> {
        RawMessage::from_der(der).ok()?.header.decode_as().ok()
    }

    /// The body's name in RFC 4210 (`ir`, `kur`, ...).
    pub fn kind(&self) -> &'static str {
        body_name(&self.msg.body)
    }

    /// The transaction this message belongs to.
    pub fn transaction_id(&self) -> Result<&[u8], Failure> {
        match &self.msg.header.trans_id {
            Some(t) if !t.as_bytes().is_empty() => Ok(t.as_bytes()),
            _ => Err(Failure::new(
                FailInfo::BadRequest,
                "the header has no transactionID (RFC 9483 3.1)",
            )),
        }
    }

    /// Whether the sender asked to skip certConf.
    pub fn wants_implicit_confirm(&self) -> bool {
        self.msg
            .header
            .general_info
            .iter()
            .flatten()
            .any(|i| i.oid == IMPLICIT_CONFIRM)
    }

    /// The protection certificate (the first of extraCerts, RFC 9483
    /// 3.3) and the rest, to build its chain from; all DER.
    pub fn signer_chain(&self) -> Result<(Vec<u8>, Vec<Vec<u8>>), Failure> {
        if self.msg.protection.is_none() {
            return Err(Failure::new(
                FailInfo::BadMessageCheck,
                "the message is not protected: fleetgate takes signature-protected CMP only",
            ));
        }
        let certs = self.msg.extra_certs.as_deref().unwrap_or_default();
        let Some((first, rest)) = certs.split_first() else {
            return Err(Failure::new(
                FailInfo::BadMessageCheck,
                "extraCerts is empty: the protection certificate must be first (RFC 9483 3.3)",
            ));
        };
        let der = |c: &Certificate| c.to_der().map_err(malformed("a certificate"));
        Ok((der(first)?, rest.iter().map(der).collect::<Result<_, _>>()?))
    }

    /// Checks the protection: a signature over the header and body by the
    /// key of `signer` (DER), which the header's protectionAlg names.
    pub fn verify_protection(&self, signer: &[u8]) -> Result<(), Failure> {
        let Some(protection) = &self.msg.protection else {
            return Err(Failure::new(
                FailInfo::BadMessageCheck,
                "the message is not protected",
            ));
        };
        let Some(alg) = &self.msg.header.protection_alg else {
            return Err(Failure::new(
                FailInfo::BadMessageCheck,
                "the header has no protectionAlg",
            ));
        };
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(signer)
            .map_err(|e| Failure::new(FailInfo::BadDataFormat, format!("extraCerts: {e}")))?;
        verify(cert.public_key().raw, alg, protection, &self.protected).map_err(|why| {
            Failure::new(
                FailInfo::BadMessageCheck,
                format!("the protection does not verify: {why}"),
            )
        })
    }
}

/// The body's name in RFC 4210.
fn body_name(body: &PkiBody<'_>) -> &'static str {
    match body {
        PkiBody::Ir(_) => "ir",
        PkiBody::Ip(_) => "ip",
        PkiBody::Cr(_) => "cr",
        PkiBody::Cp(_) => "cp",
        PkiBody::P10cr(_) => "p10cr",
        PkiBody::KUr(_) => "kur",
        PkiBody::Kup(_) => "kup",
        PkiBody::Rr(_) => "rr",
        PkiBody::Rp(_) => "rp",
        PkiBody::PkiConf(_) => "pkiconf",
        PkiBody::GenM(_) => "genm",
        PkiBody::GenP(_) => "genp",
        PkiBody::Error(_) => "error",
        PkiBody::CertConf(_) => "certConf",
        _ => "another body",
    }
}

/// Verifies `signature` by the key `spki` (DER) over `data` with `alg`,
/// one of [`crate::csr::ACCEPTED_SIGNATURES`].
fn verify(
    spki: &[u8],
    alg: &AlgorithmIdentifierOwned,
    signature: &BitString,
    data: &[u8],
) -> Result<(), String> {
    if !crate::csr::ACCEPTED_SIGNATURES.contains(&alg.oid.to_string().as_str()) {
        return Err(format!("signature algorithm {} is not accepted", alg.oid));
    }
    let alg_der = alg.to_der().map_err(|e| e.to_string())?;
    let (_, alg) = x509_parser::x509::AlgorithmIdentifier::from_der(&alg_der)
        .map_err(|e| format!("algorithm: {e}"))?;
    let (_, key) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki)
        .map_err(|e| format!("public key: {e}"))?;
    let Some(sig) = signature.as_bytes() else {
        return Err("the signature is not whole octets".into());
    };
    let sig = x509_parser::der_parser::asn1_rs::BitString::new(0, sig);
    x509_parser::verify::verify_signature(&key, &alg, &sig, data).map_err(|e| e.to_string())
}

/// One certificate request (`ir`, `cr`, `kur`): its id, and its key with
/// the proof of possession checked.
#[derive(Debug)]
pub struct CertRequest {
    pub cert_req_id: Int,
    /// The key to certify, and the subject's CN if the template names one.
    pub key: ValidatedCsr,
}

/// The one request in `msgs` (RFC 9483 4.1.1: exactly one), its
/// signature-based proof of possession verified with the template's key.
pub fn cert_request(msgs: &CertReqMessages) -> Result<CertRequest, Failure> {
    cert_request_sent(msgs, None)
}

/// [`cert_request`], the proof of possession checked over `sent` (the
/// request as the client sent it) when the parsed one is not that.
fn cert_request_sent(msgs: &CertReqMessages, sent: Option<&[u8]>) -> Result<CertRequest, Failure> {
    let [msg] = msgs.as_slice() else {
        return Err(Failure::new(
            FailInfo::BadRequest,
            format!("{} certificate requests: one a message", msgs.len()),
        ));
    };
    let template = &msg.cert_req.cert_template;
    let Some(spki) = &template.subject_public_key_info else {
        return Err(Failure::new(
            FailInfo::BadCertTemplate,
            "the template has no public key: fleetgate does not generate keys for devices",
        ));
    };
    let spki = spki.to_der().map_err(malformed("the template's key"))?;
    match &msg.popo {
        Some(ProofOfPossession::Signature(pop)) => {
            if pop.poposk_input.is_some() {
                return Err(Failure::new(
                    FailInfo::BadPop,
                    "proof of possession over poposkInput: sign the certReq, with a subject in the template",
                ));
            }
            let signed = match sent {
                Some(s) => s.to_vec(),
                None => msg
                    .cert_req
                    .to_der()
                    .map_err(malformed("the certificate request"))?,
            };
            verify(&spki, &pop.alg_id, &pop.signature, &signed).map_err(|why| {
                Failure::new(
                    FailInfo::BadPop,
                    format!("the proof of possession does not verify: {why}"),
                )
            })?;
        }
        Some(_) => {
            return Err(Failure::new(
                FailInfo::BadPop,
                "only signature-based proof of possession is taken",
            ))
        }
        None => {
            return Err(Failure::new(
                FailInfo::BadPop,
                "the request has no proof of possession",
            ))
        }
    }
    let subject_cn = match &template.subject {
        Some(name) => common_name(name)?,
        None => None,
    };
    let mut key = ValidatedCsr::proven_key(&spki, subject_cn).map_err(|e| failure_of(&e))?;
    key.left_out = template_left_out(template)?;
    Ok(CertRequest {
        cert_req_id: msg.cert_req.cert_req_id.clone(),
        key,
    })
}

/// A `p10cr`'s PKCS#10 request, its self-signature checked. Its
/// certReqId is -1, as RFC 9483 4.1.4 has it for p10cr.
pub fn p10_request(csr: &x509_cert::request::CertReq) -> Result<CertRequest, Failure> {
    let der = csr.to_der().map_err(malformed("the PKCS#10 request"))?;
    let key = crate::csr::validate_csr(&der).map_err(|e| failure_of(&e))?;
    Ok(CertRequest {
        cert_req_id: Int::new(&[0xff]).map_err(malformed("certReqId"))?,
        key,
    })
}

/// What a template asks for that no certificate of fleetgate's carries
/// ([`crate::csr::left_out`]).
fn template_left_out(t: &crmf::request::CertTemplate) -> Result<Vec<String>, Failure> {
    let subject = t
        .subject
        .as_ref()
        .map(|n| n.to_der())
        .transpose()
        .map_err(malformed("the subject"))?;
    let subject = subject
        .as_deref()
        .map(x509_parser::x509::X509Name::from_der)
        .transpose()
        .map_err(|e| Failure::new(FailInfo::BadCertTemplate, format!("the subject: {e}")))?
        .map(|(_, n)| n);
    let ders = t
        .extensions
        .iter()
        .flatten()
        .map(|e| e.to_der())
        .collect::<Result<Vec<_>, _>>()
        .map_err(malformed("the template's extensions"))?;
    let extensions = ders
        .iter()
        .map(|d| x509_parser::extensions::X509Extension::from_der(d).map(|(_, e)| e))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            Failure::new(
                FailInfo::BadCertTemplate,
                format!("the template's extensions: {e}"),
            )
        })?;
    let refs: Vec<&_> = extensions.iter().collect();
    Ok(crate::csr::left_out(subject.as_ref(), &refs))
}

/// A name's common name, if it has one.
fn common_name(name: &Name) -> Result<Option<String>, Failure> {
    let der = name.to_der().map_err(malformed("the subject"))?;
    let (_, parsed) = x509_parser::x509::X509Name::from_der(&der)
        .map_err(|e| Failure::new(FailInfo::BadCertTemplate, format!("the subject: {e}")))?;
    let cn = parsed.iter_common_name().next().map(|cn| {
        cn.as_str().map(str::to_owned).map_err(|_| {
            Failure::new(
                FailInfo::BadCertTemplate,
                "the subject's common name is not a string",
            )
        })
    });
    cn.transpose()
}

/// What an `rr` asks to revoke: a certificate by issuer and serial.
#[derive(Debug)]
pub struct RevocationRequest {
    /// The issuer's name, RFC 4514 (as [`crate::ca::CertInfo`] has it).
    pub issuer: String,
    pub serial: crate::Serial,
    /// The CRL reason code asked for, if any.
    pub reason: Option<u8>,
}

/// The one revocation in an `rr` (RFC 9483 4.2: exactly one).
pub fn revocation_request(
    details: &[cmpv2::rev::RevDetails],
) -> Result<RevocationRequest, Failure> {
    let [d] = details else {
        return Err(Failure::new(
            FailInfo::BadRequest,
            format!("{} revocations: one a message", details.len()),
        ));
    };
    let t = &d.cert_details;
    let (Some(issuer), Some(serial)) = (&t.issuer, &t.serial_number) else {
        return Err(Failure::new(
            FailInfo::BadCertId,
            "certDetails must give the issuer and serialNumber",
        ));
    };
    let reason = d
        .crl_entry_details
        .iter()
        .flatten()
        .find(|e| e.extn_id == CRL_REASON)
        .map(|e| match e.extn_value.as_bytes() {
            // ENUMERATED, one octet.
            [0x0a, 0x01, r] => Ok(*r),
            _ => Err(Failure::new(
                FailInfo::BadRequest,
                "the CRL reason is not one ENUMERATED octet",
            )),
        })
        .transpose()?;
    let issuer = issuer.to_der().map_err(malformed("the issuer"))?;
    let (_, issuer) = x509_parser::x509::X509Name::from_der(&issuer)
        .map_err(|e| Failure::new(FailInfo::BadCertId, format!("the issuer: {e}")))?;
    Ok(RevocationRequest {
        issuer: issuer.to_string(),
        serial: crate::Serial::from_bytes(serial.as_bytes())
            .map_err(|e| Failure::new(FailInfo::BadCertId, e.to_string()))?,
        reason,
    })
}

/// What a `genm` asks for that fleetgate answers: the CA certificates
/// (id-it-caCerts; an empty `genm` gets them too).
pub fn wants_ca_certs(itavs: &[InfoTypeAndValue]) -> bool {
    itavs.is_empty() || itavs.iter().any(|i| i.oid == CA_CERTS)
}

/// A `certConf`'s one status: the hash of the certificate it confirms,
/// and whether the requester accepted it.
#[derive(Debug)]
pub struct Confirmation {
    pub cert_req_id: Int,
    pub cert_hash: Vec<u8>,
    /// The rejection's words, if the requester rejected the certificate.
    pub rejected: Option<String>,
}

pub fn confirmation(statuses: &[cmpv2::status::CertStatus<'_>]) -> Result<Confirmation, Failure> {
    let [s] = statuses else {
        return Err(Failure::new(
            FailInfo::BadRequest,
            format!("{} certificate statuses: one a certConf", statuses.len()),
        ));
    };
    let rejected = s.status_info.as_ref().and_then(|i| {
        (i.status == PkiStatus::Rejection).then(|| {
            i.status_string
                .iter()
                .flatten()
                .map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        })
    });
    Ok(Confirmation {
        cert_req_id: s.cert_req_id.clone(),
        cert_hash: s.cert_hash.as_bytes().to_vec(),
        rejected,
    })
}

/// The SHA-256 of a certificate, as a certConf's certHash is for
/// fleetgate's (ECDSA with SHA-256) certificates.
pub fn cert_hash(der: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .to_vec()
}

/// PKIStatusInfo with a failure bit (`cmpv2`'s cannot carry it).
#[derive(Sequence)]
struct StatusInfo {
    status: PkiStatus,
    status_string: Option<Vec<String>>,
    fail_info: Option<BitString>,
}

/// ErrorMsgContent (RFC 4210 5.3.21).
#[derive(Sequence)]
struct ErrorContent {
    pki_status_info: StatusInfo,
    error_code: Option<Int>,
    error_details: Option<Vec<String>>,
}

/// A response's body.
#[derive(Debug)]
pub enum Reply {
    /// `ip`, `cp` or `kup` (after `ir`, `cr`, `kur`): the certificate,
    /// and what was asked for and left out of it (then granted with
    /// modifications, saying what in the statusString).
    Issued {
        cert_req_id: Int,
        cert: Vec<u8>,
        left_out: Vec<String>,
    },
    /// `rp`: the revocation was done.
    Revoked,
    /// `genp` with id-it-caCerts holding these certificates (DER).
    CaCerts(Vec<Vec<u8>>),
    /// `genp` answering nothing fleetgate knows.
    NothingKnown,
    /// `pkiconf`.
    Confirmed,
    /// `error`.
    Error(Failure),
}

/// Signs CMP responses: the CMP signer's key, its certificate and the
/// issuing CA's (sent as extraCerts, RFC 9483 3.3).
pub struct Responder {
    key: CaKey,
    name: GeneralName,
    kid: Option<OctetString>,
    extra_certs: Vec<Certificate>,
    not_after: time::OffsetDateTime,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// `key` signs; `cert` (DER) is its certificate, `issuing` the CA's.
    pub fn new(key: CaKey, cert: &[u8], issuing: &[u8]) -> Result<Self, Error> {
        let bad = |e: der::Error| Error::Certificate(format!("CMP signer: {e}"));
        let signer = Certificate::from_der(cert).map_err(bad)?;
        let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert)
            .map_err(|e| Error::Certificate(format!("CMP signer: {e}")))?;
        let kid = parsed
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(k.0.to_vec())
                }
                _ => None,
            })
            .map(OctetString::new)
            .transpose()
            .map_err(bad)?;
        Ok(Self {
            key,
            name: GeneralName::DirectoryName(signer.tbs_certificate.subject.clone()),
            kid,
            not_after: parsed.validity().not_after.to_datetime(),
            extra_certs: vec![signer, Certificate::from_der(issuing).map_err(bad)?],
        })
    }

    /// When the signer's certificate expires.
    pub fn not_after(&self) -> time::OffsetDateTime {
        self.not_after
    }

    /// A signed response to a request with header `to` (none when the
    /// request did not parse), of kind `kind` (`ir`, ...), answering
    /// `reply`; `implicit_confirm` grants it. Returns the DER and the
    /// response's senderNonce (a certConf must echo it).
    pub fn respond(
        &self,
        to: Option<&PkiHeader<'_>>,
        kind: &str,
        reply: Reply,
        implicit_confirm: bool,
    ) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let enc = |e: der::Error| Error::Certificate(format!("encoding a CMP response: {e}"));
        let nonce = nonce()?;
        let header = PkiHeader {
            pvno: to.map_or(Pvno::Cmp2000, |h| h.pvno),
            sender: self.name.clone(),
            recipient: to.map_or_else(
                || GeneralName::DirectoryName(Name::default()),
                |h| h.sender.clone(),
            ),
            message_time: Some(
                GeneralizedTime::from_system_time(std::time::SystemTime::now()).map_err(enc)?,
            ),
            protection_alg: Some(AlgorithmIdentifierOwned {
                oid: ECDSA_WITH_SHA256,
                parameters: None,
            }),
            sender_kid: self.kid.clone(),
            recip_kid: None,
            trans_id: to.and_then(|h| h.trans_id.clone()),
            sender_nonce: Some(OctetString::new(nonce.clone()).map_err(enc)?),
            recip_nonce: to.and_then(|h| h.sender_nonce.clone()),
            free_text: None,
            general_info: implicit_confirm.then(|| {
                vec![InfoTypeAndValue {
                    oid: IMPLICIT_CONFIRM,
                    value: Some(Any::from(Null)),
                }]
            }),
        };
        let body = body(kind, reply).map_err(enc)?;
        let der = signed(&header, &body, &self.key, &self.extra_certs)?;
        Ok((der, nonce))
    }
}

/// A PKIMessage of `header` and `body` (DER), protected by `key`'s
/// ECDSA P-256 signature, with `extra_certs`.
fn signed(
    header: &PkiHeader<'_>,
    body: &[u8],
    key: &impl SigningKey,
    extra_certs: &[Certificate],
) -> Result<Vec<u8>, Error> {
    let enc = |e: der::Error| Error::Certificate(format!("encoding a CMP message: {e}"));
    let header = header.to_der().map_err(enc)?;
    let part = ProtectedPart {
        header: AnyRef::from_der(&header).map_err(enc)?,
        body: AnyRef::from_der(body).map_err(enc)?,
    };
    let signature = key
        .sign(&part.to_der().map_err(enc)?)
        .map_err(|e| Error::Certificate(format!("signing a CMP message: {e}")))?;
    let extra: Vec<Vec<u8>> = extra_certs
        .iter()
        .map(|c| c.to_der())
        .collect::<Result<_, _>>()
        .map_err(enc)?;
    RawMessage {
        header: part.header,
        body: part.body,
        protection: Some(BitString::from_bytes(&signature).map_err(enc)?),
        extra_certs: Some(
            extra
                .iter()
                .map(|c| AnyRef::from_der(c))
                .collect::<Result<_, _>>()
                .map_err(enc)?,
        ),
    }
    .to_der()
    .map_err(enc)
}

fn nonce() -> Result<Vec<u8>, Error> {
    let mut n = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n)
        .map_err(|_| Error::Certificate("no randomness for a nonce".into()))?;
    Ok(n.to_vec())
}

/// An `ir` as a CMP client sends it (what fleetgate's tests and
/// enrollment benchmark send): `cn` asks for `key` to be certified, with
/// its proof of possession; the message is protected by `sender_key`,
/// whose certificate is first in `sender_chain` (DER).
pub fn initialization_request(
    sender_key: &KeyPair,
    sender_chain: &[Vec<u8>],
    cn: &str,
    key: &KeyPair,
    implicit_confirm: bool,
) -> Result<Vec<u8>, Error> {
    use crmf::pop::PopoSigningKey;
    use crmf::request::{CertReqMsg, CertRequest as Req, CertTemplate};
    use rcgen::PublicKeyData;
    use std::str::FromStr;
    let enc = |e: der::Error| Error::Certificate(format!("encoding a CMP request: {e}"));
    let extra = sender_chain
        .iter()
        .map(|c| Certificate::from_der(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(enc)?;
    let Some(sender) = extra.first() else {
        return Err(Error::InvalidInput {
            reason: "a CMP request needs its sender's certificate".into(),
        });
    };
    let ecdsa = AlgorithmIdentifierOwned {
        oid: ECDSA_WITH_SHA256,
        parameters: None,
    };
    let subject = Name::from_str(&format!("CN={cn}")).map_err(enc)?;
    let cert_req = Req {
        cert_req_id: Int::new(&[0]).map_err(enc)?,
        cert_template: CertTemplate {
            version: None,
            serial_number: None,
            signature: None,
            issuer: None,
            validity: None,
            subject: Some(subject),
            subject_public_key_info: Some(
                x509_cert::spki::SubjectPublicKeyInfoOwned::from_der(
                    &key.subject_public_key_info(),
                )
                .map_err(enc)?,
            ),
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: None,
        },
        controls: None,
    };
    let pop = key
        .sign(&cert_req.to_der().map_err(enc)?)
        .map_err(|e| Error::Certificate(format!("signing the proof of possession: {e}")))?;
    let body = PkiBody::Ir(vec![CertReqMsg {
        cert_req,
        popo: Some(ProofOfPossession::Signature(Box::new(PopoSigningKey {
            poposk_input: None,
            alg_id: ecdsa.clone(),
            signature: BitString::from_bytes(&pop).map_err(enc)?,
        }))),
        reg_info: None,
    }]);
    let header = PkiHeader {
        pvno: Pvno::Cmp2000,
        sender: GeneralName::DirectoryName(sender.tbs_certificate.subject.clone()),
        recipient: GeneralName::DirectoryName(sender.tbs_certificate.issuer.clone()),
        message_time: Some(
            GeneralizedTime::from_system_time(std::time::SystemTime::now()).map_err(enc)?,
        ),
        protection_alg: Some(ecdsa),
        sender_kid: None,
        recip_kid: None,
        trans_id: Some(OctetString::new(nonce()?).map_err(enc)?),
        sender_nonce: Some(OctetString::new(nonce()?).map_err(enc)?),
        recip_nonce: None,
        free_text: None,
        general_info: implicit_confirm.then(|| {
            vec![InfoTypeAndValue {
                oid: IMPLICIT_CONFIRM,
                value: Some(Any::from(Null)),
            }]
        }),
    };
    signed(&header, &body.to_der().map_err(enc)?, sender_key, &extra)
}

/// The certificate (DER) an `ip`, `cp` or `kup` carries, or why there
/// is none: the error's words, or what came instead.
pub fn issued_certificate(der: &[u8]) -> Result<Vec<u8>, String> {
    let raw = RawMessage::from_der(der).map_err(|e| format!("not a PKIMessage: {e}"))?;
    let body = raw.body.to_der().map_err(|e| e.to_string())?;
    // An error body is read as ours: cmpv2 0.2 cannot decode most
    // failure bits (see the module doc).
    if let Ok(Some(e)) = ContextSpecific::<ErrorContent>::decode_explicit(
        &mut der::SliceReader::new(&body).map_err(|e| e.to_string())?,
        TagNumber::new(23),
    ) {
        let text = e
            .value
            .pki_status_info
            .status_string
            .unwrap_or_default()
            .join("; ");
        return Err(format!("error: {text}"));
    }
    let body = PkiBody::from_der(&body).map_err(|e| format!("not a PKIBody: {e}"))?;
    let rep = match &body {
        PkiBody::Ip(r) | PkiBody::Cp(r) | PkiBody::Kup(r) => r,
        other => return Err(format!("{} instead of a certificate", body_name(other))),
    };
    match rep
        .response
        .first()
        .and_then(|r| r.certified_key_pair.as_ref())
    {
        Some(CertifiedKeyPair {
            cert_or_enc_cert: CertOrEncCert::Certificate(c),
            ..
        }) => c.to_der().map_err(|e| e.to_string()),
        _ => Err("no certificate in the response".into()),
    }
}

/// The DER of a response body answering a request of kind `kind`.
fn body(kind: &str, reply: Reply) -> Result<Vec<u8>, der::Error> {
    let accepted = || PkiStatusInfo {
        status: PkiStatus::Accepted,
        status_string: None,
        fail_info: None,
    };
    // What the statusString says lives as long as the body that borrows it.
    let notes = match &reply {
        Reply::Issued { left_out, .. } => left_out.clone(),
        _ => Vec::new(),
    };
    let body = match reply {
        Reply::Issued {
            cert_req_id, cert, ..
        } => {
            let said = notes
                .iter()
                .map(der::asn1::Utf8StringRef::new)
                .collect::<Result<Vec<_>, _>>()?;
            let status = if said.is_empty() {
                accepted()
            } else {
                PkiStatusInfo {
                    status: PkiStatus::GrantedWithMods,
                    status_string: Some(said),
                    fail_info: None,
                }
            };
            let rep = CertRepMessage {
                ca_pubs: None,
                response: vec![CertResponse {
                    cert_req_id,
                    status,
                    certified_key_pair: Some(CertifiedKeyPair {
                        cert_or_enc_cert: CertOrEncCert::Certificate(Box::new(
                            Certificate::from_der(&cert)?,
                        )),
                        priv_key: None,
                        publication_info: None,
                    }),
                    rsp_info: None,
                }],
            };
            match kind {
                "ir" => PkiBody::Ip(rep),
                "kur" => PkiBody::Kup(rep),
                _ => PkiBody::Cp(rep),
            }
        }
        Reply::Revoked => PkiBody::Rp(RevRepContent {
            status: vec![accepted()],
            rev_certs: None,
            crls: None,
        }),
        Reply::CaCerts(certs) => {
            let certs = certs
                .iter()
                .map(|c| Certificate::from_der(c))
                .collect::<Result<Vec<_>, _>>()?;
            PkiBody::GenP(vec![InfoTypeAndValue {
                oid: CA_CERTS,
                value: Some(Any::from_der(&certs.to_der()?)?),
            }])
        }
        Reply::NothingKnown => PkiBody::GenP(Vec::new()),
        Reply::Confirmed => PkiBody::PkiConf(Null),
        Reply::Error(f) => {
            let content = ErrorContent {
                pki_status_info: StatusInfo {
                    status: PkiStatus::Rejection,
                    status_string: Some(vec![f.reason.clone()]),
                    fail_info: Some(f.info.bits()?),
                },
                error_code: None,
                error_details: None,
            };
            return ContextSpecific {
                tag_number: TagNumber::new(23),
                tag_mode: TagMode::Explicit,
                value: content,
            }
            .to_der();
        }
    };
    body.to_der()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key and its self-signed certificate (DER) named `cn`, with a
    /// subject key identifier.
    fn self_signed(cn: &str) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        (key, cert.der().to_vec())
    }

    #[test]
    fn an_ir_round_trips_and_its_protection_covers_every_byte() {
        let (sender_key, sender) = self_signed("line-1");
        let key = KeyPair::generate().unwrap();
        let ir = initialization_request(
            &sender_key,
            std::slice::from_ref(&sender),
            "dev-1",
            &key,
            true,
        )
        .unwrap();
        let msg = Incoming::parse(&ir).unwrap();
        assert_eq!(msg.kind(), "ir");
        assert!(msg.wants_implicit_confirm());
        let (first, rest) = msg.signer_chain().unwrap();
        assert_eq!(first, sender);
        assert!(rest.is_empty());
        msg.verify_protection(&sender).unwrap();
        let PkiBody::Ir(reqs) = &msg.msg.body else {
            panic!("not an ir")
        };
        let req = cert_request(reqs).unwrap();
        assert_eq!(req.key.subject_cn.as_deref(), Some("dev-1"));
        // Another certificate's key does not verify it.
        let (_, other) = self_signed("line-1");
        let err = msg.verify_protection(&other).unwrap_err();
        assert_eq!(err.info, FailInfo::BadMessageCheck);
        // Nor does it verify with one changed byte of the subject: the
        // last "1" of "dev-1".
        let at = ir.windows(5).position(|w| w == b"dev-1").unwrap() + 4;
        let mut tampered = ir.clone();
        tampered[at] = b'2';
        let msg = Incoming::parse(&tampered).unwrap();
        let err = msg.verify_protection(&sender).unwrap_err();
        assert_eq!(err.info, FailInfo::BadMessageCheck, "{err}");
        // Nor the proof of possession, made over the original request.
        let PkiBody::Ir(reqs) = &msg.msg.body else {
            panic!("not an ir")
        };
        assert_eq!(cert_request(reqs).unwrap_err().info, FailInfo::BadPop);
    }

    #[test]
    fn responses_carry_the_certificate_or_the_reason() {
        let (key, signer) = self_signed("fleetgate CMP signer");
        let (_, issuing) = self_signed("issuing");
        let responder =
            Responder::new(crate::keys::CaKey::from_keypair(key), &signer, &issuing).unwrap();
        let (sender_key, sender) = self_signed("line-1");
        let ir = initialization_request(
            &sender_key,
            &[sender],
            "dev-1",
            &KeyPair::generate().unwrap(),
            false,
        )
        .unwrap();
        let req = Incoming::parse(&ir).unwrap();
        let (_, cert) = self_signed("dev-1");
        let (answer, nonce) = responder
            .respond(
                Some(&req.msg.header),
                "ir",
                Reply::Issued {
                    cert_req_id: Int::new(&[0]).unwrap(),
                    cert: cert.clone(),
                    left_out: Vec::new(),
                },
                false,
            )
            .unwrap();
        assert_eq!(issued_certificate(&answer).unwrap(), cert);
        // What was asked for and left out: granted with modifications,
        // saying what.
        let (changed, _) = responder
            .respond(
                Some(&req.msg.header),
                "ir",
                Reply::Issued {
                    cert_req_id: Int::new(&[0]).unwrap(),
                    cert: cert.clone(),
                    left_out: vec!["the subject's O=Acme left out".into()],
                },
                false,
            )
            .unwrap();
        assert_eq!(issued_certificate(&changed).unwrap(), cert);
        let parsed = Incoming::parse(&changed).unwrap();
        let PkiBody::Ip(rep) = &parsed.msg.body else {
            panic!("not an ip")
        };
        let status = &rep.response[0].status;
        assert_eq!(status.status, PkiStatus::GrantedWithMods);
        let said: Vec<&str> = status
            .status_string
            .iter()
            .flatten()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(said, ["the subject's O=Acme left out"]);
        // The answer is protected by the signer, echoes the transaction
        // and the sender's nonce, and carries its own.
        let back = Incoming::parse(&answer).unwrap();
        back.verify_protection(&signer).unwrap();
        assert_eq!(back.msg.header.trans_id, req.msg.header.trans_id);
        assert_eq!(back.msg.header.recip_nonce, req.msg.header.sender_nonce);
        assert_eq!(
            back.msg.header.sender_nonce.as_ref().map(|n| n.as_bytes()),
            Some(nonce.as_slice())
        );
        let (answer, _) = responder
            .respond(
                Some(&req.msg.header),
                "ir",
                Reply::Error(Failure::new(FailInfo::NotAuthorized, "no uses left")),
                false,
            )
            .unwrap();
        let err = issued_certificate(&answer).unwrap_err();
        assert!(err.contains("no uses left"), "{err}");
    }

    #[test]
    fn failure_bits_are_named_bits() {
        // badPOP is bit 9: second octet, 0x40, six unused bits.
        let b = FailInfo::BadPop.bits().unwrap();
        assert_eq!(b.raw_bytes(), &[0x00, 0x40]);
        assert_eq!(b.unused_bits(), 6);
        let b = FailInfo::BadAlg.bits().unwrap();
        assert_eq!(b.raw_bytes(), &[0x80]);
        assert_eq!(b.unused_bits(), 7);
        let b = FailInfo::NotAuthorized.bits().unwrap();
        assert_eq!(b.raw_bytes(), &[0, 0, 0x01]);
        assert_eq!(b.unused_bits(), 0);
    }

    #[test]
    fn garbage_is_bad_data_format() {
        for bytes in [&b""[..], b"\x30\x03\x02\x01\x02", b"hello"] {
            let err = Incoming::parse(bytes).unwrap_err();
            assert_eq!(err.info, FailInfo::BadDataFormat, "{err}");
        }
    }

    #[test]
    fn error_bodies_decode_as_cmpv2_errors() {
        let der = body("ir", Reply::Error(Failure::new(FailInfo::BadRequest, "x"))).unwrap();
        let parsed = PkiBody::from_der(&der).unwrap();
        assert!(matches!(parsed, PkiBody::Error(_)), "{parsed:?}");
    }
}
