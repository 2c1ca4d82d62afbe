//! RFC 7512 `pkcs11:` URIs: which module, which token, which object.
//!
//! ```text
//! pkcs11:token=fleetgate;object=issuing-ca?module-path=/usr/lib/softhsm/libsofthsm2.so
//! ```
//!
//! Path attributes (`;`-separated) name the token and the object; query
//! attributes (`&`-separated) say how to reach it. Values are
//! percent-decoded. A PIN never travels in a URI fleetgate records: a
//! `pin-value` is refused, and `pin-source` (a file) is kept as written.

use std::fmt;
use std::path::PathBuf;

use crate::Error;

/// A parsed `pkcs11:` URI naming one key.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenUri {
    /// The PKCS#11 module to load (`module-path`).
    pub module: PathBuf,
    /// The token's label (`token`).
    pub token: String,
    /// The key's label (`object`).
    pub object: String,
    /// The key's CKA_ID (`id`), if named.
    pub id: Option<Vec<u8>>,
    /// Where the PIN is (`pin-source`, a file path or `file:` URI).
    pub pin_source: Option<PathBuf>,
}

impl fmt::Debug for TokenUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for TokenUri {
    /// The URI, re-encoded: what fleetgate records and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pkcs11:token={};object={}",
            encode(self.token.as_bytes()),
            encode(self.object.as_bytes())
        )?;
        if let Some(id) = &self.id {
            write!(f, ";id={}", encode_all(id))?;
        }
        write!(
            f,
            "?module-path={}",
            encode(self.module.to_string_lossy().as_bytes())
        )?;
        if let Some(pin) = &self.pin_source {
            write!(
                f,
                "&pin-source={}",
                encode(pin.to_string_lossy().as_bytes())
            )?;
        }
        Ok(())
    }
}

fn bad(uri: &str, why: impl fmt::Display) -> Error {
    Error::InvalidInput {
        reason: format!("key URI {uri:?}: {why}"),
    }
}

impl TokenUri {
    /// Parses a URI that names a key: `token`, `object` and `module-path`
    /// are required; attributes fleetgate does not use are refused rather
    /// than ignored (a misspelt `objcet=` must not pick some other key).
    pub fn parse(uri: &str) -> Result<Self, Error> {
        let rest = uri
            .strip_prefix("pkcs11:")
            .ok_or_else(|| bad(uri, "does not start with pkcs11:"))?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut token = None;
        let mut object = None;
        let mut id = None;
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| bad(uri, format!("path attribute {attr:?} has no '='")))?;
            let v = decode(v).map_err(|e| bad(uri, e))?;
            match k {
                "token" => token = Some(text(uri, k, v)?),
                "object" => object = Some(text(uri, k, v)?),
                "id" => id = Some(v),
                // Narrowing attributes a token always satisfies for us.
                "type" if v == b"private" => {}
                "type" => return Err(bad(uri, "type must be private (a signing key)")),
                _ => {
                    return Err(bad(
                        uri,
                        format!("attribute {k:?} is not supported (token, object, id, type)"),
                    ))
                }
            }
        }
        let mut module = None;
        let mut pin_source = None;
        for attr in query.into_iter().flat_map(|q| q.split('&')) {
            if attr.is_empty() {
                continue;
            }
            let (k, v) = attr
                .split_once('=')
                .ok_or_else(|| bad(uri, format!("query attribute {attr:?} has no '='")))?;
            let v = text(uri, k, decode(v).map_err(|e| bad(uri, e))?)?;
            match k {
                "module-path" => module = Some(PathBuf::from(v)),
                "pin-source" => {
                    let path = v.strip_prefix("file:").unwrap_or(&v);
                    pin_source = Some(PathBuf::from(path));
                }
                "pin-value" => {
                    return Err(bad(
                        uri,
                        "a PIN in the URI would be recorded and logged: give it with --pin-file \
                         (or pin-source=FILE)",
                    ))
                }
                _ => {
                    return Err(bad(
                        uri,
                        format!("query attribute {k:?} is not supported (module-path, pin-source)"),
                    ))
                }
            }
        }
        Ok(Self {
            module: module.ok_or_else(|| {
                bad(
                    uri,
                    "no module-path (e.g. ?module-path=/usr/lib/softhsm/libsofthsm2.so)",
                )
            })?,
            token: token.ok_or_else(|| bad(uri, "no token= (the token's label)"))?,
            object: object.ok_or_else(|| bad(uri, "no object= (the key's label)"))?,
            id,
            pin_source,
        })
    }

    /// The same token, another object (the keys fleetgate makes beside
    /// the one the operator named).
    pub fn with_object(&self, object: &str) -> Self {
        Self {
            object: object.to_owned(),
            id: None,
            ..self.clone()
        }
    }
}

fn text(uri: &str, k: &str, v: Vec<u8>) -> Result<String, Error> {
    String::from_utf8(v).map_err(|_| bad(uri, format!("{k} is not UTF-8")))
}

/// Percent-decoding (RFC 3986 2.1).
fn decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape at {:?}", &s[i..]))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// Percent-encodes what RFC 7512 does not allow as is in a value.
fn encode(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for &c in b {
        if c.is_ascii_alphanumeric() || b"-._~:[]@!$'()*+,/".contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

fn encode_all(b: &[u8]) -> String {
    b.iter().map(|c| format!("%{c:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form_and_round_trips() {
        let s =
            "pkcs11:token=fleetgate;object=issuing-ca?module-path=/usr/lib/softhsm/libsofthsm2.so";
        let u = TokenUri::parse(s).unwrap();
        assert_eq!(u.token, "fleetgate");
        assert_eq!(u.object, "issuing-ca");
        assert_eq!(u.module, PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"));
        assert_eq!(u.to_string(), s);
        assert_eq!(TokenUri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn decodes_escapes_ids_and_pin_sources() {
        let u = TokenUri::parse(
            "pkcs11:token=My%20Token;object=ca;id=%01%02;type=private\
             ?module-path=/m.so&pin-source=file:/etc/pin",
        )
        .unwrap();
        assert_eq!(u.token, "My Token");
        assert_eq!(u.id.as_deref(), Some(&[1u8, 2][..]));
        assert_eq!(u.pin_source, Some(PathBuf::from("/etc/pin")));
        assert_eq!(TokenUri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn refuses_what_it_would_misread() {
        for (uri, says) in [
            ("token=a;object=b?module-path=/m", "does not start"),
            ("pkcs11:token=a?module-path=/m", "no object="),
            ("pkcs11:object=b?module-path=/m", "no token="),
            ("pkcs11:token=a;object=b", "no module-path"),
            (
                "pkcs11:token=a;objcet=b?module-path=/m",
                "\"objcet\" is not supported",
            ),
            (
                "pkcs11:token=a;object=b?module-path=/m&pin-value=1234",
                "--pin-file",
            ),
            ("pkcs11:token=a;object=b%2?module-path=/m", "percent-escape"),
            (
                "pkcs11:token=a;object=b;type=cert?module-path=/m",
                "type must be private",
            ),
        ] {
            let e = TokenUri::parse(uri).unwrap_err().to_string();
            assert!(e.contains(says), "{uri}: {e}");
        }
    }
}
