//! Certificate signing requests: parsed, checked and reduced to the one thing
//! we take from them, the public key. Sans-IO.
//!
//! The subject, SANs and extensions a CSR asks for are ignored on purpose: the
//! device id comes from the enrollment request, and the CA decides what goes
//! into a certificate.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension, X509Extension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519, OID_X509_COMMON_NAME,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::X509Name;

use crate::Error;

/// The largest CSR accepted, PEM or DER. An RSA-4096 CSR in PEM is under 2 KiB.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// The smallest RSA modulus accepted.
pub const MIN_RSA_BITS: usize = 2048;
/// The largest RSA modulus accepted (bounds the cost of verifying a request).
pub const MAX_RSA_BITS: usize = 8192;

/// The device key types fleetgate issues certificates for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    Rsa { bits: usize },
}

impl std::fmt::Display for KeyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyKind::EcdsaP256 => f.write_str("ecdsa-p256"),
            KeyKind::EcdsaP384 => f.write_str("ecdsa-p384"),
            KeyKind::Ed25519 => f.write_str("ed25519"),
            KeyKind::Rsa { bits } => write!(f, "rsa-{bits}"),
        }
    }
}

/// A CSR whose self-signature verified and whose key is acceptable.
#[derive(Debug)]
pub struct ValidatedCsr {
    pub(crate) public_key: rcgen::SubjectPublicKeyInfo,
    pub key_kind: KeyKind,
    /// The subject's common name, if it has one (EST names the device
    /// there).
    pub subject_cn: Option<String>,
    /// What the request asked for that no certificate of fleetgate's
    /// carries ([`left_out`]), to tell the requester.
    pub left_out: Vec<String>,
}

impl ValidatedCsr {
    /// A key whose holder proved possession some other way than a PKCS#10
    /// self-signature (CMP's CRMF proof of possession, checked by the
    /// caller): `spki` is its DER SubjectPublicKeyInfo, checked as a CSR's
    /// key is.
    pub fn proven_key(spki: &[u8], subject_cn: Option<String>) -> Result<Self, Error> {
        let (rest, parsed) =
            x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).map_err(|e| {
                Error::MalformedCsr {
                    reason: format!("the public key does not parse: {e}"),
                }
            })?;
        if !rest.is_empty() {
            return Err(Error::MalformedCsr {
                reason: format!("{} trailing bytes after the public key", rest.len()),
            });
        }
        let key_kind = key_kind(&parsed)?;
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(spki).map_err(|e| Error::UnsupportedKey {
                reason: format!("{key_kind}: {e}"),
            })?;
        Ok(Self {
            public_key,
            key_kind,
            subject_cn,
            left_out: Vec::new(),
        })
    }
}

/// Signature algorithms accepted on requests and proofs of possession,
/// one policy for the JSON API, EST and CMP: ECDSA and RSA with SHA-2, and
/// Ed25519; never SHA-1 or MD5.
pub const ACCEPTED_SIGNATURES: [&str; 7] = [
    "1.2.840.10045.4.3.2",   // ecdsa-with-SHA256
    "1.2.840.10045.4.3.3",   // ecdsa-with-SHA384
    "1.2.840.10045.4.3.4",   // ecdsa-with-SHA512
    "1.2.840.113549.1.1.11", // sha256WithRSAEncryption
    "1.2.840.113549.1.1.12", // sha384WithRSAEncryption
    "1.2.840.113549.1.1.13", // sha512WithRSAEncryption
    "1.3.101.112",           // Ed25519
];

