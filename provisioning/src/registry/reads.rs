//! Reading the registry: devices, certificates and their standing,
//! listings and counts, the audit log, CRL entries and numbers.

use super::*;

impl Registry {
    pub fn device(&self, id: &DeviceId) -> Result<DeviceRecord, Error> {
        match self
            .store
            .get(Space::Devices, AsRef::<[u8]>::as_ref(&id.as_str()))?
        {
            Some(v) => decode("device", &v),
            None => Err(Error::NotFound { id: id.to_string() }),
        }
    }

    /// A device with its certificates and their standing now.
    pub fn device_view(&self, id: &DeviceId) -> Result<DeviceView, Error> {
        let d = self.device(id)?;
        let now = OffsetDateTime::now_utc();
        let mut certificates = Vec::with_capacity(d.certificates.len());
        for key in &d.certificates {
            let (c, standing) = self.standing(key)?.ok_or_else(|| {
                Error::Corrupt(format!(
                    "device {id} lists certificate {key}, which is missing"
                ))
            })?;
            let status = match standing {
                Standing::Revoked(_) => "revoked",
                Standing::Suspended => "suspended",
                Standing::Pending => "pending",
                Standing::Good if c.not_after < now => "expired",
                Standing::Good => "good",
            };
            certificates.push(CertView {
                key: key.clone(),
                status: status.to_owned(),
                record: c,
            });
        }
        Ok(DeviceView {
            id: d.id,
            role: d.role,
            status: d.status,
            revocation: d.revocation,
            manufacturer: d.manufacturer,
            created_at: d.created_at,
            updated_at: d.updated_at,
            certificates,
            queued_commands: self.sessions.queue_len(id),
        })
    }

    /// Reads what admission and OCSP read at random once, so that those
    /// reads are local (a node's first minutes after a start, when its
    /// whole fleet reconnects): how many records. A store of this node's
    /// own reads the certificate records into its page cache; a shared
    /// store keeps the certificate and device records in its view, up to
    /// about `budget` bytes (half each). Run in the background.
    pub fn warm(&self, budget: u64) -> Result<usize, Error> {
        let spaces: &[Space] = if self.store.may_block() {
            &[Space::Certs, Space::Devices]
        } else {
            &[Space::Certs]
        };
        let share = budget / spaces.len() as u64;
        let mut n = 0;
        for &space in spaces {
            n += self.store.warm(space, share)?;
        }
        Ok(n)
    }

    /// The admission lookup: one read.
    pub fn certificate(&self, key: &CertKey) -> Result<Option<CertRecord>, Error> {
        self.store
            .get(Space::Certs, AsRef::<[u8]>::as_ref(&key.to_bytes()))?
            .map(|v| decode_cert(&v))
            .transpose()
    }

    /// The certificate as issued, PEM, with its record: `Ok(None)` if no
    /// such certificate; [`Error::NotKept`] if it was registered before
    /// the registry kept certificates whole. The stored bytes must hash to
    /// the record's fingerprint, so what is served is what admission
    /// knows.
    pub fn certificate_pem(&self, key: &CertKey) -> Result<Option<(CertRecord, String)>, Error> {
        let Some(rec) = self.certificate(key)? else {
            return Ok(None);
        };
        let der = self
            .store
            .get(Space::CertDer, AsRef::<[u8]>::as_ref(&key.to_bytes()))?
            .ok_or_else(|| Error::NotKept {
                what: format!(
                    "certificate {} was registered before fleetgate kept certificates whole: \
                     its device or whoever enrolled it holds the PEM",
                    rec.serial
                ),
            })?;
        if crate::id::fingerprint(&der) != rec.fingerprint {
            return Err(Error::Corrupt(format!(
                "certificate {}: the stored certificate does not match its fingerprint",
                rec.serial
            )));
        }
        let pem = crate::pem::encode("CERTIFICATE", &der);
        Ok(Some((rec, pem)))
    }

    /// Every certificate with `serial`, whoever issued it (usually one).
    pub fn certificates_with_serial(&self, serial: &Serial) -> Result<Vec<CertRecord>, Error> {
        self.store
            .scan(Space::Certs, &CertKey::serial_prefix(serial), b"")
            .map(|kv| decode_cert(&kv?.1))
            .collect()
    }

    pub fn certificate_by_fingerprint(&self, fp: &str) -> Result<Option<CertRecord>, Error> {
        match self
            .store
            .get(Space::Fingerprints, AsRef::<[u8]>::as_ref(&fp.as_bytes()))?
        {
            Some(key) => self.certificate(&CertKey::from_bytes(&key)?),
            None => Ok(None),
        }
    }

