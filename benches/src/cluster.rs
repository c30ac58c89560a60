//! `cargo xtask bench cluster`: the proxy modes side by side, one run: eBPF with socket-level
//! load balancing (`ebpf`), eBPF with every packet through tc conntrack and NAT (`ebpf-tc`),
//! and kube-proxy's iptables and nftables rules.
//!
//! Each mode gets a lab of its own (a node, a client pod with four addresses, three backend
//! pods, all network namespaces), so rules are loaded once per service count and rounds can
//! interleave the modes: in every round each metric is measured for every mode, the starting
//! mode rotating, so machine noise hits them alike. Figures are medians of the rounds; a round
//! with errors is not a result while a clean one exists.
//!
//! The services: N−1 fillers of 10 endpoints each (addresses that lead nowhere; they only make
//! the rule sets big), a single-endpoint service for iperf3 (its control and data connections
//! must reach the same server), and last the measured service, with the three real backends, TCP
//! port 80 and UDP port 53 — last, the worst case for iptables' linear KUBE-SERVICES chain.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use node_agent_netns::{
    lab::{BACKEND_PORT, CLIENT_HOST_IF, Lab},
    traffic::tcp_request,
};
use node_agent_proxy::{
    Mode, Protocol, Proxier, ProxyConfig, ProxyState, Service, ServicePort, SyncTimedOut, start,
};
use serde::Serialize;

use crate::{
    cpu,
    loadgen::{self, Run, median},
    servers::{BenchBackend, IPERF_PORT},
};

/// A column of the comparison: a proxy mode and, for eBPF, whether the client's sockets are
/// load balanced at connect time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub name: &'static str,
    pub mode: Mode,
    pub socket_lb: bool,
}

pub const VARIANTS: [Variant; 4] = [
    Variant {
        name: "ebpf",
        mode: Mode::Ebpf,
        socket_lb: true,
    },
    Variant {
        name: "ebpf-tc",
        mode: Mode::Ebpf,
        socket_lb: false,
    },
    Variant {
        name: "iptables",
        mode: Mode::Iptables,
        socket_lb: false,
    },
    Variant {
        name: "nftables",
        mode: Mode::Nftables,
        socket_lb: false,
    },
];

/// The offered rate of the CPU-cost measurement: half the slowest mode's connection rate at
/// the service count (every mode carries it), within these bounds.
const CPU_RATE_BOUNDS: (f64, f64) = (200.0, 4_000.0);

const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const IPERF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const FILLER_ENDPOINTS: u32 = 10;

/// What a run measures and for how long.
#[derive(Clone, Debug)]
pub struct Options {
    /// Service counts for the data-path figures.
    pub services: Vec<u32>,
    pub rounds: usize,
    pub secs: Duration,
    /// Connections in flight.
    pub concurrency: usize,
    /// Longest a from-scratch iptables or nftables programming may take before it is
    /// reported as "more than this" and the rules are loaded in steps instead.
    pub program_budget: Duration,
    /// Services per step when rules are loaded in steps.
    pub load_step: u32,
    /// Measure the direct (no service) ceilings in every round, or in the first only.
    pub direct_every_round: bool,
}

impl Options {
    pub fn full() -> Self {
        Self {
            services: vec![1, 1_000, 10_000, 50_000],
            rounds: 5,
            secs: Duration::from_secs(3),
            concurrency: 32,
            program_budget: Duration::from_secs(120),
            load_step: 1_000,
            direct_every_round: true,
        }
    }

    /// Under 3 minutes: 1 and 10,000 services, short rounds.
    pub fn quick() -> Self {
        Self {
            services: vec![1, 10_000],
            rounds: 3,
            secs: Duration::from_secs(1),
            concurrency: 32,
            program_budget: Duration::from_secs(5),
            load_step: 1_000,
            direct_every_round: false,
        }
    }
}

