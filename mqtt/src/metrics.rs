//! Counters for what the broker does and refuses. Lock-free; read by
//! `GET /v1/stats` on the admin API.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

pub use fleetgate_mqtt_core::Refusal;

/// Upper bounds of the latency histograms' buckets, in seconds.
const BUCKETS: [f64; 10] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// A latency histogram, recorded into the Prometheus recorder of the
/// [`Metrics`] it belongs to (cumulative buckets, sum and count).
#[derive(Clone)]
pub struct Histogram(metrics::Histogram);

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Histogram")
    }
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        self.0.record(d.as_secs_f64());
    }

    /// Times `f` into this histogram.
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = std::time::Instant::now();
        let out = f();
        self.observe(t0.elapsed());
        out
    }
}

/// Every metric's name, kind and help: what the exposition says of it.
const COUNTERS: [(&str, &str); 19] = [
    ("fleetgate_mqtt_handshakes_total", "Completed mutual-TLS handshakes."),
    ("fleetgate_mqtt_tls_resumptions_total", "Completed handshakes that resumed a TLS session (a session ticket; the certificate's checks run again on the chain it carries)."),
    ("fleetgate_mqtt_sessions_total", "MQTT sessions started."),
    ("fleetgate_mqtt_kicked_total", "Sessions cut by a revocation or suspension."),
    ("fleetgate_mqtt_taken_over_total", "Sessions taken over by a newer connection."),
    ("fleetgate_ocsp_responses_total", "OCSP responses sent (HTTP and MQTT)."),
    ("fleetgate_jit_registrations_total", "Devices registered just in time on first connect."),
    ("fleetgate_claim_provisions_total", "Device certificates issued to claims over MQTT."),
    ("fleetgate_commands_delivered_total", "Commands handed to a device's live session."),
    ("fleetgate_commands_queued_total", "Commands stored in a device's durable queue (flushed before the PUBACK)."),
    ("fleetgate_commands_refused_total", "Commands refused because the device's queue was full."),
    ("fleetgate_commands_unrouted_total", "Commands no session of the device subscribes to."),
    ("fleetgate_revocations_total", "Revocations and suspensions of devices, certificates and manufacturers."),
    ("fleetgate_store_errors_total", "Shared store requests that no etcd member answered, or that etcd refused."),
    ("fleetgate_store_watch_events_total", "Committed changes seen on the shared store's watch."),
    ("fleetgate_store_watch_interruptions_total", "Watch streams on the shared store that ended and were resumed."),
    ("fleetgate_store_integrity_violations_total", "Changes in the shared store that took back a revocation (made outside fleetgate): not applied."),
    ("fleetgate_bus_published_total", "Messages put on the message bus (NATS JetStream) for other nodes."),
    ("fleetgate_bus_received_total", "Messages from other nodes taken off the message bus."),
];
const MORE_COUNTERS: [(&str, &str); 5] = [
    ("fleetgate_router_messages_total", "Messages handed to rumqttd's router: those a persistent service session or a $share group there may want (live services that keep nothing get theirs without it)."),
    ("fleetgate_service_backlog_dropped_total", "Messages not handed to a live service session: it had not taken the --router-log-mib of messages already waiting for it."),
    ("fleetgate_bus_dropped_total", "Messages from the message bus dropped: their sender could not have published them."),
    ("fleetgate_bus_failed_total", "Messages that could not be put on the message bus (QoS 1 refused, QoS 0 kept on this node)."),
    ("fleetgate_refusals_total", "Refused clients and packets, by reason."),
];
const GAUGES: [(&str, &str); 4] = [
    (
        "fleetgate_devices",
        "Devices, services and admins in the registry.",
    ),
    ("fleetgate_mqtt_sessions", "Live MQTT sessions."),
    (
        "fleetgate_mqtt_connections_open",
        "Open MQTT connections, handshaking or in session.",
    ),
    (
        "fleetgate_certificate_expiry_timestamp_seconds",
        "When each certificate the node depends on expires (Unix time): alert weeks ahead.",
    ),
];
const HISTOGRAMS: [(&str, &str); 5] = [
    ("fleetgate_registry_write_seconds", "Registry writes for the admin API, flushed to disk before they are acknowledged."),
    ("fleetgate_registry_lookup_seconds", "Registry lookups of a certificate's standing at admission."),
    ("fleetgate_store_request_seconds", "Requests to the shared registry store (etcd), from the first member tried to an answer."),
    ("fleetgate_bus_publish_seconds", "QoS 1 messages put on the message bus, until JetStream has stored them."),
    ("fleetgate_revocation_apply_seconds", "From a revocation's announcement on this node (committed here or seen on the store's watch) until its live sessions are told to close."),
];

