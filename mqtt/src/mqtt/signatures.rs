//! Certificate signatures verified once: a device presents the same
//! certificate at every connect, and its issuer's signature over it is a
//! fact that does not change, so the broker checks the arithmetic once
//! and remembers that it held.
//!
//! [`Remembered`] wraps each of webpki's signature algorithms for the
//! chain a client presents: a signature that verifies is remembered by a
//! SHA-256 digest of the algorithm, the public key, the signed bytes and
//! the signature (each with its length), and the next time the same four
//! come the digest stands for the verification. Only verifications that
//! held are kept; a different key, certificate or signature is a
//! different digest. Everything else about the chain (dates, the path to
//! an anchor the verifier trusts now, key usages, the registry's
//! standing) is checked at every connect as before: the cache knows
//! nothing of trust, only of arithmetic. The handshake's own signature
//! (TLS 1.3's CertificateVerify, over that handshake's transcript) is
//! never the same twice and does not come here.
//!
//! On this machine a P-256 verification is about a quarter of a full
//! connect's CPU on the broker; a digest of a certificate's signed part is
//! about a hundredth of it.

use rustls_pki_types::{AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm};

use super::recent::Recent;

/// The verifications that held, at most `cap` of them, those seen lately
/// kept ([`Recent`]).
#[derive(Debug)]
pub struct SignatureCache {
    seen: Recent<[u8; 32], ()>,
}

impl SignatureCache {
    /// Room for `cap` verifications (32 bytes each, and the map's own).
    pub fn new(cap: usize) -> Self {
        Self {
            seen: Recent::new(cap),
        }
    }

    fn knows(&self, digest: &[u8; 32]) -> bool {
        self.seen.get(digest).is_some()
    }

    fn remember(&self, digest: [u8; 32]) {
        self.seen.insert(digest, ());
    }

    /// How many verifications it holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }

    /// `algs`, each remembering in this cache.
    pub fn wrap<'a>(
        &'a self,
        algs: &[&'static dyn SignatureVerificationAlgorithm],
    ) -> Vec<Remembered<'a>> {
        algs.iter()
            .map(|inner| Remembered {
                inner: *inner,
                cache: self,
            })
            .collect()
    }
}

/// A signature algorithm whose verifications that held are remembered.
#[derive(Debug)]
pub struct Remembered<'a> {
    inner: &'static dyn SignatureVerificationAlgorithm,
    cache: &'a SignatureCache,
}

impl Remembered<'_> {
    fn digest(&self, public_key: &[u8], message: &[u8], signature: &[u8]) -> [u8; 32] {
        let mut d = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [
            self.inner.public_key_alg_id().as_ref(),
            self.inner.signature_alg_id().as_ref(),
            public_key,
            message,
            signature,
        ] {
            d.update(&(part.len() as u64).to_be_bytes());
            d.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(d.finish().as_ref());
        out
    }
}

impl SignatureVerificationAlgorithm for Remembered<'_> {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        let digest = self.digest(public_key, message, signature);
        if self.cache.knows(&digest) {
            return Ok(());
        }
        self.inner
            .verify_signature(public_key, message, signature)?;
        self.cache.remember(digest);
        Ok(())
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.public_key_alg_id()
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        self.inner.signature_alg_id()
    }

    fn fips(&self) -> bool {
        self.inner.fips()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Ring's P-256 ECDSA, counting the verifications it is asked for.
    #[derive(Debug)]
    struct Counting(AtomicUsize);

    impl SignatureVerificationAlgorithm for Counting {
        fn verify_signature(
            &self,
            public_key: &[u8],
            message: &[u8],
            signature: &[u8],
        ) -> Result<(), InvalidSignature> {
            self.0.fetch_add(1, Ordering::Relaxed);
            webpki::ring::ECDSA_P256_SHA256.verify_signature(public_key, message, signature)
        }
        fn public_key_alg_id(&self) -> AlgorithmIdentifier {
            webpki::ring::ECDSA_P256_SHA256.public_key_alg_id()
        }
        fn signature_alg_id(&self) -> AlgorithmIdentifier {
            webpki::ring::ECDSA_P256_SHA256.signature_alg_id()
        }
    }

    fn signed(message: &[u8]) -> (Vec<u8>, Vec<u8>) {
        use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let sig = key.sign(&rng, message).unwrap();
        (key.public_key().as_ref().to_vec(), sig.as_ref().to_vec())
    }

    /// A signature that held is checked once; a signature that did not is
    /// checked (and refused) every time; another message, key or signature
    /// is checked afresh.
    #[test]
    fn a_signature_that_held_is_verified_once_and_nothing_else_is_taken_for_it() {
        let counting: &'static Counting = Box::leak(Box::new(Counting(AtomicUsize::new(0))));
        let cache = SignatureCache::new(16);
        let algs = cache.wrap(&[counting]);
        let alg = &algs[0];
        let (key, sig) = signed(b"tbs certificate");
        let calls = || counting.0.load(Ordering::Relaxed);

        assert!(alg.verify_signature(&key, b"tbs certificate", &sig).is_ok());
        assert!(alg.verify_signature(&key, b"tbs certificate", &sig).is_ok());
        assert_eq!(calls(), 1, "the second time came from the cache");

        // Another message under the same signature: refused, each time.
        for _ in 0..2 {
            assert!(alg
                .verify_signature(&key, b"tbs certificatf", &sig)
                .is_err());
        }
        assert_eq!(calls(), 3);
        // Another key, or a signature altered.
        let (other_key, _) = signed(b"x");
        assert!(alg
            .verify_signature(&other_key, b"tbs certificate", &sig)
            .is_err());
        let mut bad = sig.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(alg
            .verify_signature(&key, b"tbs certificate", &bad)
            .is_err());
        assert_eq!(calls(), 5);
        assert_eq!(cache.len(), 1, "only what held is kept");
    }

    /// The cache keeps at most its cap, the newest kept.
    #[test]
    fn the_cache_is_bounded_and_keeps_the_newest() {
        let cache = SignatureCache::new(4);
        for i in 0..10u8 {
            cache.remember([i; 32]);
        }
        assert!(cache.len() <= 4, "{}", cache.len());
        assert!(cache.knows(&[9; 32]));
        assert!(!cache.knows(&[0; 32]));
    }
}