/// One mode at one service count.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub mode: &'static str,
    pub services: u32,
    /// Short connections per second through the service.
    pub cps: f64,
    pub cps_p50_us: f64,
    pub cps_p99_us: f64,
    /// Requests per second on persistent connections.
    pub rr_per_s: f64,
    pub rr_p99_us: f64,
    /// One TCP stream through the service, and straight to the pod IP.
    pub gbps: f64,
    pub direct_gbps: f64,
    /// Short connections per second straight to the same backends' pod IPs (the ceiling; the
    /// mode's rules are still traversed).
    pub direct_cps: f64,
    /// Small UDP datagrams per second delivered through the service.
    pub udp_pps: f64,
    /// From desired state handed to the proxy to the measured service answering, from scratch;
    /// with `program_over_budget` a lower bound.
    pub program_ms: f64,
    /// The same from nothing at all: starting the proxy (eBPF: loading and verifying the
    /// programs, creating the maps, attaching) included.
    pub cold_start_ms: f64,
    /// CPU time of the whole machine (user, system, irq, softirq) per short connection through
    /// the service at `cpu_rate` connections per second, background subtracted; and the same
    /// straight to the pod IPs, in the same lab and round.
    pub cpu_us_per_conn: f64,
    pub direct_cpu_us_per_conn: f64,
    pub cpu_rate: f64,
    pub program_over_budget: bool,
    /// One endpoint of one service changed, at 10,000 services.
    pub endpoint_change_ms: Option<f64>,
    /// Kernel memory the mode's state takes: growth of slab, vmalloc and per-CPU memory
    /// (/proc/meminfo) from an empty node to the programmed one.
    pub kernel_bytes: u64,
    /// What the kernel holds: eBPF map memlock bytes (eBPF only).
    pub map_bytes: Option<u64>,
    /// Rules (iptables), rules and map elements (nftables), frontends and backend slots (eBPF).
    pub kernel_objects: u64,
    /// Failed connections or requests over all rounds.
    pub errors: u64,
}

/// A mode's own lab and proxy.
struct ModeLab {
    variant: Variant,
    mode: Mode,
    /// eBPF with socket-level load balancing: the cgroup its hooks are attached to, which the
    /// load generator joins only while this lab is measured.
    cgroup: Option<cpu::Cgroup>,
    lab: Lab,
    backends: Vec<BenchBackend>,
    sources: Vec<Ipv4Addr>,
    config: ProxyConfig,
    proxier: Option<Box<dyn Proxier>>,
}

impl ModeLab {
    fn new(variant: Variant, run: &str) -> Result<Self> {
        let mode = variant.mode;
        let prefix = format!("kb-{}-{}", std::process::id(), variant.name);
        let lab = Lab::bare(&prefix, 3)?;
        let mut backends = Vec::new();
        for (i, b) in lab.backends.iter().enumerate() {
            backends.push(BenchBackend::start(&b.ns, b.addr, &b.name, i == 0)?);
        }
        lab.client
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        let sources = lab.add_client_addrs(3)?;
        let cgroup = variant
            .socket_lb
            .then(|| cpu::Cgroup::new(&format!("keel-{run}")))
            .transpose()?;
        let config = ProxyConfig {
            cluster_cidr: "10.244.0.0/16".into(),
            interfaces: vec![CLIENT_HOST_IF.into()],
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/keel-{run}-{}", variant.name)),
            // With socket-level load balancing the client is a pod whose sockets are load
            // balanced at connect time; without, its packets are translated one by one.
            pod_netns: if variant.socket_lb {
                vec![lab.client.path()]
            } else {
                Vec::new()
            },
            socket_cgroup: cgroup.as_ref().map(|c| c.dir.clone()),
            ..ProxyConfig::default()
        };
        Ok(Self {
            variant,
            mode,
            cgroup,
            lab,
            backends,
            sources,
            config,
            proxier: None,
        })
    }

    fn endpoints(&self) -> Vec<Ipv4Addr> {
        self.lab.backends.iter().map(|b| *b.addr.ip()).collect()
    }

    /// Removes the mode's state.
    fn stop(&mut self) -> Result<()> {
        if let Some(old) = self.proxier.take() {
            self.lab.node.run(|| old.cleanup())??;
        }
        Ok(())
    }

    /// Removes the mode's state and starts it afresh, with a sync timeout or without.
    fn restart(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.stop()?;
        let config = ProxyConfig {
            sync_timeout: timeout,
            ..self.config.clone()
        };
        let mode = self.mode;
        self.proxier = Some(self.lab.node.run(|| start(mode, &config))??);
        Ok(())
    }

    fn sync(&mut self, state: &ProxyState) -> Result<Duration> {
        let proxier = self.proxier.as_mut().expect("started");
        Ok(self.lab.node.run(|| proxier.sync(state))??.duration)
    }

