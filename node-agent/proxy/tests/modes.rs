//! Every proxy mode carries the same traffic: real TCP and UDP from a client pod to service
//! addresses, through the node, to backend pods.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use ebpf_dataplane::Counter;
use node_agent_netns::{
    lab::{BACKEND_PORT, CLIENT_HOST_IF, Lab},
    traffic::{Connection, tcp_request, tcp_request_from, udp_request, udp_request_unconnected},
};
use node_agent_proxy::{
    Mode, Protocol, Proxier, ProxyConfig, ProxyState, Service, ServicePort, start,
};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "network tests must run as root"
    );
}

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

fn ports(endpoints: &[Ipv4Addr]) -> Vec<ServicePort> {
    let endpoints: Vec<SocketAddrV4> = endpoints
        .iter()
        .map(|ip| SocketAddrV4::new(*ip, BACKEND_PORT))
        .collect();
    vec![
        ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            endpoints: endpoints.clone(),
            ..Default::default()
        },
        ServicePort {
            name: "dns".into(),
            protocol: Protocol::Udp,
            port: 53,
            endpoints,
            ..Default::default()
        },
    ]
}

fn state(endpoints: &[Ipv4Addr]) -> ProxyState {
    ProxyState::from_iter([
        Service {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: WEB,
            ports: ports(endpoints),
            session_affinity: None,
            ..Default::default()
        },
        Service {
            namespace: "default".into(),
            name: "empty".into(),
            cluster_ip: EMPTY,
            ports: ports(&[]),
            session_affinity: None,
            ..Default::default()
        },
    ])
}

fn config(test: &str, lab: &Lab) -> ProxyConfig {
    ProxyConfig {
        cluster_cidr: "10.244.0.0/16".into(),
        interfaces: vec![CLIENT_HOST_IF.into()],
        pin_dir: PathBuf::from(format!(
            "/sys/fs/bpf/keel-test-{test}-{}",
            std::process::id()
        )),
        pod_netns: vec![lab.client.path()],
        ..ProxyConfig::default()
    }
}

/// A proxy in the lab's node; cleaned up on drop.
struct Running {
    proxier: Option<Box<dyn Proxier>>,
    lab: Lab,
    config: ProxyConfig,
}

impl Running {
    fn start(lab: Lab, mode: Mode, config: ProxyConfig) -> Self {
        // Built before the proxy starts, so a failing start still removes what it pinned.
        let mut running = Self {
            proxier: None,
            lab,
            config,
        };
        let config = running.config.clone();
        let proxier = running
            .lab
            .node
            .run(|| start(mode, &config))
            .unwrap()
            .unwrap_or_else(|e| panic!("start {mode}: {e:#}"));
        running.proxier = Some(proxier);
        running
    }

    fn sync(&mut self, state: &ProxyState) {
        let proxier = self.proxier.as_mut().unwrap();
        self.lab
            .node
            .run(|| proxier.sync(state))
            .unwrap()
            .expect("sync");
    }

    fn switch(&mut self, mode: Mode) {
        // Starting a mode removes the others' state, as kube-proxy does.
        let old = self.proxier.take();
        drop(old);
        self.proxier = Some(
            self.lab
                .node
                .run(|| start(mode, &self.config))
                .unwrap()
                .expect("start"),
        );
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(proxier) = self.proxier.take() {
            let _ = self.lab.node.run(|| proxier.cleanup());
        }
        // eBPF pins live in bpffs, beyond the lab's namespaces.
        let _ = std::fs::remove_dir_all(&self.config.pin_dir);
    }
}

