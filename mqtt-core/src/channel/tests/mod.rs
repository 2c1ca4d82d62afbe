//! The connection core from packet sequences: bytes in as a client sends
//! them, the actions and the bytes out checked, time stepped by hand.

use std::sync::{Arc, Mutex};

use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    ConnectReturnCode, Disconnect, Filter, LastWill, LastWillProperties, PingReq, Protocol, PubAck,
    PubComp, PubRec, PubRecReason, PubRel, QoS, RetainForwardRule, SubscribeReasonCode,
};

use super::clock::ManualClock;
use super::connect::{self, MAX_IN_FLIGHT, MAX_SESSION_EXPIRY};
use super::inbound::pubrec_reason;
use super::subscribe::{sends_retained, share_inner, suback_props};
use super::will::{self, MAX_WILL_DELAY};
use super::*;
use crate::outbox::Outgoing;
use crate::quota::TopicBudget;

mod session;

const NOT_AFTER_MS: i64 = 2_000_000_000_000;
const LIMITS: Limits = Limits {
    max_subscriptions: 3,
    new_topics_per_minute: 2,
};

fn identity(role: Role, id: &str) -> Identity {
    Identity {
        role,
        id: DeviceId::try_new(id).unwrap(),
    }
}

fn connect_packet(client_id: &str, clean: bool, keep_alive: u16) -> rumqttd::protocol::Connect {
    rumqttd::protocol::Connect {
        keep_alive,
        client_id: client_id.into(),
        clean_session: clean,
    }
}

struct T {
    ch: Channel,
    clock: ManualClock,
    v5: bool,
}

/// A device `dev-1` connected with keep-alive 10 s.
fn device(v5: bool) -> T {
    with(identity(Role::Device, "dev-1"), v5, Terms::before_connect())
}

fn with(id: Identity, v5: bool, mut terms: Terms) -> T {
    let clock = ManualClock::at(1_000_000);
    let now = clock.now();
    let codec = crate::codec::Codec::for_level(if v5 { 5 } else { 4 });
    let mut ch = Channel::new(codec, &id, 4096, 4, NOT_AFTER_MS, now);
    if terms.keep_alive == 0 {
        terms.keep_alive = 10;
    }
    let budget = (id.role == Role::Device).then(|| Arc::new(Mutex::new(TopicBudget::new(2))));
    ch.accept(terms, budget, now);
    T { ch, clock, v5 }
}

impl T {
    /// Feeds `p` as the client would send it; the actions.
    fn send(&mut self, p: Packet) -> Vec<Action> {
        let mut b = BytesMut::new();
        if self.v5 {
            V5.write(p, &mut b).unwrap();
        } else {
            V4.write(p, &mut b).unwrap();
        }
        self.bytes(&b)
    }

    fn bytes(&mut self, b: &[u8]) -> Vec<Action> {
        let mut buf = BytesMut::from(b);
        let mut actions = Vec::new();
        loop {
            match self.ch.read(&mut buf) {
                Ok(Some(p)) => self.ch.handle_in(p, self.clock.now(), LIMITS, &mut actions),
                Ok(None) => break,
                Err(e) => {
                    actions.push(Action::Close(e));
                    break;
                }
            }
        }
        actions
    }

    /// What the core wrote for the client, decoded.
    fn out(&mut self) -> Vec<Packet> {
        let mut b = self.ch.take_output();
        let mut packets = Vec::new();
        while !b.is_empty() {
            let p = if self.v5 {
                V5.read_mut(&mut b, usize::MAX)
            } else {
                V4.read_mut(&mut b, usize::MAX)
            };
            packets.push(p.expect("the core writes whole, valid packets"));
        }
        packets
    }

    /// Does what the actions say the way the driver would for a PUBLISH
    /// passed on (acknowledged with success) or an Ack.
    fn settle(&mut self, actions: &[Action]) {
        for a in actions {
            match a {
                Action::Publish(i) => self
                    .ch
                    .acknowledge(i.qos, i.pkid, PubAckReason::Success, None)
                    .unwrap(),
                Action::Ack {
                    qos,
                    pkid,
                    reason,
                    why,
                } => self
                    .ch
                    .acknowledge(*qos, *pkid, *reason, why.clone())
                    .unwrap(),
                _ => {}
            }
        }
    }
}

fn publish(topic: &str, qos: u8, pkid: u16) -> Packet {
    Packet::Publish(
        crate::outbox::publish(
            &Bytes::copy_from_slice(topic.as_bytes()),
            &Bytes::from_static(b"hi"),
            qos,
            pkid,
            false,
            false,
        ),
        None,
    )
}

fn publish_props(topic: &str, qos: u8, pkid: u16, props: PublishProperties) -> Packet {
    let Packet::Publish(p, _) = publish(topic, qos, pkid) else {
        unreachable!()
    };
    Packet::Publish(p, Some(props))
}

fn closes(actions: &[Action]) -> Option<&End> {
    actions.iter().find_map(|a| match a {
        Action::Close(e) => Some(e),
        _ => None,
    })
}

