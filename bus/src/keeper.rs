//! Devices' persistent sessions and command queues on JetStream, so that a
//! device resumes its session on whichever node it reconnects to, and a
//! command acknowledged to a service survives the node that took it.
//!
//! Two streams, one subject per device:
//! - `FLEETGATE_SESSIONS`, `fleetgate.session.<device id>`: the session's
//!   record (its subscriptions, expiry, when it disconnected) as JSON; one
//!   message kept per subject, read from the stream's leader. (No age
//!   limit: a device may stay connected for longer than any. A record
//!   whose session expired is ended when its device next connects.)
//! - `FLEETGATE_QUEUE`, `fleetgate.queue.<device id>`: the device's queued
//!   commands in the session store's layout ([`Message::to_bytes`]), in
//!   order. The stream enforces the per-device count and the age limit
//!   itself (per-subject limit with discard-new: a full queue refuses the
//!   new command, as on one node); the per-message size is checked here.
//!   A message's place in the queue is its stream sequence: the device's
//!   PUBACK deletes it by that number.
//!
//! Every call blocks its (blocking-pool) thread on the runtime, within
//! [`TIMEOUT`]; an unreachable NATS is [`Error::Unavailable`], and nothing
//! is then acknowledged.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, context, stream};
use provisioning::sessions::{Message, QueueLimits, Queued, SessionRecord};
use provisioning::{DeviceId, Error};

use provisioning::sessions::Keeper;

pub const SESSIONS: &str = "FLEETGATE_SESSIONS";
const SESSION_PREFIX: &str = "fleetgate.session.";
pub const QUEUE: &str = "FLEETGATE_QUEUE";
const QUEUE_PREFIX: &str = "fleetgate.queue.";
/// The last token of a read barrier's subject: `@` is in no device id.
const BARRIER: &str = "@barrier";

/// How long one call may wait for JetStream.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Sessions and queues on JetStream.
#[derive(Debug)]
pub struct JetStreamKeeper {
    client: async_nats::Client,
    js: jetstream::Context,
    sessions: stream::Stream,
    queue: stream::Stream,
    rt: tokio::runtime::Handle,
    /// Seals session records and queued commands ([`super::seal`]).
    key: super::BusKey,
}

impl JetStreamKeeper {
    /// Makes sure both streams are there. The queue's limits are the
    /// first node's: every node is to run with the same.
    pub(super) async fn open(
        client: &async_nats::Client,
        js: &jetstream::Context,
        replicas: usize,
        limits: &QueueLimits,
        key: super::BusKey,
    ) -> anyhow::Result<Self> {
        let sessions = super::streams::ensure(
            js,
            stream::Config {
                name: SESSIONS.into(),
                subjects: vec![format!("{SESSION_PREFIX}>")],
                storage: stream::StorageType::File,
                num_replicas: replicas.max(1),
                max_messages_per_subject: 1,
                discard: stream::DiscardPolicy::Old,
                allow_direct: true,
                ..Default::default()
            },
        )
        .await?;
        let max_age = Duration::from_millis(limits.max_age_ms.max(1000) as u64);
        let mut queue = super::streams::ensure(
            js,
            stream::Config {
                name: QUEUE.into(),
                subjects: vec![format!("{QUEUE_PREFIX}>")],
                storage: stream::StorageType::File,
                num_replicas: replicas.max(1),
                max_messages_per_subject: limits.max_messages as i64,
                discard: stream::DiscardPolicy::New,
                discard_new_per_subject: true,
                max_age,
                max_message_size: limits.max_bytes.min(i32::MAX as usize) as i32,
                allow_direct: true,
                ..Default::default()
            },
        )
        .await?;
        let info = queue.info().await?;
        if info.config.max_messages_per_subject != limits.max_messages as i64
            || info.config.max_age != max_age
        {
            tracing::warn!(
                stream = QUEUE,
                max_messages = info.config.max_messages_per_subject,
                max_age_secs = info.config.max_age.as_secs(),
                "bus: the command queues keep the limits the stream was made with, not this node's"
            );
        }
        Ok(Self {
            client: client.clone(),
            js: js.clone(),
            sessions,
            queue,
            rt: tokio::runtime::Handle::current(),
            key,
        })
    }

