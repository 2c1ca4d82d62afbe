//! What a session sends a device it serves itself (commands, retained
//! messages on its own topics): packet ids, the in-flight window the
//! device's Receive Maximum allows, and the QoS 1 and 2 acknowledgements.
//! Sans-IO: messages and acknowledgements in, PUBLISH and PUBREL out.
//!
//! Order is kept: a message waits behind earlier ones while the window is
//! full, whatever its QoS. A message stored in the device's durable queue
//! carries its sequence number, handed back when the device has
//! acknowledged it (PUBACK, or PUBCOMP for QoS 2) so the caller can drop it
//! from the queue.

use std::collections::{HashMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};
use rumqttd::protocol::{Publish, PublishProperties};

/// A message ready for the device, at the QoS it is to be delivered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Its place in the device's durable queue, if it is stored there.
    pub seq: Option<u64>,
    pub topic: Bytes,
    pub payload: Bytes,
    /// min(published QoS, granted QoS).
    pub qos: u8,
    pub retain: bool,
    pub props: Option<PublishProperties>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    /// QoS 1: for PUBACK.
    Ack,
    /// QoS 2: for PUBREC.
    Rec,
    /// QoS 2: PUBREL sent, for PUBCOMP.
    Comp,
}

#[derive(Debug)]
struct Flight {
    seq: Option<u64>,
    waiting: Waiting,
}

/// An acknowledgement the device had no business sending.
#[derive(Debug, PartialEq, Eq)]
pub struct Unexpected(pub String);

#[derive(Debug)]
pub struct Outbox {
    /// At most this many QoS 1 and 2 messages unacknowledged at once.
    window: usize,
    next_pkid: u16,
    in_flight: HashMap<u16, Flight>,
    pending: VecDeque<Outgoing>,
    /// The highest queue sequence number taken in: a stored message that
    /// arrives twice (loaded from the queue and announced live) goes once.
    last_seq: Option<u64>,
}

/// A PUBLISH with the given flags. (rumqttd keeps QoS, packet id and DUP
/// private; its own serialization is the one public way to set them.)
pub fn publish(
    topic: &Bytes,
    payload: &Bytes,
    qos: u8,
    pkid: u16,
    dup: bool,
    retain: bool,
) -> Publish {
    let mut b = BytesMut::with_capacity(5 + topic.len() + payload.len());
    b.put_u8(0b0011_0000 | u8::from(retain) | ((qos & 0b11) << 1) | (u8::from(dup) << 3));
    b.put_u16(pkid);
    // Topics came from PUBLISH packets or the queue: at most 65,535 octets.
    b.put_u16(u16::try_from(topic.len()).unwrap_or(u16::MAX));
    b.extend_from_slice(topic);
    b.extend_from_slice(payload);
    Publish::deserialize(b.freeze())
}

/// The QoS and packet id of a PUBLISH (private fields in rumqttd; its own
/// serialization starts with the flags, then the packet id).
pub fn qos_and_pkid(p: &Publish) -> (u8, u16) {
    let head = p.serialize();
    (
        (head[0] >> 1) & 0b11,
        u16::from_be_bytes([head[1], head[2]]),
    )
}

impl Outbox {
    /// `receive_maximum`: the device's (MQTT 5), else what the broker allows.
    pub fn new(receive_maximum: u16) -> Self {
        Self {
            window: usize::from(receive_maximum.max(1)),
            next_pkid: 1,
            in_flight: HashMap::new(),
            pending: VecDeque::new(),
            last_seq: None,
        }
    }

    /// Queues a message behind the others. A stored message already taken
    /// in is dropped; returns whether it was queued.
    pub fn push(&mut self, o: Outgoing) -> bool {
        if let Some(seq) = o.seq {
            if self.last_seq.is_some_and(|last| seq <= last) {
                return false;
            }
            self.last_seq = Some(seq);
        }
        self.pending.push_back(o);
        true
    }

    /// The highest queue sequence number taken in.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Messages waiting for room in the window, and in flight.
    pub fn len(&self) -> (usize, usize) {
        (self.pending.len(), self.in_flight.len())
    }

    /// The next PUBLISH to write, if the window has room for it, and for a
    /// stored message sent at QoS 0 its queue place (done once written).
    pub fn next_publish(&mut self) -> Option<(Publish, Option<PublishProperties>, Option<u64>)> {
        let front = self.pending.front()?;
        if front.qos == 0 {
            let o = self.pending.pop_front()?;
            return Some((
                publish(&o.topic, &o.payload, 0, 0, false, o.retain),
                o.props,
                o.seq,
            ));
        }
        if self.in_flight.len() >= self.window {
            return None;
        }
        let o = self.pending.pop_front()?;
        let pkid = self.free_pkid();
        self.in_flight.insert(
            pkid,
            Flight {
                seq: o.seq,
                waiting: if o.qos == 1 {
                    Waiting::Ack
                } else {
                    Waiting::Rec
                },
            },
        );
        Some((
            publish(&o.topic, &o.payload, o.qos.min(2), pkid, false, o.retain),
            o.props,
            None,
        ))
    }

