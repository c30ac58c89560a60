//! Packet fixtures through BPF_PROG_TEST_RUN: the real programs, the real maps, one packet at a
//! time, and every checksum of what comes out verified.

mod common;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use common::{TestDataplane, addr};
use ebpf_dataplane::{
    Config, Counter, CounterKind, DesiredService, Frontend, Hook, Scheduler, ServiceSpec,
    packet::{self, Builder, L4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, tcp, udp},
    verdict::{TC_ACT_REDIRECT, TC_ACT_SHOT, TCX_NEXT},
};

const CLIENT_IP: [u8; 4] = [10, 0, 0, 2];

fn client(port: u16) -> SocketAddrV4 {
    addr(CLIENT_IP[0], CLIENT_IP[1], CLIENT_IP[2], CLIENT_IP[3], port)
}

fn web() -> Frontend {
    Frontend::tcp(addr(10, 96, 0, 10, 80))
}
fn dns() -> Frontend {
    Frontend::udp(addr(10, 96, 0, 10, 53))
}
fn empty_tcp() -> Frontend {
    Frontend::tcp(addr(10, 96, 0, 20, 80))
}
fn empty_udp() -> Frontend {
    Frontend::udp(addr(10, 96, 0, 20, 53))
}
fn web_backends() -> Vec<SocketAddrV4> {
    (1..=3).map(|i| addr(10, 1, 0, i, 8080)).collect()
}
fn dns_backend() -> SocketAddrV4 {
    addr(10, 1, 0, 4, 5353)
}

/// The services every fixture runs against.
fn dataplane(test: &str) -> TestDataplane {
    let mut dp = TestDataplane::open(test);
    for frontend in [web(), dns(), empty_tcp(), empty_udp()] {
        dp.upsert_service(frontend, ServiceSpec::default())
            .expect("upsert");
    }
    dp.set_backends(web(), &web_backends())
        .expect("set backends");
    dp.set_backends(dns(), &[dns_backend()])
        .expect("set backends");
    dp
}

/// What a fixture expects of the program.
enum Expect {
    /// Verdict TCX_NEXT and the frame exactly as it went in.
    Untouched,
    /// Verdict TCX_NEXT, destination rewritten to one of these, everything else as it was.
    DnatTo(Vec<SocketAddrV4>),
    /// Verdict TCX_NEXT, source rewritten to this (the service), everything else as it was.
    RevNatFrom(SocketAddrV4),
    /// Redirected back to the client as an ICMP port unreachable from the service address.
    Rejected,
    /// Verdict TC_ACT_SHOT.
    Dropped,
}

struct Fixture {
    name: &'static str,
    hook: Hook,
    frame: Vec<u8>,
    expect: Expect,
    /// The counter that must go up by exactly one.
    counter: Counter,
}