fn outgoing(topic: &str, payload: &[u8], qos: u8, seq: u64) -> Outgoing {
    Outgoing {
        seq: Some(seq),
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain: false,
        props: None,
    }
}

// --- PINGREQ, DISCONNECT, what a client may not send

#[test]
fn a_pingreq_is_answered_with_a_pingresp() {
    for v5 in [false, true] {
        let mut t = device(v5);
        assert!(t.send(Packet::PingReq(PingReq)).is_empty());
        assert_eq!(t.out(), vec![Packet::PingResp(PingResp)]);
    }
}

#[test]
fn a_disconnect_with_only_a_reason_code_is_a_normal_one_and_sends_no_will() {
    // e0 01 00 (MQTT 5 3.14.2.2.1): remaining length 1, no properties.
    let mut t = device(true);
    let a = t.bytes(&[0xe0, 0x01, 0x00]);
    let end = closes(&a).unwrap();
    assert_eq!(end, &End::ClientDisconnect { will: false });
    let w = LastWill {
        topic: Bytes::from_static(b"devices/dev-1/status"),
        message: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
    };
    assert_eq!(will::plan(end, Some(w), None, None), None, "no will");
}

#[test]
fn a_disconnect_with_will_message_sends_the_will() {
    // e0 01 04: what mosquitto_sub sends on SIGTERM.
    let mut t = device(true);
    let a = t.bytes(&[0xe0, 0x01, 0x04]);
    assert_eq!(closes(&a), Some(&End::ClientDisconnect { will: true }));
    assert!(matches!(a[0], Action::Forward(Packet::Disconnect(..))));
}

#[test]
fn a_bare_disconnect_is_normal_on_both_versions() {
    for v5 in [false, true] {
        let mut t = device(v5);
        let a = t.bytes(&[0xe0, 0x00]);
        assert_eq!(closes(&a), Some(&End::ClientDisconnect { will: false }));
    }
}

#[test]
fn an_unknown_disconnect_reason_is_malformed() {
    let mut t = device(true);
    let a = t.bytes(&[0xe0, 0x01, 0x05]);
    assert!(matches!(
        closes(&a),
        Some(End::Violation(DisconnectReasonCode::MalformedPacket, _))
    ));
}

#[test]
fn a_packet_over_the_maximum_size_ends_with_packet_too_large() {
    let mut t = device(true);
    let big = "x".repeat(5000);
    let a = t.send(publish(&format!("devices/dev-1/{big}"), 0, 0));
    assert!(matches!(
        closes(&a),
        Some(End::Violation(DisconnectReasonCode::PacketTooLarge, why)) if why.contains("4096")
    ));
}

#[test]
fn a_packet_only_a_server_sends_is_a_protocol_error() {
    let mut t = device(true);
    // CONNACK (type 2).
    let a = t.bytes(&[0x20, 0x02, 0x00, 0x00]);
    assert!(matches!(closes(&a), Some(End::Protocol(why)) if why.contains("type 2")));
}

#[test]
fn a_second_connect_is_a_protocol_error() {
    let mut t = device(false);
    let c = Packet::Connect(connect_packet("dev-1", true, 10), None, None, None, None);
    let a = t.send(c);
    assert!(matches!(closes(&a), Some(End::Protocol(why)) if why.contains("CONNECT")));
}

#[test]
fn garbage_is_malformed() {
    let mut t = device(false);
    // SUBSCRIBE with a remaining length that runs past its contents.
    let a = t.bytes(&[0x82, 0x03, 0x00, 0x01, 0x00]);
    assert!(matches!(
        closes(&a),
        Some(End::Violation(DisconnectReasonCode::MalformedPacket, _))
    ));
}

// --- PUBLISH from the client

#[test]
fn a_publish_on_its_own_topic_is_passed_on_then_acknowledged() {
    let mut t = device(false);
    let a = t.send(publish("devices/dev-1/telemetry", 1, 7));
    let [Action::Publish(i)] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(
        (i.topic.as_str(), i.qos, i.pkid),
        ("devices/dev-1/telemetry", 1, 7)
    );
    assert!(
        t.out().is_empty(),
        "not acknowledged before it is passed on"
    );
    t.settle(&a);
    assert_eq!(
        t.out(),
        vec![Packet::PubAck(
            PubAck {
                pkid: 7,
                reason: PubAckReason::Success
            },
            None
        )]
    );
}

#[test]
fn on_mqtt_311_a_publish_outside_its_topics_ends_the_connection() {
    let mut t = device(false);
    let a = t.send(publish("devices/dev-2/telemetry", 1, 1));
    assert!(matches!(closes(&a), Some(End::Acl(_))));
}

#[test]
fn on_mqtt_5_qos_0_outside_its_topics_ends_the_connection() {
    let mut t = device(true);
    let a = t.send(publish("devices/dev-2/telemetry", 0, 0));
    assert!(matches!(closes(&a), Some(End::Acl(_))));
}

