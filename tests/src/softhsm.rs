//! A SoftHSM2 token of its own (Debian `softhsm2`): its config and token
//! dir under a test's temp dir, initialized with a label and a user PIN.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

#[derive(Debug)]
pub struct Token {
    /// `SOFTHSM2_CONF` for every process that opens it.
    pub conf: PathBuf,
    pub label: String,
    /// A file with the user PIN (0600).
    pub pin_file: PathBuf,
    pub pin: String,
}

impl Token {
    pub fn new(dir: &Path, label: &str) -> Self {
        crate::require_tool("softhsm2-util");
        let tokens = dir.join("softhsm-tokens");
        std::fs::create_dir_all(&tokens).expect("token dir");
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\n",
                tokens.display()
            ),
        )
        .expect("softhsm2.conf");
        let pin = "4912".to_owned();
        let (ok, out) = crate::run(
            Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args(["--init-token", "--free", "--label", label])
                .args(["--pin", &pin, "--so-pin", "771199"]),
        );
        assert!(ok, "softhsm2-util --init-token: {out}");
        let pin_file = dir.join("token.pin");
        crate::write_private(&pin_file, &format!("{pin}\n"));
        Self {
            conf,
            label: label.to_owned(),
            pin_file,
            pin,
        }
    }

    /// The URI of key `object` in this token.
    pub fn uri(&self, object: &str) -> String {
        format!(
            "pkcs11:token={};object={object}?module-path={MODULE}",
            self.label
        )
    }

    /// `pkcs11-tool ARGS` on this token (Debian `opensc`), logged in.
    pub fn pkcs11_tool(&self, args: &[&str]) -> (bool, String) {
        crate::require_tool("pkcs11-tool");
        crate::run(
            Command::new("pkcs11-tool")
                .env("SOFTHSM2_CONF", &self.conf)
                .args(["--module", MODULE, "--token-label", &self.label])
                .args(["--login", "--pin", &self.pin])
                .args(args),
        )
    }
}
