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

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use provisioning::store::{Commit, Entries, Space, Store, Write};
use provisioning::Error;

mod group;
mod grpc;
mod pb;
mod view;
mod window;
use group::lock;
use view::View;

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

/// Keys per range request when a scan starts.
const PAGE: i64 = 512;

/// Keys per range request, at most, as a scan goes on.
const MAX_PAGE: i64 = 8192;

/// About how many bytes a scan's page grows to.
const PAGE_BYTES: i64 = 2 << 20;

/// Keys per range request when warming the view: larger pages, fewer
/// round trips (a certificate record is some 150 bytes).
const WARM_PAGE: i64 = 4096;

/// Keys a scan from the view reads under one hold of its lock.
const VIEW_SCAN_STRETCH: usize = 1024;

/// What a key in the view costs beyond its key and value: the map's
/// entry, the revision, two allocations.
const VIEW_ENTRY_OVERHEAD: usize = 80;

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
    /// Where long scans from the start of a range found the end of their
    /// first page: a scan of one again reads up to there, then on from
    /// it, not with a request over the whole range (which etcd counts key
    /// by key). Not the first key: that may lie far from the rest (the
    /// admin before every device).
    firsts: Mutex<std::collections::HashMap<Vec<u8>, Vec<u8>>>,
}

/// Ranges whose first page's end a store remembers, at most.
const FIRSTS: usize = 256;

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

