//! Traffic from outside, packet by packet (BPF_PROG_TEST_RUN).
//!
//! The XDP fast path against tc, on one fixture table: every packet goes through `from_outside`
//! (tc) on one data plane, and through `from_outside_xdp` then, if XDP passes it, `from_outside`
//! on another, as the kernel would run them on a node's interface. Both must end alike: the
//! same packet sent out, passed to the stack or dropped, byte for byte. The fixtures cover
//! what the fast path takes (masqueraded flows both ways, UDP with and without checksum, DSR
//! flows past their first packet) and what it must leave to tc (local backends, rejects,
//! fragments, IP options, packets whose checksum is only the pseudo-header sum, a last hop,
//! packets that must carry the DSR option).
//!
//! Direct server return between two nodes' data planes: the option the first node inserts,
//! what the backend's node records and removes, the reply it sends the client directly, and
//! what happens to packets too large for the option and to forged options.
//!
//! BPF_PROG_TEST_RUN runs the programs in the calling thread's network namespace: the test
//! runs them on a thread of a namespace of its own (unshared, gone with the thread) holding
//! the routes and neighbours the FIB lookups need.

mod common;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
};

use common::{TestDataplane, addr};
use ebpf_dataplane::{
    Counter, Frontend, Hook, NodeSettings, Protocol, Reach, Remote, ServiceSpec,
    packet::{self, L4, TCP_ACK, TCP_SYN, tcp, udp},
    verdict::{TC_ACT_REDIRECT, TC_ACT_SHOT, TCX_NEXT, XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX},
};

const NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The router to the other node's pods and to the clients.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn client(port: u16) -> SocketAddrV4 {
    addr(192, 0, 2, 50, port)
}
/// A pod on another node (10.1.1.0/24), and one on this node (10.1.0.0/24).
fn remote_pod() -> SocketAddrV4 {
    addr(10, 1, 1, 5, 8080)
}
fn local_pod() -> SocketAddrV4 {
    addr(10, 1, 0, 7, 8080)
}
fn node(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(NODE, port)
}

/// What happened to a packet in the end.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Sent out of an interface by the program (redirected, XDP_TX), as this frame.
    Out(Vec<u8>),
    /// Given to the kernel's stack, as this frame.
    Stack(Vec<u8>),
    Dropped,
}

fn tc(dp: &mut TestDataplane, frame: &[u8]) -> Outcome {
    let out = dp.test_run(Hook::FromOutside, frame, 1).expect("tc run");
    match out.verdict {
        TCX_NEXT => Outcome::Stack(out.frame),
        TC_ACT_REDIRECT => Outcome::Out(out.frame),
        TC_ACT_SHOT => Outcome::Dropped,
        other => panic!("tc verdict {other}"),
    }
}

/// XDP, then tc for what XDP passes.
fn xdp_then_tc(dp: &mut TestDataplane, frame: &[u8]) -> (Outcome, bool) {
    let out = dp
        .test_run(Hook::FromOutsideXdp, frame, 1)
        .expect("xdp run");
    match out.verdict {
        XDP_PASS => {
            assert_eq!(out.frame, frame, "XDP passes packets untouched");
            (tc(dp, frame), false)
        }
        XDP_TX | XDP_REDIRECT => (Outcome::Out(out.frame), true),
        XDP_DROP => (Outcome::Dropped, true),
        other => panic!("XDP verdict {other}"),
    }
}

fn spec(remote: Remote) -> ServiceSpec {
    ServiceSpec {
        reach: Reach::External {
            remote,
            drop_when_empty: false,
        },
        ..ServiceSpec::default()
    }
}

/// A node's data plane: NodePorts 30080 (TCP and UDP) to a pod on another node, 30081 to a
/// pod on this node, 30082 without endpoints; 30083 and 30085 (TCP and UDP) to the pod on
/// another node by DSR.
fn node_dataplane(test: &str) -> TestDataplane {
    node_with_pods(test, NODE, (Ipv4Addr::new(10, 1, 0, 0), 24))
}

