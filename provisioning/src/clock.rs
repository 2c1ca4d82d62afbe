//! Whether this node may date certificates by its own clock.
//!
//! A certificate is dated from the issuing node's clock. A node whose clock
//! runs hours ahead issues certificates that every other node (and the
//! device's own relying parties) take as not yet valid, for hours; one
//! that runs behind issues certificates that expire early. The fault
//! harness found it (issue 30): a node skewed two hours ahead enrolled a
//! device no other node would admit. What measures the clock against the
//! rest of the cluster lives with the node (`broker::clock`); this is
//! what it sets, and what issuing reads: while the clock is not trusted,
//! nothing is issued ([`crate::Error::ClockSkew`], HTTP 503).

use std::sync::{Arc, RwLock};

/// Shared between the CA and whatever checks the clock; trusted until
/// told otherwise (a lone node has nothing to compare with).
#[derive(Clone, Debug, Default)]
pub struct ClockTrust(Arc<RwLock<Option<String>>>);

impl ClockTrust {
    /// Distrusts the clock for `why` (which the refusal says), or trusts
    /// it again with `None`.
    pub fn set(&self, why: Option<String>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = why;
    }

    /// Why the clock is not trusted, if it is not.
    pub fn distrusted(&self) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Ok while the clock is trusted.
    pub fn check(&self) -> Result<(), crate::Error> {
        match self.distrusted() {
            None => Ok(()),
            Some(why) => Err(crate::Error::ClockSkew(why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distrusted_until_trusted_again_and_shared_by_clones() {
        let t = ClockTrust::default();
        assert!(t.check().is_ok());
        let seen = t.clone();
        t.set(Some("7200 s ahead of node-b".into()));
        let e = seen.check().unwrap_err();
        assert!(e.to_string().contains("7200 s ahead"), "{e}");
        t.set(None);
        assert!(seen.check().is_ok());
    }
}
