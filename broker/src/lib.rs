//! fleetgate's network side: the MQTT broker, the admin API and the
//! `fleetgate` command line. Invariant: only this crate touches sockets.

pub mod api;
pub mod cli;
pub mod client;
pub mod https;
pub mod metrics;
pub mod mqtt;
pub mod net;
pub mod serve;
pub mod status;
pub mod tls;
