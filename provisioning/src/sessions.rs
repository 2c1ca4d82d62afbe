//! Durable MQTT session state for devices: the subscriptions of a persistent
//! session, its queue of commands waiting for the device, and the retained
//! messages on a device's own topics.
//!
//! Sans network: the broker decides what to store; this module keeps it in
//! the registry's sled database (trees `sessions`, `queue`, `retained`) so it
//! survives a restart or a kill -9. Everything acknowledged to a sender is
//! flushed first ([`SessionStore::enqueue`], [`SessionStore::retain`]).
//!
//! Keys: `queue` is `<device id> 0x00 <sequence, 8 octets big-endian>`, so
//! one device's queue is one ordered range; `retained` is
//! `<device id> 0x00 <topic>`. Device ids never contain 0x00.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{DeviceId, Error};

/// A subscription a persistent session keeps while its device is away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFilter {
    pub filter: String,
    /// The granted QoS, 0 to 2.
    pub qos: u8,
    #[serde(default)]
    pub no_local: bool,
    #[serde(default)]
    pub retain_as_published: bool,
    /// The MQTT 5 subscription identifier.
    #[serde(default)]
    pub id: Option<usize>,
}

/// A device's persistent session while it is not connected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub filters: Vec<StoredFilter>,
    /// How long the session outlives its connection, in seconds
    /// (`u32::MAX`: until the broker's own bound).
    pub expiry_secs: u32,
    /// Unix seconds of the last disconnect; `None` while connected.
    #[serde(default)]
    pub disconnected_at: Option<i64>,
}

impl SessionRecord {
    /// Whether the session has ended by `now` (unix seconds). Both ends
    /// are whole seconds, so the interval is kept at least in full: a
    /// session disconnected at 10.9 s with an expiry of 5 s is still there
    /// at 15.2 s (15 - 10 is not over 5), and gone from 16 s.
    pub fn expired(&self, now: i64) -> bool {
        self.disconnected_at
            .is_some_and(|at| now.saturating_sub(at) > i64::from(self.expiry_secs))
    }
}

/// The MQTT 5 properties a message keeps while it waits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProps {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_format_indicator: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_topic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_data: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
    /// The MQTT 5 message expiry interval it was published with, in
    /// seconds (what is left of it goes to the device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_expiry_interval: Option<u32>,
}

/// A message for a device: a command in its queue, or a retained message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The QoS it was published with.
    pub qos: u8,
    pub retain: bool,
    pub props: MessageProps,
    /// Unix milliseconds.
    pub stored_at_ms: i64,
    /// Unix milliseconds after which it is dropped undelivered.
    pub expires_at_ms: Option<i64>,
}

/// A message in a device's queue, with its place in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub seq: u64,
    pub message: Message,
}

/// How much one device's queue may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_messages: usize,
    /// Topic and payload bytes.
    pub max_bytes: usize,
    /// How long a message may wait, in milliseconds, whatever its own expiry.
    pub max_age_ms: i64,
    /// Bytes one device's retained messages may take, as stored (topic,
    /// payload and properties); `max_messages` bounds their count.
    pub retained_bytes: usize,
}

impl QueueLimits {
    /// Marks `m` as queued at `now_ms`: it expires by its own expiry or
    /// the queue's age limit, whichever comes first.
    pub fn stamp(&self, m: &mut Message, now_ms: i64) {
        let bound = now_ms.saturating_add(self.max_age_ms);
        m.expires_at_ms = Some(m.expires_at_ms.map_or(bound, |t| t.min(bound)));
        m.stored_at_ms = now_ms;
    }
}

impl Default for QueueLimits {
    fn default() -> Self {
        Self {
            max_messages: 100,
            max_bytes: 1024 * 1024,
            max_age_ms: 24 * 3600 * 1000,
            retained_bytes: 1024 * 1024,
        }
    }
}

/// What [`SessionStore::sweep`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub sessions: usize,
    pub messages: usize,
}

/// The durable side of devices' MQTT sessions. Cheap to clone.
#[derive(Clone)]
pub struct SessionStore {
    db: sled::Db,
    sessions: sled::Tree,
    queue: sled::Tree,
    retained: sled::Tree,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// The current time in unix milliseconds.
pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn prefix(id: &DeviceId) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.as_str().len() + 9);
    k.extend_from_slice(id.as_str().as_bytes());
    k.push(0);
    k
}

