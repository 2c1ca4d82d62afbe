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

use provisioning::Role;

/// The reserved prefix.
pub const IDENTITY_PREFIX: &str = "x-fleetgate-";

const MARK: &str = "x-fleetgate-mark";

// The expanded identity's names (each under [`IDENTITY_PREFIX`]).
const DEVICE_ID: &str = "x-fleetgate-device-id";
const SERIAL: &str = "x-fleetgate-serial";
const FINGERPRINT: &str = "x-fleetgate-fingerprint";
const MANUFACTURER: &str = "x-fleetgate-manufacturer";

/// What a session stamps on its client's messages: empty for anything but
/// a device; for a device, its certificate's serial (hex), fingerprint and
/// manufacturer.
pub fn of(role: Role, serial_hex: &str, fingerprint: &str, manufacturer: Option<&str>) -> String {
    if role != Role::Device {
        return String::new();
    }
    format!("{serial_hex}/{fingerprint}/{}", manufacturer.unwrap_or(""))
}

/// Whether a user property's name is, or passes for, one under the
/// reserved prefix: compared after NFKC, with case, white space,
/// punctuation and other separators ignored, so `" X-Fleetgate-Device-Id"`,
/// `"x\u{2011}fleetgate-serial"` and `"x_fleetgate_mark"` all count.
/// Only the broker writes these.
pub fn reserved(k: &str) -> bool {
    use unicode_normalization::UnicodeNormalization;
    // Fast path: most names' first letter is plainly not an x.
    match k
        .chars()
        .find(|c| !c.is_ascii() || c.is_ascii_alphanumeric())
    {
        None => return false,
        Some(c) if c.is_ascii() && !c.eq_ignore_ascii_case(&'x') => return false,
        Some(_) => {}
    }
    const SKELETON: &str = "xfleetgate";
    let mut want = SKELETON.chars();
    let mut next = want.next();
    for c in k.nfkc().filter(|c| c.is_alphanumeric()) {
        let Some(w) = next else { return true };
        if !c.to_lowercase().eq(std::iter::once(w)) {
            return false;
        }
        next = want.next();
    }
    next.is_none()
}

/// `props` with every user property under the reserved prefix removed:
/// the one scrub for whatever a client (or another node) sent, before it
/// enters the message plane: a PUBLISH, a will, a retained message.
pub fn unreserved(props: Option<PublishProperties>) -> Option<PublishProperties> {
    let mut p = props?;
    scrub(&mut p.user_properties);
    Some(p)
}

/// Removes every user property under the reserved prefix.
pub fn scrub(user_properties: &mut Vec<(String, String)>) {
    if user_properties.iter().any(|(k, _)| reserved(k)) {
        let n = user_properties.len();
        user_properties.retain(|(k, _)| !reserved(k));
        tracing::debug!(
            removed = n - user_properties.len(),
            "mqtt: reserved user properties removed"
        );
    }
}

/// The mark as a user property: the published QoS, whether it was
/// retained, and the sender's stamp (from [`of`]).
fn mark_property(qos: u8, retain: bool, stamp: &str) -> (String, String) {
    // On every message: built by hand, one allocation, no formatter.
    let mut value = String::with_capacity(3 + stamp.len());
    value.push(char::from(b'0' + qos.min(9)));
    if retain {
        value.push('r');
    }
    if !stamp.is_empty() {
        value.push('/');
        value.push_str(stamp);
    }
    (MARK.to_owned(), value)
}

/// `props` marked for the router: whatever stood under the reserved
/// prefix is removed first, so the broker's mark is the only one.
pub fn mark(
    props: Option<PublishProperties>,
    qos: u8,
    retain: bool,
    stamp: &str,
) -> Option<PublishProperties> {
    let mut p = props.unwrap_or_default();
    scrub(&mut p.user_properties);
    p.user_properties.push(mark_property(qos, retain, stamp));
    Some(p)
}

