//! What the registry stores of manufacturers, claims and challenges (the
//! operations on them are `crate::manufacturer`'s).

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::lifecycle::Revocation;
use crate::{DeviceId, Error, Serial};

/// Who made a manufacturer CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaKind {
    /// Issued by the fleetgate root; fleetgate holds its key too.
    Issued,
    /// The manufacturer's own CA, registered with proof of possession.
    Registered,
}

/// What happens to a device of this manufacturer on its first connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JitPolicy {
    /// Registered active and admitted at once.
    AutoActivate,
    /// Registered `pending` and refused until an operator approves it.
    Pending,
}

impl JitPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            JitPolicy::AutoActivate => "auto-activate",
            JitPolicy::Pending => "pending",
        }
    }
}

impl std::fmt::Display for JitPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for JitPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto-activate" => Ok(JitPolicy::AutoActivate),
            "pending" => Ok(JitPolicy::Pending),
            other => Err(Error::InvalidInput {
                reason: format!("unknown policy {other:?} (auto-activate, pending)"),
            }),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ManufacturerStatus {
    Active,
    Revoked,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManufacturerRecord {
    pub name: DeviceId,
    pub kind: CaKind,
    pub policy: JitPolicy,
    pub status: ManufacturerStatus,
    pub revocation: Option<Revocation>,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The CA's subject, RFC 4514: the issuer its certificates carry.
    pub subject: String,
    /// SHA-256 of the CA's SubjectPublicKeyInfo, hex: how admission finds
    /// the manufacturer on a verified chain.
    pub spki_sha256: String,
    /// The CA certificate's serial.
    pub serial: Serial,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Most devices it may register just in time ([`DEFAULT_JIT_QUOTA`]
    /// when unset).
    #[serde(default)]
    pub jit_quota: Option<u64>,
    /// Devices it registered just in time so far.
    #[serde(default)]
    pub jit_registered: u64,
}

/// Devices a manufacturer may register just in time unless told otherwise.
pub const DEFAULT_JIT_QUOTA: u64 = 100_000;

impl ManufacturerRecord {
    /// Its just-in-time quota in force.
    pub fn jit_quota(&self) -> u64 {
        self.jit_quota.unwrap_or(DEFAULT_JIT_QUOTA)
    }

    pub fn ca_der(&self) -> Result<CertificateDer<'static>, Error> {
        CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(|e| Error::Corrupt(format!("manufacturer {} CA: {e}", self.name)))
    }
}

/// A factory claim: a shared certificate that may only ask for device
/// certificates, `uses_left` more times.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRecord {
    pub id: DeviceId,
    pub uses_left: u32,
    pub used: u32,
    /// Devices provisioned through it belong to this manufacturer (and are
    /// signed by its CA when fleetgate issued it).
    pub manufacturer: Option<String>,
}

/// A proof-of-possession challenge for registering a manufacturer's CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub code: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}
