//! Certificate status: the OCSP responder (RFC 6960) and the CRL cache,
//! shared by HTTP (`fleetgate_http::status_routes`), MQTT and the API.
//! Malformed requests get an OCSP `malformedRequest`, requests about CAs
//! we do not serve `unauthorized`: never a panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use provisioning::ca::{OCSP_SIGNER_RENEW_BEFORE, ROOT_CRL_NAME};
use provisioning::ocsp::{Refusal, Responder};
use provisioning::Authority;
use time::{Duration, OffsetDateTime};

use crate::metrics::Metrics;

/// CRLs older than this are re-signed on the next request even without a
/// change, so one is never served past half its validity.
const CRL_MAX_AGE: Duration = Duration::hours(12);

/// The OCSP responder and the CRL cache, shared by HTTP, MQTT and the API.
#[derive(Debug)]
pub struct StatusService {
    auth: Arc<Authority>,
    /// The registry as admission reads it ([`provisioning::Registry::recent`]):
    /// on etcd, this node's view, milliseconds behind the cluster, so an
    /// answer is not a round trip to etcd; as current as the admission
    /// decisions this node makes.
    recent: provisioning::Registry,
    responder: RwLock<Arc<Responder>>,
    /// Signed CRLs by name, and when they were signed.
    crls: Mutex<HashMap<String, (Bytes, OffsetDateTime)>>,
    /// The registry revision the caches were built at: a newer one
    /// empties them before the next answer.
    seen: std::sync::atomic::AtomicU64,
    metrics: Arc<Metrics>,
    /// Held while the OCSP signer is renewed.
    renewing: Mutex<()>,
}

impl StatusService {
    pub fn new(auth: Arc<Authority>, metrics: Arc<Metrics>) -> Result<Self, provisioning::Error> {
        Ok(Self {
            responder: RwLock::new(Arc::new(auth.ocsp_responder()?)),
            recent: auth.registry.recent(),
            auth,
            crls: Mutex::new(HashMap::new()),
            seen: std::sync::atomic::AtomicU64::new(0),
            metrics,
            renewing: Mutex::new(()),
        })
    }

    /// The OCSP signing units in use.
    pub fn responder(&self) -> Arc<Responder> {
        self.responder
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Empties the caches if the registry moved on since they were built:
    /// every answer starts here, so none is older than the last commit.
    fn fresh(&self) {
        use std::sync::atomic::Ordering;
        let now = self.auth.registry.revision();
        if self.seen.load(Ordering::Acquire) != now {
            self.responder().invalidate();
            self.lock_crls().clear();
            self.seen.store(now, Ordering::Release);
        }
    }

    /// Call after manufacturers change: rebuilds the signing units.
    pub fn reload(&self) -> Result<(), provisioning::Error> {
        let fresh = Arc::new(self.auth.ocsp_responder()?);
        *self
            .responder
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        self.lock_crls().clear();
        Ok(())
    }

    fn lock_crls(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Bytes, OffsetDateTime)>> {
        self.crls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Renews the delegated OCSP signing certificate when it is within
    /// [`OCSP_SIGNER_RENEW_BEFORE`] of expiry (or past it): the periodic
    /// upkeep calls this, so a long-running server never signs with an
    /// expired certificate. Returns whether it renewed.
    pub fn renew_signer_if_needed(&self) -> Result<bool, provisioning::Error> {
        let due = || {
            self.responder()
                .signer_expires
                .is_some_and(|t| t - OffsetDateTime::now_utc() <= OCSP_SIGNER_RENEW_BEFORE)
        };
        if !due() {
            return Ok(false);
        }
        // One renewal at a time; whoever waited finds it done.
        let _one = self
            .renewing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !due() {
            return Ok(false);
        }
        self.reload()?;
        tracing::info!(
            expires = ?self.responder().signer_expires,
            "renewed the OCSP signing certificate"
        );
        Ok(true)
    }

    /// A DER OCSPResponse for a DER request (a refusal is an OCSP status).
    pub fn ocsp(&self, request: &[u8]) -> Vec<u8> {
        self.answer(request).der
    }

    /// [`StatusService::ocsp`], with the response's validity window.
    pub fn answer(&self, request: &[u8]) -> provisioning::ocsp::Answer {
        self.fresh();
        // Not only on the upkeep's timer: after a wall-clock jump (a VM
        // resumed, a clock corrected) the next answer is signed by a
        // certificate in date.
        if let Err(e) = self.renew_signer_if_needed() {
            tracing::error!(error = %e, "renewing the OCSP signing certificate");
        }
        let answer = self.responder().respond(request, &self.recent);
        self.metrics
            .ocsp_responses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &answer.refusal {
            None => {}
            Some(Refusal::Malformed(why)) => {
                tracing::info!(reason = %crate::printable(why), "ocsp: malformedRequest")
            }
            Some(Refusal::Unauthorized) => {
                tracing::info!("ocsp: unauthorized (not our issuer)")
            }
            Some(Refusal::Internal(why)) => tracing::error!(error = %why, "ocsp: internalError"),
        }
        answer
    }

    /// The CRL called `name` (`issuing`, its delta `issuing-delta`, `root`
    /// or a manufacturer fleetgate issued), re-signed when stale; `None`
    /// for no such CRL.
    pub fn crl(&self, name: &str) -> Result<Option<Bytes>, provisioning::Error> {
        self.fresh();
        let now = OffsetDateTime::now_utc();
        if let Some((der, at)) = self.lock_crls().get(name) {
            if now - *at < CRL_MAX_AGE {
                return Ok(Some(der.clone()));
            }
        }
        let der = if name == ROOT_CRL_NAME {
            self.auth.root_crl()?
        } else if let Some(crl) = self.auth.issuing_crl_named(name) {
            // `issuing`, `issuing-2`, ...: an issuing CA generation.
            crl?
        } else if let Some(crl) = self.auth.issuing_delta_crl_named(name) {
            // `issuing-delta`, ...: what changed since its base.
            crl?
        } else {
            match self.auth.registry.manufacturer(name)? {
                Some(m) if m.kind == provisioning::manufacturer::CaKind::Issued => {
                    self.auth.manufacturer_crl(name)?
                }
                _ => return Ok(None),
            }
        };
        let der = Bytes::from(der);
        self.lock_crls().insert(name.to_owned(), (der.clone(), now));
        Ok(Some(der))
    }
}

/// Standard base64, padding optional; `None` on any other character.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        match chunk.len() {
            4 => out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]),
            3 => out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8]),
            2 => out.push((n >> 16) as u8),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::decode_base64;

    #[test]
    fn base64_cases() {
        for (input, want) in [
            ("", Some(&b""[..])),
            ("TWFu", Some(b"Man")),
            ("TWE=", Some(b"Ma")),
            ("TWE", Some(b"Ma")),
            ("TQ==", Some(b"M")),
            ("+/+/", Some(&[0xfb, 0xff, 0xbf][..])),
            ("-_-_", Some(&[0xfb, 0xff, 0xbf][..])),
            ("T", None),
            ("TW!u", None),
            ("%%%%", None),
        ] {
            assert_eq!(decode_base64(input).as_deref(), want, "{input:?}");
        }
    }
}
