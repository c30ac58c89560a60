//! `dpctl`'s commands: own a data plane from a desired-state file, show it carrying real
//! traffic, measure its per-packet cost.

pub mod bench;
pub mod demo;
pub mod run;
pub mod state;
