//! Counters for what the broker does and refuses. Lock-free; read by
//! `GET /v1/stats` on the admin API.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::Serialize;

/// Why a client was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    NoCertificate,
    UnknownCa,
    Expired,
    NotYetValid,
    WrongUsage,
    BadCertificate,
    UnknownSerial,
    Revoked,
    Suspended,
    WrongIdentity,
    Acl,
    Protocol,
    HandshakeTimeout,
    Internal,
    Pending,
    RateLimited,
    Overloaded,
    JitRateLimited,
    JitQuotaExceeded,
    /// A session over its subscriptions, or a device over its new topics
    /// or retained messages.
    Quota,
}

impl Refusal {
    pub const ALL: [Refusal; 20] = [
        Self::NoCertificate,
        Self::UnknownCa,
        Self::Expired,
        Self::NotYetValid,
        Self::WrongUsage,
        Self::BadCertificate,
        Self::UnknownSerial,
        Self::Revoked,
        Self::Suspended,
        Self::WrongIdentity,
        Self::Acl,
        Self::Protocol,
        Self::HandshakeTimeout,
        Self::Internal,
        Self::Pending,
        Self::RateLimited,
        Self::Overloaded,
        Self::JitRateLimited,
        Self::JitQuotaExceeded,
        Self::Quota,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongUsage => "wrong_usage",
            Self::BadCertificate => "bad_certificate",
            Self::UnknownSerial => "unknown_serial",
            Self::Revoked => "revoked",
            Self::Suspended => "suspended",
            Self::WrongIdentity => "wrong_identity",
            Self::Acl => "acl",
            Self::Protocol => "protocol",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Internal => "internal",
            Self::Pending => "pending_approval",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::JitRateLimited => "jit_rate_limited",
            Self::JitQuotaExceeded => "jit_quota_exceeded",
            Self::Quota => "quota_exceeded",
        }
    }
}