/// The same services on a node at `addr` whose pods are in `pod_cidr`.
fn node_with_pods(test: &str, addr: Ipv4Addr, pod_cidr: (Ipv4Addr, u8)) -> TestDataplane {
    let mut dp = TestDataplane::open(test);
    dp.set_node(&NodeSettings {
        pod_cidr: Some(pod_cidr),
        masquerade_addr: Some(addr),
        nodeport_addrs: vec![addr],
        peer_addrs: Vec::new(),
    })
    .expect("node settings");
    let (snat, dsr) = (Remote::Masquerade, Remote::DirectReturn);
    for (port, proto, backend, remote) in [
        (30080, Protocol::Tcp, Some(remote_pod()), snat),
        (30080, Protocol::Udp, Some(remote_pod()), snat),
        (30081, Protocol::Tcp, Some(local_pod()), snat),
        (30082, Protocol::Tcp, None, snat),
        (30083, Protocol::Tcp, Some(remote_pod()), dsr),
        (30083, Protocol::Udp, Some(remote_pod()), dsr),
        (30085, Protocol::Tcp, Some(remote_pod()), dsr),
    ] {
        let frontend = Frontend::node_port(port, proto);
        dp.upsert_service(frontend, spec(remote)).expect("upsert");
        dp.set_backends(frontend, &backend.into_iter().collect::<Vec<_>>())
            .expect("backends");
    }
    dp
}

/// Sets an IPv4 frame's TTL (and its header checksum).
fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    frame[22] = ttl;
    frame[24..26].fill(0);
    let sum = packet::checksum(&frame[14..34], 0);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// A TCP frame whose checksum field holds only the pseudo-header sum, as this host's stack
/// leaves it for offload (CHECKSUM_PARTIAL).
fn partial_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let l4_len = frame.len() - 34;
    let words = |b: &[u8]| u32::from(u16::from_be_bytes([b[0], b[1]]));
    let mut sum = words(&frame[26..28])
        + words(&frame[28..30])
        + words(&frame[30..32])
        + words(&frame[32..34])
        + 6
        + l4_len as u32;
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    frame[50..52].copy_from_slice(&(sum as u16).to_be_bytes());
    frame
}

/// Runs `f` on a thread in a network namespace of its own: a node at 198.51.100.1/24 whose
/// router (198.51.100.2, a permanent neighbour) leads to the other node's pods and to the
/// clients, forwarding on.
fn in_node_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare on this thread only; the namespace goes with it.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let router_mac = ROUTER_MAC.map(|b| format!("{b:02x}")).join(":");
            for args in [
                "link set lo up",
                "link add fx0 type veth peer name fx1",
                "link set fx1 up",
                "link set fx0 up",
                "addr add 198.51.100.1/24 dev fx0",
                &format!("neigh add {ROUTER} lladdr {router_mac} dev fx0 nud permanent"),
                &format!("route add 10.1.1.0/24 via {ROUTER}"),
                &format!("route add 192.0.2.0/24 via {ROUTER}"),
            ] {
                // Children inherit this thread's namespace.
                let status = Command::new("ip")
                    .args(args.split(' '))
                    .status()
                    .expect("run ip");
                assert!(status.success(), "ip {args}");
            }
            std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").expect("forwarding");
            std::fs::write("/proc/sys/net/ipv4/conf/lo/forwarding", "1").expect("forwarding");
            f()
        })
        .join()
        .expect("netns thread")
    })
}