fn fixtures() -> Vec<Fixture> {
    let syn = |src, dst: Frontend| tcp(src, dst.addr, TCP_SYN);
    let mut with_options = syn(client(40008), web());
    with_options.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL: IHL 6
    let first_fragment = Builder {
        frag_off: 0x2000,
        ..udp(client(40010), dns().addr, &[7; 64])
    };
    // Of a datagram whose first fragment was not translated here (another destination).
    let later_fragment = Builder {
        frag_off: 0x0008,
        ..udp(client(40010), empty_udp().addr, &[7; 64])
    };
    let mut arp = syn(client(40011), web()).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let mut icmp_echo = syn(client(40012), web()).build();
    icmp_echo[14 + 9] = packet::IPPROTO_ICMP;
    let full = syn(client(40013), web())
        .payload(b"GET / HTTP/1.1\r\n\r\n")
        .build();
    // Cut inside the TCP header, with an IP total length that says so.
    let mut truncated_tcp = full[..14 + 20 + 10].to_vec();
    truncated_tcp[16..18].copy_from_slice(&30u16.to_be_bytes());
    let mut overlong_ip = full.clone();
    overlong_ip[16..18].copy_from_slice(&((full.len() - 14 + 1) as u16).to_be_bytes());
    let mut short_total = full.clone();
    short_total[16..18].copy_from_slice(&12u16.to_be_bytes());
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44;
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;

    vec![
        Fixture {
            name: "TCP SYN to a service is translated to one of its backends",
            hook: Hook::FromPod,
            frame: syn(client(40001), web()).build(),
            expect: Expect::DnatTo(web_backends()),
            counter: Counter::DnatNew,
        },
        Fixture {
            name: "TCP data to a service keeps its payload while translated",
            hook: Hook::FromPod,
            frame: tcp(client(40002), web().addr, TCP_ACK | TCP_PSH)
                .payload(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                .build(),
            expect: Expect::DnatTo(web_backends()),
            counter: Counter::DnatNew,
        },
        Fixture {
            name: "UDP to a service is translated to its backend",
            hook: Hook::FromPod,
            frame: udp(client(40003), dns().addr, b"query").build(),
            expect: Expect::DnatTo(vec![dns_backend()]),
            counter: Counter::DnatNew,
        },
        Fixture {
            name: "a reply from the backend is translated back to the service address",
            hook: Hook::ToPod,
            frame: udp(dns_backend(), client(40003), b"answer").build(),
            expect: Expect::RevNatFrom(dns().addr),
            counter: Counter::RevNat,
        },
        Fixture {
            name: "UDP without a checksum is translated and keeps no checksum",
            hook: Hook::FromPod,
            frame: Builder {
                udp_no_checksum: true,
                ..udp(client(40004), dns().addr, b"query")
            }
            .build(),
            expect: Expect::DnatTo(vec![dns_backend()]),
            counter: Counter::DnatNew,
        },
        Fixture {
            name: "a TCP SYN to a service without backends gets ICMP port unreachable",
            hook: Hook::FromPod,
            frame: syn(client(40005), empty_tcp()).payload(&[1; 100]).build(),
            expect: Expect::Rejected,
            counter: Counter::RejectNoBackend,
        },
        Fixture {
            name: "UDP to a service without backends gets ICMP port unreachable",
            hook: Hook::FromPod,
            frame: udp(client(40006), empty_udp().addr, b"q").build(),
            expect: Expect::Rejected,
            counter: Counter::RejectNoBackend,
        },
        Fixture {
            name: "TCP to an address that is no service passes untouched",
            hook: Hook::FromPod,
            frame: tcp(client(40007), addr(10, 1, 0, 1, 8080), TCP_SYN).build(),
            expect: Expect::Untouched,
            counter: Counter::PassOutsideRanges,
        },
        Fixture {
            name: "a service port the VIP does not serve passes untouched",
            hook: Hook::FromPod,
            frame: tcp(client(40007), addr(10, 96, 0, 10, 443), TCP_SYN).build(),
            expect: Expect::Untouched,
            counter: Counter::PassNotService,
        },
        Fixture {
            name: "a packet with IP options is translated at the right offsets",
            hook: Hook::FromPod,
            frame: with_options.build(),
            expect: Expect::DnatTo(web_backends()),
            counter: Counter::DnatNew,
        },
        Fixture {
            name: "a reply of no translated flow passes untouched",
            hook: Hook::ToPod,
            frame: tcp(addr(10, 1, 0, 9, 8080), client(40009), TCP_SYN | TCP_ACK).build(),
            expect: Expect::Untouched,
            counter: Counter::PassNotService,
        },
        Fixture {
            name: "the first fragment of a datagram to a service is translated",
            hook: Hook::FromPod,
            frame: first_fragment.build(),
            expect: Expect::DnatTo(vec![dns_backend()]),
            counter: Counter::DnatNew,
        },
        Fixture {
            name: "a later fragment (no L4 header) of an unknown datagram passes untouched",
            hook: Hook::FromPod,
            frame: later_fragment.build(),
            expect: Expect::Untouched,
            counter: Counter::PassNotService,
        },
        Fixture {
            name: "ARP passes untouched",
            hook: Hook::FromPod,
            frame: arp,
            expect: Expect::Untouched,
            counter: Counter::PassNotIpv4,
        },
        Fixture {
            name: "ICMP to a service address passes untouched",
            hook: Hook::FromPod,
            frame: icmp_echo,
            expect: Expect::Untouched,
            counter: Counter::PassNotService,
        },
        Fixture {
            name: "a TCP header cut short is dropped",
            hook: Hook::FromPod,
            frame: truncated_tcp,
            expect: Expect::Dropped,
            counter: Counter::DropTruncatedL4,
        },
        Fixture {
            name: "an IPv4 total length beyond the frame (a cut packet) is dropped",
            hook: Hook::FromPod,
            frame: overlong_ip,
            expect: Expect::Dropped,
            counter: Counter::DropMalformedIpv4,
        },
        Fixture {
            name: "an IPv4 total length shorter than its header is dropped",
            hook: Hook::ToPod,
            frame: short_total,
            expect: Expect::Dropped,
            counter: Counter::DropMalformedIpv4,
        },
        Fixture {
            name: "an IHL below 5 is dropped",
            hook: Hook::FromPod,
            frame: bad_ihl,
            expect: Expect::Dropped,
            counter: Counter::DropMalformedIpv4,
        },
        Fixture {
            name: "IP version 6 in an IPv4 ethertype is dropped",
            hook: Hook::ToPod,
            frame: bad_version,
            expect: Expect::Dropped,
            counter: Counter::DropMalformedIpv4,
        },
    ]
}

#[test]
fn packet_fixtures() {
    let mut dp = dataplane("fixtures");
    let mut failures = Vec::new();
    for fixture in fixtures() {
        let before = dp.stats().expect("stats");
        let out = dp
            .test_run(fixture.hook, &fixture.frame, 1)
            .unwrap_or_else(|e| panic!("{}: {e:?}", fixture.name));
        let delta = dp.stats().expect("stats").since(&before);
        if let Err(why) = check(&fixture, out.verdict, &out.frame) {
            failures.push(format!("{}: {why}", fixture.name));
        }
        let moved: Vec<_> = delta
            .iter()
            .filter(|&(c, v)| v != 0 && c.kind() != CounterKind::Event)
            .collect();
        let counter_ok = delta.get(fixture.counter) == 1
            && moved.iter().all(|&(c, v)| c == fixture.counter && v == 1);
        if !counter_ok {
            failures.push(format!(
                "{}: expected only {} to count one packet, counters moved: {moved:?}",
                fixture.name,
                fixture.counter.name()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "fixtures failed:\n{}",
        failures.join("\n")
    );
}

fn check(fixture: &Fixture, verdict: u32, out: &[u8]) -> Result<(), String> {
    let expect_verdict = |want: u32| {
        if verdict == want {
            Ok(())
        } else {
            Err(format!("verdict {verdict}, expected {want}"))
        }
    };
    match &fixture.expect {
        Expect::Untouched => {
            expect_verdict(TCX_NEXT)?;
            if out != fixture.frame.as_slice() {
                return Err("the frame was modified".into());
            }
        }
        Expect::Dropped => expect_verdict(TC_ACT_SHOT)?,
        Expect::DnatTo(backends) => {
            expect_verdict(TCX_NEXT)?;
            let (sent, got) = (packet::read(&fixture.frame)?, packet::read(out)?);
            let dst = got.dst().ok_or("no ports")?;
            if !backends.contains(&dst) {
                return Err(format!("translated to {dst}, expected one of {backends:?}"));
            }
            if got.src() != sent.src() || l4_rest(&got.l4) != l4_rest(&sent.l4) {
                return Err(format!(
                    "more than the destination changed: {sent:?} -> {got:?}"
                ));
            }
            if out.len() != fixture.frame.len() {
                return Err("the frame changed length".into());
            }
        }
        Expect::RevNatFrom(service) => {
            expect_verdict(TCX_NEXT)?;
            let (sent, got) = (packet::read(&fixture.frame)?, packet::read(out)?);
            if got.src() != Some(*service) {
                return Err(format!("source is {:?}, expected {service}", got.src()));
            }
            if got.dst() != sent.dst() || l4_rest(&got.l4) != l4_rest(&sent.l4) {
                return Err(format!("more than the source changed: {sent:?} -> {got:?}"));
            }
        }
        Expect::Rejected => {
            expect_verdict(TC_ACT_REDIRECT)?;
            let sent = packet::read(&fixture.frame)?;
            let got = packet::read(out)?;
            let L4::Unreachable {
                code,
                quoted_src,
                quoted_dst,
                quoted_proto,
            } = got.l4
            else {
                return Err(format!("expected ICMP unreachable, got {:?}", got.l4));
            };
            let quoted_ok = Some(quoted_src) == sent.src() && Some(quoted_dst) == sent.dst();
            if code != 3 || !quoted_ok || quoted_proto != fixture.frame[14 + 9] {
                return Err(format!(
                    "wrong ICMP: code {code}, quoting {quoted_src} -> {quoted_dst}"
                ));
            }
            if got.src_ip != sent.dst_ip || got.dst_ip != sent.src_ip {
                return Err(format!(
                    "ICMP goes {} -> {}, expected service -> client",
                    got.src_ip, got.dst_ip
                ));
            }
            if got.dst_mac != sent.src_mac || got.src_mac != sent.dst_mac {
                return Err("MAC addresses are not swapped".into());
            }
        }
    }
    Ok(())
}

/// What must survive a translation: flags, checksum presence and payload (not the ports).
fn l4_rest(l4: &L4) -> (u8, bool, Vec<u8>) {
    match l4 {
        L4::Tcp { flags, payload, .. } => (*flags, true, payload.clone()),
        L4::Udp {
            checksum, payload, ..
        } => (0, *checksum, payload.clone()),
        _ => (0, false, Vec::new()),
    }
}

/// Sends one packet client -> service and returns the backend it was translated to.
fn send(dp: &mut TestDataplane, frame: &Builder) -> SocketAddrV4 {
    let out = dp
        .test_run(Hook::FromPod, &frame.build(), 1)
        .expect("test run");
    assert_eq!(out.verdict, TCX_NEXT, "verdict for a packet to a service");
    packet::read(&out.frame)
        .expect("valid checksums")
        .dst()
        .expect("ports")
}

#[test]
fn a_flow_sticks_to_its_backend() {
    let mut dp = dataplane("sticky");
    let from = client(41000);
    let first = send(&mut dp, &tcp(from, web().addr, TCP_SYN));
    for flags in [
        TCP_ACK,
        TCP_ACK | TCP_PSH,
        TCP_ACK,
        TCP_ACK | TCP_PSH,
        TCP_FIN | TCP_ACK,
    ] {
        for _ in 0..10 {
            assert_eq!(
                send(&mut dp, &tcp(from, web().addr, flags)),
                first,
                "every packet of a flow goes to its backend"
            );
        }
    }
    assert_eq!(
        dp.conntrack(from, web()).expect("read conntrack"),
        Some(first)
    );
    let stats = dp.stats().expect("stats");
    assert_eq!(
        (
            stats.get(Counter::DnatNew),
            stats.get(Counter::DnatEstablished),
            stats.get(Counter::CtMidFlow),
        ),
        (1, 50, 0)
    );

    // Its entry lost (collected when idle past the closing state's lifetime; a full map
    // would evict it), the flow's next packet is balanced again, and counted as a flow
    // conntrack had lost.
    dp.age_conntrack(Duration::from_secs(200)).unwrap();
    assert_eq!(dp.gc().unwrap().expired, 1);
    send(&mut dp, &tcp(from, web().addr, TCP_ACK));
    let stats = dp.stats().expect("stats");
    assert_eq!(stats.get(Counter::CtMidFlow), 1, "{stats:?}");
}

#[test]
fn random_selection_uses_every_backend() {
    let mut dp = dataplane("spread");
    let mut hits: BTreeMap<SocketAddrV4, u32> = BTreeMap::new();
    for port in 0..300 {
        *hits
            .entry(send(
                &mut dp,
                &tcp(client(20000 + port), web().addr, TCP_SYN),
            ))
            .or_default() += 1;
    }
    assert_eq!(
        hits.keys().copied().collect::<Vec<_>>(),
        web_backends(),
        "every backend is used"
    );
    for (backend, n) in &hits {
        // 300 flows over 3 backends: 100 each on average; 50 is ~6 standard deviations away.
        assert!(*n >= 50, "{backend} got only {n} of 300 flows");
    }
}

#[test]
fn a_retransmitted_syn_keeps_its_backend_and_a_reused_tuple_chooses_again() {
    let mut dp = dataplane("reuse");
    let from = client(42000);
    let first = send(&mut dp, &tcp(from, web().addr, TCP_SYN));
    assert_eq!(
        send(&mut dp, &tcp(from, web().addr, TCP_SYN)),
        first,
        "a SYN retransmit keeps the backend"
    );
    assert_eq!(dp.stats().unwrap().get(Counter::Reselected), 0);
    send(&mut dp, &tcp(from, web().addr, TCP_ACK));
    send(&mut dp, &tcp(from, web().addr, TCP_FIN | TCP_ACK));
    // The connection closed; the same tuple opens a new one.
    send(&mut dp, &tcp(from, web().addr, TCP_SYN));
    let stats = dp.stats().unwrap();
    assert_eq!(
        stats.get(Counter::Reselected),
        1,
        "a SYN on a closed flow chooses a backend afresh"
    );
    assert_eq!(stats.get(Counter::DnatNew), 2);
}

#[test]
fn maglev_chooses_the_backend_userspace_predicts() {
    let mut dp = TestDataplane::open("maglev");
    let service = Frontend::tcp(addr(10, 96, 1, 1, 443));
    let spec = ServiceSpec {
        scheduler: Scheduler::Maglev { table_size: 1021 },
        affinity_timeout: None,
        ..Default::default()
    };
    dp.upsert_service(service, spec).unwrap();
    let backends: Vec<_> = (1..=5).map(|i| addr(10, 2, 0, i, 8443)).collect();
    dp.set_backends(service, &backends).unwrap();
    let mut used = BTreeMap::new();
    for i in 0..200u16 {
        let from = addr(10, 0, (i % 7) as u8, (i % 200) as u8 + 1, 30000 + i);
        let predicted = dp.maglev_backend(&service, from).expect("a Maglev service");
        let got = send(&mut dp, &tcp(from, service.addr, TCP_SYN));
        assert_eq!(got, predicted, "client {from}");
        *used.entry(got).or_insert(0) += 1;
    }
    assert_eq!(used.len(), 5, "200 clients reach all 5 backends: {used:?}");

    // A backend leaving only moves the clients it served.
    let before: Vec<_> = (0..200u16)
        .map(|i| addr(10, 3, 0, (i % 250) as u8 + 1, 31000 + i))
        .map(|c| (c, dp.maglev_backend(&service, c).unwrap()))
        .collect();
    let removed = backends[2];
    let rest: Vec<_> = backends.iter().copied().filter(|&b| b != removed).collect();
    dp.set_backends(service, &rest).unwrap();
    let moved = before
        .iter()
        .filter(|(c, b)| *b != removed && dp.maglev_backend(&service, *c) != Some(*b))
        .count();
    assert!(
        moved <= 10,
        "{moved} of the clients of staying backends moved"
    );
    for (c, _) in &before {
        let now = dp.maglev_backend(&service, *c).unwrap();
        assert_ne!(now, removed, "no client maps to the removed backend");
        assert_eq!(send(&mut dp, &tcp(*c, service.addr, TCP_SYN)), now);
    }
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_until_it_times_out() {
    let mut dp = TestDataplane::open("affinity");
    let service = Frontend::tcp(addr(10, 96, 2, 1, 80));
    let spec = ServiceSpec {
        scheduler: Scheduler::Random,
        affinity_timeout: Some(Duration::from_secs(10_800)),
        ..Default::default()
    };
    dp.upsert_service(service, spec).unwrap();
    dp.set_backends(service, &web_backends()).unwrap();
    let from = |port| addr(10, 0, 7, 7, port);
    let first = send(&mut dp, &tcp(from(50000), service.addr, TCP_SYN));
    for port in 50001..50050 {
        assert_eq!(
            send(&mut dp, &tcp(from(port), service.addr, TCP_SYN)),
            first,
            "new flows of the client keep its backend"
        );
    }
    assert_eq!(dp.stats().unwrap().get(Counter::AffinityHit), 49);
    // Another client is free to go elsewhere: across many clients every backend is used.
    let mut used = std::collections::BTreeSet::new();
    for i in 1..=60 {
        used.insert(send(
            &mut dp,
            &tcp(addr(10, 0, 8, i, 50000), service.addr, TCP_SYN),
        ));
    }
    assert_eq!(used.len(), 3, "affinity is per client");

    // Once the timeout has passed, the next flow chooses afresh (and starts a new affinity).
    assert!(
        dp.age_affinity(*from(0).ip(), service, Duration::from_secs(10_801))
            .unwrap()
    );
    let hits = dp.stats().unwrap().get(Counter::AffinityHit);
    let chosen = send(&mut dp, &tcp(from(50100), service.addr, TCP_SYN));
    assert_eq!(
        dp.stats().unwrap().get(Counter::AffinityHit),
        hits,
        "an expired affinity is not used"
    );
    assert_eq!(
        send(&mut dp, &tcp(from(50101), service.addr, TCP_SYN)),
        chosen,
        "the new choice sticks"
    );

    // A backend that leaves releases its clients.
    let rest: Vec<_> = web_backends()
        .into_iter()
        .filter(|&b| b != chosen)
        .collect();
    dp.set_backends(service, &rest).unwrap();
    for port in 50200..50220 {
        assert_ne!(
            send(&mut dp, &tcp(from(port), service.addr, TCP_SYN)),
            chosen
        );
    }
}

#[test]
fn removing_a_backend_keeps_its_tcp_flows_and_moves_its_udp_flows() {
    let mut dp = dataplane("removal");
    // Open TCP flows until one lands on each backend.
    let mut flows: BTreeMap<SocketAddrV4, SocketAddrV4> = BTreeMap::new();
    let mut port = 43000;
    while flows.len() < 3 {
        let from = client(port);
        let backend = send(&mut dp, &tcp(from, web().addr, TCP_SYN));
        send(&mut dp, &tcp(from, web().addr, TCP_ACK));
        flows.entry(backend).or_insert(from);
        port += 1;
    }
    let removed = web_backends()[0];
    dp.set_backends(web(), &web_backends()[1..]).unwrap();
    let established = flows[&removed];
    assert_eq!(
        send(&mut dp, &tcp(established, web().addr, TCP_ACK | TCP_PSH)),
        removed,
        "an established TCP flow to a removed backend keeps working"
    );
    for port in 44000..44100 {
        assert_ne!(
            send(&mut dp, &tcp(client(port), web().addr, TCP_SYN)),
            removed,
            "no new flow goes to a removed backend"
        );
    }

    // UDP: a single backend replaced; the flow follows.
    let from = client(45000);
    assert_eq!(send(&mut dp, &udp(from, dns().addr, b"q")), dns_backend());
    let replacement = addr(10, 1, 0, 5, 5353);
    dp.set_backends(dns(), &[replacement]).unwrap();
    assert_eq!(
        send(&mut dp, &udp(from, dns().addr, b"q")),
        replacement,
        "a UDP flow leaves a removed backend"
    );
    assert_eq!(dp.stats().unwrap().get(Counter::Reselected), 1);
}

#[test]
fn a_direct_flow_reusing_an_ended_service_flows_tuple_is_not_reverse_translated() {
    let mut dp = dataplane("reuse-direct");
    let from = client(49000);
    let backend = send(&mut dp, &tcp(from, web().addr, TCP_SYN));
    let reply = tcp(backend, from, TCP_SYN | TCP_ACK).build();
    let out = dp.test_run(Hook::ToPod, &reply, 1).unwrap();
    assert_eq!(
        packet::read(&out.frame).unwrap().src(),
        Some(web().addr),
        "the service flow's reply is translated"
    );
    send(&mut dp, &tcp(from, web().addr, TCP_RST));
    // The client now connects to the backend directly, from the same port.
    let direct = tcp(from, backend, TCP_SYN).build();
    let out = dp.test_run(Hook::FromPod, &direct, 1).unwrap();
    assert_eq!(out.frame, direct, "a direct SYN passes untouched");
    let out = dp.test_run(Hook::ToPod, &reply, 1).unwrap();
    assert_eq!(
        out.frame, reply,
        "the direct flow's SYN-ACK keeps the backend's address"
    );
}

#[test]
fn a_deleted_service_stops_translating_new_flows() {
    let mut dp = dataplane("delete");
    dp.delete_service(web()).unwrap();
    let frame = tcp(client(46000), web().addr, TCP_SYN).build();
    let out = dp.test_run(Hook::FromPod, &frame, 1).unwrap();
    assert_eq!(
        (out.verdict, out.frame),
        (TCX_NEXT, frame),
        "passes untouched"
    );
    assert!(dp.service(&web()).is_none());
}

#[test]
fn garbage_never_crashes_and_is_always_accounted_for() {
    let mut dp = dataplane("garbage");
    // A deterministic xorshift so a failure can be replayed.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let template = tcp(client(47000), web().addr, TCP_SYN)
        .payload(&[0xab; 40])
        .build();
    let (mut translated, mut dropped) = (0, 0);
    for round in 0..2000 {
        // Cut somewhere past the IPv4 header (BPF_PROG_TEST_RUN refuses IPv4 frames shorter
        // than that), then damage random bytes.
        let mut frame = template.clone();
        let len = 34 + (next() as usize % (frame.len() - 33));
        frame.truncate(len);
        if next() % 2 == 0 {
            // Half the frames say their true length, so the damage reaches past the IP header.
            frame[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
        }
        for _ in 0..(next() % 4) {
            let at = next() as usize % frame.len();
            frame[at] = next() as u8;
        }
        let hook = if round % 2 == 0 {
            Hook::FromPod
        } else {
            Hook::ToPod
        };
        let before = dp.stats().unwrap();
        let out = dp
            .test_run(hook, &frame, 1)
            .expect("the program runs on any input");
        let delta = dp.stats().unwrap().since(&before);
        let counted: u64 = delta
            .iter()
            .filter(|(c, _)| c.kind() != CounterKind::Event)
            .map(|(_, v)| v)
            .sum();
        assert_eq!(
            counted,
            1,
            "round {round}: exactly one verdict or drop reason per packet ({:?})",
            delta.iter().filter(|(_, v)| *v > 0).collect::<Vec<_>>()
        );
        match out.verdict {
            TC_ACT_SHOT => dropped += 1,
            TCX_NEXT if out.frame != frame => {
                translated += 1;
                // Translated: a packet that was valid stays valid (one that was not stays
                // invalid: incremental checksum updates keep a wrong sum wrong).
                if packet::read(&frame).is_ok() {
                    packet::read(&out.frame).unwrap_or_else(|e| {
                        panic!(
                            "round {round}: a valid packet was translated into a broken one: {e}"
                        )
                    });
                }
            }
            TCX_NEXT | TC_ACT_REDIRECT => {}
            other => panic!("round {round}: unexpected verdict {other}"),
        }
    }
    // The damage must have reached both paths, or this test proves nothing.
    assert!(
        translated > 50 && dropped > 50,
        "{translated} translated, {dropped} dropped of 2000"
    );
}

#[test]
fn services_survive_a_restart_of_the_owner() {
    let mut dp = dataplane("adopt");
    let maglev = Frontend::tcp(addr(10, 96, 9, 9, 80));
    dp.upsert_service(
        maglev,
        ServiceSpec {
            scheduler: Scheduler::Maglev { table_size: 251 },
            affinity_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .unwrap();
    dp.set_backends(maglev, &web_backends()).unwrap();
    let from = client(48000);
    let backend = send(&mut dp, &tcp(from, web().addr, TCP_SYN));
    let services_before: Vec<_> = dp.services().map(|(f, s)| (*f, s.clone())).collect();
    let slots_before = dp.backend_slots();

    dp.restart();

    let services_after: Vec<_> = dp.services().map(|(f, s)| (*f, s.clone())).collect();
    assert_eq!(
        services_after, services_before,
        "the services are adopted as they were"
    );
    assert_eq!(
        dp.backend_slots(),
        slots_before,
        "slot accounting is rebuilt"
    );
    assert_eq!(
        dp.conntrack(from, web()).unwrap(),
        Some(backend),
        "flows survive"
    );
    assert_eq!(send(&mut dp, &tcp(from, web().addr, TCP_ACK)), backend);
    // Adopted state is live: it can be changed.
    dp.set_backends(web(), &web_backends()[..1]).unwrap();
    assert_eq!(
        send(&mut dp, &tcp(client(48001), web().addr, TCP_SYN)),
        web_backends()[0]
    );
}

/// Runs a backend's reply through `to_pod`; returns the source the client sees.
fn answer(dp: &mut TestDataplane, frame: &Builder) -> SocketAddrV4 {
    let out = dp
        .test_run(Hook::ToPod, &frame.build(), 1)
        .expect("test run");
    assert_eq!(out.verdict, TCX_NEXT, "verdict for a reply");
    packet::read(&out.frame)
        .expect("valid checksums")
        .src()
        .expect("ports")
}

#[test]
fn a_closed_connection_is_forgotten_at_once() {
    let mut dp = dataplane("close");
    let closes = |dp: &mut TestDataplane| dp.stats().unwrap().get(Counter::CtClosed);

    // The client closes first; its ACK of the backend's FIN is the flow's last packet.
    let from = client(43000);
    let backend = send(&mut dp, &tcp(from, web().addr, TCP_SYN));
    answer(&mut dp, &tcp(backend, from, TCP_SYN | TCP_ACK));
    send(&mut dp, &tcp(from, web().addr, TCP_ACK));
    send(&mut dp, &tcp(from, web().addr, TCP_FIN | TCP_ACK));
    answer(&mut dp, &tcp(backend, from, TCP_ACK));
    assert_eq!(
        answer(&mut dp, &tcp(backend, from, TCP_FIN | TCP_ACK)),
        web().addr
    );
    assert!(
        dp.conntrack(from, web()).unwrap().is_some(),
        "still closing"
    );
    send(&mut dp, &tcp(from, web().addr, TCP_ACK));
    assert_eq!(dp.conntrack(from, web()).unwrap(), None, "forgotten");
    assert_eq!(closes(&mut dp), 1);

    // The backend closes first; its ACK of the client's FIN is the last packet (seen on the
    // way back, where only closing flows are looked up).
    let from = client(43001);
    let backend = send(&mut dp, &tcp(from, web().addr, TCP_SYN));
    send(&mut dp, &tcp(from, web().addr, TCP_ACK));
    answer(&mut dp, &tcp(backend, from, TCP_FIN | TCP_ACK));
    send(&mut dp, &tcp(from, web().addr, TCP_FIN | TCP_ACK));
    assert!(
        dp.conntrack(from, web()).unwrap().is_some(),
        "still closing"
    );
    assert_eq!(answer(&mut dp, &tcp(backend, from, TCP_ACK)), web().addr);
    assert_eq!(dp.conntrack(from, web()).unwrap(), None, "forgotten");
    assert_eq!(closes(&mut dp), 2);

    // A reset from either side ends the flow.
    for (i, backend_resets) in [false, true].into_iter().enumerate() {
        let from = client(43002 + i as u16);
        let backend = send(&mut dp, &tcp(from, web().addr, TCP_SYN));
        send(&mut dp, &tcp(from, web().addr, TCP_ACK));
        if backend_resets {
            answer(&mut dp, &tcp(backend, from, TCP_RST | TCP_ACK));
        } else {
            send(&mut dp, &tcp(from, web().addr, TCP_RST));
        }
        assert_eq!(dp.conntrack(from, web()).unwrap(), None);
    }
    assert_eq!(closes(&mut dp), 4);
    let stats = dp.stats().unwrap();
    assert_eq!(stats.get(Counter::CtCreated), 4, "{stats:?}");
}

#[test]
fn idle_flows_are_collected_after_their_lifetime() {
    let mut dp = dataplane("gc");
    let (udp_client, tcp_client) = (client(44000), client(44001));
    let dns_backend = send(&mut dp, &udp(udp_client, dns().addr, b"q"));
    send(&mut dp, &tcp(tcp_client, web().addr, TCP_SYN));
    send(&mut dp, &tcp(tcp_client, web().addr, TCP_ACK));
    let report = dp.gc().unwrap();
    assert_eq!((report.entries, report.expired), (2, 0), "nothing idle yet");

    // Past UDP's lifetime (120 s), well within an established TCP flow's (6 h).
    dp.age_conntrack(Duration::from_secs(200)).unwrap();
    let report = dp.gc().unwrap();
    assert_eq!((report.entries, report.expired), (1, 1), "{report:?}");
    assert_eq!(dp.conntrack(udp_client, dns()).unwrap(), None);
    assert!(dp.conntrack(tcp_client, web()).unwrap().is_some());
    // Its reverse entry went with it: a late answer is not translated.
    let late = udp(dns_backend, udp_client, b"a").build();
    let out = dp.test_run(Hook::ToPod, &late, 1).unwrap();
    assert_eq!(out.frame, late);

    // A flow whose reverse entry was evicted gets it back with its next packet (the repair
    // runs when the flow's time stamp moves on).
    dp.age_conntrack(Duration::from_secs(2)).unwrap();
    let backend = dp.conntrack(tcp_client, web()).unwrap().unwrap();
    assert!(dp.forget_reply(tcp_client, web()).unwrap());
    send(&mut dp, &tcp(tcp_client, web().addr, TCP_ACK));
    assert_eq!(
        answer(&mut dp, &tcp(backend, tcp_client, TCP_ACK)),
        web().addr
    );
    assert_eq!(dp.stats().unwrap().get(Counter::RevNatRepaired), 1);
}

#[test]
fn removing_a_backend_leaves_the_other_backends_clients_where_they_are() {
    let mut dp = dataplane("members");
    let backends = web_backends();
    let sticky_udp = Frontend::udp(addr(10, 96, 0, 41, 53));
    let affinity = Frontend::tcp(addr(10, 96, 0, 40, 80));
    dp.upsert_service(sticky_udp, ServiceSpec::default())
        .unwrap();
    dp.upsert_service(
        affinity,
        ServiceSpec {
            scheduler: Scheduler::Random,
            affinity_timeout: Some(Duration::from_secs(3600)),
            ..Default::default()
        },
    )
    .unwrap();
    for service in [sticky_udp, affinity] {
        dp.set_backends(service, &backends).unwrap();
    }
    // UDP flows stick to their backend; affinity clients (one address each) too.
    let flows: Vec<_> = (0..60u16)
        .map(|i| {
            let from = client(45000 + i);
            (from, send(&mut dp, &udp(from, sticky_udp.addr, b"q")))
        })
        .collect();
    let clients: Vec<_> = (1..=60u8)
        .map(|i| {
            let from = addr(10, 0, 1, i, 46000);
            (from, send(&mut dp, &tcp(from, affinity.addr, TCP_SYN)))
        })
        .collect();
    for backend in &backends {
        assert!(
            flows.iter().any(|(_, b)| b == backend) && clients.iter().any(|(_, b)| b == backend),
            "every backend has clients of both kinds"
        );
    }

    // The first backend leaves: the others' slots change, their clients must not.
    let removed = backends[0];
    for service in [sticky_udp, affinity] {
        dp.set_backends(service, &backends[1..]).unwrap();
    }
    for (from, before) in &flows {
        let now = send(&mut dp, &udp(*from, sticky_udp.addr, b"q"));
        if *before == removed {
            assert_ne!(now, removed, "a removed backend's UDP flow moves on");
        } else {
            assert_eq!(now, *before, "the UDP flow of {from} stays on {before}");
        }
    }
    for (from, before) in &clients {
        // A new connection from the same client address.
        let again = SocketAddrV4::new(*from.ip(), 47000);
        let now = send(&mut dp, &tcp(again, affinity.addr, TCP_SYN));
        if *before == removed {
            assert_ne!(now, removed);
        } else {
            assert_eq!(now, *before, "the affinity of {from} stays on {before}");
        }
    }
}

#[test]
fn a_full_map_converges_once_services_are_removed() {
    let mut config = Config::with_pin_dir(common::pin_dir("full"));
    config.backend_slots = 12;
    let mut dp = TestDataplane::with_config(config);
    let desired = |ids: &[u8]| -> Vec<DesiredService> {
        ids.iter()
            .map(|&i| DesiredService {
                frontend: Frontend::tcp(addr(10, 96, 2, i, 80)),
                spec: ServiceSpec::default(),
                backends: (1..=4).map(|j| addr(10, 3, i, j, 80)).collect(),
                source_ranges: Vec::new(),
            })
            .collect()
    };
    // Three services of four backends fill the twelve slots; a fourth does not fit, and its
    // failure stops no other.
    let report = dp.sync(desired(&[1, 2, 3, 4]));
    assert_eq!((report.created, report.failed.len()), (3, 1), "{report:?}");
    // Two go, two come: the space the removals free serves the newcomers.
    let report = dp.sync(desired(&[3, 4, 5]));
    assert_eq!((report.deleted, report.created), (2, 2), "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert_eq!(dp.services().count(), 3);
}

#[test]
fn later_fragments_follow_their_first_both_ways() {
    let mut dp = dataplane("fragments");
    let from = client(48000);
    let first = Builder {
        frag_off: 0x2000,
        ..udp(from, dns().addr, &[1; 64])
    };
    let backend = send(&mut dp, &first);
    // A later fragment: no UDP header, only data (the builder's "header" bytes are data here).
    let later = Builder {
        frag_off: 0x0009,
        ..udp(from, dns().addr, &[2; 64])
    }
    .build();
    let out = dp.test_run(Hook::FromPod, &later, 1).unwrap();
    assert_eq!(out.verdict, TCX_NEXT);
    assert_ip_dst_rewritten(&later, &out.frame, *backend.ip());

    // The backend's reply, fragmented too: its first fragment is reverse translated, and the
    // later ones follow.
    let reply_first = Builder {
        frag_off: 0x2000,
        ..udp(backend, from, &[3; 64])
    };
    assert_eq!(answer(&mut dp, &reply_first), dns().addr);
    let reply_later = Builder {
        frag_off: 0x0009,
        ..udp(backend, from, &[4; 64])
    }
    .build();
    let out = dp.test_run(Hook::ToPod, &reply_later, 1).unwrap();
    assert_eq!(out.verdict, TCX_NEXT);
    assert_eq!(
        &out.frame[26..30],
        &dns().addr.ip().octets(),
        "source restored"
    );
    assert_eq!(&out.frame[30..], &reply_later[30..], "nothing else changes");
    assert_eq!(
        ip_checksum(&out.frame[14..34]),
        0,
        "valid IP header checksum"
    );
    assert_eq!(dp.stats().unwrap().get(Counter::FragmentTracked), 2);
}

/// One's complement sum of a header (0 when its checksum is right).
fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn assert_ip_dst_rewritten(before: &[u8], after: &[u8], to: Ipv4Addr) {
    assert_eq!(&after[30..34], &to.octets(), "destination rewritten");
    assert_eq!(
        &after[..24],
        &before[..24],
        "the rest of the header is as it was"
    );
    assert_eq!(&after[26..30], &before[26..30]);
    assert_eq!(&after[34..], &before[34..], "the data is untouched");
    assert_eq!(ip_checksum(&after[14..34]), 0, "valid IP header checksum");
}

/// An ICMP error frame: `from` tells `to` that `quoted` (an IPv4 + UDP header) failed.
fn icmp_error(from: Ipv4Addr, to: Ipv4Addr, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let total = 20 + 8 + quoted.len();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0,
        0,
        64,
        1,
        0,
        0,
    ];
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    let check = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    let check = ip_checksum(&icmp);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn an_icmp_error_about_a_reply_reaches_the_backend_translated() {
    let mut dp = dataplane("icmp-out");
    let from = client(49500);
    let backend = send(&mut dp, &udp(from, dns().addr, b"q"));
    // The client's kernel refuses the reply (its socket is gone): port unreachable, quoting
    // the reply as the client got it, from the service.
    let reply = answer_frame(&mut dp, &udp(backend, from, b"a"));
    let quoted = &reply[14..14 + 28];
    let frame = icmp_error(*from.ip(), *dns().addr.ip(), 3, 3, quoted);
    let out = dp.test_run(Hook::FromPod, &frame, 1).unwrap();
    assert_eq!(out.verdict, TCX_NEXT);
    let f = &out.frame;
    assert_eq!(&f[30..34], &backend.ip().octets(), "sent to the backend");
    assert_eq!(&f[26..30], &from.ip().octets(), "from the client");
    assert_eq!(
        &f[42 + 12..42 + 16],
        &backend.ip().octets(),
        "quoting the backend's packet"
    );
    assert_eq!(&f[42 + 20..42 + 22], &backend.port().to_be_bytes());
    assert_eq!(&f[42 + 16..42 + 20], &from.ip().octets());
    assert_eq!(ip_checksum(&f[14..34]), 0, "outer IP checksum");
    assert_eq!(ip_checksum(&f[42..62]), 0, "quoted IP checksum");
    assert_eq!(ip_checksum(&f[34..]), 0, "ICMP checksum");
    // The quoted UDP checksum is the one the backend's datagram had.
    let sent = udp(backend, from, b"a").build();
    assert_eq!(&f[42 + 26..42 + 28], &sent[40..42], "quoted UDP checksum");
    assert_eq!(dp.stats().unwrap().get(Counter::IcmpTranslated), 1);
}

/// Runs a backend's reply through `to_pod`; returns the frame the client gets.
fn answer_frame(dp: &mut TestDataplane, frame: &Builder) -> Vec<u8> {
    let out = dp.test_run(Hook::ToPod, &frame.build(), 1).unwrap();
    assert_eq!(out.verdict, TCX_NEXT);
    out.frame
}

#[test]
fn traffic_outside_the_service_ranges_leaves_at_once() {
    let mut dp = dataplane("ranges");
    let pass = |dp: &mut TestDataplane, frame: Vec<u8>| {
        let before = dp.stats().unwrap();
        let out = dp.test_run(Hook::FromPod, &frame, 1).unwrap();
        assert_eq!((out.verdict, &out.frame), (TCX_NEXT, &frame));
        dp.stats().unwrap().since(&before)
    };
    // A pod address: outside the ranges the services (10.96.0.10, 10.96.0.20) need.
    let delta = pass(
        &mut dp,
        tcp(client(50000), addr(10, 244, 1, 2, 8080), TCP_SYN).build(),
    );
    assert_eq!(delta.get(Counter::PassOutsideRanges), 1);
    // Inside the ranges but no service (a port the address does not serve): looked up, passed.
    let delta = pass(
        &mut dp,
        tcp(client(50001), addr(10, 96, 0, 10, 443), TCP_SYN).build(),
    );
    assert_eq!(delta.get(Counter::PassNotService), 1);
    // A service far from the others is served from its first packet: the ranges widen
    // before it is published.
    let far = Frontend::tcp(addr(172, 30, 0, 10, 80));
    dp.upsert_service(far, ServiceSpec::default()).unwrap();
    dp.set_backends(far, &web_backends()).unwrap();
    let backend = send(&mut dp, &tcp(client(50002), far.addr, TCP_SYN));
    assert!(web_backends().contains(&backend));
    // And once it is gone, its range goes with the next sync.
    let rest: Vec<_> = dp
        .services()
        .filter(|(f, _)| **f != far)
        .map(|(f, s)| DesiredService {
            frontend: *f,
            spec: s.spec,
            backends: s.backends.clone(),
            source_ranges: Vec::new(),
        })
        .collect();
    dp.sync(rest);
    let delta = pass(&mut dp, tcp(client(50003), far.addr, TCP_SYN).build());
    assert_eq!(delta.get(Counter::PassOutsideRanges), 1);
}

#[test]
fn two_services_sharing_a_backend_keep_their_replies_apart() {
    let mut dp = TestDataplane::open("shared");
    let (one, two) = (
        Frontend::udp(addr(10, 96, 0, 70, 53)),
        Frontend::udp(addr(10, 96, 0, 71, 53)),
    );
    let backend = addr(10, 1, 0, 7, 5353);
    for service in [one, two] {
        dp.upsert_service(service, ServiceSpec::default()).unwrap();
        dp.set_backends(service, &[backend]).unwrap();
    }
    // One client socket asks both services: both flows go to the same backend, and would
    // get their replies on the same tuple.
    let from = client(51000);
    let first = dp
        .test_run(Hook::FromPod, &udp(from, one.addr, b"q").build(), 1)
        .unwrap();
    let second = dp
        .test_run(Hook::FromPod, &udp(from, two.addr, b"q").build(), 1)
        .unwrap();
    let first = packet::read(&first.frame).expect("valid checksums");
    let second = packet::read(&second.frame).expect("valid checksums");
    assert_eq!((first.src(), first.dst()), (Some(from), Some(backend)));
    let remapped = second.src().expect("ports");
    assert_eq!(second.dst(), Some(backend));
    assert_eq!(remapped.ip(), from.ip(), "the client's address stays");
    assert_ne!(
        remapped.port(),
        from.port(),
        "the second flow's port is remapped"
    );
    assert_eq!(dp.stats().unwrap().get(Counter::PortRemapped), 1);

    // Each answer comes back from the service it was asked of, to the client's own port.
    let answer_one = answer_frame(&mut dp, &udp(backend, from, b"a"));
    let answer_two = answer_frame(&mut dp, &udp(backend, remapped, b"a"));
    let (a1, a2) = (
        packet::read(&answer_one).expect("valid checksums"),
        packet::read(&answer_two).expect("valid checksums"),
    );
    assert_eq!((a1.src(), a1.dst()), (Some(one.addr), Some(from)));
    assert_eq!((a2.src(), a2.dst()), (Some(two.addr), Some(from)));
    // The remapped flow keeps its port.
    let again = dp
        .test_run(Hook::FromPod, &udp(from, two.addr, b"q").build(), 1)
        .unwrap();
    assert_eq!(packet::read(&again.frame).unwrap().src(), Some(remapped));
}

#[test]
fn members_follow_every_change_in_bulk_and_alone() {
    let mut dp = TestDataplane::open("members-bulk");
    let desired = |shift: u8, count: u8| -> Vec<DesiredService> {
        (0..count)
            .map(|i| DesiredService {
                frontend: Frontend::tcp(addr(10, 96, 3, i, 80)),
                spec: ServiceSpec::default(),
                // Four backends, one of them listed twice (a weight): three distinct.
                backends: [0, 1, 2, 2]
                    .iter()
                    .map(|j| addr(10, 4, i, j + shift, 8080))
                    .collect(),
                source_ranges: Vec::new(),
            })
            .collect()
    };
    let distinct = |dp: &TestDataplane| -> usize {
        dp.services()
            .map(|(_, s)| {
                s.backends
                    .iter()
                    .collect::<std::collections::BTreeSet<_>>()
                    .len()
            })
            .sum()
    };
    dp.sync(desired(0, 50)).check().unwrap();
    assert_eq!(dp.member_pairs().unwrap(), 150);
    // Every service loses one backend and gains another; ten services go.
    dp.sync(desired(1, 40)).check().unwrap();
    assert_eq!(dp.member_pairs().unwrap(), distinct(&dp));
    assert_eq!(distinct(&dp), 120);
    // One at a time, through the single-service calls.
    let first = Frontend::tcp(addr(10, 96, 3, 0, 80));
    dp.set_backends(first, &[addr(10, 5, 0, 1, 8080)]).unwrap();
    dp.delete_service(Frontend::tcp(addr(10, 96, 3, 1, 80)))
        .unwrap();
    assert_eq!(dp.member_pairs().unwrap(), distinct(&dp));
    dp.sync(Vec::new()).check().unwrap();
    assert_eq!(dp.member_pairs().unwrap(), 0);
}

#[test]
fn a_maglev_service_adopted_without_backends_can_get_some() {
    let mut dp = TestDataplane::open("maglev-empty");
    let service = Frontend::tcp(addr(10, 96, 1, 2, 443));
    let spec = ServiceSpec {
        scheduler: Scheduler::Maglev { table_size: 1021 },
        affinity_timeout: None,
        ..Default::default()
    };
    dp.upsert_service(service, spec).unwrap();
    // A restarted owner adopts it from the pins, table size and all.
    dp.restart();
    assert_eq!(dp.service(&service).expect("adopted").spec, spec);
    let backends: Vec<_> = (1..=3).map(|i| addr(10, 2, 1, i, 8443)).collect();
    dp.set_backends(service, &backends)
        .expect("backends for the adopted Maglev service");
    let from = client(52000);
    let predicted = dp.maglev_backend(&service, from).expect("a Maglev service");
    assert_eq!(send(&mut dp, &tcp(from, service.addr, TCP_SYN)), predicted);
}

/// A pod's namespace is recognised by its cookie even before (or without) its loopback being
/// up: a new namespace's `lo` is down.
#[test]
fn a_namespace_cookie_needs_no_loopback() {
    common::require_root();
    let host = ebpf_dataplane::netns_cookie().expect("the test's own namespace");
    let (first, second) = std::thread::spawn(|| {
        // SAFETY: unshare on this thread only; the namespace goes with it.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        (
            ebpf_dataplane::netns_cookie(),
            ebpf_dataplane::netns_cookie(),
        )
    })
    .join()
    .unwrap();
    let first = first.expect("a cookie with loopback down");
    assert_eq!(Ok(first), second.map_err(|e| e.to_string()));
    assert_ne!(first, host, "another namespace, another cookie");
}

/// Flow state pinned by another build in an entry layout this build cannot read (here a
/// conntrack map whose values are 4 bytes longer, made by hand as that build would have) is
/// never dropped silently: the start is refused, the old maps stay, this attempt's are gone;
/// allowed to, the data plane opens, reports the map as not carried over and removes the old.
#[test]
fn state_of_an_unreadable_layout_is_refused_unless_its_loss_is_allowed() {
    common::require_root();
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let mut config = ebpf_dataplane::Config::with_pin_dir(common::pin_dir("layout-refuse"));
    let _ = std::fs::remove_dir_all(&config.pin_dir);
    let _cleanup = Remove(config.pin_dir.clone());
    let old = config.pin_dir.join("maps-v1-0000000000000000");
    std::fs::create_dir_all(&old).unwrap();
    // Pins the map `name` in the old directory with keys and values grown by these bytes.
    let pin_grown = |name: &str, grow_key: u32, grow_value: u32| {
        let spec = ebpf_dataplane::layout::specs(&config)
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("a map {name}"));
        pin_map(
            &old.join(spec.name),
            spec.kind as u32,
            spec.key as u32 + grow_key,
            spec.value as u32 + grow_value,
            1024,
        );
        spec
    };
    let conntrack = pin_grown(ebpf_dataplane::map_names::CONNTRACK, 0, 4);
    // A table the owner fills again (interface sources) in another layout is no reason to
    // refuse: layout 8 changed this one.
    let pod_addrs = pin_grown(ebpf_dataplane::map_names::POD_ADDRS, 4, 0);
    let maps_dirs = |config: &ebpf_dataplane::Config| -> Vec<String> {
        let mut dirs: Vec<String> = std::fs::read_dir(&config.pin_dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("maps-"))
            .collect();
        dirs.sort();
        dirs
    };

    let refused = ebpf_dataplane::Dataplane::open(&config)
        .err()
        .expect("the start is refused");
    let message = refused.to_string();
    assert!(
        message.contains(conntrack.name)
            && !message.contains(pod_addrs.name)
            && message.contains("--allow-flow-loss"),
        "{message}"
    );
    assert_eq!(
        maps_dirs(&config),
        ["maps-v1-0000000000000000"],
        "only the old maps"
    );

    config.allow_state_loss = true;
    let dp = ebpf_dataplane::Dataplane::open(&config).expect("opens with the loss allowed");
    let migration = &dp.migrations()[0];
    assert!(
        migration.skipped.contains(&conntrack.name) && migration.skipped.contains(&pod_addrs.name),
        "{migration:?}"
    );
    let dirs = maps_dirs(&config);
    assert!(
        dirs.len() == 1 && dirs[0] != "maps-v1-0000000000000000",
        "the old maps are gone: {dirs:?}"
    );
}

/// Creates a map with raw bpf(2) calls and pins it at `path`, as another build would have.
fn pin_map(path: &std::path::Path, map_type: u32, key: u32, value: u32, max_entries: u32) {
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    let create = Create {
        map_type,
        key_size: key,
        value_size: value,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: bpf(2) reads an attribute of the size given, which we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &create as *const Create,
            size_of::<Create>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let pin = Pin {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: as above; the path outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &pin as *const Pin,
            size_of::<Pin>(),
        )
    };
    let pinned = std::io::Error::last_os_error();
    // SAFETY: the fd is ours; the pin keeps the map.
    unsafe { libc::close(fd as libc::c_int) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {pinned}");
}
