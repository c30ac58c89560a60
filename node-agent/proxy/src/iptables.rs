//! kube-proxy's iptables mode, rule for rule (pkg/proxy/iptables/proxier.go): every service
//! port has a `KUBE-SERVICES` rule jumping to its `KUBE-SVC-<hash>` chain, which picks a
//! `KUBE-SEP-<hash>` chain per endpoint with the `statistic` match (probability 1/n, then
//! 1/(n-1), ... so each endpoint is equally likely), which DNATs. Services without endpoints are
//! REJECTed in the filter table. Traffic from outside (ExternalIP rules in `KUBE-SERVICES`,
//! NodePorts in `KUBE-NODEPORTS`, jumped to by the last rule of `KUBE-SERVICES`) goes through
//! the port's `KUBE-EXT-<hash>` chain, which masquerades (`externalTrafficPolicy: Cluster`) or
//! picks among the local endpoints (`KUBE-SVL-<hash>`, `Local`); without endpoints for it, it
//! is REJECTed, or DROPped when only local ones are missing. Applied with `iptables-restore --noflush`: the first sync
//! writes every chain, later ones only the chains that changed plus `KUBE-SERVICES`, and delete
//! stale chains, as kube-proxy's partial syncs do.

use std::{collections::BTreeMap, fmt::Write, time::Instant};

use anyhow::Result;

use crate::{
    KernelUsage, Mode, Proxier, ProxyConfig, ProxyState, SyncReport,
    exec::{hash, output, run_with_input},
    model::{Service, ServicePort},
};

const MARK_MASQ: &str = "0x4000";

/// Jump rules from the built-in chains into kube-proxy's, as `(table, chain, rule)`.
const JUMPS: [(&str, &str, &str); 6] = [
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "PREROUTING",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "OUTPUT",
        "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    ),
];

/// What a sync writes: the filter table's `KUBE-SERVICES`, the nat table's `KUBE-SERVICES` and
/// `KUBE-NODEPORTS`, and the per-service chains (name -> rules).
#[derive(Default)]
struct Rendered {
    filter: String,
    services: String,
    nodeports: String,
    chains: BTreeMap<String, String>,
}

impl Rendered {
    fn rules(&self) -> u64 {
        let lines = |text: &str| text.lines().count() as u64;
        lines(&self.filter)
            + lines(&self.services)
            + lines(&self.nodeports)
            + self.chains.values().map(|r| lines(r)).sum::<u64>()
    }
}

pub struct IptablesProxier {
    cluster_cidr: String,
    /// The addresses NodePorts answer on; empty: every local address (`--dst-type LOCAL`).
    nodeport_addrs: Vec<std::net::Ipv4Addr>,
    sync_timeout: Option<std::time::Duration>,
    /// Per-service chains (`KUBE-SVC-*`, `KUBE-SEP-*`) as last written: name -> rules.
    chains: BTreeMap<String, String>,
    rules: u64,
    synced: bool,
}

impl IptablesProxier {
    pub fn new(config: &ProxyConfig) -> Result<Self> {
        // The chains must exist before anything can jump to them. Only missing ones are
        // declared: iptables-restore flushes a chain it declares, even with --noflush, and a
        // restarted proxy must keep serving what its predecessor wrote until its first sync.
        let mut input = String::new();
        for (table, chains) in [
            ("filter", &["KUBE-SERVICES"][..]),
            (
                "nat",
                &[
                    "KUBE-SERVICES",
                    "KUBE-NODEPORTS",
                    "KUBE-POSTROUTING",
                    "KUBE-MARK-MASQ",
                ][..],
            ),
        ] {
            let existing = kube_chains(table)?;
            let missing: Vec<&str> = chains
                .iter()
                .copied()
                .filter(|c| !existing.iter().any(|e| e == c))
                .collect();
            if !missing.is_empty() {
                let _ = writeln!(input, "*{table}");
                for chain in missing {
                    let _ = writeln!(input, ":{chain} - [0:0]");
                }
                input.push_str("COMMIT\n");
            }
        }
        if !input.is_empty() {
            run_with_input("iptables-restore", &["-w", "--noflush"], &input, None)?;
        }
        for (table, chain, rule) in JUMPS {
            ensure_rule(table, chain, rule)?;
        }
        Ok(Self {
            cluster_cidr: config.cluster_cidr.clone(),
            nodeport_addrs: Vec::new(),
            sync_timeout: config.sync_timeout,
            chains: BTreeMap::new(),
            rules: 0,
            synced: false,
        })
    }

