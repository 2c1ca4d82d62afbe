//! CA rollover: a new issuing CA while the old ones keep validating.
//!
//! Issuing CAs are generations in the data dir: `ca/issuing.crt` (and its
//! key) is the first, `ca/issuing-<n>.crt` the n-th. The newest signs
//! every new enrollment and rotation; the earlier ones stay until what
//! they signed runs out: their certificates are trust anchors for
//! devices and admins, OCSP answers for them (signed by their own keys),
//! and each has its CRL (`/crl/issuing.crl`, `/crl/issuing-<n>.crl`,
//! which is what their certificates name). Devices learn nothing new but
//! the chain in their next certificate.
//!
//! The new CA is signed by the root at a ceremony (`fleetgate ca rollover
//! --root-dir`): the node makes the key (in its token, if its keys are in
//! one) and a request; the root signs it where the root is; the node
//! checks and installs it, at once, with no restart.

use std::path::PathBuf;
use std::sync::Arc;

use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{self, load_signer, Paths, Signer, ISSUING_CRL_NAME};
use crate::files::write_file;
use crate::keys::{self, Pin};
use crate::{Authority, Error};

/// The common name of generation `n`.
pub fn issuing_cn(n: u32) -> String {
    format!("fleetgate issuing CA {n}")
}

/// The CRL name (and file stem) of generation `n`.
pub fn crl_name(n: u32) -> String {
    if n == 1 {
        ISSUING_CRL_NAME.to_owned()
    } else {
        format!("{ISSUING_CRL_NAME}-{n}")
    }
}

impl Paths {
    /// Generation `n`'s certificate.
    pub fn issuing_cert_of(&self, n: u32) -> PathBuf {
        self.dir.join(format!("ca/{}.crt", crl_name(n)))
    }
    /// Generation `n`'s key (or its `.uri`).
    pub fn issuing_key_of(&self, n: u32) -> PathBuf {
        self.dir.join(format!("ca/{}.key", crl_name(n)))
    }
    /// Where the next generation's key waits for the root's signature.
    pub fn pending_issuing_key(&self) -> PathBuf {
        self.dir.join("ca/pending/issuing.key")
    }
}

/// Every issuing CA generation in the data dir, newest first. A
/// generation's certificate is written after its key: one without a
/// certificate is not there yet.
pub(crate) fn load_generations(
    paths: &Paths,
    pin: Option<&Pin>,
) -> Result<Vec<Arc<Signer>>, Error> {
    let mut all = Vec::new();
    let mut n = 1;
    while paths.issuing_cert_of(n).exists() {
        all.push(Arc::new(load_signer(
            &paths.issuing_cert_of(n),
            &paths.issuing_key_of(n),
            &crl_name(n),
            None,
            pin,
        )?));
        n += 1;
    }
    if all.is_empty() {
        return Err(Error::DataDir {
            path: paths.issuing_cert(),
            reason: "no issuing CA".into(),
        });
    }
    all.reverse();
    Ok(all)
}

/// What a node prepared for the root to sign: a new issuing CA.
#[derive(Clone, Debug)]
pub struct RolloverRequest {
    pub generation: u32,
    pub csr_pem: String,
}

impl Authority {
    /// The generation after the newest.
    fn next_generation(&self) -> u32 {
        self.ca.issuing_all().len() as u32 + 1
    }

    /// The first half of a rollover: a key for the next issuing CA, made
    /// where this node makes keys (kept as pending, reused if asked
    /// again), and a request for the root to sign.
    pub fn prepare_rollover(&self) -> Result<RolloverRequest, Error> {
        let generation = self.next_generation();
        let csr_pem = keys::pending_request(
            &self.paths.pending_issuing_key(),
            &format!("issuing-ca-{generation}"),
            issuing_cn(generation),
            &self.custody(),
            self.pin.as_ref(),
        )?;
        Ok(RolloverRequest {
            generation,
            csr_pem,
        })
    }