/// Parses a CSR in PEM or DER, verifies its self-signature and checks its key.
pub fn validate_csr(input: &[u8]) -> Result<ValidatedCsr, Error> {
    if input.len() > MAX_CSR_LEN {
        return Err(Error::TooLarge {
            len: input.len(),
            max: MAX_CSR_LEN,
        });
    }
    let der = csr_der(input)?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| Error::MalformedCsr {
            reason: format!("not a PKCS#10 request: {e}"),
        })?;
    if !rest.is_empty() {
        return Err(Error::MalformedCsr {
            reason: format!("{} trailing bytes after the request", rest.len()),
        });
    }

    let spki = &csr.certification_request_info.subject_pki;
    let key_kind = key_kind(spki)?;
    let alg = csr.signature_algorithm.algorithm.to_id_string();
    if !ACCEPTED_SIGNATURES.contains(&alg.as_str()) {
        return Err(Error::CsrWeakSignature { algorithm: alg });
    }
    csr.verify_signature().map_err(|_| Error::CsrBadSignature)?;

    let public_key =
        rcgen::SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| Error::UnsupportedKey {
            reason: format!("{key_kind}: {e}"),
        })?;
    let subject_cn = csr
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .map(|cn| {
            cn.as_str()
                .map(str::to_owned)
                .map_err(|_| Error::MalformedCsr {
                    reason: "the subject's common name is not a string".into(),
                })
        })
        .transpose()?;
    let extensions: Vec<&X509Extension<'_>> = csr
        .certification_request_info
        .iter_attributes()
        .filter_map(|a| match a.parsed_attribute() {
            ParsedCriAttribute::ExtensionRequest(r) => Some(r.extensions.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let left_out = left_out(Some(&csr.certification_request_info.subject), &extensions);
    Ok(ValidatedCsr {
        public_key,
        key_kind,
        subject_cn,
        left_out,
    })
}

/// What a request asked for that fleetgate puts in no certificate, in
/// words for the requester (CMP's statusString): the subject's attributes
/// but its common name (a certificate names its device by its id alone),
/// and names asked for as subjectAltName (a certificate's only one is the
/// device's `urn:fleetgate:` identity). Other requested extensions are
/// the CA's to set, as always, and not mentioned. Empty when nothing was
/// left out.
pub fn left_out(subject: Option<&X509Name<'_>>, extensions: &[&X509Extension<'_>]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(name) = subject {
        let dropped: Vec<String> = name
            .iter_attributes()
            .filter(|a| *a.attr_type() != OID_X509_COMMON_NAME)
            .map(|a| {
                let value = a.as_str().unwrap_or("(not text)");
                format!("{}={value}", attribute_name(&a.attr_type().to_id_string()))
            })
            .collect();
        if !dropped.is_empty() {
            out.push(format!(
                "the subject's {} left out: a certificate names its device by CN alone",
                dropped.join(", ")
            ));
        }
    }
    let names: Vec<String> = extensions
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.iter()),
            _ => None,
        })
        .flatten()
        .filter_map(general_name_words)
        .collect();
    if !names.is_empty() {
        out.push(format!(
            "subjectAltName {} left out: a certificate's only one is its device's \
             urn:fleetgate: identity",
            names.join(", ")
        ));
    }
    out
}

/// A name attribute's usual short name.
fn attribute_name(oid: &str) -> &str {
    match oid {
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.5" => "serialNumber",
        "1.2.840.113549.1.9.1" => "emailAddress",
        other => other,
    }
}

/// A subjectAltName entry as `openssl -sans` writes it; `None` for the
/// device's own identity, which the certificate carries anyway.
fn general_name_words(n: &GeneralName<'_>) -> Option<String> {
    Some(match n {
        GeneralName::URI(u) if u.starts_with(crate::id::URN_PREFIX) => return None,
        GeneralName::DNSName(d) => format!("DNS:{d}"),
        GeneralName::URI(u) => format!("URI:{u}"),
        GeneralName::RFC822Name(m) => format!("email:{m}"),
        GeneralName::IPAddress(ip) => match <[u8; 4]>::try_from(*ip) {
            Ok(v4) => format!("IP:{}", std::net::Ipv4Addr::from(v4)),
            Err(_) => match <[u8; 16]>::try_from(*ip) {
                Ok(v6) => format!("IP:{}", std::net::Ipv6Addr::from(v6)),
                Err(_) => "IP:(malformed)".to_owned(),
            },
        },
        other => format!("{other}"),
    })
}

