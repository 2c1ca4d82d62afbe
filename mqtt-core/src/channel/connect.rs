//! CONNECT: which codec, whether the client may have this session, and on
//! what terms (session expiry, windows, limits); the CONNACK that says so.
//! Pure: the identity comes from admission, the packet from the wire.

use bytes::BytesMut;
use provisioning::{Identity, Role};
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, LastWill, Packet,
};

use crate::acl::{sniff_connect, topic_name_problem, Acl, ConnectSniff, TopicProblem};
use crate::codec::Codec;
use crate::Refusal;

/// The longest session expiry granted (MQTT 5 Session Expiry Interval, or
/// a 3.1.1 persistent session): a week.
pub const MAX_SESSION_EXPIRY: u32 = 7 * 24 * 3600;

/// The most QoS 1 and 2 messages in flight to a client at once, whatever
/// Receive Maximum it allows.
pub const MAX_IN_FLIGHT: u16 = 100;

/// The first packet, once it is all there: the codec its protocol level
/// asks for, and the CONNECT. `Ok(None)`: more bytes needed.
pub fn first_packet(
    buf: &mut BytesMut,
    max_packet: usize,
) -> Result<Option<(Codec, Packet)>, String> {
    match sniff_connect(buf) {
        ConnectSniff::Incomplete => Ok(None),
        ConnectSniff::NotConnect(why) => Err(why.to_owned()),
        ConnectSniff::Level(level) => {
            let mut codec = Codec::for_level(level);
            match codec.read(buf, max_packet) {
                Ok(Some(p @ Packet::Connect(..))) => Ok(Some((codec, p))),
                Ok(Some(_)) => Err("first packet is not CONNECT".into()),
                Ok(None) => Ok(None),
                Err(e) => Err(format!("malformed CONNECT: {e}")),
            }
        }
    }
}

/// What the server grants a CONNECT it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terms {
    /// The client id was empty: the server assigns the certificate's.
    pub assigned: bool,
    /// Clean session (3.1.1) or clean start (5).
    pub clean: bool,
    /// What the client asked of the session's expiry, in seconds (`None`:
    /// it ends with the connection).
    pub asked_expiry: Option<u32>,
    /// What it gets: at most [`MAX_SESSION_EXPIRY`].
    pub expiry: Option<u32>,
    /// QoS 1 and 2 messages in flight to it at most.
    pub receive_maximum: u16,
    /// The client's Maximum Packet Size (`usize::MAX`: none).
    pub client_max_packet: usize,
    /// It takes reason strings (MQTT 5 Request Problem Information).
    pub problem_info: bool,
    /// Keep-alive, in seconds (0: none).
    pub keep_alive: u16,
}

impl Terms {
    /// Whether the session is one to keep while the connection lasts: it
    /// resumes an earlier one (no clean start) or outlives the connection
    /// (an expiry). A store with one flag for both (rumqttd's clean
    /// session) keeps it then, and the driver ends it after the connection
    /// if the expiry it ends with is none (MQTT 5 3.1.2.4, 3.1.2.11.2: a
    /// resumed session with expiry 0 ends with this connection).
    pub fn keeps_session(&self) -> bool {
        !self.clean || self.expiry.is_some()
    }

    /// What holds until a CONNECT is accepted: nothing kept, nothing
    /// asked.
    pub fn before_connect() -> Self {
        Terms {
            assigned: false,
            clean: true,
            asked_expiry: None,
            expiry: None,
            receive_maximum: MAX_IN_FLIGHT,
            client_max_packet: usize::MAX,
            problem_info: true,
            keep_alive: 0,
        }
    }
}

/// A CONNECT refused: what to count, say in the log, and tell the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    /// The CONNACK's code; `None`: no CONNACK, the connection just closes
    /// (3.1.1 has no code for it).
    pub code: Option<ConnectReturnCode>,
    /// Why, for the log and an MQTT 5 reason string.
    pub why: String,
}

