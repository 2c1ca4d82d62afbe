//! Sending to rumqttd's router without blocking an async worker.
//!
//! `LinkTx::send` is `async` but does a blocking send into the router's
//! bounded queue: on a runtime worker, a busy router would stall every task
//! on that worker (handshakes, keep-alives, kicks). A [`RouterTx`] owns a
//! link on a thread of its own and is fed through a bounded channel, so a
//! busy router makes only the senders wait: a session awaiting
//! [`RouterTx::send`] stops reading its socket, and the backpressure reaches
//! the publishing client, not the runtime.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::Packet;
use tokio::sync::mpsc;

/// Packets moved to the router in one wake of it, at most.
const BATCH: usize = 256;

/// The router is gone (it stopped, or dropped the link).
#[derive(Debug)]
pub struct Closed;

/// A router link driven from its own thread.
#[derive(Debug, Clone)]
pub struct RouterTx {
    tx: mpsc::Sender<Packet>,
}

impl RouterTx {
    /// Moves `link` to a thread named `name`, with room for `capacity`
    /// packets in front of it. `rx` is kept alive with it, for links whose
    /// notifications nobody reads (the ingest links get none).
    pub fn spawn(
        name: String,
        link: LinkTx,
        rx: Option<LinkRx>,
        capacity: usize,
    ) -> std::io::Result<Self> {
        let (tx, queue) = mpsc::channel(capacity.max(1));
        std::thread::Builder::new()
            .name(name)
            .stack_size(128 * 1024)
            .spawn(move || {
                let _rx = rx;
                run(link, queue);
            })?;
        Ok(Self { tx })
    }

    /// Hands `p` to the router, waiting while the link's queue is full.
    pub async fn send(&self, p: Packet) -> Result<(), Closed> {
        match self.try_send(p) {
            Ok(()) => Ok(()),
            // Boxed: the wait for room, which is rare, does not make the
            // future of every caller (a session's pump) bigger.
            Err(TrySend::Full(p)) => Box::pin(self.tx.send(*p)).await.map_err(|_| Closed),
            Err(TrySend::Closed) => Err(Closed),
        }
    }

    /// Hands `p` to the router if the link's queue has room now.
    pub fn try_send(&self, p: Packet) -> Result<(), TrySend> {
        self.tx.try_send(p).map_err(|e| match e {
            mpsc::error::TrySendError::Full(p) => TrySend::Full(Box::new(p)),
            mpsc::error::TrySendError::Closed(_) => TrySend::Closed,
        })
    }
}

/// Why [`RouterTx::try_send`] did not hand a packet over.
#[derive(Debug)]
pub enum TrySend {
    /// The link's queue is full: the packet, to send when it has room.
    Full(Box<Packet>),
    /// The router is gone.
    Closed,
}

fn run(mut link: LinkTx, mut queue: mpsc::Receiver<Packet>) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Some(last) = batch.pop() else { continue };
        link.buffer().extend(batch);
        // One wake of the router for the whole batch.
        if ready(link.send(last)).is_err() {
            tracing::debug!("mqtt: the router dropped a link");
            return;
        }
    }
}

/// Runs a future that never waits on anything but a blocking call inside
/// (`LinkTx::send` in rumqttd 0.20) on this thread.
pub(super) fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// The router links devices' messages go in by (devices have no link of
/// their own: per-device state in the router would grow with the fleet).
#[derive(Debug)]
pub struct Ingest {
    links: Vec<RouterTx>,
}

impl Ingest {
    pub fn new(links: Vec<RouterTx>) -> Self {
        assert!(!links.is_empty(), "at least one ingest link");
        Self { links }
    }

    /// The link `key`'s messages go by (one sender's messages keep their
    /// order).
    pub fn link(&self, key: &str) -> &RouterTx {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.links[(h.finish() % self.links.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::Publish;

    fn publish(topic: &'static str) -> Packet {
        Packet::Publish(Publish::new(topic, "x", false), None)
    }

    fn topic(p: &Packet) -> &[u8] {
        match p {
            Packet::Publish(p, _) => &p.topic,
            _ => b"",
        }
    }

    /// A full queue gives the packet back, to wait for room with; a gone
    /// router says so; what went in comes out in order.
    #[test]
    fn try_send_takes_while_there_is_room_and_gives_back_what_it_cannot() {
        let (tx, mut queue) = mpsc::channel(2);
        let link = RouterTx { tx };
        link.try_send(publish("a")).unwrap();
        link.try_send(publish("b")).unwrap();
        match link.try_send(publish("c")) {
            Err(TrySend::Full(p)) => assert_eq!(topic(&p), b"c"),
            other => panic!("a full queue: {other:?}"),
        }
        assert_eq!(topic(&queue.try_recv().unwrap()), b"a");
        link.try_send(publish("c")).unwrap();
        assert_eq!(topic(&queue.try_recv().unwrap()), b"b");
        assert_eq!(topic(&queue.try_recv().unwrap()), b"c");
        drop(queue);
        assert!(matches!(link.try_send(publish("d")), Err(TrySend::Closed)));
    }
}
