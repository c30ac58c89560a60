//! keel-cni driven as the CNI spec has a runtime drive it (through `invoke`, the same code the
//! kubelet uses), in throw-away network namespaces: a "node" namespace where the plugin runs
//! and pod namespaces it wires up. The same invoker drives Debian's reference plugins (`bridge`
//! with `host-local`), which checks the runtime side against plugins nobody here wrote.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
};

use node_agent_cni::{
    invoke::{InvokeError, Network, spec_error},
    plugin::CRASH_AFTER_ALLOCATE,
    spec::code,
};
use node_agent_netns::{echo::EchoServer, netns::Netns, traffic::tcp_request};
use serde_json::json;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the CNI tests build network namespaces: run them as root"
    );
}

/// Where keel-cni was built (cargo builds the crate's binary for its tests).
fn plugin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keel-cni"))
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Lab {
    node: Netns,
    data: tempfile::TempDir,
    prefix: String,
}

impl Lab {
    fn new(test: &str) -> Self {
        require_root();
        let prefix = format!("kc-{}-{test}", std::process::id());
        let node = Netns::new(&format!("{prefix}-node")).unwrap();
        node.sysctl("net.ipv4.ip_forward", "1").unwrap();
        Self {
            node,
            data: tempfile::tempdir().unwrap(),
            prefix,
        }
    }

    fn pod(&self, name: &str) -> Netns {
        Netns::new(&format!("{}-{name}", self.prefix)).unwrap()
    }

    fn keel(&self, subnet: &str) -> Network {
        Network::new(
            json!({"cniVersion": "1.0.0", "name": "keel", "type": "keel-cni",
                   "subnet": subnet, "dataDir": self.data.path()}),
            vec![plugin_dir()],
        )
        .in_netns(self.node.path())
    }
}

fn addresses(ns: &Netns, ifname: &str) -> String {
    String::from_utf8_lossy(
        &ns.ip(&["-o", "-4", "addr", "show", "dev", ifname])
            .unwrap()
            .stdout,
    )
    .into_owned()
}

#[test]
fn add_check_del_and_version_as_the_spec_has_them() {
    let lab = Lab::new("spec");
    let net = lab.keel("10.231.1.0/24");
    let version = net.version().expect("VERSION");
    assert!(version.supported_versions.contains(&"1.0.0".to_owned()));

    let pod = lab.pod("p1");
    let result = net.add("c1", &pod.path(), "eth0").expect("ADD");
    let ip = result.ipv4().expect("an IPv4 address in the result");
    assert!(
        ip.octets()[..3] == [10, 231, 1] && ip != Ipv4Addr::new(10, 231, 1, 1),
        "{ip} comes from the pod CIDR and is not its gateway"
    );
    assert_eq!(result.ips[0].gateway.as_deref(), Some("10.231.1.1"));
    assert_eq!(result.interfaces[1].name, "eth0");
    assert_eq!(
        result.interfaces[1].sandbox.as_deref(),
        Some(pod.path().to_str().unwrap())
    );
    assert!(addresses(&pod, "eth0").contains(&format!("{ip}/32")));

    // The node reaches the pod at its address, through the veth.
    let server = SocketAddrV4::new(ip, 7000);
    let _echo = pod
        .run(move || EchoServer::start(server, "p1"))
        .unwrap()
        .unwrap();
    assert_eq!(
        lab.node.run(move || tcp_request(server)).unwrap().unwrap(),
        "p1"
    );

    net.check("c1", &pod.path(), "eth0", &result)
        .expect("CHECK after ADD");
    // Retrying ADD is harmless and gives the same address.
    assert_eq!(net.add("c1", &pod.path(), "eth0").unwrap().ipv4(), Some(ip));

    // CHECK says what is wrong when the network is not as ADD left it.
    pod.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
    let err = net
        .check("c1", &pod.path(), "eth0", &result)
        .expect_err("CHECK fails");
    assert_eq!(
        spec_error(&err).map(|e| e.code),
        Some(code::CHECK_FAILED),
        "{err}"
    );

    net.del("c1", Some(&pod.path()), "eth0", Some(&result))
        .expect("DEL");
    assert!(
        pod.ip(&["link", "show", "eth0"]).is_err(),
        "the interface is gone"
    );
    net.del("c1", Some(&pod.path()), "eth0", Some(&result))
        .expect("DEL again is not an error");
    drop(pod);
    net.del("c1", None, "eth0", None)
        .expect("DEL without the namespace is not an error");
    // The address is free again.
    let other = lab.pod("p2");
    assert!(net.add("c2", &other.path(), "eth0").is_ok());
}

