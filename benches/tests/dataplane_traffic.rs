//! Real sockets through the data plane: a client namespace reaches backend namespaces running
//! real TCP and UDP servers through service addresses that only the eBPF programs make work.
//! (Here rather than beside `dpctl`, so that the eBPF tree depends on nothing of the node
//! agent's; `cargo xtask test` builds the `dpctl` binary these tests run.)

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use ebpf_dataplane::packet;
use ebpf_dataplane::{Config, Counter, Dataplane, Frontend, ServiceSpec, TcAttachType};
use ebpf_dpctl::state::{ServiceEntry, State};
use node_agent_netns::{
    echo::EchoServer,
    lab::{CLIENT_ADDR, CLIENT_HOST_IF, Lab},
    traffic::{Connection, tcp_request, udp_request},
};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "network tests must run as root"
    );
}

/// A lab and a data plane attached to it, both removed when the test ends (also on failure).
struct Setup {
    dataplane: Option<Dataplane>,
    pin_dir: PathBuf,
    lab: Lab,
}

impl Setup {
    fn new(test: &str) -> Self {
        Self::with_config(test, |_| {})
    }

    /// With the data plane's settings changed by `configure`.
    fn with_config(test: &str, configure: impl FnOnce(&mut Config)) -> Self {
        require_root();
        let lab = Lab::new(&format!("kt-{}-{test}", std::process::id()), 3).expect("build the lab");
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/keel-test-{test}-{}",
            std::process::id()
        ));
        let mut config = Config::with_pin_dir(&pin_dir);
        configure(&mut config);
        let mut dataplane = Dataplane::open(&config).expect("open the data plane");
        // The client is a pod: it may only send from its own address.
        lab.node
            .run(|| dataplane.attach(CLIENT_HOST_IF, &[CLIENT_ADDR]))
            .unwrap()
            .expect("attach");
        Self {
            dataplane: Some(dataplane),
            pin_dir,
            lab,
        }
    }

    fn dataplane(&mut self) -> &mut Dataplane {
        self.dataplane.as_mut().expect("open")
    }

    fn backend_name(&self, addr: SocketAddrV4) -> String {
        self.lab
            .backend_name(addr)
            .expect("a lab backend")
            .to_owned()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        drop(self.dataplane.take());
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn web() -> Frontend {
    Frontend::tcp("10.96.0.10:80".parse().unwrap())
}

fn dns() -> Frontend {
    Frontend::udp("10.96.0.10:53".parse().unwrap())
}

fn serve(setup: &mut Setup, frontend: Frontend, backends: Vec<SocketAddrV4>) {
    let dp = setup.dataplane();
    dp.upsert_service(frontend, ServiceSpec::default()).unwrap();
    dp.set_backends(frontend, &backends).unwrap();
}

#[test]
fn every_connection_completes_and_every_backend_is_used() {
    let mut setup = Setup::new("all");
    let backends = setup.lab.backend_addrs();
    serve(&mut setup, web(), backends.clone());
    serve(&mut setup, dns(), backends.clone());
    let (tcp, udp) = setup
        .lab
        .client
        .run(|| {
            let mut tcp: BTreeMap<String, u32> = BTreeMap::new();
            let mut udp: BTreeMap<String, u32> = BTreeMap::new();
            for i in 0..300 {
                let name =
                    tcp_request(web().addr).unwrap_or_else(|e| panic!("TCP connection {i}: {e:#}"));
                *tcp.entry(name).or_default() += 1;
                let name =
                    udp_request(dns().addr).unwrap_or_else(|e| panic!("UDP request {i}: {e:#}"));
                *udp.entry(name).or_default() += 1;
            }
            (tcp, udp)
        })
        .unwrap();
    let all: BTreeSet<String> = backends.iter().map(|&b| setup.backend_name(b)).collect();
    assert_eq!(
        tcp.keys().cloned().collect::<BTreeSet<_>>(),
        all,
        "TCP reached every backend: {tcp:?}"
    );
    assert_eq!(
        udp.keys().cloned().collect::<BTreeSet<_>>(),
        all,
        "UDP reached every backend: {udp:?}"
    );
    let stats = setup.dataplane().stats().unwrap();
    assert_eq!(
        stats.drops(),
        0,
        "no packet was dropped: {:?}",
        stats.iter().collect::<Vec<_>>()
    );
}

#[test]
fn programs_attached_after_ours_still_see_every_packet() {
    let mut setup = Setup::new("chain");
    let backends = setup.lab.backend_addrs();
    serve(&mut setup, web(), backends.clone());
    let (node, dp) = (&setup.lab.node, setup.dataplane.as_mut().unwrap());
    let ingress = node
        .run(|| dp.attach_probe(CLIENT_HOST_IF, TcAttachType::Ingress))
        .unwrap()
        .expect("attach a probe after from_pod");
    let egress = node
        .run(|| dp.attach_probe(CLIENT_HOST_IF, TcAttachType::Egress))
        .unwrap()
        .expect("attach a probe after to_pod");
    // A restart re-attaches ours; the probes must stay behind them in the chain and run.
    node.run(|| dp.attach(CLIENT_HOST_IF, &[CLIENT_ADDR]))
        .unwrap()
        .expect("re-attach");
    const REQUESTS: u64 = 20;
    let (in_before, out_before) = (ingress.runs().unwrap(), egress.runs().unwrap());
    setup
        .lab
        .client
        .run(|| {
            for i in 0..REQUESTS {
                // Not to a service (ours pass it on untouched) and to one (translated).
                tcp_request(backends[0]).unwrap_or_else(|e| panic!("direct request {i}: {e:#}"));
                tcp_request(web().addr).unwrap_or_else(|e| panic!("service request {i}: {e:#}"));
            }
        })
        .unwrap();
    let stats = setup.dataplane().stats().unwrap();
    assert!(stats.get(Counter::PassNotService) >= REQUESTS * 3);
    assert!(stats.get(Counter::DnatNew) >= REQUESTS);
    // Every TCP connection sends at least SYN, ACK, request and FIN each way.
    let ran_in = ingress.runs().unwrap() - in_before;
    let ran_out = egress.runs().unwrap() - out_before;
    assert!(
        ran_in >= 2 * REQUESTS * 4 && ran_out >= 2 * REQUESTS * 4,
        "the programs after ours ran on {ran_in} packets from the pod and {ran_out} to it, \
         of {} connections",
        2 * REQUESTS
    );
}

#[test]
fn removing_a_backend_stops_new_connections_but_keeps_established_ones() {
    let mut setup = Setup::new("remove");
    let backends = setup.lab.backend_addrs();
    serve(&mut setup, web(), backends.clone());
    let removed = backends[0];
    let removed_name = setup.backend_name(removed);
    let mut conns = setup
        .lab
        .client
        .run(|| {
            (0..30)
                .map(|_| {
                    let mut c = Connection::open(web().addr).expect("connect");
                    let name = c.ask().expect("first answer");
                    (c, name)
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(
        conns.iter().any(|(_, name)| *name == removed_name),
        "30 connections reach backend-1"
    );

    setup
        .dataplane()
        .set_backends(web(), &backends[1..])
        .unwrap();

    let removed_again = removed_name.clone();
    let new_ones = setup
        .lab
        .client
        .run(move || {
            (0..100)
                .map(|i| {
                    tcp_request(web().addr).unwrap_or_else(|e| panic!("new connection {i}: {e:#}"))
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(
        !new_ones.contains(&removed_again),
        "no new connection reaches the removed backend"
    );
    for (i, (conn, name)) in conns.iter_mut().enumerate() {
        for _ in 0..3 {
            let again = conn
                .ask()
                .unwrap_or_else(|e| panic!("established connection {i} to {name}: {e:#}"));
            assert_eq!(
                &again, name,
                "an established connection stays on its backend"
            );
        }
    }
}

#[test]
fn a_service_without_backends_refuses_at_once() {
    let mut setup = Setup::new("refuse");
    setup
        .dataplane()
        .upsert_service(web(), ServiceSpec::default())
        .unwrap();
    setup
        .dataplane()
        .upsert_service(dns(), ServiceSpec::default())
        .unwrap();
    let (tcp, udp, elapsed) = setup
        .lab
        .client
        .run(|| {
            let start = Instant::now();
            let tcp = tcp_request(web().addr).map_err(|e| e.root_cause().to_string());
            let udp = udp_request(dns().addr).map_err(|e| e.root_cause().to_string());
            (tcp, udp, start.elapsed())
        })
        .unwrap();
    assert!(
        tcp.as_ref().is_err_and(|e| e.contains("refused")),
        "TCP is refused: {tcp:?}"
    );
    assert!(
        udp.as_ref().is_err_and(|e| e.contains("refused")),
        "UDP is refused: {udp:?}"
    );
    // Timeouts would take seconds; a refusal is immediate. (Not a timing benchmark: 2 s is
    // far beyond any refusal and below two connect timeouts.)
    assert!(
        elapsed < Duration::from_secs(2),
        "refused without waiting for timeouts ({elapsed:?})"
    );
    assert_eq!(
        setup
            .dataplane()
            .stats()
            .unwrap()
            .get(ebpf_dataplane::Counter::RejectNoBackend),
        2
    );
}

/// `dpctl run` in the node's namespace, reading a state file.
struct Owner {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// The line saying it is ready.
    ready: String,
}

impl Owner {
    fn start(lab: &Lab, pin_dir: &std::path::Path, state: &std::path::Path) -> Self {
        let mut child = lab
            .node
            .command(benches::lab::sibling_binary("dpctl").expect("dpctl"))
            .unwrap()
            .args(["run", "--pin-dir"])
            .arg(pin_dir)
            .arg("--state")
            .arg(state)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start dpctl run");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut owner = Self {
            child,
            lines,
            ready: String::new(),
        };
        owner.ready = owner.wait_for("ready");
        owner
    }

    fn wait_for(&mut self, text: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(e) => panic!(
                    "dpctl run never said {text:?}: {e} (exit: {:?})",
                    self.child.try_wait()
                ),
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.kill();
    }
}

fn state_file(backends: &[SocketAddrV4]) -> State {
    State {
        interfaces: vec![CLIENT_HOST_IF.to_owned()],
        services: vec![ServiceEntry {
            frontend: web().to_string(),
            backends: backends.to_vec(),
            scheduler: None,
            maglev_table_size: None,
            affinity_timeout_s: None,
        }],
    }
}

#[test]
fn restarting_the_owner_mid_traffic_fails_no_connection() {
    require_root();
    let lab = Lab::new(&format!("kt-{}-restart", std::process::id()), 3).expect("build the lab");
    let pin_dir = PathBuf::from(format!(
        "/sys/fs/bpf/keel-test-restart-{}",
        std::process::id()
    ));
    let dir = std::env::temp_dir().join(format!("keel-test-restart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state_path = dir.join("state.json");
    let backends = lab.backend_addrs();
    state_file(&backends).save(&state_path).unwrap();
    let _cleanup = Cleanup(vec![pin_dir.clone(), dir.clone()]);

    let mut owner = Owner::start(&lab, &pin_dir, &state_path);

    // Traffic: a stream of short connections and a few persistent ones, from the client.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..2 {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        workers.push(
            lab.client
                .spawn(move || {
                    let mut persistent =
                        Connection::open(web().addr).expect("persistent connection");
                    let first = persistent.ask().expect("first answer");
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        match tcp_request(web().addr) {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures
                                .lock()
                                .unwrap()
                                .push(format!("worker {w} connection {i}: {e:#}")),
                        }
                        if i.is_multiple_of(10) {
                            match persistent.ask() {
                                Ok(name) if name == first => {}
                                other => failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("worker {w} persistent: {other:?}")),
                            }
                        }
                        i += 1;
                    }
                })
                .unwrap(),
        );
    }
    let wait_for_more = |ok: &AtomicU64, n: u64| {
        let target = ok.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(30);
        while ok.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "traffic stalled");
            thread::sleep(Duration::from_millis(10));
        }
    };

    wait_for_more(&ok, 200);
    owner.kill();
    // Nobody owns the data plane now: 200 more connections must complete.
    wait_for_more(&ok, 200);
    let mut owner = Owner::start(&lab, &pin_dir, &state_path);
    assert!(
        owner.ready.contains("adopted 1 services"),
        "the new owner adopted the pins: {}",
        owner.ready
    );
    wait_for_more(&ok, 200);
    // The restarted owner adopted the data plane and can change it.
    state_file(&backends[..2]).save(&state_path).unwrap();
    owner.wait_for("1 updated");
    wait_for_more(&ok, 200);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed connections, first: {:?}",
        failures.len(),
        failures.first()
    );

    // After the change, new connections avoid the removed backend.
    let removed = lab.backend_name(backends[2]).unwrap().to_owned();
    let names = lab
        .client
        .run(|| {
            (0..50)
                .map(|_| tcp_request(web().addr).expect("connection"))
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(
        !names.contains(&removed),
        "the restarted owner's change took effect"
    );
    owner.kill();
}

struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

#[test]
fn the_desired_state_file_reports_bad_entries() {
    let state: State =
        serde_json::from_str(r#"{"services":[{"frontend":"sctp/10.0.0.1:80"}]}"#).unwrap();
    let err = state.desired().unwrap_err();
    assert!(format!("{err:#}").contains("unknown protocol"), "{err:#}");
    let err = serde_json::from_str::<State>(
        r#"{"services":[{"frontend":"tcp/10.0.0.1:80","backend":[]}]}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
}

#[test]
fn a_pod_chosen_as_its_own_backend_reaches_itself() {
    let mut setup = Setup::new("hairpin");
    // The client pod serves too, and is the services' only backend: every flow hairpins.
    let own = SocketAddrV4::new(CLIENT_ADDR, 9090);
    let _server = setup
        .lab
        .client
        .run(|| EchoServer::start(own, "client"))
        .unwrap()
        .expect("start a server in the client pod");
    let (tcp, udp) = (
        Frontend::tcp("10.96.0.30:80".parse().unwrap()),
        Frontend::udp("10.96.0.30:53".parse().unwrap()),
    );
    serve(&mut setup, tcp, vec![own]);
    serve(&mut setup, udp, vec![own]);
    setup
        .lab
        .client
        .run(|| {
            for i in 0..20 {
                let name = tcp_request(tcp.addr).unwrap_or_else(|e| panic!("TCP {i}: {e:#}"));
                assert_eq!(name, "client");
                // Connected UDP: only an answer from the service address is received.
                let name = udp_request(udp.addr).unwrap_or_else(|e| panic!("UDP {i}: {e:#}"));
                assert_eq!(name, "client");
            }
            let mut conn = Connection::open(tcp.addr).expect("connect");
            for _ in 0..3 {
                assert_eq!(conn.ask().expect("ask"), "client");
            }
            assert_eq!(conn.peer().unwrap(), std::net::SocketAddr::V4(tcp.addr));
        })
        .unwrap();
    let stats = setup.dataplane().stats().unwrap();
    assert!(stats.get(Counter::Hairpin) >= 41, "{stats:?}");
    assert_eq!(stats.drops(), 0, "{stats:?}");
}

/// Sends a raw IPv4 packet (its own header, any source) from the calling thread's namespace.
fn send_raw(ip_packet: &[u8], dst: Ipv4Addr) {
    // SAFETY: socket() with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid buffer and address with their sizes; the fd is closed right after.
    let sent = unsafe {
        let n = libc::sendto(
            fd,
            ip_packet.as_ptr().cast(),
            ip_packet.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        libc::close(fd);
        n
    };
    assert_eq!(sent, ip_packet.len() as isize, "sendto");
}

#[test]
fn a_pod_cannot_forge_another_pods_flows() {
    let mut setup = Setup::new("spoof");
    let backends = setup.lab.backend_addrs();
    serve(&mut setup, web(), backends.clone());
    serve(&mut setup, dns(), vec![backends[0]]);
    // The third backend's pod is the attacker: its interface is a pod interface like the
    // client's, allowed its own address only.
    let attacker_ip = *backends[2].ip();
    let (node, dp) = (&setup.lab.node, setup.dataplane.as_mut().unwrap());
    node.run(|| dp.attach("be3", &[attacker_ip]))
        .unwrap()
        .expect("attach to the attacker's interface");

    // The victims: a TCP connection to the web service and a UDP flow to DNS.
    let (mut tcp, tcp_backend, udp) = setup
        .lab
        .client
        .run(|| {
            let mut tcp = Connection::open(web().addr).expect("connect");
            let name = tcp.ask().expect("ask");
            let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            udp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            udp.connect(dns().addr).unwrap();
            udp.send(b"hello\n").unwrap();
            let mut buf = [0u8; 64];
            udp.recv(&mut buf).expect("first UDP answer");
            (tcp, name, udp)
        })
        .unwrap();
    let victim_tcp = match tcp.local {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    let victim_udp = match udp.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{other}"),
    };
    let before = setup.dataplane().conntrack(victim_tcp, web()).unwrap();
    assert!(before.is_some());

    const FORGED: u64 = 10;
    setup.lab.backends[2]
        .ns
        .run(|| {
            for _ in 0..FORGED {
                // A SYN on the victim's tuple would re-balance its established flow.
                let syn = packet::tcp(victim_tcp, web().addr, packet::TCP_SYN).build();
                send_raw(&syn[14..], *web().addr.ip());
                // A datagram opening a direct flow on the tuple of the victim's UDP flow would
                // remove its reverse entry.
                let direct = packet::udp(victim_udp, backends[0], b"x").build();
                send_raw(&direct[14..], *backends[0].ip());
            }
        })
        .unwrap();

    let stats = setup.dataplane().stats().unwrap();
    assert_eq!(stats.get(Counter::DropSpoofed), 2 * FORGED, "{stats:?}");
    assert_eq!(
        setup.dataplane().conntrack(victim_tcp, web()).unwrap(),
        before,
        "the victim's flow kept its backend"
    );
    setup
        .lab
        .client
        .run(|| {
            assert_eq!(
                tcp.ask().expect("the victim's connection works"),
                tcp_backend
            );
            udp.send(b"hello\n").unwrap();
            let mut buf = [0u8; 64];
            udp.recv(&mut buf)
                .expect("the victim's UDP answer still comes from the service");
        })
        .unwrap();
}

#[test]
fn idle_connections_survive_many_short_ones() {
    // Room for the idle flows and what is in flight, far less than the short flows.
    let mut setup = Setup::with_config("churn", |c| c.ct_entries = 4096);
    let backends = setup.lab.backend_addrs();
    serve(&mut setup, web(), backends);
    const IDLE: usize = 1000;
    const SHORT_PER_THREAD: usize = 5000;
    const THREADS: usize = 4;
    let mut idle = setup
        .lab
        .client
        .run(|| {
            (0..IDLE)
                .map(|i| {
                    let mut conn =
                        Connection::open(web().addr).unwrap_or_else(|e| panic!("idle {i}: {e:#}"));
                    let name = conn.ask().expect("ask");
                    (conn, name)
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    setup
        .lab
        .client
        .run(|| {
            thread::scope(|s| {
                for t in 0..THREADS {
                    s.spawn(move || {
                        for i in 0..SHORT_PER_THREAD {
                            tcp_request(web().addr)
                                .unwrap_or_else(|e| panic!("short {t}/{i}: {e:#}"));
                        }
                    });
                }
            })
        })
        .unwrap();
    let moved = setup
        .lab
        .client
        .run(|| {
            idle.iter_mut()
                .map(|(conn, name)| conn.ask().ok().as_ref() != Some(name))
                .filter(|&moved| moved)
                .count()
        })
        .unwrap();
    assert_eq!(
        moved,
        0,
        "idle connections broken by {} short ones",
        THREADS * SHORT_PER_THREAD
    );
    let stats = setup.dataplane().stats().unwrap();
    assert!(
        stats.get(Counter::CtClosed) >= (THREADS * SHORT_PER_THREAD) as u64,
        "closed flows are forgotten at once: {stats:?}"
    );
    assert_eq!(stats.drops(), 0, "{stats:?}");
    assert_eq!(
        stats.get(Counter::CtMidFlow),
        0,
        "no live flow lost its entry: {stats:?}"
    );
}

/// `getsockopt(IP_MTU)`: the path MTU the kernel knows for a connected socket's peer.
fn path_mtu(socket: &std::net::UdpSocket) -> i32 {
    use std::os::fd::AsRawFd;
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int with its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "IP_MTU: {}", std::io::Error::last_os_error());
    mtu
}

#[test]
fn icmp_errors_about_service_flows_reach_the_client_translated() {
    let mut setup = Setup::new("icmp");
    let backends = setup.lab.backend_addrs();
    // A backend port nothing listens on: the backend's kernel answers port unreachable.
    let closed = Frontend::udp("10.96.0.60:53".parse().unwrap());
    serve(
        &mut setup,
        closed,
        vec![SocketAddrV4::new(*backends[0].ip(), 9)],
    );
    // A backend behind a link with a smaller MTU than the client's: the node answers
    // "fragmentation needed" for datagrams that may not be fragmented.
    serve(&mut setup, dns(), vec![backends[1]]);
    setup
        .lab
        .node
        .ip(&["link", "set", "be2", "mtu", "1400"])
        .expect("shrink the backend link's MTU");
    setup.lab.backends[1]
        .ns
        .ip(&["link", "set", "eth0", "mtu", "1400"])
        .expect("shrink the backend link's MTU");
    setup
        .lab
        .client
        .run(|| {
            let mut buf = [0u8; 2048];
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            socket.connect(closed.addr).unwrap();
            socket.send(b"hello\n").unwrap();
            let error = socket
                .recv(&mut buf)
                .expect_err("no answer from a closed port");
            assert_eq!(
                error.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "the connected socket hears the backend's port unreachable: {error}"
            );

            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            socket.connect(dns().addr).unwrap();
            let on: libc::c_int = libc::IP_PMTUDISC_DO;
            // SAFETY: setsockopt from a c_int with its size.
            let rc = unsafe {
                use std::os::fd::AsRawFd;
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    (&on as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
            assert_eq!(path_mtu(&socket), 1500);
            socket
                .send(&[0u8; 1450])
                .expect("the first big datagram leaves");
            let error = socket.recv(&mut buf).expect_err("the datagram cannot pass");
            assert_eq!(
                error.raw_os_error(),
                Some(libc::EMSGSIZE),
                "the socket hears the path is too small: {error}"
            );
            assert_eq!(path_mtu(&socket), 1400, "the service's path MTU is learnt");
            socket.send(&[0u8; 1372]).expect("a datagram that fits");
            let n = socket
                .recv(&mut buf)
                .expect("an answer through the smaller path");
            assert!(n > 0);
        })
        .unwrap();
    let stats = setup.dataplane().stats().unwrap();
    assert!(stats.get(Counter::IcmpTranslated) >= 2, "{stats:?}");
}

#[test]
fn fragmented_datagrams_cross_a_service_both_ways() {
    let mut setup = Setup::new("frag");
    let backends = setup.lab.backend_addrs();
    serve(&mut setup, dns(), backends);
    const DATAGRAMS: usize = 20;
    setup
        .lab
        .client
        .run(|| {
            let mut buf = vec![0u8; 65536];
            for i in 0..DATAGRAMS {
                let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                socket.connect(dns().addr).unwrap();
                // 8 KB over 1500-byte links: six fragments each way.
                let request: Vec<u8> = (0..8192).map(|j| (i + j) as u8).collect();
                socket.send(&request).unwrap();
                let n = socket
                    .recv(&mut buf)
                    .unwrap_or_else(|e| panic!("datagram {i}: {e}"));
                // The echo server answers big datagrams with its name and the datagram.
                assert!(
                    n > request.len() && buf[..n].ends_with(&request),
                    "datagram {i}: {n} bytes back"
                );
            }
        })
        .unwrap();
    let stats = setup.dataplane().stats().unwrap();
    assert!(
        stats.get(Counter::FragmentTracked) >= 2 * DATAGRAMS as u64,
        "{stats:?}"
    );
    assert_eq!(stats.drops(), 0, "{stats:?}");
}

/// The map directories pinned under `pin_dir`.
fn map_dirs(pin_dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(pin_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("maps-"))
        .collect()
}

#[test]
fn a_new_map_layout_keeps_every_flow_and_removes_the_old_pins() {
    let mut setup = Setup::new("layout");
    let backends = setup.lab.backend_addrs();
    serve(&mut setup, web(), backends.clone());
    serve(&mut setup, dns(), backends);
    let (mut connections, sockets) = setup
        .lab
        .client
        .run(|| {
            let connections: Vec<(Connection, String)> = (0..20)
                .map(|_| {
                    let mut conn = Connection::open(web().addr).expect("connect");
                    let name = conn.ask().expect("ask");
                    (conn, name)
                })
                .collect();
            let sockets: Vec<(std::net::UdpSocket, String)> = (0..10)
                .map(|_| {
                    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                    socket
                        .set_read_timeout(Some(Duration::from_secs(3)))
                        .unwrap();
                    socket.connect(dns().addr).unwrap();
                    socket.send(b"hello\n").unwrap();
                    let mut buf = [0u8; 64];
                    let n = socket.recv(&mut buf).expect("UDP answer");
                    let name = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
                    (socket, name)
                })
                .collect();
            (connections, sockets)
        })
        .unwrap();
    let before = map_dirs(&setup.pin_dir);
    assert_eq!(before.len(), 1, "{before:?}");

    // The owner stops (its programs keep serving); a new one starts with another conntrack
    // size: another map layout, as a new build's would be.
    drop(setup.dataplane.take());
    let mut config = Config::with_pin_dir(&setup.pin_dir);
    config.ct_entries = ebpf_dataplane::defaults::CT_ENTRIES / 2;
    let dataplane = Dataplane::open(&config).expect("open with another layout");
    let migrations = dataplane.migrations().to_vec();
    assert_eq!(migrations.len(), 1, "{migrations:?}");
    assert_eq!(migrations[0].services, 2, "{migrations:?}");
    // Each TCP and UDP flow has a conntrack and a reverse entry.
    assert!(migrations[0].entries >= 2 * 30, "{migrations:?}");
    setup.dataplane = Some(dataplane);
    let (node, dp) = (&setup.lab.node, setup.dataplane.as_mut().unwrap());
    node.run(|| dp.attach(CLIENT_HOST_IF, &[CLIENT_ADDR]))
        .unwrap()
        .expect("attach");
    let after = map_dirs(&setup.pin_dir);
    assert_eq!(after.len(), 1, "the old pins are gone: {after:?}");
    assert_ne!(after, before);

    setup
        .lab
        .client
        .run(|| {
            for (i, (conn, name)) in connections.iter_mut().enumerate() {
                assert_eq!(
                    &conn
                        .ask()
                        .unwrap_or_else(|e| panic!("connection {i}: {e:#}")),
                    name
                );
            }
            for (i, (socket, name)) in sockets.iter().enumerate() {
                socket.send(b"hello\n").unwrap();
                let mut buf = [0u8; 64];
                let n = socket
                    .recv(&mut buf)
                    .unwrap_or_else(|e| panic!("UDP flow {i}: {e}"));
                assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), name);
            }
            tcp_request(web().addr).expect("a new connection");
        })
        .unwrap();
    let stats = setup.dataplane().stats().unwrap();
    assert_eq!(stats.drops(), 0, "{stats:?}");
}

#[test]
fn one_socket_asking_two_services_with_one_backend_hears_each_from_its_own() {
    let mut setup = Setup::new("shared");
    let backend = setup.lab.backend_addrs()[0];
    let (one, two) = (
        Frontend::udp("10.96.0.70:53".parse().unwrap()),
        Frontend::udp("10.96.0.71:53".parse().unwrap()),
    );
    serve(&mut setup, one, vec![backend]);
    serve(&mut setup, two, vec![backend]);
    setup
        .lab
        .client
        .run(|| {
            // An unconnected socket, as resolvers use: it sees where each answer comes from.
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            for round in 0..5 {
                socket.send_to(b"hello\n", one.addr).unwrap();
                socket.send_to(b"hello\n", two.addr).unwrap();
                let mut from = BTreeSet::new();
                for _ in 0..2 {
                    let mut buf = [0u8; 64];
                    let (_, peer) = socket
                        .recv_from(&mut buf)
                        .unwrap_or_else(|e| panic!("round {round}: {e}"));
                    from.insert(peer);
                }
                let expected: BTreeSet<std::net::SocketAddr> =
                    [one.addr.into(), two.addr.into()].into();
                assert_eq!(from, expected, "round {round}");
            }
        })
        .unwrap();
}
