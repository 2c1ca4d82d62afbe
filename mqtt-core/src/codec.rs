//! Decoding and encoding MQTT with `rumqttd::protocol`, 3.1.1 or 5, as a
//! session does it. Sans-IO: bytes in, packets out.
//!
//! Before rumqttd's decoder sees a frame, its packet type is checked to be
//! one a client may send: rumqttd 0.20's v5 decoder panics (`unreachable!`)
//! on a CONNACK or UNSUBACK with a payload, which the fuzz target
//! `mqtt_packets` found; a client has no business sending those (or
//! SUBACK, PINGRESP) anyway.

use bytes::BytesMut;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Error, Packet, Protocol};

#[derive(Debug)]
pub enum Codec {
    V4(V4),
    V5(V5),
}

/// Whether a client may send a packet of this type (the high nibble of the
/// first byte): CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP,
/// SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT.
pub fn client_may_send(first: u8) -> bool {
    matches!(first >> 4, 1 | 3..=8 | 10 | 12 | 14)
}

impl Codec {
    /// The codec for a CONNECT's protocol level (5, or else 3.1.1).
    pub fn for_level(level: u8) -> Self {
        if level == 5 {
            Codec::V5(V5)
        } else {
            Codec::V4(V4)
        }
    }

    pub fn is_v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }

    /// The next whole packet in `buf`, `None` if more bytes are needed.
    pub fn read(&mut self, buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, Error> {
        match buf.first() {
            None => return Ok(None),
            Some(&b) if !client_may_send(b) => return Err(Error::InvalidPacketType(b >> 4)),
            Some(_) => {}
        }
        // MQTT 5 3.1.2.11.4: the limit is on the whole packet, fixed
        // header included (rumqttd checks the remaining length only).
        if let Some(total) = frame_length(buf) {
            if total > max {
                return Err(Error::PayloadSizeLimitExceeded(total));
            }
        }
        // MQTT 5 3.14.2.2.1: a DISCONNECT with a reason code alone has
        // remaining length 1 and no property length; rumqttd 0.20 reads a
        // property length anyway and finds the packet short.
        if let (Codec::V5(_), [0xe0, 0x01, code, ..]) = (&*self, &buf[..]) {
            let reason_code = disconnect_reason_of(*code).ok_or(Error::MalformedPacket)?;
            let _ = buf.split_to(3);
            return Ok(Some(Packet::Disconnect(
                rumqttd::protocol::Disconnect { reason_code },
                None,
            )));
        }
        let before = buf.len();
        let r = match self {
            Codec::V4(c) => c.read_mut(buf, max),
            Codec::V5(c) => c.read_mut(buf, max),
        };
        match r {
            Ok(p) => Ok(Some(p)),
            // Short of a whole frame: nothing was consumed, wait for more.
            Err(Error::InsufficientBytes(_)) if buf.len() == before => Ok(None),
            // The frame was split off and its contents ran short: malformed.
            Err(Error::InsufficientBytes(_)) => Err(Error::MalformedPacket),
            Err(e) => Err(e),
        }
    }

    pub fn write(&self, p: Packet, out: &mut BytesMut) -> Result<(), Error> {
        match (self, p) {
            // rumqttd 0.20's v5 encoder writes a stray byte after the
            // reason code (`e0 01 98 00`: remaining length 1, two bytes
            // follow), which strict clients read as a malformed packet.
            // A DISCONNECT we send carries a reason code and no properties
            // (MQTT 5 3.14.2.2.1: omitted when the remaining length is 1).
            // With a reason string, written here too (MQTT 5 3.14.2.2).
            (Codec::V5(_), Packet::Disconnect(d, props)) => {
                let reason = disconnect_reason(d.reason_code);
                match props.and_then(|p| p.reason_string) {
                    None => out.extend_from_slice(&[0xe0, 0x01, reason]),
                    Some(why) => {
                        // A reason string is at most 65,535 bytes; keep
                        // ours far shorter, on a character boundary.
                        let mut end = why.len().min(512);
                        while !why.is_char_boundary(end) {
                            end -= 1;
                        }
                        let why = &why.as_bytes()[..end];
                        let props_len = 3 + why.len();
                        let mut body = Vec::with_capacity(props_len + 4);
                        body.push(reason);
                        put_varint(&mut body, props_len);
                        body.push(0x1f);
                        body.extend_from_slice(&(why.len() as u16).to_be_bytes());
                        body.extend_from_slice(why);
                        out.extend_from_slice(&[0xe0]);
                        let mut len = Vec::new();
                        put_varint(&mut len, body.len());
                        out.extend_from_slice(&len);
                        out.extend_from_slice(&body);
                    }
                }
                Ok(())
            }
            (Codec::V4(c), p) => c.write(without_properties(p), out).map(|_| ()),
            (Codec::V5(c), p) => c.write(p, out).map(|_| ()),
        }
    }
}

