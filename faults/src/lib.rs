//! The cluster under faults (issue 30): the history a run's clients
//! record ([`history`]), and the checker of fleetgate's promises over it
//! ([`check`]). The checker is pure and unit-tested on hand-made histories
//! with each kind of violation, so that it is shown to catch them. The
//! run's network ([`net`]): a namespace per process on a switch, where a
//! partition is a pair of blackhole routes.

pub mod check;
pub mod etcd;
pub mod history;
pub mod net;
