//! The agent's Prometheus metrics (`/metrics`, text format), kept with `prometheus-client`.
//! Data-plane counters and map fill are read from the pinned maps when scraped, so a scrape
//! sees the kernel's figures of that moment; everything else is updated as it happens.

use std::{path::PathBuf, sync::atomic::AtomicU64};

use ebpf_dataplane::CounterKind;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// `full` or `incremental`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabels {
    pub counter: &'static str,
    /// `verdict` or `drop`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

/// Every metric the agent exports.
pub struct Metrics {
    pub sync_duration: Family<SyncLabels, Histogram>,
    pub syncs: Family<ResultLabels, Counter>,
    /// Services (eBPF) or chains (iptables) written, by the kind of sync that wrote them.
    pub sync_writes: Family<SyncLabels, Counter>,
    /// From a change arriving at the agent to the data plane serving it.
    pub apply_lag: Histogram,
    pub last_applied_version: Gauge,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub services: Gauge,
    pub endpoints: Gauge,
    pub ignored_services: Family<ReasonLabels, Gauge>,
    pub ipv6_skipped: Gauge,
    pub services_failed: Gauge,
    /// Rules (iptables), rules and elements (nftables) or map entries (eBPF).
    pub kernel_objects: Gauge,
    pub source_connected: Gauge,
    pub source_reconnects: Gauge,
    pub source_resyncs: Gauge,
    pub source_last_message_age: Gauge<f64, AtomicU64>,
    pub pod_interfaces: Gauge,
    pub pod_netns: Gauge,
    /// Flows the eBPF data plane tracks, as of the last conntrack collection.
    pub conntrack_entries: Gauge,
    /// Flows collected for being idle past their lifetime, and reverse entries whose flow was
    /// gone.
    pub conntrack_expired: Counter,
    pub conntrack_orphans: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let exponential = || {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0001, 2.0, 18,
            ))
        };
        let m = Self {
            sync_duration: Family::new_with_constructor(exponential),
            syncs: Family::default(),
            sync_writes: Family::default(),
            apply_lag: exponential(),
            last_applied_version: Gauge::default(),
            last_sync_timestamp: Gauge::default(),
            services: Gauge::default(),
            endpoints: Gauge::default(),
            ignored_services: Family::default(),
            ipv6_skipped: Gauge::default(),
            services_failed: Gauge::default(),
            kernel_objects: Gauge::default(),
            source_connected: Gauge::default(),
            source_reconnects: Gauge::default(),
            source_resyncs: Gauge::default(),
            source_last_message_age: Gauge::default(),
            pod_interfaces: Gauge::default(),
            pod_netns: Gauge::default(),
            conntrack_entries: Gauge::default(),
            conntrack_expired: Counter::default(),
            conntrack_orphans: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("keel_agent");
        r.register(
            "sync_duration_seconds",
            "Time to program the kernel for one sync",
            m.sync_duration.clone(),
        );
        r.register("syncs", "Syncs by result", m.syncs.clone());
        r.register(
            "sync_writes",
            "Services (eBPF) or chains (iptables) written, by kind of sync",
            m.sync_writes.clone(),
        );
        r.register(
            "apply_lag_seconds",
            "From a change reaching the agent to the kernel serving it",
            m.apply_lag.clone(),
        );
        r.register(
            "last_applied_version",
            "Version (store revision) of the last change applied to the kernel",
            m.last_applied_version.clone(),
        );
        r.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last successful sync",
            m.last_sync_timestamp.clone(),
        );
        r.register("services", "Services programmed", m.services.clone());
        r.register(
            "endpoints",
            "Endpoints programmed, over every service port",
            m.endpoints.clone(),
        );
        r.register(
            "ignored_services",
            "Services not programmed, by reason",
            m.ignored_services.clone(),
        );
        r.register(
            "ipv6_skipped",
            "IPv6 cluster IPs and endpoint slices skipped (no dual-stack yet)",
            m.ipv6_skipped.clone(),
        );
        r.register(
            "services_failed",
            "Service ports the last sync could not write",
            m.services_failed.clone(),
        );
        r.register(
            "kernel_objects",
            "Rules, set elements or map entries the proxy mode holds in the kernel",
            m.kernel_objects.clone(),
        );
        r.register(
            "source_connected",
            "1 while the stream of desired state is up",
            m.source_connected.clone(),
        );
        r.register(
            "source_reconnects",
            "Streams reopened after the first",
            m.source_reconnects.clone(),
        );
        r.register(
            "source_resyncs",
            "Full resyncs asked for because a message did not fit",
            m.source_resyncs.clone(),
        );
        r.register(
            "source_last_message_age_seconds",
            "Seconds since the last message from the source",
            m.source_last_message_age.clone(),
        );
        r.register(
            "pod_interfaces",
            "Pod interfaces the tc programs are attached to",
            m.pod_interfaces.clone(),
        );
        r.register(
            "pod_netns",
            "Pod network namespaces with socket-level load balancing",
            m.pod_netns.clone(),
        );
        r.register(
            "conntrack_entries",
            "Flows the eBPF data plane tracks, as of the last conntrack collection",
            m.conntrack_entries.clone(),
        );
        r.register(
            "conntrack_expired",
            "Flows removed by the conntrack collector for being idle past their lifetime",
            m.conntrack_expired.clone(),
        );
        r.register(
            "conntrack_orphans",
            "Reverse-NAT entries removed by the collector because their flow was gone",
            m.conntrack_orphans.clone(),
        );
        m
    }
}

/// The eBPF data plane's own figures, read from its pinned maps at every scrape: packets by
/// verdict and drop reason (`keel_dataplane_packets_total`), and how full the maps are.
#[derive(Debug)]
pub struct DataplaneCollector {
    pub pin_dir: PathBuf,
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A data plane not created yet (or another mode) has nothing to report.
        let Ok(pinned) = ebpf_dataplane::Pinned::open(&self.pin_dir) else {
            return Ok(());
        };
        if let Ok(stats) = pinned.stats() {
            let mut family = encoder.encode_descriptor(
                "keel_dataplane_packets",
                "Packets (or socket operations) by data-plane verdict or drop reason, since the maps were created",
                None,
                MetricType::Counter,
            )?;
            for (counter, value) in stats.iter() {
                let labels = CounterLabels {
                    counter: counter.name(),
                    kind: match counter.kind() {
                        CounterKind::Drop => "drop",
                        CounterKind::Event => "event",
                        CounterKind::Verdict => "verdict",
                    },
                };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Ok(fill) = pinned.fill() {
            let rows = [
                ("services", fill.services, u64::from(fill.max_services)),
                (
                    "backend_slots",
                    fill.backend_slots_used,
                    u64::from(fill.backend_slots),
                ),
            ];
            let mut entries = encoder.encode_descriptor(
                "keel_dataplane_map_entries",
                "Entries in use per data-plane map",
                None,
                MetricType::Gauge,
            )?;
            for (map, used, _) in rows {
                ConstGauge::new(used as i64).encode(entries.encode_family(&MapLabels { map })?)?;
            }
            let mut capacity = encoder.encode_descriptor(
                "keel_dataplane_map_capacity",
                "Capacity of each data-plane map",
                None,
                MetricType::Gauge,
            )?;
            for (map, _, max) in rows {
                ConstGauge::new(max as i64).encode(capacity.encode_family(&MapLabels { map })?)?;
            }
        }
        Ok(())
    }
}
