//! Commands to devices, outside rumqttd's router.
//!
//! The ACL says a device subscribes only under its own `devices/<id>/` and
//! only services publish there, so delivering a command is a lookup by
//! device id, not a topic match across the fleet. The hub keeps each live
//! device session's [`Mailbox`] (its subscriptions and a bounded channel
//! into the session, which owns packet ids, the in-flight window and the
//! acknowledgements) and, for persistent sessions, the durable record and
//! queue in a [`Keeper`]: the registry's sled store on one node
//! ([`provisioning::sessions`]), or JetStream in a cluster
//! ([`crate::bus::keeper`]), where a device resumes its session on any node.
//!
//! A QoS 1 or 2 command to a device with a persistent session is stored and
//! flushed before the service's PUBACK, whether the device is connected or
//! not; the session drops it from the store when the device acknowledges
//! it. Anything else goes straight into the live session's channel, or
//! nowhere.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use provisioning::sessions::Keeper;
use provisioning::sessions::{
    Message, QueueLimits, Queued, SessionRecord, SessionStore, StoredFilter,
};
use provisioning::{DeviceId, Registry, Status};
use tokio::sync::mpsc;

use super::acl::topic_matches;
use super::channel::Clock;

/// A message for a device session.
#[derive(Debug)]
pub struct Delivery {
    /// Its place in the durable queue, if stored there.
    pub seq: Option<u64>,
    pub message: Arc<Message>,
}

/// The highest QoS granted to the subscriptions that match a topic, and
/// their subscription identifiers.
pub type Granted = (u8, Vec<usize>);

/// A live device session, as the hub sees it.
#[derive(Debug)]
pub struct Mailbox {
    conn: u64,
    tx: mpsc::Sender<Delivery>,
    subs: Mutex<Vec<StoredFilter>>,
    /// The session outlives its connection by this many seconds; `None`
    /// for a session that ends with it.
    expiry: Option<u32>,
    /// A stored command did not fit in the channel: the session reads its
    /// queue again when it has room.
    reload: AtomicBool,
    /// It resumed a stored session: what was kept (record, queue) is to
    /// end with it if it does not outlive its connection.
    resumed: bool,
}

impl Mailbox {
    fn subs(&self) -> MutexGuard<'_, Vec<StoredFilter>> {
        self.subs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The highest QoS granted to a subscription matching `topic`, with the
    /// identifiers of every matching subscription.
    pub fn granted(&self, topic: &str) -> Option<(u8, Vec<usize>)> {
        self.granted_to(topic, false)
    }

    /// [`Mailbox::granted`], for a message the device itself published
    /// (`own`): subscriptions with No Local (MQTT 5) do not count.
    pub fn granted_to(&self, topic: &str, own: bool) -> Option<Granted> {
        let subs = self.subs();
        let mut best: Option<Granted> = None;
        for s in subs
            .iter()
            .filter(|s| !(own && s.no_local) && topic_matches(&s.filter, topic))
        {
            let b = best.get_or_insert((0, Vec::new()));
            b.0 = b.0.max(s.qos);
            b.1.extend(s.id);
        }
        best
    }

    /// How many subscriptions the session holds.
    pub fn subscriptions(&self) -> usize {
        self.subs().len()
    }

    /// Whether the session holds a subscription to `filter`.
    pub fn holds(&self, filter: &str) -> bool {
        self.subs().iter().any(|s| s.filter == filter)
    }

    pub fn is_persistent(&self) -> bool {
        self.expiry.is_some()
    }

    /// Whether a subscription matching `topic` asks for Retain As
    /// Published (MQTT 5): then a retained message is forwarded with its
    /// retain flag.
    pub fn retain_as_published(&self, topic: &str) -> bool {
        self.subs()
            .iter()
            .any(|s| s.retain_as_published && topic_matches(&s.filter, topic))
    }

    /// Whether the session should read its durable queue again.
    pub fn take_reload(&self) -> bool {
        self.reload.swap(false, Ordering::AcqRel)
    }

    /// Adds or replaces subscriptions; returns which filters were new.
    pub fn subscribe(&self, filters: &[StoredFilter]) -> Vec<bool> {
        let mut subs = self.subs();
        filters
            .iter()
            .map(|f| match subs.iter_mut().find(|s| s.filter == f.filter) {
                Some(s) => {
                    *s = f.clone();
                    false
                }
                None => {
                    subs.push(f.clone());
                    true
                }
            })
            .collect()
    }

