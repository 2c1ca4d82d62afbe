//! Keys that live in a PKCS#11 token (an HSM, SoftHSM2): found or made by
//! URI, used only to sign; their private halves never leave the token.
//!
//! Each module is loaded and initialized once per process; each key holds
//! a few sessions of its own (a PKCS#11 session is one thread's at a time,
//! so one per core lets signatures run side by side), and a login on one
//! session logs the application in on all of them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

use super::uri::TokenUri;
use crate::Error;

/// DER of the P-256 curve's OID: the EC parameters of the keys we make.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A token's user PIN, read from a file the operator keeps (never the data
/// dir, never a log).
#[derive(Clone)]
pub struct Pin(Arc<AuthPin>);

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(..)")
    }
}

impl Pin {
    /// The first line of `path`, which only its owner may read.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| Error::Io {
            path: path.to_owned(),
            source: e,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Error::InvalidInput {
                reason: format!(
                    "PIN file {} is readable by others (mode {:04o}): chmod 600 it",
                    path.display(),
                    meta.permissions().mode() & 0o7777
                ),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_owned(),
            source: e,
        })?;
        let pin = text.lines().next().unwrap_or("").trim_end_matches('\r');
        if pin.is_empty() {
            return Err(Error::InvalidInput {
                reason: format!("PIN file {} is empty", path.display()),
            });
        }
        Ok(Self(Arc::new(AuthPin::from(pin.to_owned()))))
    }
}

fn token_error(uri: &TokenUri, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Crypto(format!("{what} in token {:?} ({uri}): {e}", uri.token))
}

/// The process's handle on `module`, loaded and initialized once.
fn module(path: &Path) -> Result<Pkcs11, Error> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut all = MODULES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(m) = all.get(path) {
        return Ok(m.clone());
    }
    let m = Pkcs11::new(path).map_err(|e| {
        Error::Crypto(format!(
            "cannot load the PKCS#11 module {}: {e}",
            path.display()
        ))
    })?;
    match m.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(Error::Crypto(format!(
                "the PKCS#11 module {} does not initialize: {e}",
                path.display()
            )))
        }
    }
    all.insert(path.to_owned(), m.clone());
    Ok(m)
}

/// A logged-in read-write session on the token `uri` names.
fn session(uri: &TokenUri, pin: &Pin) -> Result<Session, Error> {
    let m = module(&uri.module)?;
    let slots = m
        .get_slots_with_initialized_token()
        .map_err(|e| token_error(uri, "listing slots", e))?;
    let mut labels = Vec::new();
    for slot in slots {
        let info = m
            .get_token_info(slot)
            .map_err(|e| token_error(uri, "reading token info", e))?;
        let label = info.label().trim_end().to_owned();
        if label == uri.token {
            let s = m
                .open_rw_session(slot)
                .map_err(|e| token_error(uri, "opening a session", e))?;
            match s.login(UserType::User, Some(&pin.0)) {
                Ok(()) | Err(cryptoki::error::Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(cryptoki::error::Error::Pkcs11(RvError::PinIncorrect, _)) => {
                    return Err(token_error(uri, "logging in", "the PIN is wrong"))
                }
                Err(e) => return Err(token_error(uri, "logging in", e)),
            }
            return Ok(s);
        }
        labels.push(label);
    }
    Err(Error::Crypto(format!(
        "no token labelled {:?} in {} (tokens: {labels:?})",
        uri.token,
        uri.module.display()
    )))
}

/// A P-256 signing key in a token.
pub struct TokenKey {
    pub uri: TokenUri,
    /// One session per core: a signer takes a free one.
    sessions: Vec<Mutex<Session>>,
    next: std::sync::atomic::AtomicUsize,
    private: ObjectHandle,
    /// The uncompressed point (0x04 || X || Y).
    pub public: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey").field("uri", &self.uri).finish()
    }
}

fn label_template(class: ObjectClass, uri: &TokenUri) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(class),
        Attribute::Label(uri.object.as_bytes().to_vec()),
    ];
    if let Some(id) = &uri.id {
        t.push(Attribute::Id(id.clone()));
    }
    t
}

