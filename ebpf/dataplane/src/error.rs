//! The data plane's errors.

use std::path::PathBuf;

use aya::{
    EbpfError,
    maps::MapError,
    programs::{ProgramError, links::LinkError},
};

use crate::Frontend;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the eBPF object")]
    Load(#[from] EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error(
        "pinned map {name} has another layout than this build ({detail}); remove the pin directory to start afresh"
    )]
    LayoutMismatch { name: &'static str, detail: String },
    #[error(
        "the data plane pinned in {} holds {maps:?} in an entry layout this build cannot carry over; it keeps serving: run the build that made it, or start with the flows' loss allowed (node-agent --allow-flow-loss)",
        from.display()
    )]
    StateNotMigratable {
        from: PathBuf,
        maps: Vec<&'static str>,
    },
    #[error("pinned state is inconsistent: {0}")]
    Inconsistent(String),
    #[error("link pinned at {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("{path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not on a bpf filesystem")]
    NotBpffs(PathBuf),
    #[error("no interface named {0}")]
    NoSuchInterface(String),
    #[error("interface {ifindex}: {count} source addresses, at most 4 are supported")]
    TooManySources { ifindex: u32, count: usize },
    #[error("no service {0}")]
    NoSuchService(Frontend),
    #[error(
        "service {0} has too many backends (Maglev needs fewer than its table size and at most 65535)"
    )]
    TooManyBackends(Frontend),
    #[error("Maglev table size {0} is not a prime of at most 131071")]
    InvalidMaglevSize(u32),
    #[error("no room for {wanted} more {what}: the map is full (raise its size in the config)")]
    Full { what: &'static str, wanted: u32 },
    #[error("{} service(s) could not be written; first: {first}", .count)]
    Unapplied { count: usize, first: String },
}