fn check_traffic(lab: &Lab, mode: Mode) {
    let all: BTreeSet<String> = lab.backends.iter().map(|b| b.name.clone()).collect();
    let (tcp, udp) = lab
        .client
        .run(|| {
            let mut tcp = BTreeSet::new();
            let mut udp = BTreeSet::new();
            for i in 0..150 {
                let web = SocketAddrV4::new(WEB, 80);
                tcp.insert(
                    tcp_request(web)
                        .unwrap_or_else(|e| panic!("{mode}: TCP connection {i}: {e:#}")),
                );
                let dns = SocketAddrV4::new(WEB, 53);
                udp.insert(
                    udp_request(dns).unwrap_or_else(|e| panic!("{mode}: UDP request {i}: {e:#}")),
                );
            }
            (tcp, udp)
        })
        .unwrap();
    assert_eq!(tcp, all, "{mode}: TCP reaches every backend");
    assert_eq!(udp, all, "{mode}: UDP reaches every backend");
    // What the client sees of its peer is the service, whatever the mode does underneath.
    let (peer, udp_from) = lab
        .client
        .run(|| {
            let conn = Connection::open(SocketAddrV4::new(WEB, 80)).expect("connect");
            let peer = conn.peer().expect("getpeername");
            let (_, from) =
                udp_request_unconnected(SocketAddrV4::new(WEB, 53)).expect("unconnected UDP");
            (peer, from)
        })
        .unwrap();
    assert_eq!(
        peer.to_string(),
        "10.96.0.10:80",
        "{mode}: getpeername shows the service"
    );
    assert_eq!(
        udp_from.to_string(),
        "10.96.0.10:53",
        "{mode}: UDP answers come from the service"
    );
    // A client that reuses a service connection's port to talk to that backend directly.
    let backends: Vec<(String, SocketAddrV4)> = lab
        .backends
        .iter()
        .map(|b| (b.name.clone(), b.addr))
        .collect();
    lab.client
        .run(|| {
            // Ports above the ephemeral range, so no earlier connection holds them in TIME_WAIT.
            for port in 61000..61030 {
                let local = SocketAddrV4::new(node_agent_netns::lab::CLIENT_ADDR, port);
                let name = tcp_request_from(local, SocketAddrV4::new(WEB, 80))
                    .unwrap_or_else(|e| panic!("{mode}: service connection from {local}: {e:#}"));
                let pod = backends
                    .iter()
                    .find(|(n, _)| *n == name)
                    .expect("a lab backend")
                    .1;
                // With socket-level load balancing the service connection had this very
                // 4-tuple; the client's own kernel may refuse it for an instant after the reset
                // (EADDRNOTAVAIL), which is not what this checks: try again then.
                let mut attempt = 0;
                let direct = loop {
                    match tcp_request_from(local, pod) {
                        Err(e) if attempt < 10 && format!("{e:#}").contains("os error 99") => {
                            attempt += 1;
                            std::thread::sleep(std::time::Duration::from_millis(20));
                        }
                        other => break other,
                    }
                }
                .unwrap_or_else(|e| {
                    panic!(
                        "{mode}: direct connection from {local} to {pod} after a service one: {e:#}"
                    )
                });
                assert_eq!(direct, name, "{mode}");
            }
        })
        .unwrap();
    let (tcp, udp) = lab
        .client
        .run(|| {
            (
                tcp_request(SocketAddrV4::new(EMPTY, 80)).map_err(|e| e.root_cause().to_string()),
                udp_request(SocketAddrV4::new(EMPTY, 53)).map_err(|e| e.root_cause().to_string()),
            )
        })
        .unwrap();
    assert!(
        tcp.as_ref().is_err_and(|e| e.contains("refused")),
        "{mode}: no endpoints, TCP refused: {tcp:?}"
    );
    assert!(
        udp.as_ref().is_err_and(|e| e.contains("refused")),
        "{mode}: no endpoints, UDP refused: {udp:?}"
    );
}

/// The eBPF data plane's counters, read from its pins.
fn ebpf_stats(config: &ProxyConfig) -> ebpf_dataplane::Stats {
    ebpf_dataplane::Dataplane::open(&ebpf_dataplane::Config::with_pin_dir(&config.pin_dir))
        .expect("adopt the pinned data plane")
        .stats()
        .expect("stats")
}

