//! Two indexes for people browsing a fleet: devices in the order people
//! read their ids (`dev-2` before `dev-10`), all of them and by status, and
//! certificates by when they expire, so "which devices expire this month"
//! reads one stretch of one index whatever the fleet's size.
//!
//! `Space::Sorted`: `*/<natural key>\0<id>` and `<status>/<natural
//! key>\0<id>` for each device. `Space::Expiring`: `<not_after, 8 bytes
//! big-endian>` then the certificate's key, for each certificate not
//! revoked itself (its device's standing is read when listed). Both have
//! empty values and are written in the transaction that writes what they
//! index.

use time::OffsetDateTime;

use super::{CertRecord, DeviceRecord, Page, Registry, Tx, MAX_PAGE};
use crate::store::Space;
use crate::{CertKey, DeviceId, Error, Status};

/// The part of every device's entry that lists them all.
const ALL: &str = "*";

/// `id` as it sorts for people: each run of digits becomes its length (a
/// byte) and its digits without leading zeros, so numbers compare by value
/// and sort before any other character at the same place; the rest is kept.
/// Ids equal but for leading zeros (`dev-7`, `dev-007`) are told apart by
/// the id itself, which follows in the index key.
pub fn natural_key(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    let mut out = Vec::with_capacity(b.len() + 4);
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        // Leading zeros go, but a number keeps one digit ("0", "000": 0).
        let mut digits = &b[start..i];
        while digits.len() > 1 && digits[0] == b'0' {
            digits = &digits[1..];
        }
        // An id is at most a few hundred bytes: its length fits a byte,
        // and is never 0 (no 0 byte in a key but the separator).
        out.push(digits.len().min(255) as u8);
        out.extend_from_slice(digits);
    }
    out
}

pub(super) fn sorted_key(part: &str, id: &DeviceId) -> Vec<u8> {
    let mut k = format!("{part}/").into_bytes();
    k.extend_from_slice(&natural_key(id.as_str()));
    k.push(0);
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

/// The key in `Space::Expiring` of certificate `c`.
pub(super) fn expiring_key(c: &CertRecord) -> Vec<u8> {
    let mut k = (c.not_after.unix_timestamp().max(0) as u64)
        .to_be_bytes()
        .to_vec();
    k.extend_from_slice(c.key().to_bytes().as_ref());
    k
}

impl Tx<'_> {
    /// Keeps device `d`'s entries in the sorted index (it was `old`).
    pub(super) fn sort_device(&self, old: Option<Status>, d: &DeviceRecord) {
        if let Some(old) = old.filter(|o| *o != d.status) {
            self.txn
                .remove(Space::Sorted, &sorted_key(old.as_str(), &d.id));
        }
        if old != Some(d.status) {
            self.txn
                .insert(Space::Sorted, &sorted_key(d.status.as_str(), &d.id), b"");
        }
        if old.is_none() {
            self.txn.insert(Space::Sorted, &sorted_key(ALL, &d.id), b"");
        }
    }

    /// Keeps certificate `c` in the expiry index while it is not revoked.
    pub(super) fn index_expiry(&self, c: &CertRecord) {
        let k = expiring_key(c);
        if c.revocation.is_none() {
            self.txn.insert(Space::Expiring, &k, b"");
        } else {
            self.txn.remove(Space::Expiring, &k);
        }
    }
}

/// A device whose certificates in good standing all expire soon.
#[derive(Debug, Clone)]
pub struct Expiring {
    pub device: DeviceRecord,
    /// When its last certificate in good standing expires.
    pub until: OffsetDateTime,
}

