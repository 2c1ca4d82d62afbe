//! The registry's manufacturers, their just-in-time devices, claims and
//! challenges.

use super::*;

impl Registry {
    /// Registers a device that presented a manufacturer's certificate on its
    /// first connect (just-in-time), as `status` (active or pending).
    pub fn register_jit(
        &self,
        new: &NewDevice,
        cert: &IssuedCert,
        status: Status,
        actor: &str,
    ) -> Result<DeviceRecord, Error> {
        let now = OffsetDateTime::now_utc();
        self.commit(Vec::new(), |tx| {
            if let Some(name) = &new.manufacturer {
                let mut m = tx.manufacturer(name)?;
                if m.jit_registered >= m.jit_quota() {
                    return abort(Error::QuotaExceeded {
                        reason: format!(
                            "manufacturer {name} has registered {} devices just in time, its \
                             quota (fleetgate manufacturer quota {name} N raises it)",
                            m.jit_registered
                        ),
                    });
                }
                m.jit_registered += 1;
                tx.put_manufacturer(&m)?;
            }
            let d = tx.new_device(new, cert, status, now)?;
            tx.audit(
                actor,
                "jit-register",
                Some(&d.id),
                Some(&cert.serial),
                format!("{}, status {status}", enroll_detail(&d, cert)),
                now,
            )?;
            Ok(d)
        })
    }

    /// Registers a claim principal with its certificate and its uses.
    pub fn add_claim(
        &self,
        new: &NewDevice,
        cert: &IssuedCert,
        uses: u32,
        actor: &str,
    ) -> Result<(DeviceRecord, ClaimRecord), Error> {
        let now = OffsetDateTime::now_utc();
        self.commit(Vec::new(), |tx| {
            let d = tx.new_device(new, cert, Status::Active, now)?;
            let claim = ClaimRecord {
                id: d.id.clone(),
                uses_left: uses,
                used: 0,
                manufacturer: new.manufacturer.clone(),
            };
            tx.claims
                .insert(d.id.as_str(), encode(&claim))
                .map_err(storage)?;
            tx.audit(
                actor,
                "claim-create",
                Some(&d.id),
                Some(&cert.serial),
                format!("{}, {uses} uses", enroll_detail(&d, cert)),
                now,
            )?;
            Ok((d, claim))
        })
    }

    pub fn claim(&self, id: &DeviceId) -> Result<Option<ClaimRecord>, Error> {
        self.store
            .get(Space::Claims, AsRef::<[u8]>::as_ref(&id.as_str()))?
            .map(|v| decode("claim", &v))
            .transpose()
    }

    /// Registers a device provisioned through the claim `claim`, spending
    /// one of the claim's uses, all in one transaction.
    pub fn provision_with_claim(
        &self,
        claim: &DeviceId,
        new: &NewDevice,
        cert: &IssuedCert,
        actor: &str,
    ) -> Result<(DeviceRecord, ClaimRecord), Error> {
        let now = OffsetDateTime::now_utc();
        self.commit(Vec::new(), |tx| {
            let holder = tx.device(claim)?;
            if holder.status != Status::Active {
                return abort(Error::InvalidTransition {
                    id: claim.to_string(),
                    status: holder.status.as_str(),
                    action: "provision",
                });
            }
            let mut c: ClaimRecord = match tx.claims.get(claim.as_str()).map_err(storage)? {
                Some(v) => decode("claim", &v).or_else(abort)?,
                None => {
                    return abort(Error::NotFound {
                        id: claim.to_string(),
                    })
                }
            };
            if c.uses_left == 0 {
                return abort(Error::ClaimExhausted {
                    id: claim.to_string(),
                });
            }
            c.uses_left -= 1;
            c.used += 1;
            tx.claims
                .insert(claim.as_str(), encode(&c))
                .map_err(storage)?;
            let d = tx.new_device(new, cert, Status::Active, now)?;
            tx.audit(
                actor,
                "claim-provision",
                Some(&d.id),
                Some(&cert.serial),
                format!(
                    "{}, claim uses left {}",
                    enroll_detail(&d, cert),
                    c.uses_left
                ),
                now,
            )?;
            Ok((d, c))
        })
    }

