//! Accepting TCP connections: a cap on open connections, a per-source-IP
//! connect rate limit, back-off on accept errors (EMFILE and friends)
//! instead of a spin, TCP_NODELAY, and a stop on shutdown.
//!
//! A connection over the cap or the rate is accepted and closed at once
//! (never left to rot in the kernel's backlog), counted, and logged at most
//! once a second per reason (per address for the rate), so a flood cannot
//! flood the log too.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::metrics::{Metrics, Refusal};

/// What an [`Acceptor`] lets in.
#[derive(Clone, Debug)]
pub struct AcceptLimits {
    pub max_connections: usize,
    /// New connections per second from one IP address (token bucket);
    /// `None` for no limit.
    pub per_ip: Option<Rate>,
    /// Connections open at once from one IP address; `None` for no limit.
    pub max_per_ip: Option<usize>,
}

/// A token bucket's refill rate and depth.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug)]
pub struct Acceptor {
    name: &'static str,
    listener: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
    backoff: Duration,
    limiter: Option<RateLimiter<IpAddr>>,
    max_per_ip: Option<usize>,
    open_per_ip: OpenPerIp,
    metrics: Option<Arc<Metrics>>,
    cap_warning: LogThrottle,
    per_ip_warning: LogThrottle,
}

/// An accepted connection; the permit frees its slot when dropped.
#[derive(Debug)]
pub struct Accepted {
    pub tcp: TcpStream,
    pub addr: SocketAddr,
    pub permit: Permit,
}

/// Connections open per address.
type OpenPerIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// A connection's slots: in the cap, and in its address's count.
#[derive(Debug)]
pub struct Permit {
    _cap: Option<OwnedSemaphorePermit>,
    ip: Option<(IpAddr, OpenPerIp)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((ip, open)) = self.ip.take() {
            let mut open = open
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = open.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&ip);
                }
            }
        }
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one log line per this long for each kind of refusal.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Says when a repeated refusal may be logged again: at most once per
/// [`WARN_EVERY`].
#[derive(Debug, Default)]
pub struct LogThrottle(Option<Instant>);

impl LogThrottle {
    /// Whether to log now; if so, the next is a while off.
    pub fn ready(&mut self, now: Instant) -> bool {
        let ready = self.0.is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
        if ready {
            self.0 = Some(now);
        }
        ready
    }
}

impl Acceptor {
    pub fn new(
        name: &'static str,
        listener: TcpListener,
        limits: AcceptLimits,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let max = limits.max_connections.max(1);
        Self {
            name,
            listener,
            permits: Arc::new(Semaphore::new(max)),
            max,
            backoff: MIN_BACKOFF,
            limiter: limits.per_ip.map(RateLimiter::new),
            max_per_ip: limits.max_per_ip,
            open_per_ip: Arc::default(),
            metrics,
            cap_warning: LogThrottle::default(),
            per_ip_warning: LogThrottle::default(),
        }
    }

    /// Without a cap of its own: the caller applies one (evicting idle
    /// connections when it is reached).
    pub fn uncapped(mut self) -> Self {
        self.max = usize::MAX;
        self
    }

    fn refused(&self, r: Refusal) {
        if let Some(m) = &self.metrics {
            m.refused(r);
        }
    }

