//! The live activity feed: refusals and kicks as they happen, for the
//! operator console. It is fed by a `tracing` layer from the very warnings
//! the log gets (so nothing is refused without showing up here, and what
//! reaches it has already been kept free of secrets and control characters,
//! as the log is), and read as a broadcast plus the latest few.
//!
//! Each device's latest refusals (and connections ended for a reason, an
//! ACL or protocol violation) are kept too, for its page: the last
//! [`PER_DEVICE`] of each of up to [`DEVICES`] devices, in this node's
//! memory only (they are the log's warnings, which the log keeps; a
//! restart starts them afresh).

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use tokio::sync::broadcast;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// How many past events a newcomer to the feed is shown.
const RECENT: usize = 200;

/// Refusals kept per device.
pub const PER_DEVICE: usize = 20;

/// Devices whose refusals are kept at most; past it, those refused least
/// recently are forgotten first.
pub const DEVICES: usize = 10_000;

/// One refusal, kick or warning.
#[derive(Clone, Debug, Serialize)]
pub struct Activity {
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
    /// `refusal`, `kick`, `console` (the console's own refusals) or
    /// `warning`.
    pub kind: &'static str,
    /// The log message.
    pub message: String,
    /// Its fields and its spans' (`reason=revoked client=dev-1 ...`).
    pub detail: String,
    /// The device it is about, if it names one (its connection's span).
    pub device: Option<String>,
    /// The peer's address, if known.
    pub addr: Option<String>,
    /// The refusal's reason (`revoked`, `acl`, `unknown_ca` ...).
    pub reason: Option<String>,
    /// Where it was refused: `TLS` (the handshake), `MQTT`, or `HTTP`.
    pub protocol: &'static str,
}

/// The feed: its subscribers and its latest events.
#[derive(Debug)]
pub struct Feed {
    tx: broadcast::Sender<Arc<Activity>>,
    recent: Mutex<VecDeque<Arc<Activity>>>,
    by_device: Mutex<HashMap<String, VecDeque<Arc<Activity>>>>,
}

impl Feed {
    fn new() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            by_device: Mutex::default(),
        }
    }

    fn push(&self, a: Activity) {
        let a = Arc::new(a);
        // A refusal, or a connection ended for a reason (an ACL or
        // protocol violation), of a device.
        if let (Some(d), Some(_), "refusal" | "warning") = (&a.device, &a.reason, a.kind) {
            self.keep_for(d, a.clone());
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(a.clone());
        let _ = self.tx.send(a);
    }

    fn keep_for(&self, device: &str, a: Arc<Activity>) {
        let mut by = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        if !by.contains_key(device) && by.len() >= DEVICES {
            // Forget the device refused least recently.
            let oldest = by
                .iter()
                .min_by_key(|(_, q)| q.back().map(|a| a.at))
                .map(|(d, _)| d.clone());
            if let Some(d) = oldest {
                by.remove(&d);
            }
        }
        let q = by.entry(device.to_owned()).or_default();
        if q.len() == PER_DEVICE {
            q.pop_front();
        }
        q.push_back(a);
    }

    /// `device`'s latest refusals on this node, newest first.
    pub fn refusals_of(&self, device: &str) -> Vec<Activity> {
        let by = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        by.get(device)
            .map(|q| q.iter().rev().map(|a| (**a).clone()).collect())
            .unwrap_or_default()
    }

    /// The latest events, oldest first, and a subscription to what comes
    /// after them.
    pub fn follow(&self) -> (Vec<Arc<Activity>>, broadcast::Receiver<Arc<Activity>>) {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        (recent.iter().cloned().collect(), self.tx.subscribe())
    }
}

/// The process's feed.
pub fn feed() -> &'static Feed {
    static FEED: OnceLock<Feed> = OnceLock::new();
    FEED.get_or_init(Feed::new)
}

/// The layer that feeds [`feed`]: warnings and errors of the broker's
/// MQTT side and API (refusals, cut connections), and the cutting of
/// sessions a revocation or suspension causes.
#[derive(Debug, Default)]
pub struct FeedLayer;

