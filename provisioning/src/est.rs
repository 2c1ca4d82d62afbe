//! EST (RFC 7030) bodies, sans network: certs-only CMS answers, the
//! base64 transfer encoding, and the CSR attributes fleetgate asks for.
//! The HTTP side is the broker's (`api::est`).

use base64ct::{Base64, Encoding};
use cms::cert::CertificateChoices;
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{CertificateSet, EncapsulatedContentInfo, SignedData, SignerInfos};
use der::asn1::{ObjectIdentifier, SetOfVec};
use der::{Any, Decode, Encode};

use crate::Error;

/// id-data (RFC 5652).
const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
/// id-signedData (RFC 5652).
const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
/// ecdsa-with-SHA256: how fleetgate would like CSRs signed.
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");

/// The largest base64 body an EST request may carry.
pub const MAX_BODY: usize = 64 * 1024;

/// A certs-only CMS SignedData (RFC 5652 with no signers: RFC 7030's
/// "Simple PKI Response", RFC 5272) holding `certs` (DER), as DER.
pub fn certs_only<'a>(certs: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<u8>, Error> {
    let bad = |e: der::Error| Error::Certificate(format!("a certificate for CMS: {e}"));
    let mut set = SetOfVec::new();
    for der in certs {
        let cert = x509_cert::Certificate::from_der(der).map_err(bad)?;
        set.insert(CertificateChoices::Certificate(cert))
            .map_err(bad)?;
    }
    let signed = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::new(),
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: ID_DATA,
            econtent: None,
        },
        certificates: Some(CertificateSet(set)),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::new()),
    };
    let info = ContentInfo {
        content_type: ID_SIGNED_DATA,
        content: Any::encode_from(&signed).map_err(bad)?,
    };
    info.to_der().map_err(bad)
}

/// The certificates in a certs-only CMS (DER), in its order: for tests
/// and clients.
pub fn certs_of(cms_der: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    let bad = |e: der::Error| Error::InvalidInput {
        reason: format!("not a certs-only CMS: {e}"),
    };
    let info = ContentInfo::from_der(cms_der).map_err(bad)?;
    if info.content_type != ID_SIGNED_DATA {
        return Err(Error::InvalidInput {
            reason: format!("CMS content type {} is not signed data", info.content_type),
        });
    }
    let signed: SignedData = info.content.decode_as().map_err(bad)?;
    let mut out = Vec::new();
    for c in signed
        .certificates
        .map(|s| s.0.into_vec())
        .unwrap_or_default()
    {
        if let CertificateChoices::Certificate(cert) = c {
            out.push(cert.to_der().map_err(bad)?);
        }
    }
    Ok(out)
}

/// An EST body's base64 (RFC 7030 4.2.1: base64 with line breaks, as
/// `Content-Transfer-Encoding: base64`) as bytes.
pub fn from_base64(body: &[u8]) -> Result<Vec<u8>, Error> {
    if body.len() > MAX_BODY {
        return Err(Error::TooLarge {
            len: body.len(),
            max: MAX_BODY,
        });
    }
    let compact: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if compact.is_empty() {
        return Err(Error::InvalidInput {
            reason: "the body is empty: EST wants a base64 PKCS#10 request".into(),
        });
    }
    Base64::decode_vec(
        std::str::from_utf8(&compact).map_err(|_| Error::InvalidInput {
            reason: "the body is not base64 text".into(),
        })?,
    )
    .map_err(|e| Error::InvalidInput {
        reason: format!("the body is not base64: {e}"),
    })
}

/// Base64 in lines of 64 characters ended by LF, as EST answers are sent
/// (RFC 7030 4: CRLF or LF; GNU `base64 -d` takes LF only).
pub fn to_base64(der: &[u8]) -> String {
    let flat = Base64::encode_string(der);
    let mut out = String::with_capacity(flat.len() + flat.len() / 64 + 2);
    for line in flat.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out
}

/// The CSR attributes fleetgate asks for (RFC 7030 4.5.2): signed with
/// ecdsa-with-SHA256. (`CsrAttrs ::= SEQUENCE OF AttrOrOID`.)
pub fn csr_attrs() -> Vec<u8> {
    let attrs: Vec<ObjectIdentifier> = vec![ECDSA_WITH_SHA256];
    attrs.to_der().expect("a sequence of OIDs encodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_only_cms_round_trips_and_base64_takes_line_breaks() {
        let tmp = tempfile::tempdir().unwrap();
        let auth =
            crate::Authority::open_or_init(&tmp.path().join("d"), &Default::default()).unwrap();
        let ca = &auth.ca;
        let root = ca.root_der().as_ref().to_vec();
        let issuing = ca.issuing_der().as_ref().to_vec();
        let cms = certs_only([root.as_slice(), issuing.as_slice()]).unwrap();
        let back = certs_of(&cms).unwrap();
        assert_eq!(back.len(), 2);
        assert!(back.contains(&root) && back.contains(&issuing));
        let text = to_base64(&cms);
        assert!(text.lines().all(|l| l.len() <= 64));
        assert_eq!(from_base64(text.as_bytes()).unwrap(), cms);
        assert!(matches!(
            from_base64(b"not base64!"),
            Err(Error::InvalidInput { .. })
        ));
        assert!(matches!(
            certs_of(b"\x30\x03\x02\x01\x01"),
            Err(Error::InvalidInput { .. })
        ));
        assert!(matches!(
            certs_only([b"garbage".as_slice()]),
            Err(Error::Certificate(_))
        ));
    }

    #[test]
    fn csr_attributes_name_ecdsa_with_sha256() {
        let a = csr_attrs();
        let oids: Vec<ObjectIdentifier> = Vec::from_der(&a).unwrap();
        assert_eq!(oids, [ECDSA_WITH_SHA256]);
    }
}
