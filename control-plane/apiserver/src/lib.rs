//! The Kubernetes-compatible API server: what real clients (kubectl, client-go, the official
//! Python client) need of it, over a store with etcd's semantics (embedded SQLite or etcd).

pub mod alloc;
pub mod auth;
pub mod discovery;
pub mod error;
pub mod handlers;
pub mod kubeconfig;
pub mod logs;
pub mod managed;
pub mod metrics;
pub mod object;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod rbac;
pub mod registry;
pub mod resources;
pub mod selector;
pub mod server;
pub mod strategy;
pub mod table;
pub mod validation;
pub mod watch;
