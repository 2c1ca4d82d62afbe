//! The device registry: devices, their certificates and the audit log,
//! over a [`Store`] (sled by default, [`crate::store`]).
//!
//! Key spaces ([`Space`]; keys are bytes, values JSON but where `packed`
//! says otherwise):
//! - `devices`: device id -> [`DeviceRecord`]
//! - `certs`: [`CertKey`] (serial within its issuer) -> [`CertRecord`],
//!   which mirrors its device's status and manufacturer so that the
//!   admission check at connect time is one read (and one more for a
//!   manufacturer's standing)
//! - `fingerprints`: SHA-256 of the DER -> [`CertKey`]
//! - `by_status`: `<status>/<id>` -> empty, for paged listing by status
//! - `audit`: big-endian sequence number -> [`AuditEntry`]
//! - `audit_by_device`: `<device id>\0<sequence number>` -> empty, a
//!   device's audit trail without a scan of the log (since schema 3)
//! - `listed`: [`CertKey`] -> what a CRL says of it (packed; empty before
//!   schema 6), the certificates CRLs list (revoked, or their device not
//!   active), so a CRL reads them, not every certificate (since schema 4)
//! - `manufacturers`: name -> [`ManufacturerRecord`]
//! - `claims`: claim id -> [`ClaimRecord`] (uses left)
//! - `challenges`: manufacturer name -> proof-of-possession challenge
//! - `console`: the console's login links and sessions (`console.rs`)
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
pub use crate::ca::Listed;
use crate::events::{Change, Committed, Feed};
use crate::lifecycle::{self, Action, StandingFacts};
pub use crate::lifecycle::{Revocation, RevocationReason, Standing, Status};
use crate::store::{SledStore, Space, Store, Txn};
use crate::{CertKey, DeviceId, Error, Role, Serial};
use records::{CaKind, Challenge, ClaimRecord, ManufacturerRecord, ManufacturerStatus};

mod blobs;
mod check;
mod console;
mod count;
mod manufacturers;
mod migrate;
mod packed;
mod reads;
pub mod records;
mod seal;
mod seen;
mod sorted;
pub use packed::decode_cert;
use packed::{encode_cert, Listing};
pub use seal::{Checkpoint, Verification};
pub use sorted::{natural_key, Expiring};

/// The registry's layout version, in `meta`; older layouts are migrated
/// when opened. 2: certificates keyed by [`CertKey`] instead of serial.
/// 3: the audit log indexed by device (`audit_by_device`); 4: the
/// certificates CRLs list (`listed`); 5: the `sorted` and `expiring`
/// indexes; 6: certificate records packed, `listed` entries carrying what
/// a CRL says (`packed`).
const SCHEMA: u64 = 6;

/// Whether CRLs list a certificate whatever its manufacturers' standing:
/// revoked itself, or its device revoked, suspended or pending.
fn listed(c: &CertRecord) -> bool {
    c.revocation.is_some() || c.device_status != Status::Active
}

/// Where a device's audit entries are listed: `<id>\0`, then each number.
fn audit_index_prefix(d: &DeviceId) -> Vec<u8> {
    let mut k = d.as_str().as_bytes().to_vec();
    k.push(0);
    k
}

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
    /// How many devices there are, as last counted.
    count: Arc<count::DeviceCount>,
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

/// Threads a batch enrollment runs its transactions on, on a shared store.
const BATCH_WORKERS: usize = 8;

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
            return abort(Error::AlreadyExists {
                id: new.id.to_string(),
            });
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
            None => abort(Error::NotFound { id: id.to_string() }),
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
        self.sort_device(old, d);
        Ok(())
    }

    fn cert(&self, key: &CertKey) -> TxResult<CertRecord> {
        match self.certs.get(key.to_bytes()).map_err(storage)? {
            Some(v) => decode_cert(&v).or_else(abort),
            None => abort(Error::CertNotFound {
                serial: key.to_string(),
            }),
        }
    }

    /// Writes `c`, whose device is `device` (as this transaction writes
    /// it; `None` only where `c` is revoked itself).
    fn put_cert(&self, c: &CertRecord, device: Option<&DeviceRecord>) -> TxResult<()> {
        let key = c.key().to_bytes();
        self.certs.insert(&key, encode_cert(c)).map_err(storage)?;
        // What CRLs list, kept beside with what they say of it: a CRL
        // reads these, not every certificate and device.
        if listed(c) {
            let entry = Listing::of(c, device).map(Listing::encode);
            self.txn
                .insert(Space::Listed, &key, entry.as_deref().unwrap_or_default());
        } else {
            self.txn.remove(Space::Listed, &key);
        }
        Ok(())
    }

    /// Mirrors the device's status into each of its certificates.
    fn mirror_status(&self, d: &DeviceRecord) -> TxResult<()> {
        for key in &d.certificates {
            let mut c = self.cert(key)?;
            c.device_status = d.status;
            self.put_cert(&c, Some(d))?;
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
        self.put_cert(&rec, Some(d))?;
        self.index_expiry(&rec);
        self.txn.insert(Space::CertDer, &key.to_bytes(), &cert.der);
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
        // One global order, whoever writes: the number is taken as the
        // commit lands, in the same round trip.
        let entry = AuditEntry {
            seq: 0,
            at,
            actor: actor.to_owned(),
            action: action.to_owned(),
            device: device.cloned(),
            serial: serial.cloned(),
            detail,
        };
        let index = device.map(|d| (Space::AuditByDevice, audit_index_prefix(d)));
        self.txn.append(
            Space::Audit,
            AUDIT_COUNTER,
            move |seq| {
                encode(&AuditEntry {
                    seq,
                    ..entry.clone()
                })
            },
            index,
        );
        Ok(())
    }
}

