//! Identity types: parsed once at the edge, valid everywhere after.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The longest device id accepted.
pub const MAX_ID_LEN: usize = 64;

/// A device, service or admin id: `[A-Za-z0-9._-]{1,64}`.
///
/// Holding one proves the string is a valid id, so it can be used as a CN,
/// inside a URI SAN and inside an MQTT topic level without escaping: it has
/// no `/`, `+`, `#`, NUL or spaces.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    pub fn try_new(s: impl Into<String>) -> Result<Self, Error> {
        let s = s.into();
        if s.is_empty() || s.len() > MAX_ID_LEN {
            return Err(Error::InvalidId {
                reason: format!("must be 1 to {MAX_ID_LEN} characters, got {}", s.len()),
            });
        }
        // `.` and `..` alone would be path segments in the CLI's `--out DIR/ID.key`.
        if s == "." || s == ".." {
            return Err(Error::InvalidId {
                reason: "'.' and '..' are not ids".into(),
            });
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(Error::InvalidId {
                reason: format!("character {c:?} is not allowed (use A-Z a-z 0-9 . _ -)"),
            });
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl FromStr for DeviceId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::try_new(s)
    }
}

impl TryFrom<String> for DeviceId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        Self::try_new(s)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

/// What a certificate holder may do. Encoded in the certificate as the URI
/// SAN `urn:fleetgate:<role>:<id>` and recorded in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A device: its own topics only.
    Device,
    /// A backend application: reads all devices' topics, sends commands.
    Service,
    /// An operator: the admin API.
    Admin,
    /// A shared factory claim: may only ask for a device certificate over
    /// MQTT (`$fleetgate/provision/<request-id>`), a limited number of times.
    Claim,
    /// A fleetgate node, as etcd and NATS know it (its id is the
    /// certificate's CN, the user name they map it to): no MQTT, no API.
    Node,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Service => "service",
            Role::Admin => "admin",
            Role::Claim => "claim",
            Role::Node => "node",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "device" => Ok(Role::Device),
            "service" => Ok(Role::Service),
            "admin" => Ok(Role::Admin),
            "claim" => Ok(Role::Claim),
            "node" => Ok(Role::Node),
            other => Err(Error::InvalidInput {
                reason: format!("unknown role {other:?} (device, service, admin, claim, node)"),
            }),
        }
    }
}

/// The identity a certificate names: `urn:fleetgate:<role>:<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub id: DeviceId,
}

pub(crate) const URN_PREFIX: &str = "urn:fleetgate:";

impl Identity {
    pub fn uri(&self) -> String {
        format!("{URN_PREFIX}{}:{}", self.role, self.id)
    }

    /// Parses `urn:fleetgate:<role>:<id>`; `None` for any other URI.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(URN_PREFIX)?;
        let (role, id) = rest.split_once(':')?;
        Some(Self {
            role: role.parse().ok()?,
            id: DeviceId::try_new(id).ok()?,
        })
    }
}

/// A certificate serial number: the DER integer's content bytes, shown as
/// lowercase hex (the form `openssl x509 -serial` prints, less case).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Serial(Vec<u8>);

/// RFC 5280 4.1.2.2: at most 20 octets.
pub const MAX_SERIAL_LEN: usize = 20;

impl Serial {
    /// A fresh random positive 20-octet serial.
    pub fn random() -> Result<Self, Error> {
        let mut bytes = [0u8; MAX_SERIAL_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| Error::Crypto("system random number generator failed".into()))?;
        // Positive (high bit clear) and exactly 20 octets long (no leading zero octet).
        bytes[0] = (bytes[0] & 0x7f).max(1);
        Ok(Self(bytes.to_vec()))
    }

    /// From a certificate's serial bytes (big-endian, as x509-parser gives them).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        // Strip a sign octet so the same number always has the same key.
        let trimmed = match bytes {
            [0, rest @ ..] if !rest.is_empty() => rest,
            other => other,
        };
        if trimmed.is_empty() || trimmed.len() > MAX_SERIAL_LEN {
            return Err(Error::InvalidInput {
                reason: format!("serial of {} octets", bytes.len()),
            });
        }
        Ok(Self(trimmed.to_vec()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Serial {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        let s = s.strip_prefix("0x").unwrap_or(s);
        let bytes = unhex(s).ok_or_else(|| Error::InvalidInput {
            reason: "serial must be hex".into(),
        })?;
        Self::from_bytes(&bytes)
    }
}

impl TryFrom<String> for Serial {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<Serial> for String {
    fn from(s: Serial) -> String {
        s.to_hex()
    }
}

/// A certificate's key in the registry: its serial within its issuer.
///
/// Serials are unique only per issuer (RFC 5280 4.1.2.2): two manufacturers'
/// factories may well both number from 0x1000. The issuer is the pair
/// (manufacturer whose CA the chain runs through, issuer name), hashed into
/// `scope`: the manufacturer part comes from the verified path, so one
/// manufacturer's CA cannot name itself like another's and take its serials.
/// Shown as `<serial hex>:<scope hex>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CertKey {
    pub serial: Serial,
    scope: [u8; CertKey::SCOPE_LEN],
}

impl CertKey {
    const SCOPE_LEN: usize = 16;

    /// The key of `serial` issued by `issuer` (RFC 4514) under `manufacturer`
    /// (`None`: fleetgate's own CAs).
    pub fn new(manufacturer: Option<&str>, issuer: &str, serial: Serial) -> Self {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"fleetgate cert scope v1\0");
        match manufacturer {
            Some(m) => {
                ctx.update(b"m");
                ctx.update(m.as_bytes());
            }
            None => ctx.update(b"-"),
        }
        ctx.update(b"\0");
        ctx.update(issuer.as_bytes());
        let mut scope = [0u8; Self::SCOPE_LEN];
        scope.copy_from_slice(&ctx.finish().as_ref()[..Self::SCOPE_LEN]);
        Self { serial, scope }
    }

    /// The storage key: the serial's length and bytes, then the scope, so
    /// that every certificate with one serial shares a prefix.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Self::serial_prefix(&self.serial);
        out.extend_from_slice(&self.scope);
        out
    }