    /// Polls the measured service until it answers; the time it took.
    fn wait_serving(&self) -> Result<Duration> {
        let start = Instant::now();
        let target = SocketAddrV4::new(MEASURED_VIP, 80);
        while self.lab.client.run(|| tcp_request(target))?.is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("{}: the measured service never answered", self.variant.name);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(start.elapsed())
    }

    /// All three backends answer through the service (the verification before measuring).
    fn check_spread(&self) -> Result<()> {
        let target = SocketAddrV4::new(MEASURED_VIP, 80);
        let names = self.lab.client.run(|| {
            (0..60)
                .map(|_| tcp_request(target))
                .collect::<Result<std::collections::BTreeSet<_>>>()
        })??;
        if names.len() != self.lab.backends.len() {
            bail!(
                "{}: the measured service answered only from {names:?}",
                self.variant.name
            );
        }
        Ok(())
    }

    fn udp_received(&self) -> u64 {
        self.backends.iter().map(BenchBackend::udp_received).sum()
    }
}

impl Drop for ModeLab {
    fn drop(&mut self) {
        // Rules and conntrack go with the namespaces; eBPF pins live in bpffs and must go.
        if let Some(proxier) = self.proxier.take()
            && self.mode == Mode::Ebpf
        {
            let _ = self.lab.node.run(|| proxier.cleanup());
        }
    }
}

/// The desired state for `n` services (see the module docs).
pub fn workload(n: u32, endpoints: &[Ipv4Addr]) -> ProxyState {
    let port = |name: &str, protocol, port, endpoints: &[Ipv4Addr], target| ServicePort {
        name: name.into(),
        protocol,
        port,
        endpoints: endpoints
            .iter()
            .map(|ip| SocketAddrV4::new(*ip, target))
            .collect(),
        ..Default::default()
    };
    let mut state: ProxyState = (0..n.saturating_sub(1))
        .map(|i| {
            let fillers: Vec<Ipv4Addr> = (0..FILLER_ENDPOINTS)
                .map(|j| {
                    Ipv4Addr::from(
                        u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * FILLER_ENDPOINTS + j,
                    )
                })
                .collect();
            Service {
                namespace: "bench".into(),
                name: format!("filler-{i}"),
                cluster_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 97, 0, 0)) + i),
                ports: vec![port("http", Protocol::Tcp, 80, &fillers, 8080)],
                session_affinity: None,
                ..Default::default()
            }
        })
        .collect();
    state.insert(Service {
        namespace: "bench".into(),
        name: "iperf".into(),
        cluster_ip: IPERF_VIP,
        ports: vec![port(
            "iperf",
            Protocol::Tcp,
            IPERF_PORT,
            &endpoints[..1],
            IPERF_PORT,
        )],
        session_affinity: None,
        ..Default::default()
    });
    state.insert(Service {
        namespace: "bench".into(),
        name: "web".into(),
        cluster_ip: MEASURED_VIP,
        ports: vec![
            port("http", Protocol::Tcp, 80, endpoints, BACKEND_PORT),
            port("udp", Protocol::Udp, 53, endpoints, BACKEND_PORT),
        ],
        session_affinity: None,
        ..Default::default()
    });
    state
}

/// Kernel memory that rule sets and maps live in: slab, vmalloc and per-CPU, in bytes.
fn kernel_memory() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok(field("Slab") + field("VmallocUsed") + field("Percpu"))
}

/// Programming at one service count: from-scratch time, then the rules the data path needs.
struct Programmed {
    program_ms: f64,
    cold_start_ms: f64,
    over_budget: bool,
    endpoint_change_ms: Option<f64>,
    kernel_bytes: u64,
    map_bytes: Option<u64>,
    objects: u64,
}

