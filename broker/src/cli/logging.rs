//! The process's log: tracing to stderr (text or JSON), filtered by an
//! `EnvFilter` that SIGHUP can replace, and the console's activity feed.
//!
//! A connection's session runs inside its span (`device.id`, `peer.addr`),
//! entered on every poll: a message's wake-up. tracing-subscriber's
//! reloadable `EnvFilter` takes two read locks on each entry and each exit
//! to track spans for span directives (`[mqtt{device.id=d-7}]=debug`),
//! which most filters do not have: [`LogFilter`] tracks spans only for a
//! filter that has them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{span, Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use super::LogFormat;

/// The log filter when neither `--log-level` nor `FLEETGATE_LOG` says.
pub(crate) const DEFAULT_LOG: &str = "info,sled=warn,rumqttd=warn,rustls=error";

/// Changes the log filter of a running process (SIGHUP with a new
/// `log-level` in the configuration file).
static FILTER: OnceLock<Arc<Shared>> = OnceLock::new();

/// Sets the log filter (`info`, `debug,sled=warn`, ...), or says why not.
pub fn set_log_filter(spec: &str) -> Result<(), String> {
    match FILTER.get() {
        Some(f) => f.set(spec),
        None => Err("logging is not set up".into()),
    }
}

/// The filter's current `EnvFilter`, and whether it has span directives.
#[derive(Debug)]
struct Shared {
    filter: RwLock<EnvFilter>,
    spans: AtomicBool,
}

impl Shared {
    fn new(spec: &str) -> Result<Self, String> {
        Ok(Self {
            filter: RwLock::new(EnvFilter::try_new(spec).map_err(|e| e.to_string())?),
            spans: AtomicBool::new(has_span_directives(spec)),
        })
    }

    fn set(&self, spec: &str) -> Result<(), String> {
        let new = EnvFilter::try_new(spec).map_err(|e| e.to_string())?;
        {
            let mut f = self.filter.write().unwrap_or_else(|e| e.into_inner());
            *f = new;
            self.spans
                .store(has_span_directives(spec), Ordering::Release);
        }
        // Callsites cache what the old filter said of them.
        tracing_core::callsite::rebuild_interest_cache();
        Ok(())
    }

    fn filter(&self) -> std::sync::RwLockReadGuard<'_, EnvFilter> {
        self.filter.read().unwrap_or_else(|e| e.into_inner())
    }

    fn tracks_spans(&self) -> bool {
        self.spans.load(Ordering::Acquire)
    }
}

/// Whether an `EnvFilter` spec names spans or fields (`target[span{f=v}]`):
/// only then does the filter need to see spans entered and left.
fn has_span_directives(spec: &str) -> bool {
    spec.contains('[')
}

/// The log layer's filter: the current `EnvFilter`, told of spans only if
/// it has span directives.
#[derive(Debug, Clone)]
struct LogFilter(Arc<Shared>);

impl<S> Filter<S> for LogFilter
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        Filter::<S>::enabled(&*self.0.filter(), meta, cx)
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        Filter::<S>::callsite_enabled(&*self.0.filter(), meta)
    }

    fn event_enabled(&self, event: &Event<'_>, cx: &Context<'_, S>) -> bool {
        Filter::<S>::event_enabled(&*self.0.filter(), event, cx)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Filter::<S>::max_level_hint(&*self.0.filter())
    }

    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, cx: Context<'_, S>) {
        if self.0.tracks_spans() {
            Filter::<S>::on_new_span(&*self.0.filter(), attrs, id, cx)
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, cx: Context<'_, S>) {
        if self.0.tracks_spans() {
            Filter::<S>::on_record(&*self.0.filter(), id, values, cx)
        }
    }

    fn on_enter(&self, id: &span::Id, cx: Context<'_, S>) {
        if self.0.tracks_spans() {
            Filter::<S>::on_enter(&*self.0.filter(), id, cx)
        }
    }

    fn on_exit(&self, id: &span::Id, cx: Context<'_, S>) {
        if self.0.tracks_spans() {
            Filter::<S>::on_exit(&*self.0.filter(), id, cx)
        }
    }

    fn on_close(&self, id: span::Id, cx: Context<'_, S>) {
        if self.0.tracks_spans() {
            Filter::<S>::on_close(&*self.0.filter(), id, cx)
        }
    }
}

