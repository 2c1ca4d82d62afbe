//! fleetgate's network side: the admin API, the `fleetgate` command line and
//! (coming) the MQTT broker. Invariant: only this crate touches sockets.

pub mod api;
pub mod cli;
pub mod client;
pub mod https;
pub mod serve;
pub mod tls;
