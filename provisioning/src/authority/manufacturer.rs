//! Manufacturers: their CAs, batch enrollment, just-in-time registration of
//! the devices they made, and factory claims.
//!
//! A manufacturer CA is either **issued** here (an intermediate under the
//! fleetgate root, pathLen 0, clientAuth only, name-constrained away from
//! every DNS name and IP address; fleetgate keeps its key to batch-sign and
//! to answer OCSP and CRLs for it, and hands a copy to the manufacturer once)
//! or **registered** (the manufacturer's own CA, after proof of possession:
//! a certificate whose CN is a one-time challenge, signed with the CA's key).
//!
//! A device whose certificate chains to a manufacturer CA but is not yet in
//! the registry registers itself on first connect, as the manufacturer's
//! [`JitPolicy`] says. Revoking a manufacturer revokes every certificate its
//! CA issued, at once: [`crate::Registry::standing`] checks it on every read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{self, load_signer, write_file, CertInfo, IssuedCert, Signer};
use crate::csr::validate_csr;
use crate::id::hex;
use crate::keys;
use crate::registry::{Listed, NewDevice, Status};
use crate::{Authority, DeviceId, DeviceRecord, Error, Identity, Role, Serial};

// The records (what the registry stores of manufacturers, claims and
// challenges) are the registry's; their names stay reachable from here.
pub use crate::registry::records::{
    CaKind, Challenge, ClaimRecord, JitPolicy, ManufacturerRecord, ManufacturerStatus,
    DEFAULT_JIT_QUOTA,
};

/// How long a challenge may be answered.
pub const CHALLENGE_LIFETIME: Duration = Duration::hours(1);
/// Lifetime of a manufacturer CA fleetgate issues.
pub const MANUFACTURER_CA_LIFETIME: Duration = Duration::days(10 * 365);
/// Most CSRs in one batch call.
pub const MAX_BATCH: usize = 10_000;

/// One entry of a batch enrollment.
#[derive(Clone, Debug)]
pub struct BatchItem {
    /// The name it is reported by (the CSR's file name, say).
    pub name: String,
    pub id: String,
    pub csr: Vec<u8>,
}

/// The CAs of manufacturers fleetgate issued, loaded on first use.
#[derive(Debug, Default)]
pub struct Signers(Mutex<HashMap<String, Arc<Signer>>>);

fn spki_sha256(cert: &X509Certificate<'_>) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw).as_ref())
}

/// SHA-256 of a DER certificate's SubjectPublicKeyInfo, hex.
pub fn spki_sha256_of(der: &[u8]) -> Result<String, Error> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::Certificate(format!("does not parse: {e}")))?;
    Ok(spki_sha256(&cert))
}

/// The refusal to sign for a manufacturer whose CA is its own.
fn no_key(name: &str) -> Error {
    Error::InvalidInput {
        reason: format!(
            "manufacturer {name}'s CA is its own: fleetgate holds no key for it; its devices \
             are signed at the factory and register on first connect"
        ),
    }
}

fn now_seconds() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

/// The DER of one PEM or DER certificate (parse it with [`parse_cert`]).
pub(crate) fn one_cert_der(what: &str, bytes: &[u8]) -> Result<Vec<u8>, Error> {
    one_cert(what, bytes)
}

fn one_cert(what: &str, bytes: &[u8]) -> Result<Vec<u8>, Error> {
    if bytes.starts_with(b"-----") || bytes.iter().take(64).all(u8::is_ascii) {
        Ok(CertificateDer::from_pem_slice(bytes)
            .map_err(|e| Error::InvalidInput {
                reason: format!("{what}: no PEM certificate in it: {e}"),
            })?
            .to_vec())
    } else {
        Ok(bytes.to_vec())
    }
}

/// A certificate the caller gave us: bad input if it does not parse.
fn parse_cert<'a>(what: &str, der: &'a [u8]) -> Result<X509Certificate<'a>, Error> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| Error::InvalidInput {
            reason: format!("{what}: does not parse as X.509: {e}"),
        })
}