    /// Runs `f` to completion from a blocking thread (or an async worker,
    /// which it then gives up meanwhile), within [`TIMEOUT`]; at once
    /// while NATS is not connected.
    fn block<T>(&self, what: &str, f: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(Error::Unavailable(format!(
                "NATS is not connected ({what})"
            )));
        }
        let timed = tokio::time::timeout(TIMEOUT, f);
        match tokio::task::block_in_place(|| self.rt.block_on(timed)) {
            Ok(r) => r,
            Err(_) => Err(Error::Unavailable(format!(
                "NATS JetStream did not answer within {} s ({what})",
                TIMEOUT.as_secs()
            ))),
        }
    }

    /// Headers with the seal of `payload` under `subject`.
    fn seal_headers(&self, subject: &str, payload: &[u8]) -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        let seal = self.key.seal(&[subject.as_bytes(), payload]);
        h.insert(super::seal::HEADER, seal.as_str());
        h
    }

    /// Whether a stored record carries a node's seal.
    fn sealed(&self, m: &async_nats::jetstream::message::StreamMessage) -> bool {
        let seal = m.headers.get(super::seal::HEADER).map(|v| v.as_str());
        self.key.verify(&[m.subject.as_bytes(), &m.payload], seal)
    }

    /// A write to the stream of `prefix` that only its leader, with a
    /// majority, acknowledges: once it is, everything committed before it
    /// is in the leader's copy, so the read that follows is not answered
    /// from a replica's or a deposed leader's. (JetStream answers a
    /// message read from whatever copy the server that takes it has: a
    /// replica that missed writes answers direct gets, and a leader cut
    /// off from the others goes on answering reads until it notices. The
    /// fault harness, issue 30, had devices resume on a stale session or
    /// queue, their commands out of order or gone.) The barrier's subject
    /// is no device's (`@`), and it is deleted again: the streams hold
    /// devices' records only (and the queue's per-subject limit never
    /// fills).
    async fn barrier(&self, stream: &stream::Stream, prefix: &str) -> Result<(), Error> {
        let subject = format!("{prefix}{BARRIER}");
        let ack = self
            .js
            .publish(subject, bytes::Bytes::new())
            .await
            .map_err(|e| unavailable("a read barrier", e))?
            .await
            .map_err(|e| unavailable("a read barrier", e))?;
        let _ = stream.delete_message(ack.sequence).await;
        Ok(())
    }

    async fn read_session(&self, id: &DeviceId) -> Result<Option<SessionRecord>, Error> {
        // From the leader, after a barrier (see `barrier`).
        self.barrier(&self.sessions, SESSION_PREFIX).await?;
        match self
            .sessions
            .get_last_raw_message_by_subject(&format!("{SESSION_PREFIX}{id}"))
            .await
        {
            Ok(m) if !self.sealed(&m) => {
                tracing::warn!(reason = "bus", device.id = %id, "bus: a session record no node sealed; taken as none");
                Ok(None)
            }
            Ok(m) => serde_json::from_slice(&m.payload)
                .map(|r| Some(disconnected_when_stored(r, &m)))
                .map_err(|e| Error::Corrupt(format!("session of {id} on JetStream: {e}"))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable("reading a session", e)),
        }
    }

    async fn write_session(
        &self,
        id: &DeviceId,
        rec: &SessionRecord,
        durable: bool,
    ) -> Result<(), Error> {
        let v = serde_json::to_vec(rec).expect("session records serialize");
        let subject = format!("{SESSION_PREFIX}{id}");
        let headers = self.seal_headers(&subject, &v);
        let ack = self
            .js
            .publish_with_headers(subject, headers, v.into())
            .await
            .map_err(|e| unavailable("recording a session", e))?;
        if durable {
            ack.await
                .map_err(|e| unavailable("recording a session", e))?;
        }
        Ok(())
    }

    /// Ends `id`'s session and drops its queue: how many commands were
    /// dropped. With `upto`, only the session records up to and with that
    /// stream sequence go (a newer one, written meanwhile, stays).
    async fn end(&self, id: &DeviceId, upto: Option<u64>) -> Result<usize, Error> {
        let purge = self
            .sessions
            .purge()
            .filter(format!("{SESSION_PREFIX}{id}"));
        match upto {
            Some(seq) => purge.sequence(seq + 1).await,
            None => purge.await,
        }
        .map_err(|e| unavailable("ending a session", e))?;
        let q = self
            .queue
            .purge()
            .filter(format!("{QUEUE_PREFIX}{id}"))
            .await
            .map_err(|e| unavailable("dropping a queue", e))?;
        Ok(q.purged as usize)
    }
}

