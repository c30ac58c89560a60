//! `dpctl`'s commands: own a data plane from a desired-state file (`run`), and the file's
//! format (`state`). The demo and the per-packet benchmark live in `benches/`.

pub mod run;
pub mod state;
