//! The shared registry store: an etcd cluster, through etcd's v3 gRPC API
//! (`grpc.rs`: plain for `etcd://`, TLS with a client certificate for
//! `https://`; the message code is generated once and checked in,
//! `pb.rs`, so no build needs `protoc`).
//!
//! Every node's registry is the same keys, `fleetgate/<space>/<key>`. A
//! commit is a compare for every key the writer read (its value, or that
//! it is absent), then the writes, applied only if all compares hold, in
//! one etcd transaction with whatever else the node commits meanwhile
//! (`group.rs`). etcd answers once a majority of members has the commit,
//! so a commit that returned is durable and `flush` has nothing to do.
//! Without a majority, requests fail: [`provisioning::Error::Unavailable`],
//! nothing written.
//!
//! The registry is synchronous; calls run on the store's own runtime and
//! the caller waits, from any thread, as it would on a disk.
//!
//! A crate of its own (`fleetgate-etcd`), one of the cluster's backends:
//! it knows the registry's `Store` seam and etcd's protocol, nothing of
//! MQTT or HTTP; what it counts goes to an [`Observer`] (a node's
//! metrics).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use provisioning::store::{Commit, Entries, Space, Store, Write};
use provisioning::Error;

mod group;
mod grpc;
mod pb;

pub use grpc::EtcdTls;
use grpc::Members;
use pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::etcdserverpb::range_request::{SortOrder, SortTarget};
use pb::etcdserverpb::request_op::Request as Op;
use pb::etcdserverpb::{
    watch_request::RequestUnion, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RangeResponse, RequestOp, ResponseHeader, TxnRequest, WatchCreateRequest, WatchProgressRequest,
    WatchRequest,
};

/// etcd's default limit of operations in one transaction (`--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;

/// Keys per range request when scanning.
const PAGE: i64 = 512;

/// How long a starting node waits for etcd to answer at all.
const STARTUP_WAIT: Duration = Duration::from_secs(30);

/// Work for the store's own thread.
type Job = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The registry in an etcd cluster.
#[derive(Debug)]
pub struct EtcdStore {
    /// The members, a gRPC channel each; tried in turn.
    members: Members,
    /// Key prefix, `fleetgate/` unless a caller chose another.
    root: Vec<u8>,
    /// Into the store's own thread and runtime (which end when the store
    /// is dropped, wherever that is).
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    metrics: Arc<dyn Observer>,
    /// This node's last view of what admission reads (certificates,
    /// devices, manufacturers): every value read, kept current by the
    /// watch; answers reads only while etcd cannot, within `staleness`.
    view: Arc<Mutex<View>>,
    /// When a majority of etcd last answered (ms since the Unix epoch).
    contact: Arc<AtomicU64>,
    /// How old the view may be and still answer.
    staleness: Duration,
    /// Told when the watch's member lags the majority: the watch moves on.
    lagging: Arc<tokio::sync::Notify>,
    /// Commits waiting to go to etcd together.
    group: group::Group,
}

/// A key's value (`None`: absent) and the etcd revision it is from.
type Known = (u64, Option<Vec<u8>>);

/// What this node knows of the keys admission reads.
#[derive(Debug, Default)]
struct View {
    /// Keys read or written here, with their value (`None`: absent) and
    /// the etcd revision it is from.
    keys: HashMap<(Space, Vec<u8>), Known>,
    /// The last revision the watch applied (or opened at).
    watched: u64,
    /// A watch stream is open: every change reaches `keys` as it commits.
    live: bool,
    /// When the open watch stream opened ([`now_ms`]).
    opened_ms: u64,
    /// Heartbeats the watch has not caught up with yet: when each was
    /// sent, and the majority's revision it read.
    pending: Vec<(u64, u64)>,
    /// When the view was last known to hold every change a majority of
    /// etcd had then ([`now_ms`]; 0: never): a heartbeat's revision that
    /// the watch has reached. A watch on a member cut off from the
    /// majority stays open and quiet; heartbeats answered by the others
    /// did not make its view current (the fault harness, issue 30: a
    /// node admitted a device revoked 3 s before).
    current_ms: u64,
    /// When the latest heartbeat a majority answered was sent: the view
    /// serves only while it has caught up with that one too.
    latest_ms: u64,
    /// Asks the open watch stream for its member's revision (etcd's
    /// progress request).
    progress: Option<tokio::sync::mpsc::UnboundedSender<WatchRequest>>,
}

