//! The device lifecycle, as pure decisions: which status an action moves a
//! device to, and what a certificate's standing is from the facts the
//! store holds. No IO: the registry reads the facts, calls these, and
//! writes the outcome in one commit.
//!
//! ```text
//!            approve                suspend
//!  pending ----------> active <-----------------> suspended
//!     |                  |        resume              |
//!     +------------------+---- revoke ----------------+--> revoked (final)
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{DeviceId, Error};

/// A device's standing. `Revoked` is final. `Pending` is a device that
/// registered itself on first connect (just-in-time) under a manufacturer
/// whose policy wants an operator's approval first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Suspended,
    Revoked,
    Pending,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Active,
        Status::Suspended,
        Status::Revoked,
        Status::Pending,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Suspended => "suspended",
            Status::Revoked => "revoked",
            Status::Pending => "pending",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for Status {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "active" => Ok(Status::Active),
            "suspended" => Ok(Status::Suspended),
            "revoked" => Ok(Status::Revoked),
            "pending" => Ok(Status::Pending),
            other => Err(Error::InvalidInput {
                reason: format!("unknown status {other:?} (active, suspended, revoked, pending)"),
            }),
        }
    }
}

/// RFC 5280 5.3.1 CRLReason, less the two that are not revocations
/// (certificateHold is what suspension means; removeFromCRL is resume).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationReason {
    Unspecified,
    KeyCompromise,
    CaCompromise,
    AffiliationChanged,
    Superseded,
    CessationOfOperation,
    PrivilegeWithdrawn,
    AaCompromise,
}

impl RevocationReason {
    pub const ALL: [RevocationReason; 8] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::CaCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
        Self::PrivilegeWithdrawn,
        Self::AaCompromise,
    ];

    /// The CRLReason code.
    pub fn code(self) -> u8 {
        match self {
            Self::Unspecified => 0,
            Self::KeyCompromise => 1,
            Self::CaCompromise => 2,
            Self::AffiliationChanged => 3,
            Self::Superseded => 4,
            Self::CessationOfOperation => 5,
            Self::PrivilegeWithdrawn => 9,
            Self::AaCompromise => 10,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "key-compromise",
            Self::CaCompromise => "ca-compromise",
            Self::AffiliationChanged => "affiliation-changed",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessation-of-operation",
            Self::PrivilegeWithdrawn => "privilege-withdrawn",
            Self::AaCompromise => "aa-compromise",
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for RevocationReason {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| Error::InvalidInput {
                reason: format!(
                    "unknown revocation reason {s:?} (one of: {})",
                    Self::ALL.map(|r| r.as_str()).join(", ")
                ),
            })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub reason: RevocationReason,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// What the registry says of a certificate, for admission and status answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    Good,
    /// The device is suspended (an OCSP/CRL "certificateHold").
    Suspended,
    /// The device registered itself and awaits approval (also a hold).
    Pending,
    Revoked(Revocation),
}

/// What an operator (or the broker) does to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Suspend,
    Resume,
    /// Lets a device that registered itself just in time in.
    Approve,
    Revoke,
}

impl Action {
    pub const ALL: [Action; 4] = [Self::Suspend, Self::Resume, Self::Approve, Self::Revoke];

    /// Its name, as the audit log and errors say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Suspend => "suspend",
            Self::Resume => "resume",
            Self::Approve => "approve",
            Self::Revoke => "revoke",
        }
    }

    /// The statuses it applies to, and the status it leads to.
    fn rule(self) -> (&'static [Status], Status) {
        use Status::*;
        match self {
            Self::Suspend => (&[Active], Suspended),
            Self::Resume => (&[Suspended], Active),
            Self::Approve => (&[Pending], Active),
            Self::Revoke => (&[Active, Suspended, Pending], Revoked),
        }
    }
}

/// The status `action` moves device `id` from `status` to, or why it
/// cannot (revoked is final; resume only undoes a suspension; ...).
pub fn transition(id: &DeviceId, status: Status, action: Action) -> Result<Status, Error> {
    let (from, to) = action.rule();
    if from.contains(&status) {
        Ok(to)
    } else {
        Err(Error::InvalidTransition {
            id: id.to_string(),
            status: status.as_str(),
            action: action.as_str(),
        })
    }
}

