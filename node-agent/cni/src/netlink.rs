//! The kernel side of a pod's network, through rtnetlink: a veth pair whose host end carries
//! the pods' gateway address and a /32 route to the pod, and whose container end (created in the
//! pod's namespace as `CNI_IFNAME`) carries the pod's address as a /32, a link route
//! to the gateway and the default route through it. Every pod reaches every other address
//! through the host, which routes (the node's routes to other nodes' pod CIDRs, the data
//! plane's programs on the host end). Netlink sockets bind to the network namespace of the
//! thread that opens them, so the container's side is configured from a thread that entered
//! its namespace.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::Path,
};

use futures::TryStreamExt;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkMessage},
        route::{RouteAttribute, RouteScope},
    },
};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Missing(String),
}

fn kernel(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Kernel { what, source }
}

/// The host end's name: stable for a container and interface, 14 characters (IFNAMSIZ is 16).
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}"));
    format!("kv{}", &data_encoding::HEXLOWER.encode(&digest)[..12])
}

/// What ADD made: the two ends' MAC addresses.
#[derive(Clone, Debug, Default)]
pub struct Made {
    pub host_mac: String,
    pub container_mac: String,
}

/// Runs `f` with a netlink handle in the caller's network namespace.
async fn with_handle<T>(
    f: impl AsyncFnOnce(Handle) -> Result<T, NetlinkError>,
) -> Result<T, NetlinkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetlinkError::Io {
            what: "open rtnetlink".into(),
            source,
        })?;
    let task = tokio::spawn(connection);
    let result = f(handle).await;
    task.abort();
    result
}

/// Runs `f` with a netlink handle inside the network namespace at `netns`, on a thread of its
/// own (with a runtime of its own).
fn in_netns<T: Send>(
    netns: &Path,
    f: impl AsyncFnOnce(Handle) -> Result<T, NetlinkError> + Send,
) -> Result<T, NetlinkError> {
    let file = File::open(netns).map_err(|source| NetlinkError::Io {
        what: format!("open {}", netns.display()),
        source,
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on a descriptor we own, on a thread of our own.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(NetlinkError::Io {
                        what: "enter the container's network namespace".into(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| NetlinkError::Io {
                        what: "a runtime".into(),
                        source,
                    })?;
                runtime.block_on(with_handle(f))
            })
            .join()
            .unwrap_or_else(|_| Err(NetlinkError::Missing("the netlink thread panicked".into())))
    })
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(kernel(format!("find link {name}"))(e)),
    }
}