impl View {
    /// What a read or a commit at revision `rev` saw, unless the view
    /// knows a later value. A key not yet in the view goes in only if the
    /// watch has applied nothing after `rev`: else a change to it that
    /// the watch passed over (the key was not in the view then) could be
    /// newer than what was read.
    fn saw(&mut self, space: Space, key: &[u8], rev: u64, value: Option<Vec<u8>>) {
        match self.keys.get_mut(&(space, key.to_vec())) {
            Some(known) if known.0 < rev => *known = (rev, value),
            Some(_) => {}
            None if self.watched <= rev => {
                self.keys.insert((space, key.to_vec()), (rev, value));
            }
            None => {}
        }
    }

    /// Why `value` would take back a revocation the view knows of `key`,
    /// if it would ([`provisioning::integrity`]).
    fn regression(&self, space: Space, key: &[u8], value: Option<&[u8]>) -> Option<String> {
        let (_, known) = self.keys.get(&(space, key.to_vec()))?;
        provisioning::integrity::regression(space, known.as_deref(), value)
    }

    /// The watch has applied everything up to `rev`: the heartbeats it
    /// caught up with make the view current as of when they were sent.
    fn reached(&mut self, rev: u64) {
        self.watched = self.watched.max(rev);
        let watched = self.watched;
        let mut current = self.current_ms;
        self.pending.retain(|&(at, r)| {
            if r <= watched {
                current = current.max(at);
                false
            } else {
                true
            }
        });
        self.current_ms = current;
    }

    /// A heartbeat sent at `at` read the majority's revision `rev`:
    /// whether the view has it already.
    fn heartbeat(&mut self, at: u64, rev: u64) -> bool {
        self.latest_ms = self.latest_ms.max(at);
        self.pending.push((at, rev));
        // A watch that never catches up keeps only the latest few.
        let len = self.pending.len();
        if len > 8 {
            self.pending.drain(..len - 8);
        }
        self.reached(0);
        self.pending.is_empty()
    }

    /// A change the watch brought: kept for keys in the view, unless it
    /// takes back a revocation (then `Err` says why, and the view keeps
    /// what it knew).
    fn changed(&mut self, rev: u64, w: &Write) -> Result<(), String> {
        self.reached(rev);
        if let Some(why) = self.regression(w.space, &w.key, w.value.as_deref()) {
            return Err(why);
        }
        if let Some(known) = self.keys.get_mut(&(w.space, w.key.clone())) {
            if known.0 < rev {
                *known = (rev, w.value.clone());
            }
        }
        Ok(())
    }
}

/// What one watch stream reports.
enum Seen {
    /// Opened, at etcd's revision then (0 if resumed from an earlier
    /// revision: the changes since come first).
    Opened(u64),
    /// The member's revision, answering a progress request: the watch has
    /// delivered everything up to it.
    Progress(u64),
    /// Changes, each with its revision, in etcd's order.
    Changes(Vec<(u64, Write)>),
}

/// Key spaces admission reads, kept in the node's view.
fn viewed(space: Space) -> bool {
    matches!(space, Space::Certs | Space::Devices | Space::Manufacturers)
}

/// What the store reports as it works: a node counts these.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// A request to etcd answered (or failed) after `took`.
    fn request(&self, took: Duration);
    /// A request no member answered, or that etcd refused.
    fn error(&self);
    /// Committed changes seen on the watch.
    fn watch_events(&self, n: u64);
    /// A watch stream ended (it is resumed).
    fn watch_interrupted(&self);
    /// A change that took back a revocation, not applied.
    fn integrity_violation(&self);
}

/// An observer that counts nothing.
#[derive(Debug, Default)]
pub struct Unobserved;

impl Observer for Unobserved {
    fn request(&self, _: Duration) {}
    fn error(&self) {}
    fn watch_events(&self, _: u64) {}
    fn watch_interrupted(&self) {}
    fn integrity_violation(&self) {}
}