    /// Removes subscriptions; returns which existed.
    pub fn unsubscribe(&self, filters: &[String]) -> Vec<bool> {
        let mut subs = self.subs();
        filters
            .iter()
            .map(|f| {
                let before = subs.len();
                subs.retain(|s| &s.filter != f);
                subs.len() != before
            })
            .collect()
    }

    fn record(&self) -> Option<SessionRecord> {
        Some(SessionRecord {
            filters: self.subs().clone(),
            expiry_secs: self.expiry?,
            disconnected_at: None,
        })
    }
}

/// What became of a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handed to the device's live session.
    Delivered,
    /// Stored in the device's durable queue at `seq` (and handed to its
    /// live session, if any).
    Queued { seq: u64 },
    /// No session of the device subscribes to the topic (or none keeps
    /// QoS 0 messages while away).
    NoSubscribers,
    /// The device's queue or its live session's channel is full.
    Full(String),
    /// The device is revoked or unknown: nothing is kept for it.
    Refused(String),
    /// It could not be stored (the session keeper did not answer): it
    /// must not be acknowledged as taken.
    NotStored(String),
}

/// A device session just opened.
#[derive(Debug)]
pub struct Opened {
    pub mailbox: Arc<Mailbox>,
    pub rx: mpsc::Receiver<Delivery>,
    /// The device's earlier session carries on (MQTT's session present).
    pub session_present: bool,
    /// What its durable queue holds, in order.
    pub queued: Vec<Queued>,
}

/// Stripes of the per-device lock.
const STRIPES: usize = 64;

/// The longest a persistent session outlives its connection, whatever the
/// device asks (and the length of a 3.1.1 `clean_session=0` session).
pub use super::channel::connect::MAX_SESSION_EXPIRY;

#[derive(Debug)]
pub struct Hub {
    /// Retained messages, always this node's.
    store: SessionStore,
    /// Persistent sessions and their queues.
    keeper: Arc<dyn Keeper>,
    registry: Registry,
    limits: QueueLimits,
    boxes: Mutex<HashMap<DeviceId, Arc<Mailbox>>>,
    /// Serializes, per device, a command's store-and-hand-over with a
    /// session's register-and-load, so that none falls between.
    locks: Vec<Mutex<()>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Wall time for sessions' and messages' expiry.
    clock: Arc<dyn Clock>,
    /// Whether that wall time is to be believed (`broker::clock`).
    trust: provisioning::clock::ClockTrust,
}

impl Hub {
    /// A hub keeping sessions in `keeper` (`None`: the registry's store),
    /// reading the time from `clock`.
    pub fn new(
        registry: Registry,
        keeper: Option<Arc<dyn Keeper>>,
        limits: QueueLimits,
        metrics: Arc<crate::metrics::Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let store = registry.sessions().clone();
        Self {
            keeper: keeper.unwrap_or_else(|| Arc::new(store.clone())),
            store,
            registry,
            limits,
            boxes: Mutex::new(HashMap::new()),
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            metrics,
            clock,
            trust: provisioning::clock::ClockTrust::default(),
        }
    }

    /// Judges expiry only while `trust` believes the clock.
    pub fn with_clock_trust(mut self, trust: provisioning::clock::ClockTrust) -> Self {
        self.trust = trust;
        self
    }

    /// Now, wall time (ms).
    fn now_ms(&self) -> i64 {
        self.clock.now().wall_ms
    }

    /// Now for judging what has expired: while this node's clock is not
    /// trusted (hours off the other nodes', or it just stepped), nothing
    /// has. A node two days ahead read every queued command as expired
    /// and deleted it from JetStream (the fault harness, issue 30); late
    /// is better than gone.
    pub fn expiry_now_ms(&self) -> i64 {
        if self.trust.distrusted().is_some() {
            i64::MIN
        } else {
            self.now_ms()
        }
    }

    pub fn store(&self) -> &SessionStore {
        &self.store
    }

    /// Where persistent sessions and queues are kept.
    pub fn keeper(&self) -> &dyn Keeper {
        &*self.keeper
    }