#[test]
fn xdp_and_tc_end_alike_on_every_fixture() {
    let fixtures: Vec<(&str, Vec<u8>, bool)> = vec![
        // (name, frame, whether XDP must take it itself)
        (
            "SYN to a NodePort, remote pod",
            tcp(client(40000), node(30080), TCP_SYN).build(),
            true,
        ),
        (
            "ACK of that flow",
            tcp(client(40000), node(30080), TCP_ACK)
                .payload(b"GET /")
                .build(),
            true,
        ),
        (
            "the pod's SYN-ACK, back to the client",
            tcp(remote_pod(), node(40000), TCP_SYN | TCP_ACK).build(),
            true,
        ),
        (
            "UDP to a NodePort, remote pod",
            udp(client(40001), node(30080), b"ping").build(),
            true,
        ),
        (
            "UDP without checksum",
            packet::Builder {
                udp_no_checksum: true,
                ..udp(client(40002), node(30080), b"ping")
            }
            .build(),
            true,
        ),
        (
            "checksum only the pseudo-header sum (CHECKSUM_PARTIAL)",
            partial_checksum(tcp(client(40003), node(30080), TCP_SYN).build()),
            false,
        ),
        (
            "SYN to a NodePort, local pod",
            tcp(client(40004), node(30081), TCP_SYN).build(),
            false,
        ),
        (
            "SYN to a NodePort without endpoints",
            tcp(client(40005), node(30082), TCP_SYN).build(),
            false,
        ),
        (
            "SYN to a port that is no NodePort",
            tcp(client(40006), node(31000), TCP_SYN).build(),
            false,
        ),
        (
            "last hop (TTL 1)",
            with_ttl(tcp(client(40007), node(30080), TCP_SYN).build(), 1),
            false,
        ),
        (
            "IP options",
            packet::Builder {
                ip_options: vec![1, 1, 1, 1],
                ..tcp(client(40008), node(30080), TCP_SYN)
            }
            .build(),
            false,
        ),
        (
            "SYN to a DSR NodePort (carries the option: tc)",
            tcp(client(40011), node(30083), TCP_SYN).build(),
            false,
        ),
        (
            "ACK of that DSR flow (destination only)",
            tcp(client(40011), node(30083), TCP_ACK)
                .payload(b"GET /")
                .build(),
            true,
        ),
        (
            "UDP to a DSR NodePort (every datagram carries the option: tc)",
            udp(client(40012), node(30083), b"ping").build(),
            false,
        ),
        (
            "first fragment",
            packet::Builder {
                frag_off: 0x2000,
                ..udp(client(40009), node(30080), &[7; 64])
            }
            .build(),
            false,
        ),
    ];
    in_node_netns(|| {
        let mut plain = node_dataplane("xdp-tc");
        let mut fast = node_dataplane("xdp-fast");
        for (name, frame, taken) in &fixtures {
            let expected = tc(&mut plain, frame);
            let (outcome, by_xdp) = xdp_then_tc(&mut fast, frame);
            assert_eq!(outcome, expected, "{name}: XDP then tc ends as tc alone");
            assert_eq!(by_xdp, *taken, "{name}: taken by XDP");
        }
        // What the fast path sent is right, not only equal: the SYN left from the node to the
        // remote pod, through the router, one hop older, every checksum valid.
        let syn = tcp(client(40010), node(30080), TCP_SYN).build();
        let (Outcome::Out(out), true) = xdp_then_tc(&mut fast, &syn) else {
            panic!("a SYN to a remote pod is sent out by XDP");
        };
        let read = packet::read(&out).expect("valid checksums");
        assert_eq!(read.dst(), Some(remote_pod()));
        assert_eq!(read.src(), Some(node(40010)));
        assert_eq!(read.dst_mac, ROUTER_MAC);
        assert_eq!(out[22], 63, "TTL decremented");
        assert!(matches!(read.l4, L4::Tcp { flags: TCP_SYN, .. }));
        let reply = tcp(remote_pod(), node(40010), TCP_SYN | TCP_ACK).build();
        let (Outcome::Out(out), true) = xdp_then_tc(&mut fast, &reply) else {
            panic!("the reply is sent out by XDP");
        };
        let read = packet::read(&out).expect("valid checksums");
        assert_eq!(read.src(), Some(node(30080)));
        assert_eq!(read.dst(), Some(client(40010)));
        let stats = fast.stats().expect("stats");
        assert!(stats.get(Counter::XdpForwarded) >= 7, "{stats:?}");
        assert_eq!(stats.get(Counter::XdpPartialChecksum), 1, "{stats:?}");
    });
}

