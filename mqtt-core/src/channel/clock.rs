//! Time, as the connection core sees it: passed in, never read.
//!
//! Every decision of the core that depends on time takes a [`Now`]: the
//! wall clock (certificates' validity, message expiry; milliseconds since
//! the Unix epoch) and the monotonic clock (keep-alive, will delay,
//! quotas' refills). The driver reads both from one [`Clock`]; tests make
//! their own `Now`s and step them, so nothing sleeps.

use std::time::{Duration, Instant};

/// One reading of both clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Wall time, milliseconds since the Unix epoch.
    pub wall_ms: i64,
    /// Monotonic time, for timers.
    pub mono: Instant,
}

impl Now {
    /// `self`, `d` later on both clocks.
    pub fn after(self, d: Duration) -> Self {
        Now {
            wall_ms: self
                .wall_ms
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            mono: self.mono + d,
        }
    }

    /// The monotonic instant at which wall time reaches `wall_ms` (now, if
    /// it already has).
    pub fn mono_at(self, wall_ms: i64) -> Instant {
        let ahead = u64::try_from(wall_ms.saturating_sub(self.wall_ms)).unwrap_or(0);
        // Far enough ahead is as good as never (and cannot overflow).
        self.mono + Duration::from_millis(ahead.min(100 * 365 * 24 * 3600 * 1000))
    }
}

/// Where the driver reads the time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Now;
}

/// The system's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Now {
        Now {
            wall_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            mono: Instant::now(),
        }
    }
}

/// A clock a test sets: starts at `wall_ms` and moves only when told.
#[derive(Debug)]
pub struct ManualClock {
    start: Now,
    offset: std::sync::Mutex<Duration>,
}

impl ManualClock {
    pub fn at(wall_ms: i64) -> Self {
        ManualClock {
            start: Now {
                wall_ms,
                mono: Instant::now(),
            },
            offset: std::sync::Mutex::new(Duration::ZERO),
        }
    }

    /// Moves both clocks `d` forward.
    pub fn advance(&self, d: Duration) {
        *crate::kept::lock(&self.offset) += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Now {
        self.start.after(*crate::kept::lock(&self.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_both_clocks_together() {
        let c = ManualClock::at(1_000);
        let a = c.now();
        assert_eq!(c.now(), a, "no time passes by itself");
        c.advance(Duration::from_secs(90));
        let b = c.now();
        assert_eq!(b.wall_ms, 91_000);
        assert_eq!(b.mono - a.mono, Duration::from_secs(90));
    }

    #[test]
    fn a_wall_time_maps_onto_the_monotonic_clock() {
        let now = ManualClock::at(10_000).now();
        assert_eq!(now.mono_at(12_500), now.mono + Duration::from_millis(2_500));
        // Past: now.
        assert_eq!(now.mono_at(0), now.mono);
        // Far future: capped, not overflowed.
        assert!(now.mono_at(i64::MAX) > now.mono);
    }
}