fn each_mode_carries_traffic(mode: Mode) {
    require_root();
    let test = format!("mode-{mode}");
    let lab = Lab::new(&format!("kt-{}-{test}", std::process::id()), 3).expect("lab");
    let endpoints: Vec<Ipv4Addr> = lab.backend_addrs().iter().map(|a| *a.ip()).collect();
    let mut running = {
        let config = config(&test, &lab);
        Running::start(lab, mode, config)
    };
    running.sync(&state(&endpoints));
    check_traffic(&running.lab, mode);
    if mode == Mode::Ebpf {
        let stats = ebpf_stats(&running.config);
        assert!(
            stats.get(Counter::SockLbForward) >= 300,
            "pod sockets are load balanced at connect: {stats:?}"
        );
        assert!(
            stats.get(Counter::SockLbReverse) >= 1,
            "recvmsg/getpeername show the service: {stats:?}"
        );
    }

    // An endpoint leaves (a partial sync): established connections stay, new ones avoid it.
    let removed = running.lab.backends[0].name.clone();
    let mut conns: Vec<(Connection, String)> = running
        .lab
        .client
        .run(|| {
            (0..20)
                .map(|_| {
                    let mut c = Connection::open(SocketAddrV4::new(WEB, 80)).expect("connect");
                    let name = c.ask().expect("answer");
                    (c, name)
                })
                .collect()
        })
        .unwrap();
    running.sync(&state(&endpoints[1..]));
    let names: Vec<String> = running
        .lab
        .client
        .run(|| {
            (0..60)
                .map(|_| tcp_request(SocketAddrV4::new(WEB, 80)).expect("connection"))
                .collect()
        })
        .unwrap();
    assert!(
        !names.contains(&removed),
        "{mode}: new connections avoid the removed endpoint"
    );
    for (conn, name) in &mut conns {
        assert_eq!(
            &conn.ask().expect("established connection still answers"),
            name,
            "{mode}"
        );
    }
}

#[test]
fn ebpf_mode_carries_traffic() {
    each_mode_carries_traffic(Mode::Ebpf);
}

#[test]
fn iptables_mode_carries_traffic() {
    each_mode_carries_traffic(Mode::Iptables);
}

#[test]
fn nftables_mode_carries_traffic() {
    each_mode_carries_traffic(Mode::Nftables);
}

/// What each mode leaves in the node's namespace.
fn leftovers(running: &Running) -> (bool, bool, bool) {
    let (iptables, nftables) = running
        .lab
        .node
        .run(|| {
            let save = std::process::Command::new("iptables-save")
                .output()
                .expect("iptables-save");
            let iptables = String::from_utf8_lossy(&save.stdout).contains("KUBE-");
            let nft = std::process::Command::new("nft")
                .args(["list", "tables"])
                .output()
                .expect("nft");
            let nftables = String::from_utf8_lossy(&nft.stdout).contains("kube-proxy");
            (iptables, nftables)
        })
        .unwrap();
    (running.config.pin_dir.exists(), iptables, nftables)
}

#[test]
fn switching_modes_removes_the_previous_modes_state() {
    require_root();
    let lab = Lab::new(&format!("kt-{}-switch", std::process::id()), 3).expect("lab");
    let endpoints: Vec<Ipv4Addr> = lab.backend_addrs().iter().map(|a| *a.ip()).collect();
    let mut running = {
        let config = config("switch", &lab);
        Running::start(lab, Mode::Iptables, config)
    };
    running.sync(&state(&endpoints));
    assert_eq!(
        leftovers(&running),
        (false, true, false),
        "iptables rules installed"
    );
    for (mode, expected) in [
        (Mode::Nftables, (false, false, true)),
        (Mode::Ebpf, (true, false, false)),
        (Mode::Iptables, (false, true, false)),
    ] {
        running.switch(mode);
        running.sync(&state(&endpoints));
        assert_eq!(
            leftovers(&running),
            expected,
            "after switching to {mode}: (ebpf pins, iptables, nftables)"
        );
        check_traffic(&running.lab, mode);
    }
    let proxier = running.proxier.take().unwrap();
    running
        .lab
        .node
        .run(|| proxier.cleanup())
        .unwrap()
        .expect("cleanup");
    assert_eq!(
        leftovers(&running),
        (false, false, false),
        "cleanup leaves nothing"
    );
}