/// The whole length of the packet at the start of `buf` (fixed header
/// included), once its remaining length is there.
fn frame_length(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for (i, b) in buf.iter().skip(1).take(4).enumerate() {
        len += usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(1 + (i + 1) + len);
        }
    }
    None
}

/// MQTT's variable byte integer.
fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            return;
        }
    }
}

/// A packet for a 3.1.1 client: MQTT 5 properties dropped. (rumqttd 0.20's
/// v4 encoder hits `unreachable!()` on any packet that carries them, such as
/// a PUBLISH from an MQTT 5 client, or one fleetgate stamped, forwarded to a
/// 3.1.1 subscriber.)
fn without_properties(p: Packet) -> Packet {
    match p {
        Packet::Connect(c, _, will, _, login) => Packet::Connect(c, None, will, None, login),
        Packet::Publish(x, _) => Packet::Publish(x, None),
        Packet::PubAck(x, _) => Packet::PubAck(x, None),
        Packet::Subscribe(x, _) => Packet::Subscribe(x, None),
        Packet::SubAck(x, _) => Packet::SubAck(x, None),
        Packet::PubRec(x, _) => Packet::PubRec(x, None),
        Packet::PubRel(x, _) => Packet::PubRel(x, None),
        Packet::PubComp(x, _) => Packet::PubComp(x, None),
        Packet::Unsubscribe(x, _) => Packet::Unsubscribe(x, None),
        Packet::UnsubAck(x, _) => Packet::UnsubAck(x, None),
        Packet::Disconnect(x, _) => Packet::Disconnect(x, None),
        other => other,
    }
}

/// The reason code a client's DISCONNECT byte names, if it is one.
fn disconnect_reason_of(b: u8) -> Option<rumqttd::protocol::DisconnectReasonCode> {
    use rumqttd::protocol::DisconnectReasonCode as R;
    [
        R::NormalDisconnection,
        R::DisconnectWithWillMessage,
        R::UnspecifiedError,
        R::MalformedPacket,
        R::ProtocolError,
        R::ImplementationSpecificError,
        R::NotAuthorized,
        R::ServerBusy,
        R::ServerShuttingDown,
        R::KeepAliveTimeout,
        R::SessionTakenOver,
        R::TopicFilterInvalid,
        R::TopicNameInvalid,
        R::ReceiveMaximumExceeded,
        R::TopicAliasInvalid,
        R::PacketTooLarge,
        R::MessageRateTooHigh,
        R::QuotaExceeded,
        R::AdministrativeAction,
        R::PayloadFormatInvalid,
        R::RetainNotSupported,
        R::QoSNotSupported,
        R::UseAnotherServer,
        R::ServerMoved,
        R::SharedSubscriptionNotSupported,
        R::ConnectionRateExceeded,
        R::MaximumConnectTime,
        R::SubscriptionIdentifiersNotSupported,
        R::WildcardSubscriptionsNotSupported,
    ]
    .into_iter()
    .find(|r| disconnect_reason(*r) == b)
}

