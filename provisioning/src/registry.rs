//! The device registry: devices, their certificates and the audit log,
//! over a [`Store`] (sled by default, [`crate::store`]).
//!
//! Key spaces ([`Space`]; keys are bytes, values JSON):
//! - `devices`: device id -> [`DeviceRecord`]
//! - `certs`: [`CertKey`] (serial within its issuer) -> [`CertRecord`],
//!   which mirrors its device's status and manufacturer so that the
//!   admission check at connect time is one read (and one more for a
//!   manufacturer's standing)
//! - `fingerprints`: SHA-256 of the DER -> [`CertKey`]
//! - `by_status`: `<status>/<id>` -> empty, for paged listing by status
//! - `audit`: big-endian sequence number -> [`AuditEntry`]
//! - `manufacturers`: name -> [`ManufacturerRecord`]
//! - `claims`: claim id -> [`ClaimRecord`] (uses left)
//! - `challenges`: manufacturer name -> proof-of-possession challenge
//!
//! Every change is one transaction across the key spaces it touches (a
//! compare-and-swap commit of what it read, run again on a conflict), and is
//! flushed to disk before the call returns: a caller may acknowledge what a
//! call returned.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use time::OffsetDateTime;

use crate::ca::IssuedCert;
use crate::events::{Change, Committed, Feed};
use crate::lifecycle::{self, Action, StandingFacts};
pub use crate::lifecycle::{Revocation, RevocationReason, Standing, Status};
use crate::manufacturer::{CaKind, Challenge, ClaimRecord, ManufacturerRecord, ManufacturerStatus};
use crate::store::{SledStore, Space, Store, Txn};
use crate::{CertKey, DeviceId, Error, Role, Serial};

mod blobs;
mod seal;
pub use seal::{Checkpoint, Verification};

/// The registry's layout version, in `meta`; older layouts are migrated
/// when opened. 2: certificates keyed by [`CertKey`] instead of serial.
const SCHEMA: u64 = 2;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub role: Role,
    pub status: Status,
    /// Set when `status` is `Revoked`.
    pub revocation: Option<Revocation>,
    pub manufacturer: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Every certificate ever issued to this device, oldest first.
    pub certificates: Vec<CertKey>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub serial: Serial,
    pub device_id: DeviceId,
    pub role: Role,
    /// The issuer's distinguished name, RFC 4514 form.
    pub issuer: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER, lowercase hex.
    pub fingerprint: String,
    /// This certificate's own revocation, if any.
    pub revocation: Option<Revocation>,
    /// Its device's status, mirrored here on every device change.
    pub device_status: Status,
    /// The manufacturer whose CA issued it (the chain runs through that
    /// CA), if not fleetgate's own: part of its key.
    #[serde(default)]
    pub manufacturer: Option<String>,
    /// Its device's manufacturer, mirrored here: revoking the manufacturer
    /// revokes every certificate of its devices, whoever signed it (a
    /// device of a registered manufacturer rotated by fleetgate's CA).
    #[serde(default)]
    pub device_manufacturer: Option<String>,
}

impl CertRecord {
    /// Its key in the registry.
    pub fn key(&self) -> CertKey {
        CertKey::new(
            self.manufacturer.as_deref(),
            &self.issuer,
            self.serial.clone(),
        )
    }

    /// The manufacturers whose revocation takes this certificate along.
    pub fn manufacturers(&self) -> impl Iterator<Item = &str> {
        let signer = self.manufacturer.as_deref();
        let device = self
            .device_manufacturer
            .as_deref()
            .filter(|d| Some(*d) != signer);
        signer.into_iter().chain(device)
    }

    /// The certificate's standing, its own revocation first, then its device's.
    /// Validity dates are checked by whoever verifies the chain.
    pub fn standing(&self, device_revocation: Option<Revocation>) -> Standing {
        lifecycle::standing(&StandingFacts {
            certificate: self.revocation,
            manufacturer: None,
            device_status: self.device_status,
            device: device_revocation,
            not_before: self.not_before,
        })
    }
}

/// A certificate as the API shows it: the record and its standing now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    /// The certificate's key (`<serial>:<scope>`), which names it in the
    /// API when its serial alone is ambiguous.
    pub key: CertKey,
    #[serde(flatten)]
    pub record: CertRecord,
    /// `good`, `suspended`, `revoked` or `expired`.
    pub status: String,
}

/// A device with its certificates, as `device show` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: DeviceId,
    pub role: Role,
    pub status: Status,
    pub revocation: Option<Revocation>,
    pub manufacturer: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub certificates: Vec<CertView>,
    /// Commands waiting in its persistent MQTT session.
    #[serde(default)]
    pub queued_commands: usize,
}

/// One line of the append-only audit log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Who asked: an admin identity, `system`, ...
    pub actor: String,
    pub action: String,
    pub device: Option<DeviceId>,
    pub serial: Option<Serial>,
    pub detail: String,
}

/// A new registration.
#[derive(Clone, Debug)]
pub struct NewDevice {
    pub id: DeviceId,
    pub role: Role,
    pub manufacturer: Option<String>,
}

/// What [`Registry::check`] found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    pub devices: usize,
    pub certificates: usize,
    pub manufacturers: usize,
    pub audit_entries: usize,
    /// Each inconsistency, in words; empty when all is well.
    pub problems: Vec<String>,
}

/// A page of a listing; `next` is the cursor for the following page.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

pub const MAX_PAGE: usize = 1000;

/// Devices revoked in one bulk revocation at most.
pub const MAX_BULK: usize = 10_000;

/// What a bulk revocation did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkRevocation {
    pub revoked: Vec<DeviceId>,
    pub already_revoked: Vec<DeviceId>,
    pub not_found: Vec<DeviceId>,
}

#[derive(Clone)]
pub struct Registry {
    store: Arc<dyn Store>,
    sessions: crate::sessions::SessionStore,
    /// The revision and announcements of committed writes.
    feed: std::sync::Arc<Feed>,
}

/// A certificate a CRL lists: revoked, or on hold while its device is
/// suspended (`reason` None means certificateHold).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub serial: Serial,
    pub at: OffsetDateTime,
    pub reason: Option<RevocationReason>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

