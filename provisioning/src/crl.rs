//! Delta CRLs (RFC 5280 §5.2.4), so that a relying party of a large fleet
//! downloads the complete CRL (every certificate listed) about once a day
//! and, between, only what changed.
//!
//! An issuing CA's complete CRL (`/crl/issuing.crl`) stays current, as
//! before. Once a day the complete CRL signed then becomes the *base*: its
//! number and what it listed are kept in the registry (a blob every node
//! reads). The delta CRL (`/crl/issuing-delta.crl`) lists what changed
//! since: certificates listed now that the base did not list, or listed
//! with another reason, and `removeFromCRL` for those the base listed that
//! are no longer listed (a suspended device resumed, an expired
//! certificate). It carries the critical Delta CRL Indicator naming the
//! base's number; complete and delta CRLs share one number sequence. With
//! a status URL, the complete CRL names its delta in a Freshest CRL
//! extension (RFC 5280 §5.2.6).
//!
//! rcgen signs CRLs without these extensions, so a CRL is made by rcgen,
//! given the extension, and signed again with the same key and algorithm.

use std::collections::BTreeMap;

use der::asn1::{BitString, Ia5String, Uint};
use der::{Decode, Encode};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use x509_cert::crl::CertificateList;
use x509_cert::ext::pkix::crl::dp::DistributionPoint;
use x509_cert::ext::pkix::crl::{BaseCrlNumber, FreshestCrl};
use x509_cert::ext::pkix::name::{DistributionPointName, GeneralName};
use x509_cert::ext::Extension;

use crate::ca::{Listed, Signer};

/// A CRL that could not be encoded (a bug, not input).
fn encoding(e: der::Error) -> Error {
    Error::Certificate(format!("encoding a CRL: {e}"))
}
use crate::{Error, RevocationReason, Serial};

/// A delta CRL's name: its complete CRL's, then this.
pub const DELTA_SUFFIX: &str = "-delta";
/// How long a base serves before the next complete CRL becomes the base.
pub const BASE_EVERY: Duration = Duration::hours(24);

/// The name under which the registry keeps the base of `crl_name`.
pub(crate) fn base_blob(crl_name: &str) -> String {
    format!("crl-base/{crl_name}")
}

/// A complete CRL's content, kept as the base of delta CRLs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    pub number: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Hex serial -> its CRL reason code (6, certificateHold, for a
    /// device not active).
    pub listed: BTreeMap<String, u8>,
}

impl Base {
    pub fn of(number: u64, at: OffsetDateTime, listed: &[Listed]) -> Self {
        Self {
            number,
            at,
            listed: listed
                .iter()
                .map(|l| (l.serial.to_hex(), reason_code(l.reason)))
                .collect(),
        }
    }

    /// Whether a newer complete CRL should take its place at `now`.
    pub fn stale(&self, now: OffsetDateTime) -> bool {
        now - self.at >= BASE_EVERY
    }
}

/// The CRL reason code of a listed certificate (RFC 5280 §5.3.1).
fn reason_code(r: Option<RevocationReason>) -> u8 {
    match r {
        None => 6,
        Some(r) => crate::ca::rcgen_reason(r) as u8,
    }
}

/// What a delta CRL lists against `base`: each changed entry, with
/// `None` as its reason for one to remove (`removeFromCRL`).
pub fn changes(base: &Base, now: &[Listed]) -> Vec<(Listed, bool)> {
    let mut out = Vec::new();
    let mut current = std::collections::HashSet::new();
    for l in now {
        let hex = l.serial.to_hex();
        if base.listed.get(&hex) != Some(&reason_code(l.reason)) {
            out.push((l.clone(), false));
        }
        current.insert(hex);
    }
    for hex in base.listed.keys() {
        if !current.contains(hex) {
            if let Ok(serial) = hex.parse::<Serial>() {
                let at = OffsetDateTime::now_utc()
                    .replace_nanosecond(0)
                    .unwrap_or(base.at);
                out.push((
                    Listed {
                        serial,
                        at,
                        reason: None,
                    },
                    true,
                ));
            }
        }
    }
    out
}

