//! The cluster under faults (issue 30).
//!
//! - [`run`]: a run. Three etcd members, three NATS servers and three
//!   fleetgate nodes, each in a network namespace of its own ([`net`],
//!   [`proc`], [`etcd`], [`nats`], [`node`]); seeded faults ([`schedule`]):
//!   partitions, kill -9, SIGSTOP, clock skew; clients that record every
//!   operation with its outcome ([`clients`], [`mqtt`]).
//! - [`history`]: what the clients did and saw, and what the harness knows
//!   ([`world`]: when each node could reach a majority of etcd).
//! - [`check`]: fleetgate's promises over a history. Pure, and unit-tested
//!   on hand-made histories with each kind of violation, so that it is
//!   shown to catch them.

pub mod check;
pub mod clients;
pub mod etcd;
pub mod history;
pub mod mqtt;
pub mod nats;
pub mod net;
pub mod node;
pub mod proc;
pub mod run;
pub mod schedule;
pub mod world;
