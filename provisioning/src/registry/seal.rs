//! The audit log made tamper-evident: a hash chain over the entries in
//! sequence order, sealed by checkpoints signed with the issuing CA's key
//! (the way a Certificate Transparency log signs its tree heads).
//!
//! Entries are written as before, with no contention added to the write
//! path. A sealer (every node's, one at a time: a checkpoint commits only
//! over the head it read) takes the entries older than a settling time
//! (so none with a lower sequence number can still be committing), chains
//! them, `chain = SHA-256(chain || seq || SHA-256(entry as stored))`, and
//! commits, in one transaction, the chain value after each entry (a
//! segment), a checkpoint `{seq, count, prev, chain, at}` and its
//! signature, and the new head.
//!
//! [`Registry::verify_audit`] walks the whole log: each entry against the
//! chain recorded for it (naming the first one edited, inserted, deleted
//! or moved), the chain against each signed checkpoint, and the registry
//! against what the log says was done (a device revoked in the log must
//! be revoked in the registry). Entries after the last checkpoint are
//! counted as not yet sealed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{decode, encode, AuditEntry, Registry};
use crate::store::{Space, Txn};
use crate::{DeviceId, Error, Status};

const HEAD: &[u8] = b"audit-seal/head";
const CHECKPOINT: &str = "audit-seal/checkpoint/";
const SEGMENT: &str = "audit-seal/segment/";
/// What a checkpoint's signature covers starts with this.
const DOMAIN: &[u8] = b"fleetgate audit checkpoint v1\n";

/// A signed statement: the log held `count` entries through `seq`, and
/// its chain value there was `chain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub count: u64,
    /// The chain value at the checkpoint before (zeros for the first).
    pub prev: String,
    pub chain: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// Over [`Checkpoint::signed_bytes`], by the issuing CA's key (DER
    /// ECDSA), hex.
    pub signature: String,
}

impl Checkpoint {
    /// What the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut m = DOMAIN.to_vec();
        m.extend_from_slice(&self.seq.to_be_bytes());
        m.extend_from_slice(&self.count.to_be_bytes());
        m.extend_from_slice(self.prev.as_bytes());
        m.push(b'\n');
        m.extend_from_slice(self.chain.as_bytes());
        m.push(b'\n');
        m.extend_from_slice(&self.at.unix_timestamp().to_be_bytes());
        m
    }
}

/// Signs a checkpoint's bytes (the issuing CA's key).
pub type Sign<'a> = dyn Fn(&[u8]) -> Result<Vec<u8>, Error> + 'a;

/// The chain values after each entry of one sealing.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Segment {
    entries: Vec<(u64, String)>,
}

/// What [`Registry::verify_audit`] found.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Verification {
    pub entries: u64,
    /// Entries covered by the last checkpoint.
    pub sealed: u64,
    pub checkpoints: u64,
    /// The last checkpoint's sequence number.
    pub sealed_through: Option<u64>,
    /// Everything wrong, the earliest in the log first.
    pub problems: Vec<String>,
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The chain after `entry` (as stored) at `seq`.
fn link(chain: &[u8; 32], seq: u64, entry: &[u8]) -> [u8; 32] {
    sha256(&[chain, &seq.to_be_bytes(), &sha256(&[entry])])
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The sequence number the seal's head names.
fn head_seq(head: &[u8]) -> Result<u64, Error> {
    <[u8; 8]>::try_from(head)
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Corrupt("audit seal head".into()))
}

fn missing(seq: u64) -> Error {
    Error::Corrupt(format!("audit checkpoint {seq} is missing"))
}