fn csr_der(input: &[u8]) -> Result<Vec<u8>, Error> {
    let trimmed = input.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        let der = CertificateSigningRequestDer::from_pem_slice(trimmed).map_err(|e| {
            Error::MalformedCsr {
                reason: format!("no CERTIFICATE REQUEST in the PEM: {e}"),
            }
        })?;
        Ok(der.as_ref().to_vec())
    } else if input.is_empty() {
        Err(Error::MalformedCsr {
            reason: "empty request".into(),
        })
    } else {
        Ok(input.to_vec())
    }
}

fn key_kind(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<KeyKind, Error> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| Error::UnsupportedKey {
                reason: "EC key without a named curve".into(),
            })?;
        if curve == OID_EC_P256 {
            Ok(KeyKind::EcdsaP256)
        } else if curve == OID_NIST_EC_P384 {
            Ok(KeyKind::EcdsaP384)
        } else {
            Err(Error::UnsupportedKey {
                reason: format!("EC curve {curve} (use P-256 or P-384)"),
            })
        }
    } else if *alg == OID_SIG_ED25519 {
        Ok(KeyKind::Ed25519)
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(Error::MalformedCsr {
                reason: "RSA public key does not parse".into(),
            });
        };
        let bits = rsa.key_size();
        if bits < MIN_RSA_BITS {
            return Err(Error::UnsupportedKey {
                reason: format!("RSA key of {bits} bits (at least {MIN_RSA_BITS})"),
            });
        }
        if bits > MAX_RSA_BITS {
            return Err(Error::UnsupportedKey {
                reason: format!("RSA key of {bits} bits (at most {MAX_RSA_BITS})"),
            });
        }
        Ok(KeyKind::Rsa { bits })
    } else {
        Err(Error::UnsupportedKey {
            reason: format!(
                "key algorithm {alg} (use ECDSA P-256/P-384, Ed25519 or RSA >= {MIN_RSA_BITS})"
            ),
        })
    }
}

/// The device-side half of enrollment: a fresh key and a CSR for it. Used by
/// the CLI and the simulated fleet; the key never leaves the caller.
pub fn new_key_and_csr(
    kind: KeyKind,
    common_name: &str,
) -> Result<(rcgen::KeyPair, String), Error> {
    let alg = match kind {
        KeyKind::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
        KeyKind::Rsa { .. } => {
            return Err(Error::UnsupportedKey {
                reason: "RSA keys cannot be generated here; bring a CSR (--csr)".into(),
            })
        }
    };
    let key = rcgen::KeyPair::generate_for(alg)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.pem()?))
}

