//! The live activity feed: refusals and kicks as they happen, for the
//! operator console. It is fed by a `tracing` layer from the very warnings
//! the log gets (so nothing is refused without showing up here, and what
//! reaches it has already been kept free of secrets and control characters,
//! as the log is), and read as a broadcast plus the latest few.

use std::collections::VecDeque;
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

/// One refusal, kick or warning.
#[derive(Clone, Debug, Serialize)]
pub struct Activity {
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
    /// `refusal`, `kick` or `warning`.
    pub kind: &'static str,
    /// The log message.
    pub message: String,
    /// Its fields and its spans' (`reason=revoked client=dev-1 ...`).
    pub detail: String,
}

/// The feed: its subscribers and its latest events.
#[derive(Debug)]
pub struct Feed {
    tx: broadcast::Sender<Arc<Activity>>,
    recent: Mutex<VecDeque<Arc<Activity>>>,
}

impl Feed {
    fn new() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }

    fn push(&self, a: Activity) {
        let a = Arc::new(a);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(a.clone());
        let _ = self.tx.send(a);
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
        let mut v = Fields::default();
        event.record(&mut v);
        let kind = if v.message.contains("refused") {
            "refusal"
        } else if v.message.contains("cut") || v.message.contains("taken over") {
            "kick"
        } else if *meta.level() <= Level::WARN {
            "warning"
        } else {
            return;
        };
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(f) = span
                    .extensions()
                    .get::<tracing_subscriber::fmt::FormattedFields<
                        tracing_subscriber::fmt::format::DefaultFields,
                    >>()
                {
                    if !f.is_empty() {
                        let _ = write!(v.detail, " {}", f.fields);
                    }
                }
            }
        }
        feed().push(Activity {
            at: time::OffsetDateTime::now_utc(),
            kind,
            message: v.message,
            detail: v.detail.trim().to_owned(),
        });
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    detail: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            let _ = write!(self.detail, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            let _ = write!(self.detail, " {}={value}", field.name());
        }
    }
}
