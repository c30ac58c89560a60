//! `demo-dataplane`: the data plane carrying real traffic. Builds the lab (a client pod and three
//! backend pods on a node, each a network namespace), attaches the data plane to the client's
//! veth, opens real TCP connections and sends real UDP datagrams to service addresses, and
//! prints which backends answered and what the data plane counted.

use std::{collections::BTreeMap, net::SocketAddrV4, time::Instant};

use anyhow::{Context, Result, bail};
use ebpf_dataplane::{Config, Dataplane, DesiredService, Frontend, Scheduler, ServiceSpec};
use node_agent_netns::{
    lab::{CLIENT_ADDR, CLIENT_HOST_IF, Lab},
    traffic::{tcp_request, udp_request},
};

const FLOWS: usize = 300;

pub fn demo() -> Result<()> {
    let prefix = format!("keel-demo-{}", std::process::id());
    println!(
        "Building the lab: a node, a client pod ({CLIENT_ADDR}) and 3 backend pods, as network namespaces {prefix}-*"
    );
    let lab = Lab::new(&prefix, 3)?;
    let config = Config::with_pin_dir(format!("/sys/fs/bpf/{prefix}"));
    let mut dataplane = Dataplane::open(&config).context("open the data plane")?;
    let result = run(&lab, &mut dataplane);
    dataplane
        .destroy()
        .context("remove the data plane's pins")?;
    result
}

fn run(lab: &Lab, dataplane: &mut Dataplane) -> Result<()> {
    lab.node
        .run(|| dataplane.attach(CLIENT_HOST_IF, &[CLIENT_ADDR]))??;
    let backends = lab.backend_addrs();
    let web = Frontend::tcp("10.96.0.10:80".parse()?);
    let dns = Frontend::udp("10.96.0.10:53".parse()?);
    let sticky = Frontend::tcp("10.96.0.11:80".parse()?);
    let empty = Frontend::tcp("10.96.0.12:80".parse()?);
    let maglev = ServiceSpec {
        scheduler: Scheduler::Maglev { table_size: 1021 },
        affinity_timeout: None,
        ..Default::default()
    };
    dataplane
        .sync([
            DesiredService {
                frontend: web,
                spec: ServiceSpec::default(),
                backends: backends.clone(),
                source_ranges: Vec::new(),
            },
            DesiredService {
                frontend: dns,
                spec: ServiceSpec::default(),
                backends: backends.clone(),
                source_ranges: Vec::new(),
            },
            DesiredService {
                frontend: sticky,
                spec: maglev,
                backends: backends.clone(),
                source_ranges: Vec::new(),
            },
            DesiredService {
                frontend: empty,
                spec: ServiceSpec::default(),
                backends: vec![],
                source_ranges: Vec::new(),
            },
        ])
        .check()?;
    println!(
        "Data plane attached to {CLIENT_HOST_IF} (tc ingress and egress, TCX links pinned under bpffs)\n"
    );
    println!("{:<28} {:<44} {:>10}", "service", "traffic", "backends");

    let before = dataplane.stats()?;
    let start = Instant::now();
    let tcp = lab
        .client
        .run(|| spread(FLOWS, || tcp_request(web.addr)))??;
    println!(
        "{:<28} {:<44} {}",
        web.to_string(),
        format!("{FLOWS} TCP connections (random)"),
        tcp
    );
    let udp = lab
        .client
        .run(|| spread(FLOWS, || udp_request(dns.addr)))??;
    println!(
        "{:<28} {:<44} {}",
        dns.to_string(),
        format!("{FLOWS} UDP requests (random)"),
        udp
    );
    let mg = lab
        .client
        .run(|| spread(FLOWS, || tcp_request(sticky.addr)))??;
    println!(
        "{:<28} {:<44} {}",
        sticky.to_string(),
        format!("{FLOWS} TCP connections (Maglev)"),
        mg
    );
    let refused = lab.client.run(|| tcp_request(empty.addr))?;
    let outcome = match refused {
        Ok(name) => bail!("a service without backends answered as {name}"),
        Err(e) => format!("refused: {}", e.root_cause()),
    };
    println!(
        "{:<28} {:<44} {}",
        empty.to_string(),
        "1 TCP connection (no backends)",
        outcome
    );
    let elapsed = start.elapsed();

    let stats = dataplane.stats()?.since(&before);
    println!(
        "\nData-plane counters for this traffic ({:.1} s):",
        elapsed.as_secs_f64()
    );
    for (counter, value) in stats.iter().filter(|(_, v)| *v > 0) {
        println!("  {:<22} {value:>8}", counter.name());
    }
    println!("  {:<22} {:>8}", "drops (all reasons)", stats.drops());
    let names: BTreeMap<SocketAddrV4, &str> = backends
        .iter()
        .map(|&b| (b, lab.backend_name(b).unwrap_or("?")))
        .collect();
    println!(
        "\nBackends: {}",
        names
            .iter()
            .map(|(a, n)| format!("{n} = {a}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// Runs `request` `n` times; fails on the first error; returns "backend-1: n1, ..." .
fn spread(n: usize, request: impl Fn() -> Result<String>) -> Result<String> {
    let mut hits: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..n {
        *hits.entry(request()?).or_default() += 1;
    }
    Ok(hits
        .iter()
        .map(|(b, n)| format!("{b}: {n}"))
        .collect::<Vec<_>>()
        .join(", "))
}