/// MQTT 5 2.4: a DISCONNECT reason code's byte.
fn disconnect_reason(r: rumqttd::protocol::DisconnectReasonCode) -> u8 {
    use rumqttd::protocol::DisconnectReasonCode as R;
    match r {
        R::NormalDisconnection => 0x00,
        R::DisconnectWithWillMessage => 0x04,
        R::UnspecifiedError => 0x80,
        R::MalformedPacket => 0x81,
        R::ProtocolError => 0x82,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::ServerBusy => 0x89,
        R::ServerShuttingDown => 0x8b,
        R::KeepAliveTimeout => 0x8d,
        R::SessionTakenOver => 0x8e,
        R::TopicFilterInvalid => 0x8f,
        R::TopicNameInvalid => 0x90,
        R::ReceiveMaximumExceeded => 0x93,
        R::TopicAliasInvalid => 0x94,
        R::PacketTooLarge => 0x95,
        R::MessageRateTooHigh => 0x96,
        R::QuotaExceeded => 0x97,
        R::AdministrativeAction => 0x98,
        R::PayloadFormatInvalid => 0x99,
        R::RetainNotSupported => 0x9a,
        R::QoSNotSupported => 0x9b,
        R::UseAnotherServer => 0x9c,
        R::ServerMoved => 0x9d,
        R::SharedSubscriptionNotSupported => 0x9e,
        R::ConnectionRateExceeded => 0x9f,
        R::MaximumConnectTime => 0xa0,
        R::SubscriptionIdentifiersNotSupported => 0xa1,
        R::WildcardSubscriptionsNotSupported => 0xa2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the fuzzer found (fuzz/artifacts, kept here): a v5 CONNECT, then
    /// a CONNACK with a payload, on which rumqttd's v5 decoder panicked.
    const CRASH: &[u8] = &[
        0x10, 0x12, 0x00, 0x04, 0x4d, 0x51, 0x54, 0x54, 0x05, 0x02, 0x00, 0x1e, 0x00, 0x00, 0x05,
        0x31, 0x64, 0x65, 0x1b, 0x76, 0x2d, 0x31, 0x8e, 0x00, 0x00, 0x00, 0xd7, 0xd7, 0xd7, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x60, 0x00,
    ];

    #[test]
    fn a_publish_with_properties_encodes_for_a_3_1_1_client() {
        use rumqttd::protocol::{Publish, PublishProperties};
        let props = PublishProperties {
            user_properties: vec![("x-fleetgate-device-id".into(), "d-1".into())],
            ..PublishProperties::default()
        };
        let mut out = BytesMut::new();
        Codec::for_level(4)
            .write(
                Packet::Publish(Publish::new("devices/d-1/t", "hi", false), Some(props)),
                &mut out,
            )
            .unwrap();
        let mut plain = BytesMut::new();
        Codec::for_level(4)
            .write(
                Packet::Publish(Publish::new("devices/d-1/t", "hi", false), None),
                &mut plain,
            )
            .unwrap();
        assert_eq!(out, plain);
    }

    #[test]
    fn v5_disconnect_is_three_bytes() {
        use rumqttd::protocol::{Disconnect, DisconnectReasonCode as R};
        for (reason, byte) in [
            (R::NormalDisconnection, 0x00),
            (R::NotAuthorized, 0x87),
            (R::AdministrativeAction, 0x98),
            (R::ServerShuttingDown, 0x8b),
            (R::SessionTakenOver, 0x8e),
        ] {
            let mut out = BytesMut::new();
            Codec::for_level(5)
                .write(
                    Packet::Disconnect(
                        Disconnect {
                            reason_code: reason,
                        },
                        None,
                    ),
                    &mut out,
                )
                .unwrap();
            assert_eq!(&out[..], &[0xe0, 0x01, byte], "{reason:?}");
        }
    }

    #[test]
    fn v5_disconnect_carries_a_reason_string() {
        use rumqttd::protocol::{Disconnect, DisconnectProperties, DisconnectReasonCode as R};
        let props = DisconnectProperties {
            reason_string: Some("certificate revoked".into()),
            session_expiry_interval: None,
            user_properties: Vec::new(),
            server_reference: None,
        };
        let mut out = BytesMut::new();
        Codec::for_level(5)
            .write(
                Packet::Disconnect(
                    Disconnect {
                        reason_code: R::AdministrativeAction,
                    },
                    Some(props),
                ),
                &mut out,
            )
            .unwrap();
        // rumqttd's own decoder reads it back.
        let mut buf = out.clone();
        let back = V5.read_mut(&mut buf, 1024).unwrap();
        let Packet::Disconnect(d, Some(p)) = back else {
            panic!("{back:?}");
        };
        assert_eq!(d.reason_code, R::AdministrativeAction);
        assert_eq!(p.reason_string.as_deref(), Some("certificate revoked"));
    }

    #[test]
    fn the_size_limit_counts_the_whole_packet() {
        // PUBLISH, remaining length 10: 12 bytes in all.
        let frame = [0x30, 0x0a, 0x00, 0x01, b't', 1, 2, 3, 4, 5, 6, 7];
        let mut codec = Codec::for_level(5);
        let mut buf = BytesMut::from(&frame[..]);
        assert!(matches!(
            codec.read(&mut buf, 11),
            Err(Error::PayloadSizeLimitExceeded(12))
        ));
        let mut buf = BytesMut::from(&frame[..]);
        assert!(matches!(
            codec.read(&mut buf, 12),
            Ok(Some(Packet::Publish(..)))
        ));
        // Refused on the header alone, before the body arrives.
        let mut buf = BytesMut::from(&[0x30, 0xff, 0xff, 0x03][..]);
        assert!(matches!(
            codec.read(&mut buf, 1024),
            Err(Error::PayloadSizeLimitExceeded(65_539))
        ));
    }

    fn drain(codec: &mut Codec, bytes: &[u8]) -> Vec<Result<Packet, Error>> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        for _ in 0..32 {
            match codec.read(&mut buf, 4096) {
                Ok(Some(p)) => out.push(Ok(p)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn server_only_packets_from_a_client_are_errors_not_panics() {
        for first in [0x20u8, 0x90, 0xb0, 0xd0, 0xf0, 0x00] {
            for mut codec in [Codec::for_level(4), Codec::for_level(5)] {
                // Type byte, remaining length 3, a payload.
                let frame = [first, 0x03, 0x00, 0x01, 0x00];
                let got = drain(&mut codec, &frame);
                assert!(
                    matches!(got.as_slice(), [Err(Error::InvalidPacketType(_))]),
                    "{first:#x}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn the_fuzzer_crash_decodes_to_an_error() {
        let mut codec = Codec::for_level(5);
        let got = drain(&mut codec, CRASH);
        assert!(
            matches!(got.first(), Some(Ok(Packet::Connect(..)))),
            "{got:?}"
        );
        assert!(got.last().is_some_and(Result::is_err), "{got:?}");
    }

    #[test]
    fn a_v5_unsuback_with_a_payload_is_refused() {
        let mut codec = Codec::for_level(5);
        // UNSUBACK, remaining length 4: packet id, no properties, one code.
        let got = drain(&mut codec, &[0xb0, 0x04, 0x00, 0x01, 0x00, 0x00]);
        assert!(
            matches!(got.as_slice(), [Err(Error::InvalidPacketType(11))]),
            "{got:?}"
        );
    }

    #[test]
    fn an_mqtt5_disconnect_with_a_reason_code_alone_is_well_formed() {
        use rumqttd::protocol::DisconnectReasonCode as R;
        let mut c = Codec::for_level(5);
        for (bytes, want) in [
            (&[0xe0, 0x00][..], R::NormalDisconnection),
            (&[0xe0, 0x01, 0x00][..], R::NormalDisconnection),
            (&[0xe0, 0x01, 0x04][..], R::DisconnectWithWillMessage),
            (&[0xe0, 0x02, 0x04, 0x00][..], R::DisconnectWithWillMessage),
            (&[0xe0, 0x01, 0x8d][..], R::KeepAliveTimeout),
        ] {
            let mut buf = BytesMut::from(bytes);
            match c.read(&mut buf, 1024) {
                Ok(Some(Packet::Disconnect(d, _))) => {
                    assert_eq!(d.reason_code, want, "{bytes:02x?}")
                }
                other => panic!("{bytes:02x?}: {other:?}"),
            }
            assert!(buf.is_empty(), "{bytes:02x?}: left {buf:02x?}");
        }
        // Not yet whole: wait; not a reason code: malformed.
        let mut buf = BytesMut::from(&[0xe0, 0x01][..]);
        assert!(matches!(c.read(&mut buf, 1024), Ok(None)));
        let mut buf = BytesMut::from(&[0xe0, 0x01, 0x05][..]);
        assert!(c.read(&mut buf, 1024).is_err());
    }
}
