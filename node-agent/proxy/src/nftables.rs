//! kube-proxy's nftables mode (pkg/proxy/nftables/proxier.go), object for object: a table
//! `ip kube-proxy` whose `services` chain looks the destination up in the `service-ips`
//! verdict map; each service port's chain picks an endpoint chain with
//! `numgen random mod N vmap { ... }`, the endpoint chain DNATs. Services without endpoints are
//! rejected through the `no-endpoint-services` map. Traffic from outside (ExternalIP elements of
//! `service-ips`, NodePorts in `service-nodeports` for the addresses of `nodeport-ips`) goes
//! through the port's `external-*` chain: masqueraded (`externalTrafficPolicy: Cluster`) or to
//! its `local-*` endpoint chain (`Local`); without endpoints for it, rejected, or dropped when
//! only local ones are missing. Applied with `nft -f`, one transaction per
//! sync: the first writes the whole table, later ones only what changed.

use std::{collections::BTreeMap, fmt::Write, time::Instant};

use anyhow::Result;

use crate::{
    KernelUsage, Mode, Proxier, ProxyConfig, ProxyState, SyncReport,
    exec::{hash, output, run_with_input},
    model::{Service, ServicePort},
};

const TABLE: &str = "ip kube-proxy";

/// The table's fixed part: base chains, masquerading, maps, the reject path.
fn skeleton() -> String {
    let t = TABLE;
    format!(
        "add table {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add chain {t} mark-for-masquerade\n\
         add rule {t} mark-for-masquerade mark set mark or 0x4000\n\
         add chain {t} masquerading\n\
         add rule {t} masquerading mark and 0x4000 == 0 return\n\
         add rule {t} masquerading mark set mark xor 0x4000\n\
         add rule {t} masquerading masquerade fully-random\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add chain {t} services\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add chain {t} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}\n\
         add rule {t} nat-prerouting jump services\n\
         add chain {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add rule {t} nat-output jump services\n\
         add chain {t} nat-postrouting {{ type nat hook postrouting priority srcnat ; }}\n\
         add rule {t} nat-postrouting jump masquerading\n\
         add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services\" ; }}\n\
         add rule {t} reject-chain reject\n\
         add chain {t} service-endpoints-check\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add chain {t} filter-input {{ type filter hook input priority -110 ; }}\n\
         add rule {t} filter-input ct state new jump service-endpoints-check\n\
         add chain {t} filter-forward {{ type filter hook forward priority -110 ; }}\n\
         add rule {t} filter-forward ct state new jump service-endpoints-check\n\
         add chain {t} filter-output {{ type filter hook output priority -110 ; }}\n\
         add rule {t} filter-output ct state new jump service-endpoints-check\n\
         add set {t} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add rule {t} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\
         add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add rule {t} service-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n\
         add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
         add chain {t} firewall-check\n\
         add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add chain {t} filter-prerouting-pre-dnat {{ type filter hook prerouting priority -110 ; }}\n\
         add rule {t} filter-prerouting-pre-dnat ct state new jump firewall-check\n\
         add chain {t} filter-output-pre-dnat {{ type filter hook output priority -110 ; }}\n\
         add rule {t} filter-output-pre-dnat ct state new jump firewall-check\n"
    )
}

/// Everything per service that a sync writes.
#[derive(Default)]
struct Rendered {
    /// `service-ips` elements: key -> verdict.
    service_ips: BTreeMap<String, String>,
    /// `no-endpoint-services` elements: key -> verdict.
    no_endpoints: BTreeMap<String, String>,
    /// `service-nodeports` elements (`proto . port`): key -> verdict.
    nodeports: BTreeMap<String, String>,
    /// `no-endpoint-nodeports` elements: key -> verdict.
    no_endpoint_nodeports: BTreeMap<String, String>,
    /// `nodeport-ips` elements: the addresses NodePorts answer on.
    nodeport_ips: std::collections::BTreeSet<String>,
    /// `firewall-ips` elements: key -> verdict.
    firewall: BTreeMap<String, String>,
    /// Service and endpoint chains: name -> their `add rule` lines.
    chains: BTreeMap<String, String>,
    /// Affinity sets: name -> timeout in seconds.
    sets: BTreeMap<String, u64>,
}