/// `spec` (`--log-level`), else `FLEETGATE_LOG`, else [`DEFAULT_LOG`]; a
/// spec that does not parse is said and replaced by the default.
fn initial(spec: Option<&str>) -> Shared {
    let spec = spec
        .map(str::to_owned)
        .or_else(|| std::env::var("FLEETGATE_LOG").ok());
    match spec {
        Some(s) => Shared::new(&s).unwrap_or_else(|e| {
            eprintln!("warning: log level {s:?}: {e}; using {DEFAULT_LOG:?}");
            Shared::new(DEFAULT_LOG).expect("the default log filter parses")
        }),
        None => Shared::new(DEFAULT_LOG).expect("the default log filter parses"),
    }
}

pub(super) fn init_tracing(format: LogFormat, spec: Option<&str>) {
    use tracing_subscriber::prelude::*;
    let shared = Arc::new(initial(spec));
    let _ = FILTER.set(shared.clone());
    let fmt: Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync> =
        match format {
            LogFormat::Text => Box::new(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            ),
            // One JSON object a line: time, level, target, the message and
            // fields (`fields`), and the spans' fields (`spans`: device.id,
            // peer.addr).
            LogFormat::Json => Box::new(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_span_list(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            ),
        };
    tracing_subscriber::registry()
        .with(fmt.with_filter(LogFilter(shared)))
        // The console's live activity: refusals and kicks, whatever the
        // log shows.
        .with(crate::activity::FeedLayer.with_filter(LevelFilter::INFO))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tracing_subscriber::prelude::*;

    /// Collects the messages of the events it is given.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> tracing_subscriber::Layer<S> for Lines {
        fn on_event(&self, event: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            struct Message(String);
            impl tracing::field::Visit for Message {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if f.name() == "message" {
                        self.0 = format!("{v:?}");
                    }
                }
            }
            let mut m = Message(String::new());
            event.record(&mut m);
            self.0.lock().unwrap().push(m.0);
        }
    }

    /// The filter as the log has it, set to `spec`, in a subscriber of its
    /// own; what it let through.
    fn logged(spec: &str, then: Option<&str>, f: impl Fn()) -> Vec<String> {
        let shared = Arc::new(Shared::new(spec).unwrap());
        let lines = Lines::default();
        let subscriber = tracing_subscriber::registry()
            .with(lines.clone().with_filter(LogFilter(shared.clone())));
        tracing::subscriber::with_default(subscriber, || {
            f();
            if let Some(then) = then {
                shared.set(then).unwrap();
                f();
            }
        });
        let got = lines.0.lock().unwrap().clone();
        got
    }

    fn connections() {
        for id in ["d-1", "d-2"] {
            let span = tracing::info_span!("mqtt", device.id = id);
            let _in = span.enter();
            tracing::debug!("debug {id}");
            tracing::info!("info {id}");
        }
    }

    #[test]
    fn a_filter_without_span_directives_filters_by_target_and_level() {
        assert!(!has_span_directives(DEFAULT_LOG));
        assert_eq!(logged("info", None, connections), ["info d-1", "info d-2"]);
        assert_eq!(logged("warn", None, connections), Vec::<String>::new());
    }

    /// The filter that sees no span entered unless it needs to still
    /// honours span directives: one device's debug lines, not another's.
    #[test]
    fn span_directives_still_pick_one_connection() {
        let spec = "info,[mqtt{device.id=d-2}]=debug";
        assert!(has_span_directives(spec));
        assert_eq!(
            logged(spec, None, connections),
            ["info d-1", "debug d-2", "info d-2"]
        );
    }

    /// SIGHUP's new filter applies to the next event, either way.
    #[test]
    fn a_new_filter_applies_at_once() {
        assert_eq!(
            logged(
                "warn",
                Some("info,[mqtt{device.id=d-1}]=debug"),
                connections
            ),
            ["debug d-1", "info d-1", "info d-2"]
        );
        assert_eq!(
            logged(
                "info,[mqtt{device.id=d-1}]=debug",
                Some("warn"),
                connections
            ),
            ["debug d-1", "info d-1", "info d-2"]
        );
    }

    #[test]
    fn a_spec_that_does_not_parse_is_refused_with_its_reason() {
        let e = Shared::new("info,[").unwrap_err();
        assert!(!e.is_empty());
        assert!(Shared::new(DEFAULT_LOG).unwrap().set("=nope=").is_err());
    }
}