    pub fn manufacturer(&self, name: &str) -> Result<Option<ManufacturerRecord>, Error> {
        self.store
            .get(
                Space::Manufacturers,
                AsRef::<[u8]>::as_ref(&name.as_bytes()),
            )?
            .map(|v| decode("manufacturer", &v))
            .transpose()
    }

    /// Every manufacturer, by name.
    pub fn manufacturers(&self) -> Result<Vec<ManufacturerRecord>, Error> {
        self.scan(Space::Manufacturers, b"")
            .map(|kv| decode("manufacturer", &kv?.1))
            .collect()
    }

    /// Records a new manufacturer CA (issued here or registered).
    pub fn add_manufacturer(&self, rec: &ManufacturerRecord, actor: &str) -> Result<(), Error> {
        self.commit(vec![Change::Manufacturers], |tx| {
            if tx
                .manufacturers
                .get(rec.name.as_str())
                .map_err(storage)?
                .is_some()
            {
                return abort(Error::AlreadyExists {
                    id: rec.name.to_string(),
                });
            }
            tx.manufacturers
                .insert(rec.name.as_str(), encode(rec))
                .map_err(storage)?;
            tx.audit(
                actor,
                match rec.kind {
                    CaKind::Issued => "manufacturer-create",
                    CaKind::Registered => "manufacturer-register",
                },
                None,
                Some(&rec.serial),
                format!(
                    "manufacturer {}: CA {:?}, policy {}",
                    rec.name, rec.subject, rec.policy
                ),
                rec.created_at,
            )?;
            Ok(())
        })
    }

    /// Revokes a manufacturer: every certificate its CA issued is revoked
    /// with it (see [`Registry::standing`]). Final.
    pub fn revoke_manufacturer(
        &self,
        name: &str,
        reason: RevocationReason,
        actor: &str,
    ) -> Result<ManufacturerRecord, Error> {
        let at = now_seconds();
        self.commit(
            vec![
                Change::ManufacturerRevoked {
                    name: name.to_owned(),
                },
                Change::Manufacturers,
            ],
            |tx| {
                let mut m = tx.manufacturer(name)?;
                if m.status == ManufacturerStatus::Revoked {
                    return abort(Error::InvalidInput {
                        reason: format!("manufacturer {name} is already revoked"),
                    });
                }
                m.status = ManufacturerStatus::Revoked;
                m.revocation = Some(Revocation { reason, at });
                tx.put_manufacturer(&m)?;
                tx.audit(
                    actor,
                    "manufacturer-revoke",
                    None,
                    Some(&m.serial),
                    format!("manufacturer {name}, reason {reason}"),
                    at,
                )?;
                Ok(m)
            },
        )
    }

    /// Sets how many devices manufacturer `name` may register just in time.
    pub fn set_jit_quota(
        &self,
        name: &str,
        quota: u64,
        actor: &str,
    ) -> Result<ManufacturerRecord, Error> {
        let at = now_seconds();
        self.commit(Vec::new(), |tx| {
            let mut m = tx.manufacturer(name)?;
            let old = m.jit_quota();
            m.jit_quota = Some(quota);
            tx.put_manufacturer(&m)?;
            tx.audit(
                actor,
                "manufacturer-quota",
                None,
                Some(&m.serial),
                format!("manufacturer {name}: just-in-time quota {old} -> {quota}"),
                at,
            )?;
            Ok(m)
        })
    }

    /// Stores the proof-of-possession challenge for `name`, replacing any.
    pub fn set_challenge(&self, name: &str, c: &Challenge) -> Result<(), Error> {
        self.transact(|tx| tx.challenges.insert(name.as_bytes(), encode(c)))
    }

    /// Removes and returns the challenge for `name`: each is good once.
    pub fn take_challenge(&self, name: &str) -> Result<Option<Challenge>, Error> {
        self.transact(|tx| {
            let c = tx.challenges.get(name.as_bytes())?;
            if c.is_some() {
                tx.challenges.remove(name.as_bytes())?;
            }
            c.map(|v| decode("challenge", &v)).transpose()
        })
    }
}
