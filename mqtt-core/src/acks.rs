//! The acknowledgements a service session owes rumqttd's router, in the
//! order the router needs them. Sans-IO.
//!
//! The router sends a service its deliveries at the subscription's QoS,
//! with packet ids of its own, and needs their acknowledgements (PUBACK,
//! or PUBREC and later PUBCOMP) in the order it sent them. The session
//! delivers each at min(published QoS, granted QoS) under its own packet
//! ids ([`super::outbox::Outbox`], which honours the service's Receive
//! Maximum), so a client may acknowledge in any order and a downgraded
//! delivery needs no client acknowledgement at all: this queue turns "done
//! with the client" into the router's acknowledgements, in order.

use std::collections::VecDeque;

use rumqttd::protocol::{
    Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason,
};

#[derive(Debug)]
struct Entry {
    token: u64,
    pkid: u16,
    /// The router's QoS for it: 1 or 2.
    qos: u8,
    done: bool,
}

#[derive(Debug, Default)]
pub struct RouterAcks {
    next_token: u64,
    /// Deliveries not yet acknowledged to the router, in its order.
    owed: VecDeque<Entry>,
    /// QoS 2 deliveries acknowledged with PUBREC, awaiting the router's
    /// PUBREL (in order), to be answered with PUBCOMP.
    released: VecDeque<u16>,
}

impl RouterAcks {
    /// A delivery the router sent with `pkid` at `qos` (1 or 2). Returns
    /// the token that marks it done ([`RouterAcks::done`]). Tokens only
    /// grow.
    pub fn owe(&mut self, pkid: u16, qos: u8) -> u64 {
        self.next_token += 1;
        self.owed.push_back(Entry {
            token: self.next_token,
            pkid,
            qos,
            done: false,
        });
        self.next_token
    }

    /// A token for a delivery that did not come from the router (one the
    /// session acknowledges elsewhere), from the same sequence as the
    /// router's: the outbox takes tokens in growing order. [`RouterAcks::done`]
    /// with it changes nothing.
    pub fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// The client is done with the delivery `token` (acknowledged it, or
    /// it was sent at QoS 0). Returns what the router may have now.
    pub fn done(&mut self, token: u64) -> Vec<Packet> {
        if let Some(e) = self.owed.iter_mut().find(|e| e.token == token) {
            e.done = true;
        }
        let mut out = Vec::new();
        while self.owed.front().is_some_and(|e| e.done) {
            let Some(e) = self.owed.pop_front() else {
                break;
            };
            if e.qos == 1 {
                out.push(Packet::PubAck(
                    PubAck {
                        pkid: e.pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                ));
            } else {
                self.released.push_back(e.pkid);
                out.push(Packet::PubRec(
                    PubRec {
                        pkid: e.pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                ));
            }
        }
        out
    }

    /// The router's PUBREL for `pkid`: its PUBCOMP, if we owe one.
    pub fn pubrel(&mut self, pkid: u16) -> Option<Packet> {
        let i = self.released.iter().position(|p| *p == pkid)?;
        self.released.remove(i);
        Some(Packet::PubComp(
            PubComp {
                pkid,
                reason: PubCompReason::Success,
            },
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkids(p: &[Packet]) -> Vec<(char, u16)> {
        p.iter()
            .map(|p| match p {
                Packet::PubAck(a, _) => ('a', a.pkid),
                Packet::PubRec(r, _) => ('r', r.pkid),
                _ => ('?', 0),
            })
            .collect()
    }

    #[test]
    fn acknowledgements_reach_the_router_in_its_order() {
        let mut a = RouterAcks::default();
        let t1 = a.owe(1, 1);
        let t2 = a.owe(2, 2);
        let t3 = a.owe(3, 1);
        // The client acknowledges out of order: nothing until the first.
        assert!(a.done(t3).is_empty());
        assert!(a.done(t2).is_empty());
        assert_eq!(pkids(&a.done(t1)), [('a', 1), ('r', 2), ('a', 3)]);
        assert!(a.pubrel(9).is_none());
        assert!(matches!(a.pubrel(2), Some(Packet::PubComp(c, _)) if c.pkid == 2));
        assert!(a.pubrel(2).is_none(), "completed once");
        // Unknown tokens change nothing.
        assert!(a.done(99).is_empty());
    }

    #[test]
    fn a_token_from_elsewhere_grows_with_the_routers_and_owes_it_nothing() {
        let mut a = RouterAcks::default();
        let t1 = a.owe(1, 1);
        let other = a.token();
        let t2 = a.owe(2, 1);
        assert!(t1 < other && other < t2, "one growing sequence");
        assert!(a.done(other).is_empty(), "nothing owed to the router");
        assert!(a.done(t2).is_empty(), "still behind the first");
        assert_eq!(pkids(&a.done(t1)), [('a', 1), ('a', 2)]);
    }
}
