//! fleetgate's network side: the MQTT broker, the admin API and the
//! `fleetgate` command line. Invariant: only this crate touches sockets.

pub mod activity;
pub mod api;
/// The admin API's client, from [`fleetgate_api`] (the CLI's).
pub use fleetgate_api::client;
/// The message bus across nodes, from [`fleetgate_bus`].
pub use fleetgate_bus as bus;
pub mod cli;
/// The registry's store on etcd, from [`fleetgate_etcd`].
pub use fleetgate_etcd as etcd;
pub mod events;
pub mod https;
pub mod metrics;
pub mod mqtt;
pub mod net;
pub mod serve;
pub mod status;
pub mod tls;
pub mod wire;

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