/// Decides a CONNECT for the client `identity` names.
pub fn decide(
    identity: &Identity,
    connect: &Connect,
    props: Option<&ConnectProperties>,
    will: Option<&LastWill>,
    v5: bool,
) -> Result<Terms, Refused> {
    // The certificate names the client. (Claims are shared by many devices
    // at once, so they keep whatever client id they chose.)
    let id = identity.id.as_str();
    let assigned = connect.client_id.is_empty();
    if !assigned && connect.client_id != id && identity.role != Role::Claim {
        return Err(Refused {
            refusal: Refusal::WrongIdentity,
            code: Some(ConnectReturnCode::NotAuthorized),
            why: format!(
                "the client id must be the certificate's id, {id}, or empty (the server assigns it)"
            ),
        });
    }
    if let Some(w) = will {
        // MQTT 1.5.4-1, 3.1.3.3: a will topic is a topic name.
        if let Some((problem, why)) = topic_name_problem(&w.topic) {
            let code = match problem {
                TopicProblem::Malformed => ConnectReturnCode::MalformedPacket,
                TopicProblem::Invalid => ConnectReturnCode::TopicNameInvalid,
            };
            return Err(Refused {
                refusal: Refusal::Protocol,
                code: v5.then_some(code),
                why: format!("last will topic: {why}"),
            });
        }
        let topic = String::from_utf8_lossy(&w.topic);
        if let Err(why) = Acl::new(identity).can_publish(&topic) {
            return Err(Refused {
                refusal: Refusal::Acl,
                code: Some(ConnectReturnCode::NotAuthorized),
                why: format!("last will: {why}"),
            });
        }
    }
    // How long the session outlives the connection: 3.1.1 clean_session=0
    // keeps it (for the broker's bound), MQTT 5 says so in its CONNECT.
    let asked_expiry = if v5 {
        props
            .and_then(|p| p.session_expiry_interval)
            .filter(|e| *e > 0)
    } else {
        (!connect.clean_session).then_some(u32::MAX)
    };
    Ok(Terms {
        assigned,
        clean: connect.clean_session,
        asked_expiry,
        expiry: asked_expiry.map(|e| e.min(MAX_SESSION_EXPIRY)),
        receive_maximum: props
            .and_then(|p| p.receive_maximum)
            .unwrap_or(u16::MAX)
            .min(MAX_IN_FLIGHT),
        client_max_packet: props
            .and_then(|p| p.max_packet_size)
            .map_or(usize::MAX, |m| m as usize),
        problem_info: props.is_none_or(|p| p.request_problem_info != Some(0)),
        keep_alive: connect.keep_alive,
    })
}

/// The CONNACK's code for a client admission refused.
pub fn refusal_code(r: Refusal, v5: bool) -> ConnectReturnCode {
    match (r, v5) {
        (Refusal::JitRateLimited | Refusal::JitQuotaExceeded, true) => {
            ConnectReturnCode::QuotaExceeded
        }
        (Refusal::JitRateLimited | Refusal::JitQuotaExceeded, false) => {
            ConnectReturnCode::ServiceUnavailable
        }
        _ => ConnectReturnCode::NotAuthorized,
    }
}

/// The CONNACK accepting a client on `terms`.
pub fn connack(
    terms: &Terms,
    session_present: bool,
    v5: bool,
    max_packet: usize,
    id: &str,
    topic_alias_max: u16,
) -> Packet {
    let props = v5.then(|| ConnAckProperties {
        assigned_client_identifier: terms.assigned.then(|| id.to_owned()),
        max_packet_size: u32::try_from(max_packet).ok(),
        topic_alias_max: Some(topic_alias_max),
        // Said only when it differs from what the client asked.
        session_expiry_interval: (terms.asked_expiry != terms.expiry)
            .then_some(terms.expiry.unwrap_or(0)),
        ..ConnAckProperties::default()
    });
    Packet::ConnAck(
        ConnAck {
            // MQTT 3.2.2.1.1: never present on a clean start.
            session_present: session_present && !terms.clean,
            code: ConnectReturnCode::Success,
        },
        props,
    )
}

/// A CONNACK refusing with `code` (and on MQTT 5 `why` as its reason
/// string).
pub fn refusal(code: ConnectReturnCode, why: Option<String>, v5: bool) -> Packet {
    let props = why.filter(|_| v5).map(|why| ConnAckProperties {
        reason_string: Some(why),
        ..ConnAckProperties::default()
    });
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        props,
    )
}