/// A kept (retained) message's properties marked the same way.
pub fn mark_kept(user_properties: &mut Vec<(String, String)>, qos: u8, stamp: &str) {
    scrub(user_properties);
    user_properties.push(mark_property(qos, true, stamp));
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
    // The broker's mark is the last one (it scrubs before marking);
    // anything else under the prefix (kept before that rule) goes.
    let Some(i) = p.user_properties.iter().rposition(|(k, _)| k == MARK) else {
        return unmarked(Some(p));
    };
    let (_, value) = p.user_properties.remove(i);
    scrub(&mut p.user_properties);
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
        u.push((DEVICE_ID.to_owned(), id.to_owned()));
        u.push((SERIAL.to_owned(), serial.to_owned()));
        u.push((FINGERPRINT.to_owned(), fingerprint.to_owned()));
        if !manufacturer.is_empty() {
            u.push((MANUFACTURER.to_owned(), manufacturer.to_owned()));
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

    #[test]
    fn every_name_the_broker_writes_is_reserved() {
        for name in [MARK, DEVICE_ID, SERIAL, FINGERPRINT, MANUFACTURER] {
            assert!(name.starts_with(IDENTITY_PREFIX), "{name}");
            assert!(reserved(name), "{name}");
        }
    }

    #[test]
    fn the_mark_reads_back_as_written() {
        for qos in 0..=2u8 {
            for retain in [false, true] {
                for stamp in ["", "0a1b/ff00/acme"] {
                    let (k, v) = mark_property(qos, retain, stamp);
                    let mut p = PublishProperties::default();
                    p.user_properties.push((k, v));
                    let u = unmark(Some(p), b"devices/d-1/telemetry", true);
                    assert_eq!((u.qos, u.retained), (qos, retain), "{stamp:?}");
                }
            }
        }
    }

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

    #[test]
    fn lookalike_names_are_reserved_too() {
        for name in [
            "x-fleetgate-mark",
            "X-FLEETGATE-device-id",
            " x-fleetgate-device-id",
            "\tx-fleetgate-serial ",
            "x\u{2010}fleetgate\u{2011}device-id",
            "x\u{2011}fleetgate-mark",
            "x_fleetgate_manufacturer",
            "\u{FF58}-fleetgate-device-id", // fullwidth x, NFKC to x
            "x-fleetgate",
            "x-fleet gate-id",
        ] {
            assert!(reserved(name), "{name:?} passed as unreserved");
        }
        for name in [
            "x",
            "x-fleet",
            "fleetgate-x",
            "y-fleetgate-id",
            "",
            "k",
            "x-other",
        ] {
            assert!(!reserved(name), "{name:?} was taken as reserved");
        }
    }

    #[test]
    fn a_forged_mark_never_wins() {
        // What a will used to bring: a forged mark and identity, some
        // under lookalike names.
        let forged = props(&[
            ("x-fleetgate-mark", "1/dead/beef/evil"),
            ("x-fleetgate-device-id", "dev2"),
            (" x-fleetgate-device-id", "dev2"),
            ("x\u{2010}fleetgate-serial", "dead"),
            ("k", "v"),
        ]);
        let marked = mark(forged, 1, false, "0a/ff00/");
        let user = &marked.as_ref().unwrap().user_properties;
        assert_eq!(user.iter().filter(|(k, _)| reserved(k)).count(), 1);
        let got = unmark(marked, b"devices/dev1/status", true);
        assert_eq!(
            got.props.unwrap().user_properties,
            [
                ("k".to_owned(), "v".to_owned()),
                ("x-fleetgate-device-id".to_owned(), "dev1".to_owned()),
                ("x-fleetgate-serial".to_owned(), "0a".to_owned()),
                ("x-fleetgate-fingerprint".to_owned(), "ff00".to_owned()),
            ]
        );
        // A message kept before this rule with a forged mark ahead of the
        // broker's: the broker's (the last) wins, the rest is dropped.
        let old = props(&[
            ("x-fleetgate-mark", "1/dead/beef/evil"),
            ("x-fleetgate-mark", "0r/0a/ff00/"),
        ]);
        let got = unmark(old, b"devices/dev1/status", true);
        assert_eq!((got.qos, got.retained), (0, true));
        let user = got.props.unwrap().user_properties;
        assert!(user.contains(&("x-fleetgate-serial".to_owned(), "0a".to_owned())));
        assert!(!user.iter().any(|(_, v)| v == "dead" || v == "evil"));
        // A service's message: no identity at all, whatever it sent.
        let got = unmark(
            mark(
                props(&[("x-fleetgate-mark", "1/dead/beef/evil")]),
                1,
                false,
                "",
            ),
            b"devices/dev3/commands/x",
            true,
        );
        assert_eq!(got.props, None);
    }
}
