//! Root ceremonies: what only the root signs, done where the root is.
//!
//! With `fleetgate ca init --root-out ROOTDIR` the root's key (and a copy of
//! its certificate) lives in ROOTDIR only: a USB stick in a safe, or a token
//! of its own. A node without it serves everything else, and the few things
//! only the root signs are prepared here, at a ceremony:
//! - at `ca init`: the issuing CA, a delegated OCSP responder that answers
//!   for the root (the issuing CA's and manufacturer CAs' status) for a
//!   year, and the root's CRL (valid a year);
//! - `fleetgate ca crl --root-dir`: the root's CRL anew, after a
//!   manufacturer CA is revoked (and before the last one runs out);
//! - `fleetgate ca responder --root-dir`: the root's responder anew;
//! - `fleetgate manufacturer create --root-dir`: a manufacturer CA, from a
//!   request the node prepared with a key it holds;
//! - `fleetgate ca rollover --root-dir`: the next issuing CA, the same way
//!   (see [`crate::rollover`]).
//!
//! ```text
//! ROOTDIR/                  0700
//!   root.key                0600 (or root.key.uri: a key in a token)
//!   ca.crt                  the root's certificate
//! ```

use std::path::{Path, PathBuf};

use rcgen::PublicKeyData;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{self, Paths, Signer, ROOT_CRL_NAME};
use crate::files::{io, read_cert, write_file};
use crate::keys::{self, Custody, Pin};
use crate::registry::Listed;
use crate::Error;

/// How long the root's delegated responder certificate lasts.
pub const ROOT_RESPONDER_LIFETIME: Duration = Duration::days(365);
/// How long a CRL the root signs at a ceremony is valid.
pub const ROOT_CRL_VALIDITY: Duration = Duration::days(365);
/// A node warns this long before either runs out.
pub const CEREMONY_DUE_BEFORE: Duration = Duration::days(30);

/// Where an offline root is kept.
#[derive(Clone, Debug)]
pub struct RootDir {
    pub dir: PathBuf,
}

impl RootDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// `root.key` (or `.uri`); in a data dir whose root is online (the
    /// default start), `ca/root.key`.
    pub fn key(&self) -> PathBuf {
        let offline = self.dir.join("root.key");
        let online = self.dir.join("ca/root.key");
        if !keys::exists(&offline) && keys::exists(&online) {
            return online;
        }
        offline
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Makes the dir (0700) for a new root, refusing one that holds a root.
    pub fn create(&self) -> Result<(), Error> {
        if keys::exists(&self.key()) || self.cert().exists() {
            return Err(Error::DataDir {
                path: self.dir.clone(),
                reason: "already holds a root (root.key or ca.crt): use another dir, or move \
                         it away to make a new root"
                    .into(),
            });
        }
        ca::mkdir_private(&self.dir)
    }

    /// Opens the root for a ceremony.
    pub fn open(&self, pin: Option<&Pin>) -> Result<Signer, Error> {
        if !keys::exists(&self.key()) {
            return Err(Error::DataDir {
                path: self.dir.clone(),
                reason: "no root.key (or root.key.uri) here: not a root dir made by \
                         `fleetgate ca init --root-out`"
                    .into(),
            });
        }
        ca::load_signer(&self.cert(), &self.key(), ROOT_CRL_NAME, None, pin)
    }
}

/// Checks that the data dir at `paths` belongs to `root`.
pub fn same_root(root: &Signer, paths: &Paths) -> Result<(), Error> {
    let (theirs, _) = read_cert(&paths.ca_cert())?;
    if theirs.as_ref() != root.der.as_ref() {
        return Err(Error::DataDir {
            path: paths.ca_cert(),
            reason: "is not the certificate of the root in the root dir: this data dir \
                     belongs to another CA"
                .into(),
        });
    }
    Ok(())
}

/// The root's delegated OCSP responder: EKU OCSPSigning and
/// id-pkix-ocsp-nocheck, for [`ROOT_RESPONDER_LIFETIME`].
pub fn root_responder(root: &Signer, key: &impl PublicKeyData) -> Result<ca::IssuedCert, Error> {
    let params = ca::ocsp_responder_params("fleetgate root OCSP responder");
    ca::sign(root, params, key, ROOT_RESPONDER_LIFETIME)
}