fn key(prefix: &str, seq: u64) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl Registry {
    /// The last checkpoint, if any.
    pub fn audit_checkpoint(&self) -> Result<Option<Checkpoint>, Error> {
        let Some(head) = self.store.get(Space::Meta, HEAD)? else {
            return Ok(None);
        };
        let seq = head_seq(&head)?;
        match self.store.get(Space::Meta, &key(CHECKPOINT, seq))? {
            Some(v) => Ok(Some(decode("audit checkpoint", &v)?)),
            None => Err(missing(seq)),
        }
    }

    /// Seals up to `max` entries older than `settled` (the time before
    /// which nothing can still be committing) after the last checkpoint,
    /// with `sign` (the issuing CA's key). Returns the new checkpoint, or
    /// `None` if nothing was to seal or another node sealed meanwhile.
    pub fn seal_audit(
        &self,
        settled: OffsetDateTime,
        max: usize,
        now: OffsetDateTime,
        sign: &Sign<'_>,
    ) -> Result<Option<Checkpoint>, Error> {
        let txn = Txn::new(&*self.store);
        // The head and its checkpoint read once, in the transaction: the
        // commit holds only if no other node sealed meanwhile.
        let last = match txn.get(Space::Meta, HEAD)? {
            None => None,
            Some(head) => {
                let seq = head_seq(&head)?;
                match txn.get(Space::Meta, &key(CHECKPOINT, seq))? {
                    Some(v) => Some(decode::<Checkpoint>("audit checkpoint", &v)?),
                    None => return Err(missing(seq)),
                }
            }
        };
        let (from, mut chain, count) = match &last {
            Some(c) => (
                c.seq + 1,
                unhex(&c.chain).ok_or_else(|| Error::Corrupt("audit checkpoint chain".into()))?,
                c.count,
            ),
            None => (0, [0u8; 32], 0),
        };
        let prev = chain;
        let mut segment = Segment::default();
        let mut through = None;
        for kv in self.scan(Space::Audit, &from.to_be_bytes()) {
            let (k, v) = kv?;
            let e: AuditEntry = decode("audit entry", &v)?;
            if e.at > settled || segment.entries.len() >= max {
                break;
            }
            let seq = u64::from_be_bytes(
                k.as_slice()
                    .try_into()
                    .map_err(|_| Error::Corrupt("audit key".into()))?,
            );
            chain = link(&chain, seq, &v);
            segment.entries.push((seq, crate::id::hex(&chain)));
            through = Some(seq);
        }
        let Some(seq) = through else {
            return Ok(None);
        };
        let mut c = Checkpoint {
            seq,
            count: count + segment.entries.len() as u64,
            prev: crate::id::hex(&prev),
            chain: crate::id::hex(&chain),
            at: now,
            signature: String::new(),
        };
        c.signature = crate::id::hex(&sign(&c.signed_bytes())?);
        txn.insert(Space::Meta, &key(SEGMENT, seq), &encode(&segment));
        txn.insert(Space::Meta, &key(CHECKPOINT, seq), &encode(&c));
        txn.insert(Space::Meta, HEAD, &seq.to_be_bytes());
        Ok(txn.commit(true)?.then_some(c))
    }

    /// Walks the whole audit log against its chain and checkpoints (each
    /// signature checked by `verify`), and the registry against the log.
    pub fn verify_audit(
        &self,
        verify: &dyn Fn(&[u8], &[u8]) -> bool,
    ) -> Result<Verification, Error> {
        let mut out = Verification::default();
        // Problems by the sequence number they concern, for the order.
        let mut problems: BTreeMap<(u64, usize), String> = BTreeMap::new();
        let mut note = |seq: u64, what: String| {
            let n = problems.len();
            problems.insert((seq, n), what);
        };
        // The head first: a seal that commits while this walks adds a
        // checkpoint after it, never removes one.
        let head = self.store.get(Space::Meta, HEAD)?;
        let mut recorded: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
        let mut checkpoints: BTreeMap<u64, Checkpoint> = BTreeMap::new();
        for kv in self.store.scan(Space::Meta, b"audit-seal/", b"") {
            let (k, v) = kv?;
            if k.starts_with(SEGMENT.as_bytes()) {
                let s: Segment = decode("audit segment", &v)?;
                for (seq, h) in s.entries {
                    match unhex(&h) {
                        Some(h) => {
                            recorded.insert(seq, h);
                        }
                        None => note(
                            seq,
                            format!("the chain recorded for entry {seq} is not a hash"),
                        ),
                    }
                }
            } else if k.starts_with(CHECKPOINT.as_bytes()) {
                let c: Checkpoint = decode("audit checkpoint", &v)?;
                checkpoints.insert(c.seq, c);
            }
        }
        // The checkpoints: each signed, each following the one before.
        let mut prev = crate::id::hex(&[0u8; 32]);
        for c in checkpoints.values() {
            let sig_ok =
                crate::id::unhex(&c.signature).is_some_and(|sig| verify(&c.signed_bytes(), &sig));
            if !sig_ok {
                note(
                    c.seq,
                    format!(
                        "checkpoint {}: the signature does not verify with the issuing CA's key",
                        c.seq
                    ),
                );
            }
            if c.prev != prev {
                note(c.seq, format!("checkpoint {}: it does not follow the checkpoint before it (one was removed or replaced)", c.seq));
            }
            prev.clone_from(&c.chain);
        }
        let last = checkpoints.values().next_back().cloned();
        out.checkpoints = checkpoints.len() as u64;
        out.sealed_through = last.as_ref().map(|c| c.seq);
        if let Some(head) = head {
            match head_seq(&head) {
                Ok(seq) if checkpoints.contains_key(&seq) => {}
                Ok(seq) => note(
                    seq,
                    format!("the seal's head names checkpoint {seq}, which is missing"),
                ),
                Err(_) => note(0, "the seal's head is not a sequence number".into()),
            }
        }
        // The entries, in sequence order, against the chain.
        let mut chain = [0u8; 32];
        let mut seen = std::collections::BTreeSet::new();
        let mut revoked_devices = BTreeMap::new();
        for kv in self.scan(Space::Audit, b"") {
            let (k, v) = kv?;
            out.entries += 1;
            let Ok(seq) = <[u8; 8]>::try_from(k.as_slice()).map(u64::from_be_bytes) else {
                note(
                    u64::MAX,
                    format!("an audit key that is no sequence number: {k:?}"),
                );
                continue;
            };
            seen.insert(seq);
            match decode::<AuditEntry>("audit entry", &v) {
                Ok(e) => {
                    if e.seq != seq {
                        note(
                            seq,
                            format!("entry {seq}: it says it is entry {} (moved)", e.seq),
                        );
                    }
                    if e.action == "revoke" {
                        if let Some(d) = e.device {
                            revoked_devices.insert(d, seq);
                        }
                    }
                }
                Err(err) => note(seq, format!("entry {seq}: {err}")),
            }
            let sealed = last.as_ref().is_some_and(|c| seq <= c.seq);
            if !sealed {
                continue;
            }
            out.sealed += 1;
            chain = link(&chain, seq, &v);
            match recorded.get(&seq) {
                None => note(seq, format!("entry {seq}: inserted into the sealed log")),
                Some(h) if *h != chain => {
                    note(
                        seq,
                        format!("entry {seq}: edited, or an entry before it removed or moved"),
                    );
                    // Go on from what was sealed, to find the next.
                    chain = *h;
                }
                Some(_) => {}
            }
            if let Some(c) = checkpoints.get(&seq) {
                if unhex(&c.chain) != Some(chain) {
                    note(
                        seq,
                        format!("checkpoint {seq}: the log does not hash to it"),
                    );
                }
            }
        }
        for seq in recorded.keys().filter(|s| !seen.contains(s)) {
            note(*seq, format!("entry {seq}: deleted from the sealed log"));
        }
        if let Some(c) = &last {
            if out.sealed != c.count {
                note(
                    c.seq,
                    format!(
                        "the last checkpoint seals {} entries, the log holds {} through it",
                        c.count, out.sealed
                    ),
                );
            }
        }
        // The registry against the log: a revocation is final. Read as
        // the store has it (a scan), not through a node's view, which
        // keeps what it knew when the store goes back on a revocation.
        let ids: Vec<&DeviceId> = revoked_devices.keys().collect();
        let one_pass = self.store.may_block() && ids.len() > ONE_PASS;
        let records = self.stored_devices(&ids, one_pass)?;
        for ((id, seq), stored) in revoked_devices.iter().zip(records) {
            let seq = *seq;
            match stored
                .map(|v| decode::<super::DeviceRecord>("device", &v))
                .transpose()?
            {
                Some(d) if d.status == Status::Revoked => {}
                Some(d) => note(
                    seq,
                    format!(
                        "device {id} is {} in the registry, but entry {seq} revoked it",
                        d.status
                    ),
                ),
                None => note(
                    seq,
                    format!("device {id} is gone from the registry, but entry {seq} revoked it"),
                ),
            }
        }
        out.problems = problems.into_values().collect();
        Ok(out)
    }

    /// The records of `ids` (in order) as the store has them (a scan, not
    /// a node's view): a request each, or (`one_pass`: many, from a store
    /// across the network) one ordered pass over the devices from the
    /// first.
    fn stored_devices(
        &self,
        ids: &[&DeviceId],
        one_pass: bool,
    ) -> Result<Vec<Option<Vec<u8>>>, Error> {
        let Some(first) = ids.first() else {
            return Ok(Vec::new());
        };
        if one_pass {
            let mut out = vec![None; ids.len()];
            let mut i = 0;
            for kv in self
                .store
                .scan(Space::Devices, b"", first.as_str().as_bytes())
            {
                let (k, v) = kv?;
                while i < ids.len() && ids[i].as_str().as_bytes() < k.as_slice() {
                    i += 1;
                }
                match ids.get(i) {
                    None => break,
                    Some(id) if id.as_str().as_bytes() == k.as_slice() => {
                        out[i] = Some(v);
                        i += 1;
                    }
                    Some(_) => {}
                }
            }
            return Ok(out);
        }
        ids.iter()
            .map(|id| {
                self.store
                    .scan(Space::Devices, id.as_str().as_bytes(), b"")
                    .find_map(|kv| match kv {
                        Ok((k, v)) if k == id.as_str().as_bytes() => Some(Ok(v)),
                        Ok(_) => None,
                        Err(e) => Some(Err(e)),
                    })
                    .transpose()
            })
            .collect()
    }
}