    /// Renders every rule of `state`.
    fn render(&self, state: &ProxyState) -> Rendered {
        let mut out = Rendered::default();
        for service in state.services.values() {
            for port in &service.ports {
                self.render_port(service, port, &mut out);
            }
        }
        out
    }

    /// The rules that end `KUBE-SERVICES`: to `KUBE-NODEPORTS` for the node's addresses
    /// (kube-proxy: "this must be the last rule in this chain").
    fn nodeports_jump(&self) -> String {
        let comment = "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
        if self.nodeport_addrs.is_empty() {
            return format!(
                "-A KUBE-SERVICES {comment} -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n"
            );
        }
        self.nodeport_addrs
            .iter()
            .map(|addr| format!("-A KUBE-SERVICES {comment} -d {addr}/32 -j KUBE-NODEPORTS\n"))
            .collect()
    }

    fn render_port(&self, service: &Service, port: &ServicePort, out: &mut Rendered) {
        let spn = service.port_name(port);
        let proto = port.protocol.name();
        let vip = service.cluster_ip;
        let dport = port.port;
        let matches = format!("-m {proto} -p {proto} -d {vip}/32 --dport {dport}");
        let port_hash = hash(&format!("{spn}{proto}"), 16);
        let svc_chain = format!("KUBE-SVC-{port_hash}");
        // Without a cluster IP (a pod's host ports) only the external rules refer to the
        // service's chain.
        let cluster = !vip.is_unspecified();
        if port.endpoints.is_empty() {
            if cluster {
                let _ = writeln!(
                    out.filter,
                    "-A KUBE-SERVICES -m comment --comment \"{spn} has no endpoints\" {matches} -j REJECT"
                );
            }
        } else {
            let mut rules = String::new();
            if cluster {
                let _ = writeln!(
                    out.services,
                    "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" {matches} -j {svc_chain}"
                );
                let _ = writeln!(
                    rules,
                    "-A {svc_chain} -m comment --comment \"{spn} cluster IP\" {matches} ! -s {} -j KUBE-MARK-MASQ",
                    self.cluster_cidr
                );
            }
            rules += &self.pick(service, port, &svc_chain, &port.endpoints, &mut out.chains);
            out.chains.insert(svc_chain.clone(), rules);
        }
        self.render_external(service, port, &port_hash, out);
    }