/// The uncompressed point from CKA_EC_POINT, which tokens give DER-wrapped
/// (an OCTET STRING, as PKCS#11 says) or, some of them, bare.
fn ec_point(raw: &[u8]) -> Option<Vec<u8>> {
    match raw {
        [0x04, 0x41, rest @ ..] if rest.len() == 65 && rest[0] == 0x04 => Some(rest.to_vec()),
        [0x04, ..] if raw.len() == 65 => Some(raw.to_vec()),
        _ => None,
    }
}

impl TokenKey {
    /// The key `uri` names, which must exist: exactly one private key of
    /// that label (and id), P-256, with its public key beside it.
    pub fn open(uri: &TokenUri, pin: &Pin) -> Result<Self, Error> {
        let s = session(uri, pin)?;
        let found = s
            .find_objects(&label_template(ObjectClass::PRIVATE_KEY, uri))
            .map_err(|e| token_error(uri, "finding the key", e))?;
        let private = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(Error::Crypto(format!(
                    "no private key labelled {:?} in token {:?} ({uri})",
                    uri.object, uri.token
                )))
            }
            more => {
                return Err(Error::Crypto(format!(
                    "{} private keys labelled {:?} in token {:?}: name one by id",
                    more.len(),
                    uri.object,
                    uri.token
                )))
            }
        };
        let public = s
            .find_objects(&label_template(ObjectClass::PUBLIC_KEY, uri))
            .map_err(|e| token_error(uri, "finding the public key", e))?;
        let Some(public) = public.first() else {
            return Err(Error::Crypto(format!(
                "key {:?} in token {:?} has no public key object beside it",
                uri.object, uri.token
            )));
        };
        let attrs = s
            .get_attributes(*public, &[AttributeType::EcParams, AttributeType::EcPoint])
            .map_err(|e| token_error(uri, "reading the public key", e))?;
        let mut params = None;
        let mut point = None;
        for a in attrs {
            match a {
                Attribute::EcParams(p) => params = Some(p),
                Attribute::EcPoint(p) => point = ec_point(&p),
                _ => {}
            }
        }
        if params.as_deref() != Some(&P256_PARAMS[..]) {
            return Err(Error::Crypto(format!(
                "key {:?} in token {:?} is not a P-256 key (fleetgate signs with ECDSA P-256)",
                uri.object, uri.token
            )));
        }
        let public = point
            .ok_or_else(|| Error::Crypto(format!("key {:?}: unreadable EC point", uri.object)))?;
        let mut sessions = vec![Mutex::new(s)];
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        for _ in 1..cores.clamp(1, 8) {
            // Object handles hold across an application's sessions.
            sessions.push(Mutex::new(session(uri, pin)?));
        }
        Ok(Self {
            uri: uri.clone(),
            sessions,
            next: Default::default(),
            private,
            public,
        })
    }

    /// Makes a P-256 key pair in the token under `uri`'s label: sensitive,
    /// never extractable, for signing only. Refuses a label already taken.
    pub fn generate(uri: &TokenUri, pin: &Pin) -> Result<Self, Error> {
        let s = session(uri, pin)?;
        let taken = s
            .find_objects(&label_template(ObjectClass::PRIVATE_KEY, uri))
            .map_err(|e| token_error(uri, "looking for the label", e))?;
        if !taken.is_empty() {
            return Err(Error::Crypto(format!(
                "token {:?} already has a key labelled {:?}: choose another object= or delete it",
                uri.token, uri.object
            )));
        }
        let label = uri.object.as_bytes().to_vec();
        let id = uri.id.clone().unwrap_or_else(|| {
            ring::digest::digest(&ring::digest::SHA256, &label).as_ref()[..16].to_vec()
        });
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Label(label.clone()),
            Attribute::Id(id.clone()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::KeyType(KeyType::EC),
            Attribute::Label(label),
            Attribute::Id(id),
        ];
        s.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
            .map_err(|e| token_error(uri, "generating a P-256 key", e))?;
        drop(s);
        Self::open(uri, pin)
    }

    /// A free session (the first one not in use, starting from a rotating
    /// place), or else waits for one.
    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        use std::sync::atomic::Ordering;
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(s) = self.sessions[(start + i) % n].try_lock() {
                return s;
            }
        }
        self.sessions[start % n]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// ECDSA over the SHA-256 of `msg`, DER-encoded (what X.509 carries).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        let digest = ring::digest::digest(&ring::digest::SHA256, msg);
        let raw = {
            let s = self.session();
            s.sign(&Mechanism::Ecdsa, self.private, digest.as_ref())
                .map_err(|e| token_error(&self.uri, "signing", e))?
        };
        if raw.len() != 64 {
            return Err(Error::Crypto(format!(
                "token signature is {} bytes, not the 64 of P-256",
                raw.len()
            )));
        }
        Ok(ecdsa_der(&raw[..32], &raw[32..]))
    }

    /// HMAC-SHA256 of `label` with the generic secret `object` beside this
    /// key in the token, made on first use (sensitive, never extractable):
    /// a secret every node with the token derives alike.
    pub fn derive_secret(&self, object: &str, label: &[u8]) -> Result<Vec<u8>, Error> {
        let s = self.session();
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(object.as_bytes().to_vec()),
        ];
        let found = s
            .find_objects(&template)
            .map_err(|e| token_error(&self.uri, "finding the seal secret", e))?;
        let key = match found.as_slice() {
            [k] => *k,
            [_, _, ..] => {
                return Err(Error::Crypto(format!(
                    "token {:?} has {} secrets labelled {object:?}: the nodes would seal \
                     differently; keep the oldest and delete the others",
                    self.uri.token,
                    found.len()
                )))
            }
            [] => s
                .generate_key(
                    &Mechanism::GenericSecretKeyGen,
                    &[
                        Attribute::Token(true),
                        Attribute::Private(true),
                        Attribute::Sensitive(true),
                        Attribute::Extractable(false),
                        Attribute::Sign(true),
                        Attribute::KeyType(KeyType::GENERIC_SECRET),
                        Attribute::ValueLen(32.into()),
                        Attribute::Label(object.as_bytes().to_vec()),
                    ],
                )
                .map_err(|e| token_error(&self.uri, "making the seal secret", e))?,
        };
        s.sign(&Mechanism::Sha256Hmac, key, label)
            .map_err(|e| token_error(&self.uri, "deriving the seal secret", e))
    }
}

/// ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }, from the raw
/// big-endian halves a token returns.
fn ecdsa_der(r: &[u8], s: &[u8]) -> Vec<u8> {
    fn integer(v: &[u8]) -> Vec<u8> {
        let v = match v.iter().position(|&b| b != 0) {
            Some(i) => &v[i..],
            None => &[0u8][..],
        };
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    }
    let mut body = integer(r);
    body.extend(integer(s));
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_der_matches_ring_s_verifier() {
        use ring::signature::{self, KeyPair as _};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let key = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        // Many signatures: some halves have a high bit or a leading zero.
        for i in 0..64u8 {
            let msg = [i; 7];
            let fixed = key.sign(&rng, &msg).unwrap();
            let der = ecdsa_der(&fixed.as_ref()[..32], &fixed.as_ref()[32..]);
            signature::UnparsedPublicKey::new(
                &signature::ECDSA_P256_SHA256_ASN1,
                key.public_key().as_ref(),
            )
            .verify(&msg, &der)
            .unwrap();
        }
    }

    #[test]
    fn ec_point_takes_wrapped_and_bare_points() {
        let mut bare = vec![0x04];
        bare.extend([7u8; 64]);
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend(&bare);
        assert_eq!(ec_point(&bare).unwrap(), bare);
        assert_eq!(ec_point(&wrapped).unwrap(), bare);
        assert!(ec_point(&[0x04, 0x01]).is_none());
    }
}