#[test]
fn on_mqtt_5_qos_1_outside_its_topics_gets_0x87_and_the_connection_goes_on() {
    let mut t = device(true);
    let a = t.send(publish("$devices/dev-1/x", 1, 3));
    assert!(closes(&a).is_none());
    assert!(a.contains(&Action::Refused(Refusal::Acl)));
    t.settle(&a);
    let out = t.out();
    assert!(
        matches!(&out[..], [Packet::PubAck(PubAck { pkid: 3, reason: PubAckReason::NotAuthorized }, Some(p))] if p.reason_string.is_some()),
        "{out:?}"
    );
    // And the next one goes through.
    let a = t.send(publish("devices/dev-1/x", 1, 4));
    assert!(matches!(&a[..], [Action::Publish(_)]));
}

#[test]
fn on_mqtt_5_qos_2_outside_its_topics_gets_a_pubrec_0x87_that_ends_the_flow() {
    let mut t = device(true);
    let a = t.send(publish("devices/dev-2/x", 2, 9));
    t.settle(&a);
    assert!(matches!(
        &t.out()[..],
        [Packet::PubRec(
            PubRec {
                pkid: 9,
                reason: PubRecReason::NotAuthorized
            },
            _
        )]
    ));
    // MQTT 5 4.3.3: the flow ended; a PUBREL for it finds nothing.
    t.send(Packet::PubRel(
        PubRel {
            pkid: 9,
            reason: PubRelReason::Success,
        },
        None,
    ));
    assert!(matches!(
        &t.out()[..],
        [Packet::PubComp(
            PubComp {
                pkid: 9,
                reason: PubCompReason::PacketIdentifierNotFound
            },
            _
        )]
    ));
}

#[test]
fn a_qos_2_publish_sent_again_before_pubrel_is_passed_on_once() {
    let mut t = device(true);
    let a = t.send(publish("devices/dev-1/x", 2, 5));
    assert!(matches!(&a[..], [Action::Publish(_)]));
    t.settle(&a);
    let again = t.send(publish("devices/dev-1/x", 2, 5));
    assert!(
        matches!(
            &again[..],
            [Action::Ack {
                qos: 2,
                pkid: 5,
                reason: PubAckReason::Success,
                ..
            }]
        ),
        "{again:?}"
    );
    t.settle(&again);
    t.out();
    t.send(Packet::PubRel(
        PubRel {
            pkid: 5,
            reason: PubRelReason::Success,
        },
        None,
    ));
    assert!(matches!(
        &t.out()[..],
        [Packet::PubComp(
            PubComp {
                pkid: 5,
                reason: PubCompReason::Success
            },
            _
        )]
    ));
    // After PUBCOMP, the id is free: a new message with it goes on.
    assert!(matches!(
        &t.send(publish("devices/dev-1/x", 2, 5))[..],
        [Action::Publish(_)]
    ));
}

#[test]
fn a_topic_alias_is_set_then_stands_for_its_topic() {
    let mut t = device(true);
    let set = PublishProperties {
        topic_alias: Some(2),
        ..Default::default()
    };
    let a = t.send(publish_props("devices/dev-1/a", 0, 0, set.clone()));
    let [Action::Publish(i)] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(
        i.props.as_ref().and_then(|p| p.topic_alias),
        None,
        "the alias is this connection's business only"
    );
    let a = t.send(publish_props("", 0, 0, set));
    let [Action::Publish(i)] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(i.topic, "devices/dev-1/a");
    assert_eq!(&i.publish.topic[..], b"devices/dev-1/a");
}

#[test]
fn a_topic_alias_never_set_or_out_of_range_ends_the_connection() {
    let alias = |n| PublishProperties {
        topic_alias: Some(n),
        ..Default::default()
    };
    let mut t = device(true);
    let a = t.send(publish_props("", 0, 0, alias(1)));
    assert!(matches!(closes(&a), Some(End::Protocol(w)) if w.contains("never set")));
    for n in [0, 5] {
        let mut t = device(true);
        let a = t.send(publish_props("devices/dev-1/a", 0, 0, alias(n)));
        assert!(
            matches!(
                closes(&a),
                Some(End::Violation(DisconnectReasonCode::TopicAliasInvalid, _))
            ),
            "alias {n}: {a:?}"
        );
    }
}

#[test]
fn a_topic_name_with_wildcards_is_invalid_and_an_empty_one_without_alias_a_protocol_error() {
    let mut t = device(true);
    let a = t.send(publish("devices/dev-1/+", 0, 0));
    assert!(matches!(
        closes(&a),
        Some(End::Violation(DisconnectReasonCode::TopicNameInvalid, _))
    ));
    let mut t = device(true);
    let a = t.send(publish("", 0, 0));
    assert!(matches!(closes(&a), Some(End::Protocol(_))));
}

#[test]
fn what_a_client_sends_under_the_reserved_prefix_never_passes_on() {
    let mut t = device(true);
    let props = PublishProperties {
        user_properties: vec![
            ("x-fleetgate-device-id".into(), "dev-9".into()),
            ("X_Fleetgate_Mark".into(), "2/forged".into()),
            ("site".into(), "north".into()),
        ],
        ..Default::default()
    };
    let a = t.send(publish_props("devices/dev-1/t", 0, 0, props));
    let [Action::Publish(i)] = &a[..] else {
        panic!("{a:?}")
    };
    assert_eq!(
        i.props.as_ref().unwrap().user_properties,
        vec![("site".to_string(), "north".to_string())]
    );
}

