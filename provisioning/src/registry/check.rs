//! `fleetgate check`: every index against the records it indexes, and
//! every record against the ones it names.

use super::*;

impl Registry {
    /// Verifies every index against the records it indexes, and every
    /// record against the ones it names: what `fleetgate check` prints.
    pub fn check(&self) -> Result<CheckReport, Error> {
        let mut r = CheckReport::default();
        let mut problem = |s: String| r.problems.push(s);
        let mut devices = std::collections::HashMap::new();
        for kv in self.scan(Space::Devices, b"") {
            let (k, v) = kv?;
            match decode::<DeviceRecord>("device", &v) {
                Ok(d) if d.id.as_str().as_bytes() == k.as_slice() => {
                    devices.insert(d.id.clone(), d);
                }
                Ok(d) => problem(format!(
                    "device record {} stored under key {:?}",
                    d.id,
                    String::from_utf8_lossy(&k)
                )),
                Err(e) => problem(format!("device {:?}: {e}", String::from_utf8_lossy(&k))),
            }
        }
        let mut certs = std::collections::HashMap::new();
        for kv in self.scan(Space::Certs, b"") {
            let (k, v) = kv?;
            match decode_cert(&v) {
                Ok(c) if c.key().to_bytes() == k.as_slice() => {
                    certs.insert(c.key(), c);
                }
                Ok(c) => problem(format!("certificate {} stored under another key", c.serial)),
                Err(e) => problem(format!("certificate record: {e}")),
            }
        }
        for d in devices.values() {
            for serial in &d.certificates {
                match certs.get(serial) {
                    Some(c) if c.device_manufacturer != d.manufacturer => problem(format!(
                        "certificate {serial} mirrors manufacturer {:?} but device {} has {:?}",
                        c.device_manufacturer, d.id, d.manufacturer
                    )),
                    None => problem(format!(
                        "device {} lists certificate {serial}, which is missing",
                        d.id
                    )),
                    Some(c) if c.device_id != d.id => problem(format!(
                        "device {} lists certificate {serial}, which belongs to {}",
                        d.id, c.device_id
                    )),
                    Some(c) if c.device_status != d.status => problem(format!(
                        "certificate {serial} mirrors status {} but device {} is {}",
                        c.device_status, d.id, d.status
                    )),
                    Some(_) => {}
                }
            }
            if (d.status == Status::Revoked) != d.revocation.is_some() {
                problem(format!(
                    "device {} is {} with revocation data {:?}",
                    d.id, d.status, d.revocation
                ));
            }
            if d.role == Role::Claim
                && self
                    .store
                    .get(Space::Claims, AsRef::<[u8]>::as_ref(&d.id.as_str()))?
                    .is_none()
            {
                problem(format!("claim {} has no uses record", d.id));
            }
        }
        for c in certs.values() {
            match devices.get(&c.device_id) {
                None => problem(format!(
                    "certificate {} names device {}, which is missing",
                    c.serial, c.device_id
                )),
                Some(d) if !d.certificates.contains(&c.key()) => problem(format!(
                    "certificate {} names device {}, which does not list it",
                    c.serial, c.device_id
                )),
                Some(_) => {}
            }
            match self.store.get(
                Space::Fingerprints,
                AsRef::<[u8]>::as_ref(&c.fingerprint.as_bytes()),
            )? {
                Some(s) if s.as_ref() == c.key().to_bytes() => {}
                Some(_) => problem(format!(
                    "fingerprint of {} points at another serial",
                    c.serial
                )),
                None => problem(format!("fingerprint of {} is not indexed", c.serial)),
            }
            if let Some(m) = &c.manufacturer {
                if self.manufacturer(m)?.is_none() {
                    problem(format!(
                        "certificate {} names manufacturer {m}, which is missing",
                        c.serial
                    ));
                }
            }
        }
        for kv in self.scan(Space::Fingerprints, b"") {
            let (fp, key) = kv?;
            let known = CertKey::from_bytes(&key)
                .ok()
                .and_then(|k| certs.get(&k))
                .is_some_and(|c| c.fingerprint.as_bytes() == fp.as_slice());
            if !known {
                problem(format!(
                    "fingerprint index entry {} matches no certificate",
                    String::from_utf8_lossy(&fp)
                ));
            }
        }
        let mut indexed = 0;
        for kv in self.scan(Space::ByStatus, b"") {
            let (k, _) = kv?;
            indexed += 1;
            let key = String::from_utf8_lossy(&k).into_owned();
            let ok = key.split_once('/').is_some_and(|(status, id)| {
                DeviceId::try_new(id)
                    .ok()
                    .and_then(|id| devices.get(&id))
                    .is_some_and(|d| d.status.as_str() == status)
            });
            if !ok {
                problem(format!(
                    "status index entry {key} matches no device in that status"
                ));
            }
        }
        if indexed != devices.len() {
            problem(format!(
                "status index has {indexed} entries for {} devices",
                devices.len()
            ));
        }
        // The browsing indexes: exactly the entries the records make.
        let sorted: std::collections::BTreeSet<Vec<u8>> = devices
            .values()
            .flat_map(|d| {
                [
                    super::sorted::sorted_key("*", &d.id),
                    super::sorted::sorted_key(d.status.as_str(), &d.id),
                ]
            })
            .collect();
        for (space, expected) in [
            (Space::Sorted, sorted),
            (
                Space::Expiring,
                certs
                    .values()
                    .filter(|c| c.revocation.is_none())
                    .map(super::sorted::expiring_key)
                    .collect(),
            ),
        ] {
            let mut extra = 0;
            let mut found = 0;
            for kv in self.scan(space, b"") {
                let (k, _) = kv?;
                match expected.contains(&k) {
                    true => found += 1,
                    false => extra += 1,
                }
            }
            if extra > 0 || found != expected.len() {
                problem(format!(
                    "{} index has {extra} stray entries and lacks {}",
                    space.name(),
                    expected.len() - found
                ));
            }
        }
        // The CRLs' index: each listed certificate once, saying what its
        // record and device say (an empty entry, from before schema 6,
        // says nothing).
        let mut listed = 0;
        for kv in self.scan(Space::Listed, b"") {
            let (k, v) = kv?;
            let Some(c) = CertKey::from_bytes(&k).ok().and_then(|k| certs.get(&k)) else {
                problem("listed index entry matches no certificate".to_string());
                continue;
            };
            if !super::listed(c) {
                problem(format!(
                    "certificate {} is in the listed index but not revoked or held",
                    c.serial
                ));
                continue;
            }
            listed += 1;
            // A hold's date is when it was mirrored; the device's own
            // may have moved on since: only a revocation's is compared.
            let agrees = |l: &Listing, r: &Listing| {
                l.not_after == r.not_after
                    && l.reason == r.reason
                    && (l.reason.is_none() || l.at == r.at)
            };
            let records = Listing::of(c, devices.get(&c.device_id));
            match Listing::decode(&v) {
                Ok(None) => {}
                Ok(Some(l)) if records.as_ref().is_some_and(|r| agrees(&l, r)) => {}
                Ok(Some(l)) => problem(format!(
                    "listed index entry of {} says {l:?}, its records {records:?}",
                    c.serial
                )),
                Err(e) => problem(format!("listed index entry of {}: {e}", c.serial)),
            }
        }
        let want = certs.values().filter(|c| super::listed(c)).count();
        if listed != want {
            problem(format!(
                "listed index has {listed} entries for {want} revoked or held certificates"
            ));
        }
        let mut last = None;
        for kv in self.scan(Space::Audit, b"") {
            let (k, v) = kv?;
            match decode::<AuditEntry>("audit entry", &v) {
                Ok(e) if Some(e.seq) <= last => {
                    problem(format!("audit entry {} out of order", e.seq))
                }
                Ok(e) => last = Some(e.seq),
                Err(e) => problem(format!("audit key {k:?}: {e}")),
            }
            r.audit_entries += 1;
        }
        for kv in self.scan(Space::Manufacturers, b"") {
            let (_, v) = kv?;
            if let Err(e) = decode::<ManufacturerRecord>("manufacturer", &v) {
                problem(e.to_string());
            }
            r.manufacturers += 1;
        }
        r.devices = devices.len();
        r.certificates = certs.len();
        Ok(r)
    }
}
