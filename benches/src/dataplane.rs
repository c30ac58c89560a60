//! `bench-dataplane`: per-packet cost of the data path under BPF_PROG_TEST_RUN, for growing numbers
//! of services, next to the floors measured in the same run on the same packets: a tc program
//! on the hook `from_pod` runs on that only passes the packet on (`tc_floor`, the figure the
//! path is compared with) and an XDP program that only returns XDP_PASS.
//!
//! Every figure rotates through many distinct flows, never one hot flow: 100,000 flows spread
//! over the services, in a shuffled order, more than the CPU caches hold (each flow has a
//! conntrack entry, a reverse entry and its service's value and backend slots to touch).
//!
//! - established: a 64-byte TCP ACK of each of the 100,000 open flows, in the second of two
//!   back-to-back passes: one conntrack lookup, the rewrite, the checksum fix-ups;
//! - established, idle: the first of those passes, a second or more after the previous one: a
//!   flow's first packet in a second also stamps its conntrack entry and checks its reverse
//!   entry is still there (one more lookup);
//! - new flow: a SYN of a flow never seen before, into a conntrack map that is full: the
//!   conntrack miss, the service lookup, the backend choice, the conntrack and reverse-NAT
//!   inserts, and the LRU eviction of the oldest flow each insert makes (steady state).
//!
//! Each packet is one BPF_PROG_TEST_RUN with one repetition (a repeated run would replay a
//! packet the program already translated); the figure is the kernel's own time of the runs,
//! without the syscall around them. That time includes the kernel's clock reads around the
//! run, as the floors' do: compare with the floors, not with zero. Figures are medians over
//! rounds; in every round the programs take turns on the same packets.

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
/// Open flows the established figure rotates through, and new flows per round.
pub const FLOWS: u32 = 100_000;
const BACKENDS_PER_SERVICE: u32 = 10;
const FRAME_LEN: usize = 64;
/// The new-flow data plane's conntrack size: smaller than the flows sent per round, so it is
/// full and every new flow evicts one.
const NEW_FLOW_CT_ENTRIES: u32 = 65_536;

#[derive(Debug, Serialize)]
pub struct Report {
    /// The XDP_PASS program, per packet.
    pub floor_ns: f64,
    /// The tc program that passes packets on (TCX_NEXT), on the same packets.
    pub tc_floor_ns: f64,
    pub results: Vec<Row>,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub services: u32,
    /// Distinct flows the figures rotate through.
    pub flows: u32,
    pub established_ns: f64,
    /// A flow's first packet after a second or more without one.
    pub established_idle_ns: f64,
    pub new_flow_ns: f64,
}