#[test]
fn a_device_over_its_budget_of_new_topics_gets_quota_exceeded_until_the_bucket_refills() {
    let mut t = device(true);
    // Two new topics a minute.
    for n in 0..2 {
        let a = t.send(publish(&format!("devices/dev-1/t{n}"), 1, n + 1));
        assert!(matches!(&a[..], [Action::Publish(_)]), "{a:?}");
    }
    let a = t.send(publish("devices/dev-1/t9", 1, 10));
    assert!(a.contains(&Action::Refused(Refusal::Quota)));
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Ack {
            reason: PubAckReason::QuotaExceeded,
            ..
        }
    )));
    // A topic already used costs nothing.
    assert!(matches!(
        &t.send(publish("devices/dev-1/t0", 1, 11))[..],
        [Action::Publish(_)]
    ));
    // Half a minute later, one more token.
    t.clock.advance(Duration::from_secs(30));
    assert!(matches!(
        &t.send(publish("devices/dev-1/t9", 1, 12))[..],
        [Action::Publish(_)]
    ));
}

#[test]
fn a_service_has_no_budget_of_new_topics() {
    let mut t = with(
        identity(Role::Service, "backend"),
        true,
        Terms::before_connect(),
    );
    for n in 0..10 {
        let a = t.send(publish(&format!("devices/dev-{n}/commands/x"), 1, n + 1));
        assert!(matches!(&a[..], [Action::Publish(_)]), "{a:?}");
    }
}

#[test]
fn a_claim_only_provisions() {
    let mut t = with(
        identity(Role::Claim, "factory-1"),
        true,
        Terms::before_connect(),
    );
    let a = t.send(publish("$fleetgate/provision/dev-77", 1, 1));
    assert!(
        matches!(&a[..], [Action::Provision { request, .. }] if request == "dev-77"),
        "{a:?}"
    );
    let a = t.send(publish("devices/dev-77/telemetry", 1, 2));
    assert!(matches!(closes(&a), Some(End::Acl(_))));
}

#[test]
fn an_ocsp_request_is_answered_where_the_client_said() {
    let mut t = device(true);
    let props = PublishProperties {
        response_topic: Some("devices/dev-1/ocsp/answer".into()),
        correlation_data: Some(Bytes::from_static(b"c7")),
        ..Default::default()
    };
    let a = t.send(publish_props(OCSP_TOPIC, 0, 0, props));
    assert!(
        matches!(&a[..], [Action::Ocsp { reply_topic, correlation: Some(c), .. }]
            if reply_topic == "devices/dev-1/ocsp/answer" && &c[..] == b"c7"),
        "{a:?}"
    );
    // Without a response topic (or with a wildcard in it): refused.
    let a = t.send(publish(OCSP_TOPIC, 0, 0));
    assert!(matches!(closes(&a), Some(End::Acl(w)) if w.contains("response topic")));
    // MQTT 3.1.1: its own request and response topics.
    let mut t = device(false);
    let a = t.send(publish("devices/dev-1/ocsp/request", 1, 1));
    assert!(
        matches!(&a[..], [Action::Ocsp { reply_topic, .. }] if reply_topic == "devices/dev-1/ocsp/response")
    );
}

// --- acknowledgements

#[test]
fn a_reason_string_goes_only_to_a_client_that_takes_them() {
    let terms = Terms {
        problem_info: false,
        ..Terms::before_connect()
    };
    let mut t = with(identity(Role::Device, "dev-1"), true, terms);
    t.ch.acknowledge(1, 1, PubAckReason::QuotaExceeded, Some("too many".into()))
        .unwrap();
    assert!(matches!(
        &t.out()[..],
        [Packet::PubAck(
            PubAck {
                reason: PubAckReason::QuotaExceeded,
                ..
            },
            None
        )]
    ));
}

#[test]
fn every_puback_reason_has_its_pubrec_twin() {
    for (ack, rec) in [
        (PubAckReason::Success, PubRecReason::Success),
        (PubAckReason::NotAuthorized, PubRecReason::NotAuthorized),
        (PubAckReason::QuotaExceeded, PubRecReason::QuotaExceeded),
        (
            PubAckReason::NoMatchingSubscribers,
            PubRecReason::NoMatchingSubscribers,
        ),
        (
            PubAckReason::ImplementationSpecificError,
            PubRecReason::ImplementationSpecificError,
        ),
        (
            PubAckReason::TopicNameInvalid,
            PubRecReason::TopicNameInvalid,
        ),
    ] {
        assert_eq!(pubrec_reason(ack), rec);
    }
}

// --- what we send the client

#[test]
fn a_qos_1_delivery_is_done_when_the_client_acknowledges_it() {
    let mut t = device(true);
    t.ch.outbox
        .push(outgoing("devices/dev-1/commands/a", b"on", 1, 42));
    let mut done = Vec::new();
    t.ch.write_outbox(&mut done).unwrap();
    assert!(done.is_empty());
    let out = t.out();
    let [Packet::Publish(p, _)] = &out[..] else {
        panic!("{out:?}")
    };
    let (_, pkid) = qos_and_pkid(p);
    let a = t.send(Packet::PubAck(
        PubAck {
            pkid,
            reason: PubAckReason::Success,
        },
        None,
    ));
    assert_eq!(a, vec![Action::Done(42)]);
}