fn queue_key(id: &DeviceId, seq: u64) -> Vec<u8> {
    let mut k = prefix(id);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    let tail = key.get(key.len().checked_sub(8)?..)?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

/// Record layout: version 1, qos, retain, stored_at (i64 BE), expires_at (i64
/// BE, `i64::MIN` for none), topic length (u16 BE), topic, properties length
/// (u32 BE), properties (JSON), payload (the rest).
const RECORD_V1: u8 = 1;

impl Message {
    /// The message in its stored layout (also how it crosses nodes).
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// A message from [`Message::to_bytes`]; `Corrupt` if it is not one.
    pub fn from_bytes(b: &[u8]) -> Result<Message, Error> {
        decode(b)
    }
}

fn encode(m: &Message) -> Vec<u8> {
    let props = if m.props == MessageProps::default() {
        Vec::new()
    } else {
        serde_json::to_vec(&m.props).expect("message properties serialize")
    };
    let mut out = Vec::with_capacity(24 + m.topic.len() + props.len() + m.payload.len());
    out.push(RECORD_V1);
    out.push(m.qos);
    out.push(u8::from(m.retain));
    out.extend_from_slice(&m.stored_at_ms.to_be_bytes());
    out.extend_from_slice(&m.expires_at_ms.unwrap_or(i64::MIN).to_be_bytes());
    // Topics are at most 65,535 octets by MQTT's own encoding.
    let topic_len = u16::try_from(m.topic.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&topic_len.to_be_bytes());
    out.extend_from_slice(&m.topic.as_bytes()[..usize::from(topic_len)]);
    out.extend_from_slice(&u32::try_from(props.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&props);
    out.extend_from_slice(&m.payload);
    out
}

fn decode(b: &[u8]) -> Result<Message, Error> {
    let corrupt = || Error::Corrupt("queued message: truncated or unknown layout".into());
    let mut r = b;
    let mut take = |n: usize| -> Result<&[u8], Error> {
        if r.len() < n {
            return Err(corrupt());
        }
        let (head, rest) = r.split_at(n);
        r = rest;
        Ok(head)
    };
    let head = take(3)?;
    if head[0] != RECORD_V1 || head[1] > 2 {
        return Err(corrupt());
    }
    let (qos, retain) = (head[1], head[2] != 0);
    let stored_at_ms = i64::from_be_bytes(take(8)?.try_into().map_err(|_| corrupt())?);
    let expires = i64::from_be_bytes(take(8)?.try_into().map_err(|_| corrupt())?);
    let topic_len = u16::from_be_bytes(take(2)?.try_into().map_err(|_| corrupt())?);
    let topic = String::from_utf8(take(usize::from(topic_len))?.to_vec()).map_err(|_| corrupt())?;
    let props_len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| corrupt())?);
    let props_bytes = take(props_len as usize)?;
    let props = if props_bytes.is_empty() {
        MessageProps::default()
    } else {
        serde_json::from_slice(props_bytes)
            .map_err(|e| Error::Corrupt(format!("queued message properties: {e}")))?
    };
    Ok(Message {
        topic,
        payload: r.to_vec(),
        qos,
        retain,
        props,
        stored_at_ms,
        expires_at_ms: (expires != i64::MIN).then_some(expires),
    })
}

impl SessionStore {
    /// This node's own sessions store at `path` (a node whose registry is
    /// shared keeps its devices' MQTT sessions to itself).
    pub fn open_at(path: &std::path::Path) -> Result<Self, Error> {
        Self::open_at_with(path, None)
    }

    /// [`SessionStore::open_at`], with sled's page cache bounded to
    /// `cache_bytes` (its default, 1 GiB, if `None`).
    pub fn open_at_with(path: &std::path::Path, cache_bytes: Option<u64>) -> Result<Self, Error> {
        let mut config = sled::Config::new().path(path).flush_every_ms(None);
        if let Some(bytes) = cache_bytes {
            config = config.cache_capacity(bytes);
        }
        let db = config.open()?;
        Self::open(&db)
    }

