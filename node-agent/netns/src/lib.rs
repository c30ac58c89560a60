//! Network namespaces as hosts and pods, and the one-node lab built from them: a client pod and
//! backend pods behind a node that forwards between them. The node agent's pod networking, the
//! data-plane tests, the demo and the benchmarks all stand on it.

pub mod echo;
pub mod lab;
pub mod netns;
pub mod traffic;