/// Runs the benchmark; `rounds` passes over the flows per figure.
pub fn bench(rounds: usize, mut progress: impl FnMut(&str)) -> Result<Report> {
    let (mut floors, mut tc_floors) = (Vec::new(), Vec::new());
    let mut results = Vec::new();
    for services in SERVICE_COUNTS {
        progress(&format!(
            "{services} services: programming, opening {FLOWS} flows"
        ));
        let mut setup = Setup::new(services)?;
        let (mut est, mut idle, mut new) = (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=rounds {
            progress(&format!("{services} services: round {round}/{rounds}"));
            let n = u64::from(FLOWS);
            floors.push(per_packet(setup.floor(n)?, n));
            tc_floors.push(per_packet(setup.tc_floor(n)?, n));
            idle.push(per_packet(setup.established(n)?, n));
            est.push(per_packet(setup.established(n)?, n));
            new.push(per_packet(setup.new_flow(n)?, n));
        }
        results.push(Row {
            services,
            flows: FLOWS,
            established_ns: median(&mut est),
            established_idle_ns: median(&mut idle),
            new_flow_ns: median(&mut new),
        });
    }
    Ok(Report {
        floor_ns: median(&mut floors),
        tc_floor_ns: median(&mut tc_floors),
        results,
    })
}

/// `services` services programmed into two data planes: one with [`FLOWS`] flows open, one
/// whose conntrack is full of other flows. Pins are removed on drop.
pub struct Setup {
    established: Dataplane,
    new_flow: Dataplane,
    /// The open flows' ACKs, in a shuffled order.
    open: Vec<Vec<u8>>,
    /// Where the next pass over the open flows starts.
    cursor: usize,
    services: u32,
    /// The next new flow's number (every one is a tuple never sent before).
    next_new: u32,
    pin_dirs: [PathBuf; 2],
}

impl Setup {
    pub fn new(services: u32) -> Result<Self> {
        ensure!(services >= 1, "at least one service");
        let pin_dirs = ["est", "new"].map(|kind| {
            PathBuf::from(format!(
                "/sys/fs/bpf/keel-bench-{}-{services}-{kind}",
                std::process::id()
            ))
        });
        for dir in &pin_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        let mut established =
            Dataplane::open(&Config::with_pin_dir(&pin_dirs[0])).context("open the data plane")?;
        let mut config = Config::with_pin_dir(&pin_dirs[1]);
        config.ct_entries = NEW_FLOW_CT_ENTRIES;
        let mut new_flow = Dataplane::open(&config).context("open the new-flow data plane")?;
        for dataplane in [&mut established, &mut new_flow] {
            dataplane.sync((0..services).map(service)).check()?;
        }
        let mut setup = Self {
            established,
            new_flow,
            open: Vec::new(),
            cursor: 0,
            services,
            next_new: 0,
            pin_dirs,
        };
        // Open every flow (SYN, then ACK: established), then keep their ACKs in a shuffled
        // order so consecutive packets touch unrelated entries.
        let mut acks = Vec::with_capacity(FLOWS as usize);
        for k in 0..FLOWS {
            let (client, frontend) = setup.flow(k);
            for flags in [TCP_SYN, TCP_ACK] {
                let out = setup.established.test_run(
                    Hook::FromPod,
                    &tcp(client, frontend.addr, flags)
                        .frame_len(FRAME_LEN)
                        .build(),
                    1,
                )?;
                ensure!(out.verdict == TCX_NEXT, "flow {k} opens ({})", out.verdict);
            }
            acks.push(
                tcp(client, frontend.addr, TCP_ACK)
                    .frame_len(FRAME_LEN)
                    .build(),
            );
        }
        shuffle(&mut acks, 0x5eed);
        setup.open = acks;
        let (client, frontend) = setup.flow(FLOWS - 1);
        ensure!(
            setup.established.conntrack(client, frontend)?.is_some(),
            "the flows have conntrack entries"
        );
        // Fill the new-flow data plane's conntrack: from here on every new flow evicts one.
        setup.new_flow(u64::from(NEW_FLOW_CT_ENTRIES))?;
        Ok(setup)
    }

    /// Flow `k` of the open ones: a client address of its own, to service `k % services`.
    fn flow(&self, k: u32) -> (SocketAddrV4, Frontend) {
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 0)) + k);
        let frontend = service(k % self.services).frontend;
        (SocketAddrV4::new(client, 40000), frontend)
    }

    /// The next `n` open flows' ACKs, rotating.
    fn next_open(&mut self, n: u64) -> Vec<usize> {
        let len = self.open.len();
        let start = self.cursor;
        self.cursor = (start + n as usize) % len;
        (0..n as usize).map(|i| (start + i) % len).collect()
    }

    /// Kernel time of the XDP_PASS floor over `n` open flows' packets.
    pub fn floor(&mut self, n: u64) -> Result<Duration> {
        let order = self.next_open(n);
        run(
            &mut self.established,
            Hook::XdpFloor,
            &self.open,
            &order,
            XDP_PASS,
            None,
        )
    }

    /// Kernel time of the tc floor over `n` open flows' packets.
    pub fn tc_floor(&mut self, n: u64) -> Result<Duration> {
        let order = self.next_open(n);
        run(
            &mut self.established,
            Hook::TcFloor,
            &self.open,
            &order,
            TCX_NEXT,
            None,
        )
    }

    /// Kernel time of the established path over `n` open flows' ACKs; checks every packet took
    /// it.
    pub fn established(&mut self, n: u64) -> Result<Duration> {
        let order = self.next_open(n);
        let counter = Some(Counter::DnatEstablished);
        run(
            &mut self.established,
            Hook::FromPod,
            &self.open,
            &order,
            TCX_NEXT,
            counter,
        )
    }

    /// Kernel time of the new-flow path over `n` flows never seen before; checks every packet
    /// took it.
    pub fn new_flow(&mut self, n: u64) -> Result<Duration> {
        let packets: Vec<Vec<u8>> = (0..n)
            .map(|_| {
                let k = self.next_new;
                self.next_new = self.next_new.wrapping_add(1);
                // Client addresses 10.64.0.0 on, one per new flow: no tuple comes twice.
                let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + k);
                let frontend = service(k % self.services).frontend;
                tcp(SocketAddrV4::new(client, 40000), frontend.addr, TCP_SYN)
                    .frame_len(FRAME_LEN)
                    .build()
            })
            .collect();
        let order: Vec<usize> = (0..packets.len()).collect();
        let counter = Some(Counter::DnatNew);
        run(
            &mut self.new_flow,
            Hook::FromPod,
            &packets,
            &order,
            TCX_NEXT,
            counter,
        )
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for dir in &self.pin_dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs `hook` once on each packet of `order`; the sum of the kernel's per-run times.
fn run(
    dataplane: &mut Dataplane,
    hook: Hook,
    packets: &[Vec<u8>],
    order: &[usize],
    verdict: u32,
    counter: Option<Counter>,
) -> Result<Duration> {
    let before = dataplane.stats()?;
    let mut total = Duration::ZERO;
    for &i in order {
        let out = dataplane.test_run(hook, &packets[i], 1)?;
        ensure!(
            out.verdict == verdict,
            "{hook:?} returned {}, expected {verdict}",
            out.verdict
        );
        total += out.per_run;
    }
    if let Some(counter) = counter {
        let delta = dataplane.stats()?.since(&before);
        ensure!(
            delta.get(counter) >= order.len() as u64 && delta.get(Counter::CtRace) == 0,
            "not every packet took the {} path: {:?}",
            counter.name(),
            delta.iter().filter(|(_, v)| *v > 0).collect::<Vec<_>>()
        );
    }
    Ok(total)
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
        source_ranges: Vec::new(),
    }
}

