//! Changes to stored records that fleetgate itself never makes: a revoked
//! device made anything else, a certificate's or a manufacturer's
//! revocation taken back (or the record removed). Revocation is final
//! (`lifecycle`), so a store that shows one came from outside fleetgate:
//! someone with write access to etcd. A node that sees such a change
//! keeps what it knew. Pure: it compares two stored values.

use crate::manufacturer::ManufacturerRecord;
use crate::registry::{CertRecord, DeviceRecord};
use crate::store::Space;
use crate::Status;

/// Why replacing `old` with `new` (values of a key in `space`; `None`:
/// absent) goes back on the lifecycle, if it does. Values that do not
/// decode are not judged here (the registry reports them as corrupt).
pub fn regression(space: Space, old: Option<&[u8]>, new: Option<&[u8]>) -> Option<String> {
    let old = old?;
    match space {
        Space::Devices => {
            let was: DeviceRecord = serde_json::from_slice(old).ok()?;
            if was.status != Status::Revoked {
                return None;
            }
            let now = new.and_then(|n| serde_json::from_slice::<DeviceRecord>(n).ok());
            match now {
                Some(d) if d.status == Status::Revoked && d.revocation.is_some() => None,
                Some(d) => Some(format!(
                    "revoked device {} made {} in the store",
                    was.id, d.status
                )),
                None => Some(format!("revoked device {} removed from the store", was.id)),
            }
        }
        Space::Certs => {
            let was: CertRecord = crate::registry::decode_cert(old).ok()?;
            let now = new.and_then(|n| crate::registry::decode_cert(n).ok());
            let revoked = |c: &CertRecord| c.revocation.is_some();
            let device_revoked = |c: &CertRecord| c.device_status == Status::Revoked;
            match now {
                None if revoked(&was) || device_revoked(&was) => Some(format!(
                    "revoked certificate {} of {} removed from the store",
                    was.serial, was.device_id
                )),
                Some(c) if revoked(&was) && !revoked(&c) => Some(format!(
                    "the revocation of certificate {} of {} taken back in the store",
                    was.serial, was.device_id
                )),
                Some(c) if device_revoked(&was) && !device_revoked(&c) => Some(format!(
                    "certificate {} of revoked device {} made {} in the store",
                    was.serial, was.device_id, c.device_status
                )),
                _ => None,
            }
        }
        Space::Manufacturers => {
            let was: ManufacturerRecord = serde_json::from_slice(old).ok()?;
            was.revocation?;
            let now = new.and_then(|n| serde_json::from_slice::<ManufacturerRecord>(n).ok());
            match now {
                Some(m) if m.revocation.is_some() => None,
                Some(_) => Some(format!(
                    "the revocation of manufacturer {} taken back in the store",
                    was.name
                )),
                None => Some(format!(
                    "revoked manufacturer {} removed from the store",
                    was.name
                )),
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceId, Revocation, RevocationReason, Role};

    fn device(status: Status) -> Vec<u8> {
        let now = time::OffsetDateTime::now_utc();
        let d = DeviceRecord {
            id: DeviceId::try_new("dev-1").unwrap_or_else(|_| unreachable!("a valid id")),
            role: Role::Device,
            status,
            revocation: (status == Status::Revoked).then_some(Revocation {
                reason: RevocationReason::KeyCompromise,
                at: now,
            }),
            manufacturer: None,
            created_at: now,
            updated_at: now,
            certificates: Vec::new(),
        };
        serde_json::to_vec(&d).unwrap_or_default()
    }

    #[test]
    fn revocation_is_final_in_the_store_too() {
        let (active, suspended, revoked) = (
            device(Status::Active),
            device(Status::Suspended),
            device(Status::Revoked),
        );
        let d = Space::Devices;
        assert!(regression(d, Some(&revoked), Some(&active)).is_some());
        assert!(regression(d, Some(&revoked), Some(&suspended)).is_some());
        assert!(regression(d, Some(&revoked), None).is_some());
        // What fleetgate does itself passes.
        assert_eq!(regression(d, Some(&active), Some(&revoked)), None);
        assert_eq!(regression(d, Some(&active), Some(&suspended)), None);
        assert_eq!(regression(d, Some(&suspended), Some(&active)), None);
        assert_eq!(regression(d, Some(&revoked), Some(&revoked)), None);
        assert_eq!(regression(d, None, Some(&active)), None);
        // Not fleetgate's records: not judged here.
        assert_eq!(regression(d, Some(b"junk"), Some(&active)), None);
        assert_eq!(regression(Space::Audit, Some(&revoked), None), None);
    }
}
