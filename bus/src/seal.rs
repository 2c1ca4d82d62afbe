//! What a node puts on NATS carries a seal only the cluster's nodes can
//! make: HMAC-SHA256 under a key derived from the issuing CA's private key
//! (which every node of the cluster holds, and nothing on NATS does), over
//! the subject, the headers that say who sent it, and the payload. A
//! message, a command queued for a device, a session record or a takeover
//! claim without a valid seal was put there by something else, whatever
//! NATS let it do: it is dropped and counted. NATS's own TLS and per-node
//! permissions are the first line; this one holds where they are loose.

use ring::hmac;

/// The header that carries the seal.
pub const HEADER: &str = "fleetgate-seal";

/// The cluster's bus key.
#[derive(Clone)]
pub struct BusKey(hmac::Key);

impl std::fmt::Debug for BusKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.write_str("BusKey")
    }
}

impl BusKey {
    /// The key every node derives from the same secret (the issuing CA's
    /// private key, PKCS#8 DER).
    pub fn derive(secret: &[u8]) -> Self {
        let master = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derived = hmac::sign(&master, b"fleetgate bus seal v1");
        Self(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
    }

    /// The sealed bytes: each part length-prefixed, so no two lists of
    /// parts make the same bytes.
    fn message(parts: &[&[u8]]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
        for p in parts {
            msg.extend_from_slice(&(p.len() as u64).to_be_bytes());
            msg.extend_from_slice(p);
        }
        msg
    }

    /// The seal of `parts`, hex.
    pub fn seal(&self, parts: &[&[u8]]) -> String {
        provisioning::id::hex(hmac::sign(&self.0, &Self::message(parts)).as_ref())
    }

    /// Whether `seal` (hex) is the seal of `parts`; in constant time.
    pub fn verify(&self, parts: &[&[u8]], seal: Option<&str>) -> bool {
        let Some(tag) = seal.and_then(provisioning::id::unhex) else {
            return false;
        };
        hmac::verify(&self.0, &Self::message(parts), &tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_key_and_parts_verify() {
        let k = BusKey::derive(b"issuing key");
        let seal = k.seal(&[b"fleetgate.msg.n.r.dev-1", b"device", b"payload"]);
        assert!(k.verify(
            &[b"fleetgate.msg.n.r.dev-1", b"device", b"payload"],
            Some(&seal)
        ));
        // Another role, subject or payload; another key; no seal.
        assert!(!k.verify(
            &[b"fleetgate.msg.n.r.dev-1", b"service", b"payload"],
            Some(&seal)
        ));
        assert!(!k.verify(
            &[b"fleetgate.msg.n.r.dev-2", b"device", b"payload"],
            Some(&seal)
        ));
        assert!(!k.verify(
            &[b"fleetgate.msg.n.r.dev-1", b"device", b"payloaD"],
            Some(&seal)
        ));
        let other = BusKey::derive(b"another cluster");
        assert!(!other.verify(
            &[b"fleetgate.msg.n.r.dev-1", b"device", b"payload"],
            Some(&seal)
        ));
        assert!(!k.verify(&[b"a"], None));
        assert!(!k.verify(&[b"a"], Some("zz")));
        // Parts are length-prefixed: moving a byte between them changes it.
        assert_ne!(k.seal(&[b"ab", b"c"]), k.seal(&[b"a", b"bc"]));
    }
}
