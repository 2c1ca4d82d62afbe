//! Files in the data dir: read with a path in every error, written
//! atomically and durably, private ones 0600 from the start.

use std::fs;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::KeyPair;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::Error;

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|e| io(path, e))
}

pub(crate) fn read_cert(path: &Path) -> Result<(CertificateDer<'static>, String), Error> {
    let pem = String::from_utf8(read(path)?).map_err(|_| Error::DataDir {
        path: path.to_owned(),
        reason: "not PEM text".into(),
    })?;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::DataDir {
        path: path.to_owned(),
        reason: format!("no certificate in it: {e}"),
    })?;
    Ok((der, pem))
}

pub(crate) fn read_key(path: &Path) -> Result<KeyPair, Error> {
    let pem = String::from_utf8(read(path)?).map_err(|_| Error::DataDir {
        path: path.to_owned(),
        reason: "not PEM text".into(),
    })?;
    KeyPair::from_pem(&pem).map_err(|e| Error::DataDir {
        path: path.to_owned(),
        reason: format!("not a usable private key: {e}"),
    })
}

/// Refuses a private key that others can read.
pub(crate) fn check_private(path: &Path) -> Result<(), Error> {
    let mode = fs::metadata(path)
        .map_err(|e| io(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(Error::DataDir {
            path: path.to_owned(),
            reason: format!(
                "private key is accessible to others (mode {:04o}); run chmod 600 on it",
                mode & 0o7777
            ),
        });
    }
    Ok(())
}

pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a file atomically and durably: temp file, fsync, rename, fsync dir.
/// Private files are created 0600 from the start, never chmod-ed after.
pub fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))?;
    Ok(())
}

/// The file that marks a data dir as initialized (and with what).
pub(crate) const MARKER: &str = "fleetgate.json";

/// Where everything lives inside a data dir.
#[derive(Clone, Debug)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn marker(&self) -> PathBuf {
        self.dir.join(MARKER)
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn root_key(&self) -> PathBuf {
        self.dir.join("ca/root.key")
    }
    pub fn issuing_cert(&self) -> PathBuf {
        self.dir.join("ca/issuing.crt")
    }
    pub fn issuing_key(&self) -> PathBuf {
        self.dir.join("ca/issuing.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn admin_cert(&self) -> PathBuf {
        self.dir.join("admin.crt")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin.key")
    }
    pub fn registry(&self) -> PathBuf {
        self.dir.join("registry")
    }
    pub fn ocsp_cert(&self) -> PathBuf {
        self.dir.join("ocsp/signer.crt")
    }
    pub fn ocsp_key(&self) -> PathBuf {
        self.dir.join("ocsp/signer.key")
    }
    /// The root's delegated OCSP responder, certified at a root ceremony
    /// (only where the root is offline).
    pub fn root_ocsp_cert(&self) -> PathBuf {
        self.dir.join("ocsp/root-signer.crt")
    }
    pub fn root_ocsp_key(&self) -> PathBuf {
        self.dir.join("ocsp/root-signer.key")
    }
    /// The root's CRL as signed at its last ceremony (where the root is
    /// offline).
    pub fn root_crl(&self) -> PathBuf {
        self.dir.join("ca/root.crl")
    }
    pub fn cmp_cert(&self) -> PathBuf {
        self.dir.join("cmp/signer.crt")
    }
    pub fn cmp_key(&self) -> PathBuf {
        self.dir.join("cmp/signer.key")
    }
    pub fn manufacturer_dir(&self) -> PathBuf {
        self.dir.join("ca/manufacturers")
    }
    pub fn manufacturer_cert(&self, name: &str) -> PathBuf {
        self.manufacturer_dir().join(format!("{name}.crt"))
    }
    pub fn manufacturer_key(&self, name: &str) -> PathBuf {
        self.manufacturer_dir().join(format!("{name}.key"))
    }
}

/// Makes a 0700 dir (and its parents).
pub(crate) fn mkdir_private(dir: &Path) -> Result<(), Error> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))
}