    /// The ExternalIP and NodePort rules of a port, and its `KUBE-EXT-*` chain.
    fn render_external(
        &self,
        service: &Service,
        port: &ServicePort,
        port_hash: &str,
        out: &mut Rendered,
    ) {
        if service.external_ips.is_empty()
            && service.load_balancer_ips.is_empty()
            && port.node_port.is_none()
        {
            return;
        }
        let spn = service.port_name(port);
        let proto = port.protocol.name();
        let external = port.external_endpoints();
        let addresses = service
            .external_ips
            .iter()
            .chain(&service.load_balancer_ips);
        if external.is_empty() {
            let (why, verdict) = if port.drops_external() {
                ("has no local endpoints", "DROP")
            } else {
                ("has no endpoints", "REJECT")
            };
            for ip in addresses {
                let _ = writeln!(
                    out.filter,
                    "-A KUBE-SERVICES -m comment --comment \"{spn} {why}\" -m {proto} -p {proto} -d {ip}/32 --dport {} -j {verdict}",
                    port.port
                );
            }
            if let Some(node_port) = port.node_port {
                let _ = writeln!(
                    out.filter,
                    "-A KUBE-SERVICES -m comment --comment \"{spn} {why}\" -m addrtype --dst-type LOCAL -m {proto} -p {proto} --dport {node_port} -j {verdict}"
                );
            }
            return;
        }
        let ext_chain = format!("KUBE-EXT-{port_hash}");
        for ip in &service.external_ips {
            let _ = writeln!(
                out.services,
                "-A KUBE-SERVICES -m comment --comment \"{spn} external IP\" -m {proto} -p {proto} -d {ip}/32 --dport {} -j {ext_chain}",
                port.port
            );
        }
        // loadBalancerSourceRanges: the allowed clients go on through KUBE-FW-*; the others
        // keep the LoadBalancer address as destination and are dropped in the filter table.
        let ranges = &service.load_balancer_source_ranges;
        let fw_chain = format!("KUBE-FW-{port_hash}");
        let lb_target = if ranges.is_empty() {
            &ext_chain
        } else {
            let mut fw = String::new();
            for (net, len) in ranges {
                let _ = writeln!(
                    fw,
                    "-A {fw_chain} -m comment --comment \"{spn} loadbalancer IP\" -s {net}/{len} -j {ext_chain}"
                );
            }
            let _ = writeln!(
                fw,
                "-A {fw_chain} -m comment --comment \"other traffic to {spn} will be dropped by KUBE-SERVICES\""
            );
            out.chains.insert(fw_chain.clone(), fw);
            &fw_chain
        };
        for ip in &service.load_balancer_ips {
            let _ = writeln!(
                out.services,
                "-A KUBE-SERVICES -m comment --comment \"{spn} loadbalancer IP\" -m {proto} -p {proto} -d {ip}/32 --dport {} -j {lb_target}",
                port.port
            );
            if !ranges.is_empty() {
                let _ = writeln!(
                    out.filter,
                    "-A KUBE-SERVICES -m comment --comment \"{spn} traffic not accepted by {fw_chain}\" -m {proto} -p {proto} -d {ip}/32 --dport {} -j DROP",
                    port.port
                );
            }
        }
        if let Some(node_port) = port.node_port {
            let _ = writeln!(
                out.nodeports,
                "-A KUBE-NODEPORTS -m comment --comment {spn} -m {proto} -p {proto} --dport {node_port} -j {ext_chain}"
            );
        }
        let svc_chain = format!("KUBE-SVC-{port_hash}");
        let mut rules = String::new();
        let target = if port.external_endpoints.is_none() {
            svc_chain.clone()
        } else {
            let name = if service.external_local { "SVL" } else { "SVX" };
            let chain = format!("KUBE-{name}-{port_hash}");
            let picks = self.pick(service, port, &chain, external, &mut out.chains);
            out.chains.insert(chain.clone(), picks);
            chain
        };
        if service.external_local {
            // Pods and the node itself reach the service as cluster traffic would.
            if !port.endpoints.is_empty() {
                let _ = writeln!(
                    rules,
                    "-A {ext_chain} -s {} -m comment --comment \"pod traffic for {spn} external destinations\" -j {svc_chain}\n\
                     -A {ext_chain} -m comment --comment \"masquerade LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ\n\
                     -A {ext_chain} -m comment --comment \"route LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {svc_chain}",
                    self.cluster_cidr
                );
            }
        } else {
            let _ = writeln!(
                rules,
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {spn} external destinations\" -j KUBE-MARK-MASQ"
            );
        }
        let _ = writeln!(rules, "-A {ext_chain} -j {target}");
        out.chains.insert(ext_chain, rules);
    }

    /// The rules of `chain` choosing one of `endpoints` (session affinity first, then the
    /// `statistic` match); their `KUBE-SEP-*` chains go into `chains`.
    fn pick(
        &self,
        service: &Service,
        port: &ServicePort,
        chain: &str,
        endpoints: &[std::net::SocketAddrV4],
        chains: &mut BTreeMap<String, String>,
    ) -> String {
        let spn = service.port_name(port);
        let proto = port.protocol.name();
        let mut rules = String::new();
        let endpoints: Vec<(String, String)> = endpoints
            .iter()
            .map(|ep| {
                let ep = ep.to_string();
                let sep = format!("KUBE-SEP-{}", hash(&format!("{spn}{proto}{ep}"), 16));
                (ep, sep)
            })
            .collect();
        if let Some(timeout) = service.session_affinity {
            for (ep, sep) in &endpoints {
                let _ = writeln!(
                    rules,
                    "-A {chain} -m comment --comment \"{spn} -> {ep}\" -m recent --name {sep} --rcheck --seconds {} --reap -j {sep}",
                    timeout.as_secs()
                );
            }
        }
        let n = endpoints.len();
        for (i, (ep, sep)) in endpoints.iter().enumerate() {
            let statistic = if i + 1 < n {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {chain} -m comment --comment \"{spn} -> {ep}\"{statistic} -j {sep}"
            );
            let ip = ep.split(':').next().unwrap_or_default();
            let recent = if service.session_affinity.is_some() {
                format!(" -m recent --name {sep} --set")
            } else {
                String::new()
            };
            let sep_rules = format!(
                "-A {sep} -m comment --comment {spn} -s {ip}/32 -j KUBE-MARK-MASQ\n\
                 -A {sep} -m comment --comment {spn}{recent} -m {proto} -p {proto} -j DNAT --to-destination {ep}\n"
            );
            chains.insert(sep.clone(), sep_rules);
        }
        rules
    }
}

