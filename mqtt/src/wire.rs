//! How a provisioning error reads on the wire: one table for every front
//! (the admin API's HTTP status and code, the MQTT provisioning replies'
//! code), so that the same refusal has the same name everywhere and the
//! fronts need not import each other.

use provisioning::Error;

/// An error as a front says it: its HTTP status, its stable code, and a
/// message safe to send (internal details go to the log only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

/// The wire form of `e`. Storage, IO and internal errors are logged here
/// with their detail and sent without it.
pub fn of(e: &Error) -> Wire {
    let said = |status: u16, code: &'static str| Wire {
        status,
        code,
        message: e.to_string(),
    };
    match e {
        Error::InvalidId { .. } => said(400, "invalid_id"),
        Error::InvalidInput { .. } => said(400, "invalid_input"),
        Error::MalformedCsr { .. } => said(400, "malformed_csr"),
        Error::CsrBadSignature => said(400, "csr_bad_signature"),
        Error::CsrWeakSignature { .. } => said(400, "csr_weak_signature"),
        Error::UnsupportedKey { .. } => said(400, "unsupported_key"),
        Error::TooLarge { .. } => said(413, "too_large"),
        Error::NotFound { .. } => said(404, "device_not_found"),
        Error::CertNotFound { .. } => said(404, "certificate_not_found"),
        Error::AlreadyExists { .. } | Error::CertExists { .. } => said(409, "already_exists"),
        Error::InvalidTransition { .. } => said(409, "invalid_transition"),
        Error::ManufacturerNotFound { .. } => said(404, "manufacturer_not_found"),
        Error::ManufacturerRevoked { .. } => said(409, "manufacturer_revoked"),
        Error::ProofOfPossession { .. } => said(400, "proof_of_possession_failed"),
        Error::ClaimExhausted { .. } => said(409, "claim_exhausted"),
        Error::QuotaExceeded { .. } => said(429, "quota_exceeded"),
        // Says which ceremony command does it instead.
        Error::RootOffline { .. } => said(409, "root_offline"),
        Error::NotKept { .. } => said(404, "not_kept"),
        Error::Unavailable(_) => {
            tracing::error!(error = %e, "registry store unavailable: nothing was changed or acknowledged");
            Wire {
                status: 503,
                code: "storage_unavailable",
                message: "the shared registry store (etcd) cannot be reached or has no quorum; \
                          the change was not acknowledged. Try again."
                    .into(),
            }
        }
        // Says by how much and against which node: nothing secret.
        Error::ClockSkew(_) => {
            tracing::error!(error = %e, "refused to issue: this node's clock is off");
            said(503, "clock_skew")
        }
        Error::Storage(_) | Error::Io { .. } => {
            tracing::error!(error = %e, "registry write failed: nothing was changed or acknowledged");
            Wire {
                status: 503,
                code: "storage_unavailable",
                message: "the registry cannot write to disk (full or read-only?); the change was \
                          not acknowledged. See the server log."
                    .into(),
            }
        }
        _ => {
            // Corrupt records, certificates, crypto: the detail goes to the
            // log, not the wire.
            tracing::error!(error = %e, "internal error");
            Wire {
                status: 500,
                code: "internal",
                message: "internal error; see the server log".into(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_details_stay_off_the_wire() {
        let w = of(&Error::Crypto("token PIN 1234 rejected".into()));
        assert_eq!((w.status, w.code), (500, "internal"));
        assert!(!w.message.contains("1234"));
        let w = of(&Error::ClaimExhausted {
            id: "line-3".into(),
        });
        assert_eq!((w.status, w.code), (409, "claim_exhausted"));
        assert!(w.message.contains("line-3"));
    }
}
