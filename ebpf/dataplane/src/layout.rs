//! Where the maps are pinned, and what they must be to be adopted.
//!
//! Every map's properties (type, key and value size, flags, capacity) are listed here once.
//! They name the directory the maps are pinned in (`maps-v<version>-<digest>`), so a build or a
//! configuration that changes any of them (a new value layout, a bigger conntrack) gets a
//! directory of its own and never misreads maps made for another: the state in the old
//! directory is migrated into the new one ([`crate::Dataplane::open`]), then the old pins are
//! removed. The same list checks the maps the loader created or adopted.

use std::{
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{Map, MapData, MapType},
};
use ebpf_common::{
    AffinityEntry, AffinityKey, Backend, COUNTER_COUNT, CtEntry, FlowKey, FragKey, FragPorts,
    MaglevLanes, MemberKey, PodSources, Ranges, RevNat, ServiceKey, ServiceValue, SockFwdKey,
    SockRevKey, defaults, map_names,
};

use crate::{Config, Error};

/// Bumped whenever a map's key or value layout changes (the digest would change anyway; the
/// number keeps directory names readable).
pub const VERSION: u32 = 8;

/// `BPF_F_NO_PREALLOC` and `BPF_F_MMAPABLE`.
const NO_PREALLOC: u32 = 1 << 0;
const MMAPABLE: u32 = 1 << 10;

/// One pinned map as this build defines it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapType,
    pub key: usize,
    pub value: usize,
    pub flags: u32,
    pub max_entries: u32,
}

/// Every map, with the capacities `config` asks for.
pub fn specs(config: &Config) -> Vec<MapSpec> {
    let spec = |name, kind, key, value, flags, max_entries| MapSpec {
        name,
        kind,
        key,
        value,
        flags,
        max_entries,
    };
    use MapType::{Array, Hash, LruHash, PerCpuArray};
    vec![
        spec(
            map_names::SERVICES,
            Hash,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            NO_PREALLOC,
            config.max_services,
        ),
        spec(
            map_names::BACKENDS,
            Array,
            4,
            size_of::<Backend>(),
            MMAPABLE,
            config.backend_slots,
        ),
        spec(
            map_names::MEMBERS,
            Hash,
            size_of::<MemberKey>(),
            4,
            NO_PREALLOC,
            defaults::MEMBERS,
        ),
        spec(
            map_names::MAGLEV,
            Array,
            4,
            size_of::<MaglevLanes>(),
            MMAPABLE,
            config.maglev_elements,
        ),
        spec(
            map_names::CONNTRACK,
            LruHash,
            size_of::<FlowKey>(),
            size_of::<CtEntry>(),
            0,
            config.ct_entries,
        ),
        spec(
            map_names::REVNAT,
            LruHash,
            size_of::<FlowKey>(),
            size_of::<RevNat>(),
            0,
            config.ct_entries,
        ),
        spec(
            map_names::AFFINITY,
            LruHash,
            size_of::<AffinityKey>(),
            size_of::<AffinityEntry>(),
            0,
            config.affinity_entries,
        ),
        spec(
            map_names::FRAGS,
            LruHash,
            size_of::<FragKey>(),
            size_of::<FragPorts>(),
            0,
            defaults::FRAG_ENTRIES,
        ),
        spec(
            map_names::POD_ADDRS,
            Hash,
            4,
            size_of::<PodSources>(),
            NO_PREALLOC,
            defaults::POD_ADDR_ENTRIES,
        ),
        spec(map_names::RANGES, Array, 4, size_of::<Ranges>(), 0, 1),
        spec(map_names::COUNTERS, PerCpuArray, 4, 8, 0, COUNTER_COUNT),
        spec(
            map_names::SOCK_NETNS,
            Hash,
            8,
            4,
            NO_PREALLOC,
            defaults::SOCK_NETNS_ENTRIES,
        ),
        spec(
            map_names::SOCK_REVNAT,
            LruHash,
            size_of::<SockRevKey>(),
            size_of::<RevNat>(),
            0,
            defaults::SOCK_REVNAT_ENTRIES,
        ),
        spec(
            map_names::SOCK_FWD,
            LruHash,
            size_of::<SockFwdKey>(),
            size_of::<Backend>(),
            0,
            defaults::SOCK_FWD_ENTRIES,
        ),
    ]
}