/// Counts and raises the alarm on a change in etcd that fleetgate never
/// makes: someone with write access to etcd took back a revocation.
fn integrity_violation(metrics: &dyn Observer, why: &str) {
    metrics.integrity_violation();
    tracing::error!(reason = "integrity", detail = %provisioning::printable(why), "etcd: ALARM: a change fleetgate never makes was written to the store; not applied, this node keeps what it knew");
}

/// Milliseconds on the monotonic clock since this process first asked,
/// plus one (0 is "never"). How old a view is must not follow the wall
/// clock: a node whose clock is set back a day would take a view a day old
/// for fresh and admit from it past `--store-staleness-secs` (found by the
/// fault harness, issue 30).
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// How often a node checks that a majority of etcd answers.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long the watch may stay behind the majority before it is moved.
const LAGGING: Duration = Duration::from_secs(3);

/// How old a node's view may be, by default, before it refuses.
pub const DEFAULT_STALENESS: Duration = Duration::from_secs(60);

/// The revision a response was at.
fn revision(h: Option<&ResponseHeader>) -> u64 {
    h.map_or(0, |h| u64::try_from(h.revision).unwrap_or(0))
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    // All 0xff (or empty): to the end of the keyspace, etcd's `\0`.
    provisioning::store::prefix_end(prefix).unwrap_or_else(|| vec![0])
}

impl EtcdStore {
    /// A store on the etcd members at `endpoints` (`host:port`), keys under
    /// `root`, in plain text; checks that one of them answers.
    pub fn connect(endpoints: Vec<String>, root: &str) -> Result<Self, Error> {
        Self::connect_counted(endpoints, root, None, Arc::new(Unobserved))
    }

