//! `bench-dataplane`: per-packet cost of the data path under BPF_PROG_TEST_RUN, for growing numbers
//! of services, next to the floor (a program that only returns XDP_PASS) measured in the same
//! run. Figures are medians over rounds, the three programs interleaved in every round so
//! machine noise hits them alike.
//!
//! - established: a 64-byte TCP ACK of a flow that has its conntrack entry, to the service added
//!   last: one conntrack lookup, the rewrite, the checksum fix-ups;
//! - new flow: the same packet through programs loaded with `force_ct_miss`, so every repetition
//!   takes the conntrack-miss path: service lookup, backend choice, conntrack and reverse-NAT
//!   inserts (over the same tuple, so LRU eviction of other flows is not part of the figure).
//!
//! BPF_PROG_TEST_RUN reruns a tc program on the same buffer without restoring it, so a packet
//! translated to a backend would make every later repetition a cheap pass-through. The measured
//! service's ten backend slots therefore hold the service's own address: each rewrite leaves a
//! packet to the service and every repetition does the whole work (the kernel path does not
//! depend on what the addresses are). The other services have ten distinct backends each.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use ebpf_dataplane::{
    Config, Counter, Dataplane, DesiredService, Frontend, Hook, ServiceSpec,
    packet::{TCP_ACK, TCP_SYN, tcp},
    verdict::{TCX_NEXT, XDP_PASS},
};
use serde::Serialize;

pub const SERVICE_COUNTS: [u32; 4] = [1, 1_000, 10_000, 100_000];
const BACKENDS_PER_SERVICE: u32 = 10;
const REPEAT: u32 = 1_000_000;
const FRAME_LEN: usize = 64;

#[derive(Debug, Serialize)]
pub struct Report {
    pub floor_ns: f64,
    pub results: Vec<Row>,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub services: u32,
    pub established_ns: f64,
    pub new_flow_ns: f64,
}

/// Runs the benchmark; `rounds` repetitions of 1,000,000 packets per figure.
pub fn bench(rounds: usize, mut progress: impl FnMut(&str)) -> Result<Report> {
    let mut floors = Vec::new();
    let mut results = Vec::new();
    for services in SERVICE_COUNTS {
        progress(&format!("{services} services: programming"));
        let mut setup = Setup::new(services)?;
        let (mut est, mut new) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            progress(&format!("{services} services: round {round}/{rounds}"));
            floors.push(nanos(setup.floor(REPEAT)?));
            est.push(nanos(setup.established(REPEAT)?));
            new.push(nanos(setup.new_flow(REPEAT)?));
        }
        results.push(Row {
            services,
            established_ns: median(&mut est),
            new_flow_ns: median(&mut new),
        });
    }
    Ok(Report {
        floor_ns: median(&mut floors),
        results,
    })
}

/// `services` services programmed, a flow to the last one open, and two sets of programs on
/// the same maps: the normal ones and ones that always miss conntrack. Pins are removed on drop.
pub struct Setup {
    established: Dataplane,
    new_flow: Dataplane,
    packet: Vec<u8>,
    pin_dir: PathBuf,
}

impl Setup {
    pub fn new(services: u32) -> Result<Self> {
        ensure!(services >= 1, "at least one service");
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/keel-bench-{}-{services}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&pin_dir);
        let config = Config::with_pin_dir(&pin_dir);
        let mut established = Dataplane::open(&config).context("open the data plane")?;
        let last = measured(services - 1);
        established
            .sync((0..services - 1).map(service).chain([last.clone()]))
            .check()?;
        let new_flow = Dataplane::open(&Config {
            force_ct_miss: true,
            ..config.clone()
        })
        .context("open the forced-miss data plane")?;
        ensure!(
            new_flow.services().count() == services as usize,
            "the second loader adopts the services"
        );