    /// Whether `other` has the same issuer and manufacturer.
    pub fn same_scope(&self, other: &CertKey) -> bool {
        self.scope == other.scope
    }

    /// The prefix [`CertKey::to_bytes`] gives every key with `serial`.
    pub fn serial_prefix(serial: &Serial) -> Vec<u8> {
        let s = serial.as_bytes();
        let mut out = Vec::with_capacity(1 + s.len() + Self::SCOPE_LEN);
        // At most 20 octets: fits.
        out.push(s.len() as u8);
        out.extend_from_slice(s);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let bad = || Error::Corrupt(format!("certificate key {}", hex(bytes)));
        let (&len, rest) = bytes.split_first().ok_or_else(bad)?;
        let len = usize::from(len);
        if rest.len() != len + Self::SCOPE_LEN {
            return Err(bad());
        }
        let serial = Serial::from_bytes(&rest[..len]).map_err(|_| bad())?;
        let mut scope = [0u8; Self::SCOPE_LEN];
        scope.copy_from_slice(&rest[len..]);
        Ok(Self { serial, scope })
    }
}

impl fmt::Display for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.serial, hex(&self.scope))
    }
}

impl FromStr for CertKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::InvalidInput {
            reason: format!("certificate key {s:?} is not <serial hex>:<scope hex>"),
        };
        let (serial, scope) = s.trim().split_once(':').ok_or_else(bad)?;
        let serial: Serial = serial.parse()?;
        let scope = unhex(scope)
            .and_then(|b| <[u8; Self::SCOPE_LEN]>::try_from(b).ok())
            .ok_or_else(bad)?;
        Ok(Self { serial, scope })
    }
}

impl TryFrom<String> for CertKey {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<CertKey> for String {
    fn from(k: CertKey) -> String {
        k.to_string()
    }
}

/// SHA-256 of a certificate's DER, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// `bytes` in lowercase hex (a fingerprint at every connect: no
/// formatter per byte).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        for ok in ["a", "dev-1", "A.b_c-9", &"x".repeat(64)] {
            assert!(DeviceId::try_new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a/b",
            "a+b",
            "#",
            "a b",
            "é",
            ".",
            "..",
            &"x".repeat(65),
            "a\0",
        ] {
            assert!(DeviceId::try_new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn identity_uri_round_trip() {
        let id = Identity {
            role: Role::Service,
            id: DeviceId::try_new("backend-1").unwrap(),
        };
        assert_eq!(id.uri(), "urn:fleetgate:service:backend-1");
        assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        assert_eq!(Identity::from_uri("urn:fleetgate:root:x"), None);
        assert_eq!(Identity::from_uri("urn:fleetgate:device:a/b"), None);
        assert_eq!(Identity::from_uri("https://example.com"), None);
    }

    #[test]
    fn hex_is_lowercase_two_digits_a_byte_and_round_trips() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(hex(&[]), "");
        let all: Vec<u8> = (0..=255).collect();
        let h = hex(&all);
        let by_formatter: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(h, by_formatter);
        assert_eq!(unhex(&h).unwrap(), all);
    }

    #[test]
    fn serials() {
        let s = Serial::random().unwrap();
        assert_eq!(s.as_bytes().len(), 20);
        assert!(s.as_bytes()[0] & 0x80 == 0 && s.as_bytes()[0] != 0);
        assert_eq!(s.to_hex().parse::<Serial>().unwrap(), s);
        // A DER sign octet does not change the key.
        assert_eq!(Serial::from_bytes(&[0, 0x80, 1]).unwrap().to_hex(), "8001");
        assert!(Serial::from_bytes(&[]).is_err());
        assert!(Serial::from_bytes(&[1; 21]).is_err());
        assert!("zz".parse::<Serial>().is_err());
    }

    #[test]
    fn cert_keys_scope_serials_by_issuer() {
        let s = Serial::from_bytes(&[0x10, 0x00]).unwrap();
        let acme = CertKey::new(Some("acme"), "CN=ca", s.clone());
        let globex = CertKey::new(Some("globex"), "CN=ca", s.clone());
        let ours = CertKey::new(None, "CN=ca", s.clone());
        let other_issuer = CertKey::new(Some("acme"), "CN=ca2", s.clone());
        assert_ne!(acme, globex);
        assert_ne!(acme, ours);
        assert_ne!(acme, other_issuer);
        assert_eq!(acme, CertKey::new(Some("acme"), "CN=ca", s.clone()));
        for k in [&acme, &globex, &ours] {
            assert_eq!(&CertKey::from_bytes(&k.to_bytes()).unwrap(), k);
            assert_eq!(&k.to_string().parse::<CertKey>().unwrap(), k);
            assert!(k.to_bytes().starts_with(&CertKey::serial_prefix(&s)));
        }
        assert!(CertKey::from_bytes(&[2, 1]).is_err());
        assert!("1000".parse::<CertKey>().is_err());
        assert!("1000:zz".parse::<CertKey>().is_err());
    }
}