#[test]
fn a_qos_2_delivery_goes_pubrec_pubrel_pubcomp() {
    let mut t = device(false);
    t.ch.outbox
        .push(outgoing("devices/dev-1/commands/a", b"on", 2, 8));
    t.ch.write_outbox(&mut Vec::new()).unwrap();
    let out = t.out();
    let [Packet::Publish(p, _)] = &out[..] else {
        panic!("{out:?}")
    };
    let (_, pkid) = qos_and_pkid(p);
    let a = t.send(Packet::PubRec(
        PubRec {
            pkid,
            reason: PubRecReason::Success,
        },
        None,
    ));
    assert!(a.is_empty());
    assert!(matches!(&t.out()[..], [Packet::PubRel(r, _)] if r.pkid == pkid));
    let a = t.send(Packet::PubComp(
        PubComp {
            pkid,
            reason: PubCompReason::Success,
        },
        None,
    ));
    assert_eq!(a, vec![Action::Done(8)]);
}

#[test]
fn an_acknowledgement_for_nothing_in_flight_is_a_protocol_error() {
    let mut t = device(true);
    let a = t.send(Packet::PubAck(
        PubAck {
            pkid: 77,
            reason: PubAckReason::Success,
        },
        None,
    ));
    assert!(matches!(closes(&a), Some(End::Protocol(_))));
}

#[test]
fn a_message_over_the_clients_maximum_packet_size_is_dropped_and_the_smaller_one_still_goes() {
    let terms = Terms {
        client_max_packet: 100,
        ..Terms::before_connect()
    };
    let mut t = with(identity(Role::Device, "dev-1"), true, terms);
    let big = vec![b'x'; 200];
    t.ch.outbox
        .push(outgoing("devices/dev-1/commands/big", &big, 1, 1));
    t.ch.outbox
        .push(outgoing("devices/dev-1/commands/small", b"ok", 1, 2));
    let mut done = Vec::new();
    t.ch.write_outbox(&mut done).unwrap();
    assert_eq!(done, vec![1], "the big one is done with as if delivered");
    let out = t.out();
    assert!(
        matches!(&out[..], [Packet::Publish(p, _)] if &p.topic[..] == b"devices/dev-1/commands/small"),
        "{out:?}"
    );
}

#[test]
fn no_more_than_receive_maximum_messages_are_in_flight() {
    let terms = Terms {
        receive_maximum: 2,
        ..Terms::before_connect()
    };
    let mut t = with(identity(Role::Device, "dev-1"), true, terms);
    for n in 0..4 {
        t.ch.outbox
            .push(outgoing("devices/dev-1/commands/x", b"x", 1, n));
    }
    t.ch.write_outbox(&mut Vec::new()).unwrap();
    let out = t.out();
    assert_eq!(out.len(), 2, "the window is 2");
    let Packet::Publish(first, _) = &out[0] else {
        panic!()
    };
    let a = t.send(Packet::PubAck(
        PubAck {
            pkid: qos_and_pkid(first).1,
            reason: PubAckReason::Success,
        },
        None,
    ));
    assert_eq!(a, vec![Action::Done(0)]);
    t.ch.write_outbox(&mut Vec::new()).unwrap();
    assert_eq!(t.out().len(), 1, "one acknowledged, one more goes");
}

// --- time: keep-alive and the certificate's end

#[test]
fn nothing_heard_for_one_and_a_half_keep_alives_ends_the_connection() {
    let t = device(true);
    let start = t.clock.now();
    // Keep-alive 10 s: 15 s of silence.
    t.clock.advance(Duration::from_millis(14_999));
    assert_eq!(t.ch.tick(t.clock.now()), None);
    t.clock.advance(Duration::from_millis(1));
    assert_eq!(t.ch.tick(t.clock.now()), Some(End::KeepAlive));
    assert_eq!(t.ch.wake_at(start), start.mono + Duration::from_secs(15));
}

#[test]
fn whatever_the_client_sends_starts_the_keep_alive_again() {
    let mut t = device(true);
    t.clock.advance(Duration::from_secs(14));
    t.ch.heard(t.clock.now());
    t.clock.advance(Duration::from_secs(14));
    assert_eq!(t.ch.tick(t.clock.now()), None);
    t.clock.advance(Duration::from_secs(1));
    assert_eq!(t.ch.tick(t.clock.now()), Some(End::KeepAlive));
}

#[test]
fn keep_alive_zero_never_times_out_but_the_certificate_still_ends() {
    let clock = ManualClock::at(NOT_AFTER_MS - 60_000);
    let id = identity(Role::Device, "dev-1");
    let codec = crate::codec::Codec::for_level(5);
    let mut ch = Channel::new(codec, &id, 4096, 4, NOT_AFTER_MS, clock.now());
    ch.accept(Terms::before_connect(), None, clock.now());
    assert_eq!(
        ch.wake_at(clock.now()),
        clock.now().mono + Duration::from_secs(60)
    );
    clock.advance(Duration::from_secs(59));
    assert_eq!(ch.tick(clock.now()), None);
    clock.advance(Duration::from_secs(1));
    assert_eq!(ch.tick(clock.now()), Some(End::CertificateExpired));
}