#[test]
fn a_full_pod_cidr_gives_the_spec_error_and_a_crash_never_double_allocates() {
    let lab = Lab::new("ipam");
    // A /29: six hosts, the gateway among them: five pods.
    let net = lab.keel("10.231.2.0/29");
    let pods: Vec<Netns> = (0..6).map(|i| lab.pod(&format!("p{i}"))).collect();
    let mut ips = Vec::new();
    for (i, pod) in pods.iter().take(4).enumerate() {
        ips.push(
            net.add(&format!("c{i}"), &pod.path(), "eth0")
                .unwrap()
                .ipv4()
                .unwrap(),
        );
    }
    // A plugin that dies right after allocating (before wiring the pod).
    let crashed = Command::new(plugin_dir().join("keel-cni"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "crashed")
        .env("CNI_NETNS", pods[4].path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin_dir())
        .env(CRASH_AFTER_ALLOCATE, "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(
                json!({"cniVersion": "1.0.0", "name": "keel", "type": "keel-cni",
                       "subnet": "10.231.2.0/29", "dataDir": lab.data.path()})
                .to_string()
                .as_bytes(),
            )?;
            child.wait()
        })
        .unwrap();
    assert!(!crashed.success(), "the injected crash happened");
    // Its address stays taken: the next pod does not get it, and the range is now full.
    let err: InvokeError = net
        .add("c5", &pods[5].path(), "eth0")
        .expect_err("the range is full");
    let error = spec_error(&err).expect("the spec's error object");
    assert_eq!(error.code, code::NO_FREE_ADDRESS, "{error}");
    assert!(error.msg.contains("10.231.2.0/29"), "{error}");
    // DEL of the crashed container releases its address.
    net.del("crashed", Some(&pods[4].path()), "eth0", None)
        .unwrap();
    let last = net
        .add("c5", &pods[5].path(), "eth0")
        .unwrap()
        .ipv4()
        .unwrap();
    assert!(!ips.contains(&last), "never handed out twice");
}

#[test]
fn concurrent_adds_get_distinct_addresses() {
    let lab = Lab::new("conc");
    let net = lab.keel("10.231.3.0/24");
    let pods: Vec<Netns> = (0..10).map(|i| lab.pod(&format!("p{i}"))).collect();
    let ips: Vec<Ipv4Addr> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let net = net.clone();
                let path = pod.path();
                s.spawn(move || {
                    net.add(&format!("c{i}"), &path, "eth0")
                        .unwrap()
                        .ipv4()
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut unique = ips.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ips.len(), "{ips:?}");
}

#[test]
fn the_invoker_drives_debians_reference_plugins() {
    let lab = Lab::new("ref");
    let reference = Path::new("/usr/lib/cni");
    assert!(
        reference.join("bridge").exists() && reference.join("host-local").exists(),
        "Debian's containernetworking-plugins are missing: run `cargo xtask setup`"
    );
    let net = Network::new(
        json!({"cniVersion": "1.0.0", "name": "ref", "type": "bridge", "bridge": "kcbr0",
               "isGateway": true,
               "ipam": {"type": "host-local", "subnet": "10.231.4.0/24", "dataDir": lab.data.path()}}),
        vec![reference.to_path_buf()],
    )
    .in_netns(lab.node.path());
    let pod = lab.pod("p1");
    let result = net.add("r1", &pod.path(), "eth0").expect("bridge ADD");
    let ip = result.ipv4().expect("host-local gave an address");
    assert!(addresses(&pod, "eth0").contains(&ip.to_string()));
    net.check("r1", &pod.path(), "eth0", &result)
        .expect("bridge CHECK");
    net.del("r1", Some(&pod.path()), "eth0", Some(&result))
        .expect("bridge DEL");
    assert!(pod.ip(&["link", "show", "eth0"]).is_err());
}