/// Fisher-Yates with a fixed xorshift seed: the same order in every run.
fn shuffle<T>(items: &mut [T], mut state: u64) {
    for i in (1..items.len()).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
}

fn per_packet(total: Duration, packets: u64) -> f64 {
    total.as_secs_f64() * 1e9 / packets as f64
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The table `bench-dataplane` prints.
pub fn table(report: &Report) -> String {
    let f = report.tc_floor_ns;
    let mut out = format!(
        "floors: tc (TCX_NEXT) {f:.1} ns/packet, XDP_PASS {:.1} ns/packet, over {FLOWS} distinct flows\n\n",
        report.floor_ns
    );
    out.push_str(&format!(
        "{:>9} {:>8} {:>15} {:>10} {:>9} {:>12} {:>10}\n",
        "services", "flows", "established ns", "- floor", "idle ns", "new flow ns", "- floor"
    ));
    for r in &report.results {
        out.push_str(&format!(
            "{:>9} {:>8} {:>15.1} {:>10.1} {:>9.1} {:>12.1} {:>10.1}\n",
            r.services,
            r.flows,
            r.established_ns,
            r.established_ns - f,
            r.established_idle_ns,
            r.new_flow_ns,
            r.new_flow_ns - f
        ));
    }
    if let (Some(first), Some(last)) = (report.results.first(), report.results.last()) {
        out.push_str(&format!(
            "\n{} vs {} services: established {:.2}x, new flow {:.2}x\n",
            last.services,
            first.services,
            last.established_ns / first.established_ns,
            last.new_flow_ns / first.new_flow_ns
        ));
    }
    out
}
