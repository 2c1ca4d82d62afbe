//! A session's life across connections: what a CONNECT asks of it and
//! what a DISCONNECT changes (MQTT 5 3.1.2.11.2, 3.14.2.2.2).

use rumqttd::protocol::DisconnectProperties;

use super::*;

fn disconnect_with_expiry(secs: u32) -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        Some(DisconnectProperties {
            session_expiry_interval: Some(secs),
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        }),
    )
}

fn kept_for(secs: u32) -> Terms {
    let mut terms = Terms::before_connect();
    terms.clean = false;
    terms.asked_expiry = Some(secs);
    terms.expiry = Some(secs);
    terms
}

#[test]
fn a_disconnect_sets_how_long_the_session_is_kept() {
    // Paho's test_session_expiry: CONNECT with 1 s, DISCONNECT with 5 s.
    let mut t = with(identity(Role::Device, "dev-1"), true, kept_for(1));
    assert_eq!(t.ch.session_expiry(), Some(1));
    let a = t.send(disconnect_with_expiry(5));
    assert_eq!(closes(&a), Some(&End::ClientDisconnect { will: false }));
    assert_eq!(t.ch.session_expiry(), Some(5));
}

#[test]
fn a_disconnect_with_expiry_0_ends_the_session_with_the_connection() {
    let mut t = with(identity(Role::Service, "backend"), true, kept_for(60));
    let a = t.send(disconnect_with_expiry(0));
    assert_eq!(closes(&a), Some(&End::ClientDisconnect { will: false }));
    assert_eq!(t.ch.session_expiry(), None);
}

#[test]
fn a_disconnect_may_not_keep_a_session_its_connect_did_not() {
    // MQTT-3.14.2-2: a Protocol Error, and the session is not kept.
    let mut t = device(true);
    assert_eq!(t.ch.session_expiry(), None);
    let a = t.send(disconnect_with_expiry(5));
    assert!(matches!(
        closes(&a),
        Some(End::Violation(DisconnectReasonCode::ProtocolError, _))
    ));
    assert_eq!(t.ch.session_expiry(), None);
    // Not a normal DISCONNECT: nothing forwarded, and the will goes out.
    assert!(!a.iter().any(|x| matches!(x, Action::Forward(_))));
    assert!(will::sends_will(closes(&a).unwrap()));
}

#[test]
fn a_disconnect_expiry_is_capped_like_a_connects() {
    let mut t = with(identity(Role::Device, "dev-1"), true, kept_for(10));
    t.send(disconnect_with_expiry(u32::MAX));
    assert_eq!(t.ch.session_expiry(), Some(MAX_SESSION_EXPIRY));
}

#[test]
fn a_disconnect_without_an_expiry_keeps_the_connects() {
    let mut t = with(identity(Role::Device, "dev-1"), true, kept_for(30));
    t.bytes(&[0xe0, 0x00]);
    assert_eq!(t.ch.session_expiry(), Some(30));
}

#[test]
fn a_session_is_kept_while_connected_if_it_resumes_or_outlives_the_connection() {
    // (clean start, expiry) -> kept: a store with one flag for both
    // (rumqttd's clean session) must keep a resumed session with expiry 0
    // and have the driver end it after (Paho's test_publication_expiry
    // reconnects so).
    let id = identity(Role::Service, "backend");
    for (clean, expiry, kept) in [
        (true, None, false),
        (true, Some(60), true),
        (false, None, true),
        (false, Some(60), true),
    ] {
        let mut props = props();
        props.session_expiry_interval = expiry;
        let t = decide(
            &id,
            &connect_packet("backend", clean, 0),
            Some(&props),
            None,
            true,
        )
        .unwrap();
        assert_eq!(t.keeps_session(), kept, "clean {clean}, expiry {expiry:?}");
    }
}