    pub(crate) fn open(db: &sled::Db) -> Result<Self, Error> {
        Ok(Self {
            sessions: db.open_tree("sessions")?,
            queue: db.open_tree("queue")?,
            retained: db.open_tree("retained")?,
            db: db.clone(),
        })
    }

    /// The persistent session `id` left, if any.
    pub fn session(&self, id: &DeviceId) -> Result<Option<SessionRecord>, Error> {
        self.sessions
            .get(id.as_str())?
            .map(|v| {
                serde_json::from_slice(&v).map_err(|e| Error::Corrupt(format!("session: {e}")))
            })
            .transpose()
    }

    /// Records (or replaces) `id`'s persistent session; durable on return.
    pub fn save_session(&self, id: &DeviceId, rec: &SessionRecord) -> Result<(), Error> {
        let v = serde_json::to_vec(rec).expect("session records serialize");
        self.sessions.insert(id.as_str(), v)?;
        self.db.flush()?;
        Ok(())
    }

    /// Records `id`'s session without waiting for the disk: for a record
    /// whose loss in a crash loses nothing acknowledged.
    pub fn touch_session(&self, id: &DeviceId, rec: &SessionRecord) -> Result<(), Error> {
        let v = serde_json::to_vec(rec).expect("session records serialize");
        self.sessions.insert(id.as_str(), v)?;
        Ok(())
    }

    /// Marks `id`'s session as disconnected at `at` (unix seconds), so that
    /// it expires from then. Not flushed: a crash loses only the time,
    /// which the next sweep then takes as "disconnected at the restart".
    pub fn disconnected(&self, id: &DeviceId, at: i64) -> Result<(), Error> {
        if let Some(mut rec) = self.session(id)? {
            rec.disconnected_at = Some(at);
            let v = serde_json::to_vec(&rec).expect("session records serialize");
            self.sessions.insert(id.as_str(), v)?;
        }
        Ok(())
    }

    /// Ends `id`'s session: its record and its queue (retained messages
    /// stay; they belong to the topics, not the session). Durable on return.
    pub fn end_session(&self, id: &DeviceId) -> Result<usize, Error> {
        // The queue first: a crash between the two leaves the record, and
        // the session is ended again at the device's next connect (a queue
        // without its record would be nobody's, never read nor cleared).
        let dropped = self.clear_queue(id)?;
        let had = self.sessions.remove(id.as_str())?.is_some();
        if had || dropped > 0 {
            self.db.flush()?;
        }
        Ok(dropped)
    }

    fn clear_queue(&self, id: &DeviceId) -> Result<usize, Error> {
        let mut n = 0;
        for kv in self.queue.scan_prefix(prefix(id)) {
            let (k, _) = kv?;
            self.queue.remove(k)?;
            n += 1;
        }
        Ok(n)
    }

    /// Everything of `ids`: sessions, queues and retained messages (a
    /// revoked device's commands are never delivered). Durable on return.
    /// Returns how many messages were dropped.
    pub fn purge(&self, ids: &[DeviceId]) -> Result<usize, Error> {
        let mut n = 0;
        for id in ids {
            n += self.clear_queue(id)?;
            self.sessions.remove(id.as_str())?;
            for kv in self.retained.scan_prefix(prefix(id)) {
                let (k, _) = kv?;
                self.retained.remove(k)?;
                n += 1;
            }
        }
        self.db.flush()?;
        Ok(n)
    }

    /// Appends `m` to `id`'s queue within `limits`; durable on return.
    /// Expired messages ahead of it are dropped first. Returns its
    /// sequence number, or [`Error::QuotaExceeded`] saying which limit.
    /// The caller serializes enqueues per device.
    pub fn enqueue(
        &self,
        id: &DeviceId,
        mut m: Message,
        limits: &QueueLimits,
        now_ms: i64,
    ) -> Result<u64, Error> {
        let size = m.topic.len() + m.payload.len();
        let (mut count, mut bytes) = (0usize, 0usize);
        for kv in self.queue.scan_prefix(prefix(id)) {
            let (k, v) = kv?;
            let q = decode(&v)?;
            if q.expires_at_ms.is_some_and(|t| t <= now_ms) {
                self.queue.remove(k)?;
                continue;
            }
            count += 1;
            bytes += q.topic.len() + q.payload.len();
        }
        if count >= limits.max_messages {
            return Err(Error::QuotaExceeded {
                reason: format!(
                    "device {id}'s command queue is full ({count} messages, at most {})",
                    limits.max_messages
                ),
            });
        }
        if bytes + size > limits.max_bytes {
            return Err(Error::QuotaExceeded {
                reason: format!(
                    "device {id}'s command queue would hold {} bytes, at most {}",
                    bytes + size,
                    limits.max_bytes
                ),
            });
        }
        limits.stamp(&mut m, now_ms);
        let seq = self.db.generate_id()?;
        self.queue.insert(queue_key(id, seq), encode(&m))?;
        self.db.flush()?;
        Ok(seq)
    }