    /// A certificate's standing, with the device's revocation data if the
    /// device is what was revoked. `None` for a certificate never registered.
    pub fn standing(&self, key: &CertKey) -> Result<Option<(CertRecord, Standing)>, Error> {
        let Some(c) = self.certificate(key)? else {
            return Ok(None);
        };
        // Read only what the decision can use.
        let manufacturer = if c.revocation.is_none() {
            self.manufacturer_revocation(&c)?
        } else {
            None
        };
        let device = if c.revocation.is_none()
            && manufacturer.is_none()
            && c.device_status == Status::Revoked
        {
            self.device(&c.device_id)?.revocation
        } else {
            None
        };
        let s = lifecycle::standing(&StandingFacts {
            certificate: c.revocation,
            manufacturer,
            device_status: c.device_status,
            device,
            not_before: c.not_before,
        });
        Ok(Some((c, s)))
    }

    /// The revocation of a manufacturer `c` falls with (its signer's or its
    /// device's), if one is revoked.
    pub(super) fn manufacturer_revocation(
        &self,
        c: &CertRecord,
    ) -> Result<Option<Revocation>, Error> {
        for m in c.manufacturers() {
            if let Some(r) = self.manufacturer(m)?.and_then(|m| m.revocation) {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Devices in id order after `after`, optionally only those with `status`.
    pub fn list(
        &self,
        status: Option<Status>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page<DeviceRecord>, Error> {
        let limit = limit.clamp(1, MAX_PAGE);
        let mut items = Vec::with_capacity(limit.min(64));
        let mut more = false;
        match status {
            Some(s) => {
                let prefix = format!("{s}/");
                let start = match after {
                    Some(a) => format!("{prefix}{a}\0"),
                    None => prefix.clone(),
                };
                for kv in self.scan(Space::ByStatus, start.as_bytes()) {
                    let (k, _) = kv?;
                    let Some(id) = k.strip_prefix(prefix.as_bytes()) else {
                        break;
                    };
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    let id = std::str::from_utf8(id)
                        .map_err(|_| Error::Corrupt("status index key".into()))?;
                    items.push(self.device(&DeviceId::try_new(id)?)?);
                }
            }
            None => {
                let start = after.map(|a| format!("{a}\0")).unwrap_or_default();
                for kv in self.scan(Space::Devices, start.as_bytes()) {
                    if items.len() == limit {
                        more = true;
                        break;
                    }
                    let (_, v) = kv?;
                    items.push(decode("device", &v)?);
                }
            }
        }
        let next = if more {
            items.last().map(|d: &DeviceRecord| d.id.to_string())
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// Every device after `after` (exclusive; `None`: from the first), in
    /// id order, read as a caller goes: one scan however far it goes (on
    /// etcd its pages grow, where a page of [`Registry::list`] at a time
    /// is a request each).
    pub fn devices_after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = Result<DeviceRecord, Error>> + '_ {
        let start = after.map(|a| format!("{a}\0")).unwrap_or_default();
        self.scan(Space::Devices, start.as_bytes())
            .map(|kv| kv.and_then(|(_, v)| decode("device", &v)))
    }

    /// How many devices have each status (a scan of the status index's
    /// keys: the console caches it).
    pub fn count_by_status(&self) -> Result<Vec<(Status, usize)>, Error> {
        Status::ALL
            .into_iter()
            .map(|s| {
                let prefix = format!("{s}/");
                let mut n = 0;
                for kv in self
                    .store
                    .scan(Space::ByStatus, prefix.as_bytes(), prefix.as_bytes())
                {
                    kv?;
                    n += 1;
                }
                Ok((s, n))
            })
            .collect()
    }

    /// How many devices each manufacturer has (a scan of every device
    /// record: the console caches it).
    pub fn count_by_manufacturer(&self) -> Result<BTreeMap<String, usize>, Error> {
        /// Only the field counted: the rest of each record is skipped,
        /// not built.
        #[derive(serde::Deserialize)]
        struct Made {
            manufacturer: Option<String>,
        }
        let mut counts = BTreeMap::new();
        for kv in self.scan(Space::Devices, b"") {
            let (_, v) = kv?;
            let d: Made = decode("device", &v)?;
            if let Some(m) = d.manufacturer {
                *counts.entry(m).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// The newest `limit` audit entries about `device`, newest first.
    pub fn audit_of(&self, device: &DeviceId, limit: usize) -> Result<Vec<AuditEntry>, Error> {
        // The device's index, newest first: a page of its entries however
        // long the log.
        let prefix = super::audit_index_prefix(device);
        let mut found = Vec::new();
        for kv in self
            .store
            .scan_rev(Space::AuditByDevice, &prefix, b"")
            .take(limit)
        {
            let (k, _) = kv?;
            let seq = k
                .get(prefix.len()..)
                .ok_or_else(|| Error::Corrupt("audit index key".into()))?;
            if let Some(v) = self.store.get(Space::Audit, seq)? {
                found.push(decode::<AuditEntry>("audit entry", &v)?);
            }
        }
        Ok(found)
    }

    /// Audit entries with a sequence number above `after`, oldest first.
    pub fn audit(&self, after: Option<u64>, limit: usize) -> Result<Page<AuditEntry>, Error> {
        let limit = limit.clamp(1, MAX_PAGE);
        let start = after.map_or(0, |a| a.saturating_add(1));
        let mut items = Vec::new();
        let mut more = false;
        for kv in self.scan(Space::Audit, &start.to_be_bytes()) {
            if items.len() == limit {
                more = true;
                break;
            }
            let (_, v) = kv?;
            items.push(decode::<AuditEntry>("audit entry", &v)?);
        }
        let next = if more {
            items.last().map(|e| e.seq.to_string())
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// Audit entries with a sequence number below `before` (all, if
    /// `None`), newest first; `next` is the `before` of the page after.
    pub fn audit_newest(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Page<AuditEntry>, Error> {
        let limit = limit.clamp(1, MAX_PAGE);
        // The newest page starts below the last number given out, where
        // the store keeps it: near the keys, however long the log.
        let before = match before {
            Some(b) => Some(b),
            None => self
                .store
                .last_appended(super::AUDIT_COUNTER)?
                .map(|n| n.saturating_add(1)),
        };
        let bound = before.map(u64::to_be_bytes);
        let mut items = Vec::new();
        let mut more = false;
        for kv in self.store.scan_rev(
            Space::Audit,
            b"",
            bound.as_ref().map_or(&[][..], |b| &b[..]),
        ) {
            if items.len() == limit {
                more = true;
                break;
            }
            let (_, v) = kv?;
            items.push(decode::<AuditEntry>("audit entry", &v)?);
        }
        let next = if more {
            items.last().map(|e| e.seq.to_string())
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// Every unexpired certificate `issuer` signed (under `manufacturer`)
    /// that is revoked or on hold.
    pub fn revoked_by_issuer(
        &self,
        manufacturer: Option<&str>,
        issuer: &str,
    ) -> Result<Vec<Listed>, Error> {
        let now = OffsetDateTime::now_utc();
        let mut out = Vec::new();
        // A revoked manufacturer's certificates are listed whatever their
        // own standing: then every certificate is looked at (rare: a
        // manufacturer revoked and its certificates not yet expired).
        // Otherwise only those the `listed` index holds, each with what the
        // CRL says of it (an entry from before schema 6: read the old way).
        if self.manufacturers()?.iter().any(|m| m.revocation.is_some()) {
            for kv in self.scan(Space::Certs, b"") {
                let c = decode_cert(&kv?.1)?;
                out.extend(self.listing_now(manufacturer, issuer, now, &c)?);
            }
            return Ok(out);
        }
        let scope = CertKey::new(manufacturer, issuer, Serial::from_bytes(&[1])?);
        for kv in self.scan(Space::Listed, b"") {
            let (k, v) = kv?;
            let key = CertKey::from_bytes(&k)?;
            match Listing::decode(&v)? {
                Some(l) => {
                    if key.same_scope(&scope) && l.not_after >= now {
                        out.push(Listed {
                            serial: key.serial,
                            at: l.at,
                            reason: l.reason,
                        });
                    }
                }
                None => {
                    if let Some(c) = self.certificate(&key)? {
                        out.extend(self.listing_now(manufacturer, issuer, now, &c)?);
                    }
                }
            }
        }
        Ok(out)
    }

    /// What a CRL of `issuer` (under `manufacturer`) made `now` lists for
    /// `c`, read from its record, its device and its manufacturers.
    pub(super) fn listing_now(
        &self,
        manufacturer: Option<&str>,
        issuer: &str,
        now: OffsetDateTime,
        c: &CertRecord,
    ) -> Result<Option<Listed>, Error> {
        if c.issuer != issuer || c.manufacturer.as_deref() != manufacturer || c.not_after < now {
            return Ok(None);
        }
        // A revoked manufacturer lists its devices' certificates too.
        let revocation = match c.revocation {
            Some(r) => Some(r),
            None => self.manufacturer_revocation(c)?,
        };
        let listed = match (revocation, c.device_status) {
            (Some(r), _) => Some((r.at, Some(r.reason))),
            (None, Status::Revoked) => {
                let d = self.device(&c.device_id)?;
                let r = d.revocation.unwrap_or(Revocation {
                    reason: RevocationReason::Unspecified,
                    at: d.updated_at,
                });
                Some((r.at, Some(r.reason)))
            }
            (None, Status::Suspended | Status::Pending) => {
                Some((self.device(&c.device_id)?.updated_at, None))
            }
            (None, Status::Active) => None,
        };
        Ok(listed.map(|(at, reason)| Listed {
            serial: c.serial.clone(),
            at,
            reason,
        }))
    }

    /// The next CRL number for `issuer`, durable before it is returned so
    /// that numbers only ever increase.
    pub fn next_crl_number(&self, issuer: &str) -> Result<u64, Error> {
        // Read, add one, write back if nobody else did meanwhile: on a
        // shared store every node's numbers go up together.
        let key = format!("crl-number/{issuer}");
        self.transact(|tx| {
            let n = tx
                .meta
                .get(key.as_bytes())?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_be_bytes)
                .saturating_add(1);
            tx.meta.insert(key.as_bytes(), n.to_be_bytes())?;
            Ok(n)
        })
    }
}