    /// [`EtcdStore::connect`] over `tls` when given, counting requests,
    /// errors and watch events into `metrics`.
    pub fn connect_counted(
        endpoints: Vec<String>,
        root: &str,
        tls: Option<EtcdTls>,
        metrics: Arc<dyn Observer>,
    ) -> Result<Self, Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Storage(format!("etcd store runtime: {e}")))?;
        // The channels' workers run on the store's runtime.
        let members = {
            let _inside = rt.enter();
            Members::new(&endpoints, tls.as_ref()).map_err(|e| Error::Storage(format!("{e:#}")))?
        };
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        std::thread::Builder::new()
            .name("etcd-store".into())
            .spawn(move || {
                rt.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        tokio::spawn(job);
                    }
                });
            })
            .map_err(|e| Error::Storage(format!("etcd store thread: {e}")))?;
        let store = Self {
            members,
            root: root.as_bytes().to_vec(),
            jobs,
            metrics,
            view: Arc::default(),
            contact: Arc::new(AtomicU64::new(0)),
            staleness: DEFAULT_STALENESS,
            lagging: Arc::default(),
            group: group::Group::default(),
        };
        // A node may start while etcd elects a leader (or its members
        // start): it waits for a majority, a while, rather than give up.
        let deadline = std::time::Instant::now() + STARTUP_WAIT;
        loop {
            match store.len(Space::Meta) {
                Ok(_) => break,
                Err(Error::Unavailable(why)) if std::time::Instant::now() < deadline => {
                    tracing::warn!(reason = %why, "etcd: no majority answered yet; trying again");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
        store.heartbeat();
        Ok(store)
    }

    /// How old this node's view may get while etcd has no majority before
    /// reads fail too (and admission refuses: it fails closed).
    pub fn with_staleness(mut self, staleness: Duration) -> Self {
        self.staleness = staleness;
        self
    }

    /// A linearizable read every [`HEARTBEAT`]: it succeeds only with a
    /// majority of etcd, and says how current this node's view is. Its
    /// revision is the majority's: the view is current as of the
    /// heartbeat once the watch has reached it (asked with a progress
    /// request). A watch that has not for [`LAGGING`] is moved to another
    /// member.
    fn heartbeat(&self) {
        let (members, contact) = (self.members.clone(), self.contact.clone());
        let (view, lagging) = (self.view.clone(), self.lagging.clone());
        let req = RangeRequest {
            key: self.key(Space::Meta, b"schema"),
            ..RangeRequest::default()
        };
        let _ = self.jobs.send(Box::pin(async move {
            loop {
                let sent = now_ms();
                // A member that does not answer within a heartbeat is
                // passed over for the next (a linearizable read takes
                // milliseconds from one in the majority).
                if let Ok(r) = members.range_within(HEARTBEAT, req.clone()).await {
                    contact.store(now_ms(), Ordering::Relaxed);
                    let rev = revision(r.header.as_ref());
                    let mut v = view
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if !v.heartbeat(sent, rev) {
                        if let Some(tx) = &v.progress {
                            let _ = tx.send(WatchRequest {
                                request_union: Some(RequestUnion::ProgressRequest(
                                    WatchProgressRequest {},
                                )),
                            });
                        }
                        let lag = Duration::from_millis(now_ms().saturating_sub(v.current_ms));
                        let open = Duration::from_millis(now_ms().saturating_sub(v.opened_ms));
                        if v.live && lag > LAGGING && open > LAGGING {
                            tracing::warn!(
                                watched = v.watched,
                                majority = rev,
                                "etcd: the watch's member is behind the majority; moving the watch"
                            );
                            lagging.notify_waiters();
                        }
                    }
                }
                tokio::time::sleep(HEARTBEAT).await;
            }
        }));
    }

    /// Whether the view may answer for etcd: its watch is open, has
    /// caught up with the majority's revision at the latest heartbeat,
    /// and that was recent.
    fn view_current(&self) -> bool {
        let v = self.lock_view();
        v.live
            && v.current_ms >= v.latest_ms
            && now_ms().saturating_sub(v.current_ms) <= (3 * HEARTBEAT).as_millis() as u64
    }

    /// How old this node's view is: since a majority last answered.
    fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.contact.load(Ordering::Relaxed)))
    }

    /// A read from this node's last view, while it is recent enough: by
    /// when it was last known current (a view without a watch: when a
    /// majority last answered), and never once a majority has answered
    /// with a revision its watch has not reached (it is behind, and this
    /// node knows it).
    fn read_view(&self, space: Space, key: &[u8], why: String) -> Result<Option<Vec<u8>>, Error> {
        let view = self.lock_view();
        if view.opened_ms > 0 && view.current_ms < view.latest_ms {
            return Err(Error::Unavailable(format!(
                "{why}; this node's view of the registry is behind what a majority of etcd \
                 answered, and its watch has not caught up: it refuses until etcd answers"
            )));
        }
        let since = if view.current_ms > 0 {
            view.current_ms
        } else {
            self.contact.load(Ordering::Relaxed)
        };
        let age = Duration::from_millis(now_ms().saturating_sub(since));
        if age > self.staleness {
            return Err(Error::Unavailable(format!(
                "{why}; this node's view of the registry is {}s old, past its bound of {}s: \
                 it refuses until etcd answers",
                age.as_secs(),
                self.staleness.as_secs()
            )));
        }
        match view.keys.get(&(space, key.to_vec())) {
            Some((_, v)) => Ok(v.clone()),
            None => Err(Error::Unavailable(format!(
                "{why}; not in this node's view of the registry"
            ))),
        }
    }

    fn lock_view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `call` with the members on the store's runtime and waits for
    /// it, counted (latency, errors) and noting when a majority answered.
    fn call<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(Members) -> Fut,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let t0 = std::time::Instant::now();
        let (tx, rx) = mpsc::sync_channel(1);
        let fut = call(self.members.clone());
        let _ = self.jobs.send(Box::pin(async move {
            let _ = tx.send(fut.await);
        }));
        let answer = rx
            .recv()
            .unwrap_or_else(|_| Err(Error::Unavailable("etcd store stopped".into())));
        self.metrics.request(t0.elapsed());
        match &answer {
            Ok(_) => self.contact.store(now_ms(), Ordering::Relaxed),
            Err(_) => {
                self.metrics.error();
            }
        }
        answer
    }

    fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.call(|m| async move { m.range(req).await })
    }

    fn space_prefix(&self, space: Space) -> Vec<u8> {
        let mut k = self.root.clone();
        k.extend_from_slice(space.name().as_bytes());
        k.push(b'/');
        k
    }

    fn key(&self, space: Space, key: &[u8]) -> Vec<u8> {
        let mut k = self.space_prefix(space);
        k.extend_from_slice(key);
        k
    }

    /// Runs a transaction: the revision it committed at, if it held.
    fn txn(&self, compare: Vec<Compare>, success: Vec<RequestOp>) -> Result<Option<u64>, Error> {
        let req = TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        };
        let resp = self.call(|m| async move { m.txn(req).await })?;
        Ok(resp.succeeded.then(|| revision(resp.header.as_ref())))
    }

    /// Holds if `key` has `value` (`None`: is absent).
    fn compare(&self, key: &[u8], value: Option<&[u8]>) -> Compare {
        let (target, union) = match value {
            Some(v) => (CompareTarget::Value, TargetUnion::Value(v.to_vec())),
            None => (CompareTarget::Version, TargetUnion::Version(0)),
        };
        Compare {
            result: CompareResult::Equal as i32,
            target: target as i32,
            key: key.to_vec(),
            range_end: Vec::new(),
            target_union: Some(union),
        }
    }

    /// The operation that makes a write.
    fn write_op(&self, w: &Write) -> RequestOp {
        let key = self.key(w.space, &w.key);
        match &w.value {
            Some(v) => put_op(key, v.clone()),
            None => RequestOp {
                request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                    key,
                    ..DeleteRangeRequest::default()
                })),
            },
        }
    }

    /// Where the counter `name` is kept: `<root>counters/<name>`.
    fn counter_key(&self, name: &str) -> Vec<u8> {
        let mut key = self.root.clone();
        key.extend_from_slice(b"counters/");
        key.extend_from_slice(name.as_bytes());
        key
    }
}

