//! The `fleetgate` binary's library: the command line and `serve`, which
//! runs the MQTT front ([`fleetgate_mqtt`]) and the HTTP front
//! ([`fleetgate_http`]) over one data dir. Their modules are re-exported
//! here under the names they always had.

/// The admin API's client, from [`fleetgate_api`] (the CLI's).
pub use fleetgate_api::client;
pub use fleetgate_http::{activity, api, https, status_routes};
pub use fleetgate_mqtt::{bus, etcd, events, metrics, mqtt, net, status, tls, wire};
pub mod cli;
pub mod clock;
pub mod serve;

pub use provisioning::{printable, Printable};

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