    /// `id`'s queued messages after `after` (all, if `None`), in order;
    /// expired ones are dropped on the way.
    pub fn queued(
        &self,
        id: &DeviceId,
        after: Option<u64>,
        now_ms: i64,
    ) -> Result<Vec<Queued>, Error> {
        let start = queue_key(id, after.map_or(0, |s| s.saturating_add(1)));
        let end = queue_key(id, u64::MAX);
        let mut out = Vec::new();
        for kv in self.queue.range(start..=end) {
            let (k, v) = kv?;
            let message = decode(&v)?;
            if message.expires_at_ms.is_some_and(|t| t <= now_ms) {
                self.queue.remove(k)?;
                continue;
            }
            if let Some(seq) = seq_of(&k) {
                out.push(Queued { seq, message });
            }
        }
        Ok(out)
    }

    /// Removes a delivered message. Not flushed: after a crash it is
    /// delivered again (QoS 1 allows that).
    pub fn delivered(&self, id: &DeviceId, seq: u64) -> Result<(), Error> {
        self.queue.remove(queue_key(id, seq))?;
        Ok(())
    }

    /// How many messages `id`'s queue holds.
    pub fn queue_len(&self, id: &DeviceId) -> usize {
        self.queue.scan_prefix(prefix(id)).count()
    }

    /// Keeps `m` as the retained message of its topic under device `id`
    /// (an empty payload removes it); durable on return when `flush`. A
    /// device keeps at most `limits.max_messages` retained topics and
    /// `limits.retained_bytes` bytes of them: past either,
    /// [`Error::QuotaExceeded`].
    pub fn retain(
        &self,
        id: &DeviceId,
        m: &Message,
        limits: &QueueLimits,
        flush: bool,
    ) -> Result<(), Error> {
        let mut k = prefix(id);
        k.extend_from_slice(m.topic.as_bytes());
        if m.payload.is_empty() {
            self.retained.remove(k)?;
        } else {
            let record = encode(m);
            let (mut count, mut bytes) = (0usize, record.len());
            for kv in self.retained.scan_prefix(prefix(id)) {
                let (other, v) = kv?;
                if other != k {
                    count += 1;
                    bytes += v.len();
                }
            }
            if count >= limits.max_messages {
                return Err(Error::QuotaExceeded {
                    reason: format!(
                        "device {id} already has {} retained messages",
                        limits.max_messages
                    ),
                });
            }
            if bytes > limits.retained_bytes {
                return Err(Error::QuotaExceeded {
                    reason: format!(
                        "device {id}'s retained messages would take {bytes} bytes, more than {}",
                        limits.retained_bytes
                    ),
                });
            }
            self.retained.insert(k, record)?;
        }
        if flush {
            self.db.flush()?;
        }
        Ok(())
    }