// --- SUBSCRIBE

fn filter(path: &str, qos: QoS) -> Filter {
    Filter {
        path: path.into(),
        qos,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::OnEverySubscribe,
    }
}

#[test]
fn a_subscribe_goes_to_the_driver() {
    let mut t = device(true);
    let s = rumqttd::protocol::Subscribe {
        pkid: 1,
        filters: vec![filter("devices/dev-1/commands/#", QoS::AtLeastOnce)],
    };
    let a = t.send(Packet::Subscribe(s.clone(), None));
    assert!(matches!(&a[..], [Action::Subscribe(got, None)] if got.filters == s.filters));
}

#[test]
fn a_filter_outside_its_topics_is_refused_as_each_version_can_say() {
    for (v5, code) in [
        (true, SubscribeReasonCode::NotAuthorized),
        (false, SubscribeReasonCode::Failure),
    ] {
        let t = device(v5);
        let f = [
            filter("devices/dev-1/commands/#", QoS::AtLeastOnce),
            filter("devices/dev-2/#", QoS::AtLeastOnce),
        ];
        let checked = t.ch.check_filters(&f, 0, |_| false, LIMITS);
        assert!(checked[0].is_none());
        assert_eq!(checked[1].as_ref().unwrap().code, code);
    }
}

#[test]
fn the_subscription_cap_counts_new_filters_once() {
    let t = device(true);
    let f = [
        filter("devices/dev-1/a", QoS::AtMostOnce),
        filter("devices/dev-1/a", QoS::AtMostOnce),
        filter("devices/dev-1/held", QoS::AtMostOnce),
        filter("devices/dev-1/b", QoS::AtMostOnce),
        filter("devices/dev-1/c", QoS::AtMostOnce),
    ];
    // Holds 1 ("held") of at most 3: a and b fit, c does not.
    let checked =
        t.ch.check_filters(&f, 1, |f| f == "devices/dev-1/held", LIMITS);
    let refused: Vec<bool> = checked.iter().map(Option::is_some).collect();
    assert_eq!(refused, vec![false, false, false, false, true]);
    let r = checked[4].as_ref().unwrap();
    assert!(r.quota);
    assert_eq!(r.code, SubscribeReasonCode::QuotaExceeded);
}

#[test]
fn a_persistent_session_may_not_join_a_share_group() {
    let terms = Terms {
        clean: false,
        ..Terms::before_connect()
    };
    let t = with(identity(Role::Service, "backend"), true, terms);
    let f = [filter("$share/g/devices/+/telemetry", QoS::AtLeastOnce)];
    let checked = t.ch.check_filters(&f, 0, |_| false, LIMITS);
    assert_eq!(
        checked[0].as_ref().unwrap().code,
        SubscribeReasonCode::SharedSubscriptionsNotSupported
    );
}

#[test]
fn refusals_are_joined_into_one_reason_string_and_a_cap_is_counted() {
    let mut t = device(true);
    let f = [
        filter("devices/dev-2/#", QoS::AtMostOnce),
        filter("devices/dev-1/a", QoS::AtMostOnce),
    ];
    let checked = t.ch.check_filters(&f, 3, |_| false, LIMITS);
    let mut a = Vec::new();
    let (codes, why) = t.ch.refusals(checked, t.clock.now(), &mut a);
    assert_eq!(
        codes,
        vec![
            Some(SubscribeReasonCode::NotAuthorized),
            Some(SubscribeReasonCode::QuotaExceeded)
        ]
    );
    assert!(why.unwrap().contains("; "));
    assert_eq!(a, vec![Action::Refused(Refusal::Quota)]);
    // 3.1.1 has no reason strings.
    let mut t = device(false);
    let checked = t.ch.check_filters(&f[..1], 0, |_| false, LIMITS);
    assert_eq!(t.ch.refusals(checked, t.clock.now(), &mut a).1, None);
}

#[test]
fn retain_handling_decides_who_gets_retained_messages() {
    // MQTT 5 3.8.3.1: 0 always, 1 only for a new subscription, 2 never.
    assert!(sends_retained(&RetainForwardRule::OnEverySubscribe, false));
    assert!(sends_retained(&RetainForwardRule::OnNewSubscribe, true));
    assert!(!sends_retained(&RetainForwardRule::OnNewSubscribe, false));
    assert!(!sends_retained(&RetainForwardRule::Never, true));
}

#[test]
fn a_share_group_filter_is_what_follows_its_group() {
    assert_eq!(
        share_inner("$share/g1/devices/+/telemetry"),
        "devices/+/telemetry"
    );
    assert_eq!(share_inner("devices/#"), "devices/#");
    // A malformed share (no filter after the group) is the group's rest.
    assert_eq!(share_inner("$share/g1"), "g1");
}

