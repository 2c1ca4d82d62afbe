//! fleetgate's network side: the MQTT broker, the admin API and the
//! `fleetgate` command line. Invariant: only this crate touches sockets.

pub mod activity;
pub mod api;
pub mod bus;
/// The admin API's client, from [`fleetgate_api`] (the CLI's).
pub use fleetgate_api::client;
pub mod cli;
pub mod etcd;
pub mod events;
pub mod https;
pub mod metrics;
pub mod mqtt;
pub mod net;
pub mod serve;
pub mod status;
pub mod tls;
pub mod wire;

/// Text from outside (a client id, a topic, a certificate's subject) made
/// safe for a log line or an operator's terminal: control characters
/// (newlines, ESC sequences) and backslashes are escaped, and a value with
/// white space, `=` or `"` is quoted (its quotes escaped), so it cannot
/// pass for more `key=value` fields; the rest is as is.
pub fn printable(s: &str) -> Printable<'_> {
    Printable(s)
}

/// See [`printable`].
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(&'a str);

impl std::fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let quoted = self
            .0
            .chars()
            .any(|c| c.is_whitespace() || c == '=' || c == '"');
        if quoted {
            f.write_char('"')?;
        }
        for c in self.0.chars() {
            if c.is_control() || c == '\\' {
                for e in c.escape_default() {
                    f.write_char(e)?;
                }
            } else if c == '"' {
                f.write_str("\\\"")?;
            } else {
                f.write_char(c)?;
            }
        }
        if quoted {
            f.write_char('"')?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn printable_escapes_controls() {
        for (raw, shown) in [
            ("dev-1", "dev-1"),
            ("a\nb", "\"a\\nb\""),
            ("\u{1b}[31mred", "\\u{1b}[31mred"),
            ("back\\slash", "back\\\\slash"),
            ("tab\there", "\"tab\\there\""),
            ("é", "é"),
            ("\u{7f}\u{9b}", "\\u{7f}\\u{9b}"),
            // Fake fields: quoted as one value.
            ("x reason=ok client=admin", "\"x reason=ok client=admin\""),
            ("a=b", "\"a=b\""),
            ("say \"hi\"", "\"say \\\"hi\\\"\""),
            ("nbsp\u{a0}x", "\"nbsp\u{a0}x\""),
        ] {
            assert_eq!(super::printable(raw).to_string(), shown, "{raw:?}");
        }
    }
}