/// The counter that numbers the audit log's entries.
const AUDIT_COUNTER: &str = "audit";

impl Registry {
    /// Opens (or creates) the embedded registry at `path`: sled, with the
    /// devices' MQTT sessions beside it.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Self::open_with(path, None)
    }

    /// [`Registry::open`], with sled's page cache bounded to `cache_bytes`
    /// (its default, 1 GiB, if `None`).
    pub fn open_with(path: &Path, cache_bytes: Option<u64>) -> Result<Self, Error> {
        let store = SledStore::open_with(path, cache_bytes)?;
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
            count: Default::default(),
        }
        .migrated()
    }

    fn scan<'a>(&'a self, space: Space, start: &[u8]) -> crate::store::Entries<'a> {
        self.store.scan(space, b"", start)
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
    ///
    /// On a shared store the first run reads this node's view of it, and
    /// takes a key the view does not hold for absent (no round trip per
    /// read, [`Store::get_optimistic`]): the commit compares every value
    /// read, so a stale one or a wrong guess costs a run more, never a
    /// wrong write. What would be answered without a commit (a refusal, or
    /// nothing written) is read again from the store before it is
    /// answered.
    fn run<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>, durable: bool) -> Result<T, Error> {
        for attempt in 0..ATTEMPTS {
            let optimistic = attempt == 0 && self.store.may_block();
            let txn = if optimistic {
                Txn::optimistic(&*self.store)
            } else {
                Txn::new(&*self.store)
            };
            let out = match f(&Tx::over(&txn)) {
                Ok(out) => out,
                Err(_) if optimistic => continue,
                Err(e) => return Err(e),
            };
            if optimistic && !txn.writes_anything() {
                continue;
            }
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
        let out = if self.store.may_block() {
            // A shared store: a round trip per transaction, so several at
            // once, which the store sends together (etcd's group commit).
            // Each worker takes the next entry and keeps what it did with
            // its place, put back in order after.
            let next = std::sync::atomic::AtomicUsize::new(0);
            let mut done: Vec<(usize, Result<DeviceRecord, Error>)> = std::thread::scope(|s| {
                let workers: Vec<_> = (0..BATCH_WORKERS.min(batch.len()))
                    .map(|_| {
                        s.spawn(|| {
                            let mut mine = Vec::new();
                            loop {
                                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let Some((new, cert)) = batch.get(i) else {
                                    return mine;
                                };
                                mine.push((i, self.enroll_unflushed(new, cert, actor)));
                            }
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                    .collect()
            });
            done.sort_by_key(|(i, _)| *i);
            done.into_iter().map(|(_, r)| r).collect()
        } else {
            batch
                .iter()
                .map(|(new, cert)| self.enroll_unflushed(new, cert, actor))
                .collect()
        };
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
                    id: id.to_string(),
                    status: d.status.as_str(),
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
        // A device with one certificate takes nine writes: its record, the
        // status and sorted indexes' old and new entries, the certificate
        // and its CRL entry, the audit entry and its index.
        let per = (self.store.max_writes() / 12).max(1);
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
            tx.put_cert(&c, None)?;
            tx.index_expiry(&c);
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
            count: self.count.clone(),
        }
    }

    /// Whether a read may wait on the network (the store is shared): an
    /// async caller then reads from the blocking pool.
    pub fn may_block(&self) -> bool {
        self.store.may_block()
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
                if let Ok(c) = decode_cert(v) {
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

/// The registry answers for fleetgate's own certificates.
impl crate::ocsp::StandingLookup for Registry {
    fn lookup(&self, key: &crate::CertKey) -> Result<Option<crate::ocsp::Looked>, Error> {
        let Some((rec, standing)) = self.standing(key)? else {
            return Ok(None);
        };
        let held_since = match standing {
            crate::lifecycle::Standing::Suspended | crate::lifecycle::Standing::Pending => self
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
mod tests;
