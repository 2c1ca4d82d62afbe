//! Counters for what the broker does and refuses. Lock-free; read by
//! `GET /v1/stats` on the admin API.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

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
}

impl Refusal {
    pub const ALL: [Refusal; 14] = [
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
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections_open: AtomicI64,
    pub handshakes: AtomicU64,
    pub sessions: AtomicU64,
    pub kicked: AtomicU64,
    pub taken_over: AtomicU64,
    pub ocsp_responses: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
}

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub connections_open: i64,
    pub handshakes: u64,
    pub sessions: u64,
    pub kicked: u64,
    pub taken_over: u64,
    pub ocsp_responses: u64,
    pub refusals: std::collections::BTreeMap<&'static str, u64>,
}

impl Metrics {
    pub fn refused(&self, r: Refusal) {
        let i = Refusal::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.refusals[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connections_open: self.connections_open.load(Ordering::Relaxed),
            handshakes: self.handshakes.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            kicked: self.kicked.load(Ordering::Relaxed),
            taken_over: self.taken_over.load(Ordering::Relaxed),
            ocsp_responses: self.ocsp_responses.load(Ordering::Relaxed),
            refusals: Refusal::ALL
                .iter()
                .zip(&self.refusals)
                .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}