impl Registry {
    /// Devices in the order people read their ids, after `after`,
    /// optionally only those with `status`.
    pub fn list_sorted(
        &self,
        status: Option<Status>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<DeviceRecord>, Error> {
        let limit = limit.clamp(1, MAX_PAGE);
        let part = status.map_or(ALL, |s| s.as_str());
        let prefix = format!("{part}/").into_bytes();
        let start = match after {
            Some(a) => {
                let mut k = sorted_key(part, &DeviceId::try_new(a)?);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut items = Vec::with_capacity(limit.min(64));
        let mut more = false;
        for kv in self.store.scan(Space::Sorted, &prefix, &start) {
            let (k, _) = kv?;
            if items.len() == limit {
                more = true;
                break;
            }
            let id = k
                .iter()
                .position(|b| *b == 0)
                .and_then(|at| std::str::from_utf8(&k[at + 1..]).ok())
                .ok_or_else(|| Error::Corrupt("sorted index key".into()))?;
            items.push(self.device(&DeviceId::try_new(id)?)?);
        }
        let next = more
            .then(|| items.last().map(|d| d.id.to_string()))
            .flatten();
        Ok(Page { items, next })
    }

    /// Active devices whose last certificate in good standing expires
    /// before `before` (and after `now`), soonest first: a page of `limit`
    /// from the cursor `after` (an earlier page's `next`). A device
    /// with a later certificate (rotated) is not expiring and is skipped.
    pub fn expiring(
        &self,
        now: OffsetDateTime,
        before: OffsetDateTime,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<Expiring>, Error> {
        let limit = limit.clamp(1, MAX_PAGE);
        let from = (now.unix_timestamp().max(0) as u64).to_be_bytes().to_vec();
        let start = match after {
            Some(a) => {
                // The key the page before stopped at: this page starts there.
                let k = crate::id::unhex(a).ok_or_else(|| Error::InvalidInput {
                    reason: format!("{a:?} is not a page cursor of this list"),
                })?;
                k.max(from)
            }
            None => from,
        };
        let end = before.unix_timestamp().max(0) as u64;
        let mut items = Vec::new();
        let mut next = None;
        let mut seen = std::collections::HashSet::new();
        for kv in self
            .store
            .scan_between(Space::Expiring, &start, &end.to_be_bytes())
        {
            let (k, _) = kv?;
            let (at, key) = k
                .split_at_checked(8)
                .ok_or_else(|| Error::Corrupt("expiry index key".into()))?;
            if u64::from_be_bytes(at.try_into().unwrap_or_default()) >= end {
                break;
            }
            if items.len() == limit {
                next = Some(crate::id::hex(&k));
                break;
            }
            let Some(c) = self.certificate(&CertKey::from_bytes(key)?)? else {
                continue;
            };
            if c.device_status != Status::Active || !seen.insert(c.device_id.clone()) {
                continue;
            }
            let view = self.device_view(&c.device_id)?;
            let until = view
                .certificates
                .iter()
                .filter(|v| v.status == "good")
                .map(|v| v.record.not_after)
                .max();
            // Expiring only if no certificate of it in good standing lasts
            // past the window.
            if until.is_some_and(|u| u < before) {
                items.push(Expiring {
                    device: self.device(&c.device_id)?,
                    until: until.unwrap_or(c.not_after),
                });
            }
        }
        Ok(Page { items, next })
    }
}

#[cfg(test)]
mod tests {
    use super::natural_key;
    use crate::registry::{Registry, Space};
    use crate::{Authority, DeviceId, Identity, InitOptions, Role, Status};

    fn ids(page: &[crate::DeviceRecord]) -> Vec<String> {
        page.iter()
            .filter(|d| d.role == Role::Device)
            .map(|d| d.id.to_string())
            .collect()
    }

    #[test]
    fn devices_list_as_people_read_them_and_expiring_ones_soonest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let days = |n: i64| time::Duration::days(n);
        let enroll = |id: &str, life: time::Duration| {
            let identity = Identity {
                role: Role::Device,
                id: DeviceId::try_new(id).unwrap(),
            };
            let (new, cert) = auth.issue_new(&key, &identity, None, life).unwrap();
            auth.registry.enroll(&new, &cert, "test").unwrap();
            identity
        };
        for id in ["dev-10", "dev-2", "dev-100", "dev-1", "dev-9"] {
            enroll(id, days(365));
        }
        let short = enroll("exp-short", days(10));
        let later = enroll("exp-later", days(20));
        let rotated = enroll("exp-rotated", days(10));
        let suspended = enroll("exp-suspended", days(5));
        let r = &auth.registry;
        let (_, renewed) = auth.issue_new(&key, &rotated, None, days(365)).unwrap();
        r.add_certificate(&rotated.id, &renewed, "test").unwrap();
        r.suspend(&suspended.id, "test").unwrap();
        let dev9 = DeviceId::try_new("dev-9").unwrap();
        r.suspend(&dev9, "test").unwrap();

        let check = |r: &Registry| {
            // Two at a time, in the order people read them.
            let mut all = Vec::new();
            let mut after = None;
            loop {
                let page = r.list_sorted(None, after.as_deref(), 2).unwrap();
                all.extend(ids(&page.items));
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            let devs: Vec<_> = all.iter().filter(|i| i.starts_with("dev-")).collect();
            assert_eq!(devs, ["dev-1", "dev-2", "dev-9", "dev-10", "dev-100"]);
            let page = r.list_sorted(Some(Status::Suspended), None, 10).unwrap();
            assert_eq!(ids(&page.items), ["dev-9", "exp-suspended"]);
            let page = r
                .list_sorted(Some(Status::Active), Some("dev-2"), 10)
                .unwrap();
            assert_eq!(ids(&page.items)[..2], ["dev-10", "dev-100"]);

            // Within 30 days: the short one, then the later one; not the
            // rotated one (a later certificate) nor the suspended one.
            let now = time::OffsetDateTime::now_utc();
            let page = r.expiring(now, now + days(30), None, 1).unwrap();
            let first: Vec<_> = page.items.iter().map(|e| e.device.id.to_string()).collect();
            assert_eq!(first, [short.id.to_string()]);
            let rest = r
                .expiring(now, now + days(30), page.next.as_deref(), 10)
                .unwrap();
            let rest: Vec<_> = rest.items.iter().map(|e| e.device.id.to_string()).collect();
            assert_eq!(rest, [later.id.to_string()]);
            let soon = r.expiring(now, now + days(15), None, 10).unwrap();
            assert_eq!(soon.items.len(), 1);
            assert!(soon.items[0].until < now + days(11));
            assert!(r.expiring(now, now + days(15), Some("zz"), 10).is_err());
        };
        check(r);

        // Revoking a certificate takes it out of the expiry index.
        let c = r.device_view(&short.id).unwrap().certificates[0]
            .record
            .key();
        let indexed = r.scan(Space::Expiring, b"").count();
        r.revoke_certificate(&c, crate::RevocationReason::Superseded, "test")
            .unwrap();
        let now = time::OffsetDateTime::now_utc();
        let left = r.expiring(now, now + days(30), None, 10).unwrap();
        assert!(left.items.iter().all(|e| e.device.id != short.id));
        assert_eq!(r.scan(Space::Expiring, b"").count(), indexed - 1);
        let (_, unrevoked) = auth.issue_new(&key, &short, None, days(10)).unwrap();
        r.add_certificate(&short.id, &unrevoked, "test").unwrap();

        // Version 4 had neither index: made on open, the same lists.
        r.transact(|tx| {
            for space in [Space::Sorted, Space::Expiring] {
                for (k, _) in r.scan(space, b"").map(Result::unwrap).collect::<Vec<_>>() {
                    tx.txn.remove(space, &k);
                }
            }
            tx.meta.insert("schema", 4u64.to_be_bytes())
        })
        .unwrap();
        assert!(r.list_sorted(None, None, 10).unwrap().items.is_empty());
        drop(auth);
        let r = Registry::open(&tmp.path().join("registry")).unwrap();
        check(&r);
    }

    #[test]
    fn ids_sort_as_people_read_them() {
        let mut ids = vec![
            "dev-10",
            "dev-2",
            "dev-1",
            "dev-02",
            "dev-100",
            "dev-9",
            "dev-a",
            "dev-",
            "sensor-1-10",
            "sensor-1-9",
            "dev-0",
            "dev-000",
            "a",
            "b1",
            "b01x",
        ];
        ids.sort_by_key(|i| (natural_key(i), i.to_string()));
        assert_eq!(
            ids,
            [
                "a",
                "b1",
                "b01x",
                "dev-",
                "dev-0",
                "dev-000",
                "dev-1",
                "dev-02",
                "dev-2",
                "dev-9",
                "dev-10",
                "dev-100",
                "dev-a",
                "sensor-1-9",
                "sensor-1-10"
            ]
        );
    }
}
