//! Older registry layouts brought up to the current one when opened.

use super::*;

impl Registry {
    /// Brings an older registry layout up to [`SCHEMA`]. Idempotent, so an
    /// interrupted migration simply runs again on the next open: the
    /// certificate records themselves say what their keys must be.
    pub(super) fn migrated(self) -> Result<Self, Error> {
        let version = self
            .store
            .get(Space::Meta, b"schema")?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(1, u64::from_be_bytes);
        if version > SCHEMA {
            return Err(Error::Storage(format!(
                "the registry is schema {version}, newer than this fleetgate reads ({SCHEMA}): \
                 a newer fleetgate wrote it; run that one"
            )));
        }
        if version == SCHEMA {
            return Ok(self);
        }
        if self.store.len(Space::Devices)? == 0 && self.store.len(Space::Certs)? == 0 {
            let txn = Txn::new(&*self.store);
            Tx::over(&txn).meta.insert("schema", SCHEMA.to_be_bytes())?;
            txn.commit(true)?;
            return Ok(self);
        }
        if version < 2 {
            self.keyed_by_issuer()?;
        }
        if version < 3 {
            self.audit_indexed_by_device()?;
        }
        if version < 4 {
            self.listed_indexed()?;
        }
        if version < 5 {
            self.sorted_indexed()?;
        }
        self.packed()?;
        let txn = Txn::new(&*self.store);
        Tx::over(&txn).meta.insert("schema", SCHEMA.to_be_bytes())?;
        txn.commit(true)?;
        Ok(self)
    }

    /// Version 3: the audit log's index by device, made from the log.
    fn audit_indexed_by_device(&self) -> Result<(), Error> {
        let n = self.index_from(Space::Audit, Space::AuditByDevice, |k, v| {
            let e: AuditEntry = decode("audit entry", v)?;
            Ok(e.device.map(|d| {
                let mut key = super::audit_index_prefix(&d);
                key.extend_from_slice(k);
                key
            }))
        })?;
        tracing::info!(
            entries = n,
            "registry migrated: the audit log indexed by device"
        );
        Ok(())
    }

    /// Version 4: the certificates CRLs list, from every certificate
    /// record.
    fn listed_indexed(&self) -> Result<(), Error> {
        let n = self.index_from(Space::Certs, Space::Listed, |k, v| {
            let c = decode_cert(v)?;
            Ok(super::listed(&c).then(|| k.to_vec()))
        })?;
        tracing::info!(
            certificates = n,
            "registry migrated: the certificates CRLs list indexed"
        );
        Ok(())
    }

    /// Version 5: devices in the order people read ids, and certificates
    /// by expiry (`sorted`), from every record.
    fn sorted_indexed(&self) -> Result<(), Error> {
        let mut devices = 0;
        for part in [None, Some(())] {
            devices = self.index_from(Space::Devices, Space::Sorted, |_, v| {
                let d: DeviceRecord = decode("device", v)?;
                let part = match part {
                    None => "*",
                    Some(()) => d.status.as_str(),
                };
                Ok(Some(super::sorted::sorted_key(part, &d.id)))
            })?;
        }
        let certs = self.index_from(Space::Certs, Space::Expiring, |_, v| {
            let c = decode_cert(v)?;
            Ok(c.revocation
                .is_none()
                .then(|| super::sorted::expiring_key(&c)))
        })?;
        tracing::info!(
            devices,
            certificates = certs,
            "registry migrated: devices sorted as people read ids, certificates by expiry"
        );
        Ok(())
    }

    /// Version 6: every certificate record packed, and each `listed` entry
    /// given what a CRL says of its certificate (`packed`). A transaction a
    /// batch that compares what it read, so that a node writing meanwhile
    /// on a shared store loses nothing; one flush at the end; an
    /// interrupted run runs again.
    fn packed(&self) -> Result<(), Error> {
        // Two writes a certificate, at most.
        let per = (self.store.max_writes() / 2).clamp(1, 500);
        let mut n = 0;
        let mut keys = Vec::with_capacity(per);
        for kv in self.scan(Space::Certs, b"") {
            keys.push(kv?.0);
            if keys.len() == per {
                n += self.pack(&keys)?;
                keys.clear();
            }
        }
        n += self.pack(&keys)?;
        self.store.flush()?;
        tracing::info!(
            certificates = n,
            "registry migrated: certificate records packed, CRL entries kept in the listed index"
        );
        Ok(())
    }

