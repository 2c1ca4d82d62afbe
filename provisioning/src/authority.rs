//! The CA, the registry and where they live: opening (and the first time,
//! creating) a data dir, and what the CA makes and renews for itself (the
//! server certificate, the delegated OCSP and CMP signers).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rcgen::{Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::ca::*;
use crate::files::{check_private, io, read, read_cert, write_file};
use crate::id::Identity;
use crate::keys::{self, CaKey, Custody, Pin};
use crate::registry::{Checkpoint, NewDevice, Registry, Verification};
use crate::{DeviceId, Error, Role, Serial};

pub mod manufacturer;
pub mod rollover;

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Marker {
    format: u32,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

/// The registry `opts` names, which must belong to this data dir's CA: a
/// shared registry records the first node's root, and a node with another
/// refuses to start (its devices' certificates would not verify anywhere
/// else). The CA's private keys never leave the data dir.
fn open_registry(paths: &Paths, opts: &InitOptions, ca: &Ca) -> Result<Registry, Error> {
    let registry = match &opts.store {
        None => Registry::open_with(&paths.registry(), opts.cache_bytes)?,
        Some(store) => Registry::over(
            store.clone(),
            crate::sessions::SessionStore::open_at_with(&paths.registry(), opts.cache_bytes)?,
        )?,
    };
    let root = ring::digest::digest(&ring::digest::SHA256, ca.root_pem().trim().as_bytes());
    let root = crate::id::hex(root.as_ref());
    if let Some(theirs) = registry.claim_root(&root)? {
        return Err(Error::DataDir {
            path: paths.dir.clone(),
            reason: format!(
                "this data dir's root CA (SHA-256 of ca.crt {root}) is not the registry's \
                 ({theirs}): every node of a cluster needs the same CA. Copy a node's data dir but its \
                 registry, sessions and admin.key into an empty data dir (README: Several \
                 nodes on one etcd), or start this node on its own registry"
            ),
        });
    }
    Ok(registry)
}

/// The CA, the registry and where they live.
#[derive(Debug)]
pub struct Authority {
    pub paths: Paths,
    pub ca: Ca,
    pub registry: Registry,
    /// Manufacturer CAs fleetgate issued, loaded on first use.
    pub(crate) signers: crate::manufacturer::Signers,
    /// The PIN of the token keys are in, if any (never written anywhere).
    pub(crate) pin: Option<Pin>,
}

impl Authority {
    /// A new principal of fleetgate's own CA: a certificate for `key`
    /// naming `identity`, and the registry entry to enroll it with (for
    /// `manufacturer`'s fleet, if any).
    pub fn issue_new(
        &self,
        key: &KeyPair,
        identity: &Identity,
        manufacturer: Option<&str>,
        lifetime: Duration,
    ) -> Result<(NewDevice, IssuedCert), Error> {
        let cert = self.ca.issue(key, identity, lifetime)?;
        let new = NewDevice {
            id: identity.id.clone(),
            role: identity.role,
            manufacturer: manufacturer.map(str::to_owned),
        };
        Ok((new, cert))
    }

    /// Opens the data dir at `dir`, creating a new CA there if it is missing or
    /// empty. A dir that is neither complete nor empty is an error.
    pub fn open_or_init(dir: &Path, opts: &InitOptions) -> Result<Self, Error> {
        let paths = Paths::new(dir);
        if paths.marker().exists() {
            return Self::load(paths, opts);
        }
        let empty = match fs::read_dir(dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(io(dir, e)),
        };
        if !empty {
            return Err(Error::DataDir {
                path: dir.to_owned(),
                reason: format!(
                    "has files but no {MARKER}: an earlier initialization was interrupted or this \
                     is not a fleetgate data dir; move it away to create a new CA"
                ),
            });
        }
        // A shared registry that already belongs to a CA would refuse the
        // new one this would make: refused before anything is written, so
        // a retry says the same.
        if let Some(store) = &opts.store {
            if let Some(theirs) = store.get(crate::store::Space::Meta, b"ca-root")? {
                return Err(Error::DataDir {
                    path: dir.to_owned(),
                    reason: format!(
                        "is empty, and the shared registry already belongs to a CA (SHA-256 of \
                         its ca.crt {}): this node would make a new CA, which the cluster's \
                         nodes and devices do not trust. Copy a node's data dir but its \
                         registry, sessions and admin.key into this one (README: Several \
                         nodes on one etcd), or start this node on its own registry. Nothing \
                         was written",
                        String::from_utf8_lossy(&theirs)
                    ),
                });
            }
        }
        Self::init(paths, opts)
    }

    /// Opens an existing, complete data dir; never creates one.
    pub fn open(dir: &Path, opts: &InitOptions) -> Result<Self, Error> {
        let paths = Paths::new(dir);
        if !paths.marker().exists() {
            return Err(Error::DataDir {
                path: dir.to_owned(),
                reason: format!("no {MARKER}: not an initialized fleetgate data dir"),
            });
        }
        Self::load(paths, opts)
    }

    fn init(paths: Paths, opts: &InitOptions) -> Result<Self, Error> {
        mkdir_private(&paths.dir.join("ca"))?;
        // `recursive` leaves an existing (empty) dir's mode alone.
        fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io(&paths.dir, e))?;

        let now = OffsetDateTime::now_utc();
        // The root: in the data dir (the one-command start), or offline in
        // its own dir, where only ceremonies open it.
        let root_dir = opts.root_out.as_deref().map(crate::ceremony::RootDir::new);
        let (root_key_path, root_custody) = match &root_dir {
            Some(r) => {
                r.create()?;
                (r.key(), &opts.root_custody)
            }
            None => (paths.root_key(), &opts.custody),
        };
        let root_key = keys::generate(&root_key_path, "root-ca", root_custody)?;
        let mut root = ca_params("fleetgate root CA", 1, now, ROOT_LIFETIME);
        root.serial_number = Some(rcgen::SerialNumber::from_slice(
            Serial::random()?.as_bytes(),
        ));
        let root_cert = root.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root, &root_key);

        let issuing_object = match &opts.custody {
            Custody::Token { base, .. } => base.object.clone(),
            Custody::Files => String::new(),
        };
        let issuing_key = keys::generate(&paths.issuing_key(), &issuing_object, &opts.custody)?;
        let issuing = issuing_ca_params("fleetgate issuing CA 1", now, opts.status_url.as_deref())?;
        let issuing_cert = issuing.signed_by(&issuing_key, &root_issuer)?;
        // In a token, the bus seal's secret is made now, once, beside the
        // key: nodes that start together later must find one, not each
        // make their own.
        if issuing_key.in_memory().is_none() {
            issuing_key.seal_secret()?;
        }

        write_file(&paths.issuing_cert(), issuing_cert.pem().as_bytes(), false)?;
        write_file(&paths.ca_cert(), root_cert.pem().as_bytes(), false)?;
        if let Some(r) = &root_dir {
            write_file(&r.cert(), root_cert.pem().as_bytes(), false)?;
            // The first ceremony: what the node serves for the root while
            // the root is away.
            let root = Signer::new(
                root_cert.der().clone(),
                root_cert.pem(),
                root_key.clone(),
                ROOT_CRL_NAME,
                None,
            )?;
            crate::ceremony::sign_for_node(&root, &paths, &opts.custody, &[])?;
        }

        let ca = load_ca(&paths, opts)?;
        let registry = open_registry(&paths, opts, &ca)?;
        let auth = Self {
            paths,
            ca,
            registry,
            signers: Default::default(),
            pin: opts.pin.clone().or_else(|| opts.custody.pin().cloned()),
        };
        auth.write_server_cert(&server_sans(opts))?;

        // The first operator, registered like any other principal.
        let admin_key = KeyPair::generate()?;
        let admin_id = Identity {
            role: Role::Admin,
            id: DeviceId::try_new(FIRST_ADMIN)?,
        };
        let (admin, admin_cert) = auth.issue_new(&admin_key, &admin_id, None, ADMIN_LIFETIME)?;
        auth.registry.enroll(&admin, &admin_cert, "system")?;
        write_file(
            &auth.paths.admin_key(),
            admin_key.serialize_pem().as_bytes(),
            true,
        )?;
        write_file(
            &auth.paths.admin_cert(),
            admin_cert.chain_pem.as_bytes(),
            false,
        )?;

        let marker = Marker {
            format: FORMAT,
            created_at: now,
        };
        let marker = serde_json::to_vec_pretty(&marker)
            .map_err(|e| Error::Corrupt(format!("marker: {e}")))?;
        write_file(&auth.paths.marker(), &marker, false)?;
        tracing::info!(dir = %auth.paths.dir.display(), "created a new CA and registry");
        Ok(auth)
    }

    fn load(paths: Paths, opts: &InitOptions) -> Result<Self, Error> {
        let marker: Marker =
            serde_json::from_slice(&read(&paths.marker())?).map_err(|e| Error::DataDir {
                path: paths.marker(),
                reason: format!("does not parse: {e}"),
            })?;
        if marker.format != FORMAT {
            return Err(Error::DataDir {
                path: paths.marker(),
                reason: format!("format {} (this build reads {FORMAT})", marker.format),
            });
        }
        // The root and issuing keys are checked as `load_ca` reads them.
        // The operator's admin key is not the node's: a node started on a
        // copy without it (README, "Several nodes on one etcd") runs, and
        // one that has it keeps it private.
        check_private(&paths.server_key())?;
        if paths.admin_key().exists() {
            check_private(&paths.admin_key())?;
        }
        let ca = load_ca(&paths, opts)?;
        let registry = open_registry(&paths, opts, &ca)?;
        let auth = Self {
            paths,
            ca,
            registry,
            signers: Default::default(),
            pin: opts.pin.clone().or_else(|| opts.custody.pin().cloned()),
        };
        auth.renew_server_cert_if_needed(&server_sans(opts))?;
        Ok(auth)
    }

    /// Where new keys are made: in the token the current issuing CA's key
    /// is in, else files. (Read from the data dir, so every node of a
    /// cluster and every restart agrees.)
    pub fn custody(&self) -> Custody {
        let current = self.ca.issuing_all().len() as u32;
        match (keys::kept(&self.paths.issuing_key_of(current)), &self.pin) {
            (Ok(keys::Kept::Token(base)), Some(pin)) => Custody::Token {
                base,
                pin: pin.clone(),
            },
            _ => Custody::Files,
        }
    }

    /// The CMP signer's key and certificate (DER), made or renewed as
    /// needed.
    pub fn cmp_signer(&self) -> Result<(CaKey, Vec<u8>), Error> {
        self.delegated_signer(
            "CMP signing",
            "cmp-signer",
            &self.paths.cmp_cert(),
            &self.paths.cmp_key(),
            |key| self.ca.issue_cmp_signer(key),
        )
    }

    /// A signing key the issuing CA certifies for one purpose, kept in
    /// `cert_path` and at `key_path` (a 0600 file, or a token key named by
    /// its `.uri`): read back while it has more than a week left, else made
    /// anew where new keys are made (`object`-<time>-<random> in a token;
    /// the superseded key stays there, as other nodes sharing the token
    /// may still sign with it until they renew too).
    fn delegated_signer(
        &self,
        what: &str,
        object: &str,
        cert_path: &Path,
        key_path: &Path,
        issue: impl FnOnce(&CaKey) -> Result<IssuedCert, Error>,
    ) -> Result<(CaKey, Vec<u8>), Error> {
        let old = self.current_signer(cert_path, key_path)?;
        if let Some((key, der, left)) = &old {
            if *left > OCSP_SIGNER_RENEW_BEFORE {
                return Ok((key.clone(), der.clone()));
            }
        }
        if let Some(dir) = cert_path.parent() {
            mkdir_private(dir)?;
        }
        let label = keys::fresh_label(object);
        let key = keys::generate(key_path, &label, &self.custody())?;
        let cert = issue(&key)?;
        write_file(cert_path, cert.chain_pem.as_bytes(), false)?;
        if key.in_memory().is_some() {
            // Back to files (the token was given up): no stale URI.
            let _ = fs::remove_file(keys::uri_path(key_path));
        }
        tracing::info!(serial = %cert.serial, key = %key.location(), "issued a new {what} certificate");
        Ok((key, cert.der))
    }

    /// The delegated signer kept at `cert_path` and `key_path`, if both are
    /// there and match, with the time it has left.
    fn current_signer(
        &self,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Option<(CaKey, Vec<u8>, Duration)>, Error> {
        let Ok(cert) = read(cert_path) else {
            return Ok(None);
        };
        if !keys::exists(key_path) {
            return Ok(None);
        }
        let der = CertificateDer::from_pem_slice(&cert).map_err(|e| Error::DataDir {
            path: cert_path.to_owned(),
            reason: format!("no certificate in it: {e}"),
        })?;
        let (_, parsed) = X509Certificate::from_der(&der).map_err(|e| Error::DataDir {
            path: cert_path.to_owned(),
            reason: format!("does not parse: {e}"),
        })?;
        let left = parsed.validity().not_after.to_datetime() - OffsetDateTime::now_utc();
        // Certified by an earlier issuing CA (before a rollover): made anew
        // by the current one, which is what it answers for.
        if parsed.issuer().to_string() != self.ca.issuing_name() {
            return Ok(None);
        }
        let key = match keys::load(key_path, self.pin.as_ref()) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(key = %key_path.display(), error = %e, "unusable signer key: making a new one");
                return Ok(None);
            }
        };
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Ok(None);
        }
        Ok(Some((key, der.to_vec(), left)))
    }

    /// Reissues the server certificate if it is near expiry, or lacks a SAN
    /// that was asked for. Returns whether it did.
    pub fn renew_server_cert_if_needed(&self, sans: &[String]) -> Result<bool, Error> {
        let (have, not_after) = self.server_cert_sans()?;
        let missing = sans.iter().any(|s| !have.contains(s));
        if not_after - OffsetDateTime::now_utc() > SERVER_RENEW_BEFORE && !missing {
            return Ok(false);
        }
        let mut all = have;
        for s in sans {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        self.write_server_cert(&all)?;
        tracing::info!(sans = ?all, "renewed the server certificate");
        Ok(true)
    }

    /// The OCSP responder for the issuing CA, its signing certificate made
    /// or renewed as needed.
    pub fn ocsp_responder(&self) -> Result<crate::ocsp::Responder, Error> {
        let (key, der) = self.delegated_signer(
            "OCSP signing",
            "ocsp-signer",
            &self.paths.ocsp_cert(),
            &self.paths.ocsp_key(),
            |key| self.ca.issue_ocsp_signer(key),
        )?;
        use crate::manufacturer::CaKind;
        use crate::ocsp::{IssuerHashes, Unit};
        let manufacturers = self.registry.manufacturers()?;
        // The delegated responder: the issuing CA, and registered
        // manufacturer CAs (whose keys we do not hold). Each issuer has one
        // unit, so their order does not matter.
        let generations = self.ca.issuing_all();
        let mut delegated = vec![IssuerHashes::from_cert(&self.ca.issuing_der())?];
        let mut units = Vec::new();
        // The root answers for the CAs it issued.
        let mut root = IssuerHashes::from_cert(self.ca.root_der())?;
        let mut known = std::collections::HashMap::new();
        for (i, g) in generations.iter().enumerate() {
            known.insert(
                inspect_certificate(&g.der)?.serial,
                None::<crate::registry::Revocation>,
            );
            // Earlier issuing CAs (after a rollover) answer for what they
            // signed with their own keys: the delegated responder is
            // certified by the current one only (RFC 6960 4.2.2.2).
            if i > 0 {
                units.push(Unit::new(
                    vec![IssuerHashes::from_cert(&g.der)?],
                    g.key().clone(),
                    &g.der,
                )?);
            }
        }
        for m in &manufacturers {
            let der = m.ca_der()?;
            match m.kind {
                CaKind::Registered => {
                    delegated.push(IssuerHashes::from_cert(&der)?.of_manufacturer(m.name.as_str()))
                }
                CaKind::Issued => {
                    known.insert(m.serial.clone(), m.revocation);
                    let key_file = self.paths.manufacturer_key(m.name.as_str());
                    if !keys::exists(&key_file) {
                        // Created on another node of a cluster: its key stays
                        // in that node's data dir (no key is ever in the
                        // shared store) until the operator copies it here.
                        tracing::warn!(
                            manufacturer = %m.name,
                            key = %key_file.display(),
                            "this node does not hold the manufacturer's CA key: OCSP for its \
                             devices answers unauthorized here until the manufacturer's files \
                             are copied from the node that created it"
                        );
                        continue;
                    }
                    let signer = self.held_signer(m)?.ok_or_else(|| {
                        Error::Corrupt(format!("manufacturer {} has no key", m.name))
                    })?;
                    units.push(Unit::new(
                        vec![IssuerHashes::from_cert(&der)?.of_manufacturer(m.name.as_str())],
                        signer.key().clone(),
                        &der,
                    )?);
                }
            }
        }
        root.known = Some(known);
        // The root answers itself where it is online; where it is offline,
        // a responder it certified at its last ceremony answers for it.
        match &self.ca.root {
            Some(r) => units.push(Unit::new(vec![root], r.key().clone(), self.ca.root_der())?),
            None => {
                let (cert, _) = read_cert(&self.paths.root_ocsp_cert())?;
                let key = keys::load(&self.paths.root_ocsp_key(), self.pin.as_ref())?;
                units.push(Unit::new(vec![root], key, &cert)?);
            }
        }
        let expires = X509Certificate::from_der(&der)
            .map(|(_, c)| c.validity().not_after.to_datetime())
            .map_err(|e| Error::Certificate(format!("OCSP signer: {e}")))?;
        units.push(Unit::new(delegated, key, &der)?);
        let mut responder = crate::ocsp::Responder::new(units);
        responder.signer_expires = Some(expires);
        Ok(responder)
    }

    /// A freshly signed CRL of the issuing CA (DER).
    /// (Generation 1's: `/crl/issuing.crl`; see
    /// [`Authority::issuing_crl_named`] for the others.)
    pub fn issuing_crl(&self) -> Result<Vec<u8>, Error> {
        self.issuing_crl_named(ISSUING_CRL_NAME)
            .unwrap_or_else(|| Err(Error::Corrupt("no first issuing CA".into())))
    }

    /// Reissues the server certificate now, with a new key and the same SANs.
    pub fn reissue_server_cert(&self) -> Result<(), Error> {
        let (sans, _) = self.server_cert_sans()?;
        self.write_server_cert(&sans)?;
        tracing::info!(sans = ?sans, "reissued the server certificate");
        Ok(())
    }

    /// The current server certificate's DNS and IP SANs, and its expiry.
    fn server_cert_sans(&self) -> Result<(Vec<String>, OffsetDateTime), Error> {
        let pem = read(&self.paths.server_cert())?;
        let der = CertificateDer::from_pem_slice(&pem).map_err(|e| Error::DataDir {
            path: self.paths.server_cert(),
            reason: format!("no certificate in it: {e}"),
        })?;
        let (_, cert) = X509Certificate::from_der(&der).map_err(|e| Error::DataDir {
            path: self.paths.server_cert(),
            reason: format!("does not parse: {e}"),
        })?;
        let sans = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some(d.to_string()),
                        GeneralName::IPAddress(ip) => ip_string(ip),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((sans, cert.validity().not_after.to_datetime()))
    }

    fn write_server_cert(&self, sans: &[String]) -> Result<(), Error> {
        let key = KeyPair::generate()?;
        let cert = self.ca.issue_server(&key, sans)?;
        // Key first: a crash between the two leaves a key that matches no
        // certificate, which the loader reports, never a silent mismatch.
        write_file(
            &self.paths.server_key(),
            key.serialize_pem().as_bytes(),
            true,
        )?;
        write_file(&self.paths.server_cert(), cert.chain_pem.as_bytes(), false)?;
        Ok(())
    }
}

