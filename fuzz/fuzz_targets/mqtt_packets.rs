//! The MQTT checks fleetgate makes before rumqttd's router sees a packet:
//! the CONNECT sniff, the codec with the packet size limit, and the topic
//! and filter rules for every role.
#![no_main]

use bytes::BytesMut;
use broker::mqtt::acl::{provision_request, sniff_connect, Acl, ConnectSniff};
use libfuzzer_sys::fuzz_target;
use provisioning::{DeviceId, Identity, Role};
use rumqttd::protocol::{Packet, Protocol};

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let level = match sniff_connect(data) {
        ConnectSniff::Level(l) => l,
        _ => 4,
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
        let packet = if level == 5 {
            rumqttd::protocol::v5::V5.read_mut(&mut buf, MAX)
        } else {
            rumqttd::protocol::v4::V4.read_mut(&mut buf, MAX)
        };
        match packet {
            Ok(Packet::Publish(p, _)) => {
                let topic = String::from_utf8_lossy(&p.topic);
                for acl in &acls {
                    let _ = acl.can_publish(&topic);
                }
                let _ = provision_request(&topic);
            }
            Ok(Packet::Subscribe(s, _)) => {
                for f in &s.filters {
                    for acl in &acls {
                        let _ = acl.can_subscribe(&f.path);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => break,
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