impl<S> Layer<S> for FeedLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let target = meta.target();
        if !(target.starts_with("fleetgate_mqtt::mqtt")
            || target.starts_with("fleetgate_http::api"))
        {
            return;
        }
        // The message decides; the other fields are read only for an
        // event the feed keeps (not, say, every connect's "connected").
        let mut message = Message::default();
        event.record(&mut message);
        let message = message.0;
        // The console's own refusals (a browser without a session) are
        // no device's.
        let kind = if message.starts_with("console:") {
            "console"
        } else if message.contains("refused") {
            "refusal"
        } else if message.contains("cut") || message.contains("taken over") {
            "kick"
        } else if *meta.level() <= Level::WARN {
            "warning"
        } else {
            return;
        };
        let mut v = Fields::default();
        event.record(&mut v);
        let mut spans = String::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(f) = span
                    .extensions()
                    .get::<tracing_subscriber::fmt::FormattedFields<
                        tracing_subscriber::fmt::format::DefaultFields,
                    >>()
                {
                    if !f.is_empty() {
                        let _ = write!(spans, " {}", f.fields);
                    }
                }
            }
        }
        // The connection's span names the device and its address; a
        // handshake refusal names the certificate's identity itself.
        let device = v.device.take().or_else(|| field_of(&spans, "device.id"));
        let addr = v.addr.take().or_else(|| field_of(&spans, "peer.addr"));
        let protocol = if target.starts_with("fleetgate_http") {
            "HTTP"
        } else if v.message.contains("handshake") {
            "TLS"
        } else {
            "MQTT"
        };
        feed().push(Activity {
            at: time::OffsetDateTime::now_utc(),
            kind,
            message: v.message,
            detail: format!("{}{spans}", v.detail).trim().to_owned(),
            device,
            addr,
            reason: v.reason,
            protocol,
        });
    }
}

/// `name=value` in a span's formatted fields (values are printed plain,
/// or quoted when they hold spaces).
fn field_of(spans: &str, name: &str) -> Option<String> {
    let at = spans.find(&format!("{name}="))? + name.len() + 1;
    let rest = &spans[at..];
    let value = match rest.strip_prefix('"') {
        Some(q) => q.split('"').next().unwrap_or_default(),
        None => rest.split_whitespace().next().unwrap_or_default(),
    };
    (!value.is_empty()).then(|| value.to_owned())
}

/// An event's message alone.
#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    detail: String,
    reason: Option<String>,
    device: Option<String>,
    addr: Option<String>,
}

impl Fields {
    fn take(&mut self, name: &str, value: String) {
        match name {
            "reason" => self.reason = Some(value.clone()),
            "device.id" | "client" | "identity" => self.device = Some(value.clone()),
            "peer.addr" | "peer" | "addr" => self.addr = Some(value.clone()),
            _ => {}
        }
        let _ = write!(self.detail, " {name}={value}");
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.take(field.name(), format!("{value:?}"));
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.take(field.name(), value.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(device: &str, n: usize) -> Activity {
        Activity {
            at: time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(n as i64),
            kind: "refusal",
            message: "mqtt: refused".into(),
            detail: String::new(),
            device: Some(device.into()),
            addr: None,
            reason: Some("revoked".into()),
            protocol: "MQTT",
        }
    }

    #[test]
    fn a_devices_latest_refusals_are_kept_newest_first_and_bounded() {
        let feed = Feed::new();
        for n in 0..PER_DEVICE + 5 {
            feed.push(refusal("dev-3", n));
        }
        let kept = feed.refusals_of("dev-3");
        assert_eq!(kept.len(), PER_DEVICE);
        assert!(kept.windows(2).all(|w| w[0].at > w[1].at), "newest first");
        assert!(feed.refusals_of("dev-4").is_empty());
    }

    #[test]
    fn span_fields_are_read_plain_or_quoted() {
        let spans = r#" device.id=dev-3 peer.addr=127.0.0.1:5555 note="a b""#;
        assert_eq!(field_of(spans, "device.id").as_deref(), Some("dev-3"));
        assert_eq!(
            field_of(spans, "peer.addr").as_deref(),
            Some("127.0.0.1:5555")
        );
        assert_eq!(field_of(spans, "note").as_deref(), Some("a b"));
        assert_eq!(field_of(spans, "missing"), None);
    }
}