impl Proxier for IptablesProxier {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn sync(&mut self, state: &ProxyState) -> Result<SyncReport> {
        let rendered = self.render(state);
        let Rendered {
            filter,
            services,
            nodeports,
            chains,
        } = &rendered;
        let full = !self.synced;
        let changed: Vec<&String> = chains
            .iter()
            .filter(|(name, rules)| full || self.chains.get(*name) != Some(*rules))
            .map(|(name, _)| name)
            .collect();
        let stale: Vec<&String> = self
            .chains
            .keys()
            .filter(|name| !chains.contains_key(*name))
            .collect();

        let mut input = String::with_capacity(services.len() * 4);
        input.push_str("*filter\n:KUBE-SERVICES - [0:0]\n");
        input.push_str(filter);
        input.push_str("COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
        for name in changed.iter().chain(&stale) {
            let _ = writeln!(input, ":{name} - [0:0]");
        }
        let _ = writeln!(
            input,
            "-A KUBE-MARK-MASQ -j MARK --or-mark {MARK_MASQ}\n\
             -A KUBE-POSTROUTING -m mark ! --mark {MARK_MASQ}/{MARK_MASQ} -j RETURN\n\
             -A KUBE-POSTROUTING -j MARK --xor-mark {MARK_MASQ}\n\
             -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
        );
        input.push_str(services);
        input.push_str(&self.nodeports_jump());
        input.push_str(nodeports);
        for name in &changed {
            input.push_str(&chains[*name]);
        }
        for name in &stale {
            let _ = writeln!(input, "-X {name}");
        }
        input.push_str("COMMIT\n");

        let start = Instant::now();
        run_with_input(
            "iptables-restore",
            &["-w", "--noflush"],
            &input,
            self.sync_timeout,
        )?;
        let duration = start.elapsed();
        let written = changed.len();
        self.rules = rendered.rules() + self.nodeport_addrs.len().max(1) as u64 + 4;
        self.chains = rendered.chains;
        self.synced = true;
        Ok(SyncReport {
            full,
            written,
            failed: Vec::new(),
            duration,
        })
    }

    fn load_in_steps(&mut self, state: &ProxyState, step: usize) -> Result<()> {
        anyhow::ensure!(
            !self.synced,
            "load_in_steps needs a proxy that holds nothing yet"
        );
        // The fixed chains first; then each step declares its own chains and appends to
        // KUBE-SERVICES (restore --noflush leaves undeclared chains as they are).
        self.sync(&ProxyState::default())?;
        let services: Vec<&Service> = state.services.values().collect();
        for chunk in services.chunks(step.max(1)) {
            let part = self.render(&chunk.iter().map(|s| (*s).clone()).collect());
            let mut input = format!("*filter\n{}COMMIT\n*nat\n", part.filter);
            for name in part.chains.keys() {
                let _ = writeln!(input, ":{name} - [0:0]");
            }
            input.push_str(&part.services);
            input.push_str(&part.nodeports);
            for rules in part.chains.values() {
                input.push_str(rules);
            }
            input.push_str("COMMIT\n");
            run_with_input("iptables-restore", &["-w", "--noflush"], &input, None)?;
        }
        // The NodePort jump ends KUBE-SERVICES again.
        let jump = self.nodeports_jump();
        let mut input = String::from("*nat\n");
        for rule in jump.lines() {
            let _ = writeln!(input, "{}", rule.replacen("-A ", "-D ", 1));
        }
        input.push_str(&jump);
        input.push_str("COMMIT\n");
        run_with_input("iptables-restore", &["-w", "--noflush"], &input, None)?;
        let rendered = self.render(state);
        self.rules = rendered.rules() + self.nodeport_addrs.len().max(1) as u64 + 4;
        self.chains = rendered.chains;
        Ok(())
    }