impl Rendered {
    fn objects(&self) -> u64 {
        let rules: usize = self.chains.values().map(|r| r.lines().count()).sum();
        (rules
            + self.service_ips.len()
            + self.no_endpoints.len()
            + self.nodeports.len()
            + self.no_endpoint_nodeports.len()
            + self.nodeport_ips.len()
            + self.firewall.len()) as u64
    }
}

pub struct NftablesProxier {
    cluster_cidr: String,
    /// The addresses NodePorts answer on.
    nodeport_addrs: Vec<std::net::Ipv4Addr>,
    sync_timeout: Option<std::time::Duration>,
    last: Option<Rendered>,
}

impl NftablesProxier {
    pub fn new(config: &ProxyConfig) -> Result<Self> {
        Ok(Self {
            cluster_cidr: config.cluster_cidr.clone(),
            nodeport_addrs: Vec::new(),
            sync_timeout: config.sync_timeout,
            last: None,
        })
    }

    fn render(&self, state: &ProxyState) -> Rendered {
        let mut out = Rendered::default();
        for service in state.services.values() {
            for port in &service.ports {
                self.render_port(service, port, &mut out);
            }
        }
        out.nodeport_ips = self
            .nodeport_addrs
            .iter()
            .map(ToString::to_string)
            .collect();
        out
    }

    fn render_port(&self, service: &Service, port: &ServicePort, out: &mut Rendered) {
        let t = TABLE;
        let proto = port.protocol.name();
        let spn = service.port_name(port);
        let port_hash = hash(&format!("{spn}{proto}"), 8);
        // kube-proxy: "service-<hash>-<namespace>/<name>/<protocol>/<port name>".
        let base = format!(
            "{}/{}/{proto}/{}",
            service.namespace, service.name, port.name
        );
        let chain = format!("service-{port_hash}-{base}");
        let key = format!("{} . {proto} . {}", service.cluster_ip, port.port);
        // Without a cluster IP (a pod's host ports) only the external rules refer to the
        // service's chain.
        let cluster = !service.cluster_ip.is_unspecified();
        if port.endpoints.is_empty() {
            if cluster {
                out.no_endpoints.insert(key, "goto reject-chain".into());
            }
        } else {
            let mut rules = String::new();
            if cluster {
                rules = format!(
                    "add rule {t} {chain} ip daddr {} {proto} dport {} ip saddr != {} jump mark-for-masquerade\n",
                    service.cluster_ip, port.port, self.cluster_cidr,
                );
                out.service_ips.insert(key, format!("goto {chain}"));
            }
            rules += &self.pick(service, port, &chain, &base, &port.endpoints, out);
            out.chains.insert(chain.clone(), rules);
        }
        self.render_external(service, port, &port_hash, &base, out);
    }