    fn boxes(&self) -> MutexGuard<'_, HashMap<DeviceId, Arc<Mailbox>>> {
        self.boxes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock(&self, id: &DeviceId) -> MutexGuard<'_, ()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        let i = (h.finish() % STRIPES as u64) as usize;
        self.locks[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens device `id`'s session for connection `conn` (on the blocking
    /// pool: it reads and may write the store). `clean_start` discards an
    /// earlier session; `expiry` is how long this one outlives the
    /// connection (`None`: it ends with it).
    pub fn open(
        &self,
        id: &DeviceId,
        conn: u64,
        clean_start: bool,
        expiry: Option<u32>,
    ) -> Result<Opened, provisioning::Error> {
        let _g = self.lock(id);
        let stored = match self.keeper.session(id) {
            // A clean session that keeps nothing needs nothing kept: it
            // starts while the cluster's keeper is out of reach (an
            // earlier session elsewhere is then left to its expiry).
            Err(provisioning::Error::Unavailable(why)) if clean_start && expiry.is_none() => {
                tracing::warn!(device.id = %id, why = %why, "mqtt: a clean session started without the session keeper");
                None
            }
            r => r?,
        };
        self.open_from(id, conn, clean_start, expiry, stored)
    }

    /// [`Hub::open`] right here, if that touches no disk: the common case,
    /// a session that ends with its connection, of a device with none
    /// stored, on a local store (one in-memory read). `None`: open it on
    /// the blocking pool.
    pub fn open_at_once(
        &self,
        id: &DeviceId,
        conn: u64,
        clean_start: bool,
        expiry: Option<u32>,
    ) -> Option<Result<Opened, provisioning::Error>> {
        if expiry.is_some() || !self.keeper.is_local() {
            return None;
        }
        let _g = self.lock(id);
        match self.keeper.session(id) {
            Ok(None) => Some(self.open_from(id, conn, clean_start, expiry, None)),
            _ => None,
        }
    }

    /// Opens `id`'s session on what the store holds of it (`stored`),
    /// under the device's lock.
    fn open_from(
        &self,
        id: &DeviceId,
        conn: u64,
        clean_start: bool,
        expiry: Option<u32>,
        stored: Option<SessionRecord>,
    ) -> Result<Opened, provisioning::Error> {
        let now = self.expiry_now_ms();
        let had = stored.is_some();
        let old = stored.filter(|r| !r.expired(now / 1000));
        let session_present = !clean_start && old.is_some();
        if !session_present && had {
            self.keeper.end_session(id)?;
        }
        let filters = old.map(|r| r.filters).filter(|_| session_present);
        let (tx, rx) = mpsc::channel(self.limits.max_messages.max(16));
        let mailbox = Arc::new(Mailbox {
            conn,
            tx,
            subs: Mutex::new(filters.unwrap_or_default()),
            expiry: expiry.map(|e| e.min(MAX_SESSION_EXPIRY)),
            reload: AtomicBool::new(false),
            resumed: session_present,
        });
        if let Some(rec) = mailbox.record() {
            // Not flushed: a new session has nothing to lose yet, and a
            // resumed one's filters are already durable.
            self.keeper.save_session(id, &rec, false)?;
        }
        let queued = if session_present {
            self.keeper.queued(id, None, now)?
        } else {
            Vec::new()
        };
        self.boxes().insert(id.clone(), mailbox.clone());
        Ok(Opened {
            mailbox,
            rx,
            session_present,
            queued,
        })
    }

    /// Closes connection `conn`'s session of `id` (blocking pool). A
    /// session that outlives its connection (`expiry`: the one it opened
    /// with, or what the client's DISCONNECT said instead) starts its
    /// expiry; any other ends, queue and all. A session taken over by a
    /// newer connection is left to it.
    pub fn close(
        &self,
        id: &DeviceId,
        conn: u64,
        expiry: Option<u32>,
    ) -> Result<(), provisioning::Error> {
        let _g = self.lock(id);
        let mailbox = {
            let mut boxes = self.boxes();
            match boxes.get(id) {
                Some(m) if m.conn == conn => boxes.remove(id),
                _ => None,
            }
        };
        let Some(mailbox) = mailbox else {
            return Ok(());
        };
        let expiry = expiry.map(|e| e.min(MAX_SESSION_EXPIRY));
        let now = self.now_ms() / 1000;
        if let Some(secs) = expiry.filter(|e| mailbox.expiry != Some(*e)) {
            // Its DISCONNECT changed how long it is kept.
            let rec = SessionRecord {
                filters: mailbox.subs().clone(),
                expiry_secs: secs,
                disconnected_at: Some(now),
            };
            self.keeper.save_session(id, &rec, false)
        } else if expiry.is_some() {
            self.keeper.disconnected(id, now)
        } else if mailbox.is_persistent() || (mailbox.resumed && self.keeper.is_local()) {
            self.keeper.end_session(id).map(|_| ())
        } else {
            // Nothing was kept for it: open ended any earlier session, and
            // a session that ends with its connection queues nothing.
            Ok(())
        }
    }

    /// Forgets `id`'s live session here without touching what is kept:
    /// a connection on another node took it over.
    pub fn released(&self, id: &DeviceId) {
        let _g = self.lock(id);
        self.boxes().remove(id);
    }

    /// Records a persistent session's subscriptions, durably (blocking
    /// pool), before its SUBACK or UNSUBACK.
    pub fn save(&self, id: &DeviceId, mailbox: &Mailbox) -> Result<(), provisioning::Error> {
        match mailbox.record() {
            Some(rec) => self.keeper.save_session(id, &rec, true),
            None => Ok(()),
        }
    }

    /// A device's own retained message (an empty payload clears it), kept
    /// for its later subscriptions (blocking pool; flushed if `flush`).
    pub fn retain_own(
        &self,
        id: &DeviceId,
        m: &Message,
        flush: bool,
    ) -> Result<(), provisioning::Error> {
        self.store.retain(id, m, &self.limits, flush)
    }

    /// The retained messages that match any of `filters` (a service's new
    /// subscriptions, `$share` already left out), each once (blocking
    /// pool). A filter naming one device reads only that device's.
    pub fn retained_matching(
        &self,
        filters: &[String],
        now: i64,
    ) -> Result<Vec<Message>, provisioning::Error> {
        let matching = |topic: &str| filters.iter().any(|f| topic_matches(f, topic));
        let mut devices = Vec::new();
        for f in filters {
            let level = f
                .strip_prefix("devices/")
                .and_then(|rest| rest.split('/').next());
            match level.filter(|l| !matches!(*l, "+" | "#")) {
                // Not a device id: no device has anything retained there.
                Some(id) => devices.extend(DeviceId::try_new(id).ok()),
                None => return self.store.retained_where(None, now, matching),
            }
        }
        devices.sort();
        devices.dedup();
        let mut out = Vec::new();
        for id in devices {
            out.extend(self.store.retained_where(Some(&id), now, matching)?);
        }
        Ok(out)
    }

    /// Whether `id` has a live session here.
    pub fn is_live(&self, id: &DeviceId) -> bool {
        self.boxes().contains_key(id)
    }

    /// Hands a command to a live session that keeps nothing durable, if
    /// that is all it takes (no store access: safe on an async worker).
    /// `None`: call [`Hub::publish`] on the blocking pool.
    pub fn publish_now(&self, id: &DeviceId, m: &Arc<Message>) -> Option<Outcome> {
        if m.retain {
            return None;
        }
        let mailbox = self.boxes().get(id).cloned()?;
        let (granted, _) = match mailbox.granted(&m.topic) {
            Some(g) => g,
            None => return Some(self.no_subscribers()),
        };
        if m.qos.min(granted) > 0 && mailbox.is_persistent() {
            return None;
        }
        Some(self.hand_over(id, &mailbox, None, m))
    }

    fn no_subscribers(&self) -> Outcome {
        self.metrics
            .commands_unrouted
            .fetch_add(1, Ordering::Relaxed);
        Outcome::NoSubscribers
    }

    fn hand_over(
        &self,
        id: &DeviceId,
        mailbox: &Mailbox,
        seq: Option<u64>,
        m: &Arc<Message>,
    ) -> Outcome {
        let sent = mailbox.tx.try_send(Delivery {
            seq,
            message: m.clone(),
        });
        match (sent, seq) {
            (Ok(()), None) => {
                self.metrics
                    .commands_delivered
                    .fetch_add(1, Ordering::Relaxed);
                Outcome::Delivered
            }
            (Ok(()), Some(seq)) => {
                self.metrics.commands_queued.fetch_add(1, Ordering::Relaxed);
                Outcome::Queued { seq }
            }
            // Stored: the session finds it in its queue.
            (Err(_), Some(seq)) => {
                mailbox.reload.store(true, Ordering::Release);
                self.metrics.commands_queued.fetch_add(1, Ordering::Relaxed);
                Outcome::Queued { seq }
            }
            (Err(mpsc::error::TrySendError::Full(_)), None) => {
                self.metrics
                    .commands_refused
                    .fetch_add(1, Ordering::Relaxed);
                Outcome::Full(format!(
                    "device {id} has {} messages waiting; it is not reading",
                    self.limits.max_messages.max(16)
                ))
            }
            (Err(mpsc::error::TrySendError::Closed(_)), None) => self.no_subscribers(),
        }
    }

    /// A service's command `m` for device `id` (blocking pool: it may store
    /// and flush). Retained messages are kept for the device's later
    /// subscriptions.
    pub fn publish(&self, id: &DeviceId, m: Arc<Message>) -> Result<Outcome, provisioning::Error> {
        if m.retain {
            if self.standing_refusal(id)?.is_some() {
                return Ok(Outcome::Refused(format!(
                    "device {id} is revoked or unknown"
                )));
            }
            match self.store.retain(id, &m, &self.limits, true) {
                Err(provisioning::Error::QuotaExceeded { reason }) => {
                    self.metrics
                        .commands_refused
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(Outcome::Full(reason));
                }
                r => r?,
            }
        }
        let _g = self.lock(id);
        let now = self.now_ms();
        let live = self.boxes().get(id).cloned();
        if let Some(mailbox) = live {
            let Some((granted, _)) = mailbox.granted(&m.topic) else {
                return Ok(self.no_subscribers());
            };
            let seq = if m.qos.min(granted) > 0 && mailbox.is_persistent() {
                match self.keeper.enqueue(id, (*m).clone(), &self.limits, now) {
                    Ok(seq) => Some(seq),
                    Err(provisioning::Error::QuotaExceeded { reason }) => {
                        self.metrics
                            .commands_refused
                            .fetch_add(1, Ordering::Relaxed);
                        return Ok(Outcome::Full(reason));
                    }
                    Err(e) => return Err(e),
                }
            } else {
                None
            };
            return Ok(self.hand_over(id, &mailbox, seq, &m));
        }
        // Away: only a persistent session keeps what it subscribed to.
        let Some(rec) = self.keeper.session(id)? else {
            return Ok(self.no_subscribers());
        };
        let granted = rec
            .filters
            .iter()
            .filter(|f| topic_matches(&f.filter, &m.topic))
            .map(|f| f.qos)
            .max();
        match granted {
            Some(g) if !rec.expired(self.expiry_now_ms() / 1000) && m.qos.min(g) > 0 => {}
            _ => return Ok(self.no_subscribers()),
        }
        if let Some(why) = self.standing_refusal(id)? {
            self.keeper.end_session(id)?;
            return Ok(Outcome::Refused(why));
        }
        match self.keeper.enqueue(id, (*m).clone(), &self.limits, now) {
            Ok(seq) => {
                self.metrics.commands_queued.fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Queued { seq })
            }
            Err(provisioning::Error::QuotaExceeded { reason }) => {
                self.metrics
                    .commands_refused
                    .fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Full(reason))
            }
            Err(e) => Err(e),
        }
    }

    /// A command another node stored in `id`'s queue at `seq` (blocking
    /// pool): handed to the device's session if it is live here. If not,
    /// it waits in the queue for wherever the device resumes its session.
    pub fn publish_queued(&self, id: &DeviceId, seq: u64, m: &Arc<Message>) -> Option<Outcome> {
        let _g = self.lock(id);
        let mailbox = self.boxes().get(id).cloned()?;
        mailbox.granted(&m.topic)?;
        if mailbox.is_persistent() {
            return Some(self.hand_over(id, &mailbox, Some(seq), m));
        }
        // The device came back with a clean session meanwhile: nothing
        // is kept for it, but it is subscribed.
        self.keeper.delivered(id, seq);
        Some(self.hand_over(id, &mailbox, None, m))
    }

    /// Ends the sessions of devices revoked anywhere, queues and all (a
    /// cluster keeper's; the registry purges its own store itself).
    pub fn forget(&self, ids: &[DeviceId]) -> Result<usize, provisioning::Error> {
        if self.keeper.is_local() {
            return Ok(0);
        }
        self.keeper.purge(ids)
    }

    /// Why nothing may be kept for `id`, if so.
    fn standing_refusal(&self, id: &DeviceId) -> Result<Option<String>, provisioning::Error> {
        match self.registry.device(id) {
            Ok(d) if d.status == Status::Revoked => Ok(Some(format!("device {id} is revoked"))),
            Ok(_) => Ok(None),
            Err(provisioning::Error::NotFound { .. }) => {
                Ok(Some(format!("device {id} is not registered")))
            }
            Err(e) => Err(e),
        }
    }

    /// Drops expired sessions and messages, and those of devices no longer
    /// registered or revoked (blocking pool).
    pub fn sweep(&self) -> Result<provisioning::sessions::Swept, provisioning::Error> {
        self.keeper()
            .sweep(self.expiry_now_ms() / 1000, &|id| self.is_live(id), &|id| {
                kept(self.registry.device(id).map(|d| d.status))
            })
    }
}

