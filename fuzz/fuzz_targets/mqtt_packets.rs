//! The MQTT checks fleetgate makes before rumqttd's router sees a packet:
//! the CONNECT sniff, the session's codec (packet type guard, rumqttd's
//! decoder, the packet size limit), and the topic and filter rules for
//! every role. (It found rumqttd's v5 decoder panicking on a CONNACK with a
//! payload: see broker::mqtt::codec.)
#![no_main]

use bytes::BytesMut;
use broker::mqtt::acl::{provision_request, sniff_connect, Acl, ConnectSniff};
use libfuzzer_sys::fuzz_target;
use provisioning::{DeviceId, Identity, Role};
use broker::mqtt::codec::Codec;
use rumqttd::protocol::Packet;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut codec = match sniff_connect(data) {
        ConnectSniff::Level(l) => Codec::for_level(l),
        _ => Codec::for_level(4),
    };
    let acls = [Role::Device, Role::Service, Role::Claim, Role::Admin].map(|role| {
        Acl::new(&Identity {
            role,
            id: DeviceId::try_new("dev-1").expect("id"),
        })
    });
    let mut buf = BytesMut::from(data);
    for _ in 0..64 {
        let before = buf.len();
        match codec.read(&mut buf, MAX) {
            Ok(Some(Packet::Publish(p, _))) => {
                let topic = String::from_utf8_lossy(&p.topic);
                for acl in &acls {
                    let _ = acl.can_publish(&topic);
                }
                let _ = provision_request(&topic);
            }
            Ok(Some(Packet::Subscribe(s, _))) => {
                for f in &s.filters {
                    for acl in &acls {
                        let _ = acl.can_subscribe(&f.path);
                    }
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
        if buf.is_empty() || buf.len() == before {
            break;
        }
    }
    // The raw bytes as a topic and a filter, too.
    if let Ok(s) = std::str::from_utf8(data) {
        for acl in &acls {
            let _ = acl.can_publish(s);
            let _ = acl.can_subscribe(s);
        }
    }
});
