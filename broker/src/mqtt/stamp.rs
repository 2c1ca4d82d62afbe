//! The verified identity on device messages, and the published QoS, as
//! they travel through rumqttd's router. Sans-IO.
//!
//! A service receives each device message with the sender's verified
//! identity as MQTT 5 user properties (the MQTT form of an application
//! gateway's client-certificate header): `x-fleetgate-device-id`,
//! `x-fleetgate-serial` (hex), `x-fleetgate-fingerprint` (SHA-256 of the
//! certificate, hex) and `x-fleetgate-manufacturer` if any. Whatever a
//! client sent under the `x-fleetgate-` prefix is removed first.
//!
//! In the router's log a message carries one compact property instead,
//! `x-fleetgate-mark` = `<published QoS>[/<serial>/<fingerprint>/<manufacturer>]`,
//! expanded when it is delivered (the device id is the topic's second
//! level: a device publishes only under its own `devices/<id>/`). The log
//! holds many messages: one property is a third of the memory of four,
//! and the router, which delivers at the subscription's QoS, keeps no
//! other record of the published QoS.

use rumqttd::protocol::PublishProperties;

use super::session::Peer;
use provisioning::Role;

/// The reserved prefix.
pub const IDENTITY_PREFIX: &str = "x-fleetgate-";

const MARK: &str = "x-fleetgate-mark";

/// What a session stamps on its client's messages: empty for anything but
/// a device.
pub fn of(peer: &Peer) -> String {
    if peer.identity.role != Role::Device {
        return String::new();
    }
    format!(
        "{}/{}/{}",
        peer.key.serial.to_hex(),
        peer.info.fingerprint,
        peer.manufacturer.as_ref().map_or("", |m| m.as_str())
    )
}

fn reserved(k: &str) -> bool {
    k.get(..IDENTITY_PREFIX.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(IDENTITY_PREFIX))
}

/// `props` with every user property under the reserved prefix removed.
pub fn unreserved(props: Option<PublishProperties>) -> Option<PublishProperties> {
    let mut p = props?;
    if p.user_properties.iter().any(|(k, _)| reserved(k)) {
        p.user_properties.retain(|(k, _)| !reserved(k));
    }
    Some(p)
}

/// `props` (already [`unreserved`]) marked for the router: the published
/// QoS and the sender's stamp (from [`of`]).
pub fn mark(props: Option<PublishProperties>, qos: u8, stamp: &str) -> Option<PublishProperties> {
    let mut p = props.unwrap_or_default();
    let value = if stamp.is_empty() {
        qos.to_string()
    } else {
        format!("{qos}/{stamp}")
    };
    p.user_properties.push((MARK.to_owned(), value));
    Some(p)
}

/// What the router delivered, unmarked: the properties (with the identity
/// expanded, if `expand`) and the published QoS (2 if unmarked).
pub fn unmark(
    props: Option<PublishProperties>,
    topic: &[u8],
    expand: bool,
) -> (Option<PublishProperties>, u8) {
    let Some(mut p) = props else {
        return (None, 2);
    };
    let Some(i) = p.user_properties.iter().position(|(k, _)| k == MARK) else {
        return (Some(p), 2);
    };
    let (_, value) = p.user_properties.remove(i);
    let mut parts = value.splitn(4, '/');
    let qos = parts
        .next()
        .and_then(|q| q.parse::<u8>().ok())
        .map_or(2, |q| q.min(2));
    if let (true, Some(serial), Some(fingerprint), Some(manufacturer)) =
        (expand, parts.next(), parts.next(), parts.next())
    {
        let id = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| t.strip_prefix("devices/"))
            .and_then(|t| t.split('/').next())
            .unwrap_or_default();
        let u = &mut p.user_properties;
        u.push((format!("{IDENTITY_PREFIX}device-id"), id.to_owned()));
        u.push((format!("{IDENTITY_PREFIX}serial"), serial.to_owned()));
        u.push((
            format!("{IDENTITY_PREFIX}fingerprint"),
            fingerprint.to_owned(),
        ));
        if !manufacturer.is_empty() {
            u.push((
                format!("{IDENTITY_PREFIX}manufacturer"),
                manufacturer.to_owned(),
            ));
        }
    }
    let empty = p.user_properties.is_empty()
        && p.payload_format_indicator.is_none()
        && p.message_expiry_interval.is_none()
        && p.topic_alias.is_none()
        && p.response_topic.is_none()
        && p.correlation_data.is_none()
        && p.subscription_identifiers.is_empty()
        && p.content_type.is_none();
    ((!empty).then_some(p), qos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(user: &[(&str, &str)]) -> Option<PublishProperties> {
        Some(PublishProperties {
            user_properties: user
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..PublishProperties::default()
        })
    }

    #[test]
    fn a_stamp_survives_the_router_and_a_forged_one_does_not() {
        let sent = props(&[("X-FleetGate-Device-Id", "someone-else"), ("k", "v")]);
        let marked = mark(unreserved(sent), 1, "0a/ff00/acme");
        let (got, qos) = unmark(marked, b"devices/d-1/telemetry", true);
        assert_eq!(qos, 1);
        assert_eq!(
            got.unwrap().user_properties,
            [
                ("k".to_owned(), "v".to_owned()),
                ("x-fleetgate-device-id".to_owned(), "d-1".to_owned()),
                ("x-fleetgate-serial".to_owned(), "0a".to_owned()),
                ("x-fleetgate-fingerprint".to_owned(), "ff00".to_owned()),
                ("x-fleetgate-manufacturer".to_owned(), "acme".to_owned()),
            ]
        );
    }

    #[test]
    fn a_service_message_carries_its_qos_only() {
        let (got, qos) = unmark(mark(None, 0, ""), b"devices/d-1/commands/x", true);
        assert_eq!((got, qos), (None, 0));
        // Not expanded for a 3.1.1 subscriber, and no manufacturer: none.
        let (got, _) = unmark(mark(None, 0, "0a/ff/"), b"devices/d-1/t", false);
        assert_eq!(got, None);
        let (got, _) = unmark(mark(None, 0, "0a/ff/"), b"devices/d-1/t", true);
        assert_eq!(got.unwrap().user_properties.len(), 3);
        // Unmarked (from elsewhere): QoS 2, properties untouched.
        assert_eq!(unmark(props(&[("a", "b")]), b"t", true).1, 2);
    }
}
