//! The MQTT connection core of fleetgate, sans-IO: what one connection
//! decides ([`channel::Channel`]: CONNECT, PUBLISH both ways, acks and
//! windows, subscriptions, wills, keep-alive, quotas) and the pure pieces
//! it is made of: the topic rules ([`acl`]), the codec ([`codec`]), the
//! outbox ([`outbox`]), the acknowledgements owed to rumqttd's router
//! ([`acks`]), a device's budget of new topics ([`quota`]), what outlives
//! a connection ([`kept`]) and the identity stamp ([`stamp`]).
//!
//! **Invariant:** nothing here opens a socket or a file, names a runtime,
//! TLS or a store, or reads a clock: time comes in as
//! [`channel::clock::Now`]. The broker's session (`broker::mqtt`) drives it
//! and does the IO. `tests/tests/invariants.rs` checks both this crate's
//! sources and its dependencies.

pub mod acks;
pub mod acl;
pub mod channel;
pub mod codec;
pub mod kept;
pub mod outbox;
pub mod quota;
pub mod stamp;

/// Why a client was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    NoCertificate,
    UnknownCa,
    Expired,
    NotYetValid,
    WrongUsage,
    BadCertificate,
    UnknownSerial,
    Revoked,
    Suspended,
    WrongIdentity,
    Acl,
    Protocol,
    HandshakeTimeout,
    Internal,
    Pending,
    RateLimited,
    Overloaded,
    JitRateLimited,
    JitQuotaExceeded,
    /// A session over its subscriptions, or a device over its new topics
    /// or retained messages.
    Quota,
}

impl Refusal {
    pub const ALL: [Refusal; 20] = [
        Self::NoCertificate,
        Self::UnknownCa,
        Self::Expired,
        Self::NotYetValid,
        Self::WrongUsage,
        Self::BadCertificate,
        Self::UnknownSerial,
        Self::Revoked,
        Self::Suspended,
        Self::WrongIdentity,
        Self::Acl,
        Self::Protocol,
        Self::HandshakeTimeout,
        Self::Internal,
        Self::Pending,
        Self::RateLimited,
        Self::Overloaded,
        Self::JitRateLimited,
        Self::JitQuotaExceeded,
        Self::Quota,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongUsage => "wrong_usage",
            Self::BadCertificate => "bad_certificate",
            Self::UnknownSerial => "unknown_serial",
            Self::Revoked => "revoked",
            Self::Suspended => "suspended",
            Self::WrongIdentity => "wrong_identity",
            Self::Acl => "acl",
            Self::Protocol => "protocol",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Internal => "internal",
            Self::Pending => "pending_approval",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::JitRateLimited => "jit_rate_limited",
            Self::JitQuotaExceeded => "jit_quota_exceeded",
            Self::Quota => "quota_exceeded",
        }
    }
}

/// Why a session is being cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    Revoked,
    Suspended,
    CertificateRevoked,
    ManufacturerRevoked,
    /// A newer connection of the same device took the session.
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
}

impl Kick {
    pub fn as_str(self) -> &'static str {
        match self {
            Kick::Revoked => "device revoked",
            Kick::Suspended => "device suspended",
            Kick::CertificateRevoked => "certificate revoked",
            Kick::ManufacturerRevoked => "manufacturer revoked",
            Kick::TakenOver => "session taken over",
            Kick::Shutdown => "the server is shutting down",
        }
    }
}

pub use provisioning::{printable, Printable};
