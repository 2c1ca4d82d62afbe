//! Why a session ended, and what that tells the client (the DISCONNECT
//! reason code and string) and the router.

use rumqttd::protocol::{Disconnect, DisconnectReasonCode};

use crate::Kick;

/// Why a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client sent DISCONNECT: no will, unless its reason code was
    /// 0x04, Disconnect with Will Message (MQTT 5 3.14.4).
    ClientDisconnect {
        will: bool,
    },
    /// The socket closed or failed without DISCONNECT.
    Closed(String),
    KeepAlive,
    Kicked(Kick),
    CertificateExpired,
    Shutdown,
    Acl(String),
    Protocol(String),
    /// A protocol error with its own MQTT 5 reason code (malformed, topic
    /// name or alias invalid, packet too large).
    Violation(DisconnectReasonCode, String),
    /// The router dropped our link: a newer connection took the client id.
    TakenOver,
    /// The router sent DISCONNECT.
    RouterDisconnect,
}

impl End {
    /// The MQTT 5 DISCONNECT reason we send, if any.
    pub fn reason(&self) -> Option<DisconnectReasonCode> {
        use DisconnectReasonCode as R;
        match self {
            End::ClientDisconnect { .. } | End::Closed(_) | End::RouterDisconnect => None,
            End::KeepAlive => Some(R::KeepAliveTimeout),
            End::Kicked(_) => Some(R::AdministrativeAction),
            End::CertificateExpired => Some(R::MaximumConnectTime),
            End::Shutdown => Some(R::ServerShuttingDown),
            End::Acl(_) => Some(R::NotAuthorized),
            End::Protocol(_) => Some(R::ProtocolError),
            End::Violation(code, _) => Some(*code),
            End::TakenOver => Some(R::SessionTakenOver),
        }
    }

    /// What the DISCONNECT's reason string says (MQTT 5 3.14.2.2.3).
    pub fn reason_string(&self) -> Option<String> {
        match self {
            End::KeepAlive => Some("nothing received within 1.5 keep-alive periods".into()),
            End::Kicked(k) => Some(k.as_str().into()),
            End::CertificateExpired => Some("the client certificate expired".into()),
            End::Shutdown => Some("the server is shutting down".into()),
            End::Acl(why) | End::Protocol(why) | End::Violation(_, why) => Some(why.clone()),
            End::TakenOver => Some("a newer connection of this client took the session".into()),
            End::ClientDisconnect { .. } | End::Closed(_) | End::RouterDisconnect => None,
        }
    }

    /// Whether the router session is still ours to end.
    pub fn router_session_live(&self) -> bool {
        !matches!(
            self,
            End::TakenOver | End::RouterDisconnect | End::ClientDisconnect { .. }
        )
    }
}

pub fn normal_disconnect() -> Disconnect {
    Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_end_sends_no_disconnect_and_a_server_end_says_why() {
        // What the client ended, or a dead socket: nothing to send.
        for e in [
            End::ClientDisconnect { will: false },
            End::Closed("reset".into()),
            End::RouterDisconnect,
        ] {
            assert_eq!(e.reason(), None, "{e:?}");
            assert_eq!(e.reason_string(), None, "{e:?}");
        }
        let said = |e: End| (e.reason(), e.reason_string());
        assert_eq!(
            said(End::Acl("devices/dev-2/t is not yours".into())),
            (
                Some(DisconnectReasonCode::NotAuthorized),
                Some("devices/dev-2/t is not yours".into())
            )
        );
        assert_eq!(
            said(End::KeepAlive).0,
            Some(DisconnectReasonCode::KeepAliveTimeout)
        );
        assert_eq!(
            said(End::Shutdown).0,
            Some(DisconnectReasonCode::ServerShuttingDown)
        );
        assert_eq!(
            said(End::CertificateExpired).0,
            Some(DisconnectReasonCode::MaximumConnectTime)
        );
        assert_eq!(
            said(End::TakenOver).0,
            Some(DisconnectReasonCode::SessionTakenOver)
        );
        assert_eq!(
            said(End::Protocol("bad".into())).0,
            Some(DisconnectReasonCode::ProtocolError)
        );
    }

    #[test]
    fn a_kick_is_an_administrative_action_naming_its_cause() {
        let e = End::Kicked(Kick::Revoked);
        assert_eq!(e.reason(), Some(DisconnectReasonCode::AdministrativeAction));
        assert_eq!(e.reason_string().as_deref(), Some(Kick::Revoked.as_str()));
    }

    #[test]
    fn a_violation_carries_its_own_code() {
        let e = End::Violation(DisconnectReasonCode::PacketTooLarge, "4 MiB".into());
        assert_eq!(e.reason(), Some(DisconnectReasonCode::PacketTooLarge));
        assert_eq!(e.reason_string().as_deref(), Some("4 MiB"));
    }

    #[test]
    fn the_router_session_is_left_alone_when_someone_else_ended_it() {
        assert!(!End::TakenOver.router_session_live());
        assert!(!End::RouterDisconnect.router_session_live());
        assert!(!End::ClientDisconnect { will: true }.router_session_live());
        assert!(End::KeepAlive.router_session_live());
        assert!(End::Closed("eof".into()).router_session_live());
    }
}