/// The root's CRL listing `revoked` (manufacturer CAs), numbered by the
/// time it is signed in milliseconds (so a later ceremony's is greater),
/// valid for [`ROOT_CRL_VALIDITY`].
pub fn root_crl(root: &Signer, revoked: &[Listed]) -> Result<(Vec<u8>, u64), Error> {
    let ms = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let number = u64::try_from(ms).unwrap_or(1).max(1);
    let der = ca::crl_valid_for(root, revoked, number, ROOT_CRL_VALIDITY)?;
    Ok((der, number))
}

/// The node's share of the first ceremony (`ca init --root-out`), written
/// into its data dir: a responder for the root (its key made where the
/// node's keys are made) and the root's CRL listing `revoked`.
pub fn sign_for_node(
    root: &Signer,
    paths: &Paths,
    custody: &Custody,
    revoked: &[Listed],
) -> Result<(), Error> {
    same_root(root, paths)?;
    ca::mkdir_private(&paths.dir.join("ocsp"))?;
    let label = keys::fresh_label("root-ocsp-signer");
    let key = keys::generate(&paths.root_ocsp_key(), &label, custody)?;
    let cert = root_responder(root, &key)?;
    write_file(&paths.root_ocsp_cert(), cert.chain_pem.as_bytes(), false)?;
    let (crl, _) = root_crl(root, revoked)?;
    write_file(&paths.root_crl(), &crl, false)?;
    tracing::info!(
        responder_until = %cert.not_after,
        "signed the root's OCSP responder and CRL for {}",
        paths.dir.display()
    );
    Ok(())
}

/// Certifies the root responder key the data dir at `paths` keeps for
/// another [`ROOT_RESPONDER_LIFETIME`] (`fleetgate ca responder`).
pub fn renew_responder(
    root: &Signer,
    paths: &Paths,
    node_pin: Option<&Pin>,
) -> Result<ca::IssuedCert, Error> {
    same_root(root, paths)?;
    let key = keys::load(&paths.root_ocsp_key(), node_pin)?;
    let cert = root_responder(root, &key)?;
    write_file(&paths.root_ocsp_cert(), cert.chain_pem.as_bytes(), false)?;
    Ok(cert)
}

/// Signs a manufacturer CA for the key in `csr` (a request the node made
/// with a key it holds), as [`ca::Ca::issue_manufacturer_ca`] would with the
/// root online.
pub fn sign_manufacturer_csr(
    root: &Signer,
    csr_pem: &str,
    name: &str,
    status_url: Option<&str>,
    lifetime: Duration,
) -> Result<ca::IssuedCert, Error> {
    let csr = crate::csr::validate_csr(csr_pem.as_bytes())?;
    let mut cert = ca::sign(
        root,
        ca::manufacturer_ca_params(name, status_url),
        &csr.public_key,
        lifetime,
    )?;
    cert.manufacturer = Some(name.to_owned());
    Ok(cert)
}

/// Signs the next issuing CA (`common_name`, e.g. "fleetgate issuing CA
/// 2") for the key in `csr`, which the node made (`fleetgate ca rollover`).
pub fn sign_issuing_csr(
    root: &Signer,
    csr_pem: &str,
    common_name: &str,
    status_url: Option<&str>,
) -> Result<ca::IssuedCert, Error> {
    let csr = crate::csr::validate_csr(csr_pem.as_bytes())?;
    let params = ca::issuing_ca_params(common_name, OffsetDateTime::now_utc(), status_url)?;
    ca::sign(root, params, &csr.public_key, ca::ISSUING_LIFETIME)
}

/// When the certificate in the PEM file at `path` runs out.
pub fn not_after(path: &Path) -> Result<OffsetDateTime, Error> {
    let (der, _) = read_cert(path)?;
    let (_, c) = X509Certificate::from_der(&der).map_err(|e| Error::DataDir {
        path: path.to_owned(),
        reason: format!("does not parse: {e}"),
    })?;
    Ok(c.validity().not_after.to_datetime())
}

/// When the CRL (DER) at `path` says it must be replaced.
pub fn crl_next_update(path: &Path) -> Result<Option<OffsetDateTime>, Error> {
    let der = std::fs::read(path).map_err(|e| io(path, e))?;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
        .map_err(|e| Error::DataDir {
            path: path.to_owned(),
            reason: format!("does not parse as a CRL: {e}"),
        })?;
    Ok(crl.next_update().map(|t| t.to_datetime()))
}