/// The directory the maps of `specs` are pinned in, under `pin_dir`.
pub fn dir(pin_dir: &Path, specs: &[MapSpec]) -> PathBuf {
    // FNV-1a over every property: stable across builds and platforms, unlike std's hasher.
    let mut digest: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            digest ^= u64::from(b);
            digest = digest.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for s in specs {
        feed(s.name.as_bytes());
        for n in [
            s.kind as u64,
            s.key as u64,
            s.value as u64,
            u64::from(s.flags),
            u64::from(s.max_entries),
        ] {
            feed(&n.to_le_bytes());
        }
    }
    pin_dir.join(format!("maps-v{VERSION}-{digest:016x}"))
}

/// The map directories under `pin_dir` other than `current`: an earlier build's or
/// configuration's, to migrate from and remove.
pub fn others(pin_dir: &Path, current: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = std::fs::read_dir(pin_dir).map_err(|source| Error::Pin {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p != current
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("maps-"))
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// The one map directory of this build's version under `pin_dir` (for read-only views, which
/// do not know the owner's configuration).
pub fn find(pin_dir: &Path) -> Result<PathBuf, Error> {
    let prefix = format!("maps-v{VERSION}-");
    let entries = std::fs::read_dir(pin_dir).map_err(|source| Error::Pin {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Inconsistent(format!(
            "no maps of layout v{VERSION} under {} (is the data plane running, and this build's?)",
            pin_dir.display()
        ))),
        _ => Err(Error::Inconsistent(format!(
            "several map layouts under {} (an upgrade in progress?)",
            pin_dir.display()
        ))),
    }
}

/// Refuses maps that are not exactly what `specs` says (adopted pins made by another build
/// would be misread; the directory name makes that a bug, not a user error).
pub fn check(ebpf: &Ebpf, specs: &[MapSpec]) -> Result<(), Error> {
    for spec in specs {
        let data = match ebpf.map(spec.name).ok_or(Error::MissingMap(spec.name))? {
            Map::Array(d) | Map::LruHashMap(d) | Map::HashMap(d) | Map::PerCpuArray(d) => d,
            _ => return Err(mismatch(spec, "an unexpected map type".into())),
        };
        check_map(data, spec)?;
    }
    Ok(())
}

/// Checks one map against its spec.
pub fn check_map(data: &MapData, spec: &MapSpec) -> Result<(), Error> {
    let info = data.info().map_err(|source| Error::Map {
        name: spec.name,
        source,
    })?;
    let kind = info.map_type().map_err(|source| Error::Map {
        name: spec.name,
        source,
    })?;
    let found = MapSpec {
        name: spec.name,
        kind,
        key: info.key_size() as usize,
        value: info.value_size() as usize,
        flags: info.map_flags(),
        max_entries: info.max_entries(),
    };
    if found != *spec {
        return Err(mismatch(spec, format!("found {found:?}")));
    }
    Ok(())
}

fn mismatch(spec: &MapSpec, detail: String) -> Error {
    Error::LayoutMismatch {
        name: spec.name,
        detail: format!("expected {spec:?}, {detail}"),
    }
}

/// Unpins every map of a directory and removes it. Programs still using the maps keep them
/// (the kernel frees a map with its last user).
pub fn remove(dir: &Path) -> Result<(), Error> {
    std::fs::remove_dir_all(dir).map_err(|source| Error::Pin {
        path: dir.to_path_buf(),
        source,
    })
}