/// A private key as PEM for the tools that will load it: PKCS#8 v1
/// (RFC 5208). ring writes Ed25519 keys as PKCS#8 v2 (RFC 5958, with the
/// public key), which OpenSSL 3.0, mosquitto and Python's ssl refuse.
pub fn private_key_pem(key: &rcgen::KeyPair) -> String {
    /// The v2 prefix ring writes, up to the 32-octet seed: version 1,
    /// id-Ed25519, OCTET STRING { OCTET STRING (32) }.
    const V2_HEAD: [u8; 14] = [
        0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    let der = key.serialize_der();
    match der.get(2..2 + V2_HEAD.len()) {
        Some(head) if head == V2_HEAD && der.len() >= 2 + V2_HEAD.len() + 32 => {
            let seed = &der[2 + V2_HEAD.len()..2 + V2_HEAD.len() + 32];
            let mut v1 = vec![
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20,
            ];
            v1.extend_from_slice(seed);
            crate::pem::encode("PRIVATE KEY", &v1)
        }
        _ => key.serialize_pem(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_keys_are_written_as_pkcs8_v1() {
        let (key, _) = new_key_and_csr(KeyKind::Ed25519, "x").unwrap();
        let pem = private_key_pem(&key);
        let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        let der = der.secret_der();
        assert_eq!(der.len(), 48);
        assert_eq!(&der[..5], &[0x30, 0x2e, 0x02, 0x01, 0x00], "version 0 (v1)");
        // The same key: it loads and has the same public key.
        let again = rcgen::KeyPair::from_pem(&pem).unwrap();
        assert_eq!(again.public_key_raw(), key.public_key_raw());
        // ECDSA keys are left as they were.
        let (ec, _) = new_key_and_csr(KeyKind::EcdsaP256, "x").unwrap();
        assert_eq!(private_key_pem(&ec), ec.serialize_pem());
    }

    #[test]
    fn accepts_each_supported_key_type() {
        for kind in [KeyKind::EcdsaP256, KeyKind::EcdsaP384, KeyKind::Ed25519] {
            let (_key, pem) = new_key_and_csr(kind, "dev").unwrap();
            let v = validate_csr(pem.as_bytes()).unwrap();
            assert_eq!(v.key_kind, kind);
            // DER works as well as PEM.
            let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(validate_csr(der.as_ref()).unwrap().key_kind, kind);
        }
    }

    #[test]
    fn rejects_garbage_and_oversize() {
        assert!(matches!(validate_csr(b""), Err(Error::MalformedCsr { .. })));
        assert!(matches!(
            validate_csr(b"hello world"),
            Err(Error::MalformedCsr { .. })
        ));
        assert!(matches!(
            validate_csr(
                b"-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n"
            ),
            Err(Error::MalformedCsr { .. })
        ));
        assert!(matches!(
            validate_csr(&vec![b'A'; MAX_CSR_LEN + 1]),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn rejects_truncated_and_trailing_der() {
        let (_key, pem) = new_key_and_csr(KeyKind::EcdsaP256, "dev").unwrap();
        let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        for cut in [1, 10, der.len() / 2, der.len() - 1] {
            assert!(
                matches!(validate_csr(&der[..cut]), Err(Error::MalformedCsr { .. })),
                "cut at {cut}"
            );
        }
        let mut long = der.clone();
        long.push(0);
        assert!(matches!(
            validate_csr(&long),
            Err(Error::MalformedCsr { .. })
        ));
    }

    #[test]
    fn rejects_a_csr_signed_by_another_key() {
        // Same request body, signature from a different key.
        let (_k1, pem1) = new_key_and_csr(KeyKind::EcdsaP256, "dev").unwrap();
        let (_k2, pem2) = new_key_and_csr(KeyKind::EcdsaP256, "dev").unwrap();
        let der1 = CertificateSigningRequestDer::from_pem_slice(pem1.as_bytes()).unwrap();
        let der2 = CertificateSigningRequestDer::from_pem_slice(pem2.as_bytes()).unwrap();
        let (_, r1) = X509CertificationRequest::from_der(der1.as_ref()).unwrap();
        let (_, r2) = X509CertificationRequest::from_der(der2.as_ref()).unwrap();
        let info1 = r1.certification_request_info.raw;
        let info2 = r2.certification_request_info.raw;
        // What follows request 2's info: its signatureAlgorithm and signature.
        let info2_at = der2
            .as_ref()
            .windows(info2.len())
            .position(|w| w == info2)
            .unwrap();
        let tail = &der2.as_ref()[info2_at + info2.len()..];
        let mut body = info1.to_vec();
        body.extend_from_slice(tail);
        let mut forged = vec![0x30];
        push_der_len(&mut forged, body.len());
        forged.extend_from_slice(&body);
        assert!(matches!(validate_csr(&forged), Err(Error::CsrBadSignature)));
    }

    fn push_der_len(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else if len < 0x100 {
            out.extend_from_slice(&[0x81, len as u8]);
        } else {
            out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
        }
    }
}