    /// The ExternalIP and NodePort elements of a port, and its `external-*` chain (with its
    /// `local-*` chain for `externalTrafficPolicy: Local`).
    fn render_external(
        &self,
        service: &Service,
        port: &ServicePort,
        port_hash: &str,
        base: &str,
        out: &mut Rendered,
    ) {
        if service.external_ips.is_empty()
            && service.load_balancer_ips.is_empty()
            && port.node_port.is_none()
        {
            return;
        }
        let t = TABLE;
        let proto = port.protocol.name();
        let external = port.external_endpoints();
        let key = |ip: &std::net::Ipv4Addr| format!("{ip} . {proto} . {}", port.port);
        let keys: Vec<String> = service
            .external_ips
            .iter()
            .chain(&service.load_balancer_ips)
            .map(key)
            .collect();
        // loadBalancerSourceRanges: checked before DNAT, for new flows to the LB addresses.
        let ranges = &service.load_balancer_source_ranges;
        if !ranges.is_empty() {
            let chain = format!("firewall-{port_hash}-{base}");
            let set: Vec<String> = ranges.iter().map(|(n, l)| format!("{n}/{l}")).collect();
            out.chains.insert(
                chain.clone(),
                format!(
                    "add rule {t} {chain} ip saddr != {{ {} }} drop\n",
                    set.join(", ")
                ),
            );
            for ip in &service.load_balancer_ips {
                out.firewall.insert(key(ip), format!("goto {chain}"));
            }
        }
        let node_port = port.node_port.map(|p| format!("{proto} . {p}"));
        if external.is_empty() {
            let verdict = if port.drops_external() {
                "drop"
            } else {
                "goto reject-chain"
            };
            for key in keys {
                out.no_endpoints.insert(key, verdict.into());
            }
            if let Some(key) = node_port {
                out.no_endpoint_nodeports.insert(key, verdict.into());
            }
            return;
        }
        let service_chain = format!("service-{port_hash}-{base}");
        let ext = format!("external-{port_hash}-{base}");
        let target = if port.external_endpoints.is_none() {
            service_chain.clone()
        } else {
            let chain = format!("local-{port_hash}-{base}");
            let rules = self.pick(service, port, &chain, base, external, out);
            out.chains.insert(chain.clone(), rules);
            chain
        };
        let mut rules = String::new();
        if !service.external_local {
            let _ = writeln!(rules, "add rule {t} {ext} jump mark-for-masquerade");
        } else if !port.endpoints.is_empty() {
            // Pods and the node itself reach the service as cluster traffic would.
            let _ = writeln!(
                rules,
                "add rule {t} {ext} ip saddr {} goto {service_chain}\n\
                 add rule {t} {ext} fib saddr type local jump mark-for-masquerade\n\
                 add rule {t} {ext} fib saddr type local goto {service_chain}",
                self.cluster_cidr
            );
        }
        let _ = writeln!(rules, "add rule {t} {ext} goto {target}");
        for key in keys {
            out.service_ips.insert(key, format!("goto {ext}"));
        }
        if let Some(key) = node_port {
            out.nodeports.insert(key, format!("goto {ext}"));
        }
        out.chains.insert(ext, rules);
    }

    /// The rules of `chain` choosing one of `endpoints` (session affinity first, then
    /// `numgen`); their endpoint chains (and affinity sets) go into `out`.
    fn pick(
        &self,
        service: &Service,
        port: &ServicePort,
        chain: &str,
        base: &str,
        endpoints: &[std::net::SocketAddrV4],
        out: &mut Rendered,
    ) -> String {
        let t = TABLE;
        let proto = port.protocol.name();
        let spn = service.port_name(port);
        let mut rules = String::new();
        let mut vmap = Vec::new();
        for (i, endpoint) in endpoints.iter().enumerate() {
            let ip = endpoint.ip();
            let ep = format!("{ip}/{}", endpoint.port());
            let ep_hash = hash(&format!("{spn}{proto}{ep}"), 8);
            let ep_chain = format!("endpoint-{ep_hash}-{base}__{ep}");
            let mut ep_rules =
                format!("add rule {t} {ep_chain} ip saddr {ip} jump mark-for-masquerade\n");
            if let Some(timeout) = service.session_affinity {
                let set = format!("affinity-{ep_hash}-{base}__{ep}");
                let _ = writeln!(
                    rules,
                    "add rule {t} {chain} ip saddr @{set} goto {ep_chain}"
                );
                let _ = writeln!(
                    ep_rules,
                    "add rule {t} {ep_chain} update @{set} {{ ip saddr }}"
                );
                out.sets.insert(set, timeout.as_secs());
            }
            let _ = writeln!(
                ep_rules,
                "add rule {t} {ep_chain} meta l4proto {proto} dnat to {endpoint}"
            );
            vmap.push(format!("{i} : goto {ep_chain}"));
            out.chains.insert(ep_chain, ep_rules);
        }
        let _ = writeln!(
            rules,
            "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
            vmap.len(),
            vmap.join(", ")
        );
        rules
    }
}

