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
        match self {
            Codec::V4(c) => c.write(p, out),
            Codec::V5(c) => c.write(p, out),
        }
        .map(|_| ())
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
}