/// A disconnected session's record, its disconnect dated by when JetStream
/// stored it (the NATS server's clock), not by the writing node's: a node
/// a few minutes behind wrote times that made a 60 s session expire at
/// once everywhere else, and one ahead kept sessions past their expiry.
/// Only a disconnect writes a record that says disconnected.
fn disconnected_when_stored(
    mut rec: SessionRecord,
    m: &async_nats::jetstream::message::StreamMessage,
) -> SessionRecord {
    if rec.disconnected_at.is_some() {
        rec.disconnected_at = Some(m.time.unix_timestamp());
    }
    rec
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("NATS JetStream, {what}: {e}"))
}

impl Keeper for JetStreamKeeper {
    fn session(&self, id: &DeviceId) -> Result<Option<SessionRecord>, Error> {
        self.block("reading a session", self.read_session(id))
    }

    fn save_session(&self, id: &DeviceId, rec: &SessionRecord, durable: bool) -> Result<(), Error> {
        self.block("recording a session", self.write_session(id, rec, durable))
    }

    fn disconnected(&self, id: &DeviceId, at: i64) -> Result<(), Error> {
        self.block("recording a disconnect", async {
            if let Some(mut rec) = self.read_session(id).await? {
                rec.disconnected_at = Some(at);
                self.write_session(id, &rec, false).await?;
            }
            Ok(())
        })
    }

    fn end_session(&self, id: &DeviceId) -> Result<usize, Error> {
        self.block("ending a session", self.end(id, None))
    }

    fn enqueue(
        &self,
        id: &DeviceId,
        mut m: Message,
        limits: &QueueLimits,
        now_ms: i64,
    ) -> Result<u64, Error> {
        let size = m.topic.len() + m.payload.len();
        if size > limits.max_bytes {
            return Err(Error::QuotaExceeded {
                reason: format!(
                    "device {id}'s command queue would hold {size} bytes, at most {}",
                    limits.max_bytes
                ),
            });
        }
        limits.stamp(&mut m, now_ms);
        let subject = format!("{QUEUE_PREFIX}{id}");
        self.block("queueing a command", async {
            let payload = m.to_bytes();
            let headers = self.seal_headers(&subject, &payload);
            let ack = self
                .js
                .publish_with_headers(subject, headers, payload.into())
                .await
                .map_err(|e| unavailable("queueing a command", e))?
                .await;
            match ack {
                Ok(a) => Ok(a.sequence),
                Err(e) if queue_full(&e) => Err(Error::QuotaExceeded {
                    reason: format!(
                        "device {id}'s command queue is full (at most {} messages)",
                        limits.max_messages
                    ),
                }),
                Err(e) => Err(unavailable("queueing a command", e)),
            }
        })
    }