    fn set_node(&mut self, node: &ebpf_dataplane::NodeSettings) -> Result<()> {
        self.nodeport_addrs = node.nodeport_addrs.clone();
        Ok(())
    }

    fn kernel_usage(&self) -> Result<KernelUsage> {
        Ok(KernelUsage {
            bytes: None,
            objects: self.rules + JUMPS.len() as u64,
        })
    }

    fn cleanup(self: Box<Self>) -> Result<()> {
        cleanup()
    }
}

/// Adds `rule` to the start of `chain` unless it is there (kube-proxy's EnsureRule).
fn ensure_rule(table: &str, chain: &str, rule: &str) -> Result<()> {
    let args = rule_args(rule);
    let mut check = vec!["-w", "-t", table, "-C", chain];
    check.extend(args.iter().map(String::as_str));
    if output("iptables", &check)?.is_some() {
        return Ok(());
    }
    let mut insert = vec!["-w", "-t", table, "-I", chain];
    insert.extend(args.iter().map(String::as_str));
    run_with_input("iptables", &insert, "", None)
}

/// Splits a rule into arguments, keeping quoted comments whole.
fn rule_args(rule: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut rest = rule;
    while let Some(start) = rest.find(|c: char| !c.is_whitespace()) {
        rest = &rest[start..];
        if let Some(quoted) = rest.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            args.push(quoted[..end].to_owned());
            rest = quoted.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            args.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    args
}

/// The KUBE-* chains `table` holds (none when iptables-save cannot list it).
fn kube_chains(table: &str) -> Result<Vec<String>> {
    let Some(saved) = output("iptables-save", &["-t", table])? else {
        return Ok(Vec::new());
    };
    Ok(saved
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with("KUBE-"))
        .map(str::to_owned)
        .collect())
}

/// Removes kube-proxy's jump rules and every KUBE-* chain from the filter and nat tables.
pub fn cleanup() -> Result<()> {
    for (table, chain, rule) in JUMPS {
        let mut delete = vec!["-w", "-t", table, "-D", chain];
        let args = rule_args(rule);
        delete.extend(args.iter().map(String::as_str));
        while output("iptables", &delete)?.is_some() {}
    }
    let mut input = String::new();
    for table in ["filter", "nat"] {
        let chains = kube_chains(table)?;
        if chains.is_empty() {
            continue;
        }
        let _ = writeln!(input, "*{table}");
        for name in &chains {
            let _ = writeln!(input, ":{name} - [0:0]");
        }
        for name in &chains {
            let _ = writeln!(input, "-X {name}");
        }
        input.push_str("COMMIT\n");
    }
    if !input.is_empty() {
        run_with_input("iptables-restore", &["-w", "--noflush"], &input, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn service(endpoints: usize) -> Service {
        Service {
            namespace: "ns1".into(),
            name: "svc1".into(),
            cluster_ip: "172.30.0.41".parse().unwrap(),
            ports: vec![ServicePort {
                name: "p80".into(),
                protocol: Protocol::Tcp,
                port: 80,
                endpoints: (1..=endpoints)
                    .map(|i| format!("10.180.0.{i}:8080").parse().unwrap())
                    .collect(),
                ..Default::default()
            }],
            session_affinity: None,
            ..Default::default()
        }
    }

    #[test]
    fn rules_follow_kube_proxys_layout() {
        let proxier = IptablesProxier {
            cluster_cidr: "10.0.0.0/8".into(),
            nodeport_addrs: Vec::new(),
            sync_timeout: None,
            chains: BTreeMap::new(),
            rules: 0,
            synced: false,
        };
        let state = ProxyState::from_iter([service(3)]);
        let Rendered {
            filter,
            services,
            chains,
            ..
        } = proxier.render(&state);
        assert!(filter.is_empty());
        // Chain names as kube-proxy computes them for ns1/svc1:p80 (its unit tests use the
        // same service): base32(sha256("ns1/svc1:p80tcp"))[:16].
        let svc = format!("KUBE-SVC-{}", hash("ns1/svc1:p80tcp", 16));
        assert_eq!(
            services,
            format!(
                "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41/32 --dport 80 -j {svc}\n"
            )
        );
        let rules = &chains[&svc];
        let probabilities: Vec<&str> = rules
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|p| p.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            probabilities,
            ["0.3333333333", "0.5000000000"],
            "1/3, 1/2, then the rest"
        );
        assert_eq!(
            rules.lines().count(),
            4,
            "masquerade rule and three endpoint jumps"
        );
        assert_eq!(
            chains.len(),
            4,
            "one service chain and three endpoint chains"
        );
        let sep = format!("KUBE-SEP-{}", hash("ns1/svc1:p80tcp10.180.0.1:8080", 16));
        assert!(chains[&sep].contains("-j DNAT --to-destination 10.180.0.1:8080"));
    }

    #[test]
    fn services_without_endpoints_are_rejected_in_the_filter_table() {
        let proxier = IptablesProxier {
            cluster_cidr: "10.0.0.0/8".into(),
            nodeport_addrs: Vec::new(),
            sync_timeout: None,
            chains: BTreeMap::new(),
            rules: 0,
            synced: false,
        };
        let Rendered {
            filter,
            services,
            chains,
            ..
        } = proxier.render(&ProxyState::from_iter([service(0)]));
        assert_eq!(
            filter,
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.41/32 --dport 80 -j REJECT\n"
        );
        assert!(services.is_empty() && chains.is_empty());
    }

    #[test]
    fn node_ports_and_external_ips_go_through_the_external_chain() {
        let proxier = IptablesProxier {
            cluster_cidr: "10.0.0.0/8".into(),
            nodeport_addrs: vec!["192.0.2.10".parse().unwrap()],
            sync_timeout: None,
            chains: BTreeMap::new(),
            rules: 0,
            synced: false,
        };
        let mut svc = service(2);
        svc.external_ips = vec!["192.0.2.77".parse().unwrap()];
        svc.ports[0].node_port = Some(30080);
        let out = proxier.render(&ProxyState::from_iter([svc.clone()]));
        let port_hash = hash("ns1/svc1:p80tcp", 16);
        let ext = format!("KUBE-EXT-{port_hash}");
        assert!(out.services.contains(&format!(
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 external IP\" -m tcp -p tcp -d 192.0.2.77/32 --dport 80 -j {ext}"
        )));
        assert_eq!(
            out.nodeports,
            format!(
                "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 30080 -j {ext}\n"
            )
        );
        assert_eq!(
            out.chains[&ext],
            format!(
                "-A {ext} -m comment --comment \"masquerade traffic for ns1/svc1:p80 external destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j KUBE-SVC-{port_hash}\n"
            )
        );
        assert_eq!(
            proxier.nodeports_jump(),
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 192.0.2.10/32 -j KUBE-NODEPORTS\n"
        );

        // externalTrafficPolicy Local: local endpoints through KUBE-SVL, pods short-circuit.
        svc.external_local = true;
        svc.ports[0].external_endpoints = Some(vec!["10.180.0.1:8080".parse().unwrap()]);
        let out = proxier.render(&ProxyState::from_iter([svc.clone()]));
        let svl = format!("KUBE-SVL-{port_hash}");
        assert!(out.chains[&ext].ends_with(&format!("-A {ext} -j {svl}\n")));
        assert!(out.chains[&ext].contains("-s 10.0.0.0/8 -m comment --comment \"pod traffic"));
        assert_eq!(out.chains[&svl].lines().count(), 1, "one local endpoint");

        // No local endpoint: dropped, not rejected.
        svc.ports[0].external_endpoints = Some(Vec::new());
        let out = proxier.render(&ProxyState::from_iter([svc]));
        assert!(!out.chains.contains_key(&ext));
        assert!(out.filter.contains("has no local endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j DROP"));
        assert!(out.filter.contains("-d 192.0.2.77/32 --dport 80 -j DROP"));
    }

    #[test]
    fn quoted_comments_stay_one_argument() {
        assert_eq!(
            rule_args("-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
            [
                "-m",
                "comment",
                "--comment",
                "kubernetes service portals",
                "-j",
                "KUBE-SERVICES"
            ]
        );
    }
}
