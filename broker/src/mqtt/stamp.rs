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
//! `x-fleetgate-mark` = `<published QoS>[r][/<serial>/<fingerprint>/<manufacturer>]`,
//! expanded when it is delivered (the device id is the topic's second
//! level: a device publishes only under its own `devices/<id>/`). The log
//! holds many messages: one property is a third of the memory of four,
//! and the router, which delivers at the subscription's QoS, keeps no
//! other record of the published QoS. `r` says the message was published
//! retained: fleetgate keeps retained messages itself (rumqttd's router
//! never sees the flag), and Retain As Published needs it. A device's
//! retained message is stored with its mark, so it reaches a later
//! subscriber with the same identity.

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

/// The mark as a user property: the published QoS, whether it was
/// retained, and the sender's stamp (from [`of`]).
pub fn mark_property(qos: u8, retain: bool, stamp: &str) -> (String, String) {
    let r = if retain { "r" } else { "" };
    let value = if stamp.is_empty() {
        format!("{qos}{r}")
    } else {
        format!("{qos}{r}/{stamp}")
    };
    (MARK.to_owned(), value)
}

/// `props` (already [`unreserved`]) marked for the router.
pub fn mark(
    props: Option<PublishProperties>,
    qos: u8,
    retain: bool,
    stamp: &str,
) -> Option<PublishProperties> {
    let mut p = props.unwrap_or_default();
    p.user_properties.push(mark_property(qos, retain, stamp));
    Some(p)
}

/// A delivered message's properties, unmarked, and what its mark said.
#[derive(Debug, PartialEq, Eq)]
pub struct Unmarked {
    pub props: Option<PublishProperties>,
    /// The published QoS (2 if unmarked).
    pub qos: u8,
    /// Published retained.
    pub retained: bool,
}

/// What the router delivered (or the store kept), unmarked: the
/// properties with the identity expanded, if `expand`.
pub fn unmark(props: Option<PublishProperties>, topic: &[u8], expand: bool) -> Unmarked {
    let unmarked = |props| Unmarked {
        props,
        qos: 2,
        retained: false,
    };
    let Some(mut p) = props else {
        return unmarked(None);
    };
    let Some(i) = p.user_properties.iter().position(|(k, _)| k == MARK) else {
        return unmarked(Some(p));
    };
    let (_, value) = p.user_properties.remove(i);
    let mut parts = value.splitn(4, '/');
    let head = parts.next().unwrap_or_default();
    let retained = head.ends_with('r');
    let qos = head
        .trim_end_matches('r')
        .parse::<u8>()
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
    Unmarked {
        props: (!empty).then_some(p),
        qos,
        retained,
    }
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
        let marked = mark(unreserved(sent), 1, true, "0a/ff00/acme");
        let got = unmark(marked, b"devices/d-1/telemetry", true);
        assert_eq!((got.qos, got.retained), (1, true));
        assert_eq!(
            got.props.unwrap().user_properties,
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
        let got = unmark(mark(None, 0, false, ""), b"devices/d-1/commands/x", true);
        assert_eq!(
            got,
            Unmarked {
                props: None,
                qos: 0,
                retained: false
            }
        );
        // Not expanded for a 3.1.1 subscriber, and no manufacturer: none.
        let got = unmark(mark(None, 0, false, "0a/ff/"), b"devices/d-1/t", false);
        assert_eq!(got.props, None);
        let got = unmark(mark(None, 0, false, "0a/ff/"), b"devices/d-1/t", true);
        assert_eq!(got.props.unwrap().user_properties.len(), 3);
        // Unmarked (from elsewhere): QoS 2, properties untouched.
        assert_eq!(unmark(props(&[("a", "b")]), b"t", true).qos, 2);
        assert_eq!(unmark(mark(None, 2, true, ""), b"t", true).qos, 2);
    }
}