fn program(
    lab: &mut ModeLab,
    n: u32,
    opts: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<Programmed> {
    let (mode, name) = (lab.mode, lab.variant.name);
    let endpoints = lab.endpoints();
    let state = workload(n, &endpoints);
    let budget = (mode != Mode::Ebpf).then_some(opts.program_budget);
    lab.stop()?;
    // Freed rules and maps go back after an RCU grace period.
    std::thread::sleep(Duration::from_millis(200));
    let before = kernel_memory()?;
    let cold = Instant::now();
    lab.restart(budget)?;
    progress(&format!("{n} services, {name}: programming from scratch"));
    let start = Instant::now();
    let (program_ms, over_budget) = match lab.sync(&state) {
        Ok(_) => {
            lab.wait_serving()?;
            (start.elapsed().as_secs_f64() * 1e3, false)
        }
        Err(e) if e.downcast_ref::<SyncTimedOut>().is_some() => {
            // Faithful programming did not finish in the budget: load the same final rules in
            // steps, so the data path can be measured.
            progress(&format!(
                "{n} services, {name}: over the budget; loading the rules in steps of {}",
                opts.load_step
            ));
            lab.restart(None)?;
            let proxier = lab.proxier.as_mut().expect("started");
            let step = opts.load_step as usize;
            lab.lab.node.run(|| proxier.load_in_steps(&state, step))??;
            lab.wait_serving()?;
            (opts.program_budget.as_secs_f64() * 1e3, true)
        }
        Err(e) => return Err(e),
    };
    // From nothing: starting the proxy is part of it (with `over_budget`, a lower bound too).
    let cold_start_ms = program_ms + (start - cold).as_secs_f64() * 1e3;
    let kernel_bytes = kernel_memory()?.saturating_sub(before);
    let endpoint_change_ms = if n == 10_000 {
        let mut changed = state.clone();
        changed.services[n as usize / 2].ports[0].endpoints[0] =
            SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 1), 8080);
        Some(lab.sync(&changed)?.as_secs_f64() * 1e3)
    } else {
        None
    };
    let usage = lab.proxier.as_ref().expect("started").kernel_usage()?;
    lab.check_spread()?;
    Ok(Programmed {
        program_ms,
        cold_start_ms,
        over_budget,
        endpoint_change_ms,
        kernel_bytes,
        map_bytes: usage.bytes,
        objects: usage.objects,
    })
}

/// Per-round samples of one mode.
#[derive(Default)]
struct Samples {
    cps: Vec<Run>,
    rr: Vec<Run>,
    direct_cps: Vec<f64>,
    gbps: Vec<f64>,
    direct_gbps: Vec<f64>,
    udp_pps: Vec<f64>,
    cpu: Vec<f64>,
    direct_cpu: Vec<f64>,
}

/// CPU µs per connection through the service and straight to the pods, at `rate` per second,
/// net of the machine's `background` CPU time per second.
fn measure_cpu(lab: &ModeLab, rate: f64, secs: Duration, background: f64) -> Result<(f64, f64)> {
    let _hooked = lab.cgroup.as_ref().map(cpu::Cgroup::enter).transpose()?;
    let measured = [SocketAddrV4::new(MEASURED_VIP, 80)];
    let pods = lab.lab.backend_addrs();
    let sources = lab.sources.clone();
    let per_conn = |targets: &[SocketAddrV4]| -> Result<f64> {
        let (spent, wall, run) = cpu::spent(|| {
            lab.lab
                .client
                .run(|| loadgen::paced_connections(targets, &sources, rate, secs))
        })?;
        let own = spent.as_secs_f64() - background * wall.as_secs_f64();
        Ok(own.max(0.0) * 1e6 / run.done.max(1) as f64)
    };
    Ok((per_conn(&measured)?, per_conn(&pods)?))
}

fn measure_round(lab: &ModeLab, opts: &Options, direct: bool, samples: &mut Samples) -> Result<()> {
    // The socket hooks see this process's sockets only while it is in their cgroup.
    let _hooked = lab.cgroup.as_ref().map(cpu::Cgroup::enter).transpose()?;
    let measured = SocketAddrV4::new(MEASURED_VIP, 80);
    let pod = lab.lab.backends[0].addr;
    let pods = lab.lab.backend_addrs();
    let (sources, secs, concurrency) = (lab.sources.clone(), opts.secs, opts.concurrency);
    samples.cps.push(
        lab.lab
            .client
            .run(|| loadgen::connections(&[measured], &sources, concurrency, secs))?,
    );
    samples.rr.push(
        lab.lab
            .client
            .run(|| loadgen::requests(measured, concurrency, secs))?,
    );
    if direct {
        let run = lab
            .lab
            .client
            .run(|| loadgen::connections(&pods, &sources, concurrency, secs))?;
        samples.direct_cps.push(run.rate());
    }
    let before = lab.udp_received();
    let udp = SocketAddrV4::new(MEASURED_VIP, 53);
    lab.lab
        .client
        .run(|| loadgen::udp_flood(udp, 8, 18, secs))??;
    std::thread::sleep(Duration::from_millis(50));
    samples
        .udp_pps
        .push((lab.udp_received() - before) as f64 / secs.as_secs_f64());
    let iperf_secs = secs.as_secs().max(1) as u32;
    let service = SocketAddrV4::new(IPERF_VIP, IPERF_PORT);
    samples
        .gbps
        .push(loadgen::iperf(&lab.lab.client, service, iperf_secs)?);
    if direct {
        let pod_iperf = SocketAddrV4::new(*pod.ip(), IPERF_PORT);
        samples
            .direct_gbps
            .push(loadgen::iperf(&lab.lab.client, pod_iperf, iperf_secs)?);
    }
    Ok(())
}

