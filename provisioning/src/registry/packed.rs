//! Certificate records and CRL entries packed for the store: what every
//! admission, OCSP answer and CRL reads, small enough that a million
//! certificates stay in the registry's page cache (a million JSON records,
//! some 400 bytes each, did not fit the default 256 MiB: at 1,000,000
//! devices admission's p99 was 140-290 µs and a CRL took 4 s).
//!
//! A packed certificate record is a version byte, [`PACKED`], then
//! MessagePack (`rmp-serde`: the fields in order, as an array; serials and
//! fingerprints as bytes, times as Unix seconds and nanoseconds): about a
//! third of its JSON. Records written before schema 6 are JSON (their first
//! byte is `{`) and read as such; a record that would not come back the
//! same packed (a fingerprint not in lowercase hex) stays JSON. Fields are
//! only ever appended, each with `#[serde(default)]`, so that packed
//! records written before a field existed read on.
//!
//! A `listed` entry's value is what a CRL says of the certificate: when it
//! expires, since when it is listed and why (none: on hold). It is written
//! with the record, from the record and its device, so that a CRL is one
//! read of the `listed` index and no certificate or device record. An
//! empty value (schema 4 and 5) is read the old way.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{CertRecord, DeviceRecord};
use crate::id::{hex, unhex};
use crate::lifecycle::{RevocationReason, Status};
use crate::{DeviceId, Error, Role, Serial};

/// The first byte of a packed record (a JSON record starts with `{`).
pub(super) const PACKED: u8 = 1;

/// A time as Unix seconds and nanoseconds: certificates run to 9999, past
/// what nanoseconds alone hold in 64 bits.
type When = (i64, u32);

fn when(t: OffsetDateTime) -> When {
    (t.unix_timestamp(), t.nanosecond())
}

fn at(w: When) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp(w.0)
        .ok()
        .and_then(|t| t.replace_nanosecond(w.1).ok())
        .ok_or_else(|| Error::Corrupt(format!("a packed time out of range: {w:?}")))
}

#[derive(Serialize, Deserialize)]
struct Cert {
    #[serde(with = "serde_bytes")]
    serial: Vec<u8>,
    device_id: String,
    role: Role,
    issuer: String,
    not_before: When,
    not_after: When,
    #[serde(with = "serde_bytes")]
    fingerprint: Vec<u8>,
    revocation: Option<(RevocationReason, When)>,
    device_status: Status,
    manufacturer: Option<String>,
    device_manufacturer: Option<String>,
}

fn pack(c: &CertRecord) -> Option<Vec<u8>> {
    let p = Cert {
        serial: c.serial.as_bytes().to_vec(),
        device_id: c.device_id.to_string(),
        role: c.role,
        issuer: c.issuer.clone(),
        not_before: when(c.not_before),
        not_after: when(c.not_after),
        fingerprint: unhex(&c.fingerprint)?,
        revocation: c.revocation.map(|r| (r.reason, when(r.at))),
        device_status: c.device_status,
        manufacturer: c.manufacturer.clone(),
        device_manufacturer: c.device_manufacturer.clone(),
    };
    let mut out = vec![PACKED];
    rmp_serde::encode::write(&mut out, &p).ok()?;
    Some(out)
}

fn unpack(bytes: &[u8]) -> Result<CertRecord, Error> {
    let bad = |e: &dyn std::fmt::Display| Error::Corrupt(format!("certificate: {e}"));
    let p: Cert = rmp_serde::from_slice(bytes).map_err(|e| bad(&e))?;
    Ok(CertRecord {
        serial: Serial::from_bytes(&p.serial).map_err(|e| bad(&e))?,
        device_id: DeviceId::try_new(p.device_id).map_err(|e| bad(&e))?,
        role: p.role,
        issuer: p.issuer,
        not_before: at(p.not_before)?,
        not_after: at(p.not_after)?,
        fingerprint: hex(&p.fingerprint),
        revocation: p
            .revocation
            .map(|(reason, w)| at(w).map(|at| super::Revocation { reason, at }))
            .transpose()?,
        device_status: p.device_status,
        manufacturer: p.manufacturer,
        device_manufacturer: p.device_manufacturer,
    })
}

/// `c` as stored: packed, or JSON if packing would change it.
pub(crate) fn encode_cert(c: &CertRecord) -> Vec<u8> {
    match pack(c) {
        Some(p) if unpack(&p[1..]).ok().as_ref() == Some(c) => p,
        _ => super::encode(c),
    }
}

/// A stored certificate record, packed or JSON.
pub fn decode_cert(bytes: &[u8]) -> Result<CertRecord, Error> {
    match bytes.first() {
        Some(&PACKED) => unpack(&bytes[1..]),
        _ => super::decode("certificate", bytes),
    }
}