/// A complete CRL of `signer`'s listing `listed`, numbered `number`; with
/// a status URL, naming its delta (Freshest CRL).
pub fn complete(
    signer: &Signer,
    listed: &[Listed],
    number: u64,
    status_url: Option<&str>,
) -> Result<Vec<u8>, Error> {
    let der = crate::ca::crl(signer, listed, number)?;
    let Some(url) = status_url else {
        return Ok(der);
    };
    let uri = format!("{url}/crl/{}{DELTA_SUFFIX}.crl", signer.crl_name);
    let freshest = FreshestCrl(vec![DistributionPoint {
        distribution_point: Some(DistributionPointName::FullName(vec![
            GeneralName::UniformResourceIdentifier(
                Ia5String::new(&uri).map_err(|e| Error::Certificate(format!("{uri}: {e}")))?,
            ),
        ])),
        reasons: None,
        crl_issuer: None,
    }]);
    with_extension(
        signer,
        &der,
        oid(2, 5, 29, 46),
        false,
        &freshest.to_der().map_err(encoding)?,
    )
}

/// The delta CRL of `signer` against `base`, numbered `number`.
pub fn delta(signer: &Signer, base: &Base, now: &[Listed], number: u64) -> Result<Vec<u8>, Error> {
    let changed = changes(base, now);
    let this_update = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| OffsetDateTime::now_utc());
    let params = rcgen::CertificateRevocationListParams {
        this_update,
        next_update: this_update + crate::ca::CRL_VALIDITY,
        crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: changed
            .iter()
            .map(|(l, remove)| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(l.serial.as_bytes()),
                revocation_time: l.at,
                reason_code: Some(match (remove, l.reason) {
                    (true, _) => rcgen::RevocationReason::RemoveFromCrl,
                    (false, None) => rcgen::RevocationReason::CertificateHold,
                    (false, Some(r)) => crate::ca::rcgen_reason(r),
                }),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let der = params.signed_by(&signer.issuer)?.der().to_vec();
    let indicator = BaseCrlNumber(
        Uint::new(&base.number.to_be_bytes()).map_err(|e| Error::Certificate(e.to_string()))?,
    );
    with_extension(
        signer,
        &der,
        oid(2, 5, 29, 27),
        true,
        &indicator.to_der().map_err(encoding)?,
    )
}

fn oid(a: u32, b: u32, c: u32, d: u32) -> der::asn1::ObjectIdentifier {
    der::asn1::ObjectIdentifier::new_unwrap(&format!("{a}.{b}.{c}.{d}"))
}

/// `crl` with one more CRL extension, signed again by `signer` (same key,
/// same algorithm as the CRL says).
fn with_extension(
    signer: &Signer,
    crl: &[u8],
    id: der::asn1::ObjectIdentifier,
    critical: bool,
    value: &[u8],
) -> Result<Vec<u8>, Error> {
    use rcgen::SigningKey;
    let mut list = CertificateList::from_der(crl).map_err(encoding)?;
    list.tbs_cert_list
        .crl_extensions
        .get_or_insert_with(Vec::new)
        .push(Extension {
            extn_id: id,
            critical,
            extn_value: der::asn1::OctetString::new(value).map_err(encoding)?,
        });
    let tbs = list.tbs_cert_list.to_der().map_err(encoding)?;
    let signature = signer.issuer.key().sign(&tbs)?;
    list.signature = BitString::from_bytes(&signature).map_err(encoding)?;
    list.to_der().map_err(encoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(hex: &str, reason: Option<RevocationReason>) -> Listed {
        Listed {
            serial: hex.parse::<Serial>().unwrap(),
            at: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            reason,
        }
    }

    #[test]
    fn a_delta_lists_what_changed_since_its_base() {
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let base = Base::of(
            7,
            at,
            &[
                listed("01", Some(RevocationReason::KeyCompromise)),
                listed("02", None),
                listed("03", None),
            ],
        );
        let now = [
            listed("01", Some(RevocationReason::KeyCompromise)),
            // Held, then revoked for good.
            listed("02", Some(RevocationReason::Superseded)),
            listed("04", None),
        ];
        let mut got: Vec<(String, Option<RevocationReason>, bool)> = changes(&base, &now)
            .into_iter()
            .map(|(l, remove)| (l.serial.to_hex(), l.reason, remove))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            [
                ("02".into(), Some(RevocationReason::Superseded), false),
                // Released from hold: removed.
                ("03".into(), None, true),
                ("04".into(), None, false),
            ]
        );
        assert!(!base.stale(at + Duration::hours(23)));
        assert!(base.stale(at + BASE_EVERY));
    }
}