/// The kernel's own listing of a mode's rules, as a sorted set of lines (order of declarations
/// differs between a load in steps and a sync; the content must not).
fn ruleset(running: &Running, mode: Mode) -> Vec<String> {
    let text = running
        .lab
        .node
        .run(|| {
            let out = match mode {
                Mode::Iptables => std::process::Command::new("iptables-save").output(),
                _ => std::process::Command::new("nft")
                    .args(["list", "table", "ip", "kube-proxy"])
                    .output(),
            };
            String::from_utf8_lossy(&out.expect("list rules").stdout).into_owned()
        })
        .unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l).trim().to_owned())
        .collect();
    lines.sort();
    lines
}

#[test]
fn loading_in_steps_gives_the_rules_of_one_sync() {
    require_root();
    for mode in [Mode::Iptables, Mode::Nftables] {
        let lab = Lab::new(&format!("kt-{}-steps-{mode}", std::process::id()), 3).expect("lab");
        let endpoints: Vec<Ipv4Addr> = lab.backend_addrs().iter().map(|a| *a.ip()).collect();
        let mut running = {
            let config = config("steps", &lab);
            Running::start(lab, mode, config)
        };
        let full = state(&endpoints);
        let fewer = state(&endpoints[1..]);
        let load = |running: &mut Running| {
            let proxier = running.proxier.as_mut().unwrap();
            running
                .lab
                .node
                .run(|| proxier.load_in_steps(&full, 1))
                .unwrap()
                .expect("load in steps");
        };
        load(&mut running);
        let loaded = ruleset(&running, mode);
        check_traffic(&running.lab, mode);
        running.switch(mode);
        running.sync(&full);
        assert_eq!(
            loaded,
            ruleset(&running, mode),
            "{mode}: the same rules either way"
        );

        // A proxy loaded in steps goes on with partial syncs that land where a sync lands.
        running.switch(mode);
        load(&mut running);
        running.sync(&fewer);
        let partial = ruleset(&running, mode);
        running.switch(mode);
        running.sync(&fewer);
        assert_eq!(
            partial,
            ruleset(&running, mode),
            "{mode}: a partial sync after a load"
        );
    }
}

#[test]
fn ebpf_mode_load_balances_ipv6_sockets_reaching_ipv4_services() {
    use std::io::{BufRead, BufReader, Write};
    require_root();
    let test = "mode-ebpf-v6";
    let lab = Lab::new(&format!("kt-{}-{test}", std::process::id()), 3).expect("lab");
    let endpoints: Vec<Ipv4Addr> = lab.backend_addrs().iter().map(|a| *a.ip()).collect();
    let mut running = {
        let config = config(test, &lab);
        Running::start(lab, Mode::Ebpf, config)
    };
    running.sync(&state(&endpoints));
    let before = ebpf_stats(&running.config);
    // Java and many runtimes open IPv6 sockets for everything and reach IPv4 peers through
    // v4-mapped addresses: the socket hooks must see those too.
    let mapped = |port| std::net::SocketAddr::new(WEB.to_ipv6_mapped().into(), port);
    const CONNECTIONS: u64 = 20;
    let names: BTreeSet<String> = running
        .lab
        .client
        .run(|| {
            let mut names = BTreeSet::new();
            for i in 0..CONNECTIONS {
                let stream = std::net::TcpStream::connect(mapped(80))
                    .unwrap_or_else(|e| panic!("IPv6 socket, connection {i}: {e}"));
                assert_eq!(stream.peer_addr().unwrap(), mapped(80), "getpeername");
                let mut writer = stream.try_clone().unwrap();
                writer.write_all(b"hello\n").unwrap();
                let mut line = String::new();
                BufReader::new(stream).read_line(&mut line).unwrap();
                names.insert(line.trim().to_owned());
            }
            let socket = std::net::UdpSocket::bind("[::]:0").unwrap();
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(3)))
                .unwrap();
            socket.send_to(b"hello\n", mapped(53)).unwrap();
            let mut buf = [0u8; 64];
            let (_, from) = socket.recv_from(&mut buf).expect("UDP answer");
            assert_eq!(from, mapped(53), "the answer comes from the service");
            names
        })
        .unwrap();
    assert!(
        names.len() > 1,
        "connections spread over backends: {names:?}"
    );
    let stats = ebpf_stats(&running.config).since(&before);
    assert!(
        stats.get(Counter::SockLbForward) > CONNECTIONS,
        "the IPv6 sockets were load balanced at connect/sendmsg, not per packet: {stats:?}"
    );
    assert_eq!(stats.get(Counter::DnatNew), 0, "{stats:?}");
}

