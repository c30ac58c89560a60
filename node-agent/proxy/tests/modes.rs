//! Every proxy mode carries the same traffic: real TCP and UDP from a client pod to service
//! addresses, through the node, to backend pods.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use node_agent_netns::{
    lab::{BACKEND_PORT, CLIENT_HOST_IF, Lab},
    traffic::{Connection, tcp_request, udp_request},
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

fn ports() -> Vec<ServicePort> {
    vec![
        ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: BACKEND_PORT,
        },
        ServicePort {
            name: "dns".into(),
            protocol: Protocol::Udp,
            port: 53,
            target_port: BACKEND_PORT,
        },
    ]
}

fn state(endpoints: &[Ipv4Addr]) -> ProxyState {
    ProxyState {
        services: vec![
            Service {
                namespace: "default".into(),
                name: "web".into(),
                cluster_ip: WEB,
                ports: ports(),
                endpoints: endpoints.to_vec(),
                session_affinity: None,
            },
            Service {
                namespace: "default".into(),
                name: "empty".into(),
                cluster_ip: EMPTY,
                ports: ports(),
                endpoints: vec![],
                session_affinity: None,
            },
        ],
    }
}

fn config(test: &str) -> ProxyConfig {
    ProxyConfig {
        cluster_cidr: "10.244.0.0/16".into(),
        interfaces: vec![CLIENT_HOST_IF.into()],
        pin_dir: PathBuf::from(format!(
            "/sys/fs/bpf/keel-test-{test}-{}",
            std::process::id()
        )),
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
        let proxier = lab
            .node
            .run(|| start(mode, &config))
            .unwrap()
            .unwrap_or_else(|e| panic!("start {mode}: {e:#}"));
        Self {
            proxier: Some(proxier),
            lab,
            config,
        }
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

fn each_mode_carries_traffic(mode: Mode) {
    require_root();
    let test = format!("mode-{mode}");
    let lab = Lab::new(&format!("kt-{}-{test}", std::process::id()), 3).expect("lab");
    let endpoints: Vec<Ipv4Addr> = lab.backend_addrs().iter().map(|a| *a.ip()).collect();
    let mut running = Running::start(lab, mode, config(&test));
    running.sync(&state(&endpoints));
    check_traffic(&running.lab, mode);

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
    let mut running = Running::start(lab, Mode::Iptables, config("switch"));
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