/// How many keys the next request of a scan asks for, after a page of
/// `kvs` at `limit`: twice as many, up to [`MAX_PAGE`] and about
/// [`PAGE_BYTES`] (sealed audit segments are some 80 KB each).
fn next_page(limit: i64, kvs: &[(Vec<u8>, Vec<u8>)]) -> i64 {
    let bytes: usize = kvs.iter().map(|(k, v)| k.len() + v.len()).sum();
    let each = (bytes / kvs.len().max(1)).max(1) as i64;
    (limit * 2).min(MAX_PAGE).min(PAGE_BYTES / each).max(PAGE)
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
            firsts: Mutex::default(),
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
        self.lock_view().watching = true;
        let followed = view.clone();
        let on = move |seen: Seen| {
            let lock = || {
                view.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
            };
            let changes = match seen {
                Seen::Opened(rev) => {
                    let mut view = lock();
                    if rev > 0 {
                        view.opened(rev);
                    }
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
    /// (`rev`) the reverse, as `pager` asks; keys with `base` taken off.
    /// `remember`: the range's start, under which a long scan keeps where
    /// its first page ended (`firsts`).
    fn pages<'a>(
        &'a self,
        base: Vec<u8>,
        pager: window::Pager,
        remember: Option<Vec<u8>>,
    ) -> Entries<'a> {
        let (mut pager, mut remember) = (pager, remember);
        let mut page: std::vec::IntoIter<window::Kv> = Vec::new().into_iter();
        // A scan that goes on reads larger pages: a short one (a page of
        // a listing) stays one small request, a long one (a search
        // through every device) takes few round trips.
        let mut limit = PAGE;
        Box::new(std::iter::from_fn(move || loop {
            if let Some((k, v)) = page.next() {
                return Some(Ok((k.get(base.len()..).unwrap_or_default().to_vec(), v)));
            }
            let ask = pager.ask()?;
            tracing::trace!(
                key = %String::from_utf8_lossy(&ask.key),
                end = %String::from_utf8_lossy(&ask.range_end),
                limit = ask.limit,
                "etcd: range"
            );
            match self.range(range_request(ask)) {
                Ok(resp) => {
                    let kvs: Vec<window::Kv> =
                        resp.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
                    if !kvs.is_empty() {
                        limit = next_page(limit, &kvs);
                        pager.set_limit(limit);
                    }
                    let page_end = kvs.last().map(|(k, _)| k.clone());
                    page = pager.answer(kvs, resp.more, resp.count).into_iter();
                    if let (Some(from), Some(page_end)) = (remember.take(), page_end) {
                        if pager.long() {
                            let mut firsts = lock(&self.firsts);
                            if firsts.len() >= FIRSTS {
                                firsts.clear();
                            }
                            firsts.insert(from, page_end);
                        }
                    }
                }
                Err(e) => {
                    pager.stop();
                    return Some(Err(e));
                }
            }
        }))
    }
}

/// The range request for `ask`.
fn range_request(ask: window::Ask) -> RangeRequest {
    let mut req = RangeRequest {
        key: ask.key,
        range_end: ask.range_end,
        limit: ask.limit,
        ..RangeRequest::default()
    };
    if ask.descend {
        req.sort_order = SortOrder::Descend as i32;
        req.sort_target = SortTarget::Key as i32;
    }
    req
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
        if start > prefix {
            // From a cursor: the keys are next to it.
            let from = [&base[..], start].concat();
            return self.pages(
                base,
                window::Pager::oldest_from(from, end, None, PAGE),
                None,
            );
        }
        let known = lock(&self.firsts).get(&full).cloned();
        match known {
            Some(page_end) => {
                let pager = window::Pager::oldest_from(full, end, Some(page_end), PAGE);
                self.pages(base, pager, None)
            }
            None => {
                let pager = window::Pager::new(full.clone(), end, false, PAGE);
                self.pages(base, pager, Some(full))
            }
        }
    }

    fn scan_between<'a>(&'a self, space: Space, start: &[u8], end: &[u8]) -> Entries<'a> {
        let base = self.space_prefix(space);
        let (from, to) = ([&base[..], start].concat(), [&base[..], end].concat());
        let pager = match start.is_empty() {
            true => window::Pager::new(from, to, false, PAGE),
            false => window::Pager::oldest_from(from, to, None, PAGE),
        };
        self.pages(base, pager, None)
    }

    fn scan_rev<'a>(&'a self, space: Space, prefix: &[u8], before: &[u8]) -> Entries<'a> {
        let base = self.space_prefix(space);
        let mut full = base.clone();
        full.extend_from_slice(prefix);
        let end = prefix_end(&full);
        let below = [&base[..], before].concat();
        let pager = if !before.is_empty() && (below < end || end == [0]) {
            // Below a key the caller read: near the keys it wants.
            window::Pager::newest_below(full, below, PAGE)
        } else {
            window::Pager::new(full, end, true, PAGE)
        };
        self.pages(base, pager, None)
    }

    fn last_appended(&self, counter: &str) -> Result<Option<u64>, Error> {
        let resp = self.range(RangeRequest {
            key: self.counter_key(counter),
            ..RangeRequest::default()
        })?;
        Ok(resp.kvs.first().map(|kv| counter_value(Some(&kv.value))))
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

    fn warm(&self, space: Space, budget: u64) -> Result<usize, Error> {
        if !viewed(space) {
            return Ok(0);
        }
        // With a watch, the view can hold the space whole (scans then
        // read it: `scan_recent`), once the watch has opened: a value
        // read before may have changed unseen.
        let deadline = std::time::Instant::now() + STARTUP_WAIT;
        let whole = loop {
            let mut view = self.lock_view();
            if !view.watching {
                break false;
            }
            if view.live {
                break view.begin_whole(space);
            }
            drop(view);
            if std::time::Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let base = self.space_prefix(space);
        let end = prefix_end(&base);
        let mut pager = window::Pager::new(base.clone(), end, false, WARM_PAGE);
        let (mut n, mut bytes) = (0usize, 0u64);
        let mut complete = whole;
        while let Some(ask) = pager.ask() {
            if bytes >= budget {
                complete = false;
                break;
            }
            let resp = match self.range(range_request(ask)) {
                Ok(r) => r,
                Err(e) => {
                    if whole {
                        self.lock_view().whole.remove(&space);
                    }
                    return Err(e);
                }
            };
            // Each page as of its own revision: a key goes into the view
            // only if no change to it since can have been passed over.
            let rev = revision(resp.header.as_ref());
            let kvs = resp.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
            let kvs = pager.answer(kvs, resp.more, resp.count);
            let mut view = self.lock_view();
            for (k, v) in kvs {
                let key = k.get(base.len()..).unwrap_or_default();
                if let Some(why) = view.regression(space, key, Some(&v)) {
                    integrity_violation(self.metrics.as_ref(), &why);
                    continue;
                }
                bytes += (k.len() + v.len() + VIEW_ENTRY_OVERHEAD) as u64;
                n += 1;
                if complete && view.whole.contains_key(&space) {
                    complete = view.filled(space, key, rev, v);
                } else {
                    complete = false;
                    view.saw(space, key, rev, Some(v));
                }
            }
        }
        if whole {
            let mut view = self.lock_view();
            match view.whole.get_mut(&space) {
                Some(w) if complete => w.filling = None,
                Some(_) => {
                    view.whole.remove(&space);
                }
                None => {}
            }
        }
        Ok(n)
    }

    fn scan_recent<'a>(&'a self, space: Space, prefix: &[u8], start: &[u8]) -> Entries<'a> {
        if !(viewed(space) && self.view_current() && self.lock_view().holds_whole(space)) {
            return self.scan(space, prefix, start);
        }
        // From the view, a stretch at a time (the lock is not held
        // between them); a view that stops being current or whole
        // mid-way reads the rest from etcd.
        let prefix = prefix.to_vec();
        let mut from = std::cmp::max(prefix.clone(), start.to_vec());
        let mut first = true;
        let mut page = Vec::<(Vec<u8>, Vec<u8>)>::new().into_iter();
        let mut rest: Option<Entries<'a>> = None;
        let mut done = false;
        Box::new(std::iter::from_fn(move || loop {
            if let Some(kv) = page.next() {
                return Some(Ok(kv));
            }
            if let Some(r) = rest.as_mut() {
                return r.next();
            }
            if done {
                return None;
            }
            let current = self.view_current();
            let view = self.lock_view();
            let Some(whole) = view
                .whole
                .get(&space)
                .filter(|w| current && w.filling.is_none())
            else {
                drop(view);
                let mut after = from.clone();
                if !first {
                    after.push(0);
                }
                rest = Some(self.scan(space, &prefix, &after));
                continue;
            };
            let range = whole.keys.range::<Vec<u8>, _>((
                if first {
                    std::ops::Bound::Included(&from)
                } else {
                    std::ops::Bound::Excluded(&from)
                },
                std::ops::Bound::Unbounded,
            ));
            let mut out = Vec::with_capacity(VIEW_SCAN_STRETCH);
            let mut seen = 0;
            for k in range {
                if !k.starts_with(&prefix) {
                    done = true;
                    break;
                }
                seen += 1;
                from.clone_from(k);
                if let Some((_, Some(v))) = view.keys.get(&(space, k.clone())) {
                    out.push((k.clone(), v.clone()));
                }
                if seen == VIEW_SCAN_STRETCH {
                    break;
                }
            }
            if seen < VIEW_SCAN_STRETCH {
                done = true;
            }
            first = false;
            page = out.into_iter();
        }))
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

    #[test]
    fn a_scan_s_pages_grow_up_to_a_bound_in_keys_and_bytes() {
        let small = vec![(vec![0u8; 20], vec![0u8; 200]); 512];
        assert_eq!(next_page(PAGE, &small), 2 * PAGE);
        assert_eq!(next_page(MAX_PAGE, &small), MAX_PAGE);
        // 80 KB audit segments: never fewer keys than the first page.
        let big = vec![(vec![0u8; 20], vec![0u8; 80_000]); 3];
        assert_eq!(next_page(PAGE, &big), PAGE);
        // 1 KB values: some 2 MiB a page.
        let kb = vec![(vec![0u8; 24], vec![0u8; 1000]); 512];
        assert_eq!(next_page(4096, &kb), PAGE_BYTES / 1024);
        assert_eq!(next_page(PAGE, &[]), 2 * PAGE);
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