impl Authority {
    /// Issues a manufacturer CA under the root (which must be online
    /// here). Returns its record and, where its key is a file, the key
    /// (PEM) for the caller to hand to the manufacturer; a copy stays in
    /// the data dir, 0600. A key made in a token stays there: `None`.
    pub fn create_manufacturer(
        &self,
        name: &DeviceId,
        policy: JitPolicy,
        actor: &str,
    ) -> Result<(ManufacturerRecord, Option<String>), Error> {
        self.ensure_no_manufacturer(name)?;
        // Before any key is made: a node whose root is offline says so.
        self.ca.root(
            "issuing a manufacturer CA",
            "fleetgate manufacturer create NAME --root-dir ROOTDIR",
        )?;
        self.prepare_manufacturer(name)?;
        let key = keys::load(&self.pending_key(name), self.pin.as_ref())?;
        let cert = self
            .ca
            .issue_manufacturer_ca(&key, name.as_str(), MANUFACTURER_CA_LIFETIME)?;
        self.finish_manufacturer(name, policy, &cert.der, actor)
    }

    /// The first half of a manufacturer CA made at a root ceremony: a key
    /// for it, made where this node makes keys (and kept as pending), and a
    /// request for the root to sign (PEM).
    pub fn prepare_manufacturer(&self, name: &DeviceId) -> Result<String, Error> {
        self.ensure_no_manufacturer(name)?;
        keys::pending_request(
            &self.pending_key(name),
            &format!("manufacturer-{name}"),
            format!("{name} manufacturer CA"),
            &self.custody(),
            self.pin.as_ref(),
        )
    }