    /// Rewrites the certificates at `keys` through `put_cert`: how many.
    fn pack(&self, keys: &[Vec<u8>]) -> Result<usize, Error> {
        self.transact_unflushed(|tx| {
            let mut n = 0;
            for k in keys {
                let Some(v) = tx.certs.get(k)? else {
                    continue;
                };
                let c = decode_cert(&v)?;
                // A device missing (a damaged registry, which `check`
                // reports) leaves the entry empty, read the old way.
                let device = if super::listed(&c) && c.revocation.is_none() {
                    tx.device(&c.device_id).ok()
                } else {
                    None
                };
                tx.put_cert(&c, device.as_ref())?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// Writes an empty entry in `index` at the key `key_of` makes of each
    /// entry of `from` it makes one of: in commits of at most the store's
    /// bound, one flush at the end. Entries already there are written
    /// again, so an interrupted run simply runs again. How many it wrote.
    fn index_from(
        &self,
        from: Space,
        index: Space,
        key_of: impl Fn(&[u8], &[u8]) -> Result<Option<Vec<u8>>, Error>,
    ) -> Result<usize, Error> {
        let per = self.store.max_writes().min(1000);
        let mut n = 0;
        let mut txn = Txn::new(&*self.store);
        for kv in self.scan(from, b"") {
            let (k, v) = kv?;
            if let Some(key) = key_of(&k, &v)? {
                txn.insert(index, &key, b"");
                n += 1;
                if n % per == 0 {
                    std::mem::replace(&mut txn, Txn::new(&*self.store)).commit(false)?;
                }
            }
        }
        txn.commit(false)?;
        self.store.flush()?;
        Ok(n)
    }

    /// Version 2: certificates keyed by issuer and serial (version 1 keyed
    /// them by serial alone).
    fn keyed_by_issuer(&self) -> Result<(), Error> {
        let txn = Txn::new(&*self.store);
        let tx = Tx::over(&txn);
        // Version 1 keyed certificates by serial alone. Device records
        // list serials (v1) or keys (v2, if interrupted half way).
        let mut device_of = std::collections::HashMap::new();
        for kv in self.scan(Space::Devices, b"") {
            let (_, v) = kv?;
            let d: serde_json::Value =
                serde_json::from_slice(&v).map_err(|e| Error::Corrupt(format!("device: {e}")))?;
            if let (Some(id), m) = (d["id"].as_str(), d["manufacturer"].as_str()) {
                device_of.insert(id.to_owned(), m.map(str::to_owned));
            }
        }
        let mut keys = std::collections::HashMap::new();
        for kv in self.scan(Space::Certs, b"") {
            let (k, v) = kv?;
            let mut c = decode_cert(&v)?;
            c.device_manufacturer = device_of.get(c.device_id.as_str()).cloned().flatten();
            let key = c.key();
            if k.as_slice() != key.to_bytes().as_slice() {
                tx.certs.remove(&k)?;
            }
            tx.certs.insert(key.to_bytes(), encode(&c))?;
            tx.fingerprints
                .insert(c.fingerprint.as_bytes(), key.to_bytes())?;
            keys.insert(c.serial.to_hex(), key);
        }
        for kv in self.scan(Space::Devices, b"") {
            let (k, v) = kv?;
            let mut d: serde_json::Value =
                serde_json::from_slice(&v).map_err(|e| Error::Corrupt(format!("device: {e}")))?;
            if let Some(list) = d["certificates"].as_array_mut() {
                for entry in list.iter_mut() {
                    if let Some(key) = entry.as_str().and_then(|s| keys.get(s)) {
                        *entry = serde_json::Value::String(key.to_string());
                    }
                }
            }
            tx.devices.insert(&k, encode(&d))?;
        }
        tx.meta.insert("schema", 2u64.to_be_bytes())?;
        if !txn.commit(true)? {
            return Err(Error::Storage(
                "the registry changed while it was migrated".into(),
            ));
        }
        tracing::info!(
            certificates = keys.len(),
            "registry migrated: certificates keyed by issuer and serial"
        );
        Ok(())
    }
}