fn mac_of(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(
                mac.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

/// ADD: the veth pair, addresses and routes. Idempotent: an existing pair is reused.
pub fn add(
    container_id: &str,
    netns: &Path,
    ifname: &str,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    mtu: Option<u32>,
) -> Result<Made, NetlinkError> {
    let host = host_ifname(container_id, ifname);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| NetlinkError::Io {
            what: "a runtime".into(),
            source,
        })?;
    let ns_file = File::open(netns).map_err(|source| NetlinkError::Io {
        what: format!("open {}", netns.display()),
        source,
    })?;
    let ns_fd = ns_file.as_raw_fd();
    let host_mac = runtime.block_on(with_handle(async |handle: Handle| {
        if link_by_name(&handle, &host).await?.is_none() {
            // The container end is born in the pod's namespace under its final name: moving
            // a link between namespaces waits for an RCU grace period under the kernel's
            // global rtnl lock (about 20 ms each; ten concurrent ADDs took 10x longer).
            let mut peer = LinkUnspec::new_with_name(ifname).setns_by_fd(ns_fd);
            let mut veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
                .name(host.clone());
            if let Some(mtu) = mtu {
                peer = peer.mtu(mtu);
                veth = veth.mtu(mtu);
            }
            let veth = veth.set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
            handle
                .link()
                .add(veth.build())
                .execute()
                .await
                .map_err(kernel(format!(
                    "create veth {host} with {ifname} in {}",
                    netns.display()
                )))?;
        }
        let link = link_by_name(&handle, &host)
            .await?
            .ok_or_else(|| NetlinkError::Missing(format!("{host} vanished")))?;
        let index = link.header.index;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(kernel(format!("set {host} up")))?;
        handle
            .address()
            .add(index, IpAddr::V4(gateway), 32)
            .replace()
            .execute()
            .await
            .map_err(kernel(format!("address {gateway} on {host}")))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(kernel(format!("route {ip}/32 dev {host}")))?;
        Ok(mac_of(&link))
    }))?;
    drop(ns_file);

    let ifname_owned = ifname.to_owned();
    let container_mac = in_netns(netns, async move |handle: Handle| {
        let link = link_by_name(&handle, &ifname_owned).await?.ok_or_else(|| {
            NetlinkError::Missing(format!("{ifname_owned} is not in the namespace"))
        })?;
        let index = link.header.index;
        for (name, i) in [("lo", None), (ifname_owned.as_str(), Some(index))] {
            let i = match i {
                Some(i) => i,
                None => match link_by_name(&handle, name).await? {
                    Some(lo) => lo.header.index,
                    None => continue,
                },
            };
            handle
                .link()
                .set(LinkUnspec::new_with_index(i).up().build())
                .execute()
                .await
                .map_err(kernel(format!("set {name} up")))?;
        }
        handle
            .address()
            .add(index, IpAddr::V4(ip), 32)
            .replace()
            .execute()
            .await
            .map_err(kernel(format!("address {ip}/32 on {ifname_owned}")))?;
        let to_gateway = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(gateway, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        handle
            .route()
            .add(to_gateway)
            .replace()
            .execute()
            .await
            .map_err(kernel(format!("route {gateway} dev {ifname_owned}")))?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .gateway(gateway)
            .output_interface(index)
            .build();
        handle
            .route()
            .add(default)
            .replace()
            .execute()
            .await
            .map_err(kernel(format!("default route via {gateway}")))?;
        let link = link_by_name(&handle, &ifname_owned)
            .await?
            .ok_or_else(|| NetlinkError::Missing(ifname_owned.clone()))?;
        Ok(mac_of(&link))
    })?;
    Ok(Made {
        host_mac,
        container_mac,
    })
}

/// DEL: removes the host end (its peer goes with it). Nothing there is not an error.
pub fn del(container_id: &str, ifname: &str) -> Result<(), NetlinkError> {
    let host = host_ifname(container_id, ifname);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| NetlinkError::Io {
            what: "a runtime".into(),
            source,
        })?;
    runtime.block_on(with_handle(async |handle: Handle| {
        if let Some(link) = link_by_name(&handle, &host).await? {
            match handle.link().del(link.header.index).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {}
                Err(e) => return Err(kernel(format!("remove {host}"))(e)),
            }
        }
        Ok(())
    }))
}

/// CHECK: the container end is up with the address and the default route; the host end
/// exists. Says what is wrong otherwise.
pub fn check(
    container_id: &str,
    netns: &Path,
    ifname: &str,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<(), NetlinkError> {
    let host = host_ifname(container_id, ifname);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| NetlinkError::Io {
            what: "a runtime".into(),
            source,
        })?;
    runtime.block_on(with_handle(async |handle: Handle| {
        link_by_name(&handle, &host)
            .await?
            .map(|_| ())
            .ok_or_else(|| NetlinkError::Missing(format!("the host end {host} is gone")))
    }))?;
    let ifname = ifname.to_owned();
    in_netns(netns, async move |handle: Handle| {
        let link = link_by_name(&handle, &ifname)
            .await?
            .ok_or_else(|| NetlinkError::Missing(format!("{ifname} is not in the namespace")))?;
        let index = link.header.index;
        let mut addresses = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut has_ip = false;
        while let Some(a) = addresses
            .try_next()
            .await
            .map_err(kernel("list addresses"))?
        {
            has_ip |= a
                .attributes
                .iter()
                .any(|attr| matches!(attr, AddressAttribute::Address(IpAddr::V4(v)) if *v == ip));
        }
        if !has_ip {
            return Err(NetlinkError::Missing(format!("{ifname} lacks {ip}")));
        }
        let mut routes = handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut has_default = false;
        while let Some(r) = routes.try_next().await.map_err(kernel("list routes"))? {
            let via_gateway = r.attributes.iter().any(|attr| {
                matches!(attr, RouteAttribute::Gateway(g) if *g == rtnetlink::packet_route::route::RouteAddress::Inet(gateway))
            });
            has_default |= r.header.destination_prefix_length == 0 && via_gateway;
        }
        if !has_default {
            return Err(NetlinkError::Missing(format!(
                "no default route via {gateway} in the namespace"
            )));
        }
        Ok(())
    })
}