    fn queued(&self, id: &DeviceId, after: Option<u64>, now_ms: i64) -> Result<Vec<Queued>, Error> {
        let subject = format!("{QUEUE_PREFIX}{id}");
        self.block("reading a queue", async {
            self.barrier(&self.queue, QUEUE_PREFIX).await?;
            let mut out = Vec::new();
            let mut next = after.map_or(1, |s| s.saturating_add(1));
            loop {
                // From the leader, after a barrier (see `barrier`).
                let m = match self
                    .queue
                    .get_first_raw_message_by_subject(subject.as_str(), next)
                    .await
                {
                    Ok(m) => m,
                    Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                    Err(e) => return Err(unavailable("reading a queue", e)),
                };
                next = m.sequence.saturating_add(1);
                if !self.sealed(&m) {
                    tracing::warn!(reason = "bus", device.id = %id, seq = m.sequence, "bus: a queued command no node sealed; not delivered");
                    let _ = self.queue.delete_message(m.sequence).await;
                    continue;
                }
                let mut message = Message::from_bytes(&m.payload)?;
                // Its age from when JetStream stored it, by the NATS
                // server's clock, not the queueing node's: a command
                // queued by a node whose clock was a day behind expired
                // as it was queued (the fault harness, issue 30).
                let stored = (m.time.unix_timestamp_nanos() / 1_000_000) as i64;
                let shift = stored - message.stored_at_ms;
                message.expires_at_ms = message.expires_at_ms.map(|t| t.saturating_add(shift));
                message.stored_at_ms = stored;
                if message.expires_at_ms.is_some_and(|t| t <= now_ms) {
                    let _ = self.queue.delete_message(m.sequence).await;
                    continue;
                }
                out.push(Queued {
                    seq: m.sequence,
                    message,
                });
            }
            Ok(out)
        })
    }

    fn delivered(&self, id: &DeviceId, seq: u64) {
        let queue = self.queue.clone();
        let id = id.clone();
        self.rt.spawn(async move {
            if let Err(e) = queue.delete_message(seq).await {
                tracing::debug!(device.id = %id, seq, error = %e, "bus: removing a delivered command failed; it may come again");
            }
        });
    }

    fn purge(&self, ids: &[DeviceId]) -> Result<usize, Error> {
        self.block("dropping revoked devices' queues", async {
            let mut n = 0;
            for id in ids {
                n += self.end(id, None).await?;
            }
            Ok(n)
        })
    }

    fn is_local(&self) -> bool {
        false
    }

    /// Every node sweeps the whole stream (at start and every ten
    /// minutes): a session is ended once, whichever node sees it first.
    /// A session still marked connected (here or on another node) is left
    /// alone; a purge removes only the record it read, so a device that
    /// came back meanwhile keeps the newer one. Commands expire on
    /// JetStream itself (the stream's max age).
    fn sweep(
        &self,
        now: i64,
        connected: &dyn Fn(&DeviceId) -> bool,
        keep: &dyn Fn(&DeviceId) -> bool,
    ) -> Result<provisioning::sessions::Swept, Error> {
        use futures_util::TryStreamExt;
        let subjects: Vec<(String, usize)> = self.block("listing sessions", async {
            self.sessions
                .info_with_subjects(format!("{SESSION_PREFIX}>"))
                .await
                .map_err(|e| unavailable("listing sessions", e))?
                .try_collect()
                .await
                .map_err(|e| unavailable("listing sessions", e))
        })?;
        let mut swept = provisioning::sessions::Swept::default();
        for (subject, _) in subjects {
            let Some(id) = subject
                .strip_prefix(SESSION_PREFIX)
                .and_then(|s| DeviceId::try_new(s.to_owned()).ok())
            else {
                continue;
            };
            if connected(&id) {
                continue;
            }
            let ended = self.block("sweeping a session", async {
                let m = match self
                    .sessions
                    .get_last_raw_message_by_subject(&subject)
                    .await
                {
                    Ok(m) => m,
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                        return Ok(None)
                    }
                    Err(e) => return Err(unavailable("reading a session", e)),
                };
                let rec: Option<SessionRecord> = serde_json::from_slice(&m.payload)
                    .ok()
                    .map(|r| disconnected_when_stored(r, &m));
                let over = match &rec {
                    // Unreadable: nothing can resume it.
                    None => true,
                    Some(r) => r.disconnected_at.is_some() && (r.expired(now) || !keep(&id)),
                };
                if !over {
                    return Ok(None);
                }
                // Up to and with the record read, not a newer one.
                self.end(&id, Some(m.sequence)).await.map(Some)
            })?;
            if let Some(dropped) = ended {
                swept.sessions += 1;
                swept.messages += dropped;
            }
        }
        Ok(swept)
    }
}

/// Whether JetStream refused a message because its subject is at the
/// per-subject limit (the stream discards new ones per subject).
fn queue_full(e: &context::PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|j| {
            j.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED
                && j.to_string().contains("per subject")
        })
}