#[test]
fn a_suback_says_why_only_when_there_is_a_why() {
    assert!(suback_props(None).is_none());
    let p = suback_props(Some("max 1 subscription".into())).unwrap();
    assert_eq!(p.reason_string.as_deref(), Some("max 1 subscription"));
    assert!(p.user_properties.is_empty());
}

// --- CONNECT

fn decide(
    id: &Identity,
    c: &rumqttd::protocol::Connect,
    props: Option<&rumqttd::protocol::ConnectProperties>,
    will: Option<&LastWill>,
    v5: bool,
) -> Result<Terms, connect::Refused> {
    connect::decide(id, c, props, will, v5)
}

fn will_on(topic: &str) -> LastWill {
    LastWill {
        topic: Bytes::copy_from_slice(topic.as_bytes()),
        message: Bytes::from_static(b"test_will_delay will message"),
        qos: QoS::AtMostOnce,
        retain: false,
    }
}

fn props() -> rumqttd::protocol::ConnectProperties {
    rumqttd::protocol::ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    }
}

#[test]
fn the_client_id_must_be_the_certificates_or_empty() {
    let id = identity(Role::Device, "dev-1");
    let r = decide(&id, &connect_packet("dev-2", true, 0), None, None, true).unwrap_err();
    assert_eq!(r.refusal, Refusal::WrongIdentity);
    assert_eq!(r.code, Some(ConnectReturnCode::NotAuthorized));
    assert!(r.why.contains("dev-1"));
    let t = decide(&id, &connect_packet("", true, 0), None, None, true).unwrap();
    assert!(t.assigned);
    let Packet::ConnAck(_, Some(p)) = connect::connack(&t, false, true, 4096, "dev-1", 32) else {
        panic!()
    };
    assert_eq!(p.assigned_client_identifier.as_deref(), Some("dev-1"));
    // A claim is shared by many devices: any client id.
    let claim = identity(Role::Claim, "factory-1");
    assert!(decide(
        &claim,
        &connect_packet("anything", true, 0),
        None,
        None,
        true
    )
    .is_ok());
}

#[test]
fn a_will_topic_must_be_a_valid_name_and_the_clients_own() {
    let id = identity(Role::Device, "dev-1");
    let c = connect_packet("dev-1", true, 0);
    let r = decide(&id, &c, None, Some(&will_on("devices/dev-1/+")), true).unwrap_err();
    assert_eq!(r.code, Some(ConnectReturnCode::TopicNameInvalid));
    // 3.1.1 has no code for it: no CONNACK.
    let r = decide(&id, &c, None, Some(&will_on("devices/dev-1/+")), false).unwrap_err();
    assert_eq!((r.refusal, r.code), (Refusal::Protocol, None));
    let r = decide(&id, &c, None, Some(&will_on("devices/dev-2/status")), true).unwrap_err();
    assert_eq!(
        (r.refusal, r.code),
        (Refusal::Acl, Some(ConnectReturnCode::NotAuthorized))
    );
    assert!(decide(&id, &c, None, Some(&will_on("devices/dev-1/status")), true).is_ok());
}

#[test]
fn the_session_expiry_is_capped_and_the_connack_says_what_was_granted() {
    let id = identity(Role::Device, "dev-1");
    let c = connect_packet("dev-1", false, 0);
    let p = rumqttd::protocol::ConnectProperties {
        session_expiry_interval: Some(u32::MAX),
        ..props()
    };
    let t = decide(&id, &c, Some(&p), None, true).unwrap();
    assert_eq!(t.expiry, Some(MAX_SESSION_EXPIRY));
    let Packet::ConnAck(ack, Some(cp)) = connect::connack(&t, true, true, 4096, "dev-1", 32) else {
        panic!()
    };
    assert!(ack.session_present);
    assert_eq!(cp.session_expiry_interval, Some(MAX_SESSION_EXPIRY));
    // What it asked for, granted: not repeated.
    let p = rumqttd::protocol::ConnectProperties {
        session_expiry_interval: Some(60),
        ..props()
    };
    let t = decide(&id, &c, Some(&p), None, true).unwrap();
    let Packet::ConnAck(_, Some(cp)) = connect::connack(&t, true, true, 4096, "dev-1", 32) else {
        panic!()
    };
    assert_eq!(cp.session_expiry_interval, None);
    // 3.1.1: clean_session=0 keeps the session for the broker's bound.
    let t = decide(&id, &c, None, None, false).unwrap();
    assert_eq!(t.expiry, Some(MAX_SESSION_EXPIRY));
    // MQTT 5 without an expiry: the session ends with the connection.
    let t = decide(&id, &c, Some(&props()), None, true).unwrap();
    assert_eq!(t.expiry, None);
}

#[test]
fn a_clean_start_never_reports_a_session_present() {
    let id = identity(Role::Device, "dev-1");
    let t = decide(&id, &connect_packet("dev-1", true, 0), None, None, false).unwrap();
    let Packet::ConnAck(ack, None) = connect::connack(&t, true, false, 4096, "dev-1", 32) else {
        panic!()
    };
    assert!(!ack.session_present);
}