type TxResult<T> = Result<T, Error>;

/// One key space as a transaction sees it.
struct TxTree<'a> {
    space: Space,
    txn: &'a Txn<'a>,
}

impl TxTree<'_> {
    fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Error> {
        self.txn.get(self.space, key.as_ref())
    }

    fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), Error> {
        self.txn.insert(self.space, key.as_ref(), value.as_ref());
        Ok(())
    }

    fn remove(&self, key: impl AsRef<[u8]>) -> Result<(), Error> {
        self.txn.remove(self.space, key.as_ref());
        Ok(())
    }
}

/// The key spaces one transaction sees.
struct Tx<'a> {
    txn: &'a Txn<'a>,
    devices: TxTree<'a>,
    certs: TxTree<'a>,
    fingerprints: TxTree<'a>,
    by_status: TxTree<'a>,
    audit: TxTree<'a>,
    meta: TxTree<'a>,
    manufacturers: TxTree<'a>,
    claims: TxTree<'a>,
    challenges: TxTree<'a>,
}

impl<'a> Tx<'a> {
    fn over(txn: &'a Txn<'a>) -> Self {
        let tree = |space| TxTree { space, txn };
        Self {
            txn,
            devices: tree(Space::Devices),
            certs: tree(Space::Certs),
            fingerprints: tree(Space::Fingerprints),
            by_status: tree(Space::ByStatus),
            audit: tree(Space::Audit),
            meta: tree(Space::Meta),
            manufacturers: tree(Space::Manufacturers),
            claims: tree(Space::Claims),
            challenges: tree(Space::Challenges),
        }
    }
}

fn abort<T>(e: Error) -> TxResult<T> {
    Err(e)
}

fn storage(e: Error) -> Error {
    e
}

/// A transaction that keeps meeting concurrent writers gives up after
/// this many runs.
const ATTEMPTS: usize = 64;

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail: no maps with
    // non-string keys, no failing Serialize impls.
    serde_json::to_vec(v).expect("registry records serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

fn status_key(status: Status, id: &DeviceId) -> Vec<u8> {
    format!("{status}/{id}").into_bytes()
}

fn enroll_detail(d: &DeviceRecord, cert: &IssuedCert) -> String {
    let mut s = format!(
        "role {}, certificate expires {}",
        d.role,
        rfc3339(cert.not_after)
    );
    if let Some(m) = &cert.manufacturer {
        s.push_str(&format!(", manufacturer {m}"));
    }
    s
}

impl Tx<'_> {
    /// Moves device `d` to status `to`, mirrored into its certificates, with
    /// an audit entry (`detail` appended to its words).
    fn change_status(
        &self,
        mut d: DeviceRecord,
        to: Status,
        revocation: Option<Revocation>,
        action: &str,
        actor: &str,
        detail: &str,
    ) -> TxResult<DeviceRecord> {
        let old = d.status;
        d.status = to;
        d.revocation = revocation;
        let now = revocation.map_or_else(OffsetDateTime::now_utc, |r| r.at);
        d.updated_at = now;
        self.put_device(Some(old), &d)?;
        self.mirror_status(&d)?;
        let words = match revocation {
            Some(r) => format!("{old} -> {to}, reason {}{detail}", r.reason),
            None => format!("{old} -> {to}{detail}"),
        };
        self.audit(actor, action, Some(&d.id), None, words, now)?;
        Ok(d)
    }

    /// A new device record holding `cert`; fails if the id is taken.
    fn new_device(
        &self,
        new: &NewDevice,
        cert: &IssuedCert,
        status: Status,
        now: OffsetDateTime,
    ) -> TxResult<DeviceRecord> {
        if self
            .devices
            .get(new.id.as_str())
            .map_err(storage)?
            .is_some()
        {
            return abort(Error::AlreadyExists { id: new.id.clone() });
        }
        let mut d = DeviceRecord {
            id: new.id.clone(),
            role: new.role,
            status,
            revocation: None,
            manufacturer: new.manufacturer.clone(),
            created_at: now,
            updated_at: now,
            certificates: Vec::new(),
        };
        self.add_cert(&mut d, cert)?;
        self.put_device(None, &d)?;
        Ok(d)
    }

    fn manufacturer(&self, name: &str) -> TxResult<ManufacturerRecord> {
        match self.manufacturers.get(name.as_bytes()).map_err(storage)? {
            Some(v) => decode("manufacturer", &v).or_else(abort),
            None => abort(Error::ManufacturerNotFound {
                name: name.to_owned(),
            }),
        }
    }

    fn put_manufacturer(&self, m: &ManufacturerRecord) -> TxResult<()> {
        self.manufacturers
            .insert(m.name.as_str(), encode(m))
            .map_err(storage)?;
        Ok(())
    }

    fn device(&self, id: &DeviceId) -> TxResult<DeviceRecord> {
        match self.devices.get(id.as_str()).map_err(storage)? {
            Some(v) => decode("device", &v).or_else(abort),
            None => abort(Error::NotFound { id: id.clone() }),
        }
    }

    fn put_device(&self, old: Option<Status>, d: &DeviceRecord) -> TxResult<()> {
        if let Some(old) = old {
            self.by_status
                .remove(status_key(old, &d.id))
                .map_err(storage)?;
        }
        self.by_status
            .insert(status_key(d.status, &d.id), &[][..])
            .map_err(storage)?;
        self.devices
            .insert(d.id.as_str(), encode(d))
            .map_err(storage)?;
        Ok(())
    }

    fn cert(&self, key: &CertKey) -> TxResult<CertRecord> {
        match self.certs.get(key.to_bytes()).map_err(storage)? {
            Some(v) => decode("certificate", &v).or_else(abort),
            None => abort(Error::CertNotFound {
                serial: key.to_string(),
            }),
        }
    }

    fn put_cert(&self, c: &CertRecord) -> TxResult<()> {
        self.certs
            .insert(c.key().to_bytes(), encode(c))
            .map_err(storage)?;
        Ok(())
    }

    /// Mirrors the device's status into each of its certificates.
    fn mirror_status(&self, d: &DeviceRecord) -> TxResult<()> {
        for key in &d.certificates {
            let mut c = self.cert(key)?;
            c.device_status = d.status;
            self.put_cert(&c)?;
        }
        Ok(())
    }

    fn add_cert(&self, d: &mut DeviceRecord, cert: &IssuedCert) -> TxResult<()> {
        let rec = CertRecord {
            serial: cert.serial.clone(),
            device_id: d.id.clone(),
            role: d.role,
            issuer: cert.issuer.clone(),
            not_before: cert.not_before,
            not_after: cert.not_after,
            fingerprint: cert.fingerprint.clone(),
            revocation: None,
            device_status: d.status,
            manufacturer: cert.manufacturer.clone(),
            device_manufacturer: d.manufacturer.clone(),
        };
        let key = rec.key();
        if self.certs.get(key.to_bytes()).map_err(storage)?.is_some() {
            // Ours have 159 random bits; a manufacturer's serial is unique
            // per issuer, and admission found none under this one.
            return abort(Error::CertExists {
                serial: rec.serial.to_hex(),
                issuer: rec.issuer.clone(),
            });
        }
        self.put_cert(&rec)?;
        self.fingerprints
            .insert(rec.fingerprint.as_bytes(), key.to_bytes())
            .map_err(storage)?;
        d.certificates.push(key);
        Ok(())
    }

    fn audit(
        &self,
        actor: &str,
        action: &str,
        device: Option<&DeviceId>,
        serial: Option<&Serial>,
        detail: String,
        at: OffsetDateTime,
    ) -> TxResult<()> {
        // One global order, whoever writes.
        let seq = self.txn.next("audit")?;
        let entry = AuditEntry {
            seq,
            at,
            actor: actor.to_owned(),
            action: action.to_owned(),
            device: device.cloned(),
            serial: serial.cloned(),
            detail,
        };
        self.audit
            .insert(seq.to_be_bytes(), encode(&entry))
            .map_err(storage)?;
        Ok(())
    }
}