    fn free_pkid(&mut self) -> u16 {
        // The window is at most 65,535, so a free id exists.
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.in_flight.contains_key(&id) {
                return id;
            }
        }
    }

    fn take(&mut self, pkid: u16, want: Waiting, what: &str) -> Result<Option<u64>, Unexpected> {
        match self.in_flight.get(&pkid) {
            Some(f) if f.waiting == want => Ok(self.in_flight.remove(&pkid).and_then(|f| f.seq)),
            _ => Err(Unexpected(format!(
                "{what} for packet id {pkid}, which awaits none"
            ))),
        }
    }

    /// PUBACK: the QoS 1 message is delivered; its queue place if stored.
    pub fn puback(&mut self, pkid: u16) -> Result<Option<u64>, Unexpected> {
        self.take(pkid, Waiting::Ack, "PUBACK")
    }

    /// PUBREC: the caller sends PUBREL for `pkid`.
    pub fn pubrec(&mut self, pkid: u16) -> Result<(), Unexpected> {
        match self.in_flight.get_mut(&pkid) {
            Some(f) if f.waiting == Waiting::Rec => {
                f.waiting = Waiting::Comp;
                Ok(())
            }
            // A repeated PUBREC is answered with PUBREL again.
            Some(f) if f.waiting == Waiting::Comp => Ok(()),
            _ => Err(Unexpected(format!(
                "PUBREC for packet id {pkid}, which awaits none"
            ))),
        }
    }

    /// PUBCOMP: the QoS 2 message is delivered; its queue place if stored.
    pub fn pubcomp(&mut self, pkid: u16) -> Result<Option<u64>, Unexpected> {
        self.take(pkid, Waiting::Comp, "PUBCOMP")
    }

    /// Drops the message just taken with [`Outbox::next_publish`] unsent
    /// (MQTT 5 3.1.2.11.4: too large for the client, it is discarded "as
    /// if it had completed sending"): frees its packet id; its queue place
    /// if stored.
    pub fn discard(&mut self, pkid: u16) -> Option<u64> {
        self.in_flight.remove(&pkid).and_then(|f| f.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(seq: Option<u64>, qos: u8, payload: &'static str) -> Outgoing {
        Outgoing {
            seq,
            topic: Bytes::from_static(b"devices/d/commands/x"),
            payload: Bytes::from_static(payload.as_bytes()),
            qos,
            retain: false,
            props: None,
        }
    }

    #[test]
    fn the_window_holds_and_order_is_kept() {
        let mut o = Outbox::new(1);
        o.push(out(Some(1), 1, "a"));
        o.push(out(None, 0, "b"));
        o.push(out(Some(2), 2, "c"));
        let (a, _, _) = o.next_publish().unwrap();
        let (qos, pkid) = qos_and_pkid(&a);
        assert_eq!((qos, &a.payload[..]), (1, &b"a"[..]));
        // QoS 0 needs no room in the window, and it is next in order.
        let (b, _, _) = o.next_publish().unwrap();
        assert_eq!((qos_and_pkid(&b).0, &b.payload[..]), (0, &b"b"[..]));
        // The QoS 2 one waits for the window.
        assert!(o.next_publish().is_none());
        assert_eq!(o.len(), (1, 1));
        assert!(o.puback(pkid + 1).is_err());
        assert_eq!(o.puback(pkid), Ok(Some(1)));
        assert!(o.puback(pkid).is_err(), "acknowledged twice");
        let (c, _, _) = o.next_publish().unwrap();
        let (qos, pkid) = qos_and_pkid(&c);
        assert_eq!(qos, 2);
        assert!(o.pubcomp(pkid).is_err(), "PUBCOMP before PUBREC");
        o.pubrec(pkid).unwrap();
        o.pubrec(pkid).unwrap();
        assert_eq!(o.pubcomp(pkid), Ok(Some(2)));
        assert_eq!(o.len(), (0, 0));
    }

    #[test]
    fn a_discarded_message_frees_its_place() {
        let mut o = Outbox::new(1);
        o.push(out(Some(3), 1, "too large"));
        o.push(out(Some(4), 1, "b"));
        let (p, _, _) = o.next_publish().unwrap();
        assert!(o.next_publish().is_none());
        assert_eq!(o.discard(qos_and_pkid(&p).1), Some(3));
        let (p, _, _) = o.next_publish().unwrap();
        assert_eq!(&p.payload[..], b"b");
    }

    #[test]
    fn a_stored_message_goes_once() {
        let mut o = Outbox::new(10);
        assert!(o.push(out(Some(5), 1, "a")));
        assert!(!o.push(out(Some(5), 1, "a")));
        assert!(!o.push(out(Some(4), 1, "old")));
        assert!(o.push(out(Some(6), 1, "b")));
        assert_eq!(o.last_seq(), Some(6));
    }

    #[test]
    fn packet_ids_skip_those_in_flight() {
        let mut o = Outbox::new(3);
        o.next_pkid = u16::MAX;
        for _ in 0..3 {
            o.push(out(None, 1, "x"));
        }
        let ids: Vec<u16> = (0..3)
            .map(|_| qos_and_pkid(&o.next_publish().unwrap().0).1)
            .collect();
        assert_eq!(ids, [u16::MAX, 1, 2]);
        o.puback(1).unwrap();
        o.next_pkid = u16::MAX;
        o.push(out(None, 1, "y"));
        assert_eq!(qos_and_pkid(&o.next_publish().unwrap().0).1, 1);
    }

    #[test]
    fn publish_sets_the_private_flags() {
        let p = publish(
            &Bytes::from_static(b"t"),
            &Bytes::from_static(b"p"),
            2,
            7,
            true,
            true,
        );
        assert_eq!(qos_and_pkid(&p), (2, 7));
        assert!(p.retain);
        assert_eq!(p.serialize()[0] & 0b1000, 0b1000);
    }
}