/// Revoked devices `audit verify` reads in one pass over the devices
/// rather than one request each, from a store across the network.
const ONE_PASS: usize = 1_000;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeviceId, RevocationReason, Role};

    fn later() -> time::Duration {
        // Sealing settles what is older than now plus an hour: all of it.
        -time::Duration::hours(1)
    }

    /// An authority with `n` devices enrolled and the first revoked.
    fn filled(n: usize) -> (tempfile::TempDir, crate::Authority) {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let auth = crate::Authority::open_or_init(tmp.path(), &crate::InitOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        for i in 0..n {
            let id = DeviceId::try_new(format!("d-{i}")).unwrap_or_else(|e| panic!("{e}"));
            let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
            let who = crate::Identity {
                role: Role::Device,
                id,
            };
            let (new, cert) = auth
                .issue_new(&key, &who, None, crate::DEFAULT_CERT_LIFETIME)
                .unwrap_or_else(|e| panic!("{e}"));
            auth.registry
                .enroll(&new, &cert, "test")
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let first = DeviceId::try_new("d-0").unwrap_or_else(|e| panic!("{e}"));
        auth.registry
            .revoke(&first, RevocationReason::KeyCompromise, "test")
            .unwrap_or_else(|e| panic!("{e}"));
        (tmp, auth)
    }

    fn entries(r: &Registry) -> Vec<(Vec<u8>, Vec<u8>)> {
        r.scan(Space::Audit, b"")
            .map(|kv| kv.unwrap_or_else(|e| panic!("{e}")))
            .collect()
    }

    fn put(r: &Registry, space: Space, k: &[u8], v: Option<&[u8]>) {
        let txn = Txn::new(&*r.store);
        match v {
            Some(v) => txn.insert(space, k, v),
            None => txn.remove(space, k),
        }
        assert!(txn.commit(true).unwrap_or_else(|e| panic!("{e}")));
    }

    #[test]
    fn one_pass_over_the_devices_reads_what_a_request_each_reads() {
        let (_tmp, auth) = filled(6);
        let r = &auth.registry;
        // d-2 gone; ids missing before, between and after the others.
        put(r, Space::Devices, b"d-2", None);
        let ids: Vec<DeviceId> = ["d-", "d-0", "d-2", "d-3", "d-33", "d-5", "e"]
            .iter()
            .map(|s| DeviceId::try_new(*s).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let refs: Vec<&DeviceId> = ids.iter().collect();
        let each = r
            .stored_devices(&refs, false)
            .unwrap_or_else(|e| panic!("{e}"));
        let pass = r
            .stored_devices(&refs, true)
            .unwrap_or_else(|e| panic!("{e}"));
        let found: Vec<bool> = pass.iter().map(Option::is_some).collect();
        assert_eq!(found, [false, true, false, true, false, true, false]);
        assert_eq!(each, pass);
    }

    #[test]
    fn a_sealed_log_verifies_and_every_kind_of_tampering_is_named() {
        let (_d, auth) = filled(5);
        let r = &auth.registry;
        // A gap in the sequence, as a transaction given up leaves one.
        let gap = entries(r)[1].clone();
        put(r, Space::Audit, &gap.0, None);
        let c = auth
            .seal_audit(later(), 3)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.map(|c| c.count), Some(3));
        let c = auth
            .seal_audit(later(), 100)
            .unwrap_or_else(|e| panic!("{e}"));
        let c = c.unwrap_or_else(|| panic!("a second seal"));
        assert_eq!(c.count as usize, entries(r).len());
        assert!(auth
            .seal_audit(later(), 100)
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none());
        let verify = || auth.verify_audit().unwrap_or_else(|e| panic!("{e}"));
        let v = verify();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!((v.sealed, v.checkpoints), (c.count, 2));

        let all = entries(r);
        let seq = |i: usize| u64::from_be_bytes(all[i].0.as_slice().try_into().unwrap_or_default());
        // Edited.
        let mut edited: AuditEntry = decode("", &all[2].1).unwrap_or_else(|e| panic!("{e}"));
        edited.actor = "someone else".into();
        put(r, Space::Audit, &all[2].0, Some(&encode(&edited)));
        let v = verify();
        assert!(
            v.problems[0].starts_with(&format!("entry {}: edited", seq(2))),
            "{:?}",
            v.problems
        );
        put(r, Space::Audit, &all[2].0, Some(&all[2].1));
        // Deleted.
        put(r, Space::Audit, &all[1].0, None);
        let v = verify();
        assert!(
            v.problems
                .iter()
                .any(|p| p == &format!("entry {}: deleted from the sealed log", seq(1))),
            "{:?}",
            v.problems
        );
        put(r, Space::Audit, &all[1].0, Some(&all[1].1));
        // Inserted before the last checkpoint (under a sequence number
        // the log skipped, or one before its first).
        put(r, Space::Audit, &gap.0, Some(&gap.1));
        let free = u64::from_be_bytes(gap.0.as_slice().try_into().unwrap_or_default());
        let v = verify();
        assert!(
            v.problems
                .iter()
                .any(|p| p == &format!("entry {free}: inserted into the sealed log")),
            "{:?}",
            v.problems
        );
        put(r, Space::Audit, &gap.0, None);
        // Reordered: two entries' contents swapped.
        put(r, Space::Audit, &all[3].0, Some(&all[4].1));
        put(r, Space::Audit, &all[4].0, Some(&all[3].1));
        let v = verify();
        assert!(
            v.problems[0].starts_with(&format!("entry {}", seq(3))),
            "{:?}",
            v.problems
        );
        assert!(
            v.problems.iter().any(|p| p.contains("moved")),
            "{:?}",
            v.problems
        );
        put(r, Space::Audit, &all[3].0, Some(&all[3].1));
        put(r, Space::Audit, &all[4].0, Some(&all[4].1));
        assert!(verify().problems.is_empty());
        // A checkpoint whose signature is not the issuing CA's.
        let mut forged = auth
            .registry
            .audit_checkpoint()
            .unwrap_or_default()
            .unwrap_or_else(|| panic!("a checkpoint"));
        let good = encode(&forged);
        forged.count += 1;
        put(
            r,
            Space::Meta,
            &key(CHECKPOINT, forged.seq),
            Some(&encode(&forged)),
        );
        let v = verify();
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("signature does not verify")),
            "{:?}",
            v.problems
        );
        put(r, Space::Meta, &key(CHECKPOINT, forged.seq), Some(&good));
        // The last checkpoint removed: the head names it.
        put(r, Space::Meta, &key(CHECKPOINT, forged.seq), None);
        let v = verify();
        assert!(
            v.problems.iter().any(|p| p.ends_with("which is missing")),
            "{:?}",
            v.problems
        );
        put(r, Space::Meta, &key(CHECKPOINT, forged.seq), Some(&good));
        assert!(verify().problems.is_empty());
        // The registry against the log: d-0 un-revoked behind its back.
        let id = DeviceId::try_new("d-0").unwrap_or_else(|e| panic!("{e}"));
        let mut d = r.device(&id).unwrap_or_else(|e| panic!("{e}"));
        d.status = Status::Active;
        d.revocation = None;
        put(r, Space::Devices, b"d-0", Some(&encode(&d)));
        let v = verify();
        assert!(
            v.problems
                .iter()
                .any(|p| p.starts_with("device d-0 is active in the registry")),
            "{:?}",
            v.problems
        );
    }
}
