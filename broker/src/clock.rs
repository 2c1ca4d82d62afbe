//! This node's clock against the other nodes' (issue 30).
//!
//! Certificates are dated by the issuing node's clock. The fault harness
//! set a node's clock two hours ahead: it enrolled a device whose
//! certificate every other node took as not yet valid, for two hours. So
//! each node on etcd stamps its wall clock under `meta/clock/<process>`
//! every few seconds, and reads the others' stamps as its watch brings
//! them: a stamp read at once says how far apart the two clocks are (the
//! watch's delay, milliseconds, is far below the bound). A node that
//! differs by more than [`BOUND`] from most of the nodes it heard from in
//! the last [`FRESH`] does not trust its clock: it issues nothing (HTTP
//! 503 `clock_skew`, CMP systemUnavail) and says so in its log, until the
//! clock agrees again. With two nodes apart, neither can tell which is
//! right, and both stop issuing. A lone node has nothing to compare with.
//!
//! Stamps come every few seconds, and a clock set wrong between two of
//! them was trusted until the next: the harness's node enrolled a device
//! in that window with a certificate dated two days ahead. So the wall
//! clock is also measured against the monotonic clock from when it was
//! last found right ([`ClockTrust::anchor`]): a step of more than the
//! bound is distrusted at the next certificate, and the node waits for
//! stamps read by its clock as it is now before it judges it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use provisioning::clock::ClockTrust;
use provisioning::store::{Commit, Space, Store, Write};

/// How far apart two clocks may be.
pub const BOUND: Duration = Duration::from_secs(60);
/// How often a node stamps its clock.
const EVERY: Duration = Duration::from_secs(5);
/// How long a peer's last stamp counts.
const FRESH: Duration = Duration::from_secs(30);
const PREFIX: &[u8] = b"clock/";

fn wall_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// What a node decides from the offsets of the peers it heard from
/// (theirs minus its own, ms): why its clock is not to be trusted, if it
/// is not: most of them differ from it by more than `bound`, either way.
/// (Three clocks all apart, no two agreeing: none can tell which is
/// right, and none issues. The harness had a node two hours ahead, one
/// two days ahead and one right: counted by direction, each had one peer
/// on either side, and the one two hours ahead went on issuing.)
pub fn judge(offsets: &[i64], bound: Duration) -> Option<String> {
    let bound = bound.as_millis() as i64;
    let n = offsets.len();
    let mut sorted = offsets.to_vec();
    sorted.sort_unstable();
    let median = *sorted.get(n / 2)?;
    let behind_them = offsets.iter().filter(|o| **o > bound).count();
    let ahead_of_them = offsets.iter().filter(|o| **o < -bound).count();
    if (behind_them + ahead_of_them) * 2 <= n {
        return None;
    }
    let (count, way) = if behind_them * 2 > n {
        (behind_them, "behind")
    } else if ahead_of_them * 2 > n {
        (ahead_of_them, "ahead of")
    } else {
        return Some(format!(
            "its clock is more than {} s apart from {} of the {n} other nodes heard from, \
             which disagree among themselves too: set the clocks right (NTP)",
            bound / 1000,
            behind_them + ahead_of_them
        ));
    };
    Some(format!(
        "its clock is {} s {way} {count} of the {n} other nodes heard from (more than {} s): \
         set it right (NTP)",
        median.unsigned_abs() / 1000,
        bound / 1000
    ))
}

/// The peers' offsets, and what they decide.
#[derive(Debug)]
pub struct ClusterClock {
    /// This process's key under `meta/clock/`.
    me: Vec<u8>,
    heard: Mutex<HashMap<Vec<u8>, (i64, Instant)>>,
    trust: ClockTrust,
    /// Judged only once every peer has had time to stamp: the first peer
    /// heard from is not yet most of them.
    since: Instant,
    /// When this node's wall clock was last seen to step (against the
    /// monotonic clock): it issues nothing until it has heard stamps
    /// read by the clock as it is now.
    stepped: Mutex<Option<Instant>>,
}

impl ClusterClock {
    pub fn new(trust: ClockTrust) -> Arc<Self> {
        // This process: unique enough across hosts and restarts.
        let mut me = PREFIX.to_vec();
        me.extend(format!("{:x}-{:x}", wall_ms(), std::process::id()).bytes());
        trust.anchor();
        Arc::new(Self {
            me,
            heard: Mutex::default(),
            trust,
            since: Instant::now(),
            stepped: Mutex::default(),
        })
    }

