//! What keeps a CMP message from being used twice: its messageTime must be
//! near ours, and each sender's senderNonce (and, for a request that opens
//! a transaction, its transactionID) is remembered for as long as the
//! message could pass that time check. A captured `kur` posted again is
//! refused instead of issuing another certificate. Sans-IO: the caller
//! passes the time.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use provisioning::cmp::{FailInfo, Failure};

/// How far a message's messageTime may be from ours.
pub const MAX_SKEW: Duration = Duration::from_secs(300);
/// How long a nonce or transactionID is remembered: a message accepted at
/// `t` with messageTime `m >= t - MAX_SKEW` passes the time check until
/// `m + MAX_SKEW <= t + 2 * MAX_SKEW`.
const REMEMBER: Duration = Duration::from_secs(2 * 300);
/// At most this many remembered; past it new messages are refused (fail
/// closed) until old ones age out.
const MAX_REMEMBERED: usize = 200_000;

/// What is remembered: a sender (its certificate's SHA-256) and one of its
/// values.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Nonce([u8; 32], Vec<u8>),
    Transaction([u8; 32], Vec<u8>),
}

/// One message's replay-relevant header fields.
#[derive(Debug)]
pub struct Header<'a> {
    /// SHA-256 of the protecting certificate.
    pub sender: [u8; 32],
    pub message_time: Option<SystemTime>,
    pub sender_nonce: Option<&'a [u8]>,
    pub transaction: &'a [u8],
    /// Whether it opens a transaction (ir, cr, p10cr, kur, rr, genm): its
    /// transactionID must be new. A certConf continues one.
    pub opens: bool,
}

/// Nonces and transactionIDs seen within [`REMEMBER`].
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: HashSet<Key>,
    order: VecDeque<(Instant, Key)>,
}

impl ReplayGuard {
    /// Accepts `h` once: `Err` if its time is off, or it repeats a nonce or
    /// a transaction this sender used within the window.
    pub fn check(&mut self, h: &Header<'_>, wall: SystemTime, now: Instant) -> Result<(), Failure> {
        let Some(at) = h.message_time else {
            return Err(Failure::new(
                FailInfo::BadTime,
                "the header has no messageTime: fleetgate needs it to refuse replays",
            ));
        };
        let skew = match at.duration_since(wall) {
            Ok(ahead) => ahead,
            Err(e) => e.duration(),
        };
        if skew > MAX_SKEW {
            return Err(Failure::new(
                FailInfo::BadTime,
                format!(
                    "messageTime is {} s from this server's clock (at most {} s)",
                    skew.as_secs(),
                    MAX_SKEW.as_secs()
                ),
            ));
        }
        let Some(nonce) = h.sender_nonce.filter(|n| n.len() >= 16) else {
            return Err(Failure::new(
                FailInfo::BadRequest,
                "the header has no senderNonce of at least 128 bits (RFC 9483 3.1)",
            ));
        };
        while let Some((t, _)) = self.order.front() {
            if now.saturating_duration_since(*t) < REMEMBER {
                break;
            }
            if let Some((_, k)) = self.order.pop_front() {
                self.seen.remove(&k);
            }
        }
        let nonce = Key::Nonce(h.sender, nonce.to_vec());
        if self.seen.contains(&nonce) {
            return Err(Failure::new(
                FailInfo::BadRequest,
                "a replay: this senderNonce was used before",
            ));
        }
        let transaction = h
            .opens
            .then(|| Key::Transaction(h.sender, h.transaction.to_vec()));
        if transaction.as_ref().is_some_and(|t| self.seen.contains(t)) {
            return Err(Failure::new(
                FailInfo::TransactionIdInUse,
                "this transactionID was used before: a new request takes a new one",
            ));
        }
        if self.order.len() + 2 > MAX_REMEMBERED {
            return Err(Failure::new(
                FailInfo::SystemUnavail,
                "too many CMP messages in the last minutes; try again later",
            ));
        }
        for k in std::iter::once(nonce).chain(transaction) {
            self.seen.insert(k.clone());
            self.order.push_back((now, k));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(nonce: &'a [u8], transaction: &'a [u8], at: SystemTime) -> Header<'a> {
        Header {
            sender: [7; 32],
            message_time: Some(at),
            sender_nonce: Some(nonce),
            transaction,
            opens: true,
        }
    }

    #[test]
    fn a_message_is_accepted_once() {
        let (wall, t0) = (SystemTime::now(), Instant::now());
        let mut g = ReplayGuard::default();
        let n1 = [1u8; 16];
        g.check(&header(&n1, b"t1", wall), wall, t0).unwrap();
        let e = g.check(&header(&n1, b"t1", wall), wall, t0).unwrap_err();
        assert_eq!(e.info, FailInfo::BadRequest, "{e}");
        // A fresh nonce in the same transaction: a new request may not
        // reuse it, a certConf continues it.
        let n2 = [2u8; 16];
        let e = g.check(&header(&n2, b"t1", wall), wall, t0).unwrap_err();
        assert_eq!(e.info, FailInfo::TransactionIdInUse);
        let conf = Header {
            opens: false,
            ..header(&n2, b"t1", wall)
        };
        g.check(&conf, wall, t0).unwrap();
        // Another sender's nonce space is its own.
        let other = Header {
            sender: [8; 32],
            ..header(&n1, b"t9", wall)
        };
        g.check(&other, wall, t0).unwrap();
    }

    #[test]
    fn time_is_checked_and_memory_ages_out() {
        let (wall, t0) = (SystemTime::now(), Instant::now());
        let mut g = ReplayGuard::default();
        let n = [3u8; 16];
        let old = wall - Duration::from_secs(301);
        assert_eq!(
            g.check(&header(&n, b"t", old), wall, t0).unwrap_err().info,
            FailInfo::BadTime
        );
        let ahead = wall + Duration::from_secs(301);
        assert_eq!(
            g.check(&header(&n, b"t", ahead), wall, t0)
                .unwrap_err()
                .info,
            FailInfo::BadTime
        );
        let none = Header {
            message_time: None,
            ..header(&n, b"t", wall)
        };
        assert_eq!(
            g.check(&none, wall, t0).unwrap_err().info,
            FailInfo::BadTime
        );
        let short = Header {
            sender_nonce: Some(&n[..8]),
            ..header(&n, b"t", wall)
        };
        assert_eq!(
            g.check(&short, wall, t0).unwrap_err().info,
            FailInfo::BadRequest
        );
        // Accepted at the edge of the window; the replay within it is
        // refused; once no replay could pass the time check, it is forgotten.
        let edge = wall - Duration::from_secs(299);
        g.check(&header(&n, b"t", edge), wall, t0).unwrap();
        let later = t0 + Duration::from_secs(200);
        let wall_later = wall + Duration::from_secs(200);
        assert!(g.check(&header(&n, b"t", edge), wall, later).is_err());
        assert_eq!(
            g.check(&header(&n, b"t", edge), wall_later, later)
                .unwrap_err()
                .info,
            FailInfo::BadTime
        );
        let gone = t0 + REMEMBER;
        assert!(g.seen.contains(&Key::Nonce([7; 32], n.to_vec())));
        g.check(&header(&[4u8; 16], b"u", wall), wall, gone)
            .unwrap();
        assert!(!g.seen.contains(&Key::Nonce([7; 32], n.to_vec())));
    }
}
