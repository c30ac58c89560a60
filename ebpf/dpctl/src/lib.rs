//! `dpctl`'s commands, and the lab they share with the kernel tests: network namespaces as
//! pods and nodes, backends that say who they are, and client traffic.

pub mod bench;
pub mod demo;
pub mod echo;
pub mod lab;
pub mod netns;
pub mod run;
pub mod state;
pub mod traffic;
