//! Benchmark tools: the cluster benchmark (`bench-cluster`, the three proxy modes side by side),
//! its load generator and backends, and its report; the control-plane benchmark
//! (`bench-control-plane`, the API server on both stores). The criterion benchmarks live in
//! `benches/benches/` (`cargo bench -p benches`, as root: they load eBPF programs).

pub mod cluster;
pub mod control_plane;
pub mod loadgen;
pub mod report;
pub mod servers;
