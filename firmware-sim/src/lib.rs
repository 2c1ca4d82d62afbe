//! The simulated fleet and load generator behind `firmware-sim`.

pub mod fleet;
pub mod load;
pub mod throttle;
pub mod wire;