/// Masquerading keeps a client's port while no other flow to the same backend holds it; 2,000
/// clients sending from one port to one NodePort with one remote backend each get a reply port
/// of their own (remapped, above the node's ephemeral range), none is dropped, and replies
/// reach the client they belong to.
#[test]
fn masquerade_gives_clients_with_one_port_their_own_reply_ports() {
    let clients: Vec<SocketAddrV4> = (0..2_000u32)
        .map(|i| SocketAddrV4::new(Ipv4Addr::from(0x6440_0000 + i + 1), 40000))
        .collect();
    in_node_netns(|| {
        let route = Command::new("ip")
            .args(["route", "add", "100.64.0.0/10", "via", &ROUTER.to_string()])
            .status()
            .expect("run ip");
        assert!(route.success(), "a route to the clients");
        let mut dp = node_dataplane("masq-ports");
        let mut ports = std::collections::BTreeMap::new();
        for client in &clients {
            let syn = tcp(*client, node(30080), TCP_SYN).build();
            let Outcome::Out(out) = tc(&mut dp, &syn) else {
                panic!("the SYN of {client} is forwarded: {:?}", dp.stats());
            };
            let read = packet::read(&out).expect("valid checksums");
            assert_eq!(read.dst(), Some(remote_pod()));
            let from = read.src().expect("a source");
            assert_eq!(*from.ip(), NODE, "masqueraded to the node");
            if let Some(other) = ports.insert(from.port(), *client) {
                panic!("{client} and {other} share the reply port {}", from.port());
            }
        }
        assert_eq!(
            ports.get(&40000),
            Some(&clients[0]),
            "the first keeps its port"
        );
        for (port, client) in ports.iter().step_by(97) {
            let reply = tcp(remote_pod(), node(*port), TCP_SYN | TCP_ACK).build();
            let Outcome::Out(out) = tc(&mut dp, &reply) else {
                panic!("the reply on port {port} is sent back out");
            };
            let read = packet::read(&out).expect("valid checksums");
            assert_eq!(read.src(), Some(node(30080)));
            assert_eq!(read.dst(), Some(*client), "the reply on port {port}");
        }
        let stats = dp.stats().expect("stats");
        assert_eq!(stats.get(Counter::DropCtInsert), 0, "{stats:?}");
    });
}

/// A NodePort without endpoints answers a new flow with ICMP port unreachable about what the
/// client sent; one with ClientIP affinity sends all of a client's new flows to one backend.
#[test]
fn from_outside_no_endpoints_reject_and_affinity_holds() {
    in_node_netns(|| {
        let mut dp = node_dataplane("ext-reject");
        let syn = tcp(client(40020), node(30082), TCP_SYN).build();
        let (Outcome::Out(out) | Outcome::Stack(out)) = tc(&mut dp, &syn) else {
            panic!("a SYN to a NodePort without endpoints is answered");
        };
        let read = packet::read(&out).expect("valid checksums");
        assert_eq!(read.dst_ip, *client(0).ip(), "to the client");
        assert_eq!(read.src_ip, NODE, "from the address it asked");
        let L4::Unreachable {
            code,
            quoted_src,
            quoted_dst,
            ..
        } = read.l4
        else {
            panic!("ICMP unreachable, not {:?}", read.l4);
        };
        assert_eq!(
            (code, quoted_src, quoted_dst),
            (3, client(40020), node(30082)),
            "port unreachable about the client's SYN"
        );

        let sticky = Frontend::node_port(30086, Protocol::Tcp);
        dp.upsert_service(
            sticky,
            ServiceSpec {
                affinity_timeout: Some(std::time::Duration::from_secs(60)),
                ..spec(Remote::Masquerade)
            },
        )
        .expect("upsert");
        let backends: Vec<SocketAddrV4> = (5..8).map(|i| addr(10, 1, 1, i, 8080)).collect();
        dp.set_backends(sticky, &backends).expect("backends");
        let chosen: std::collections::BTreeSet<SocketAddrV4> = (0..20)
            .map(|i| {
                let syn = tcp(client(41000 + i), node(30086), TCP_SYN).build();
                let Outcome::Out(out) = tc(&mut dp, &syn) else {
                    panic!("forwarded");
                };
                packet::read(&out).unwrap().dst().unwrap()
            })
            .collect();
        assert_eq!(chosen.len(), 1, "one backend for the client: {chosen:?}");
        let stats = dp.stats().expect("stats");
        assert_eq!(stats.get(Counter::AffinityHit), 19, "{stats:?}");
    });
}