    /// The stamps among the watch's `writes`, read now; how many of the
    /// writes were stamps (this node's own too).
    pub fn heard(&self, writes: &[Write]) -> usize {
        let now = wall_ms();
        let stamps = writes
            .iter()
            .filter(|w| w.space == Space::Meta && w.key.starts_with(PREFIX))
            .count();
        let mut any = false;
        {
            let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
            for w in writes {
                if w.space != Space::Meta || !w.key.starts_with(PREFIX) || w.key == self.me {
                    continue;
                }
                let stamp = w
                    .value
                    .as_deref()
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .and_then(|s| s.parse::<i64>().ok());
                match stamp {
                    // Later writes of a batch replace earlier ones: the
                    // newest stamp counts.
                    Some(t) => heard.insert(w.key.clone(), (t - now, Instant::now())),
                    None => heard.remove(&w.key),
                };
                any = true;
            }
        }
        if any {
            self.decide();
        }
        stamps
    }

    /// Trusts or distrusts the clock from the fresh offsets; logs a change.
    /// A wall clock that stepped since it was last found right is
    /// distrusted at once (the CA checks the step itself, too, so nothing
    /// is issued in between): the offsets heard before the step are
    /// forgotten, and it is judged again from stamps heard after.
    fn decide(&self) {
        let mut stepped = self.stepped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = self.trust.stepped() {
            self.heard.lock().unwrap_or_else(|p| p.into_inner()).clear();
            *stepped = Some(Instant::now());
            if self.trust.reason().is_none() {
                tracing::error!("clock: this node issues no certificate: {why}");
            }
            self.trust.set(Some(why));
            self.trust.anchor();
            return;
        }
        let offsets: Vec<i64> = {
            let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
            heard.retain(|_, (_, at)| at.elapsed() < FRESH);
            heard.values().map(|(o, _)| *o).collect()
        };
        if self.since.elapsed() < EVERY * 2 {
            return;
        }
        // After a step, nothing heard yet: wait for the peers' stamps (a
        // lone node, for as long as a stamp counts).
        if stepped.is_some_and(|at| offsets.is_empty() && at.elapsed() < FRESH) {
            return;
        }
        let verdict = judge(&offsets, BOUND);
        let before = self.trust.distrusted();
        match (&before, &verdict) {
            (None, Some(why)) => tracing::error!("clock: this node issues no certificate: {why}"),
            (Some(_), None) => tracing::info!(
                "clock: this node's clock agrees with the other nodes' again; issuing"
            ),
            _ => {}
        }
        if verdict.is_none() {
            self.trust.anchor();
            *stepped = None;
        }
        self.trust.set(verdict);
    }

    /// Stamps this node's clock every [`EVERY`] (and forgets stale peers)
    /// until `shutdown`; removes the stamp on the way out.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let stamp = |value: Option<Vec<u8>>| Write {
            space: Space::Meta,
            key: self.me.clone(),
            value,
        };
        loop {
            let (s, w) = (
                store.clone(),
                stamp(Some(wall_ms().to_string().into_bytes())),
            );
            // Unreachable etcd: no stamp this time, nothing else to do.
            let _ = tokio::task::spawn_blocking(move || s.commit(Commit::writes(vec![w]))).await;
            self.decide();
            tokio::select! {
                () = tokio::time::sleep(EVERY) => {}
                _ = shutdown.changed() => break,
            }
        }
        let (s, w) = (store, stamp(None));
        let _ = tokio::task::spawn_blocking(move || s.commit(Commit::writes(vec![w]))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_peers_apart_the_same_way_distrust_the_clock() {
        let b = Duration::from_secs(60);
        assert_eq!(judge(&[], b), None, "a lone node");
        assert_eq!(judge(&[20, -3_000, 59_000], b), None, "within the bound");
        // Two hours ahead of both others.
        let why = judge(&[-7_200_000, -7_199_000], b).unwrap();
        assert!(why.contains("7199 s ahead of 2 of the 2"), "{why}");
        // A day behind one of one.
        let why = judge(&[86_400_000], b).unwrap();
        assert!(why.contains("86400 s behind 1 of the 1"), "{why}");
        // One peer off, the other not: the peer is the odd one out.
        assert_eq!(judge(&[-7_200_000, 10], b), None);
        // Two of three apart: this one is.
        assert!(judge(&[-7_200_000, -7_200_100, 10], b).is_some());
        // Apart from both, one each way (all three clocks apart).
        let why = judge(&[-7_200_000, 165_600_000], b).unwrap();
        assert!(why.contains("apart from 2 of the 2"), "{why}");
    }
}
