//! The repair loop for the allocations the API server makes in the service create path
//! (kube-apiserver's ipallocator and portallocator repair controllers): every period it compares
//! the ClusterIP and NodePort bitmaps with the services that exist.
//!
//! - An address or port a service holds but the bitmap lacks (a bitmap lost or restored from an
//!   older backup) is marked allocated again.
//! - One the bitmap holds but no service does (a crash between allocating and storing the
//!   service, or between deleting it and releasing) is a leak: released once it has been seen
//!   leaked in [`LEAK_ROUNDS`] rounds in a row, so an allocation whose service is being stored
//!   right now is never taken away.
//! - Two services holding the same address or port get a `ClusterIPAlreadyAllocated` /
//!   `PortAlreadyAllocated` warning event; the one created first keeps it.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use control_plane_apiserver::alloc::{AllocError, Allocator};
use control_plane_store::AnyStore;
use k8s_openapi::api::core::v1::Service;

use crate::{
    client::Client,
    events::{Kind, Recorder},
};

pub const LEAK_ROUNDS: u32 = 3;

/// What one round found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub repaired: Vec<u32>,
    pub released: Vec<u32>,
    pub duplicates: Vec<u32>,
    pub out_of_range: Vec<u32>,
}

/// One allocator's repair state: leaks seen so far.
#[derive(Default)]
pub struct Repair {
    leaks: HashMap<u32, u32>,
}

impl Repair {
    /// Compares `holders` (each number with the services holding it, oldest first) with what the
    /// allocator has, and fixes what it can.
    pub async fn round(
        &mut self,
        allocator: &Allocator<AnyStore>,
        holders: &Holders,
    ) -> Result<Report, AllocError> {
        let mut report = Report::default();
        let allocated = allocator.allocated().await?;
        for (n, services) in holders {
            if !allocator.range().contains(*n) {
                report.out_of_range.push(*n);
                continue;
            }
            if services.len() > 1 {
                report.duplicates.push(*n);
            }
            if allocated.binary_search(n).is_err() {
                match allocator.allocate(Some(*n)).await {
                    Ok(_) | Err(AllocError::Taken) => report.repaired.push(*n),
                    Err(e) => return Err(e),
                }
            }
        }
        let mut still = HashMap::new();
        for n in allocated {
            if holders.contains_key(&n) {
                continue;
            }
            let rounds = self.leaks.get(&n).copied().unwrap_or(0) + 1;
            if rounds >= LEAK_ROUNDS {
                allocator.release(n).await?;
                report.released.push(n);
            } else {
                still.insert(n, rounds);
            }
        }
        self.leaks = still;
        Ok(report)
    }
}

/// Each number with the services holding it, oldest first.
pub type Holders = BTreeMap<u32, Vec<Arc<Service>>>;

/// Who holds which ClusterIP and NodePort.
pub fn holders(services: &[Arc<Service>]) -> (Holders, Holders) {
    let mut sorted: Vec<&Arc<Service>> = services.iter().collect();
    sorted.sort_by_key(|s| {
        (
            s.metadata.creation_timestamp.as_ref().map(|t| t.0),
            s.metadata.name.clone(),
        )
    });
    let (mut ips, mut ports): (Holders, Holders) = Default::default();
    for svc in sorted {
        let Some(spec) = &svc.spec else { continue };
        let mut addresses: Vec<&str> = spec
            .cluster_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        addresses.extend(spec.cluster_ip.as_deref());
        addresses.sort_unstable();
        addresses.dedup();
        for ip in addresses.iter().filter_map(|a| a.parse::<Ipv4Addr>().ok()) {
            ips.entry(u32::from(ip)).or_default().push(svc.clone());
        }
        let mut own: Vec<u32> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.node_port)
            .filter(|p| *p > 0)
            .map(|p| p as u32)
            .collect();
        // One service may use a port for TCP and UDP alike.
        own.sort_unstable();
        own.dedup();
        for p in own {
            ports.entry(p).or_default().push(svc.clone());
        }
    }
    (ips, ports)
}

