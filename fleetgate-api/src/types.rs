//! The admin API's bodies: what a request carries and an answer holds, as
//! the server reads and writes them and a client sends and reads them.
//! Records the answers embed (a device, a manufacturer, an audit entry)
//! are the registry's own types, from `provisioning`.

use provisioning::manufacturer::ManufacturerRecord;
use provisioning::registry::DeviceView;
use provisioning::{Role, Serial};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollBody {
    pub id: String,
    /// PEM.
    pub csr: String,
    #[serde(default)]
    pub role: Option<Role>,
    #[serde(default)]
    pub manufacturer: Option<String>,
    #[serde(default)]
    pub lifetime_days: Option<u32>,
    /// A short-lived certificate: lifetime in seconds (instead of days).
    #[serde(default)]
    pub lifetime_seconds: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Enrolled {
    pub device: DeviceView,
    pub serial: Serial,
    /// The leaf then the issuing CA, PEM: what the device presents.
    pub chain_pem: String,
    /// The root CA, PEM: what the device trusts.
    pub ca_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    pub csr: String,
    #[serde(default)]
    pub lifetime_days: Option<u32>,
    #[serde(default)]
    pub lifetime_seconds: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub status: Option<String>,
    pub after: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    #[serde(default)]
    pub reason: Option<String>,
}

/// Which devices a bulk revocation takes: a list of ids, or a selector (a
/// manufacturer's devices, optionally only those with a certificate whose
/// validity began within a window: a production lot). Not both.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBatchBody {
    #[serde(default)]
    pub ids: Option<Vec<String>>,
    #[serde(default)]
    pub manufacturer: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub issued_after: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    pub issued_before: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Oldest first, from after this sequence number.
    pub after: Option<u64>,
    /// Newest first, from before this sequence number.
    pub before: Option<u64>,
    /// `newest` for newest first without a `before`.
    pub order: Option<String>,
    pub limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Stats {
    pub devices: usize,
    pub live_sessions: usize,
    #[serde(flatten)]
    pub counters: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub name: String,
    /// `auto-activate` (default) or `pending`.
    #[serde(default)]
    pub policy: Option<String>,
    /// Devices it may register just in time (default 100,000).
    #[serde(default)]
    pub jit_quota: Option<u64>,
    /// Where the root is offline: the manufacturer CA the root signed at a
    /// ceremony (PEM), for the key this node prepared
    /// (`POST /v1/manufacturers/{name}/request`).
    #[serde(default)]
    pub ca_cert_pem: Option<String>,
}

/// What a node prepared for a root ceremony to sign.
#[derive(Debug, Serialize, Deserialize)]
pub struct CeremonyRequest {
    /// A PKCS#10 request (PEM) made with the key the node holds.
    pub csr_pem: String,
    /// The node's status URL, for the certificate's CRL and OCSP pointers.
    pub status_url: Option<String>,
    /// The root's certificate, PEM: the ceremony checks its root is this.
    pub root_pem: String,
}

/// What a node prepared for a CA rollover: the next issuing CA's request.
#[derive(Debug, Serialize, Deserialize)]
pub struct RolloverRequest {
    pub generation: u32,
    /// The name the new issuing CA must have.
    pub common_name: String,
    pub csr_pem: String,
    pub status_url: Option<String>,
    pub root_pem: String,
}

/// A new issuing CA the root signed at a rollover ceremony.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloverBody {
    pub cert_pem: String,
}

/// A root CRL signed at a ceremony.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootCrlBody {
    /// The CRL, PEM (`-----BEGIN X509 CRL-----`).
    pub crl_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Created {
    pub manufacturer: ManufacturerRecord,
    /// The manufacturer CA's key, PEM: shown once, for the factory;
    /// `null` when it was made in a token (it never leaves it).
    pub key_pem: Option<String>,
    /// The fleetgate root, PEM.
    pub ca_pem: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaBody {
    pub jit_quota: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    /// The manufacturer's CA certificate, PEM.
    pub ca_pem: String,
    /// Proof of possession: a certificate with CN = the challenge, signed
    /// with the CA's key, PEM.
    #[serde(default)]
    pub verification_pem: Option<String>,
    #[serde(default)]
    pub policy: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchEntry {
    /// What the entry is reported by (a file name); the id if absent.
    #[serde(default)]
    pub name: Option<String>,
    pub id: String,
    /// PEM.
    pub csr: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    /// Sign with this manufacturer's CA (one fleetgate issued); the
    /// issuing CA when absent.
    #[serde(default)]
    pub manufacturer: Option<String>,
    #[serde(default)]
    pub lifetime_days: Option<u32>,
    pub items: Vec<BatchEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BatchResult {
    pub name: String,
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub serial: Option<Serial>,
    /// The leaf then its CA, PEM.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub chain_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<ErrorDetail>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BatchReport {
    pub issued: usize,
    pub failed: usize,
    /// The fleetgate root, PEM.
    pub ca_pem: String,
    pub results: Vec<BatchResult>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimBody {
    pub id: String,
    /// PEM.
    pub csr: String,
    /// How many devices it may provision.
    pub uses: u32,
    #[serde(default)]
    pub manufacturer: Option<String>,
    #[serde(default)]
    pub lifetime_days: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClaimIssued {
    pub device: DeviceView,
    pub uses_left: u32,
    pub serial: Serial,
    pub chain_pem: String,
    pub ca_pem: String,
}