impl Registry {
    /// Opens (or creates) the embedded registry at `path`: sled, with the
    /// devices' MQTT sessions beside it.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let store = SledStore::open(path)?;
        let sessions = crate::sessions::SessionStore::open(store.db())?;
        Self::over(Arc::new(store), sessions)
    }

    /// A registry over `store`, migrated to this version's layout.
    pub fn over(
        store: Arc<dyn Store>,
        sessions: crate::sessions::SessionStore,
    ) -> Result<Self, Error> {
        Self {
            store,
            sessions,
            feed: Default::default(),
        }
        .migrated()
    }

    fn scan<'a>(&'a self, space: Space, start: &[u8]) -> crate::store::Entries<'a> {
        self.store.scan(space, b"", start)
    }

    /// Brings an older registry layout up to [`SCHEMA`]. Idempotent, so an
    /// interrupted migration simply runs again on the next open: the
    /// certificate records themselves say what their keys must be.
    fn migrated(self) -> Result<Self, Error> {
        let version = self
            .store
            .get(Space::Meta, b"schema")?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(1, u64::from_be_bytes);
        if version >= SCHEMA {
            return Ok(self);
        }
        let txn = Txn::new(&*self.store);
        let tx = Tx::over(&txn);
        if self.store.len(Space::Devices)? == 0 && self.store.len(Space::Certs)? == 0 {
            tx.meta.insert("schema", SCHEMA.to_be_bytes())?;
            txn.commit(true)?;
            return Ok(self);
        }
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
            let mut c: CertRecord = decode("certificate", &v)?;
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
        tx.meta.insert("schema", SCHEMA.to_be_bytes())?;
        if !txn.commit(true)? {
            return Err(Error::Storage(
                "the registry changed while it was migrated".into(),
            ));
        }
        tracing::info!(
            certificates = keys.len(),
            "registry migrated: certificates keyed by issuer and serial"
        );
        Ok(self)
    }

    /// [`Registry::transact`], then announces the write on the feed with
    /// `changes`: every write that live connections or caches must follow
    /// goes through here, once.
    fn commit<T>(
        &self,
        changes: Vec<Change>,
        f: impl Fn(&Tx<'_>) -> TxResult<T>,
    ) -> Result<T, Error> {
        let out = self.transact(f)?;
        self.feed.announce(changes);
        Ok(out)
    }

    /// Runs `f` as one transaction over all key spaces, durably.
    fn transact<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, Error> {
        self.run(f, true)
    }

    /// One transaction, not yet durable: the caller flushes before it
    /// acknowledges anything.
    fn transact_unflushed<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, Error> {
        self.run(f, false)
    }

    /// Runs `f` and commits what it wrote if what it read still holds;
    /// runs it again if not (another writer got there first).
    fn run<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>, durable: bool) -> Result<T, Error> {
        for _ in 0..ATTEMPTS {
            let txn = Txn::new(&*self.store);
            let out = f(&Tx::over(&txn))?;
            if txn.commit(durable)? {
                return Ok(out);
            }
        }
        Err(Error::Storage(format!(
            "a transaction met concurrent writes {ATTEMPTS} times; try again"
        )))
    }

    /// Registers a device with its first certificate.
    pub fn enroll(
        &self,
        new: &NewDevice,
        cert: &IssuedCert,
        actor: &str,
    ) -> Result<DeviceRecord, Error> {
        let out = self.enroll_unflushed(new, cert, actor)?;
        self.store.flush()?;
        self.feed.announce(Vec::new());
        Ok(out)
    }

    /// Registers many devices with one flush at the end: each one is its own
    /// transaction, so one bad entry (a duplicate id) fails alone. Durable
    /// when it returns, like [`Registry::enroll`].
    pub fn enroll_batch(
        &self,
        batch: &[(NewDevice, IssuedCert)],
        actor: &str,
    ) -> Result<Vec<Result<DeviceRecord, Error>>, Error> {
        let out = batch
            .iter()
            .map(|(new, cert)| self.enroll_unflushed(new, cert, actor))
            .collect();
        self.store.flush()?;
        self.feed.announce(Vec::new());
        Ok(out)
    }

    fn enroll_unflushed(
        &self,
        new: &NewDevice,
        cert: &IssuedCert,
        actor: &str,
    ) -> Result<DeviceRecord, Error> {
        let now = OffsetDateTime::now_utc();
        self.transact_unflushed(|tx| {
            let d = tx.new_device(new, cert, Status::Active, now)?;
            tx.audit(
                actor,
                "enroll",
                Some(&d.id),
                Some(&cert.serial),
                enroll_detail(&d, cert),
                now,
            )?;
            Ok(d)
        })
    }

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
                    id: claim.clone(),
                    status: holder.status,
                    action: "provision",
                });
            }
            let mut c: ClaimRecord = match tx.claims.get(claim.as_str()).map_err(storage)? {
                Some(v) => decode("claim", &v).or_else(abort)?,
                None => return abort(Error::NotFound { id: claim.clone() }),
            };
            if c.uses_left == 0 {
                return abort(Error::ClaimExhausted { id: claim.clone() });
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
                    id: rec.name.clone(),
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

    /// Adds a certificate to an active device (rotation); older ones stay
    /// valid until revoked or expired.
    pub fn add_certificate(
        &self,
        id: &DeviceId,
        cert: &IssuedCert,
        actor: &str,
    ) -> Result<DeviceRecord, Error> {
        let now = OffsetDateTime::now_utc();
        self.commit(Vec::new(), |tx| {
            let mut d = tx.device(id)?;
            if d.status != Status::Active {
                return abort(Error::InvalidTransition {
                    id: id.clone(),
                    status: d.status,
                    action: "rotate",
                });
            }
            tx.add_cert(&mut d, cert)?;
            d.updated_at = now;
            tx.put_device(Some(d.status), &d)?;
            tx.audit(
                actor,
                "rotate",
                Some(id),
                Some(&cert.serial),
                format!("certificate expires {}", rfc3339(cert.not_after)),
                now,
            )?;
            Ok(d)
        })
    }

    fn set_status(
        &self,
        id: &DeviceId,
        action: Action,
        revocation: Option<Revocation>,
        actor: &str,
    ) -> Result<DeviceRecord, Error> {
        let changes = match action {
            Action::Suspend => vec![Change::DeviceOut {
                id: id.clone(),
                status: Status::Suspended,
            }],
            Action::Revoke => vec![Change::DeviceOut {
                id: id.clone(),
                status: Status::Revoked,
            }],
            Action::Resume | Action::Approve => Vec::new(),
        };
        self.commit(changes, |tx| {
            let d = tx.device(id)?;
            let to = lifecycle::transition(id, d.status, action).or_else(abort)?;
            tx.change_status(d, to, revocation, action.as_str(), actor, "")
        })
    }

    /// Revokes many devices in one transaction and one flush: an incident
    /// (a compromised production lot) at the cost of one write. Unknown and
    /// already revoked ids are reported, not failed; each revoked device
    /// gets its own audit entry.
    pub fn revoke_many(
        &self,
        ids: &[DeviceId],
        reason: RevocationReason,
        actor: &str,
    ) -> Result<BulkRevocation, Error> {
        if ids.len() > MAX_BULK {
            return Err(Error::TooLarge {
                len: ids.len(),
                max: MAX_BULK,
            });
        }
        let mut unique: Vec<&DeviceId> = ids.iter().collect();
        unique.sort();
        unique.dedup();
        let revocation = Revocation {
            reason,
            at: now_seconds(),
        };
        // One transaction where the store takes it (sled); on a store that
        // bounds a transaction's operations (etcd: 128), chunks of devices,
        // each its own transaction, and the answer only once all are
        // durable. A device is revoked in one transaction either way, and
        // revoking is idempotent: a crash half way leaves a part revoked,
        // which the operator's retry completes.
        let per = (self.store.max_writes() / 8).max(1);
        let mut out = BulkRevocation::default();
        for chunk in unique.chunks(per) {
            let part = self.revoke_chunk(chunk, revocation, actor)?;
            out.revoked.extend(part.revoked);
            out.not_found.extend(part.not_found);
            out.already_revoked.extend(part.already_revoked);
        }
        self.store.flush()?;
        if !out.revoked.is_empty() {
            self.feed.announce(vec![Change::DevicesRevoked {
                ids: std::sync::Arc::new(out.revoked.clone()),
            }]);
        }
        self.sessions.purge(&out.revoked)?;
        Ok(out)
    }

    /// [`Registry::revoke_many`]'s work for some of its devices, in one
    /// transaction, not yet durable.
    fn revoke_chunk(
        &self,
        unique: &[&DeviceId],
        revocation: Revocation,
        actor: &str,
    ) -> Result<BulkRevocation, Error> {
        self.transact_unflushed(|tx| {
            let mut out = BulkRevocation::default();
            for id in unique {
                let d = match tx.devices.get(id.as_str()).map_err(storage)? {
                    Some(v) => decode::<DeviceRecord>("device", &v).or_else(abort)?,
                    None => {
                        out.not_found.push((*id).clone());
                        continue;
                    }
                };
                if lifecycle::transition(id, d.status, Action::Revoke).is_err() {
                    out.already_revoked.push((*id).clone());
                    continue;
                }
                tx.change_status(
                    d,
                    Status::Revoked,
                    Some(revocation),
                    "revoke",
                    actor,
                    " (bulk revocation)",
                )?;
                out.revoked.push((*id).clone());
            }
            Ok(out)
        })
    }

    /// The ids of devices made by `manufacturer` (any, if `None`) holding a
    /// certificate whose validity began in `[issued_after, issued_before)`:
    /// a production lot, for [`Registry::revoke_many`]. At most
    /// [`MAX_BULK`] + 1 (more means too many for one call).
    pub fn select_devices(
        &self,
        manufacturer: Option<&str>,
        issued_after: Option<OffsetDateTime>,
        issued_before: Option<OffsetDateTime>,
    ) -> Result<Vec<DeviceId>, Error> {
        let mut out = Vec::new();
        for kv in self.scan(Space::Devices, b"") {
            let (_, v) = kv?;
            let d: DeviceRecord = decode("device", &v)?;
            if manufacturer.is_some() && d.manufacturer.as_deref() != manufacturer {
                continue;
            }
            let mut in_window = issued_after.is_none() && issued_before.is_none();
            for key in &d.certificates {
                if in_window {
                    break;
                }
                if let Some(c) = self.certificate(key)? {
                    in_window = issued_after.is_none_or(|t| c.not_before >= t)
                        && issued_before.is_none_or(|t| c.not_before < t);
                }
            }
            if in_window {
                out.push(d.id);
                if out.len() > MAX_BULK {
                    break;
                }
            }
        }
        Ok(out)
    }

    pub fn suspend(&self, id: &DeviceId, actor: &str) -> Result<DeviceRecord, Error> {
        self.set_status(id, Action::Suspend, None, actor)
    }

    pub fn resume(&self, id: &DeviceId, actor: &str) -> Result<DeviceRecord, Error> {
        self.set_status(id, Action::Resume, None, actor)
    }

    /// Lets a device that registered itself just-in-time in.
    pub fn approve(&self, id: &DeviceId, actor: &str) -> Result<DeviceRecord, Error> {
        self.set_status(id, Action::Approve, None, actor)
    }

    /// Revokes a device and, with it, every certificate it holds. Final.
    pub fn revoke(
        &self,
        id: &DeviceId,
        reason: RevocationReason,
        actor: &str,
    ) -> Result<DeviceRecord, Error> {
        let revocation = Revocation {
            reason,
            at: now_seconds(),
        };
        let d = self.set_status(id, Action::Revoke, Some(revocation), actor)?;
        // Its waiting commands are never delivered. (Were this lost to a
        // crash, the sweep at the next start drops them.)
        self.sessions.purge(std::slice::from_ref(id))?;
        Ok(d)
    }

    /// Records `root` (the hex SHA-256 of the CA root) as this registry's,
    /// if none is yet; returns the one recorded if it differs.
    pub fn claim_root(&self, root: &str) -> Result<Option<String>, Error> {
        self.transact(|tx| match tx.meta.get(b"ca-root")? {
            None => {
                tx.meta.insert(b"ca-root", root.as_bytes())?;
                Ok(None)
            }
            Some(v) if v == root.as_bytes() => Ok(None),
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
        })
    }

    /// Announces what another node committed (seen on a shared store's
    /// stream of changes): this node's follower applies it, and caches
    /// built before it are stale.
    pub fn announce_remote(&self, changes: Vec<Change>) {
        // A device revoked on another node: what waits for it here is
        // never delivered either (as on the node that revoked it).
        let revoked: Vec<DeviceId> = changes
            .iter()
            .flat_map(|c| match c {
                Change::DeviceOut {
                    id,
                    status: Status::Revoked,
                } => vec![id.clone()],
                Change::DevicesRevoked { ids } => ids.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        if !revoked.is_empty() {
            if let Err(e) = self.sessions.purge(&revoked) {
                tracing::error!(error = %e, "dropping the queues of devices revoked on another node");
            }
        }
        self.feed.announce(changes);
    }

    /// The revision of the last committed write (caches of answers built
    /// from the registry compare it).
    pub fn revision(&self) -> u64 {
        self.feed.revision()
    }

    /// Every committed write from now on, with what it changes for live
    /// connections. The broker's events follower is the one subscriber.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Committed> {
        self.feed.subscribe()
    }

    /// The durable side of devices' MQTT sessions, in the same database.
    pub fn sessions(&self) -> &crate::sessions::SessionStore {
        &self.sessions
    }

    /// Revokes one certificate; the device keeps its others.
    pub fn revoke_certificate(
        &self,
        key: &CertKey,
        reason: RevocationReason,
        actor: &str,
    ) -> Result<CertRecord, Error> {
        let at = now_seconds();
        let serial = &key.serial;
        let out = self.transact(|tx| {
            let mut c = tx.cert(key)?;
            if c.revocation.is_some() {
                return abort(Error::InvalidInput {
                    reason: format!("certificate {serial} is already revoked"),
                });
            }
            c.revocation = Some(Revocation { reason, at });
            tx.put_cert(&c)?;
            tx.audit(
                actor,
                "revoke-certificate",
                Some(&c.device_id),
                Some(serial),
                format!("reason {reason}"),
                at,
            )?;
            Ok(c)
        })?;
        self.feed
            .announce(vec![Change::CertificateRevoked { key: key.clone() }]);
        Ok(out)
    }

    /// This registry as this node last saw it ([`Store::get_recent`]):
    /// for admission, which decides many times a second and must not wait
    /// on a cluster for each. Writes through it fail.
    pub fn recent(&self) -> Registry {
        Registry {
            store: Arc::new(crate::store::Recent(self.store.clone())),
            sessions: self.sessions.clone(),
            feed: self.feed.clone(),
        }
    }

    pub fn device(&self, id: &DeviceId) -> Result<DeviceRecord, Error> {
        match self
            .store
            .get(Space::Devices, AsRef::<[u8]>::as_ref(&id.as_str()))?
        {
            Some(v) => decode("device", &v),
            None => Err(Error::NotFound { id: id.clone() }),
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

    /// The admission lookup: one read.
    pub fn certificate(&self, key: &CertKey) -> Result<Option<CertRecord>, Error> {
        self.store
            .get(Space::Certs, AsRef::<[u8]>::as_ref(&key.to_bytes()))?
            .map(|v| decode("certificate", &v))
            .transpose()
    }

    /// Every certificate with `serial`, whoever issued it (usually one).
    pub fn certificates_with_serial(&self, serial: &Serial) -> Result<Vec<CertRecord>, Error> {
        self.store
            .scan(Space::Certs, &CertKey::serial_prefix(serial), b"")
            .map(|kv| decode("certificate", &kv?.1))
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
    fn manufacturer_revocation(&self, c: &CertRecord) -> Result<Option<Revocation>, Error> {
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
        let mut counts = BTreeMap::new();
        for kv in self.scan(Space::Devices, b"") {
            let (_, v) = kv?;
            let d: DeviceRecord = decode("device", &v)?;
            if let Some(m) = d.manufacturer {
                *counts.entry(m).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// The newest `limit` audit entries about `device`, newest first (a
    /// scan of the whole log: the log has no index by device).
    pub fn audit_of(&self, device: &DeviceId, limit: usize) -> Result<Vec<AuditEntry>, Error> {
        let mut found = std::collections::VecDeque::new();
        for kv in self.scan(Space::Audit, b"") {
            let (_, v) = kv?;
            let e: AuditEntry = decode("audit entry", &v)?;
            if e.device.as_ref() == Some(device) {
                if found.len() == limit {
                    found.pop_front();
                }
                found.push_back(e);
            }
        }
        Ok(found.into_iter().rev().collect())
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
        for kv in self.scan(Space::Certs, b"") {
            let (_, v) = kv?;
            let c: CertRecord = decode("certificate", &v)?;
            if c.issuer != issuer || c.manufacturer.as_deref() != manufacturer || c.not_after < now
            {
                continue;
            }
            // A revoked manufacturer lists its devices' certificates too.
            let revocation = match c.revocation {
                Some(r) => Some(r),
                None => self.manufacturer_revocation(&c)?,
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
            if let Some((at, reason)) = listed {
                out.push(Listed {
                    serial: c.serial,
                    at,
                    reason,
                });
            }
        }
        Ok(out)
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
            match decode::<CertRecord>("certificate", &v) {
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

    pub fn device_count(&self) -> usize {
        self.store.len(Space::Devices).unwrap_or(0)
    }

    /// Flushes everything written so far (for shutdown).
    pub fn flush(&self) -> Result<(), Error> {
        self.store.flush()?;
        Ok(())
    }
}

/// Now, to the second: revocation times travel in OCSP and CRLs as
/// GeneralizedTime without fractions.
/// What committed writes seen as key changes (a shared store's watch,
/// another node's writes) mean for this node's live connections: a device
/// revoked or suspended, a certificate revoked, manufacturers changed (and
/// one revoked). Records that do not parse are skipped: the writer checked
/// them.
pub fn changes_from(events: &[crate::store::Write]) -> Vec<Change> {
    let mut out = Vec::new();
    let mut manufacturers = false;
    for e in events {
        match (e.space, &e.value) {
            (Space::Devices, Some(v)) => {
                if let Ok(d) = decode::<DeviceRecord>("device", v) {
                    if matches!(d.status, Status::Revoked | Status::Suspended) {
                        out.push(Change::DeviceOut {
                            id: d.id,
                            status: d.status,
                        });
                    }
                }
            }
            (Space::Certs, Some(v)) => {
                if let Ok(c) = decode::<CertRecord>("certificate", v) {
                    if c.revocation.is_some() {
                        out.push(Change::CertificateRevoked { key: c.key() });
                    }
                }
            }
            (Space::Manufacturers, v) => {
                manufacturers = true;
                if let Some(Ok(m)) = v
                    .as_ref()
                    .map(|v| decode::<ManufacturerRecord>("manufacturer", v))
                {
                    if m.status == ManufacturerStatus::Revoked {
                        out.push(Change::ManufacturerRevoked {
                            name: m.name.to_string(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    if manufacturers {
        out.push(Change::Manufacturers);
    }
    out
}

/// The OCSP responder's statuses, read from this registry.
impl crate::ocsp::StandingLookup for Registry {
    fn lookup(&self, key: &CertKey) -> Result<Option<crate::ocsp::Looked>, Error> {
        let Some((rec, standing)) = self.standing(key)? else {
            return Ok(None);
        };
        let held_since = match standing {
            Standing::Suspended | Standing::Pending => self
                .device(&rec.device_id)
                .map(|d| d.updated_at)
                .unwrap_or(rec.not_before),
            _ => rec.not_before,
        };
        Ok(Some(crate::ocsp::Looked {
            standing,
            held_since,
        }))
    }
}

fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::{new_key_and_csr, KeyKind};
    use crate::{Authority, Identity, InitOptions, DEFAULT_CERT_LIFETIME};

    fn device(id: &str) -> Identity {
        Identity {
            role: Role::Device,
            id: DeviceId::try_new(id).unwrap(),
        }
    }

    // The device lifecycle through the registry and its store (the pure
    // transitions and standing are tested in `lifecycle`).

    #[test]
    fn check_finds_broken_indexes() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let id = DeviceId::try_new("dev-1").unwrap();
        let identity = crate::Identity {
            role: Role::Device,
            id: id.clone(),
        };
        let (new, cert) = auth
            .issue_new(&key, &identity, None, DEFAULT_CERT_LIFETIME)
            .unwrap();
        let r = &auth.registry;
        r.enroll(&new, &cert, "test").unwrap();
        r.suspend(&id, "test").unwrap();
        let clean = r.check().unwrap();
        assert!(clean.problems.is_empty(), "{:?}", clean.problems);
        assert_eq!((clean.devices, clean.certificates), (2, 2));

        // A lost status index entry, a dangling fingerprint, a stale mirror.
        let key = CertKey::new(None, &cert.issuer, cert.serial.clone());
        r.transact(|tx| {
            tx.by_status.remove(status_key(Status::Suspended, &id))?;
            tx.fingerprints.insert(b"feed", key.to_bytes())?;
            let mut c: CertRecord = decode("c", &tx.certs.get(key.to_bytes())?.unwrap())?;
            c.device_status = Status::Active;
            tx.certs.insert(key.to_bytes(), encode(&c))
        })
        .unwrap();
        let report = r.check().unwrap();
        let all = report.problems.join("\n");
        assert!(
            all.contains("status index has 1 entries for 2 devices"),
            "{all}"
        );
        assert!(all.contains("fingerprint index entry feed"), "{all}");
        assert!(
            all.contains("mirrors status active but device dev-1 is suspended"),
            "{all}"
        );
        assert_eq!(report.problems.len(), 3, "{all}");
    }

    #[test]
    fn key_changes_say_what_live_connections_must_do() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let id = DeviceId::try_new("dev-1").unwrap();
        let identity = crate::Identity {
            role: Role::Device,
            id: id.clone(),
        };
        let (new, cert) = auth
            .issue_new(&key, &identity, None, DEFAULT_CERT_LIFETIME)
            .unwrap();
        let r = &auth.registry;
        let d = r.enroll(&new, &cert, "test").unwrap();
        let record = |space, key: Vec<u8>| {
            let value = r.store.get(space, &key).unwrap();
            crate::store::Write { space, key, value }
        };
        // Enrolled: nothing for live connections.
        let enrolled = [
            record(Space::Devices, id.as_str().as_bytes().to_vec()),
            record(Space::Certs, cert.key().to_bytes()),
        ];
        assert!(changes_from(&enrolled).is_empty());
        r.suspend(&id, "test").unwrap();
        let suspended = [record(Space::Devices, id.as_str().as_bytes().to_vec())];
        assert!(matches!(
            changes_from(&suspended).as_slice(),
            [Change::DeviceOut { id: i, status: Status::Suspended }] if *i == d.id
        ));
        r.revoke_certificate(&cert.key(), RevocationReason::KeyCompromise, "test")
            .unwrap();
        let revoked = [record(Space::Certs, cert.key().to_bytes())];
        assert!(matches!(
            changes_from(&revoked).as_slice(),
            [Change::CertificateRevoked { key: k }] if *k == cert.key()
        ));
        // A manufacturer's key changed (even deleted): trust anchors reload.
        let gone = [crate::store::Write {
            space: Space::Manufacturers,
            key: b"acme".to_vec(),
            value: None,
        }];
        assert!(matches!(
            changes_from(&gone).as_slice(),
            [Change::Manufacturers]
        ));
    }

    #[test]
    fn a_version_1_registry_is_migrated_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("registry");
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut keys = Vec::new();
        for (id, m) in [("dev-1", None), ("dev-2", Some("acme"))] {
            let identity = crate::Identity {
                role: Role::Device,
                id: DeviceId::try_new(id).unwrap(),
            };
            let (new, cert) = auth
                .issue_new(&key, &identity, m, DEFAULT_CERT_LIFETIME)
                .unwrap();
            auth.registry.enroll(&new, &cert, "test").unwrap();
            keys.push(cert.key());
        }
        // Write it back as version 1 did: certificates by serial, devices
        // listing serials, no device_manufacturer mirror, no schema mark.
        let r = &auth.registry;
        let devices: Vec<_> = r.scan(Space::Devices, b"").map(Result::unwrap).collect();
        r.transact(|tx| {
            for k in &keys {
                let v = tx.certs.get(k.to_bytes())?.unwrap();
                tx.certs.remove(k.to_bytes())?;
                let mut c: serde_json::Value = serde_json::from_slice(&v).unwrap();
                c.as_object_mut().unwrap().remove("device_manufacturer");
                tx.certs.insert(k.serial.as_bytes(), encode(&c))?;
                let fp = c["fingerprint"].as_str().unwrap().to_owned();
                tx.fingerprints.insert(fp.as_bytes(), k.serial.as_bytes())?;
            }
            for (id, v) in &devices {
                let mut d: serde_json::Value = serde_json::from_slice(v).unwrap();
                for c in d["certificates"].as_array_mut().unwrap() {
                    let serial = c.as_str().unwrap().split(':').next().unwrap().to_owned();
                    *c = serde_json::Value::String(serial);
                }
                tx.devices.insert(id, encode(&d))?;
            }
            tx.meta.remove("schema")
        })
        .unwrap();
        drop(auth);

        let r = Registry::open(&path).unwrap();
        let report = r.check().unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        for k in &keys {
            assert_eq!(r.standing(k).unwrap().unwrap().1, Standing::Good);
        }
        let d2 = r.device(&DeviceId::try_new("dev-2").unwrap()).unwrap();
        assert_eq!(d2.certificates, vec![keys[1].clone()]);
        let c2 = r.certificate(&keys[1]).unwrap().unwrap();
        assert_eq!(c2.device_manufacturer.as_deref(), Some("acme"));
        // Opening again changes nothing.
        drop(r);
        let r = Registry::open(&path).unwrap();
        assert!(r.check().unwrap().problems.is_empty());
    }

    #[test]
    fn a_manufacturer_revocation_takes_certificates_fleetgate_signed_for_its_devices() {
        // A registered manufacturer's device, rotated: fleetgate's issuing CA
        // signs (it has no key of the manufacturer's), the device's
        // manufacturer still decides the certificate's standing.
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let (rec, _) = auth
            .create_manufacturer(
                &DeviceId::try_new("acme").unwrap(),
                crate::manufacturer::JitPolicy::AutoActivate,
                "test",
            )
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let identity = crate::Identity {
            role: Role::Device,
            id: DeviceId::try_new("dev-1").unwrap(),
        };
        let (new, first) = auth
            .issue_new(
                &key,
                &identity,
                Some(rec.name.as_str()),
                DEFAULT_CERT_LIFETIME,
            )
            .unwrap();
        auth.registry.enroll(&new, &first, "test").unwrap();
        let second = auth
            .ca
            .issue(&key, &identity, DEFAULT_CERT_LIFETIME)
            .unwrap();
        auth.registry
            .add_certificate(&identity.id, &second, "test")
            .unwrap();
        assert_eq!(first.manufacturer, None, "signed by fleetgate's own CA");
        for c in [&first, &second] {
            assert_eq!(
                auth.registry.standing(&c.key()).unwrap().unwrap().1,
                Standing::Good
            );
        }
        auth.registry
            .revoke_manufacturer("acme", RevocationReason::CaCompromise, "test")
            .unwrap();
        for c in [&first, &second] {
            assert!(matches!(
                auth.registry.standing(&c.key()).unwrap().unwrap().1,
                Standing::Revoked(_)
            ));
        }
        let view = auth.registry.device_view(&identity.id).unwrap();
        assert!(
            view.certificates.iter().all(|c| c.status == "revoked"),
            "{view:?}"
        );
        let listed = auth
            .registry
            .revoked_by_issuer(None, &auth.ca.issuing_name())
            .unwrap();
        assert_eq!(listed.len(), 2, "the issuing CA's CRL lists both");
    }

    #[test]
    fn bulk_revocation_is_one_transaction() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut ids = Vec::new();
        for i in 0..50 {
            let identity = crate::Identity {
                role: Role::Device,
                id: DeviceId::try_new(format!("d-{i}")).unwrap(),
            };
            let (new, cert) = auth
                .issue_new(&key, &identity, None, DEFAULT_CERT_LIFETIME)
                .unwrap();
            auth.registry.enroll(&new, &cert, "test").unwrap();
            ids.push(identity.id);
        }
        let r = &auth.registry;
        r.revoke(&ids[0], RevocationReason::KeyCompromise, "test")
            .unwrap();
        let mut asked = ids[..40].to_vec();
        asked.push(DeviceId::try_new("ghost").unwrap());
        asked.push(ids[1].clone());
        let out = r
            .revoke_many(&asked, RevocationReason::KeyCompromise, "test")
            .unwrap();
        assert_eq!(out.revoked.len(), 39);
        assert_eq!(out.already_revoked, vec![ids[0].clone()]);
        assert_eq!(out.not_found, vec![DeviceId::try_new("ghost").unwrap()]);
        for id in &ids[..40] {
            assert_eq!(r.device(id).unwrap().status, Status::Revoked);
        }
        assert_eq!(r.device(&ids[40]).unwrap().status, Status::Active);
        assert!(r.check().unwrap().problems.is_empty());
        let selected = r.select_devices(None, None, None).unwrap();
        assert_eq!(selected.len(), 51, "every device and the admin");
        let too_many: Vec<DeviceId> = (0..=MAX_BULK)
            .map(|i| DeviceId::try_new(format!("x-{i}")).unwrap())
            .collect();
        assert!(matches!(
            r.revoke_many(&too_many, RevocationReason::Unspecified, "test"),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn enroll_rotate_and_status_lookups() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let (_k, csr) = new_key_and_csr(KeyKind::Ed25519, "x").unwrap();
        let req = crate::EnrollRequest {
            id: DeviceId::try_new("dev-1").unwrap(),
            role: Role::Device,
            manufacturer: None,
            csr: csr.into_bytes(),
            lifetime: DEFAULT_CERT_LIFETIME,
        };
        let (d, c1) = auth.enroll(&req, "test").unwrap();
        assert_eq!(d.status, Status::Active);
        assert!(matches!(
            auth.enroll(&req, "test"),
            Err(Error::AlreadyExists { .. })
        ));

        let (_k, csr2) = new_key_and_csr(KeyKind::EcdsaP384, "x").unwrap();
        let (d, c2) = auth
            .rotate(&req.id, csr2.as_bytes(), DEFAULT_CERT_LIFETIME, "test")
            .unwrap();
        assert_eq!(d.certificates, vec![c1.key(), c2.key()]);
        let r = &auth.registry;
        assert_eq!(r.standing(&c1.key()).unwrap().unwrap().1, Standing::Good);
        assert_eq!(
            r.certificate_by_fingerprint(&c2.fingerprint)
                .unwrap()
                .unwrap()
                .serial,
            c2.serial
        );

        r.suspend(&req.id, "test").unwrap();
        assert_eq!(
            r.standing(&c2.key()).unwrap().unwrap().1,
            Standing::Suspended
        );
        assert!(matches!(
            r.suspend(&req.id, "test"),
            Err(Error::InvalidTransition { .. })
        ));
        r.resume(&req.id, "test").unwrap();
        assert_eq!(r.standing(&c2.key()).unwrap().unwrap().1, Standing::Good);

        // Revoking one certificate leaves the other good.
        r.revoke_certificate(&c1.key(), RevocationReason::Superseded, "test")
            .unwrap();
        assert!(matches!(
            r.standing(&c1.key()).unwrap().unwrap().1,
            Standing::Revoked(Revocation {
                reason: RevocationReason::Superseded,
                ..
            })
        ));
        assert_eq!(r.standing(&c2.key()).unwrap().unwrap().1, Standing::Good);

        r.revoke(&req.id, RevocationReason::KeyCompromise, "test")
            .unwrap();
        assert!(matches!(
            r.standing(&c2.key()).unwrap().unwrap().1,
            Standing::Revoked(Revocation {
                reason: RevocationReason::KeyCompromise,
                ..
            })
        ));
        // Final.
        for e in [
            r.revoke(&req.id, RevocationReason::KeyCompromise, "test"),
            r.resume(&req.id, "test"),
            r.suspend(&req.id, "test"),
        ] {
            assert!(matches!(e, Err(Error::InvalidTransition { .. })), "{e:?}");
        }
        let (_k, csr3) = new_key_and_csr(KeyKind::EcdsaP256, "x").unwrap();
        assert!(auth
            .rotate(&req.id, csr3.as_bytes(), DEFAULT_CERT_LIFETIME, "test")
            .is_err());

        // Listing by status, paged, and the audit trail.
        let revoked = r.list(Some(Status::Revoked), None, 10).unwrap();
        assert_eq!(revoked.items.len(), 1);
        assert!(r
            .list(Some(Status::Active), None, 10)
            .unwrap()
            .items
            .iter()
            .all(|d| d.id.as_str() != "dev-1"));
        let actions: Vec<String> = r
            .audit(None, 100)
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.device.as_ref() == Some(&req.id))
            .map(|e| e.action)
            .collect();
        assert_eq!(
            actions,
            [
                "enroll",
                "rotate",
                "suspend",
                "resume",
                "revoke-certificate",
                "revoke"
            ]
        );
    }

    #[test]
    fn paging_visits_every_device_once() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let entry = |name: &str| {
            auth.issue_new(&key, &device(name), None, DEFAULT_CERT_LIFETIME)
                .unwrap()
        };
        let batch: Vec<_> = (0..25).map(|i| entry(&format!("d{i:02}"))).collect();
        let results = auth.registry.enroll_batch(&batch, "test").unwrap();
        assert!(results.iter().all(Result::is_ok));
        // A duplicate in a batch fails alone.
        let batch = vec![entry("d03"), entry("d99")];
        let results = auth.registry.enroll_batch(&batch, "test").unwrap();
        assert!(matches!(results[0], Err(Error::AlreadyExists { .. })));
        assert!(results[1].is_ok());
        let d99 = DeviceId::try_new("d99").unwrap();
        auth.registry
            .revoke(&d99, RevocationReason::Unspecified, "test")
            .unwrap();
        for status in [None, Some(Status::Active)] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let page = auth.registry.list(status, after.as_deref(), 7).unwrap();
                seen.extend(page.items.iter().map(|d| d.id.to_string()));
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            // 25 active devices and the admin, and, unfiltered, the revoked d99.
            let want = if status.is_some() { 26 } else { 27 };
            assert_eq!(seen.len(), want, "{status:?}");
            let mut sorted = seen.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted, seen);
        }
    }
}
