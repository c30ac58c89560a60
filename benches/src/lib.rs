//! Criterion benchmarks live in `benches/benches/`; run them with `cargo bench -p benches` (as
//! root: they load eBPF programs). `cargo xtask bench dataplane` prints the same per-packet
//! figures as a table and JSON.
