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
use std::time::{Duration, Instant};

/// How far the wall clock may step against the monotonic clock between
/// two comparisons with the other nodes before nothing is issued.
pub const STEP_BOUND: Duration = Duration::from_secs(60);

/// Shared between the CA and whatever checks the clock; trusted until
/// told otherwise (a lone node has nothing to compare with).
#[derive(Clone, Debug, Default)]
pub struct ClockTrust(Arc<RwLock<Inner>>);

#[derive(Debug, Default)]
struct Inner {
    why: Option<String>,
    /// The wall clock (unix ms) and the monotonic clock when the clock
    /// was last found right: a step of the wall clock since is seen at
    /// once, before the next comparison with the other nodes.
    anchor: Option<(i64, Instant)>,
}

fn wall_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl ClockTrust {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Distrusts the clock for `why` (which the refusal says), or trusts
    /// it again with `None`.
    pub fn set(&self, why: Option<String>) {
        self.write().why = why;
    }

    /// Takes the clock as right now: later steps are measured from here.
    pub fn anchor(&self) {
        self.write().anchor = Some((wall_ms(), Instant::now()));
    }

    /// How far the wall clock stepped since [`ClockTrust::anchor`]
    /// against the monotonic clock, in ms (0 without an anchor).
    pub fn step_ms(&self) -> i64 {
        self.read().anchor.map_or(0, |(wall, mono)| {
            let elapsed = i64::try_from(mono.elapsed().as_millis()).unwrap_or(i64::MAX);
            wall_ms() - wall - elapsed
        })
    }

    /// Why the clock is not trusted, if it is not.
    pub fn distrusted(&self) -> Option<String> {
        self.reason().or_else(|| self.stepped())
    }

    /// The reason last [`ClockTrust::set`], if any.
    pub fn reason(&self) -> Option<String> {
        self.read().why.clone()
    }

    /// Whether the wall clock stepped by more than [`STEP_BOUND`] since
    /// the anchor, and by how much.
    pub fn stepped(&self) -> Option<String> {
        let step = self.step_ms();
        (step.unsigned_abs() > STEP_BOUND.as_millis() as u64).then(|| {
            format!(
                "its clock stepped {} s {} since it last agreed with the other nodes' \
                 (more than {} s): waiting to compare it again",
                step.unsigned_abs() / 1000,
                if step > 0 { "ahead" } else { "back" },
                STEP_BOUND.as_secs()
            )
        })
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

    #[test]
    fn an_anchored_clock_that_has_not_stepped_is_trusted() {
        let t = ClockTrust::default();
        t.anchor();
        assert!(t.step_ms().abs() < 1_000, "{}", t.step_ms());
        assert!(t.check().is_ok());
        // A step: the anchor as if taken with the wall clock two hours
        // behind where it is now.
        t.write().anchor = Some((wall_ms() - 7_200_000, Instant::now()));
        let e = t.check().unwrap_err();
        assert!(e.to_string().contains("stepped 7200 s ahead"), "{e}");
        t.write().anchor = Some((wall_ms() + 90_000, Instant::now()));
        let e = t.check().unwrap_err();
        assert!(e.to_string().contains("stepped 90 s back"), "{e}");
        t.anchor();
        assert!(t.check().is_ok());
    }
}
