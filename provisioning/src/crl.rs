//! Delta CRLs (RFC 5280 §5.2.4), so that a relying party of a large fleet
//! downloads the complete CRL (every certificate listed) about once a day
//! and, between, only what changed.
//!
//! An issuing CA's complete CRL (`/crl/issuing.crl`) stays current, as
//! before. Once a day the complete CRL signed then becomes the *base*: its
//! number and time are kept in the registry (a blob every node reads).
//! The delta CRL (`/crl/issuing-delta.crl`) lists what changed since:
//! each certificate listed now whose entry dates from then on (revoked,
//! held, or a hold made a revocation; [`MARGIN`] earlier) or whose device
//! the audit log names after the base's newest entry (so a node whose
//! clock ran behind cannot date a revocation out of the delta), and
//! `removeFromCRL` for the certificates of devices the audit log says were
//! resumed or approved since and that are not listed now. A certificate
//! that expired since is left to the next complete CRL (it is invalid
//! anyway). It carries the critical Delta CRL Indicator naming the base's
//! number; complete and delta CRLs share one number sequence. With
//! a status URL, the complete CRL names its delta in a Freshest CRL
//! extension (RFC 5280 §5.2.6).
//!
//! rcgen signs CRLs without these extensions, so a CRL is made by rcgen,
//! given the extension, and signed again with the same key and algorithm.

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
use crate::{Error, Serial};

/// A delta CRL's name: its complete CRL's, then this.
pub const DELTA_SUFFIX: &str = "-delta";
/// How long a base serves before the next complete CRL becomes the base.
pub const BASE_EVERY: Duration = Duration::hours(24);

/// Changes this much older than the base are listed again in its deltas:
/// a node whose clock ran behind dated them before the base (nodes refuse
/// to issue with a clock off by more; listing an unchanged entry again
/// is harmless).
pub const MARGIN: Duration = Duration::hours(1);

/// The name under which the registry keeps the base of `crl_name`.
pub(crate) fn base_blob(crl_name: &str) -> String {
    format!("crl-base/{crl_name}")
}

/// The complete CRL deltas are made against: its number and when it was
/// signed. (What it listed is not kept: the delta lists what was listed
/// or released since, by the entries' own times and the audit log, so the
/// base stays a few bytes however large the fleet.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    pub number: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The audit log's newest entry then: what came after it changed
    /// since, whatever the clock of the node that wrote it said.
    #[serde(default)]
    pub audit_seq: u64,
}

/// What the audit log says changed since a base: devices whose
/// certificates may have been listed (revoked, suspended, registered
/// pending, one certificate revoked), devices released (resumed,
/// approved), and whether a manufacturer was revoked (then every listed
/// certificate goes in the delta).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Since {
    pub listed: Vec<Serial>,
    pub released: Vec<Serial>,
    pub manufacturer_revoked: bool,
}

/// Which way an audit action moves a device's certificates on a CRL:
/// `Some(true)` onto it, `Some(false)` off it.
pub fn moves(action: &str) -> Option<bool> {
    match action {
        "revoke" | "suspend" | "revoke-certificate" | "jit-register" => Some(true),
        "resume" | "approve" => Some(false),
        _ => None,
    }
}

impl Base {
    /// Whether a newer complete CRL should take its place at `now`.
    pub fn stale(&self, now: OffsetDateTime) -> bool {
        now - self.at >= BASE_EVERY
    }

    /// Changes at or after this are in its deltas.
    pub fn since(&self) -> OffsetDateTime {
        self.at - MARGIN
    }
}

/// What a delta CRL against `base` lists: each certificate listed now
/// that changed since (its entry dated from the base, less [`MARGIN`], on;
/// or the audit log names it; or any, after a manufacturer's revocation),
/// and `removeFromCRL` (`true`) for each released certificate not listed
/// now.
pub fn changes(base: &Base, now: &[Listed], since: &Since) -> Vec<(Listed, bool)> {
    let from = base.since();
    let named: std::collections::HashSet<&Serial> = since.listed.iter().collect();
    let listed: std::collections::HashSet<&Serial> = now.iter().map(|l| &l.serial).collect();
    let at = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(base.at);
    now.iter()
        .filter(|l| since.manufacturer_revoked || l.at >= from || named.contains(&l.serial))
        .map(|l| (l.clone(), false))
        .chain(
            since
                .released
                .iter()
                .filter(|s| !listed.contains(s))
                .map(|s| {
                    let l = Listed {
                        serial: s.clone(),
                        at,
                        reason: None,
                    };
                    (l, true)
                }),
        )
        .collect()
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
pub fn delta(
    signer: &Signer,
    base: &Base,
    now: &[Listed],
    since: &Since,
    number: u64,
) -> Result<Vec<u8>, Error> {
    let changed = changes(base, now, since);
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
    use crate::RevocationReason;

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
        let base = Base {
            number: 7,
            at,
            audit_seq: 40,
        };
        let dated = |hex: &str, reason, d: Duration| Listed {
            at: at + d,
            ..listed(hex, reason)
        };
        let now = [
            dated(
                "01",
                Some(RevocationReason::KeyCompromise),
                Duration::hours(-2),
            ),
            // Held before the base, revoked for good after.
            dated(
                "02",
                Some(RevocationReason::Superseded),
                Duration::minutes(5),
            ),
            dated("04", None, Duration::minutes(5)),
            // Within the margin: listed again, harmless.
            dated("05", None, Duration::minutes(-30)),
            // Revoked after the base by a node whose clock was a day
            // behind: the audit log names it.
            dated(
                "06",
                Some(RevocationReason::KeyCompromise),
                Duration::days(-1),
            ),
        ];
        let since = Since {
            listed: vec!["06".parse().unwrap()],
            released: vec!["03".parse().unwrap(), "01".parse().unwrap()],
            manufacturer_revoked: false,
        };
        let got = |since: &Since| -> Vec<(String, bool)> {
            changes(&base, &now, since)
                .into_iter()
                .map(|(l, remove)| (l.serial.to_hex(), remove))
                .collect()
        };
        assert_eq!(
            got(&since),
            [
                ("02".into(), false),
                ("04".into(), false),
                ("05".into(), false),
                ("06".into(), false),
                // Released from hold: removed. 01 is listed now (revoked
                // since): never removed.
                ("03".into(), true),
            ]
        );
        let reason = changes(&base, &now, &since)[0].0.reason;
        assert_eq!(reason, Some(RevocationReason::Superseded));
        // After a manufacturer's revocation, everything listed.
        let all = Since {
            manufacturer_revoked: true,
            ..Since::default()
        };
        assert_eq!(got(&all).len(), now.len());
        assert_eq!(moves("suspend"), Some(true));
        assert_eq!(moves("approve"), Some(false));
        assert_eq!(moves("enroll"), None);
        assert!(!base.stale(at + Duration::hours(23)));
        assert!(base.stale(at + BASE_EVERY));
    }
}