static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new("fleetgate", metrics::Level::INFO, Some("fleetgate"));

/// The Prometheus recorder: this node's own (not a process-wide one), with
/// every metric described and the histograms' buckets set.
struct Exposition {
    recorder: metrics_exporter_prometheus::PrometheusRecorder,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Exposition")
    }
}

impl Exposition {
    fn new() -> Self {
        use metrics::Recorder;
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&BUCKETS)
            .expect("fixed, non-empty buckets")
            .build_recorder();
        for (name, help) in COUNTERS.iter().chain(&MORE_COUNTERS) {
            recorder.describe_counter((*name).into(), None, (*help).into());
        }
        for (name, help) in GAUGES {
            recorder.describe_gauge(name.into(), None, help.into());
        }
        for (name, help) in HISTOGRAMS {
            recorder.describe_histogram(name.into(), None, help.into());
        }
        Self { recorder }
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> metrics::Counter {
        metrics::Recorder::register_counter(&self.recorder, &key(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: &[(&'static str, String)]) -> metrics::Gauge {
        metrics::Recorder::register_gauge(&self.recorder, &key(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str) -> Histogram {
        Histogram(metrics::Recorder::register_histogram(
            &self.recorder,
            &key(name, &[]),
            &METADATA,
        ))
    }
}

fn key(name: &'static str, labels: &[(&'static str, String)]) -> metrics::Key {
    metrics::Key::from_parts(
        name,
        labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, v.clone()))
            .collect::<Vec<_>>(),
    )
}

#[derive(Debug)]
pub struct Metrics {
    pub revocations: AtomicU64,
    /// Registry writes made for the admin API (each flushed to disk).
    pub registry_writes: Histogram,
    /// Registry reads at admission (the standing of a certificate).
    pub registry_lookups: Histogram,
    pub connections_open: AtomicI64,
    pub handshakes: AtomicU64,
    /// Of those, the ones that resumed a TLS session.
    pub tls_resumptions: AtomicU64,
    pub sessions: AtomicU64,
    pub kicked: AtomicU64,
    pub taken_over: AtomicU64,
    pub ocsp_responses: AtomicU64,
    pub jit_registrations: AtomicU64,
    pub claim_provisions: AtomicU64,
    /// Commands handed to a device's live session.
    pub commands_delivered: AtomicU64,
    /// Commands stored in a device's durable queue.
    pub commands_queued: AtomicU64,
    /// Commands refused: the device's queue or its session's channel full.
    pub commands_refused: AtomicU64,
    /// Commands no session of the device subscribes to.
    pub commands_unrouted: AtomicU64,
    /// Requests to a shared store (etcd), answered or not.
    pub store_requests: Histogram,
    /// Shared store requests no member answered (or refused).
    pub store_errors: AtomicU64,
    /// Changes other nodes committed, seen on the store's watch.
    pub store_watch_events: AtomicU64,
    /// Watch streams that ended and were resumed.
    pub store_watch_interruptions: AtomicU64,
    /// Changes in the shared store that went back on the lifecycle (a
    /// revocation taken back): not applied, alarmed.
    pub store_integrity_violations: AtomicU64,
    /// Messages put on the message bus (NATS) for other nodes.
    pub bus_published: AtomicU64,
    /// Messages from other nodes taken off the bus.
    pub bus_received: AtomicU64,
    /// Messages that could not be put on the bus (NATS unreachable or its
    /// stream refused): a QoS 1 message is then refused to its sender, a
    /// QoS 0 one reaches this node only.
    pub bus_failed: AtomicU64,
    /// Messages from the bus dropped because their sender could not have
    /// published them (a device outside its own topics, a command from
    /// anything but a service): forged on NATS, not sent by a node.
    pub bus_dropped: AtomicU64,
    /// Messages not handed to a live service session whose backlog was
    /// full (it reads more slowly than messages come).
    pub service_backlog_dropped: AtomicU64,
    /// Messages handed to rumqttd's router (see `mqtt::fanout`).
    pub router_messages: AtomicU64,
    /// Time to put a QoS 1 message on the bus, stored (JetStream's ack).
    pub bus_publish: Histogram,
    /// From a revocation's announcement on this node (committed here, or
    /// arrived on the store's watch) until every live session it ends has
    /// been told to close.
    pub revocation_apply: Histogram,
    refusals: [AtomicU64; Refusal::ALL.len()],
    exposition: Exposition,
}

impl Default for Metrics {
    fn default() -> Self {
        let exposition = Exposition::new();
        Self {
            revocations: AtomicU64::default(),
            registry_writes: exposition.histogram("fleetgate_registry_write_seconds"),
            registry_lookups: exposition.histogram("fleetgate_registry_lookup_seconds"),
            connections_open: AtomicI64::default(),
            handshakes: AtomicU64::default(),
            tls_resumptions: AtomicU64::default(),
            sessions: AtomicU64::default(),
            kicked: AtomicU64::default(),
            taken_over: AtomicU64::default(),
            ocsp_responses: AtomicU64::default(),
            jit_registrations: AtomicU64::default(),
            claim_provisions: AtomicU64::default(),
            commands_delivered: AtomicU64::default(),
            commands_queued: AtomicU64::default(),
            commands_refused: AtomicU64::default(),
            commands_unrouted: AtomicU64::default(),
            store_requests: exposition.histogram("fleetgate_store_request_seconds"),
            store_errors: AtomicU64::default(),
            store_watch_events: AtomicU64::default(),
            store_watch_interruptions: AtomicU64::default(),
            store_integrity_violations: AtomicU64::default(),
            bus_published: AtomicU64::default(),
            bus_received: AtomicU64::default(),
            bus_failed: AtomicU64::default(),
            bus_dropped: AtomicU64::default(),
            service_backlog_dropped: AtomicU64::default(),
            router_messages: AtomicU64::default(),
            bus_publish: exposition.histogram("fleetgate_bus_publish_seconds"),
            revocation_apply: exposition.histogram("fleetgate_revocation_apply_seconds"),
            refusals: Default::default(),
            exposition,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub connections_open: i64,
    pub handshakes: u64,
    pub sessions: u64,
    pub kicked: u64,
    pub taken_over: u64,
    pub ocsp_responses: u64,
    pub jit_registrations: u64,
    pub claim_provisions: u64,
    pub commands_delivered: u64,
    pub commands_queued: u64,
    pub commands_refused: u64,
    pub commands_unrouted: u64,
    pub refusals: std::collections::BTreeMap<&'static str, u64>,
}

impl Metrics {
    pub fn refused(&self, r: Refusal) {
        let i = Refusal::ALL.iter().position(|x| *x == r).unwrap_or(0);
        self.refusals[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connections_open: self.connections_open.load(Ordering::Relaxed),
            handshakes: self.handshakes.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            kicked: self.kicked.load(Ordering::Relaxed),
            taken_over: self.taken_over.load(Ordering::Relaxed),
            ocsp_responses: self.ocsp_responses.load(Ordering::Relaxed),
            jit_registrations: self.jit_registrations.load(Ordering::Relaxed),
            claim_provisions: self.claim_provisions.load(Ordering::Relaxed),
            commands_delivered: self.commands_delivered.load(Ordering::Relaxed),
            commands_queued: self.commands_queued.load(Ordering::Relaxed),
            commands_refused: self.commands_refused.load(Ordering::Relaxed),
            commands_unrouted: self.commands_unrouted.load(Ordering::Relaxed),
            refusals: Refusal::ALL
                .iter()
                .zip(&self.refusals)
                .map(|(r, n)| (r.as_str(), n.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition format (version 0.0.4), rendered by
    /// metrics-exporter-prometheus from this node's counters, with the
    /// expiry of each certificate the node depends on (`expiries`: a name
    /// and a Unix time).
    pub fn prometheus(
        &self,
        devices: usize,
        live_sessions: usize,
        expiries: &[(&str, i64)],
    ) -> String {
        let x = &self.exposition;
        let s = self.snapshot();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let counters: [(&'static str, u64); 23] = [
            ("fleetgate_mqtt_handshakes_total", s.handshakes),
            (
                "fleetgate_mqtt_tls_resumptions_total",
                load(&self.tls_resumptions),
            ),
            ("fleetgate_mqtt_sessions_total", s.sessions),
            ("fleetgate_mqtt_kicked_total", s.kicked),
            ("fleetgate_mqtt_taken_over_total", s.taken_over),
            ("fleetgate_ocsp_responses_total", s.ocsp_responses),
            ("fleetgate_jit_registrations_total", s.jit_registrations),
            ("fleetgate_claim_provisions_total", s.claim_provisions),
            ("fleetgate_commands_delivered_total", s.commands_delivered),
            ("fleetgate_commands_queued_total", s.commands_queued),
            ("fleetgate_commands_refused_total", s.commands_refused),
            ("fleetgate_commands_unrouted_total", s.commands_unrouted),
            ("fleetgate_revocations_total", load(&self.revocations)),
            ("fleetgate_store_errors_total", load(&self.store_errors)),
            (
                "fleetgate_store_watch_events_total",
                load(&self.store_watch_events),
            ),
            (
                "fleetgate_store_watch_interruptions_total",
                load(&self.store_watch_interruptions),
            ),
            (
                "fleetgate_store_integrity_violations_total",
                load(&self.store_integrity_violations),
            ),
            ("fleetgate_bus_published_total", load(&self.bus_published)),
            ("fleetgate_bus_received_total", load(&self.bus_received)),
            ("fleetgate_bus_dropped_total", load(&self.bus_dropped)),
            (
                "fleetgate_service_backlog_dropped_total",
                load(&self.service_backlog_dropped),
            ),
            (
                "fleetgate_router_messages_total",
                load(&self.router_messages),
            ),
            ("fleetgate_bus_failed_total", load(&self.bus_failed)),
        ];
        for (name, v) in counters {
            x.counter(name, &[]).absolute(v);
        }
        for (reason, n) in &s.refusals {
            x.counter(
                "fleetgate_refusals_total",
                &[("reason", (*reason).to_owned())],
            )
            .absolute(*n);
        }
        x.gauge("fleetgate_devices", &[]).set(devices as f64);
        x.gauge("fleetgate_mqtt_sessions", &[])
            .set(live_sessions as f64);
        x.gauge("fleetgate_mqtt_connections_open", &[])
            .set(s.connections_open as f64);
        for (name, at) in expiries {
            x.gauge(
                "fleetgate_certificate_expiry_timestamp_seconds",
                &[("certificate", (*name).to_owned())],
            )
            .set(*at as f64);
        }
        x.recorder.handle().render()
    }
}

/// What the etcd store reports, counted here.
impl fleetgate_etcd::Observer for Metrics {
    fn request(&self, took: std::time::Duration) {
        self.store_requests.observe(took);
    }
    fn error(&self) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
    }
    fn watch_events(&self, n: u64) {
        self.store_watch_events.fetch_add(n, Ordering::Relaxed);
    }
    fn watch_interrupted(&self) {
        self.store_watch_interruptions
            .fetch_add(1, Ordering::Relaxed);
    }
    fn integrity_violation(&self) {
        self.store_integrity_violations
            .fetch_add(1, Ordering::Relaxed);
    }
}

impl fleetgate_bus::Observer for Metrics {
    fn published(&self, stored_after: Option<std::time::Duration>) {
        if let Some(took) = stored_after {
            self.bus_publish.observe(took);
        }
        self.bus_published.fetch_add(1, Ordering::Relaxed);
    }
    fn publish_failed(&self) {
        self.bus_failed.fetch_add(1, Ordering::Relaxed);
    }
    fn received(&self) {
        self.bus_received.fetch_add(1, Ordering::Relaxed);
    }
    fn dropped(&self) {
        self.bus_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text() {
        let m = Metrics::default();
        m.refused(Refusal::Revoked);
        m.refused(Refusal::Revoked);
        m.handshakes.fetch_add(3, Ordering::Relaxed);
        m.tls_resumptions.fetch_add(1, Ordering::Relaxed);
        m.registry_writes
            .observe(std::time::Duration::from_millis(3));
        let text = m.prometheus(7, 2, &[("server", 1_900_000_000)]);
        assert!(text.contains("fleetgate_devices 7\n"), "{text}");
        assert!(text.contains("fleetgate_mqtt_sessions 2\n"), "{text}");
        assert!(
            text.contains("fleetgate_mqtt_handshakes_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetgate_mqtt_tls_resumptions_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetgate_refusals_total{reason=\"revoked\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetgate_refusals_total{reason=\"acl\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetgate_registry_write_seconds_bucket{le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetgate_registry_write_seconds_count 1\n"),
            "{text}"
        );
        assert!(
            text.contains("fleetgate_certificate_expiry_timestamp_seconds{certificate=\"server\"} 1900000000\n"),
            "{text}"
        );
        // Every sample line is `name{labels} value`.
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("fleetgate_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