/// A put of `value` at `key`.
fn put_op(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key,
            value,
            ..PutRequest::default()
        })),
    }
}

/// A counter's number from its stored value (absent: 0).
fn counter_value(raw: Option<&[u8]>) -> u64 {
    raw.and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

impl EtcdStore {
    /// Follows every change under the store's root, as other nodes (and
    /// this one) commit them, calling `on` with each batch, in etcd's
    /// order. Reconnects (to the next member) and resumes from the
    /// revision after the last one seen. Runs until the store is dropped.
    pub fn watch(&self, on: impl Fn(Vec<Write>) + Send + Sync + 'static) {
        let (members, root) = (self.members.clone(), self.root.clone());
        let (metrics, view) = (self.metrics.clone(), self.view.clone());
        let followed = view.clone();
        let on = move |seen: Seen| {
            let lock = || {
                view.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            };
            let changes = match seen {
                Seen::Opened(rev) => {
                    let mut view = lock();
                    view.reached(rev);
                    view.live = true;
                    view.opened_ms = now_ms();
                    return;
                }
                Seen::Progress(rev) => {
                    lock().reached(rev);
                    return;
                }
                Seen::Changes(changes) => changes,
            };
            metrics.watch_events(changes.len() as u64);
            let applied = {
                // Keys this node has read stay current; a change that
                // takes back a revocation is not applied here, nor
                // announced.
                let mut view = lock();
                changes
                    .into_iter()
                    .filter(|(rev, w)| match view.changed(*rev, w) {
                        Ok(()) => true,
                        Err(why) => {
                            integrity_violation(metrics.as_ref(), &why);
                            false
                        }
                    })
                    .map(|(_, w)| w)
                    .collect::<Vec<_>>()
            };
            on(applied);
        };
        let (metrics, lagging) = (self.metrics.clone(), self.lagging.clone());
        let _ = self.jobs.send(Box::pin(async move {
            let mut from: Option<u64> = None;
            loop {
                for (e, ch) in members.iter() {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    followed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .progress = Some(tx);
                    let ended = tokio::select! {
                        r = watch_one(ch.clone(), &root, &mut from, rx, &on) => r,
                        () = lagging.notified() => Err("its member is behind the majority".into()),
                    };
                    {
                        let mut v = followed
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        v.live = false;
                        v.progress = None;
                    }
                    metrics.watch_interrupted();
                    if let Err(err) = ended {
                        tracing::warn!(endpoint = %e, error = %err, "etcd: watch interrupted; resuming");
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
}

/// One watch stream from one member, until it ends.
async fn watch_one(
    ch: tonic::transport::Channel,
    root: &[u8],
    from: &mut Option<u64>,
    requests: tokio::sync::mpsc::UnboundedReceiver<WatchRequest>,
    on: &(impl Fn(Seen) + Send + Sync),
) -> Result<(), String> {
    let resumed = from.is_some();
    let create = WatchCreateRequest {
        key: root.to_vec(),
        range_end: prefix_end(root),
        start_revision: from.map_or(0, |r| i64::try_from(r).unwrap_or(i64::MAX)),
        ..WatchCreateRequest::default()
    };
    let mut stream = grpc::watch(ch, create, requests)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(s) => return Err(format!("{:?}: {}", s.code(), s.message())),
        };
        if resp.canceled {
            return Err(format!("watch canceled: {}", resp.cancel_reason));
        }
        let mut writes = Vec::new();
        for e in &resp.events {
            let Some(kv) = &e.kv else { continue };
            let rev = u64::try_from(kv.mod_revision).unwrap_or(0);
            if rev > 0 {
                *from = Some(from.unwrap_or(0).max(rev + 1));
            }
            let Some(rest) = kv.key.strip_prefix(root) else {
                continue;
            };
            let Some(slash) = rest.iter().position(|b| *b == b'/') else {
                continue;
            };
            let Some(space) = Space::ALL
                .into_iter()
                .find(|s| s.name().as_bytes() == &rest[..slash])
            else {
                continue;
            };
            let deleted = e.r#type == pb::mvccpb::event::EventType::Delete as i32;
            writes.push((
                rev,
                Write {
                    space,
                    key: rest[slash + 1..].to_vec(),
                    value: (!deleted).then(|| kv.value.clone()),
                },
            ));
        }
        if resp.created {
            let rev = revision(resp.header.as_ref());
            if from.is_none() && rev > 0 {
                // From the revision it opened at.
                *from = Some(rev + 1);
            }
            // Resumed: the changes since `from` are still to come.
            on(Seen::Opened(if resumed { 0 } else { rev }));
        } else if resp.events.is_empty() && resp.compact_revision == 0 {
            // A progress notification: everything up to the member's
            // revision was delivered.
            on(Seen::Progress(revision(resp.header.as_ref())));
        }
        if !writes.is_empty() {
            on(Seen::Changes(writes));
        }
    }
}

impl EtcdStore {
    /// A range over `[from, end)`, a page at a time, in key order or
    /// (`rev`) the reverse; keys with `base` taken off.
    fn pages<'a>(&'a self, base: Vec<u8>, from: Vec<u8>, end: Vec<u8>, rev: bool) -> Entries<'a> {
        let (mut from, mut end) = (from, end);
        let mut page: std::vec::IntoIter<(Vec<u8>, Vec<u8>)> = Vec::new().into_iter();
        let mut done = end <= from && end != [0];
        Box::new(std::iter::from_fn(move || loop {
            if let Some((k, v)) = page.next() {
                return Some(Ok((k.get(base.len()..).unwrap_or_default().to_vec(), v)));
            }
            if done {
                return None;
            }
            let mut req = RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: PAGE,
                ..RangeRequest::default()
            };
            if rev {
                req.sort_order = SortOrder::Descend as i32;
                req.sort_target = SortTarget::Key as i32;
            }
            match self.range(req) {
                Ok(resp) => {
                    let kvs: Vec<(Vec<u8>, Vec<u8>)> =
                        resp.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
                    done = !resp.more || kvs.is_empty();
                    if let Some((last, _)) = kvs.last() {
                        if rev {
                            // The range end is exclusive: the next page
                            // ends at the last key of this one.
                            end.clone_from(last);
                        } else {
                            from = last.clone();
                            from.push(0);
                        }
                    }
                    page = kvs.into_iter();
                }
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            }
        }))
    }
}

impl Store for EtcdStore {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        // Cut off from the majority (the heartbeat says so): the view
        // answers at once, rather than every read waiting out etcd.
        if viewed(space) && self.age() > 3 * HEARTBEAT {
            return self.read_view(space, key, "no etcd majority answers".into());
        }
        let req = RangeRequest {
            key: self.key(space, key),
            ..RangeRequest::default()
        };
        match self.range(req) {
            Ok(resp) => {
                let rev = revision(resp.header.as_ref());
                let value = resp.kvs.into_iter().next().map(|kv| kv.value);
                if viewed(space) {
                    let mut view = self.lock_view();
                    if let Some(why) = view.regression(space, key, value.as_deref()) {
                        integrity_violation(self.metrics.as_ref(), &why);
                        return Ok(view
                            .keys
                            .get(&(space, key.to_vec()))
                            .and_then(|k| k.1.clone()));
                    }
                    view.saw(space, key, rev, value.clone());
                }
                Ok(value)
            }
            // Without etcd: this node's last view, if it is recent enough
            // (nothing can be committed without a majority meanwhile, but a
            // node cut off from the majority cannot know that for long).
            Err(Error::Unavailable(why)) if viewed(space) => self.read_view(space, key, why),
            Err(e) => Err(e),
        }
    }

    fn may_block(&self) -> bool {
        true
    }

    fn get_recent(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        // While the watch has caught up with what a majority answered at
        // the latest heartbeat, the view is as current as the watch:
        // milliseconds behind the cluster, and kept ahead of this node's
        // own writes. (Not just while a majority answers: a watch on a
        // member cut off from it stays open and quiet.)
        if viewed(space) && self.view_current() {
            let view = self.lock_view();
            if view.live {
                if let Some((_, v)) = view.keys.get(&(space, key.to_vec())) {
                    return Ok(v.clone());
                }
            }
        }
        self.get(space, key)
    }

    fn get_optimistic(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        // The view while it is current; a key it does not hold is taken
        // for absent (what a new device's keys are): the commit's compare
        // finds out otherwise, and the registry reads again.
        if viewed(space) && self.view_current() {
            let view = self.lock_view();
            if view.live {
                return Ok(view
                    .keys
                    .get(&(space, key.to_vec()))
                    .and_then(|(_, v)| v.clone()));
            }
        }
        self.get(space, key)
    }

    fn scan<'a>(&'a self, space: Space, prefix: &[u8], start: &[u8]) -> Entries<'a> {
        let base = self.space_prefix(space);
        let mut full = base.clone();
        full.extend_from_slice(prefix);
        let end = prefix_end(&full);
        let mut from = full;
        if start > prefix {
            from = base.clone();
            from.extend_from_slice(start);
        }
        self.pages(base, from, end, false)
    }

    fn scan_rev<'a>(&'a self, space: Space, prefix: &[u8], before: &[u8]) -> Entries<'a> {
        let base = self.space_prefix(space);
        let mut full = base.clone();
        full.extend_from_slice(prefix);
        let mut end = prefix_end(&full);
        if !before.is_empty() {
            let mut b = base.clone();
            b.extend_from_slice(before);
            if b < end || end == [0] {
                end = b;
            }
        }
        self.pages(base, full, end, true)
    }

    fn len(&self, space: Space) -> Result<usize, Error> {
        let start = self.space_prefix(space);
        let resp = self.range(RangeRequest {
            range_end: prefix_end(&start),
            key: start,
            count_only: true,
            ..RangeRequest::default()
        })?;
        Ok(usize::try_from(resp.count).unwrap_or(usize::MAX))
    }

    fn commit(&self, c: Commit) -> Result<bool, Error> {
        self.commit_grouped(c)
    }

    fn commit_unflushed(&self, c: Commit) -> Result<bool, Error> {
        self.commit_grouped(c)
    }

    fn next(&self, name: &str) -> Result<u64, Error> {
        // Compare-and-swap on the counter: one global order for every node.
        let key = self.counter_key(name);
        loop {
            let resp = self.range(RangeRequest {
                key: key.clone(),
                ..RangeRequest::default()
            })?;
            let old = resp.kvs.into_iter().next().map(|kv| kv.value);
            let n = counter_value(old.as_deref()) + 1;
            let put = put_op(key.clone(), n.to_be_bytes().to_vec());
            if self
                .txn(vec![self.compare(&key, old.as_deref())], vec![put])?
                .is_some()
            {
                return Ok(n);
            }
        }
    }

    fn flush(&self) -> Result<(), Error> {
        // A commit that returned is on a majority of members already.
        Ok(())
    }

    fn max_writes(&self) -> usize {
        // etcd's default --max-txn-ops, for compares and writes alike.
        MAX_TXN_OPS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_view_never_goes_back_to_an_older_value() {
        let mut view = View::default();
        let k = |v: &[u8]| Write {
            space: Space::Certs,
            key: b"c".to_vec(),
            value: Some(v.to_vec()),
        };
        let known = |view: &View| view.keys.get(&(Space::Certs, b"c".to_vec())).cloned();
        // Read at 5: kept.
        view.saw(Space::Certs, b"c", 5, Some(b"good".to_vec()));
        assert_eq!(known(&view), Some((5, Some(b"good".to_vec()))));
        // The watch brings 7; a slower read from 6 arrives after it.
        assert!(view.changed(7, &k(b"revoked")).is_ok());
        view.saw(Space::Certs, b"c", 6, Some(b"good".to_vec()));
        assert_eq!(known(&view), Some((7, Some(b"revoked".to_vec()))));
        // A key the watch passed over (not in the view at 9) is not taken
        // from a read at 8: the watch may have skipped a change to it.
        assert!(view
            .changed(
                9,
                &Write {
                    key: b"other".to_vec(),
                    ..k(b"x")
                },
            )
            .is_ok());
        view.saw(Space::Certs, b"new", 8, None);
        assert!(!view.keys.contains_key(&(Space::Certs, b"new".to_vec())));
        // From a read at 9 or later, it is.
        view.saw(Space::Certs, b"new", 9, None);
        assert!(view.keys.contains_key(&(Space::Certs, b"new".to_vec())));
    }

    #[test]
    fn the_view_keeps_a_revocation_the_store_takes_back() {
        let record = |status: &str, revocation: serde_json::Value| {
            json!({
                "id": "dev-1", "role": "device", "status": status,
                "revocation": revocation, "manufacturer": null,
                "created_at": "2026-12-01T00:00:00Z", "updated_at": "2026-12-01T00:00:00Z",
                "certificates": [],
            })
            .to_string()
            .into_bytes()
        };
        let revoked = record(
            "revoked",
            json!({"reason": "key-compromise", "at": "2026-12-02T00:00:00Z"}),
        );
        let active = record("active", serde_json::Value::Null);
        let mut view = View::default();
        view.saw(Space::Devices, b"dev-1", 5, Some(revoked.clone()));
        let undo = Write {
            space: Space::Devices,
            key: b"dev-1".to_vec(),
            value: Some(active),
        };
        let why = view.changed(6, &undo).err();
        assert!(why.is_some_and(|w| w.contains("revoked device dev-1")));
        let known = view.keys.get(&(Space::Devices, b"dev-1".to_vec())).cloned();
        assert_eq!(known, Some((5, Some(revoked))));
        assert_eq!(view.watched, 6);
    }

    #[test]
    fn the_view_is_current_as_of_the_heartbeats_its_watch_reached() {
        let mut view = View::default();
        // The watch at 5; a heartbeat sent at 100 ms read 5: current.
        view.reached(5);
        assert!(view.heartbeat(100, 5));
        assert_eq!((view.current_ms, view.latest_ms), (100, 100));
        // The next read the majority at 9: behind, until the watch gets
        // there (a change, or a progress answer).
        assert!(!view.heartbeat(1_100, 9));
        assert_eq!((view.current_ms, view.latest_ms), (100, 1_100));
        view.reached(8);
        assert_eq!(view.current_ms, 100);
        view.reached(9);
        assert_eq!(view.current_ms, 1_100);
        // A watch cut off from the majority never gets there; only the
        // latest few heartbeats are kept waiting.
        for i in 0..20 {
            assert!(!view.heartbeat(2_000 + i, 50 + i));
        }
        assert_eq!(view.pending.len(), 8);
        assert_eq!(view.current_ms, 1_100);
        view.reached(100);
        assert_eq!(view.current_ms, 2_019);
        assert!(view.pending.is_empty());
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
