//! Pods' interfaces and network namespaces, found as they appear, so the data plane covers
//! pods created after the agent started: host-side interfaces whose names match
//! `--pod-interfaces` get the tc programs (rtnetlink link notifications, after a first
//! listing), namespaces whose paths match `--pod-netns` get socket-level load balancing
//! (inotify on their directories, after a first scan).

use std::{
    collections::{BTreeSet, HashMap},
    ffi::CString,
    net::Ipv4Addr,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use glob::Pattern;
use inotify::{Inotify, WatchMask};
use rtnetlink::{
    MulticastGroup, RouteMessageBuilder,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
    },
};
use tokio::task::JoinHandle;

use crate::{
    agent::{Event, Shared},
    config::RunArgs,
};

/// Starts the watchers the arguments ask for.
pub fn start(args: &RunArgs, shared: Arc<Shared>) -> Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    if !args.pod_interfaces.is_empty() {
        let patterns = patterns(&args.pod_interfaces)?;
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = watch_interfaces(patterns, &shared).await {
                tracing::error!(error = format!("{e:#}"), "watching pod interfaces stopped");
            }
        }));
    }
    if !args.pod_netns.is_empty() {
        let patterns = patterns(&args.pod_netns)?;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = watch_netns(patterns, &shared).await {
                tracing::error!(
                    error = format!("{e:#}"),
                    "watching pod network namespaces stopped"
                );
            }
        }));
    }
    Ok(tasks)
}

fn patterns(globs: &[String]) -> Result<Vec<Pattern>> {
    globs
        .iter()
        .map(|g| Pattern::new(g).with_context(|| format!("glob {g:?}")))
        .collect()
}

fn link_name(message: &LinkMessage) -> Option<&str> {
    message.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// Watches interfaces matching `patterns`, and the host routes (/32) through them: a pod's
/// addresses, as CNI plugins that route each pod through its own veth (ours, Calico, Cilium)
/// install them. Each interface is (re-)announced with those addresses, the only sources its
/// packets may carry; one without such routes (a bridge's port, say) goes unchecked.
async fn watch_interfaces(patterns: Vec<Pattern>, shared: &Shared) -> Result<()> {
    let matches = |name: &str| patterns.iter().any(|p| p.matches(name));
    // Subscribe first, then list: an interface or route created in between is seen at least
    // once.
    let (connection, _, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link, MulticastGroup::Ipv4Route])
            .context("subscribe to link and route notifications")?;
    tokio::spawn(connection);
    let (connection, handle, _) = rtnetlink::new_connection().context("open rtnetlink")?;
    tokio::spawn(connection);
    let mut pods: HashMap<u32, String> = HashMap::new();
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await.context("list links")? {
        if let Some(name) = link_name(&link).filter(|n| matches(n)) {
            pods.insert(link.header.index, name.to_owned());
        }
    }
    for (index, name) in &pods {
        announce(&handle, shared, *index, name).await;
    }
    while let Some((message, _)) = messages.next().await {
        let rtnetlink::packet_core::NetlinkPayload::InnerMessage(message) = message.payload else {
            continue;
        };
        match message {
            RouteNetlinkMessage::NewLink(link) => {
                if let Some(name) = link_name(&link).filter(|n| matches(n)) {
                    pods.insert(link.header.index, name.to_owned());
                    announce(&handle, shared, link.header.index, name).await;
                }
            }
            RouteNetlinkMessage::DelLink(link) => {
                pods.remove(&link.header.index);
            }
            RouteNetlinkMessage::NewRoute(route) | RouteNetlinkMessage::DelRoute(route) => {
                if let Some((index, _)) = host_route(&route)
                    && let Some(name) = pods.get(&index)
                {
                    announce(&handle, shared, index, name).await;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A /32 unicast route's interface and address, in the main table (not the local table's
/// routes to the node's own addresses).
fn host_route(route: &RouteMessage) -> Option<(u32, Ipv4Addr)> {
    if route.header.destination_prefix_length != 32
        || route.header.kind != RouteType::Unicast
        || route.header.table != RouteHeader::RT_TABLE_MAIN
    {
        return None;
    }
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })?;
    let dst = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })?;
    Some((oif, dst))
}

/// Announces the pod interface `name` (index `index`) with the addresses of its host routes.
async fn announce(handle: &rtnetlink::Handle, shared: &Shared, index: u32, name: &str) {
    let mut sources = Vec::new();
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    loop {
        match routes.try_next().await {
            Ok(Some(route)) => sources.extend(
                host_route(&route)
                    .filter(|(oif, _)| *oif == index)
                    .map(|(_, ip)| ip),
            ),
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(interface = %name, error = %e, "listing routes failed; its sources go unchecked");
                sources.clear();
                break;
            }
        }
    }
    sources.sort();
    sources.dedup();
    if sources.len() > ebpf_dataplane::MAX_POD_SOURCES {
        tracing::warn!(interface = %name, routes = sources.len(), "more host routes than the data plane checks; its sources go unchecked");
        sources.clear();
    }
    shared.send(Event::Interface(name.to_owned(), sources));
}

async fn watch_netns(patterns: Vec<Pattern>, shared: &Shared) -> Result<()> {
    let dirs: BTreeSet<PathBuf> = patterns
        .iter()
        .filter_map(|p| Path::new(p.as_str()).parent().map(Path::to_path_buf))
        .collect();
    let inotify = Inotify::init().context("inotify")?;
    for dir in &dirs {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        inotify
            .watches()
            .add(
                dir,
                WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::DELETE | WatchMask::MOVED_FROM,
            )
            .with_context(|| format!("watch {}", dir.display()))?;
    }
    let matches = |path: &Path| patterns.iter().any(|p| p.matches_path(path));
    for dir in &dirs {
        for entry in std::fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            if matches(&path) && is_netns(&path) {
                shared.send(Event::Netns(path));
            }
        }
    }
    let mut buffer = vec![0u8; 4096];
    let mut events = inotify.into_event_stream(&mut buffer)?;
    // inotify reports names, not which watch's directory; each event names one of `dirs`.
    let watch_dirs: Vec<PathBuf> = dirs.into_iter().collect();
    while let Some(event) = events.next().await {
        let event = event.context("read inotify events")?;
        let Some(name) = event.name else { continue };
        for dir in &watch_dirs {
            let path = dir.join(&name);
            if !matches(&path) {
                continue;
            }
            if event
                .mask
                .intersects(inotify::EventMask::DELETE | inotify::EventMask::MOVED_FROM)
            {
                shared.send(Event::NetnsGone(path));
            } else {
                let shared_tx = path.clone();
                // `ip netns add` creates the file, then bind-mounts the namespace on it.
                if wait_for_netns(&shared_tx).await {
                    shared.send(Event::Netns(path));
                }
            }
        }
    }
    Ok(())
}

/// Whether `path` is a network namespace (a file on nsfs).
fn is_netns(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC
    }
}

async fn wait_for_netns(path: &Path) -> bool {
    for _ in 0..100 {
        if is_netns(path) {
            return true;
        }
        if !path.exists() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!(path = %path.display(), "a file appeared where pod namespaces live, but no namespace was mounted on it");
    false
}
