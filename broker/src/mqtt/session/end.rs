//! Why a session ended, and what that tells the client (the DISCONNECT
//! reason code and string) and the router.

use super::*;

/// Why a session ended.
#[derive(Debug)]
pub(super) enum End {
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
    pub(super) fn reason(&self) -> Option<DisconnectReasonCode> {
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
    pub(super) fn reason_string(&self) -> Option<String> {
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
    pub(super) fn router_session_live(&self) -> bool {
        !matches!(
            self,
            End::TakenOver | End::RouterDisconnect | End::ClientDisconnect { .. }
        )
    }
}

pub(super) fn normal_disconnect() -> Disconnect {
    Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    }
}