/// The other node, whose pods (10.1.1.0/24) include `remote_pod`.
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);

/// The DSR option naming `frontend`, as it must lie after the fixed IPv4 header: type 0x9a
/// (copied, option 26), length 8, port, address (Cilium's layout).
fn dsr_option(frontend: SocketAddrV4) -> [u8; 8] {
    let port = frontend.port().to_be_bytes();
    let ip = frontend.ip().octets();
    [0x9a, 8, port[0], port[1], ip[0], ip[1], ip[2], ip[3]]
}

#[test]
fn dsr_carries_the_frontend_to_the_backends_node_which_answers_the_client() {
    in_node_netns(|| {
        let mut first = node_dataplane("dsr-first");
        let mut second = node_with_pods("dsr-second", OTHER_NODE, (Ipv4Addr::new(10, 1, 1, 0), 24));

        // The first node rewrites only the destination and inserts the option.
        let syn = tcp(client(41000), node(30083), TCP_SYN).build();
        let Outcome::Out(sent) = tc(&mut first, &syn) else {
            panic!("the SYN is routed out by the first node");
        };
        let read = packet::read(&sent).expect("valid checksums");
        assert_eq!(
            read.src(),
            Some(client(41000)),
            "the client's address is kept"
        );
        assert_eq!(read.dst(), Some(remote_pod()));
        assert_eq!(read.dst_mac, ROUTER_MAC);
        assert_eq!(sent[14], 0x47, "IPv4, 5 header words and the option's 2");
        assert_eq!(sent.len(), syn.len() + 8);
        assert_eq!(
            sent[34..42],
            dsr_option(node(30083)),
            "the option names the frontend"
        );
        assert_eq!(sent[22], 63, "one hop older");

        // The backend's node records the flow, removes the option and gives it to its stack.
        let Outcome::Stack(delivered) = tc(&mut second, &sent) else {
            panic!("the backend's node passes the SYN on to its pod");
        };
        let read = packet::read(&delivered).expect("valid checksums");
        assert_eq!(delivered[14], 0x45, "the option removed");
        assert_eq!(read.src(), Some(client(41000)));
        assert_eq!(read.dst(), Some(remote_pod()));
        assert_eq!(delivered[34..], sent[42..], "the segment itself untouched");

        // The pod's reply leaves its node from the frontend, straight to the client.
        let reply = tcp(remote_pod(), client(41000), TCP_SYN | TCP_ACK).build();
        let out = second.test_run(Hook::FromPod, &reply, 1).expect("from_pod");
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "routed out by the data plane");
        let read = packet::read(&out.frame).expect("valid checksums");
        assert_eq!(
            read.src(),
            Some(node(30083)),
            "the reply comes from the frontend"
        );
        assert_eq!(read.dst(), Some(client(41000)));
        assert_eq!(read.dst_mac, ROUTER_MAC);

        // The flow's later packets carry no option (XDP may send them).
        let ack = tcp(client(41000), node(30083), TCP_ACK).build();
        let (Outcome::Out(sent), true) = xdp_then_tc(&mut first, &ack) else {
            panic!("the ACK is sent out by XDP");
        };
        assert_eq!(sent[14], 0x45, "no option past the first packet");
        assert_eq!(packet::read(&sent).unwrap().dst(), Some(remote_pod()));

        // Every UDP datagram carries it: the backend's node may see any one first.
        for _ in 0..2 {
            let datagram = udp(client(41001), node(30083), b"ping").build();
            let Outcome::Out(sent) = tc(&mut first, &datagram) else {
                panic!("the datagram is routed out");
            };
            assert_eq!(sent[34..42], dsr_option(node(30083)));
            let Outcome::Stack(delivered) = tc(&mut second, &sent) else {
                panic!("the backend's node passes the datagram on");
            };
            let expected = with_ttl(with_dst(&datagram, remote_pod()), 63);
            assert_eq!(
                delivered[14..],
                expected[14..],
                "as sent, but for the destination"
            );
        }
        let reply = udp(remote_pod(), client(41001), b"pong").build();
        let out = second.test_run(Hook::FromPod, &reply, 1).expect("from_pod");
        let read = packet::read(&out.frame).expect("valid checksums");
        assert_eq!(
            read.src(),
            Some(node(30083)),
            "the UDP reply from the frontend"
        );

        // A datagram the option would make larger than the path MTU: the client hears the
        // size that fits (8 bytes less than the route's 1500), about what it sent.
        let big = packet::Builder {
            frag_off: 0x4000,
            ..udp(client(41002), node(30083), &[7; 1472])
        }
        .build();
        let Outcome::Out(error) = tc(&mut first, &big) else {
            panic!("an ICMP error goes back");
        };
        let read = packet::read(&error).expect("valid checksums");
        assert_eq!(
            read.l4,
            L4::Unreachable {
                code: 4,
                quoted_src: client(41002),
                quoted_dst: node(30083),
                quoted_proto: 17,
            }
        );
        assert_eq!((read.src_ip, read.dst_ip), (NODE, *client(0).ip()));
        assert_eq!(error[40..42], 1492u16.to_be_bytes(), "the next-hop MTU");

        // A forged option, naming a frontend the backend's node does not serve: ignored, and
        // the pod's replies are not rewritten.
        let forged = packet::Builder {
            ip_options: dsr_option(node(31999)).to_vec(),
            ..tcp(client(41003), remote_pod(), TCP_SYN)
        }
        .build();
        assert_eq!(tc(&mut second, &forged), Outcome::Stack(forged.clone()));
        let reply = tcp(remote_pod(), client(41003), TCP_SYN | TCP_ACK).build();
        let out = second.test_run(Hook::FromPod, &reply, 1).expect("from_pod");
        assert_eq!((out.verdict, out.frame), (TCX_NEXT, reply), "untouched");

        // The same client port towards another DSR frontend of the same pod while the first
        // flow lives: the pod could not tell them apart, so this one is masqueraded.
        let syn = tcp(client(41000), node(30085), TCP_SYN).build();
        let Outcome::Out(sent) = tc(&mut first, &syn) else {
            panic!("routed out");
        };
        assert_eq!(sent[14], 0x45, "no option");
        assert_eq!(packet::read(&sent).unwrap().src(), Some(node(41000)));

        let (first, second) = (first.stats().unwrap(), second.stats().unwrap());
        assert_eq!(first.get(Counter::DsrSent), 3, "{first:?}");
        assert_eq!(first.get(Counter::DropTooBig), 1, "{first:?}");
        assert_eq!(first.get(Counter::Masqueraded), 1, "{first:?}");
        assert_eq!(second.get(Counter::DsrRecorded), 3, "{second:?}");
    });
}

/// A frame with another destination (and every checksum fixed).
fn with_dst(frame: &[u8], to: SocketAddrV4) -> Vec<u8> {
    let read = packet::read(frame).expect("a valid frame");
    let from = read.src().expect("TCP or UDP");
    let builder = match read.l4 {
        L4::Udp { payload, .. } => udp(from, to, &payload),
        L4::Tcp { flags, payload, .. } => tcp(from, to, flags).payload(&payload),
        other => panic!("{other:?}"),
    };
    builder.build()
}