/// A verdict map's elements: key -> verdict.
type Elements = BTreeMap<String, String>;

/// The verdict maps of two renderings, side by side: (name, old elements, new elements).
fn maps<'a>(
    old: &'a Rendered,
    new: &'a Rendered,
) -> [(&'static str, &'a Elements, &'a Elements); 5] {
    [
        ("firewall-ips", &old.firewall, &new.firewall),
        ("service-ips", &old.service_ips, &new.service_ips),
        ("no-endpoint-services", &old.no_endpoints, &new.no_endpoints),
        ("service-nodeports", &old.nodeports, &new.nodeports),
        (
            "no-endpoint-nodeports",
            &old.no_endpoint_nodeports,
            &new.no_endpoint_nodeports,
        ),
    ]
}

/// The transaction that takes the table from `old` (None: nothing) to `new`.
fn transaction(old: Option<&Rendered>, new: &Rendered) -> (String, usize) {
    let t = TABLE;
    let mut script = String::new();
    let empty = Rendered::default();
    let old = match old {
        Some(old) => old,
        None => {
            // From scratch: whatever is there goes, in the same transaction.
            let _ = writeln!(script, "add table {t}\ndelete table {t}");
            script.push_str(&skeleton());
            &empty
        }
    };
    for (map, old_elems, new_elems) in maps(old, new) {
        for (key, verdict) in old_elems {
            if new_elems.get(key) != Some(verdict) {
                let _ = writeln!(script, "delete element {t} {map} {{ {key} }}");
            }
        }
    }
    for (set, timeout) in &new.sets {
        if old.sets.get(set) != Some(timeout) {
            let _ = writeln!(
                script,
                "add set {t} {set} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {timeout}s ; }}"
            );
        }
    }
    let changed: Vec<&String> = new
        .chains
        .iter()
        .filter(|(name, rules)| old.chains.get(*name) != Some(*rules))
        .map(|(name, _)| name)
        .collect();
    let stale: Vec<&String> = old
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .collect();
    for name in &changed {
        let verb = if old.chains.contains_key(*name) {
            "flush"
        } else {
            "add"
        };
        let _ = writeln!(script, "{verb} chain {t} {name}");
    }
    for name in &stale {
        let _ = writeln!(script, "flush chain {t} {name}");
    }
    for name in &changed {
        script.push_str(&new.chains[*name]);
    }
    for addr in old.nodeport_ips.difference(&new.nodeport_ips) {
        let _ = writeln!(script, "delete element {t} nodeport-ips {{ {addr} }}");
    }
    for addr in new.nodeport_ips.difference(&old.nodeport_ips) {
        let _ = writeln!(script, "add element {t} nodeport-ips {{ {addr} }}");
    }
    for (map, old_elems, new_elems) in maps(old, new) {
        for (key, verdict) in new_elems {
            if old_elems.get(key) != Some(verdict) {
                let _ = writeln!(script, "add element {t} {map} {{ {key} : {verdict} }}");
            }
        }
    }
    // External chains first, then service and local chains: each jumps to the next kind.
    let (services, endpoints): (Vec<&String>, Vec<&String>) =
        stale.iter().partition(|n| !n.starts_with("endpoint-"));
    let (external, services): (Vec<&String>, Vec<&String>) = services
        .into_iter()
        .partition(|n| n.starts_with("external-"));
    let services: Vec<&String> = external.into_iter().chain(services).collect();
    for name in services.iter().chain(&endpoints) {
        let _ = writeln!(script, "delete chain {t} {name}");
    }
    for set in old.sets.keys().filter(|s| !new.sets.contains_key(*s)) {
        let _ = writeln!(script, "delete set {t} {set}");
    }
    (script, changed.len())
}

impl Proxier for NftablesProxier {
    fn mode(&self) -> Mode {
        Mode::Nftables
    }

    fn sync(&mut self, state: &ProxyState) -> Result<SyncReport> {
        let new = self.render(state);
        let full = self.last.is_none();
        let (script, written) = transaction(self.last.as_ref(), &new);
        let start = Instant::now();
        run_with_input("nft", &["-f", "-"], &script, self.sync_timeout)?;
        let duration = start.elapsed();
        self.last = Some(new);
        Ok(SyncReport {
            full,
            written,
            failed: Vec::new(),
            duration,
        })
    }

    fn load_in_steps(&mut self, state: &ProxyState, step: usize) -> Result<()> {
        anyhow::ensure!(
            self.last.is_none(),
            "load_in_steps needs a proxy that holds nothing yet"
        );
        if state.services.is_empty() {
            return self.sync(state).map(drop);
        }
        let empty = Rendered::default();
        let services: Vec<&Service> = state.services.values().collect();
        for (i, chunk) in services.chunks(step.max(1)).enumerate() {
            // The first step creates the table; later ones only add (nothing to delete).
            let rendered = self.render(&chunk.iter().map(|s| (*s).clone()).collect());
            let (script, _) = transaction((i > 0).then_some(&empty), &rendered);
            run_with_input("nft", &["-f", "-"], &script, None)?;
        }
        self.last = Some(self.render(state));
        Ok(())
    }

    fn set_node(&mut self, node: &ebpf_dataplane::NodeSettings) -> Result<()> {
        self.nodeport_addrs = node.nodeport_addrs.clone();
        Ok(())
    }

    fn kernel_usage(&self) -> Result<KernelUsage> {
        let skeleton_rules = skeleton()
            .lines()
            .filter(|l| l.starts_with("add rule"))
            .count() as u64;
        let objects = self.last.as_ref().map_or(0, Rendered::objects) + skeleton_rules;
        Ok(KernelUsage {
            bytes: None,
            objects,
        })
    }

    fn cleanup(self: Box<Self>) -> Result<()> {
        cleanup()
    }
}

/// Deletes the kube-proxy table if there is one.
pub fn cleanup() -> Result<()> {
    if output("nft", &["list", "table", "ip", "kube-proxy"])?.is_some() {
        run_with_input("nft", &["delete", "table", "ip", "kube-proxy"], "", None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn state(endpoints: &[&str]) -> ProxyState {
        ProxyState::from_iter([Service {
            namespace: "ns1".into(),
            name: "svc1".into(),
            cluster_ip: "172.30.0.41".parse().unwrap(),
            ports: vec![ServicePort {
                name: "p80".into(),
                protocol: Protocol::Tcp,
                port: 80,
                endpoints: endpoints
                    .iter()
                    .map(|e| format!("{e}:80").parse().unwrap())
                    .collect(),
                ..Default::default()
            }],
            session_affinity: None,
            ..Default::default()
        }])
    }

    #[test]
    fn layout_matches_kube_proxys() {
        let proxier = NftablesProxier {
            cluster_cidr: "10.0.0.0/8".into(),
            nodeport_addrs: vec!["192.0.2.10".parse().unwrap()],
            sync_timeout: None,
            last: None,
        };
        let r = proxier.render(&state(&["10.180.0.1", "10.180.0.2"]));
        let chain = format!("service-{}-ns1/svc1/tcp/p80", hash("ns1/svc1:p80tcp", 8));
        assert_eq!(
            r.service_ips["172.30.0.41 . tcp . 80"],
            format!("goto {chain}")
        );
        let rules = &r.chains[&chain];
        assert!(rules.contains(
            "ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade"
        ));
        assert!(
            rules.contains("numgen random mod 2 vmap { 0 : goto endpoint-"),
            "{rules}"
        );
        let ep = format!(
            "endpoint-{}-ns1/svc1/tcp/p80__10.180.0.1/80",
            hash("ns1/svc1:p80tcp10.180.0.1/80", 8)
        );
        assert!(r.chains[&ep].contains("meta l4proto tcp dnat to 10.180.0.1:80"));
    }

    #[test]
    fn node_ports_and_external_ips_go_through_the_external_chain() {
        let proxier = NftablesProxier {
            cluster_cidr: "10.0.0.0/8".into(),
            nodeport_addrs: vec!["192.0.2.10".parse().unwrap()],
            sync_timeout: None,
            last: None,
        };
        let mut state = state(&["10.180.0.1", "10.180.0.2"]);
        let svc = state.services.get_index_mut(0).unwrap().1;
        svc.external_ips = vec!["192.0.2.77".parse().unwrap()];
        svc.ports[0].node_port = Some(30080);
        let r = proxier.render(&state);
        let h = hash("ns1/svc1:p80tcp", 8);
        let ext = format!("external-{h}-ns1/svc1/tcp/p80");
        assert_eq!(
            r.service_ips["192.0.2.77 . tcp . 80"],
            format!("goto {ext}")
        );
        assert_eq!(r.nodeports["tcp . 30080"], format!("goto {ext}"));
        assert_eq!(
            r.chains[&ext],
            format!(
                "add rule ip kube-proxy {ext} jump mark-for-masquerade\nadd rule ip kube-proxy {ext} goto service-{h}-ns1/svc1/tcp/p80\n"
            )
        );
        assert!(r.nodeport_ips.contains("192.0.2.10"));
        let (script, _) = transaction(None, &r);
        assert!(script.contains(
            "add element ip kube-proxy service-nodeports { tcp . 30080 : goto external-"
        ));
        assert!(script.contains("add element ip kube-proxy nodeport-ips { 192.0.2.10 }"));

        // externalTrafficPolicy Local without a local endpoint: dropped.
        let svc = state.services.get_index_mut(0).unwrap().1;
        svc.external_local = true;
        svc.ports[0].external_endpoints = Some(Vec::new());
        let r = proxier.render(&state);
        assert_eq!(r.no_endpoint_nodeports["tcp . 30080"], "drop");
        assert_eq!(r.no_endpoints["192.0.2.77 . tcp . 80"], "drop");
        assert!(!r.chains.contains_key(&ext));
    }

    #[test]
    fn partial_syncs_touch_only_what_changed() {
        let proxier = NftablesProxier {
            cluster_cidr: "10.0.0.0/8".into(),
            nodeport_addrs: vec!["192.0.2.10".parse().unwrap()],
            sync_timeout: None,
            last: None,
        };
        let before = proxier.render(&state(&["10.180.0.1", "10.180.0.2"]));
        let after = proxier.render(&state(&["10.180.0.1", "10.180.0.3"]));
        let (script, written) = transaction(Some(&before), &after);
        assert_eq!(
            written, 2,
            "the service chain and the new endpoint chain:\n{script}"
        );
        assert!(script.contains("flush chain ip kube-proxy service-"));
        assert!(script.contains("__10.180.0.2/80\n") && script.contains("delete chain"));
        assert!(
            !script.contains("10.180.0.1/80\n"),
            "the unchanged endpoint is left alone:\n{script}"
        );
        assert!(
            !script.contains("element"),
            "the service's map element is unchanged"
        );
        // No endpoints left: the element moves to the reject map.
        let none = proxier.render(&state(&[]));
        let (script, _) = transaction(Some(&after), &none);
        assert!(
            script.contains("delete element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 }")
        );
        assert!(script.contains("add element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 : goto reject-chain }"));
    }
}