    /// The second half: installs `ca` (PEM or DER), signed by the root at a
    /// ceremony for the key [`Authority::prepare_manufacturer`] made.
    pub fn install_manufacturer(
        &self,
        name: &DeviceId,
        policy: JitPolicy,
        ca: &[u8],
        actor: &str,
    ) -> Result<(ManufacturerRecord, Option<String>), Error> {
        self.ensure_no_manufacturer(name)?;
        let der = one_cert("manufacturer CA", ca)?;
        let cert = parse_cert("manufacturer CA", &der)?;
        self.ca.check_root_issued(
            &cert,
            "manufacturer CA",
            " (sign it with `fleetgate manufacturer create --root-dir`)",
        )?;
        let bad = |why: &str| Error::InvalidInput {
            reason: format!("manufacturer CA: {why}"),
        };
        if !keys::exists(&self.pending_key(name)) {
            return Err(bad(&format!(
                "this node prepared no key for {name}: the request comes from \
                 POST /v1/manufacturers/{name}/request on this cluster"
            )));
        }
        let key = keys::load(&self.pending_key(name), self.pin.as_ref())?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad(&format!(
                "its key is not the one this node prepared for {name}"
            )));
        }
        self.finish_manufacturer(name, policy, &der, actor)
    }

    /// Where a manufacturer CA's key waits for its certificate.
    fn pending_key(&self, name: &DeviceId) -> std::path::PathBuf {
        self.paths
            .manufacturer_dir()
            .join("pending")
            .join(format!("{name}.key"))
    }

    /// Moves the pending key in place beside `der`, and records the CA.
    fn finish_manufacturer(
        &self,
        name: &DeviceId,
        policy: JitPolicy,
        der: &[u8],
        actor: &str,
    ) -> Result<(ManufacturerRecord, Option<String>), Error> {
        let (_, parsed) =
            X509Certificate::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
        let ca_pem = pem_encode("CERTIFICATE", der);
        let rec = ManufacturerRecord {
            name: name.clone(),
            kind: CaKind::Issued,
            policy,
            status: ManufacturerStatus::Active,
            revocation: None,
            ca_pem: ca_pem.clone(),
            subject: parsed.subject().to_string(),
            spki_sha256: spki_sha256(&parsed),
            serial: Serial::from_bytes(parsed.raw_serial())?,
            not_after: parsed.validity().not_after.to_datetime(),
            created_at: now_seconds(),
            jit_quota: None,
            jit_registered: 0,
        };
        // Files first: a record never names a key that is not on disk.
        let pending = self.pending_key(name);
        let key_path = self.paths.manufacturer_key(name.as_str());
        let key_pem = keys::move_kept(&pending, &key_path)?;
        write_file(
            &self.paths.manufacturer_cert(name.as_str()),
            ca_pem.as_bytes(),
            false,
        )?;
        self.registry.add_manufacturer(&rec, actor)?;
        tracing::info!(manufacturer = %name, serial = %rec.serial, %policy, "manufacturer CA issued");
        Ok((rec, key_pem))
    }

    /// A one-time challenge for registering `name`'s own CA: the
    /// manufacturer signs a certificate with CN = the code using that CA's
    /// key, within [`CHALLENGE_LIFETIME`].
    pub fn manufacturer_challenge(&self, name: &DeviceId) -> Result<Challenge, Error> {
        self.ensure_no_manufacturer(name)?;
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| Error::Crypto("system random number generator failed".into()))?;
        let c = Challenge {
            code: hex(&bytes),
            expires_at: now_seconds() + CHALLENGE_LIFETIME,
        };
        self.registry.set_challenge(name.as_str(), &c)?;
        Ok(c)
    }

    /// Registers a manufacturer's own CA, given proof that the caller holds
    /// its key: `verification`, a certificate signed by the CA whose CN is
    /// the outstanding challenge for `name`.
    pub fn register_manufacturer(
        &self,
        name: &DeviceId,
        ca_cert: &[u8],
        verification: Option<&[u8]>,
        policy: JitPolicy,
        actor: &str,
    ) -> Result<ManufacturerRecord, Error> {
        self.ensure_no_manufacturer(name)?;
        let ca_der = one_cert("CA certificate", ca_cert)?;
        let ca = parse_cert("CA certificate", &ca_der)?;
        if !ca.is_ca() {
            return Err(Error::InvalidInput {
                reason: "the CA certificate is not a CA (basicConstraints cA is not set)".into(),
            });
        }
        if let Ok(Some(ku)) = ca.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(Error::InvalidInput {
                    reason: "the CA certificate's key usage lacks keyCertSign".into(),
                });
            }
        }
        if !ca.validity().is_valid() {
            return Err(Error::InvalidInput {
                reason: "the CA certificate is not within its validity period".into(),
            });
        }
        let Some(verification) = verification else {
            return Err(Error::ProofOfPossession {
                reason: format!(
                    "no verification certificate: get a challenge (fleetgate manufacturer \
                     challenge {name}), sign a certificate with CN=<challenge> using the CA's \
                     key, and pass it with --verification-cert"
                ),
            });
        };
        let v_der = one_cert("verification certificate", verification)?;
        let v = parse_cert("verification certificate", &v_der)?;
        // Checked (and spent) before the signature, so a challenge cannot be
        // guessed at by retrying.
        let challenge = self.registry.take_challenge(name.as_str())?;
        let Some(challenge) = challenge else {
            return Err(Error::ProofOfPossession {
                reason: format!("no challenge outstanding for {name}; ask for one first"),
            });
        };
        if challenge.expires_at < OffsetDateTime::now_utc() {
            return Err(Error::ProofOfPossession {
                reason: "the challenge expired; ask for a new one".into(),
            });
        }
        if ca::common_name(v.subject()) != Some(challenge.code.as_str()) {
            return Err(Error::ProofOfPossession {
                reason: "the verification certificate's CN is not the challenge (the challenge \
                         is spent; ask for a new one)"
                    .into(),
            });
        }
        if v.verify_signature(Some(ca.public_key())).is_err() {
            return Err(Error::ProofOfPossession {
                reason: "the verification certificate is not signed by the CA's key".into(),
            });
        }
        let spki = spki_sha256(&ca);
        let subject = ca.subject().to_string();
        for other in self.registry.manufacturers()? {
            if other.spki_sha256 == spki || other.subject == subject {
                return Err(Error::InvalidInput {
                    reason: format!(
                        "this CA (or its name) is already registered as manufacturer {}",
                        other.name
                    ),
                });
            }
        }
        let mut own = vec![self.ca.root_der().clone()];
        own.extend(self.ca.issuing_all().iter().map(|g| g.der.clone()));
        for ours in &own {
            let (_, theirs) =
                X509Certificate::from_der(ours).map_err(|e| Error::Certificate(e.to_string()))?;
            if spki_sha256_of(ours)? == spki {
                return Err(Error::InvalidInput {
                    reason: "that is one of fleetgate's own CAs".into(),
                });
            }
            // Names must tell issuers apart: in status answers, CRLs, logs.
            if theirs.subject().to_string() == subject {
                return Err(Error::InvalidInput {
                    reason: format!("a CA named {subject:?} is one of fleetgate's own; rename it"),
                });
            }
        }
        let rec = ManufacturerRecord {
            name: name.clone(),
            kind: CaKind::Registered,
            policy,
            status: ManufacturerStatus::Active,
            revocation: None,
            ca_pem: pem_encode("CERTIFICATE", &ca_der),
            subject,
            spki_sha256: spki,
            serial: Serial::from_bytes(ca.raw_serial())?,
            not_after: ca.validity().not_after.to_datetime(),
            created_at: now_seconds(),
            jit_quota: None,
            jit_registered: 0,
        };
        self.registry.add_manufacturer(&rec, actor)?;
        tracing::info!(manufacturer = %name, subject = ?rec.subject, %policy, "manufacturer CA registered");
        Ok(rec)
    }

    /// `AlreadyExists` if there is a manufacturer called `name`.
    fn ensure_no_manufacturer(&self, name: &DeviceId) -> Result<(), Error> {
        match self.registry.manufacturer(name.as_str())? {
            Some(_) => Err(Error::AlreadyExists {
                id: name.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// The manufacturer called `name`, or `ManufacturerNotFound`.
    pub fn known_manufacturer(&self, name: &str) -> Result<ManufacturerRecord, Error> {
        self.registry
            .manufacturer(name)?
            .ok_or_else(|| Error::ManufacturerNotFound {
                name: name.to_owned(),
            })
    }

    /// The signing CA of `rec`, if fleetgate issued it (and so holds its
    /// key); `None` for a registered CA.
    pub(crate) fn held_signer(
        &self,
        rec: &ManufacturerRecord,
    ) -> Result<Option<Arc<Signer>>, Error> {
        if rec.kind != CaKind::Issued {
            return Ok(None);
        }
        let name = rec.name.as_str();
        let mut cache = self
            .signers
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = cache.get(name) {
            return Ok(Some(s.clone()));
        }
        let s = Arc::new(load_signer(
            &self.paths.manufacturer_cert(name),
            &self.paths.manufacturer_key(name),
            name,
            Some(name.to_owned()),
            self.pin.as_ref(),
        )?);
        cache.insert(name.to_owned(), s.clone());
        Ok(Some(s))
    }

    /// The signing CA of a manufacturer fleetgate issued.
    pub fn manufacturer_signer(&self, name: &str) -> Result<Arc<Signer>, Error> {
        self.held_signer(&self.known_manufacturer(name)?)?
            .ok_or_else(|| no_key(name))
    }

    /// Manufacturer `name`, refused if revoked.
    fn active_manufacturer(&self, name: &str) -> Result<ManufacturerRecord, Error> {
        let rec = self.known_manufacturer(name)?;
        if rec.status == ManufacturerStatus::Revoked {
            return Err(Error::ManufacturerRevoked {
                name: name.to_owned(),
            });
        }
        Ok(rec)
    }

    /// The signer for new devices of `manufacturer` (`None`: fleetgate's
    /// issuing CA), refusing a revoked manufacturer and one whose key
    /// fleetgate does not hold.
    pub(crate) fn signer_for(
        &self,
        manufacturer: Option<&str>,
    ) -> Result<Option<Arc<Signer>>, Error> {
        let Some(name) = manufacturer else {
            return Ok(None);
        };
        let rec = self.active_manufacturer(name)?;
        self.held_signer(&rec)?
            .ok_or_else(|| no_key(name))
            .map(Some)
    }

    /// Signs many CSRs and registers their devices with one flush. Each
    /// entry stands alone: a bad CSR or a taken id fails that entry only.
    /// Signing runs on every core.
    pub fn enroll_batch(
        &self,
        manufacturer: Option<&str>,
        items: &[BatchItem],
        lifetime: Duration,
        actor: &str,
    ) -> Result<Vec<Result<IssuedCert, Error>>, Error> {
        if items.len() > MAX_BATCH {
            return Err(Error::TooLarge {
                len: items.len(),
                max: MAX_BATCH,
            });
        }
        let signer = self.signer_for(manufacturer)?;
        let sign_one = |item: &BatchItem| -> Result<(NewDevice, IssuedCert), Error> {
            let id = DeviceId::try_new(item.id.clone())?;
            let csr = validate_csr(&item.csr)?;
            let identity = Identity {
                role: Role::Device,
                id: id.clone(),
            };
            let cert = self
                .ca
                .issue_by(signer.as_deref(), &csr.public_key, &identity, lifetime)?;
            Ok((
                NewDevice {
                    id,
                    role: Role::Device,
                    manufacturer: manufacturer.map(str::to_owned),
                },
                cert,
            ))
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = items.len().div_ceil(threads).max(1);
        let signed: Vec<Result<(NewDevice, IssuedCert), Error>> = std::thread::scope(|s| {
            let handles: Vec<_> = items
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().map(sign_one).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(Error::Crypto("a signing thread panicked".into()))]
                    })
                })
                .collect()
        });
        let good: Vec<(NewDevice, IssuedCert)> = signed
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        let mut stored = self.registry.enroll_batch(&good, actor)?.into_iter();
        let out = signed
            .into_iter()
            .map(|r| {
                let (_, cert) = r?;
                stored
                    .next()
                    .unwrap_or_else(|| Err(Error::Storage("batch result missing".into())))?;
                Ok(cert)
            })
            .collect();
        tracing::info!(manufacturer = ?manufacturer, items = items.len(), "batch enrollment");
        Ok(out)
    }

    /// Registers a device on its first connect with a manufacturer's
    /// certificate (already verified to chain to that manufacturer's CA),
    /// as the manufacturer's policy says.
    pub fn register_jit(
        &self,
        manufacturer: &ManufacturerRecord,
        id: &DeviceId,
        info: &CertInfo,
    ) -> Result<DeviceRecord, Error> {
        let status = match manufacturer.policy {
            JitPolicy::AutoActivate => Status::Active,
            JitPolicy::Pending => Status::Pending,
        };
        let cert = IssuedCert {
            serial: info.serial.clone(),
            der: Vec::new(),
            chain_pem: String::new(),
            issuer: info.issuer.clone(),
            not_before: info.not_before,
            not_after: info.not_after,
            fingerprint: info.fingerprint.clone(),
            manufacturer: Some(manufacturer.name.to_string()),
        };
        let new = NewDevice {
            id: id.clone(),
            role: Role::Device,
            manufacturer: Some(manufacturer.name.to_string()),
        };
        let d = self.registry.register_jit(
            &new,
            &cert,
            status,
            &format!("manufacturer:{}", manufacturer.name),
        )?;
        tracing::info!(device.id = %id, manufacturer = %manufacturer.name, %status, serial = %info.serial, "registered just in time");
        Ok(d)
    }

    /// Issues a claim certificate: role `claim`, good for `uses`
    /// provisionings.
    pub fn create_claim(
        &self,
        id: &DeviceId,
        uses: u32,
        manufacturer: Option<&str>,
        csr: &[u8],
        lifetime: Duration,
        actor: &str,
    ) -> Result<(DeviceRecord, ClaimRecord, IssuedCert), Error> {
        if let Some(m) = manufacturer {
            self.known_manufacturer(m)?;
        }
        let csr = validate_csr(csr)?;
        let identity = Identity {
            role: Role::Claim,
            id: id.clone(),
        };
        let cert = self.ca.issue_for_csr(&csr, &identity, lifetime)?;
        let new = NewDevice {
            id: id.clone(),
            role: Role::Claim,
            manufacturer: manufacturer.map(str::to_owned),
        };
        let (d, c) = self.registry.add_claim(&new, &cert, uses, actor)?;
        tracing::info!(claim = %id, uses, "claim issued");
        Ok((d, c, cert))
    }

    /// A device certificate for `id` from `csr`, asked for by the claim
    /// `claim` (one of its uses); `actor` names it in the audit log with
    /// the way it came (`claim:line-4 (est)`).
    pub fn provision_with_claim(
        &self,
        claim: &DeviceId,
        id: &DeviceId,
        csr: &[u8],
        lifetime: Duration,
        actor: &str,
    ) -> Result<(DeviceRecord, IssuedCert), Error> {
        self.provision_key_with_claim(claim, id, &validate_csr(csr)?, lifetime, actor)
    }

    /// [`Authority::provision_with_claim`] of a key already checked.
    pub fn provision_key_with_claim(
        &self,
        claim: &DeviceId,
        id: &DeviceId,
        csr: &crate::csr::ValidatedCsr,
        lifetime: Duration,
        actor: &str,
    ) -> Result<(DeviceRecord, IssuedCert), Error> {
        let rec = self.registry.claim(claim)?.ok_or_else(|| Error::NotFound {
            id: claim.to_string(),
        })?;
        if rec.uses_left == 0 {
            return Err(Error::ClaimExhausted {
                id: claim.to_string(),
            });
        }
        if self.registry.device(id).is_ok() {
            return Err(Error::AlreadyExists { id: id.to_string() });
        }
        let identity = Identity {
            role: Role::Device,
            id: id.clone(),
        };
        // A registered manufacturer's CA cannot sign here: ours does.
        let signer = match rec.manufacturer.as_deref() {
            Some(m) => self.held_signer(&self.active_manufacturer(m)?)?,
            None => None,
        };
        let cert = self
            .ca
            .issue_by(signer.as_deref(), &csr.public_key, &identity, lifetime)?;
        let new = NewDevice {
            id: id.clone(),
            role: Role::Device,
            manufacturer: rec.manufacturer.clone(),
        };
        let (d, left) = self
            .registry
            .provision_with_claim(claim, &new, &cert, actor)?;
        tracing::info!(device.id = %id, %claim, uses_left = left.uses_left, serial = %cert.serial, "provisioned through a claim");
        Ok((d, cert))
    }

    /// A freshly signed CRL of a manufacturer CA fleetgate issued.
    pub fn manufacturer_crl(&self, name: &str) -> Result<Vec<u8>, Error> {
        let signer = self.manufacturer_signer(name)?;
        let listed = self.registry.revoked_by_issuer(Some(name), &signer.name)?;
        let number = self.registry.next_crl_number(name)?;
        ca::crl(&signer, &listed, number)
    }

    /// The manufacturer CAs the root issued that are revoked: what the
    /// root's CRL lists.
    pub fn revoked_manufacturer_cas(&self) -> Result<Vec<Listed>, Error> {
        Ok(self
            .registry
            .manufacturers()?
            .into_iter()
            .filter(|m| m.kind == CaKind::Issued)
            .filter_map(|m| {
                m.revocation.map(|r| Listed {
                    serial: m.serial,
                    at: r.at,
                    reason: Some(r.reason),
                })
            })
            .collect())
    }

    /// The root's CRL: freshly signed where the root is online; where it is
    /// offline, the newest one a ceremony signed (in the registry, else the
    /// data dir's from `ca init`).
    pub fn root_crl(&self) -> Result<Vec<u8>, Error> {
        let listed = self.revoked_manufacturer_cas()?;
        if self.ca.root_online() {
            let number = self.registry.next_crl_number(ca::ROOT_CRL_NAME)?;
            let root = self.ca.root(
                "signing the root CRL",
                "fleetgate ca crl --root-dir ROOTDIR",
            )?;
            return ca::crl(root, &listed, number);
        }
        if let Some((_, der)) = self.registry.blob(ROOT_CRL_BLOB)? {
            return Ok(der);
        }
        std::fs::read(self.paths.root_crl()).map_err(|e| Error::Io {
            path: self.paths.root_crl(),
            source: e,
        })
    }

    /// Installs a root CRL signed at a ceremony (`fleetgate ca crl
    /// --root-dir`): it must be signed by this CA's root, be newer than
    /// the one in place, and list every manufacturer CA revoked so far.
    pub fn install_root_crl(&self, der: &[u8], actor: &str) -> Result<u64, Error> {
        use x509_parser::revocation_list::CertificateRevocationList;
        let bad = |why: String| Error::InvalidInput {
            reason: format!("root CRL: {why}"),
        };
        let (_, crl) = CertificateRevocationList::from_der(der)
            .map_err(|e| bad(format!("does not parse: {e}")))?;
        let (_, root) = X509Certificate::from_der(self.ca.root_der())
            .map_err(|e| Error::Certificate(e.to_string()))?;
        crl.verify_signature(root.public_key())
            .map_err(|_| bad("not signed by this CA's root".into()))?;
        let number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n.clone()).ok())
            .ok_or_else(|| bad("no CRL number".into()))?;
        let listed: std::collections::HashSet<Vec<u8>> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial().to_vec())
            .collect();
        for m in self.revoked_manufacturer_cas()? {
            if !listed.contains(m.serial.as_bytes()) {
                return Err(bad(format!(
                    "does not list revoked manufacturer CA {} : sign it again from the current list",
                    m.serial
                )));
            }
        }
        if !self
            .registry
            .put_blob_if_newer(ROOT_CRL_BLOB, number, der)?
        {
            return Err(bad(format!(
                "number {number} is not newer than the one in place"
            )));
        }
        tracing::info!(number, %actor, entries = listed.len(), "installed the root CRL signed at a ceremony");
        Ok(number)
    }
}