    /// The retained messages whose topic `wanted` takes (expired ones
    /// dropped): `id`'s, or every device's. The topic is read from the
    /// key, so a message that does not match is never decoded.
    pub fn retained_where(
        &self,
        id: Option<&DeviceId>,
        now_ms: i64,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Vec<Message>, Error> {
        let mut out = Vec::new();
        let all = match id {
            Some(id) => self.retained.scan_prefix(prefix(id)),
            None => self.retained.iter(),
        };
        for kv in all {
            let (k, v) = kv?;
            let topic = k
                .iter()
                .position(|b| *b == 0)
                .and_then(|i| std::str::from_utf8(&k[i + 1..]).ok());
            if !topic.is_some_and(&wanted) {
                continue;
            }
            let m = decode(&v)?;
            if m.expires_at_ms.is_some_and(|t| t <= now_ms) {
                self.retained.remove(k)?;
                continue;
            }
            out.push(m);
        }
        Ok(out)
    }

    /// The retained messages on `id`'s topics (expired ones dropped).
    pub fn retained(&self, id: &DeviceId, now_ms: i64) -> Result<Vec<Message>, Error> {
        self.retained_where(Some(id), now_ms, |_| true)
    }

    /// Ends sessions that expired by `now` (unix seconds) or whose device
    /// `keep` says no longer stands, with their queues, and drops expired
    /// messages. Sessions marked connected are taken as disconnected now
    /// (after a restart nobody is connected). Durable on return.
    pub fn sweep(
        &self,
        now: i64,
        connected: impl Fn(&DeviceId) -> bool,
        keep: impl Fn(&DeviceId) -> bool,
    ) -> Result<Swept, Error> {
        let mut swept = Swept::default();
        let mut ids = Vec::new();
        for kv in self.sessions.iter() {
            let (k, v) = kv?;
            let Ok(id) = DeviceId::try_new(String::from_utf8_lossy(&k).into_owned()) else {
                self.sessions.remove(k)?;
                continue;
            };
            let mut rec: SessionRecord =
                serde_json::from_slice(&v).map_err(|e| Error::Corrupt(format!("session: {e}")))?;
            ids.push(id.clone());
            if connected(&id) {
                continue;
            }
            if !keep(&id) || rec.expired(now) {
                self.sessions.remove(k)?;
                swept.sessions += 1;
                swept.messages += self.clear_queue(&id)?;
            } else if rec.disconnected_at.is_none() {
                rec.disconnected_at = Some(now);
                let v = serde_json::to_vec(&rec).expect("session records serialize");
                self.sessions.insert(k, v)?;
            }
        }
        let now_ms = now.saturating_mul(1000);
        for kv in self.queue.iter() {
            let (k, v) = kv?;
            if decode(&v).map_or(true, |m| m.expires_at_ms.is_some_and(|t| t <= now_ms)) {
                self.queue.remove(k)?;
                swept.messages += 1;
            }
        }
        self.db.flush()?;
        Ok(swept)
    }
}

/// Where devices' persistent sessions (their subscriptions) and command
/// queues are kept. Blocking: called on the blocking pool, except
/// [`Keeper::delivered`] and, for a [`Keeper::is_local`] keeper,
/// [`Keeper::session`].
pub trait Keeper: Send + Sync + std::fmt::Debug {
    /// The persistent session `id` left, if any.
    fn session(&self, id: &DeviceId) -> Result<Option<SessionRecord>, Error>;
    /// Records `id`'s session: durable on return if `durable` (before a
    /// SUBACK), otherwise whenever (a record whose loss loses nothing
    /// acknowledged).
    fn save_session(&self, id: &DeviceId, rec: &SessionRecord, durable: bool) -> Result<(), Error>;
    /// Starts the expiry of `id`'s session at `at` (unix seconds).
    fn disconnected(&self, id: &DeviceId, at: i64) -> Result<(), Error>;
    /// Ends `id`'s session, record and queue; durable on return. Returns
    /// how many queued messages were dropped.
    fn end_session(&self, id: &DeviceId) -> Result<usize, Error>;
    /// Appends `m` to `id`'s queue within `limits`, durable on return;
    /// its sequence number, or [`Error::QuotaExceeded`] saying which limit.
    fn enqueue(
        &self,
        id: &DeviceId,
        m: Message,
        limits: &QueueLimits,
        now_ms: i64,
    ) -> Result<u64, Error>;
    /// `id`'s queued messages after `after` (all, if `None`), in order,
    /// expired ones dropped.
    fn queued(&self, id: &DeviceId, after: Option<u64>, now_ms: i64) -> Result<Vec<Queued>, Error>;
    /// Removes a delivered message, not waiting for it (after a crash it
    /// may come again: QoS 1 allows that). Safe on an async worker.
    fn delivered(&self, id: &DeviceId, seq: u64);
    /// Ends the sessions of `ids` (revoked: their commands are never
    /// delivered); durable on return.
    fn purge(&self, ids: &[DeviceId]) -> Result<usize, Error>;
    /// Whether reads are in this process's memory (no network on the way).
    fn is_local(&self) -> bool;
    /// Ends the sessions that expired by `now` (unix seconds) or whose
    /// device `keep` no longer keeps, except those `connected` here, and
    /// drops expired messages.
    fn sweep(
        &self,
        now: i64,
        connected: &dyn Fn(&DeviceId) -> bool,
        keep: &dyn Fn(&DeviceId) -> bool,
    ) -> Result<Swept, Error>;
}

/// One node: sessions in the registry's sled database.
impl Keeper for SessionStore {
    fn session(&self, id: &DeviceId) -> Result<Option<SessionRecord>, Error> {
        SessionStore::session(self, id)
    }
    fn save_session(&self, id: &DeviceId, rec: &SessionRecord, durable: bool) -> Result<(), Error> {
        if durable {
            SessionStore::save_session(self, id, rec)
        } else {
            self.touch_session(id, rec)
        }
    }
    fn disconnected(&self, id: &DeviceId, at: i64) -> Result<(), Error> {
        SessionStore::disconnected(self, id, at)
    }
    fn end_session(&self, id: &DeviceId) -> Result<usize, Error> {
        SessionStore::end_session(self, id)
    }
    fn enqueue(
        &self,
        id: &DeviceId,
        m: Message,
        limits: &QueueLimits,
        now_ms: i64,
    ) -> Result<u64, Error> {
        SessionStore::enqueue(self, id, m, limits, now_ms)
    }
    fn queued(&self, id: &DeviceId, after: Option<u64>, now_ms: i64) -> Result<Vec<Queued>, Error> {
        SessionStore::queued(self, id, after, now_ms)
    }
    fn delivered(&self, id: &DeviceId, seq: u64) {
        if let Err(e) = SessionStore::delivered(self, id, seq) {
            tracing::error!(error = %e, "sessions: removing a delivered command");
        }
    }
    fn purge(&self, ids: &[DeviceId]) -> Result<usize, Error> {
        SessionStore::purge(self, ids)
    }
    fn is_local(&self) -> bool {
        true
    }
    fn sweep(
        &self,
        now: i64,
        connected: &dyn Fn(&DeviceId) -> bool,
        keep: &dyn Fn(&DeviceId) -> bool,
    ) -> Result<Swept, Error> {
        SessionStore::sweep(self, now, connected, keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SessionStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, SessionStore::open(&db).unwrap())
    }

