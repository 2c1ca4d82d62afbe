//! fleetgate's admin API as a client sees it: the request and answer
//! bodies ([`types`]), a typed HTTPS client with a client certificate
//! ([`client`]), and the client side of TLS ([`tls`]). The fleet simulator
//! and the tests speak to a server through this crate, not through the
//! server's own code.

pub mod client;
pub mod tls;
pub mod types;
