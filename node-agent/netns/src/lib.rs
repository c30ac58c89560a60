//! Network namespaces as hosts and pods: create one, join two with a veth pair, address and
//! route them, run code or commands inside ([`netns`]). With the `lab` feature, the labs the
//! tests, the demo and the benchmarks build from them ([`lab`]), servers that say who they are
//! ([`echo`]) and the clients that ask ([`traffic`]).

pub mod netns;

#[cfg(feature = "lab")]
pub mod echo;
#[cfg(feature = "lab")]
pub mod lab;
#[cfg(feature = "lab")]
pub mod traffic;