/// Whether a device's session stays, by its standing as the registry
/// answered: it ends only on an answer (revoked, or not registered), never
/// because the registry could not say. A sweep while etcd was out of reach
/// took every away device for gone and ended its session and queue (the
/// fault harness, issue 30: a suspended device's commands lost).
fn kept(standing: Result<Status, provisioning::Error>) -> bool {
    match standing {
        Ok(status) => status != Status::Revoked,
        Err(provisioning::Error::NotFound { .. }) => false,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use provisioning::sessions::MessageProps;

    use super::super::channel::clock::ManualClock;
    use super::*;

    #[test]
    fn a_session_is_swept_for_its_standing_only_on_an_answer() {
        assert!(kept(Ok(Status::Active)));
        assert!(kept(Ok(Status::Suspended)));
        assert!(!kept(Ok(Status::Revoked)));
        assert!(!kept(Err(provisioning::Error::NotFound {
            id: "dev-1".into()
        })));
        assert!(kept(Err(provisioning::Error::Unavailable(
            "etcd: no majority".into()
        ))));
    }

    const T0_MS: i64 = 1_800_000_000_000;

    /// A hub over a new data dir's registry, where device `dev-1` is
    /// enrolled, on a clock the test moves.
    fn hub() -> (tempfile::TempDir, Hub, Arc<ManualClock>) {
        let dir = tempfile::tempdir().unwrap();
        let auth = provisioning::Authority::open_or_init(
            dir.path(),
            &provisioning::InitOptions::default(),
        )
        .unwrap();
        let who = provisioning::Identity {
            role: provisioning::Role::Device,
            id: dev(),
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let (new, cert) = auth
            .issue_new(&key, &who, None, provisioning::DEFAULT_CERT_LIFETIME)
            .unwrap();
        auth.registry.enroll(&new, &cert, "test").unwrap();
        let clock = Arc::new(ManualClock::at(T0_MS));
        let hub = Hub::new(
            auth.registry.clone(),
            None,
            QueueLimits::default(),
            Arc::new(crate::metrics::Metrics::default()),
            clock.clone(),
        );
        (dir, hub, clock)
    }

    fn dev() -> DeviceId {
        DeviceId::try_new("dev-1").unwrap()
    }

    fn subscribed(hub: &Hub, conn: u64, expiry: u32) {
        let opened = hub.open(&dev(), conn, true, Some(expiry)).unwrap();
        opened.mailbox.subscribe(&[StoredFilter {
            filter: "devices/dev-1/commands/#".into(),
            qos: 1,
            no_local: false,
            retain_as_published: false,
            id: None,
        }]);
        hub.save(&dev(), &opened.mailbox).unwrap();
    }

    fn command(now_ms: i64, expires_in_ms: Option<i64>) -> Arc<Message> {
        Arc::new(Message {
            topic: "devices/dev-1/commands/reboot".into(),
            payload: b"now".to_vec(),
            qos: 1,
            retain: false,
            props: MessageProps::default(),
            stored_at_ms: now_ms,
            expires_at_ms: expires_in_ms.map(|d| now_ms + d),
        })
    }

    #[test]
    fn a_disconnects_expiry_replaces_the_one_the_session_opened_with() {
        let (_d, hub, clock) = hub();
        hub.open(&dev(), 1, true, Some(1)).unwrap();
        hub.close(&dev(), 1, Some(5)).unwrap();
        let rec = hub.store().session(&dev()).unwrap().unwrap();
        assert_eq!(rec.expiry_secs, 5);
        assert_eq!(rec.disconnected_at, Some(T0_MS / 1000));
        // Past the CONNECT's 1 s, within the DISCONNECT's 5 s.
        clock.advance(Duration::from_secs(4));
        assert!(hub.open(&dev(), 2, false, None).unwrap().session_present);
    }

    #[test]
    fn a_session_is_kept_its_whole_expiry_and_gone_after() {
        let (_d, hub, clock) = hub();
        subscribed(&hub, 1, 5);
        hub.close(&dev(), 1, Some(5)).unwrap();
        clock.advance(Duration::from_millis(5_999));
        assert_eq!(hub.sweep().unwrap().sessions, 0);
        assert!(hub.open(&dev(), 2, false, Some(5)).unwrap().session_present);
        hub.close(&dev(), 2, Some(5)).unwrap();
        clock.advance(Duration::from_secs(6));
        assert_eq!(hub.sweep().unwrap().sessions, 1);
        assert!(!hub.open(&dev(), 3, false, None).unwrap().session_present);
    }

    #[test]
    fn a_queued_command_past_its_expiry_is_never_delivered() {
        let (_d, hub, clock) = hub();
        subscribed(&hub, 1, 3600);
        hub.close(&dev(), 1, Some(3600)).unwrap();
        hub.publish(&dev(), command(T0_MS, Some(2_000))).unwrap();
        hub.publish(&dev(), command(T0_MS, Some(60_000))).unwrap();
        hub.publish(&dev(), command(T0_MS, None)).unwrap();
        clock.advance(Duration::from_secs(3));
        let opened = hub.open(&dev(), 2, false, Some(3600)).unwrap();
        assert!(opened.session_present);
        // The one past its expiry is gone; the others are left (one
        // without an expiry of its own has the queue's time to live).
        let left: Vec<_> = opened
            .queued
            .iter()
            .map(|q| q.message.expires_at_ms)
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(left[0], Some(T0_MS + 60_000));
        assert!(left[1].is_some_and(|at| at > T0_MS + 60_000), "{left:?}");
    }

    #[test]
    fn a_session_resumed_with_expiry_0_ends_with_its_connection() {
        let (_d, hub, _clock) = hub();
        subscribed(&hub, 1, 60);
        hub.close(&dev(), 1, Some(60)).unwrap();
        hub.publish(&dev(), command(T0_MS, None)).unwrap();
        // Resumed, this time to end with the connection: it is no session
        // to open at once (one is stored), and it ends, queue and all.
        assert!(hub.open_at_once(&dev(), 2, false, None).is_none());
        let opened = hub.open(&dev(), 2, false, None).unwrap();
        assert!(opened.session_present);
        assert_eq!(opened.queued.len(), 1);
        hub.close(&dev(), 2, None).unwrap();
        assert_eq!(hub.store().session(&dev()).unwrap(), None);
        assert!(hub.store().queued(&dev(), None, T0_MS).unwrap().is_empty());
    }

    #[test]
    fn a_session_that_ends_with_its_connection_opens_at_once_and_keeps_nothing() {
        let (_d, hub, _clock) = hub();
        let opened = hub.open_at_once(&dev(), 1, true, None).unwrap().unwrap();
        assert!(!opened.session_present);
        hub.close(&dev(), 1, None).unwrap();
        assert_eq!(hub.store().session(&dev()).unwrap(), None);
        // One that outlives its connection goes to the blocking pool.
        assert!(hub.open_at_once(&dev(), 2, true, Some(60)).is_none());
    }

    #[test]
    fn a_disconnect_with_expiry_0_ends_a_kept_session() {
        let (_d, hub, _clock) = hub();
        hub.open(&dev(), 1, true, Some(60)).unwrap();
        hub.close(&dev(), 1, None).unwrap();
        assert_eq!(hub.store().session(&dev()).unwrap(), None);
        assert!(!hub.open(&dev(), 2, false, None).unwrap().session_present);
    }
}
