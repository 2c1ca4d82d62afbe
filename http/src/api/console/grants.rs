//! Login links and sessions ("grants"), kept in the registry so that every
//! node sharing it honours them (`provisioning::registry`'s `console`
//! space): a link from one node signs in on any, once; a session works on
//! every node, and logging out ends it everywhere.
//!
//! Only the SHA-256 of a token or session id is stored. What is stored is
//! sealed with an HMAC key derived from the issuing CA's key (the bus
//! seal's secret), so a grant written into etcd by anyone without that key
//! is no grant. Lifetimes are wall-clock times, the same on every node.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use provisioning::registry::Registry;
use provisioning::{CertKey, DeviceId};
use serde::{Deserialize, Serialize};

use super::ApiError;

/// A link's or a session's admin, the certificate it was asked for with,
/// and when it lapses.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Grant {
    pub admin: DeviceId,
    /// The admin certificate that asked for the link: the link and the
    /// session it becomes live only while that certificate is in good
    /// standing and in date.
    pub cert: CertKey,
    /// The session's CSRF token (empty for a link).
    pub csrf: String,
}

/// The grants' seal: what makes a stored grant one this cluster made.
#[derive(Debug)]
pub(super) struct Grants {
    key: ring::hmac::Key,
}

pub(super) fn random() -> Result<[u8; 32], ApiError> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "no randomness",
        )
    })?;
    Ok(b)
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn digest(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn link_key(token: &str) -> Vec<u8> {
    format!("link/{}", digest(token)).into_bytes()
}

fn session_key(sid: &str) -> Vec<u8> {
    format!("session/{}", digest(sid)).into_bytes()
}

const TAG: usize = 32;

/// What a grant's seal covers: its key, its lifetime and its contents,
/// each prefixed by its length.
fn framed(key: &[u8], until: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + body.len() + 32);
    for part in [key, &until.to_be_bytes()[..], body] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

impl Grants {
    /// `secret`: the same on every node of the cluster, and on no other
    /// (the issuing CA key's seal secret).
    pub fn new(secret: &[u8]) -> Self {
        let root = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let derived = ring::hmac::sign(&root, b"fleetgate console grants v1");
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    /// A keyed digest of `data` under the grants' key (the CSRF tokens of
    /// certificate users: the same on every node).
    pub fn mac(&self, label: &[u8], data: &[u8]) -> String {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(label);
        ctx.update(data);
        hex(ctx.sign().as_ref())
    }

    fn put(&self, reg: &Registry, key: &[u8], g: &Grant, ttl: Duration) -> Result<(), ApiError> {
        let now = now_ms();
        let until = now + ttl.as_millis() as u64;
        let body = serde_json::to_vec(g).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        let mut sealed = ring::hmac::sign(&self.key, &framed(key, until, &body))
            .as_ref()
            .to_vec();
        sealed.extend_from_slice(&body);
        reg.put_grant(key, until, &sealed, now)?;
        Ok(())
    }

    /// A stored grant's contents, if this cluster sealed them for `key`.
    fn open(&self, key: &[u8], until: u64, sealed: &[u8]) -> Option<Grant> {
        let (tag, body) = sealed.split_at_checked(TAG)?;
        if ring::hmac::verify(&self.key, &framed(key, until, body), tag).is_err() {
            tracing::warn!(
                reason = "bad seal",
                "console: refused a grant the cluster did not make"
            );
            return None;
        }
        serde_json::from_slice(body).ok()
    }

    /// A one-time login link's token for `admin`, good for `ttl`.
    pub fn issue_link(
        &self,
        reg: &Registry,
        admin: DeviceId,
        cert: CertKey,
        ttl: Duration,
    ) -> Result<String, ApiError> {
        let token = hex(&random()?);
        let g = Grant {
            admin,
            cert,
            csrf: String::new(),
        };
        self.put(reg, &link_key(&token), &g, ttl)?;
        Ok(token)
    }

    /// Whether `token` is a live link (not spending it).
    pub fn link_is_live(&self, reg: &Registry, token: &str) -> Result<bool, ApiError> {
        let key = link_key(token);
        Ok(self.read(reg, &key, false)?.is_some())
    }

    /// Spends `token` for a new session of `lifetime`: its cookie value
    /// and grant.
    pub fn redeem(
        &self,
        reg: &Registry,
        token: &str,
        lifetime: Duration,
    ) -> Result<Option<(String, Grant)>, ApiError> {
        let Some(link) = self.read(reg, &link_key(token), true)? else {
            return Ok(None);
        };
        let sid = hex(&random()?);
        let grant = Grant {
            csrf: hex(&random()?),
            ..link
        };
        self.put(reg, &session_key(&sid), &grant, lifetime)?;
        Ok(Some((sid, grant)))
    }

    /// The live session `sid`, if there is one.
    pub fn session(&self, reg: &Registry, sid: &str) -> Result<Option<Grant>, ApiError> {
        self.read(reg, &session_key(sid), false)
    }

    /// Ends the session `sid`, on every node.
    pub fn end_session(&self, reg: &Registry, sid: &str) -> Result<(), ApiError> {
        reg.end_grant(&session_key(sid))?;
        Ok(())
    }

    /// The grant under `key`, taken (once) or read, if it is live and
    /// sealed by this cluster.
    fn read(&self, reg: &Registry, key: &[u8], take: bool) -> Result<Option<Grant>, ApiError> {
        let now = now_ms();
        let stored = if take {
            reg.take_grant(key, now)?
        } else {
            reg.grant(key, now)?
        };
        Ok(stored.and_then(|(until, sealed)| self.open(key, until, &sealed)))
    }
}
