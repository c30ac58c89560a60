//! kube-proxy's iptables mode, rule for rule (pkg/proxy/iptables/proxier.go): every service
//! port has a `KUBE-SERVICES` rule jumping to its `KUBE-SVC-<hash>` chain, which picks a
//! `KUBE-SEP-<hash>` chain per endpoint with the `statistic` match (probability 1/n, then
//! 1/(n-1), ... so each endpoint is equally likely), which DNATs. Services without endpoints are
//! REJECTed in the filter table. Applied with `iptables-restore --noflush`: the first sync
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

pub struct IptablesProxier {
    cluster_cidr: String,
    sync_timeout: Option<std::time::Duration>,
    /// Per-service chains (`KUBE-SVC-*`, `KUBE-SEP-*`) as last written: name -> rules.
    chains: BTreeMap<String, String>,
    rules: u64,
    synced: bool,
}

impl IptablesProxier {
    pub fn new(config: &ProxyConfig) -> Result<Self> {
        // The chains must exist before anything can jump to them.
        run_with_input(
            "iptables-restore",
            &["-w", "--noflush"],
            "*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\nCOMMIT\n",
            None,
        )?;
        for (table, chain, rule) in JUMPS {
            ensure_rule(table, chain, rule)?;
        }
        Ok(Self {
            cluster_cidr: config.cluster_cidr.clone(),
            sync_timeout: config.sync_timeout,
            chains: BTreeMap::new(),
            rules: 0,
            synced: false,
        })
    }

    /// Renders every rule of `state`: (filter KUBE-SERVICES, nat KUBE-SERVICES, other chains).
    fn render(&self, state: &ProxyState) -> (String, String, BTreeMap<String, String>) {
        let mut filter = String::new();
        let mut services = String::new();
        let mut chains = BTreeMap::new();
        for service in state.services.values() {
            for port in &service.ports {
                self.render_port(service, port, &mut filter, &mut services, &mut chains);
            }
        }
        (filter, services, chains)
    }

    fn render_port(
        &self,
        service: &Service,
        port: &ServicePort,
        filter: &mut String,
        services: &mut String,
        chains: &mut BTreeMap<String, String>,
    ) {
        let spn = service.port_name(port);
        let proto = port.protocol.name();
        let vip = service.cluster_ip;
        let dport = port.port;
        let matches = format!("-m {proto} -p {proto} -d {vip}/32 --dport {dport}");
        if port.endpoints.is_empty() {
            let _ = writeln!(
                filter,
                "-A KUBE-SERVICES -m comment --comment \"{spn} has no endpoints\" {matches} -j REJECT"
            );
            return;
        }
        let svc_chain = format!("KUBE-SVC-{}", hash(&format!("{spn}{proto}"), 16));
        let _ = writeln!(
            services,
            "-A KUBE-SERVICES -m comment --comment \"{spn} cluster IP\" {matches} -j {svc_chain}"
        );
        let mut svc = String::new();
        let _ = writeln!(
            svc,
            "-A {svc_chain} -m comment --comment \"{spn} cluster IP\" {matches} ! -s {} -j KUBE-MARK-MASQ",
            self.cluster_cidr
        );
        let endpoints: Vec<(String, String)> = port
            .endpoints
            .iter()
            .map(|ep| {
                let ep = ep.to_string();
                let chain = format!("KUBE-SEP-{}", hash(&format!("{spn}{proto}{ep}"), 16));
                (ep, chain)
            })
            .collect();
        if let Some(timeout) = service.session_affinity {
            for (ep, sep) in &endpoints {
                let _ = writeln!(
                    svc,
                    "-A {svc_chain} -m comment --comment \"{spn} -> {ep}\" -m recent --name {sep} --rcheck --seconds {} --reap -j {sep}",
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
                svc,
                "-A {svc_chain} -m comment --comment \"{spn} -> {ep}\"{statistic} -j {sep}"
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
        chains.insert(svc_chain, svc);
    }
}

impl Proxier for IptablesProxier {
    fn mode(&self) -> Mode {
        Mode::Iptables
    }

    fn sync(&mut self, state: &ProxyState) -> Result<SyncReport> {
        let (filter, services, chains) = self.render(state);
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
        input.push_str(&filter);
        input.push_str("COMMIT\n*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n");
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
        input.push_str(&services);
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
        let lines = |text: &str| text.lines().count() as u64;
        self.rules =
            lines(&filter) + lines(&services) + chains.values().map(|r| lines(r)).sum::<u64>() + 4;
        self.chains = chains;
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
            let (filter, services, chains) =
                self.render(&chunk.iter().map(|s| (*s).clone()).collect());
            let mut input = format!("*filter\n{filter}COMMIT\n*nat\n");
            for name in chains.keys() {
                let _ = writeln!(input, ":{name} - [0:0]");
            }
            input.push_str(&services);
            for rules in chains.values() {
                input.push_str(rules);
            }
            input.push_str("COMMIT\n");
            run_with_input("iptables-restore", &["-w", "--noflush"], &input, None)?;
        }
        let (filter, services, chains) = self.render(state);
        let lines = |text: &str| text.lines().count() as u64;
        self.rules =
            lines(&filter) + lines(&services) + chains.values().map(|r| lines(r)).sum::<u64>() + 4;
        self.chains = chains;
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
        let Some(saved) = output("iptables-save", &["-t", table])? else {
            continue;
        };
        let chains: Vec<&str> = saved
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| name.starts_with("KUBE-"))
            .collect();
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
            }],
            session_affinity: None,
        }
    }

    #[test]
    fn rules_follow_kube_proxys_layout() {
        let proxier = IptablesProxier {
            cluster_cidr: "10.0.0.0/8".into(),
            sync_timeout: None,
            chains: BTreeMap::new(),
            rules: 0,
            synced: false,
        };
        let state = ProxyState::from_iter([service(3)]);
        let (filter, services, chains) = proxier.render(&state);
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
            sync_timeout: None,
            chains: BTreeMap::new(),
            rules: 0,
            synced: false,
        };
        let (filter, services, chains) = proxier.render(&ProxyState::from_iter([service(0)]));
        assert_eq!(
            filter,
            "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.41/32 --dport 80 -j REJECT\n"
        );
        assert!(services.is_empty() && chains.is_empty());
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