fn server_sans(opts: &InitOptions) -> Vec<String> {
    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    for s in &opts.server_sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    sans
}

fn ip_string(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv4Addr::from(b).to_string()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| std::net::Ipv6Addr::from(b).to_string()),
        _ => None,
    }
}

fn load_ca(paths: &Paths, opts: &InitOptions) -> Result<Ca, Error> {
    let pin = opts.pin.as_ref().or(opts.custody.pin());
    let (root_der, root_pem) = read_cert(&paths.ca_cert())?;
    let root = if keys::exists(&paths.root_key()) {
        Some(load_signer(
            &paths.ca_cert(),
            &paths.root_key(),
            ROOT_CRL_NAME,
            None,
            pin,
        )?)
    } else {
        None
    };
    Ok(Ca {
        root_der,
        root_pem,
        root,
        issuing: std::sync::RwLock::new(std::sync::Arc::new(crate::rollover::load_generations(
            paths, pin,
        )?)),
        status_url: opts.status_url.clone(),
        clock: Default::default(),
    })
}

impl Authority {
    /// [`Registry::seal_audit`](crate::Registry::seal_audit) with the issuing CA's key: what is older
    /// than `settle` is sealed, up to `max` entries.
    pub fn seal_audit(
        &self,
        settle: time::Duration,
        max: usize,
    ) -> Result<Option<Checkpoint>, Error> {
        let now = OffsetDateTime::now_utc();
        let issuing = self.ca.issuing();
        let sign = |m: &[u8]| {
            rcgen::SigningKey::sign(issuing.key(), m)
                .map_err(|e| Error::Certificate(format!("signing an audit checkpoint: {e}")))
        };
        self.registry.seal_audit(now - settle, max, now, &sign)
    }