/// Upper bounds of the latency histograms' buckets, in seconds.
const BUCKETS: [f64; 10] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// A latency histogram in the Prometheus sense: cumulative buckets, sum
/// and count. Lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            if secs <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            d.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Times `f` into this histogram.
    pub fn time<T>(&self, f: impl FnOnce() -> T) -> T {
        let t0 = std::time::Instant::now();
        let out = f();
        self.observe(t0.elapsed());
        out
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, le) in self.buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub revocations: AtomicU64,
    /// Registry writes made for the admin API (each flushed to disk).
    pub registry_writes: Histogram,
    /// Registry reads at admission (the standing of a certificate).
    pub registry_lookups: Histogram,
    pub connections_open: AtomicI64,
    pub handshakes: AtomicU64,
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
    /// Time to put a QoS 1 message on the bus, stored (JetStream's ack).
    pub bus_publish: Histogram,
    /// From a revocation's announcement on this node (committed here, or
    /// arrived on the store's watch) until every live session it ends has
    /// been told to close.
    pub revocation_apply: Histogram,
    refusals: [AtomicU64; Refusal::ALL.len()],
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
    /// The Prometheus text exposition format (version 0.0.4), with the
    /// expiry of each certificate the node depends on (`expiries`: a name
    /// and a Unix time).
    pub fn prometheus(
        &self,
        devices: usize,
        live_sessions: usize,
        expiries: &[(&str, i64)],
    ) -> String {
        use std::fmt::Write;
        let s = self.snapshot();
        let mut out = String::with_capacity(2048);
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "fleetgate_devices",
            "gauge",
            "Devices, services and admins in the registry.",
            devices.to_string(),
        );
        metric(
            "fleetgate_mqtt_sessions",
            "gauge",
            "Live MQTT sessions.",
            live_sessions.to_string(),
        );
        metric(
            "fleetgate_mqtt_connections_open",
            "gauge",
            "Open MQTT connections, handshaking or in session.",
            s.connections_open.to_string(),
        );
        metric(
            "fleetgate_mqtt_handshakes_total",
            "counter",
            "Completed mutual-TLS handshakes.",
            s.handshakes.to_string(),
        );
        metric(
            "fleetgate_mqtt_sessions_total",
            "counter",
            "MQTT sessions started.",
            s.sessions.to_string(),
        );
        metric(
            "fleetgate_mqtt_kicked_total",
            "counter",
            "Sessions cut by a revocation or suspension.",
            s.kicked.to_string(),
        );
        metric(
            "fleetgate_mqtt_taken_over_total",
            "counter",
            "Sessions taken over by a newer connection.",
            s.taken_over.to_string(),
        );
        metric(
            "fleetgate_ocsp_responses_total",
            "counter",
            "OCSP responses sent (HTTP and MQTT).",
            s.ocsp_responses.to_string(),
        );
        metric(
            "fleetgate_jit_registrations_total",
            "counter",
            "Devices registered just in time on first connect.",
            s.jit_registrations.to_string(),
        );
        metric(
            "fleetgate_claim_provisions_total",
            "counter",
            "Device certificates issued to claims over MQTT.",
            s.claim_provisions.to_string(),
        );
        for (name, help, v) in [
            (
                "fleetgate_commands_delivered_total",
                "Commands handed to a device's live session.",
                s.commands_delivered,
            ),
            (
                "fleetgate_commands_queued_total",
                "Commands stored in a device's durable queue (flushed before the PUBACK).",
                s.commands_queued,
            ),
            (
                "fleetgate_commands_refused_total",
                "Commands refused because the device's queue was full.",
                s.commands_refused,
            ),
            (
                "fleetgate_commands_unrouted_total",
                "Commands no session of the device subscribes to.",
                s.commands_unrouted,
            ),
        ] {
            metric(name, "counter", help, v.to_string());
        }
        metric(
            "fleetgate_revocations_total",
            "counter",
            "Revocations and suspensions of devices, certificates and manufacturers.",
            self.revocations.load(Ordering::Relaxed).to_string(),
        );
        for (name, help, v) in [
            (
                "fleetgate_store_errors_total",
                "Shared store requests that no etcd member answered, or that etcd refused.",
                &self.store_errors,
            ),
            (
                "fleetgate_store_watch_events_total",
                "Committed changes seen on the shared store's watch.",
                &self.store_watch_events,
            ),
            (
                "fleetgate_store_watch_interruptions_total",
                "Watch streams on the shared store that ended and were resumed.",
                &self.store_watch_interruptions,
            ),
            (
                "fleetgate_store_integrity_violations_total",
                "Changes in the shared store that took back a revocation (made outside fleetgate): not applied.",
                &self.store_integrity_violations,
            ),
            (
                "fleetgate_bus_published_total",
                "Messages put on the message bus (NATS JetStream) for other nodes.",
                &self.bus_published,
            ),
            (
                "fleetgate_bus_received_total",
                "Messages from other nodes taken off the message bus.",
                &self.bus_received,
            ),
            (
                "fleetgate_bus_dropped_total",
                "Messages from the message bus dropped: their sender could not have published them.",
                &self.bus_dropped,
            ),
            (
                "fleetgate_bus_failed_total",
                "Messages that could not be put on the message bus (QoS 1 refused, QoS 0 kept on this node).",
                &self.bus_failed,
            ),
        ] {
            metric(name, "counter", help, v.load(Ordering::Relaxed).to_string());
        }
        self.registry_writes.write(
            &mut out,
            "fleetgate_registry_write_seconds",
            "Registry writes for the admin API, flushed to disk before they are acknowledged.",
        );
        self.registry_lookups.write(
            &mut out,
            "fleetgate_registry_lookup_seconds",
            "Registry lookups of a certificate's standing at admission.",
        );
        self.store_requests.write(
            &mut out,
            "fleetgate_store_request_seconds",
            "Requests to the shared registry store (etcd), from the first member tried to an answer.",
        );
        self.bus_publish.write(
            &mut out,
            "fleetgate_bus_publish_seconds",
            "QoS 1 messages put on the message bus, until JetStream has stored them.",
        );
        self.revocation_apply.write(
            &mut out,
            "fleetgate_revocation_apply_seconds",
            "From a revocation's announcement on this node (committed here or seen on the store's watch) until its live sessions are told to close.",
        );
        let _ = writeln!(
            out,
            "# HELP fleetgate_certificate_expiry_timestamp_seconds When each certificate the node depends on expires (Unix time): alert weeks ahead.\n# TYPE fleetgate_certificate_expiry_timestamp_seconds gauge"
        );
        for (name, at) in expiries {
            let _ = writeln!(
                out,
                "fleetgate_certificate_expiry_timestamp_seconds{{certificate=\"{name}\"}} {at}"
            );
        }

        let _ = writeln!(
            out,
            "# HELP fleetgate_refusals_total Refused clients and packets, by reason."
        );
        let _ = writeln!(out, "# TYPE fleetgate_refusals_total counter");
        for (reason, n) in &s.refusals {
            let _ = writeln!(out, "fleetgate_refusals_total{{reason=\"{reason}\"}} {n}");
        }
        out
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
        let text = m.prometheus(7, 2, &[("server", 1_900_000_000)]);
        assert!(text.contains("fleetgate_devices 7\n"), "{text}");
        assert!(text.contains("fleetgate_mqtt_sessions 2\n"), "{text}");
        assert!(
            text.contains("fleetgate_mqtt_handshakes_total 3\n"),
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
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("fleetgate_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