        let client = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 40000);
        let open = tcp(client, last.frontend.addr, TCP_SYN)
            .frame_len(FRAME_LEN)
            .build();
        let packet = tcp(client, last.frontend.addr, TCP_ACK)
            .frame_len(FRAME_LEN)
            .build();
        ensure!(packet.len() == FRAME_LEN);
        let out = established.test_run(Hook::FromPod, &open, 1)?;
        ensure!(
            out.verdict == TCX_NEXT,
            "the flow opens (verdict {})",
            out.verdict
        );
        ensure!(
            established.conntrack(client, last.frontend)?.is_some(),
            "the flow has a conntrack entry"
        );
        Ok(Self {
            established,
            new_flow,
            packet,
            pin_dir,
        })
    }

    /// Per-packet time of the XDP_PASS floor over `repeat` runs.
    pub fn floor(&mut self, repeat: u32) -> Result<Duration> {
        run(
            &mut self.established,
            Hook::XdpFloor,
            &self.packet,
            repeat,
            XDP_PASS,
            None,
        )
    }

    /// Per-packet time of the established path; checks every run took it.
    pub fn established(&mut self, repeat: u32) -> Result<Duration> {
        let counter = Some(Counter::DnatEstablished);
        run(
            &mut self.established,
            Hook::FromPod,
            &self.packet,
            repeat,
            TCX_NEXT,
            counter,
        )
    }

    /// Per-packet time of the new-flow path; checks every run took it.
    pub fn new_flow(&mut self, repeat: u32) -> Result<Duration> {
        let counter = Some(Counter::DnatNew);
        run(
            &mut self.new_flow,
            Hook::FromPod,
            &self.packet,
            repeat,
            TCX_NEXT,
            counter,
        )
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn run(
    dataplane: &mut Dataplane,
    hook: Hook,
    packet: &[u8],
    repeat: u32,
    verdict: u32,
    counter: Option<Counter>,
) -> Result<Duration> {
    let before = dataplane.stats()?;
    let out = dataplane.test_run(hook, packet, repeat)?;
    ensure!(
        out.verdict == verdict,
        "{hook:?} returned {}, expected {verdict}",
        out.verdict
    );
    if let Some(counter) = counter {
        let delta = dataplane.stats()?.since(&before);
        ensure!(
            delta.get(counter) >= u64::from(repeat),
            "not every run took the {} path: {:?}",
            counter.name(),
            delta.iter().filter(|(_, v)| *v > 0).collect::<Vec<_>>()
        );
    }
    Ok(out.per_run)
}

/// The measured service: its ten backend slots hold its own address (see the module docs).
fn measured(i: u32) -> DesiredService {
    let mut service = service(i);
    service.backends = vec![service.frontend.addr; BACKENDS_PER_SERVICE as usize];
    service
}

/// Service `i`: VIP 10.96.0.0 + i, port 80, ten backends of its own.
pub fn service(i: u32) -> DesiredService {
    let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
    let backends = (0..BACKENDS_PER_SERVICE)
        .map(|j| {
            let ip = Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * BACKENDS_PER_SERVICE + j,
            );
            SocketAddrV4::new(ip, 8080)
        })
        .collect();
    DesiredService {
        frontend: Frontend::tcp(SocketAddrV4::new(vip, 80)),
        spec: ServiceSpec::default(),
        backends,
    }
}

fn nanos(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The table `dpctl bench` prints.
pub fn table(report: &Report) -> String {
    let f = report.floor_ns;
    let mut out = format!(
        "floor (XDP_PASS): {f:.1} ns/packet\n\n{:>9} {:>16} {:>8} {:>14} {:>8}\n",
        "services", "established ns", "x floor", "new flow ns", "x floor"
    );
    for r in &report.results {
        out.push_str(&format!(
            "{:>9} {:>16.1} {:>8.2} {:>14.1} {:>8.2}\n",
            r.services,
            r.established_ns,
            r.established_ns / f,
            r.new_flow_ns,
            r.new_flow_ns / f
        ));
    }
    if let (Some(first), Some(last)) = (report.results.first(), report.results.last()) {
        out.push_str(&format!(
            "\n{} vs {} services: established {:+.1}%, new flow {:+.1}%\n",
            last.services,
            first.services,
            (last.established_ns / first.established_ns - 1.0) * 100.0,
            (last.new_flow_ns / first.new_flow_ns - 1.0) * 100.0
        ));
    }
    out
}
