//! The control plane as a process other programs start: tests, benchmarks and the cluster
//! harness run the `control-plane` binary through [`launch::Process`].

pub mod launch;
