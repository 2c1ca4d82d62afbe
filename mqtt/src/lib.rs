//! fleetgate's MQTT front, and what a node's fronts share: TLS
//! configuration, metrics, certificate status, the registry's change
//! follower. Invariant: knows no HTTP front (it does not depend on it).

/// The message bus across nodes, from [`fleetgate_bus`].
pub use fleetgate_bus as bus;
/// The registry's store on etcd, from [`fleetgate_etcd`].
pub use fleetgate_etcd as etcd;
pub mod events;
pub mod metrics;
pub mod mqtt;
pub mod mqtt_tls;
pub mod net;
pub mod status;
pub mod tls;
pub mod wire;

pub use provisioning::{printable, Printable};
