//! Hand-made MQTT 3.1.1 packets, for load runs and misbehaving devices that
//! must send exact bytes (a client library would not send a bad packet).

/// CONNECT: clean session, keep-alive 30 s, no will, no login.
pub fn connect(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id);
    packet(0x10, &body)
}

/// PUBLISH at QoS 0.
pub fn publish(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

/// DISCONNECT.
pub const DISCONNECT: [u8; 2] = [0xe0, 0x00];

/// A fixed header (type byte, variable-length remaining length) and body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        assert_eq!(
            connect("a"),
            [0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 1, b'a']
        );
        assert_eq!(publish("t", b"x"), [0x30, 4, 0, 1, b't', b'x']);
        // 300 bytes of body: remaining length 0xac 0x02.
        let p = publish("t", &[0; 297]);
        assert_eq!(&p[..3], &[0x30, 0xac, 0x02]);
        assert_eq!(p.len(), 3 + 300);
    }
}
