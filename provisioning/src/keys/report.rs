//! Key hygiene: where each key of a data dir lives, who can read it, and
//! any private key in the data dir that the operator's policy says must
//! not be there (what `fleetgate check` prints).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{kept, Kept};
use crate::files::Paths;

/// What an operator requires of where the keys are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyPolicy {
    /// Report only (the default start keeps every key in the data dir).
    #[default]
    Any,
    /// The root's key must not be in the data dir.
    OfflineRoot,
    /// As `OfflineRoot`, and no CA or signer key may be a file in the data
    /// dir: each is in a token.
    Hsm,
}

/// One key a data dir keeps.
#[derive(Clone, Debug, Serialize)]
pub struct KeyEntry {
    /// What it signs: "root CA", "issuing CA", "OCSP signer", ...
    pub role: String,
    /// Where the data dir keeps it (the file, or its `.uri`).
    pub path: PathBuf,
    /// "file", "absent", or the token URI.
    pub location: String,
    /// The file's mode (files only).
    pub mode: Option<String>,
    /// A CA or signer key (as opposed to the TLS server's and the
    /// operator's credentials).
    pub ca: bool,
}

/// Every key of a data dir, and what is wrong with them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KeyReport {
    pub keys: Vec<KeyEntry>,
    /// Private keys found in the data dir that are none of the above.
    pub strays: Vec<PathBuf>,
    pub problems: Vec<String>,
}

fn entry(role: &str, path: &Path, ca: bool) -> KeyEntry {
    let (location, mode) = match kept(path) {
        Ok(Kept::File(p)) => {
            let mode = std::fs::metadata(&p)
                .map(|m| format!("{:04o}", m.permissions().mode() & 0o7777))
                .ok();
            ("file".to_owned(), mode)
        }
        Ok(Kept::Token(uri)) => (uri.to_string(), None),
        Ok(Kept::Missing) => ("absent".to_owned(), None),
        Err(e) => (format!("unreadable: {e}"), None),
    };
    KeyEntry {
        role: role.to_owned(),
        path: path.to_owned(),
        location,
        mode,
        ca,
    }
}

/// Looks at every key `paths` keeps, against `policy`.
pub fn report(paths: &Paths, policy: KeyPolicy) -> KeyReport {
    let mut keys = vec![
        entry("root CA", &paths.root_key(), true),
        entry("issuing CA", &paths.issuing_key(), true),
        entry("OCSP signer", &paths.ocsp_key(), true),
        entry("root OCSP responder", &paths.root_ocsp_key(), true),
        entry("CMP signer", &paths.cmp_key(), true),
        entry("TLS server", &paths.server_key(), false),
        entry("operator (admin.key)", &paths.admin_key(), false),
    ];
    let mut manufacturers: Vec<PathBuf> = Vec::new();
    for dir in [
        paths.manufacturer_dir(),
        paths.manufacturer_dir().join("pending"),
    ] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let p = e.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if let Some(stem) = name
                    .strip_suffix(".key.uri")
                    .or_else(|| name.strip_suffix(".key"))
                {
                    let key = dir.join(format!("{stem}.key"));
                    if !manufacturers.contains(&key) {
                        manufacturers.push(key);
                    }
                }
            }
        }
    }
    manufacturers.sort();
    for key in &manufacturers {
        let stem = key.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
        let pending = key.parent().is_some_and(|p| p.ends_with("pending"));
        let role = if pending {
            format!("manufacturer CA {stem} (pending)")
        } else {
            format!("manufacturer CA {stem}")
        };
        keys.push(entry(&role, key, true));
    }
    keys.retain(|k| k.location != "absent" || k.role == "issuing CA" || k.role == "root CA");

    let mut problems = Vec::new();
    for k in &keys {
        if let Some(mode) = &k.mode {
            if u32::from_str_radix(mode, 8).is_ok_and(|m| m & 0o077 != 0) {
                problems.push(format!(
                    "{} key {} is readable by others (mode {mode}): chmod 600 it",
                    k.role,
                    k.path.display()
                ));
            }
        }
        if k.role == "root CA" && k.location != "absent" && policy != KeyPolicy::Any {
            problems.push(format!(
                "the root CA's key is in the data dir ({}): policy keeps it offline; move it \
                 to a root dir (see README, Protecting the CA keys)",
                k.path.display()
            ));
        } else if k.ca && k.location == "file" && policy == KeyPolicy::Hsm {
            problems.push(format!(
                "the {} key is a file in the data dir ({}): policy keeps CA and signer keys in \
                 a token",
                k.role,
                k.path.display()
            ));
        }
        if k.role == "issuing CA" && k.location == "absent" {
            problems.push(format!(
                "the issuing CA's key is missing ({})",
                k.path.display()
            ));
        }
    }

    let known: Vec<PathBuf> = keys.iter().map(|k| k.path.clone()).collect();
    let mut strays = Vec::new();
    find_private_keys(&paths.dir, &paths.registry(), &mut |p| {
        if !known.iter().any(|k| k == p) {
            strays.push(p.to_owned());
        }
    });
    strays.sort();
    for s in &strays {
        if policy != KeyPolicy::Any {
            problems.push(format!(
                "a private key fleetgate does not use is in the data dir: {} (a copy of a CA \
                 key? move it out)",
                s.display()
            ));
        }
    }
    KeyReport {
        keys,
        strays,
        problems,
    }
}

/// Every file under `dir` (not under `skip`) that holds a PEM private key.
fn find_private_keys(dir: &Path, skip: &Path, found: &mut impl FnMut(&Path)) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            if p != skip {
                find_private_keys(&p, skip, found);
            }
        } else if ft.is_file()
            && e.metadata().is_ok_and(|m| m.len() < 64 * 1024)
            && std::fs::read(&p).is_ok_and(|b| b.windows(11).any(|w| w == b"PRIVATE KEY"))
        {
            found(&p);
        }
    }
}
