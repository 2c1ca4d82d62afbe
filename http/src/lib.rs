//! fleetgate's HTTP front: the admin API (with EST, CMP and the console)
//! and OCSP and CRLs over HTTP, over the node's shared parts in
//! [`fleetgate_mqtt`].

pub mod activity;
pub mod api;
pub mod https;
pub mod status_routes;

// The node's shared parts, under the names the modules here use.
use fleetgate_mqtt::{events, metrics, mqtt, net, status, tls, wire};

pub use provisioning::{printable, Printable};