#[test]
fn ebpf_mode_ends_udp_sockets_connected_to_a_backend_that_left() {
    require_root();
    let test = "mode-ebpf-udp-end";
    let lab = Lab::new(&format!("kt-{}-{test}", std::process::id()), 3).expect("lab");
    let endpoints: Vec<Ipv4Addr> = lab.backend_addrs().iter().map(|a| *a.ip()).collect();
    let removed = lab.backends[0].name.clone();
    let mut running = {
        let config = config(test, &lab);
        Running::start(lab, Mode::Ebpf, config)
    };
    running.sync(&state(&endpoints));
    // Connected UDP sockets get their backend once, at connect: no packet of theirs is
    // translated, so nothing but the socket itself holds the choice.
    let ask = |socket: &std::net::UdpSocket| -> std::io::Result<String> {
        socket.send(b"hello\n")?;
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    };
    // 30 client sockets, each asked once by `first`: (socket, the backend that answered).
    let clients = |first: &(dyn Fn(&std::net::UdpSocket) -> std::io::Result<String> + Sync)| {
        running
            .lab
            .client
            .run(|| {
                (0..30)
                    .map(|_| {
                        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                        socket
                            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                            .unwrap();
                        let name = first(&socket).expect("an answer");
                        (socket, name)
                    })
                    .collect::<Vec<(std::net::UdpSocket, String)>>()
            })
            .unwrap()
    };
    let sockets = clients(&|socket| {
        socket.connect(SocketAddrV4::new(WEB, 53))?;
        ask(socket)
    });
    assert!(sockets.iter().any(|(_, name)| *name == removed));
    // Unconnected ones are balanced at their first sendmsg() and keep that backend while it
    // stays a member (by its identity, not its slot): the others' clients do not move when
    // one backend leaves.
    let ask_to = |socket: &std::net::UdpSocket| -> std::io::Result<String> {
        socket.send_to(b"hello\n", SocketAddrV4::new(WEB, 53))?;
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf)?;
        assert_eq!(
            from,
            SocketAddrV4::new(WEB, 53).into(),
            "replies from the service"
        );
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    };
    let unconnected = clients(&ask_to);
    let kept: Vec<&str> = unconnected
        .iter()
        .map(|(_, n)| n.as_str())
        .filter(|n| *n != removed)
        .collect();
    assert!(
        kept.len() < unconnected.len() && !kept.is_empty(),
        "spread over the backends"
    );
    running.sync(&state(&endpoints[1..]));
    running
        .lab
        .client
        .run(|| {
            for (socket, name) in &unconnected {
                let now = ask_to(socket).expect("still answered");
                if *name == removed {
                    assert_ne!(now, removed, "balanced again");
                } else {
                    assert_eq!(&now, name, "a client of a backend that stayed keeps it");
                }
            }
        })
        .unwrap();
    running
        .lab
        .client
        .run(|| {
            for (socket, name) in &sockets {
                if *name == removed {
                    let mut buf = [0u8; 64];
                    let error = socket.recv(&mut buf).expect_err("the socket was ended");
                    assert_eq!(
                        error.raw_os_error(),
                        Some(libc::ECONNABORTED),
                        "a socket of the backend that left hears it: {error}"
                    );
                } else {
                    assert_eq!(&ask(socket).expect("still answered"), name);
                }
            }
            // Its replacement goes to a backend that is still there.
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            socket.connect(SocketAddrV4::new(WEB, 53)).unwrap();
            assert_ne!(ask(&socket).expect("an answer"), removed);
        })
        .unwrap();
}
