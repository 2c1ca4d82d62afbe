//! Where each CA and signer key lives, and signing with it wherever that is.
//!
//! A key fleetgate keeps at `<name>.key` in a data dir (or a root dir) is
//! either that file (PEM, 0600) or, beside it, `<name>.key.uri`: the RFC
//! 7512 URI of a key in a PKCS#11 token, which is all the data dir then
//! holds of it. Everything that signs (certificates, CRLs, OCSP and CMP
//! responses, audit checkpoints) takes a [`CaKey`] and cannot tell which.

pub mod report;
pub mod token;
pub mod uri;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm, SigningKey};

use crate::files::{check_private, io, read_key, write_file};
use crate::Error;
pub use token::{Pin, TokenKey};
pub use uri::TokenUri;

/// Where new keys are made.
#[derive(Clone, Debug, Default)]
pub enum Custody {
    /// Files in the data dir, 0600 (the default).
    #[default]
    Files,
    /// A PKCS#11 token: keys are made there, non-extractable, and the data
    /// dir records their URIs. `base` names the token (and the issuing CA's
    /// object); other keys take their own labels in the same token.
    Token { base: TokenUri, pin: Pin },
}

impl Custody {
    /// The token's PIN, if keys are in one.
    pub fn pin(&self) -> Option<&Pin> {
        match self {
            Custody::Files => None,
            Custody::Token { pin, .. } => Some(pin),
        }
    }
}

/// A signing key: in memory from a file, or in a token.
#[derive(Clone)]
pub struct CaKey(Arc<Held>);

enum Held {
    File(KeyPair),
    Token(TokenKey),
}

impl std::fmt::Debug for CaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        write!(f, "CaKey({})", self.location())
    }
}

impl CaKey {
    pub fn from_keypair(key: KeyPair) -> Self {
        Self(Arc::new(Held::File(key)))
    }

    pub fn from_token(key: TokenKey) -> Self {
        Self(Arc::new(Held::Token(key)))
    }

    /// A new P-256 key in memory.
    pub fn generate_in_memory() -> Result<Self, Error> {
        Ok(Self::from_keypair(KeyPair::generate()?))
    }

    /// The key's private half, if it is in memory (and so could be written
    /// to a file); `None` in a token.
    pub fn in_memory(&self) -> Option<&KeyPair> {
        match &*self.0 {
            Held::File(k) => Some(k),
            Held::Token(_) => None,
        }
    }

    /// "file", or the token URI: what `fleetgate check` and the logs say.
    pub fn location(&self) -> String {
        match &*self.0 {
            Held::File(_) => "file".into(),
            Held::Token(t) => t.uri.to_string(),
        }
    }

    /// The public key's raw bytes (an EC point): what certificates carry.
    pub fn public_key_raw(&self) -> &[u8] {
        self.der_bytes()
    }

    /// A secret only holders of this key can compute, the same on every
    /// node that holds it: the bus seal's key material. From a file, the
    /// key's own bytes (as before tokens); in a token, an HMAC by a secret
    /// kept beside the key there.
    pub fn seal_secret(&self) -> Result<Vec<u8>, Error> {
        match &*self.0 {
            Held::File(k) => Ok(k.serialize_der()),
            Held::Token(t) => t.derive_secret(
                &format!("{}-seal", t.uri.object),
                b"fleetgate seal secret v1",
            ),
        }
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match &*self.0 {
            Held::File(k) => k.der_bytes(),
            Held::Token(t) => &t.public,
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match &*self.0 {
            Held::File(k) => k.algorithm(),
            Held::Token(_) => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match &*self.0 {
            Held::File(k) => k.sign(msg),
            Held::Token(t) => t.sign(msg).map_err(|e| {
                tracing::error!(error = %e, "signing through the token failed");
                rcgen::Error::RemoteKeyError
            }),
        }
    }
}

/// A token label for a new key: `prefix`, the time, and random bits, so
/// that nodes sharing a token never pick the same one.
pub fn fresh_label(prefix: &str) -> String {
    let mut r = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    format!(
        "{prefix}-{}-{}",
        time::OffsetDateTime::now_utc().unix_timestamp(),
        crate::id::hex(&r)
    )
}

/// `<path>.uri`: where a key's token URI is recorded.
pub fn uri_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".uri");
    PathBuf::from(s)
}

/// Where the key kept at `path` is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kept {
    File(PathBuf),
    Token(TokenUri),
    Missing,
}

