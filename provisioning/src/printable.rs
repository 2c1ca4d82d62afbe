//! Text from outside, made safe for a log line.

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