#[test]
fn the_clients_windows_and_limits_are_taken_as_asked() {
    let id = identity(Role::Device, "dev-1");
    let p = rumqttd::protocol::ConnectProperties {
        receive_maximum: Some(5000),
        max_packet_size: Some(512),
        request_problem_info: Some(0),
        ..props()
    };
    let t = decide(
        &id,
        &connect_packet("dev-1", true, 30),
        Some(&p),
        None,
        true,
    )
    .unwrap();
    assert_eq!(t.receive_maximum, MAX_IN_FLIGHT);
    assert_eq!(t.client_max_packet, 512);
    assert!(!t.problem_info);
    assert_eq!(t.keep_alive, 30);
}

#[test]
fn an_admission_refusal_has_the_connack_code_each_version_has() {
    use connect::refusal_code;
    assert_eq!(
        refusal_code(Refusal::JitQuotaExceeded, true),
        ConnectReturnCode::QuotaExceeded
    );
    assert_eq!(
        refusal_code(Refusal::JitRateLimited, false),
        ConnectReturnCode::ServiceUnavailable
    );
    assert_eq!(
        refusal_code(Refusal::Revoked, true),
        ConnectReturnCode::NotAuthorized
    );
}

#[test]
fn the_first_packet_chooses_the_codec_and_must_be_connect() {
    let mut b = BytesMut::new();
    V5.write(
        Packet::Connect(
            connect_packet("dev-1", true, 5),
            Some(props()),
            None,
            None,
            None,
        ),
        &mut b,
    )
    .unwrap();
    let whole = b.clone();
    let mut part = BytesMut::from(&whole[..4]);
    assert!(connect::first_packet(&mut part, 4096).unwrap().is_none());
    let (codec, p) = connect::first_packet(&mut b, 4096).unwrap().unwrap();
    assert!(codec.is_v5());
    assert!(matches!(p, Packet::Connect(c, ..) if c.keep_alive == 5));
    let mut ping = BytesMut::from(&[0xc0, 0x00][..]);
    assert!(connect::first_packet(&mut ping, 4096).is_err());
}

// --- the will

#[test]
fn the_will_goes_out_only_after_an_unclean_end() {
    let w = || Some(will_on("devices/dev-1/status"));
    for end in [
        End::Closed("eof".into()),
        End::KeepAlive,
        End::Protocol("x".into()),
        End::ClientDisconnect { will: true },
        End::Shutdown,
        End::CertificateExpired,
    ] {
        assert!(will::plan(&end, w(), None, None).is_some(), "{end:?}");
    }
    for end in [
        End::ClientDisconnect { will: false },
        End::TakenOver,
        End::Kicked(crate::Kick::Revoked),
        End::RouterDisconnect,
    ] {
        assert!(will::plan(&end, w(), None, None).is_none(), "{end:?}");
    }
}

#[test]
fn the_will_delay_is_the_shorter_of_its_own_and_the_sessions_expiry() {
    let w = || Some(will_on("devices/dev-1/status"));
    let delay = |d: u32| LastWillProperties {
        delay_interval: Some(d),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    let end = End::Closed("eof".into());
    let p = will::plan(&end, w(), Some(delay(3)), Some(5)).unwrap();
    assert_eq!(p.delay, Some(Duration::from_secs(3)));
    let p = will::plan(&end, w(), Some(delay(5)), Some(2)).unwrap();
    assert_eq!(p.delay, Some(Duration::from_secs(2)));
    // No session kept: at once.
    let p = will::plan(&end, w(), Some(delay(5)), None).unwrap();
    assert_eq!(p.delay, None);
    let p = will::plan(&end, w(), Some(delay(u32::MAX)), Some(u32::MAX)).unwrap();
    assert_eq!(p.delay, Some(MAX_WILL_DELAY));
}

#[test]
fn the_wills_payload_and_topic_are_exactly_what_the_client_gave() {
    let props = LastWillProperties {
        delay_interval: Some(3),
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        content_type: Some("text/plain".into()),
        response_topic: None,
        correlation_data: None,
        user_properties: vec![("k".into(), "v".into())],
    };
    let p = will::plan(
        &End::KeepAlive,
        Some(will_on("devices/dev-1/status")),
        Some(props),
        Some(5),
    )
    .unwrap();
    assert_eq!(&p.publish.payload[..], b"test_will_delay will message");
    assert_eq!(&p.publish.topic[..], b"devices/dev-1/status");
    let props = p.props.unwrap();
    assert_eq!(props.message_expiry_interval, Some(60));
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties, vec![("k".into(), "v".into())]);
}

// --- the end's words

#[test]
fn an_end_says_why_in_its_disconnect() {
    let said = |e: End| (e.reason(), e.reason_string());
    assert_eq!(said(End::ClientDisconnect { will: false }), (None, None));
    assert_eq!(
        said(End::Acl("not yours".into())),
        (
            Some(DisconnectReasonCode::NotAuthorized),
            Some("not yours".into())
        )
    );
    assert_eq!(
        said(End::KeepAlive).0,
        Some(DisconnectReasonCode::KeepAliveTimeout)
    );
    let _ = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
}