/// What a certificate's standing depends on, as the store holds it.
#[derive(Clone, Copy, Debug)]
pub struct StandingFacts {
    /// The certificate's own revocation.
    pub certificate: Option<Revocation>,
    /// The revocation of a manufacturer it falls with (its signer's or its
    /// device's), if one is revoked.
    pub manufacturer: Option<Revocation>,
    /// Its device's status (mirrored on the certificate).
    pub device_status: Status,
    /// Its device's revocation, if the device is revoked.
    pub device: Option<Revocation>,
    /// When the certificate's validity began: the revocation time of a
    /// revoked device whose record lost it.
    pub not_before: OffsetDateTime,
}

/// A certificate's standing: its own revocation first, then its
/// manufacturer's, then its device's status. Validity dates are checked by
/// whoever verifies the chain.
pub fn standing(f: &StandingFacts) -> Standing {
    if let Some(r) = f.certificate.or(f.manufacturer) {
        return Standing::Revoked(r);
    }
    match f.device_status {
        Status::Active => Standing::Good,
        Status::Suspended => Standing::Suspended,
        Status::Pending => Standing::Pending,
        Status::Revoked => Standing::Revoked(f.device.unwrap_or(Revocation {
            reason: RevocationReason::Unspecified,
            at: f.not_before,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition_as_the_diagram_says() {
        use Action::*;
        use Status::*;
        let id = DeviceId::try_new("d-1").unwrap();
        let allowed = [
            (Active, Suspend, Suspended),
            (Suspended, Resume, Active),
            (Pending, Approve, Active),
            (Active, Revoke, Revoked),
            (Suspended, Revoke, Revoked),
            (Pending, Revoke, Revoked),
        ];
        for from in [Active, Suspended, Pending, Revoked] {
            for action in Action::ALL {
                let want = allowed
                    .iter()
                    .find(|(f, a, _)| *f == from && *a == action)
                    .map(|(_, _, to)| *to);
                match (transition(&id, from, action), want) {
                    (Ok(to), Some(w)) => assert_eq!(to, w, "{from} {action:?}"),
                    (
                        Err(Error::InvalidTransition {
                            status, action: a, ..
                        }),
                        None,
                    ) => {
                        assert_eq!((status, a), (from.as_str(), action.as_str()));
                    }
                    (got, want) => panic!("{from} {action:?}: {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn standing_takes_the_certificate_then_the_manufacturer_then_the_device() {
        let at = |s| OffsetDateTime::from_unix_timestamp(s).unwrap();
        let r = |reason, s| Revocation { reason, at: at(s) };
        let base = StandingFacts {
            certificate: None,
            manufacturer: None,
            device_status: Status::Active,
            device: None,
            not_before: at(100),
        };
        assert_eq!(standing(&base), Standing::Good);
        let suspended = StandingFacts {
            device_status: Status::Suspended,
            ..base
        };
        assert_eq!(standing(&suspended), Standing::Suspended);
        let pending = StandingFacts {
            device_status: Status::Pending,
            ..base
        };
        assert_eq!(standing(&pending), Standing::Pending);
        let by_device = StandingFacts {
            device_status: Status::Revoked,
            device: Some(r(RevocationReason::Superseded, 300)),
            ..base
        };
        assert_eq!(
            standing(&by_device),
            Standing::Revoked(r(RevocationReason::Superseded, 300))
        );
        // A revoked device whose revocation was lost: unspecified, at the
        // certificate's start.
        let lost = StandingFacts {
            device: None,
            ..by_device
        };
        assert_eq!(
            standing(&lost),
            Standing::Revoked(r(RevocationReason::Unspecified, 100))
        );
        let by_manufacturer = StandingFacts {
            manufacturer: Some(r(RevocationReason::CaCompromise, 200)),
            ..by_device
        };
        assert_eq!(
            standing(&by_manufacturer),
            Standing::Revoked(r(RevocationReason::CaCompromise, 200))
        );
        let by_certificate = StandingFacts {
            certificate: Some(r(RevocationReason::KeyCompromise, 150)),
            ..by_manufacturer
        };
        assert_eq!(
            standing(&by_certificate),
            Standing::Revoked(r(RevocationReason::KeyCompromise, 150))
        );
    }
}
