//! fleetgate's provisioning core: the CA, the device registry and enrollment.
//!
//! Invariant: nothing here opens a socket. Callers (the `broker` crate) own
//! the network and map [`Error`] to wire codes. File IO is limited to the data
//! dir ([`ca::Paths`]) and the sled registry inside it.

pub mod authority;
pub mod ca;
pub mod ceremony;
pub mod clock;
pub mod cmp;
pub mod crl;
pub mod csr;
mod error;
pub mod est;
pub mod events;
mod files;
pub mod id;
pub mod integrity;
pub mod keys;
pub mod lifecycle;
pub mod ocsp;
pub mod pem;
mod printable;
pub mod registry;
pub mod sessions;
pub mod store;

pub use authority::{manufacturer, rollover, Authority};
pub use ca::{Ca, InitOptions, IssuedCert, DEFAULT_CERT_LIFETIME};
pub use error::Error;
pub use id::{CertKey, DeviceId, Identity, Role, Serial};
pub use lifecycle::{Revocation, RevocationReason, Standing, Status};
pub use printable::{printable, Printable};
pub use registry::{
    AuditEntry, BulkRevocation, CertRecord, CertView, DeviceRecord, DeviceView, NewDevice, Registry,
};

/// An enrollment: who the certificate is for, and the device's CSR.
#[derive(Clone, Debug)]
pub struct EnrollRequest {
    pub id: DeviceId,
    pub role: Role,
    pub manufacturer: Option<String>,
    /// PEM or DER.
    pub csr: Vec<u8>,
    pub lifetime: time::Duration,
}

impl Authority {
    /// Registers a new device and issues its first certificate from its CSR.
    /// Durable when it returns.
    pub fn enroll(
        &self,
        req: &EnrollRequest,
        actor: &str,
    ) -> Result<(DeviceRecord, IssuedCert), Error> {
        self.enroll_key(req, &csr::validate_csr(&req.csr)?, actor)
    }

    /// [`Authority::enroll`] of a key already checked (CMP's proof of
    /// possession): `req.csr` is not read.
    pub fn enroll_key(
        &self,
        req: &EnrollRequest,
        csr: &csr::ValidatedCsr,
        actor: &str,
    ) -> Result<(DeviceRecord, IssuedCert), Error> {
        // Checked again inside the transaction; this only saves a signature.
        if self.registry.device(&req.id).is_ok() {
            return Err(Error::AlreadyExists {
                id: req.id.to_string(),
            });
        }
        let identity = Identity {
            role: req.role,
            id: req.id.clone(),
        };
        // A device of a manufacturer fleetgate issued a CA for is signed by
        // that CA, so that revoking the manufacturer takes it along.
        let signer = self.signer_for(req.manufacturer.as_deref())?;
        let cert = self
            .ca
            .issue_by(signer.as_deref(), &csr.public_key, &identity, req.lifetime)?;
        let new = NewDevice {
            id: req.id.clone(),
            role: req.role,
            manufacturer: req.manufacturer.clone(),
        };
        let device = self.registry.enroll(&new, &cert, actor)?;
        tracing::info!(device.id = %req.id, role = %req.role, serial = %cert.serial, key = %csr.key_kind, "enrolled");
        Ok((device, cert))
    }

    /// Issues an additional certificate to an active device from a new CSR.
    /// Its other certificates stay valid until revoked or expired.
    pub fn rotate(
        &self,
        id: &DeviceId,
        csr_bytes: &[u8],
        lifetime: time::Duration,
        actor: &str,
    ) -> Result<(DeviceRecord, IssuedCert), Error> {
        self.rotate_key(id, &csr::validate_csr(csr_bytes)?, lifetime, actor)
    }

    /// [`Authority::rotate`] to a key already checked.
    pub fn rotate_key(
        &self,
        id: &DeviceId,
        csr: &csr::ValidatedCsr,
        lifetime: time::Duration,
        actor: &str,
    ) -> Result<(DeviceRecord, IssuedCert), Error> {
        let device = self.registry.device(id)?;
        if device.status != Status::Active {
            return Err(Error::InvalidTransition {
                id: id.to_string(),
                status: device.status.as_str(),
                action: "rotate",
            });
        }
        let identity = Identity {
            role: device.role,
            id: id.clone(),
        };
        // The device keeps its signer: a manufacturer's device is signed by
        // that manufacturer's CA again when fleetgate holds its key. (A
        // registered manufacturer's CA signs only at the factory; fleetgate's
        // own CA signs instead, and the new certificate still falls with
        // the manufacturer: its record mirrors the device's manufacturer.)
        let signer = match device.manufacturer.as_deref() {
            Some(m) => {
                let rec = self.known_manufacturer(m)?;
                if rec.status == manufacturer::ManufacturerStatus::Revoked {
                    return Err(Error::ManufacturerRevoked { name: m.to_owned() });
                }
                self.held_signer(&rec)?
            }
            None => None,
        };
        let cert = self
            .ca
            .issue_by(signer.as_deref(), &csr.public_key, &identity, lifetime)?;
        let device = self.registry.add_certificate(id, &cert, actor)?;
        tracing::info!(device.id = %id, serial = %cert.serial, "rotated");
        Ok((device, cert))
    }
}
