use std::path::PathBuf;

/// Everything provisioning can refuse or fail at.
///
/// Each variant carries what a caller needs to say why; the network side maps
/// them to wire codes in one place (`broker::api::ApiError`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid id: {reason}")]
    InvalidId { reason: String },

    #[error("invalid input: {reason}")]
    InvalidInput { reason: String },

    #[error("malformed csr: {reason}")]
    MalformedCsr { reason: String },

    #[error("csr signature does not verify: the request was not signed by the key it carries")]
    CsrBadSignature,

    #[error("csr signature algorithm {algorithm} is refused: sign with SHA-256 or better (ECDSA, RSA) or Ed25519, never SHA-1 or MD5")]
    CsrWeakSignature { algorithm: String },

    #[error("unsupported or weak key: {reason}")]
    UnsupportedKey { reason: String },

    #[error("input too large: {len} bytes, at most {max}")]
    TooLarge { len: usize, max: usize },

    #[error("device {id} not found")]
    NotFound { id: String },

    #[error("certificate {serial} not found")]
    CertNotFound { serial: String },

    #[error("manufacturer {name} not found")]
    ManufacturerNotFound { name: String },

    #[error("manufacturer {name} is revoked")]
    ManufacturerRevoked { name: String },

    #[error("proof of possession: {reason}")]
    ProofOfPossession { reason: String },

    #[error("claim {id} has no uses left")]
    ClaimExhausted { id: String },

    #[error("certificate {serial} of issuer {issuer:?} is already registered")]
    CertExists { serial: String, issuer: String },

    #[error("quota exceeded: {reason}")]
    QuotaExceeded { reason: String },

    #[error("{id} already exists")]
    AlreadyExists { id: String },

    #[error("device {id} is {status}: {action} is not allowed")]
    InvalidTransition {
        id: String,
        status: &'static str,
        action: &'static str,
    },

    #[error("data dir {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("registry storage: {0}")]
    Storage(String),

    /// The shared store cannot be reached or has no quorum: nothing was
    /// written.
    #[error("registry storage unavailable: {0}")]
    Unavailable(String),

    /// This node's clock is too far from the cluster's to date a
    /// certificate: what it differs from, and by how much.
    #[error("this node issues no certificate while its clock is off: {0}")]
    ClockSkew(String),

    #[error("registry record is corrupt: {0}")]
    Corrupt(String),

    #[error("certificate: {0}")]
    Certificate(String),

    /// Something only the root signs, asked of a node whose root is kept
    /// offline.
    #[error("the root CA's key is offline (not on this node): {what} needs it; run `{ceremony}` where the root is")]
    RootOffline { what: String, ceremony: String },

    #[error("crypto: {0}")]
    Crypto(String),

    /// Something the registry did not keep (written by an older version).
    #[error("not kept: {what}")]
    NotKept { what: String },
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Error::Certificate(e.to_string())
    }
}