    /// The second half: installs `cert` (PEM or DER), the root's signature
    /// on the prepared key, as the newest generation, and uses it at once.
    /// Returns the new generation's number.
    pub fn install_rollover(&self, cert: &[u8]) -> Result<u32, Error> {
        let bad = |why: String| Error::InvalidInput {
            reason: format!("new issuing CA: {why}"),
        };
        let der = crate::manufacturer::one_cert_der("new issuing CA", cert)?;
        let (_, parsed) =
            X509Certificate::from_der(&der).map_err(|e| bad(format!("does not parse: {e}")))?;
        self.ca.check_root_issued(&parsed, "new issuing CA", "")?;
        let generation = self.next_generation();
        let cn = ca::common_name(parsed.subject()).unwrap_or_default();
        if cn != issuing_cn(generation) {
            return Err(bad(format!(
                "its name is {cn:?}, not {:?}: prepare the request again",
                issuing_cn(generation)
            )));
        }
        let pending = self.paths.pending_issuing_key();
        if !keys::exists(&pending) {
            return Err(bad(
                "this node prepared no key (POST /v1/ca/issuing/request first)".into(),
            ));
        }
        let key = keys::load(&pending, self.pin.as_ref())?;
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad("its key is not the one this node prepared".into()));
        }
        // Key, then certificate: the certificate's presence completes it.
        keys::move_kept(&pending, &self.paths.issuing_key_of(generation))?;
        write_file(
            &self.paths.issuing_cert_of(generation),
            crate::manufacturer::pem_encode("CERTIFICATE", &der).as_bytes(),
            false,
        )?;
        self.reload_issuing()?;
        tracing::info!(
            generation,
            serial = %crate::Serial::from_bytes(parsed.raw_serial())?,
            "rolled over to a new issuing CA: new certificates come from it; the earlier ones \
             still validate"
        );
        Ok(generation)
    }

    /// Reads the issuing CA generations from the data dir again (after a
    /// rollover here, or one copied from another node).
    pub fn reload_issuing(&self) -> Result<(), Error> {
        let all = load_generations(&self.paths, self.pin.as_ref())?;
        self.ca.set_issuing(all);
        Ok(())
    }

    /// A freshly signed CRL of the issuing CA generation whose CRL is
    /// `name` (`issuing`, `issuing-2`, ...); `None` for another name.
    pub fn issuing_crl_named(&self, name: &str) -> Option<Result<Vec<u8>, Error>> {
        let signer = self
            .ca
            .issuing_all()
            .iter()
            .find(|s| s.crl_name == name)
            .cloned()?;
        Some((|| {
            // Once a day, this complete CRL becomes the base of deltas.
            let blob = crate::crl::base_blob(&signer.crl_name);
            let now = OffsetDateTime::now_utc();
            let stale = match self.registry.blob(&blob)? {
                Some((_, doc)) => {
                    serde_json::from_slice::<crate::crl::Base>(&doc).map_or(true, |b| b.stale(now))
                }
                None => true,
            };
            // For a new base, the audit log's newest entry, read before the
            // listing: every entry up to it is then in this CRL, so a delta
            // against it need read the log only past it.
            let audit_seq = if stale {
                let newest = self.registry.audit_newest(None, 1)?;
                Some(newest.items.first().map_or(0, |e| e.seq))
            } else {
                None
            };
            let listed = self.registry.revoked_by_issuer(None, &signer.name)?;
            let number = self.registry.next_crl_number(&signer.crl_name)?;
            let der = crate::crl::complete(&signer, &listed, number, self.ca.status_url())?;
            if let Some(audit_seq) = audit_seq {
                let base = crate::crl::Base {
                    number,
                    at: now,
                    audit_seq,
                };
                let doc = serde_json::to_vec(&base).map_err(|e| Error::Corrupt(e.to_string()))?;
                // The complete CRL is served even if its base cannot be
                // kept now: deltas stay on the older base meanwhile.
                if let Err(e) = self.registry.put_blob_if_newer(&blob, number, &doc) {
                    tracing::warn!(crl = %signer.crl_name, error = %e, "crl: could not keep this CRL as the base of deltas; the older base serves");
                }
            }
            Ok(der)
        })())
    }

    /// A freshly signed delta CRL of the issuing CA generation whose delta
    /// CRL is `name` (`issuing-delta`, `issuing-2-delta`, ...), against the
    /// base the registry keeps (made first if there is none); `None` for
    /// another name.
    pub fn issuing_delta_crl_named(&self, name: &str) -> Option<Result<Vec<u8>, Error>> {
        let complete = name.strip_suffix(crate::crl::DELTA_SUFFIX)?;
        let signer = self
            .ca
            .issuing_all()
            .iter()
            .find(|s| s.crl_name == complete)
            .cloned()?;
        Some((|| {
            let blob = crate::crl::base_blob(&signer.crl_name);
            let (_, doc) = match self.registry.blob(&blob)? {
                Some(kept) => kept,
                None => {
                    // No base yet: the complete CRL signed now is the first.
                    self.issuing_crl_named(complete).transpose()?;
                    self.registry.blob(&blob)?.ok_or_else(|| {
                        Error::Corrupt(format!("no base for the delta CRL {name}"))
                    })?
                }
            };
            let base: crate::crl::Base = serde_json::from_slice(&doc)
                .map_err(|e| Error::Corrupt(format!("the base of {name}: {e}")))?;
            let listed = self.registry.revoked_by_issuer(None, &signer.name)?;
            let since = self.changed_since(&signer.name, &base)?;
            let number = self.registry.next_crl_number(&signer.crl_name)?;
            crate::crl::delta(&signer, &base, &listed, &since, number)
        })())
    }
}

impl Authority {
    /// What the audit log says changed since `base` for the certificates
    /// `issuer` signed: read newest first back to the base's newest entry.
    /// (It read back to the base's time less the margin too, whichever was
    /// further: at a million devices enrolled within the hour, 1.1 million
    /// entries and 13 s for a delta after 90 suspensions.)
    fn changed_since(
        &self,
        issuer: &str,
        base: &crate::crl::Base,
    ) -> Result<crate::crl::Since, Error> {
        let mut onto = std::collections::BTreeSet::new();
        let mut off = std::collections::BTreeSet::new();
        let mut since = crate::crl::Since::default();
        let mut before = None;
        'pages: loop {
            let page = self.registry.audit_newest(before, 1000)?;
            for e in &page.items {
                // In the base already (its listing was read after it).
                if e.seq <= base.audit_seq {
                    break 'pages;
                }
                if e.action == "manufacturer-revoke" {
                    since.manufacturer_revoked = true;
                }
                match (crate::crl::moves(&e.action), &e.device) {
                    (Some(true), Some(d)) => onto.insert(d.clone()),
                    (Some(false), Some(d)) => off.insert(d.clone()),
                    _ => false,
                };
            }
            match page.next.and_then(|n| n.parse().ok()) {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        for (devices, out) in [(onto, &mut since.listed), (off, &mut since.released)] {
            for id in devices {
                let view = match self.registry.device_view(&id) {
                    Ok(v) => v,
                    Err(Error::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                out.extend(
                    view.certificates
                        .into_iter()
                        .filter(|c| c.record.issuer == issuer && c.record.manufacturer.is_none())
                        .map(|c| c.record.serial),
                );
            }
        }
        Ok(since)
    }
}

/// The expiry of generation `n` in `paths`, for reports.
pub fn expires(paths: &Paths, n: u32) -> Result<OffsetDateTime, Error> {
    crate::ceremony::not_after(&paths.issuing_cert_of(n))
}