    /// The next connection let in, or `None` once `shutdown` turns true.
    pub async fn next(&mut self, shutdown: &mut watch::Receiver<bool>) -> Option<Accepted> {
        loop {
            if *shutdown.borrow() {
                return None;
            }
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = shutdown.changed() => return None,
            };
            let (tcp, addr) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(listener = self.name, error = %e, backoff = ?self.backoff, "accept failed; backing off");
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            self.backoff = MIN_BACKOFF;
            let now = Instant::now();
            let verdict = self
                .limiter
                .as_mut()
                .map(|l| (l.check(addr.ip(), now), l.rate));
            if let Some((verdict, rate)) = verdict {
                match verdict {
                    Verdict::Allow => {}
                    Verdict::Deny { warn } => {
                        self.refused(Refusal::RateLimited);
                        if warn {
                            tracing::warn!(listener = self.name, peer.ip = %addr.ip(), limit = rate.per_second, burst = rate.burst, reason = "rate_limited", "refused: too many connects from this address (limit per second); closing");
                        }
                        drop(tcp);
                        continue;
                    }
                }
            }
            let ip_slot = match self.max_per_ip {
                None => None,
                Some(max) => {
                    let mut open = self
                        .open_per_ip
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let n = open.entry(addr.ip()).or_insert(0);
                    if *n >= max {
                        drop(open);
                        self.refused(Refusal::Overloaded);
                        if self.per_ip_warning.ready(now) {
                            tracing::warn!(listener = self.name, peer.ip = %addr.ip(), max_per_ip = max, reason = "overloaded", "refused: too many connections open from this address; closing");
                        }
                        drop(tcp);
                        continue;
                    }
                    *n += 1;
                    Some((addr.ip(), self.open_per_ip.clone()))
                }
            };
            let cap = if self.max == usize::MAX {
                None
            } else {
                let Ok(p) = self.permits.clone().try_acquire_owned() else {
                    self.refused(Refusal::Overloaded);
                    if self.cap_warning.ready(now) {
                        tracing::warn!(listener = self.name, max_connections = self.max, peer.addr = %addr, reason = "overloaded", "refused: connection cap reached; closing new connections");
                    }
                    // The address's slot is freed with this.
                    drop(Permit {
                        _cap: None,
                        ip: ip_slot,
                    });
                    drop(tcp);
                    continue;
                };
                Some(p)
            };
            let _ = tcp.set_nodelay(true);
            return Some(Accepted {
                tcp,
                addr,
                permit: Permit {
                    _cap: cap,
                    ip: ip_slot,
                },
            });
        }
    }
}

/// Whether a connect may go on.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused; `warn` when this address has not been logged for a while.
    Deny {
        warn: bool,
    },
}

/// A token bucket per key (a source address, a manufacturer). Sans-IO: the
/// caller passes the time.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: Rate,
    buckets: HashMap<K, Bucket>,
    last_prune: Option<Instant>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    warned: LogThrottle,
}

/// Addresses tracked at most; past this the map is pruned of full buckets
/// first, and cleared if that is not enough (failing open, not out of memory).
const MAX_TRACKED: usize = 100_000;

impl<K: std::hash::Hash + Eq> RateLimiter<K> {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: HashMap::new(),
            last_prune: None,
        }
    }

    pub fn check(&mut self, key: K, now: Instant) -> Verdict {
        if self
            .last_prune
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
            || self.buckets.len() >= MAX_TRACKED
        {
            self.prune(now);
        }
        let rate = self.rate;
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
            warned: LogThrottle::default(),
        });
        let elapsed = now.duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate.per_second).min(rate.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Verdict::Allow;
        }
        Verdict::Deny {
            warn: b.warned.ready(now),
        }
    }

    /// Forgets addresses whose buckets have refilled: they behave as new.
    fn prune(&mut self, now: Instant) {
        let rate = self.rate;
        self.buckets.retain(|_, b| {
            b.tokens + now.duration_since(b.at).as_secs_f64() * rate.per_second < rate.burst
        });
        if self.buckets.len() >= MAX_TRACKED {
            self.buckets.clear();
        }
        self.last_prune = Some(now);
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_per_address() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Rate {
            per_second: 10.0,
            burst: 3.0,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        // The burst, then refusals; the first refusal is logged, the next not.
        for _ in 0..3 {
            assert_eq!(l.check(a, t0), Verdict::Allow);
        }
        assert_eq!(l.check(a, t0), Verdict::Deny { warn: true });
        assert_eq!(l.check(a, t0), Verdict::Deny { warn: false });
        // Another address has its own bucket.
        assert_eq!(l.check(b, t0), Verdict::Allow);
        // 100 ms later one token is back.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(l.check(a, t1), Verdict::Allow);
        assert_eq!(l.check(a, t1), Verdict::Deny { warn: false });
        // A second on, logged again; refilled buckets are forgotten.
        let t2 = t0 + Duration::from_secs(11);
        assert_eq!(l.check(a, t2), Verdict::Allow);
        assert_eq!(l.tracked(), 1, "b refilled and was pruned");
    }

    #[test]
    fn tracking_is_bounded() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(Rate {
            per_second: 1.0,
            burst: 1.0,
        });
        for i in 0..(MAX_TRACKED as u32 + 10) {
            let ip = IpAddr::from(i.to_be_bytes());
            assert_eq!(l.check(ip, t0), Verdict::Allow);
        }
        assert!(l.tracked() <= MAX_TRACKED);
    }
}