    fn msg(topic: &str, payload: &[u8]) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.to_vec(),
            qos: 1,
            retain: false,
            props: MessageProps {
                correlation_data: Some(vec![0, 1, 255]),
                user_properties: vec![("k".into(), "v".into())],
                ..MessageProps::default()
            },
            stored_at_ms: 0,
            expires_at_ms: None,
        }
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::try_new(s).unwrap()
    }

    #[test]
    fn a_queue_keeps_order_and_its_limits() {
        let (_d, s) = store();
        let limits = QueueLimits {
            max_messages: 3,
            max_bytes: 1000,
            max_age_ms: 60_000,
            ..QueueLimits::default()
        };
        let (a, b) = (id("a"), id("a.b"));
        for i in 0..3u8 {
            s.enqueue(&a, msg("devices/a/commands/x", &[i]), &limits, 1_000)
                .unwrap();
        }
        // Another device's queue is apart, even with a shared prefix.
        s.enqueue(&b, msg("devices/a.b/commands/x", b"b"), &limits, 1_000)
            .unwrap();
        let full = s.enqueue(&a, msg("devices/a/commands/x", b"4"), &limits, 1_000);
        assert!(
            matches!(&full, Err(Error::QuotaExceeded { reason }) if reason.contains("full")),
            "{full:?}"
        );
        let q = s.queued(&a, None, 1_000).unwrap();
        assert_eq!(
            q.iter().map(|q| q.message.payload[0]).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(q[0].message.props.correlation_data, Some(vec![0, 1, 255]));
        assert_eq!(q[0].message.expires_at_ms, Some(61_000));
        assert_eq!(s.queued(&a, Some(q[0].seq), 1_000).unwrap().len(), 2);
        s.delivered(&a, q[0].seq).unwrap();
        assert_eq!(s.queue_len(&a), 2);
        // Bytes: 20 topic + 1,000 payload is over.
        let big = s.enqueue(&a, msg("devices/a/commands/x", &[0; 1000]), &limits, 1_000);
        assert!(matches!(big, Err(Error::QuotaExceeded { .. })), "{big:?}");
        // Age: past max_age the queue is empty and takes messages again.
        assert!(s.queued(&a, None, 61_000).unwrap().is_empty());
        s.enqueue(&a, msg("devices/a/commands/x", b"5"), &limits, 61_000)
            .unwrap();
        assert_eq!(s.queue_len(&b), 1);
    }

    #[test]
    fn sessions_expire_and_purge_takes_everything() {
        let (_d, s) = store();
        let a = id("a");
        let rec = SessionRecord {
            filters: vec![StoredFilter {
                filter: "devices/a/commands/#".into(),
                qos: 1,
                no_local: false,
                retain_as_published: false,
                id: Some(7),
            }],
            expiry_secs: 10,
            disconnected_at: None,
        };
        s.save_session(&a, &rec).unwrap();
        s.enqueue(
            &a,
            msg("devices/a/commands/x", b"1"),
            &QueueLimits::default(),
            0,
        )
        .unwrap();
        let mut retained = msg("devices/a/config", b"on");
        retained.retain = true;
        s.retain(&a, &retained, &QueueLimits::default(), true)
            .unwrap();
        assert_eq!(s.session(&a).unwrap(), Some(rec));
        // Connected sessions never expire; a disconnected one does.
        let swept = s.sweep(100, |_| true, |_| true).unwrap();
        assert_eq!(swept, Swept::default());
        s.disconnected(&a, 100).unwrap();
        assert_eq!(s.sweep(105, |_| false, |_| true).unwrap().sessions, 0);
        // Whole seconds at both ends: the full interval is kept.
        assert_eq!(s.sweep(110, |_| false, |_| true).unwrap().sessions, 0);
        let swept = s.sweep(111, |_| false, |_| true).unwrap();
        assert_eq!(
            swept,
            Swept {
                sessions: 1,
                messages: 1
            }
        );
        assert_eq!(s.retained(&a, 0).unwrap(), vec![retained.clone()]);
        s.purge(std::slice::from_ref(&a)).unwrap();
        assert!(s.retained(&a, 0).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            &[1],
            &[2, 0, 0],
            &[1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255],
        ] {
            assert!(matches!(decode(bad), Err(Error::Corrupt(_))), "{bad:?}");
        }
        let m = msg("t", b"p");
        assert_eq!(decode(&encode(&m)).unwrap(), m);
    }

    #[test]
    fn retained_messages_are_bounded_in_bytes_and_matched_by_key() {
        let (_d, s) = store();
        let a = id("a");
        let limits = QueueLimits {
            retained_bytes: 3000,
            ..QueueLimits::default()
        };
        let big = |topic: &str| Message {
            retain: true,
            ..msg(topic, &[7u8; 1000])
        };
        s.retain(&a, &big("devices/a/1"), &limits, false).unwrap();
        s.retain(&a, &big("devices/a/2"), &limits, false).unwrap();
        // A third would pass the byte bound; replacing one does not.
        let e = s
            .retain(&a, &big("devices/a/3"), &limits, false)
            .unwrap_err();
        assert!(matches!(e, Error::QuotaExceeded { .. }), "{e}");
        s.retain(&a, &big("devices/a/2"), &limits, false).unwrap();
        // Matched by topic, for one device or all.
        let got = s.retained_where(None, 0, |t| t.ends_with("/2")).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].topic, "devices/a/2");
        assert!(s.retained_where(None, 0, |_| false).unwrap().is_empty());
        assert_eq!(s.retained(&a, 0).unwrap().len(), 2);
        // What does not match is never decoded: a record that would not
        // decode stands in the way of nothing but its own topic.
        let mut k = prefix(&a);
        k.extend_from_slice(b"devices/a/bad");
        s.retained.insert(k, &b"not a record"[..]).unwrap();
        assert_eq!(
            s.retained_where(None, 0, |t| t.ends_with("/1"))
                .unwrap()
                .len(),
            1
        );
        assert!(s.retained_where(None, 0, |t| t.ends_with("/bad")).is_err());
    }
}