    /// [`Registry::verify_audit`](crate::Registry::verify_audit), checkpoints checked against the
    /// issuing CAs' public keys (each generation sealed while it was
    /// current).
    pub fn verify_audit(&self) -> Result<Verification, Error> {
        let mut keys = Vec::new();
        for g in self.ca.issuing_all().iter() {
            let spki = x509_parser::parse_x509_certificate(&g.der)
                .map(|(_, c)| c.public_key().subject_public_key.data.to_vec())
                .map_err(|e| Error::Certificate(format!("the issuing CA's certificate: {e}")))?;
            keys.push(ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_ASN1,
                spki,
            ));
        }
        self.registry
            .verify_audit(&|m: &[u8], sig: &[u8]| keys.iter().any(|k| k.verify(m, sig).is_ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::{new_key_and_csr, validate_csr, KeyKind};

    fn device(id: &str) -> Identity {
        Identity {
            role: Role::Device,
            id: DeviceId::try_new(id).unwrap(),
        }
    }

    #[test]
    fn init_writes_private_keys_and_reloads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let first = Authority::open_or_init(&dir, &InitOptions::default()).unwrap();
        let paths = first.paths.clone();
        for key in [
            paths.root_key(),
            paths.issuing_key(),
            paths.server_key(),
            paths.admin_key(),
        ] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let root = first.ca.root_der().clone();
        let admin = first
            .registry
            .device(&DeviceId::try_new("admin").unwrap())
            .unwrap();
        assert_eq!(admin.role, Role::Admin);
        drop(first);

        // A second start reuses everything.
        let second = Authority::open_or_init(&dir, &InitOptions::default()).unwrap();
        assert_eq!(second.ca.root_der(), &root);
        assert_eq!(second.registry.device_count(), 1);
    }

    #[test]
    fn half_written_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        Authority::open_or_init(&dir, &InitOptions::default()).unwrap();
        fs::remove_file(dir.join(MARKER)).unwrap();
        let err = Authority::open_or_init(&dir, &InitOptions::default()).unwrap_err();
        assert!(err.to_string().contains("interrupted"), "{err}");
    }