/// Runs both repairs every `period`.
pub fn start(client: Client, period: Duration) {
    let recorder = Recorder::new(client.clone(), "allocation-repair");
    tokio::spawn(async move {
        client.informers.synced().await;
        let (mut ip_repair, mut port_repair) = (Repair::default(), Repair::default());
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            // Fresh from the store, not the cache: a service the cache has not seen yet would
            // look like a leak.
            let list = match client
                .registry
                .list(crate::informer::def::<Service>(), None, &Default::default())
                .await
            {
                Ok((items, _)) => items,
                Err(e) => {
                    tracing::warn!(error = %e, "allocation repair: listing services failed");
                    continue;
                }
            };
            let list: Vec<Arc<Service>> = list
                .into_iter()
                .filter_map(|v| serde_json::from_value(v).ok())
                .map(Arc::new)
                .collect();
            let (ips, ports) = holders(&list);
            let registry = &client.registry;
            for (what, repair, allocator, holders, reason) in [
                (
                    "ClusterIP",
                    &mut ip_repair,
                    &registry.cluster_ips,
                    &ips,
                    "ClusterIPAlreadyAllocated",
                ),
                (
                    "NodePort",
                    &mut port_repair,
                    &registry.node_ports,
                    &ports,
                    "PortAlreadyAllocated",
                ),
            ] {
                let show = |n: u32| {
                    if what == "ClusterIP" {
                        Ipv4Addr::from(n).to_string()
                    } else {
                        n.to_string()
                    }
                };
                match repair.round(allocator, holders).await {
                    Ok(report) => {
                        for n in &report.duplicates {
                            for svc in holders[n].iter().skip(1) {
                                recorder.record(
                                    &**svc,
                                    Kind::Warning,
                                    reason,
                                    format!(
                                        "{what} {} is also allocated to {}",
                                        show(*n),
                                        owner_name(&holders[n][0])
                                    ),
                                );
                            }
                        }
                        for n in &report.out_of_range {
                            for svc in &holders[n] {
                                recorder.record(
                                    &**svc,
                                    Kind::Warning,
                                    &format!("{what}OutOfRange"),
                                    format!(
                                        "{what} {} is not within the configured range",
                                        show(*n)
                                    ),
                                );
                            }
                        }
                        if !report.repaired.is_empty() || !report.released.is_empty() {
                            tracing::info!(
                                kind = %what,
                                repaired = ?report.repaired.iter().map(|n| show(*n)).collect::<Vec<_>>(),
                                released = ?report.released.iter().map(|n| show(*n)).collect::<Vec<_>>(),
                                "allocation repair: marked allocated again; leaks released"
                            );
                        }
                    }
                    Err(e) => tracing::warn!(kind = %what, error = ?e, "allocation repair failed"),
                }
            }
        }
    });
}

fn owner_name(obj: &Service) -> String {
    let m = &obj.metadata;
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or_default(),
        m.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use control_plane_apiserver::alloc::Range;
    use control_plane_store::StoreSpec;
    use k8s_openapi::{api::core::v1::ServiceSpec, apimachinery::pkg::apis::meta::v1::ObjectMeta};

    use super::*;

    fn svc(name: &str, ip: &str) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(ip.into()),
                cluster_ips: Some(vec![ip.into()]),
                ..Default::default()
            }),
            status: None,
        })
    }

    #[tokio::test]
    async fn leaks_are_released_after_rounds_missing_ones_restored_duplicates_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            AnyStore::open(&StoreSpec::Embedded(dir.path().into()))
                .await
                .unwrap(),
        );
        let alloc = Allocator::new(
            store,
            "/registry/ranges/serviceips",
            Range::cidr("10.0.0.0/24").unwrap(),
            1,
        );
        let ip = |s: &str| u32::from(s.parse::<Ipv4Addr>().unwrap());
        // A leak (allocated, no service) and a held address the bitmap lost.
        alloc.allocate(Some(ip("10.0.0.7"))).await.unwrap();
        let services = [
            svc("a", "10.0.0.9"),
            svc("b", "10.0.0.9"),
            svc("c", "10.9.0.1"),
        ];
        let (ips, _) = holders(&services);
        let mut repair = Repair::default();
        let first = repair.round(&alloc, &ips).await.unwrap();
        assert_eq!(first.repaired, vec![ip("10.0.0.9")]);
        assert_eq!(first.duplicates, vec![ip("10.0.0.9")]);
        assert_eq!(first.out_of_range, vec![ip("10.9.0.1")]);
        assert!(
            first.released.is_empty(),
            "a leak is not released on first sight"
        );
        assert_eq!(
            repair.round(&alloc, &ips).await.unwrap().released,
            Vec::<u32>::new()
        );
        assert_eq!(
            repair.round(&alloc, &ips).await.unwrap().released,
            vec![ip("10.0.0.7")]
        );
        assert_eq!(alloc.allocated().await.unwrap(), vec![ip("10.0.0.9")]);
        // A leak that gets its service in between is not released.
        alloc.allocate(Some(ip("10.0.0.20"))).await.unwrap();
        repair.round(&alloc, &ips).await.unwrap();
        let (ips2, _) = holders(&[svc("a", "10.0.0.9"), svc("d", "10.0.0.20")]);
        for _ in 0..LEAK_ROUNDS {
            assert!(
                repair
                    .round(&alloc, &ips2)
                    .await
                    .unwrap()
                    .released
                    .is_empty()
            );
        }
    }
}