/// What a CRL says of a listed certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Listing {
    pub not_after: OffsetDateTime,
    /// Since when it is listed.
    pub at: OffsetDateTime,
    /// Why it is revoked; `None`: on hold (suspended, or awaiting approval).
    pub reason: Option<RevocationReason>,
}

#[derive(Serialize, Deserialize)]
struct PackedListing {
    not_after: When,
    at: When,
    reason: Option<RevocationReason>,
}

impl Listing {
    /// The listing of `c`, whose device is `device` (read in the same
    /// transaction), if a CRL lists it for its own revocation or its
    /// device's status. `None` if it is not listed, or if it is listed for
    /// its device and the device was not given (then the entry is left
    /// empty, and read the old way).
    pub(super) fn of(c: &CertRecord, device: Option<&DeviceRecord>) -> Option<Self> {
        let (at, reason) = match (c.revocation, c.device_status) {
            (Some(r), _) => (r.at, Some(r.reason)),
            (None, Status::Active) => return None,
            (None, Status::Revoked) => {
                let d = device?;
                match d.revocation {
                    Some(r) => (r.at, Some(r.reason)),
                    None => (d.updated_at, Some(RevocationReason::Unspecified)),
                }
            }
            (None, Status::Suspended | Status::Pending) => (device?.updated_at, None),
        };
        Some(Self {
            not_after: c.not_after,
            at,
            reason,
        })
    }

    pub(super) fn encode(self) -> Vec<u8> {
        let p = PackedListing {
            not_after: when(self.not_after),
            at: when(self.at),
            reason: self.reason,
        };
        // Plain numbers and a unit enum: writing to a Vec cannot fail.
        rmp_serde::to_vec(&p).expect("a listing serializes")
    }

    /// A `listed` entry's value: `None` if empty (written before schema 6).
    pub(super) fn decode(bytes: &[u8]) -> Result<Option<Self>, Error> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let p: PackedListing = rmp_serde::from_slice(bytes)
            .map_err(|e| Error::Corrupt(format!("a CRL listing: {e}")))?;
        Ok(Some(Self {
            not_after: at(p.not_after)?,
            at: at(p.at)?,
            reason: p.reason,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Revocation;
    use time::macros::datetime;

    fn record() -> CertRecord {
        CertRecord {
            serial: Serial::from_bytes(&[0x7f; 20]).unwrap(),
            device_id: DeviceId::try_new("dev-0000001").unwrap(),
            role: Role::Device,
            issuer: "CN=fleetgate issuing CA,O=fleetgate".into(),
            not_before: datetime!(2026-12-06 17:00:00 UTC),
            not_after: datetime!(9999-12-31 23:59:59 UTC),
            fingerprint: hex(&[0xab; 32]),
            revocation: Some(Revocation {
                reason: RevocationReason::KeyCompromise,
                at: datetime!(2026-12-06 18:00:00.5 UTC),
            }),
            device_status: Status::Suspended,
            manufacturer: Some("acme".into()),
            device_manufacturer: None,
        }
    }

    #[test]
    fn a_record_comes_back_as_it_went_and_a_third_of_its_json() {
        let c = record();
        let packed = encode_cert(&c);
        assert_eq!(packed[0], PACKED);
        assert_eq!(decode_cert(&packed).unwrap(), c);
        let json = super::super::encode(&c);
        assert!(
            packed.len() * 2 < json.len(),
            "packed {} bytes, JSON {}",
            packed.len(),
            json.len()
        );
        // JSON records of older schemas read on.
        assert_eq!(decode_cert(&json).unwrap(), c);
    }

    #[test]
    fn a_record_packing_would_change_stays_json() {
        let mut c = record();
        c.fingerprint = "AB".repeat(32);
        let stored = encode_cert(&c);
        assert_eq!(stored[0], b'{');
        assert_eq!(decode_cert(&stored).unwrap(), c);
    }

    #[test]
    fn damaged_bytes_are_corrupt_not_a_panic() {
        let packed = encode_cert(&record());
        for cut in 1..packed.len() {
            assert!(decode_cert(&packed[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            decode_cert(&[PACKED, 0xc1]),
            Err(Error::Corrupt(_))
        ));
        assert!(Listing::decode(&[0x93, 0xc1]).is_err());
    }

    #[test]
    fn a_listing_says_what_the_crl_says() {
        let c = record();
        let l = Listing::of(&c, None).expect("revoked itself");
        assert_eq!(l.reason, Some(RevocationReason::KeyCompromise));
        assert_eq!(Listing::decode(&l.encode()).unwrap(), Some(l));
        assert_eq!(Listing::decode(b"").unwrap(), None);

        let mut held = record();
        held.revocation = None;
        // Held for its device: needs the device to say since when.
        assert_eq!(Listing::of(&held, None), None);
        held.device_status = Status::Active;
        assert_eq!(Listing::of(&held, None), None);
    }
}