    #[test]
    fn corrupt_or_exposed_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let auth = Authority::open_or_init(&dir, &InitOptions::default()).unwrap();
        let paths = auth.paths.clone();
        drop(auth);

        fs::set_permissions(paths.issuing_key(), fs::Permissions::from_mode(0o644)).unwrap();
        let err = Authority::open_or_init(&dir, &InitOptions::default()).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");

        fs::set_permissions(paths.issuing_key(), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(paths.issuing_key(), "garbage").unwrap();
        let err = Authority::open_or_init(&dir, &InitOptions::default()).unwrap_err();
        assert!(err.to_string().contains("issuing.key"), "{err}");
    }

    #[test]
    fn issued_certificate_chains_to_the_root_with_webpki() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let (_key, csr) = new_key_and_csr(KeyKind::EcdsaP256, "whatever-the-csr-says").unwrap();
        let csr = validate_csr(csr.as_bytes()).unwrap();
        let cert = auth
            .ca
            .issue_for_csr(&csr, &device("dev-1"), DEFAULT_CERT_LIFETIME)
            .unwrap();

        let anchor = webpki::anchor_from_trusted_cert(auth.ca.root_der()).unwrap();
        let der = CertificateDer::from(cert.der.clone());
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        let now = rustls_pki_types::UnixTime::now();
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[auth.ca.issuing_der().clone()],
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();
        // Not for servers.
        assert!(ee
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &[webpki::anchor_from_trusted_cert(auth.ca.root_der()).unwrap()],
                &[auth.ca.issuing_der().clone()],
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .is_err());

        let info = inspect_certificate(&cert.der).unwrap();
        assert_eq!(info.identity, Some(device("dev-1")));
        assert_eq!(info.serial, cert.serial);
        assert!(!info.is_ca);
        assert_eq!(info.serial.as_bytes().len(), 20);
        assert_eq!(
            (info.not_after - info.not_before).whole_days(),
            DEFAULT_CERT_LIFETIME.whole_days()
        );
        let (_, parsed) = X509Certificate::from_der(&cert.der).unwrap();
        assert_eq!(parsed.subject().to_string(), "CN=dev-1");
    }

    #[test]
    fn server_cert_is_renewed_for_a_new_san() {
        let tmp = tempfile::tempdir().unwrap();
        let auth = Authority::open_or_init(tmp.path(), &InitOptions::default()).unwrap();
        let sans = server_sans(&InitOptions::default());
        assert!(!auth.renew_server_cert_if_needed(&sans).unwrap());
        let mut more = sans.clone();
        more.push("broker.example".into());
        assert!(auth.renew_server_cert_if_needed(&more).unwrap());
        assert!(!auth.renew_server_cert_if_needed(&more).unwrap());
    }
}