/// The median run of those without errors (all of them if every run had some).
fn median_run(runs: &[Run]) -> (Run, u64) {
    let errors = runs.iter().map(|r| r.errors).sum();
    let clean: Vec<&Run> = runs.iter().filter(|r| r.errors == 0).collect();
    let mut pool: Vec<&Run> = if clean.is_empty() {
        runs.iter().collect()
    } else {
        clean
    };
    pool.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    (pool[pool.len() / 2].clone(), errors)
}

/// Runs the whole benchmark.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Vec<Row>> {
    let run = format!("bench-{}", std::process::id());
    let mut rows = Vec::new();
    for &n in &opts.services {
        // Fresh labs for every count: no mode inherits another count's state, and deleting a
        // lab's namespaces frees its rules faster than removing them rule by rule.
        progress(&format!("{n} services: building a lab per mode"));
        let mut labs: Vec<ModeLab> = VARIANTS
            .iter()
            .map(|&v| ModeLab::new(v, &run))
            .collect::<Result<_>>()?;
        let mut programmed = Vec::new();
        for lab in &mut labs {
            programmed.push(program(lab, n, opts, progress)?);
        }
        let mut samples: Vec<Samples> = labs.iter().map(|_| Samples::default()).collect();
        for round in 0..opts.rounds {
            for k in 0..labs.len() {
                let i = (round + k) % labs.len();
                let mode = labs[i].variant.name;
                progress(&format!(
                    "{n} services: round {}/{}, {mode}",
                    round + 1,
                    opts.rounds
                ));
                let direct = round == 0 || opts.direct_every_round;
                measure_round(&labs[i], opts, direct, &mut samples[i])?;
            }
        }
        // CPU per connection at one offered rate every mode carries at this count.
        let slowest = samples
            .iter()
            .map(|s| median_run(&s.cps).0.rate())
            .fold(f64::INFINITY, f64::min);
        let rate = (slowest / 2.0).clamp(CPU_RATE_BOUNDS.0, CPU_RATE_BOUNDS.1);
        for round in 0..opts.rounds {
            progress(&format!(
                "{n} services: CPU per connection at {rate:.0}/s, round {}/{}",
                round + 1,
                opts.rounds
            ));
            let background = cpu::background(opts.secs)?;
            for k in 0..labs.len() {
                let i = (round + k) % labs.len();
                let (service, direct) = measure_cpu(&labs[i], rate, opts.secs, background)?;
                samples[i].cpu.push(service);
                samples[i].direct_cpu.push(direct);
            }
        }
        for ((lab, p), mut s) in labs.iter().zip(programmed).zip(samples) {
            let (mut cps, cps_errors) = median_run(&s.cps);
            let (mut rr, rr_errors) = median_run(&s.rr);
            rows.push(Row {
                mode: lab.variant.name,
                services: n,
                cps: cps.rate(),
                cps_p50_us: cps.latencies.quantile(0.5),
                cps_p99_us: cps.latencies.quantile(0.99),
                rr_per_s: rr.rate(),
                rr_p99_us: rr.latencies.quantile(0.99),
                gbps: median(&mut s.gbps),
                direct_gbps: median(&mut s.direct_gbps),
                direct_cps: median(&mut s.direct_cps),
                udp_pps: median(&mut s.udp_pps),
                program_ms: p.program_ms,
                cold_start_ms: p.cold_start_ms,
                cpu_us_per_conn: median(&mut s.cpu),
                direct_cpu_us_per_conn: median(&mut s.direct_cpu),
                cpu_rate: rate,
                program_over_budget: p.over_budget,
                endpoint_change_ms: p.endpoint_change_ms,
                kernel_bytes: p.kernel_bytes,
                map_bytes: p.map_bytes,
                kernel_objects: p.objects,
                errors: cps_errors + rr_errors,
            });
        }
        progress(&format!("{n} services: removing the labs"));
        drop(labs);
    }
    Ok(rows)
}
