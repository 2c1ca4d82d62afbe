//! The way to etcd: its v3 gRPC API over HTTP/2, in plain text for
//! `etcd://` (development) or over TLS with this node's client certificate
//! for `https://`, whose CN etcd takes as the user (`--client-cert-auth`
//! with auth enabled: RBAC on fleetgate's key prefix). One channel per
//! member, tried in turn: the first that answers, etcd's own refusal (a
//! request no member would take), or [`Error::Unavailable`] when none
//! answers.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use provisioning::Error;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use super::pb::etcdserverpb::kv_client::KvClient;
use super::pb::etcdserverpb::watch_client::WatchClient;
use super::pb::etcdserverpb::watch_request::RequestUnion;
use super::pb::etcdserverpb::{
    RangeRequest, RangeResponse, TxnRequest, TxnResponse, WatchCreateRequest, WatchRequest,
    WatchResponse,
};

/// How long one request to one member may take.
pub(super) const TIMEOUT: Duration = Duration::from_secs(3);

/// TLS to etcd (`--store https://...`): the CA that signed the members'
/// certificates, and this node's client certificate (its CN is the etcd
/// user) and key, PEM files.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The members, a channel each, and the one that answered last (tried
/// first: a member cut off from the others costs one timeout, not one
/// per request).
#[derive(Clone, Debug)]
pub(super) struct Members(
    Vec<(String, Channel)>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
);

impl Members {
    /// Channels to `endpoints` (`host:port`), connected on first use.
    /// Called inside the store's runtime (a channel's worker runs there).
    pub fn new(endpoints: &[String], tls: Option<&EtcdTls>) -> anyhow::Result<Self> {
        let tls = match tls {
            None => None,
            Some(t) => {
                let ca = std::fs::read(&t.ca)
                    .with_context(|| format!("reading --store-ca {}", t.ca.display()))?;
                let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
                if let Some((cert, key)) = &t.identity {
                    let cert = std::fs::read(cert)
                        .with_context(|| format!("reading --store-cert {}", cert.display()))?;
                    let key = std::fs::read(key)
                        .with_context(|| format!("reading --store-key {}", key.display()))?;
                    c = c.identity(Identity::from_pem(cert, key));
                }
                Some(c)
            }
        };
        let mut members = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut ep = Endpoint::from_shared(format!("{scheme}://{e}"))
                .with_context(|| format!("etcd endpoint {e}"))?
                .connect_timeout(TIMEOUT)
                .tcp_nodelay(true)
                // A member that went quiet (a partition) is noticed.
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(TIMEOUT)
                .keep_alive_while_idle(true);
            if let Some(t) = &tls {
                ep = ep
                    .tls_config(t.clone())
                    .with_context(|| format!("TLS to etcd member {e}"))?;
            }
            members.push((e.clone(), ep.connect_lazy()));
        }
        Ok(Self(members, std::sync::Arc::default()))
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, Channel)> {
        self.0.iter()
    }

    /// `f` on the first member that answers, each within `timeout`, from
    /// the one that answered last.
    async fn any<T, F, Fut>(&self, timeout: Duration, f: F) -> Result<T, Error>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        use std::sync::atomic::Ordering;
        let mut last = String::from("no etcd endpoints");
        let n = self.0.len();
        let first = self.1.load(Ordering::Relaxed);
        for i in (0..n).map(|k| (first + k) % n) {
            let (e, ch) = &self.0[i];
            match tokio::time::timeout(timeout, f(ch.clone())).await {
                Ok(Ok(v)) => {
                    self.1.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(s)) if refused(&s) => {
                    return Err(Error::Storage(format!("etcd refused: {}", s.message())))
                }
                Ok(Err(s)) => last = format!("{e}: {}", describe(&s)),
                Err(_) => last = format!("{e}: no answer within {timeout:?}"),
            }
        }
        Err(Error::Unavailable(format!("etcd: {last}")))
    }

    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.range_within(TIMEOUT, req).await
    }

    /// [`Members::range`], each member given `timeout`.
    pub async fn range_within(
        &self,
        timeout: Duration,
        req: RangeRequest,
    ) -> Result<RangeResponse, Error> {
        self.any(timeout, |ch| {
            let req = req.clone();
            async move { Ok(kv(ch).range(req).await?.into_inner()) }
        })
        .await
    }

    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Error> {
        self.any(TIMEOUT, |ch| {
            let req = req.clone();
            async move { Ok(kv(ch).txn(req).await?.into_inner()) }
        })
        .await
    }
}

/// The KV client on `ch`. A page of a range may be large (512 keys of
/// sealed audit segments, some 80 KB each): tonic's default limit of
/// 4 MiB a message is lifted; etcd bounds what it sends by the page.
fn kv(ch: Channel) -> KvClient<Channel> {
    KvClient::new(ch).max_decoding_message_size(MAX_MESSAGE)
}

/// The largest answer taken from etcd.
const MAX_MESSAGE: usize = 512 * 1024 * 1024;

/// A request no member would take: bad input, too many operations, or
/// not allowed (RBAC, a certificate etcd maps to no user).
fn refused(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::ResourceExhausted
            | Code::OutOfRange
    )
}

fn describe(s: &Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    // A transport error (refused connection, TLS) says why in its source.
    let mut src = std::error::Error::source(s);
    while let Some(e) = src {
        out.push_str(&format!(": {e}"));
        src = e.source();
    }
    out
}

/// Opens a watch on one member: `create`, with etcd's `hasleader`
/// metadata, so a member cut off from the majority ends the stream (and
/// the node resumes on another) rather than go quiet.
/// `then`: the requests that follow (progress requests); the request
/// stream stays open for as long as the watch.
pub(super) async fn watch(
    ch: Channel,
    create: WatchCreateRequest,
    then: tokio::sync::mpsc::UnboundedReceiver<WatchRequest>,
) -> Result<tonic::Streaming<WatchResponse>, Status> {
    let first = WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(create)),
    };
    let rest =
        futures_util::stream::unfold(
            then,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        )
        .chain(futures_util::stream::pending());
    let outbound = futures_util::stream::iter([first]).chain(rest);
    let mut request = tonic::Request::new(outbound);
    request.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(WatchClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .watch(request)
        .await?
        .into_inner())
}
