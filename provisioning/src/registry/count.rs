//! The number of device records, for status pages and metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use super::*;

/// The number of device records, for status pages and metrics: counting
/// is a walk of the key space on sled (a million devices: some 300 ms),
/// so once a count takes long it is kept and made again in the background
/// at most every [`RECOUNT`], and never on the caller's time.
#[derive(Debug, Default)]
pub(super) struct DeviceCount {
    n: AtomicUsize,
    /// When it was last counted (ms since the Unix epoch; 0: never), and
    /// whether that took long enough to keep it.
    at_ms: AtomicU64,
    slow: AtomicBool,
    counting: AtomicBool,
}

/// A count slower than this is kept rather than made on every call.
const SLOW_COUNT: std::time::Duration = std::time::Duration::from_millis(10);
/// How old a kept count may get before it is made again.
const RECOUNT: std::time::Duration = std::time::Duration::from_secs(10);

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Counts the device records into `c`.
fn count_devices(store: &dyn Store, c: &DeviceCount) -> usize {
    let t = std::time::Instant::now();
    let n = store.len(Space::Devices).unwrap_or(0);
    c.n.store(n, Relaxed);
    c.slow.store(t.elapsed() > SLOW_COUNT, Relaxed);
    c.at_ms.store(unix_ms().max(1), Relaxed);
    n
}

impl Registry {
    /// How many devices there are: counted now while counting is quick,
    /// else the last count, made again in the background at most every
    /// 10 s (see [`DeviceCount`]).
    pub fn device_count(&self) -> usize {
        let c = &self.count;
        let at = c.at_ms.load(Relaxed);
        if at == 0 || !c.slow.load(Relaxed) {
            return count_devices(&*self.store, c);
        }
        let age = unix_ms().saturating_sub(at);
        if age > RECOUNT.as_millis() as u64 && !c.counting.swap(true, Relaxed) {
            let (store, kept) = (self.store.clone(), self.count.clone());
            let spawned = std::thread::Builder::new()
                .name("device-count".into())
                .spawn(move || {
                    count_devices(&*store, &kept);
                    kept.counting.store(false, Relaxed);
                });
            if spawned.is_err() {
                c.counting.store(false, Relaxed);
            }
        }
        c.n.load(Relaxed)
    }
}