/// Where the registry keeps the root CRL a ceremony signed.
const ROOT_CRL_BLOB: &str = "root-crl";

/// The device id a manufacturer's certificate names: its fleetgate URI if it
/// has one (which must say `device`), else its CN.
pub fn jit_identity(info: &CertInfo) -> Result<DeviceId, Error> {
    match &info.identity {
        Some(Identity {
            role: Role::Device,
            id,
        }) => Ok(id.clone()),
        Some(other) => Err(Error::InvalidInput {
            reason: format!(
                "a manufacturer's certificate may only name a device, not {}",
                other.role
            ),
        }),
        None => match &info.common_name {
            Some(cn) => DeviceId::try_new(cn.clone()),
            None => Err(Error::InvalidInput {
                reason: "certificate has neither a fleetgate URI nor a CN".into(),
            }),
        },
    }
}

/// PEM text for DER bytes ([`crate::pem::encode`]).
pub use crate::pem::encode as pem_encode;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::inspect_certificate;
    use crate::InitOptions;

    #[test]
    fn issued_manufacturer_signs_devices_and_falls_with_one_write() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let acme = DeviceId::try_new("acme").unwrap();
        let (rec, key_pem) = auth
            .create_manufacturer(&acme, JitPolicy::Pending, "test")
            .unwrap();
        assert!(key_pem.unwrap().contains("PRIVATE KEY"));
        assert!(matches!(
            auth.create_manufacturer(&acme, JitPolicy::Pending, "test"),
            Err(Error::AlreadyExists { .. })
        ));
        let csr = crate::csr::new_key_and_csr(crate::csr::KeyKind::EcdsaP256, "x")
            .unwrap()
            .1;
        let items: Vec<BatchItem> = ["a-1", "a-2", "bad/id"]
            .iter()
            .map(|id| BatchItem {
                name: (*id).into(),
                id: (*id).into(),
                csr: csr.clone().into_bytes(),
            })
            .collect();
        let out = auth
            .enroll_batch(Some("acme"), &items, Duration::days(1), "test")
            .unwrap();
        assert!(out[0].is_ok() && out[1].is_ok());
        assert!(matches!(out[2], Err(Error::InvalidId { .. })));
        let cert = out[0].as_ref().unwrap();
        let info = inspect_certificate(&cert.der).unwrap();
        assert_eq!(info.issuer, rec.subject);
        assert_eq!(
            auth.registry.standing(&cert.key()).unwrap().unwrap().1,
            crate::Standing::Good
        );
        // An unknown manufacturer, a missing one.
        assert!(matches!(
            auth.enroll_batch(Some("nobody"), &items[..1], Duration::days(1), "test"),
            Err(Error::ManufacturerNotFound { .. })
        ));
        auth.registry
            .revoke_manufacturer("acme", crate::RevocationReason::CaCompromise, "test")
            .unwrap();
        assert!(matches!(
            auth.registry.standing(&cert.key()).unwrap().unwrap().1,
            crate::Standing::Revoked(_)
        ));
        assert!(matches!(
            auth.enroll_batch(Some("acme"), &items[..1], Duration::days(1), "test"),
            Err(Error::ManufacturerRevoked { .. })
        ));
        // The root's CRL lists the revoked CA.
        let crl = auth.root_crl().unwrap();
        let (_, parsed) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&crl).unwrap();
        let listed: Vec<_> = parsed
            .iter_revoked_certificates()
            .map(|r| Serial::from_bytes(r.raw_serial()).unwrap())
            .collect();
        assert_eq!(listed, vec![rec.serial]);
    }

    #[test]
    fn jit_identity_is_a_device_uri_or_a_cn() {
        let mut info = CertInfo {
            identity: None,
            serial: Serial::from_bytes(&[1]).unwrap(),
            not_before: OffsetDateTime::now_utc(),
            not_after: OffsetDateTime::now_utc(),
            fingerprint: String::new(),
            is_ca: false,
            common_name: Some("sensor-7".into()),
            issuer: String::new(),
            lacks_digital_signature: false,
            client_auth: true,
        };
        assert_eq!(jit_identity(&info).unwrap().as_str(), "sensor-7");
        info.common_name = Some("not an id".into());
        assert!(jit_identity(&info).is_err());
        info.identity = Some(Identity {
            role: Role::Service,
            id: DeviceId::try_new("svc").unwrap(),
        });
        assert!(jit_identity(&info).is_err());
        info.identity = Some(Identity {
            role: Role::Device,
            id: DeviceId::try_new("d-9").unwrap(),
        });
        assert_eq!(jit_identity(&info).unwrap().as_str(), "d-9");
    }
}