/// Where the key kept at `path` is, without opening it.
pub fn kept(path: &Path) -> Result<Kept, Error> {
    let uri = uri_path(path);
    if uri.exists() {
        let text = std::fs::read_to_string(&uri).map_err(|e| io(&uri, e))?;
        return Ok(Kept::Token(TokenUri::parse(text.trim()).map_err(|e| {
            Error::DataDir {
                path: uri.clone(),
                reason: e.to_string(),
            }
        })?));
    }
    if path.exists() {
        return Ok(Kept::File(path.to_owned()));
    }
    Ok(Kept::Missing)
}

/// Whether a key is kept at `path` (in either form).
pub fn exists(path: &Path) -> bool {
    !matches!(kept(path), Ok(Kept::Missing))
}

/// Opens the key kept at `path`: the file (which must be 0600), or the
/// token key its `.uri` names, with `pin` (or the URI's pin-source).
pub fn load(path: &Path, pin: Option<&Pin>) -> Result<CaKey, Error> {
    match kept(path)? {
        Kept::File(p) => {
            check_private(&p)?;
            Ok(CaKey::from_keypair(read_key(&p)?))
        }
        Kept::Token(uri) => {
            let pin = match (pin, &uri.pin_source) {
                (Some(p), _) => p.clone(),
                (None, Some(source)) => Pin::from_file(source)?,
                (None, None) => {
                    return Err(Error::DataDir {
                        path: uri_path(path),
                        reason: format!(
                            "the key is in token {:?}: give its PIN with --pin-file \
                             (or FLEETGATE_PIN_FILE)",
                            uri.token
                        ),
                    })
                }
            };
            Ok(CaKey::from_token(TokenKey::open(&uri, &pin)?))
        }
        Kept::Missing => Err(Error::DataDir {
            path: path.to_owned(),
            reason: "no such key (neither the file nor a .uri beside it)".into(),
        }),
    }
}

/// Makes a new key under `custody` and records it at `path`: the PEM
/// there (0600), or the token object `object` and its URI at `path.uri`.
pub fn generate(path: &Path, object: &str, custody: &Custody) -> Result<CaKey, Error> {
    match custody {
        Custody::Files => {
            let key = KeyPair::generate()?;
            write_file(path, key.serialize_pem().as_bytes(), true)?;
            Ok(CaKey::from_keypair(key))
        }
        Custody::Token { base, pin } => {
            let uri = base.with_object(object);
            let key = TokenKey::generate(&uri, pin)?;
            record_uri(path, &uri)?;
            Ok(CaKey::from_token(key))
        }
    }
}

/// Records `uri` as where the key kept at `path` is (and no file).
pub fn record_uri(path: &Path, uri: &TokenUri) -> Result<(), Error> {
    write_file(&uri_path(path), format!("{uri}\n").as_bytes(), true)?;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path, e)),
    }
}

/// Writes a key that is in memory to `path` (0600).
pub fn write_pem(path: &Path, key: &CaKey) -> Result<(), Error> {
    let k = key.in_memory().ok_or_else(|| {
        Error::Crypto(format!(
            "the key for {} is in a token and cannot be written to a file",
            path.display()
        ))
    })?;
    write_file(path, k.serialize_pem().as_bytes(), true)
}

/// A key waiting at `path` for a certificate a root ceremony signs: the
/// one kept there (asked again; opened with `pin`), or a new one made under
/// `custody`
/// (`label_prefix`-<time>-<random> in a token); and a PKCS#10 request
/// (PEM) for it naming `common_name`.
pub fn pending_request(
    path: &Path,
    label_prefix: &str,
    common_name: String,
    custody: &Custody,
    pin: Option<&Pin>,
) -> Result<String, Error> {
    if let Some(dir) = path.parent() {
        crate::files::mkdir_private(dir)?;
    }
    let key = if exists(path) {
        load(path, pin)?
    } else {
        generate(path, &fresh_label(label_prefix), custody)?
    };
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    Ok(params.serialize_request(&key)?.pem()?)
}

/// Moves the key kept at `from` to `to` (a file, or a token key's URI),
/// once its certificate is in hand. Returns the key's PEM when it is a
/// file.
pub fn move_kept(from: &Path, to: &Path) -> Result<Option<String>, Error> {
    match kept(from)? {
        Kept::File(p) => {
            let pem = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
            write_file(to, pem.as_bytes(), true)?;
            std::fs::remove_file(&p).map_err(|e| io(&p, e))?;
            Ok(Some(pem))
        }
        Kept::Token(uri) => {
            record_uri(to, &uri)?;
            let _ = std::fs::remove_file(uri_path(from));
            Ok(None)
        }
        Kept::Missing => Err(Error::Corrupt(format!(
            "the pending key {} vanished",
            from.display()
        ))),
    }
}
