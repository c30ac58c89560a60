//! Benchmark tools and the data-plane demo: the cluster benchmark (`bench-cluster`, the three
//! proxy modes side by side), its load generator and backends, and its report; the control-plane
//! benchmark (`bench-control-plane`, the API server on both stores); the per-packet benchmark
//! (`bench-dataplane`, BPF_PROG_TEST_RUN); the demo (`demo-dataplane`). The criterion benchmarks
//! live in `benches/benches/` (`cargo bench -p benches`, as root: they load eBPF programs).

pub mod agents;
pub mod cluster;
pub mod cluster_demo;
pub mod control_plane;
pub mod cpu;
pub mod dataplane;
pub mod demo;
pub mod lab;
pub mod loadgen;
pub mod nodeport;
pub mod pods;
pub mod report;
pub mod servers;
