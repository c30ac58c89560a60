//! The XDP fast path against tc, on one fixture table: every packet goes through `from_outside`
//! (tc) on one data plane, and through `from_outside_xdp` then, if XDP passes it, `from_outside`
//! on another, as the kernel would run them on a node's interface. Both must end alike: the
//! same packet sent out, passed to the stack or dropped, byte for byte. The fixtures cover
//! what the fast path takes (masqueraded flows both ways, UDP with and without checksum) and
//! what it must leave to tc (local backends, rejects, fragments, IP options, packets whose
//! checksum is only the pseudo-header sum, a last hop).
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
    Counter, Frontend, Hook, NodeSettings, Protocol, Reach, ServiceSpec,
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

fn spec(masquerade: bool) -> ServiceSpec {
    ServiceSpec {
        reach: Reach::External {
            masquerade,
            drop_when_empty: false,
        },
        ..ServiceSpec::default()
    }
}

/// A node's data plane: NodePorts 30080 (TCP and UDP) to a pod on another node, 30081 to a
/// pod on this node, 30082 without endpoints.
fn node_dataplane(test: &str) -> TestDataplane {
    let mut dp = TestDataplane::open(test);
    dp.set_node(&NodeSettings {
        pod_cidr: Some((Ipv4Addr::new(10, 1, 0, 0), 24)),
        masquerade_addr: Some(NODE),
        nodeport_addrs: vec![NODE],
    })
    .expect("node settings");
    for (port, proto, backend) in [
        (30080, Protocol::Tcp, Some(remote_pod())),
        (30080, Protocol::Udp, Some(remote_pod())),
        (30081, Protocol::Tcp, Some(local_pod())),
        (30082, Protocol::Tcp, None),
    ] {
        let frontend = Frontend::node_port(port, proto);
        dp.upsert_service(frontend, spec(true)).expect("upsert");
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
