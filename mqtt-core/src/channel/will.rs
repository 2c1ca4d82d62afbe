//! The last will: whether a connection's end sends it, after what delay,
//! and the PUBLISH it becomes.

use std::time::Duration;

use bytes::Bytes;
use rumqttd::protocol::{LastWill, LastWillProperties, Publish, PublishProperties};

use super::End;

/// The longest MQTT 5 will delay honoured.
pub const MAX_WILL_DELAY: Duration = Duration::from_secs(24 * 3600);

/// A will to publish.
#[derive(Debug, PartialEq, Eq)]
pub struct Will {
    /// Wait this long first; a new connection of the client within it
    /// cancels the will (MQTT 5 3.1.3.2.2).
    pub delay: Option<Duration>,
    pub topic: Bytes,
    pub publish: Publish,
    pub props: Option<PublishProperties>,
}

/// Whether a connection's end is unclean: the will goes out (not after a
/// normal DISCONNECT, a takeover or a kick).
pub fn sends_will(end: &End) -> bool {
    matches!(
        end,
        End::ClientDisconnect { will: true }
            | End::Closed(_)
            | End::KeepAlive
            | End::CertificateExpired
            | End::Shutdown
            | End::Acl(_)
            | End::Protocol(_)
            | End::Violation(..)
    )
}

/// The will a connection that ended with `end` sends, if any. It waits
/// out its delay or the session's end (`expiry`, seconds), whichever is
/// first (MQTT 5 3.1.3.2.2), and at most [`MAX_WILL_DELAY`].
pub fn plan(
    end: &End,
    will: Option<LastWill>,
    props: Option<LastWillProperties>,
    expiry: Option<u32>,
) -> Option<Will> {
    let will = will.filter(|_| sends_will(end))?;
    let delay = props
        .as_ref()
        .and_then(|p| p.delay_interval)
        .map(|secs| secs.min(expiry.unwrap_or(0)))
        .map(|secs| Duration::from_secs(secs.into()).min(MAX_WILL_DELAY))
        .filter(|d| !d.is_zero());
    let props = props.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        ..PublishProperties::default()
    });
    let LastWill {
        topic,
        message,
        retain,
        qos,
    } = will;
    let publish = crate::outbox::publish(&topic, &message, qos as u8, 1, false, retain);
    Some(Will {
        delay,
        topic,
        publish,
        props,
    })
}
