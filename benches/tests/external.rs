//! Traffic from outside the cluster: a host on the node network that is not a node reaches
//! the echo pods of a two-node lab through NodePorts (TCP and UDP), an ExternalIP and a
//! LoadBalancer address the control plane handed out from its pool, with
//! kube-proxy's traffic policies, `loadBalancerSourceRanges` and health-check node ports, in
//! every proxy mode (the eBPF data plane's `from_outside`, with its XDP fast path, with direct
//! server return; kube-proxy's iptables and nftables layouts); a connection to another node's
//! pod survives its node's agent being restarted.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use benches::lab::ClusterLab;
use common::*;
use node_agent_netns::traffic;

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo-cluster}
spec:
  type: NodePort
  selector: {app: echo}
  externalIPs: [EXTERNAL_IP, NODE_IP]
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080}
  - {name: dns, port: 80, protocol: UDP, targetPort: 8080, nodePort: 30080}
---
apiVersion: v1
kind: Service
metadata: {name: echo-local}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30081}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-lb}
spec:
  type: LoadBalancer
  selector: {app: echo}
  ports: [{name: http, port: 8000, targetPort: http}]
"#;

/// One pod on one node behind a LoadBalancer that keeps its clients' addresses.
const SOLO: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: solo, labels: {app: solo}}
spec:
  nodeName: THE_NODE
  containers:
  - name: echo
    image: keel/echo:latest
    ports: [{name: http, containerPort: 8080}]
    env:
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
    readinessProbe:
      httpGet: {path: /, port: http}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: closed}
spec:
  type: NodePort
  selector: {app: solo}
  ports: [{name: nothing, port: 99, protocol: UDP, targetPort: 9999, nodePort: 30084}]
---
apiVersion: v1
kind: Service
metadata: {name: solo}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: solo}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30082}]
"#;

/// A pod asking for a host port on one node, and another on the node's address only.
const HOST_PORT: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: hostport}
spec:
  nodeName: THE_NODE
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: keel/echo:latest
    ports:
    - {name: http, containerPort: 8080, hostPort: 8088}
    - {name: dns, containerPort: 8080, protocol: UDP, hostPort: 8089, hostIP: NODE_IP}
    env:
    - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
"#;

/// A plain HTTP GET: the status code and the body.
fn http_status(to: SocketAddrV4) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&to.into(), traffic::TIMEOUT)
        .map_err(|e| format!("connect {to}: {e}"))?;
    stream.set_read_timeout(Some(traffic::TIMEOUT)).unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not HTTP: {answer:?}"))?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((code, body.to_owned()))
}

/// The node a keel-echo name (`pod@node`) says its pod runs on.
fn node_of(name: &str) -> &str {
    name.split('@').nth(1).unwrap_or("?")
}

/// `count` HTTP GETs to `to` from the outside host: (backend name, client address it saw).
fn gets(client: &std::path::Path, to: SocketAddrV4, count: usize) -> Vec<(String, String)> {
    in_pod(client, || {
        (0..count)
            .map(|_| {
                traffic::http_get(to).unwrap_or_else(|e| (format!("error: {e:#}"), String::new()))
            })
            .collect()
    })
}

fn client_ip(seen: &str) -> Ipv4Addr {
    seen.rsplit_once(':')
        .and_then(|(ip, _)| ip.parse().ok())
        .unwrap_or(Ipv4Addr::UNSPECIFIED)
}

#[test]
fn ebpf_serves_traffic_from_outside() {
    traffic_from_outside("ebpf");
}

/// The same with the XDP fast path in the nodes' drivers: what it forwards must answer as tc
/// does, and it must really forward (the outside host sends full checksums, as a wire would).
#[test]
fn ebpf_xdp_serves_traffic_from_outside() {
    traffic_from_outside("ebpf-xdp");
}

/// The same with direct server return (`--lb-mode dsr`): pods on the other node see the
/// client and answer it from their own node.
#[test]
fn ebpf_dsr_serves_traffic_from_outside() {
    traffic_from_outside("ebpf-dsr");
}

#[test]
fn iptables_serves_traffic_from_outside() {
    traffic_from_outside("iptables");
}

#[test]
fn nftables_serves_traffic_from_outside() {
    traffic_from_outside("nftables");
}

/// Every check, with the agents in `mode`. The eBPF data plane keeps the client's address when
/// the endpoint is on the node the client addressed; kube-proxy's modes masquerade all
/// `externalTrafficPolicy: Cluster` traffic; with DSR, pods on other nodes see the client too.
fn traffic_from_outside(mode: &'static str) {
    let mut lab = lab_in(&format!("ext-{mode}"), mode);
    let ebpf = mode.starts_with("ebpf");
    let dsr = mode.ends_with("-dsr");
    let masquerades_local = !ebpf;
    let external_ip = Ipv4Addr::from(u32::from(lab.network.host) + 199);
    let nodes: BTreeMap<String, Ipv4Addr> =
        lab.nodes.iter().map(|n| (n.name.clone(), n.addr)).collect();
    let first = lab.nodes[0].name.clone();
    let pool = lab.load_balancer_pool;
    let (client_ns, client_addr) = lab
        .outside_host(
            "client",
            &[((external_ip, 32), nodes[&first]), (pool, nodes[&first])],
        )
        .expect("an outside host");
    let client = client_ns.path();
    lab.apply(ECHO_DEPLOYMENT).unwrap();
    lab.apply(
        &SERVICES
            .replace("EXTERNAL_IP", &external_ip.to_string())
            .replace("NODE_IP", &nodes[&first].to_string()),
    )
    .unwrap();
    let pods = lab
        .wait_ready("app=echo", 4, Duration::from_secs(90))
        .expect("4 echo pods running and ready");
    let used: BTreeSet<&str> = pods
        .iter()
        .map(|p| p["spec"]["nodeName"].as_str().unwrap())
        .collect();
    assert_eq!(used.len(), 2, "pods on both nodes");

    // externalTrafficPolicy Cluster: every node's NodePort reaches pods on both nodes; pods on
    // the node the client addressed see the client, the others see that node.
    for (node, addr) in &nodes {
        let to = SocketAddrV4::new(*addr, 30080);
        eventually(30, &format!("{to} answering"), || {
            let (name, _) = gets(&client, to, 1).remove(0);
            seen(!name.starts_with("error"), (), &name.clone().into())
        });
        let answers = gets(&client, to, 60);
        let answering: BTreeSet<&str> = answers.iter().map(|(n, _)| node_of(n)).collect();
        assert_eq!(
            answering,
            nodes.keys().map(String::as_str).collect(),
            "pods on both nodes answer on {to}: {answers:?}"
        );
        for (name, seen_client) in &answers {
            let seen_ip = client_ip(seen_client);
            if node_of(name) != node && dsr {
                assert_eq!(
                    seen_ip, client_addr,
                    "{name} through {to}: DSR keeps the client"
                );
            } else if node_of(name) != node {
                assert_eq!(
                    seen_ip, *addr,
                    "{name} through {to}: masqueraded to the node"
                );
            } else if masquerades_local {
                // kube-proxy masquerades to the address of the interface towards the pod.
                assert_ne!(seen_ip, client_addr, "{name} through {to}: masqueraded");
            } else {
                assert_eq!(seen_ip, client_addr, "{name} through {to}: the client kept");
            }
        }
    }

    if mode == "ebpf-xdp" {
        let forwarded: u64 = lab
            .nodes
            .iter()
            .map(|n| {
                let stats = ebpf_dataplane::Pinned::open(&n.pin_dir)
                    .and_then(|p| p.stats())
                    .expect("the node's counters");
                stats.get(ebpf_dataplane::Counter::XdpForwarded)
            })
            .sum();
        // Half of 120 connections went to the other node's pods: their packets both ways.
        assert!(
            forwarded >= 100,
            "XDP forwarded the masqueraded flows' packets: {forwarded}"
        );
    }
    if ebpf {
        replies_come_from_the_backends_node(&lab, &client, client_addr, dsr);
    }
    if ebpf {
        // Maglev: whichever node a client's flow (address and port) reaches, it goes to the
        // same backend, so a load balancer may spread a connection's packets over nodes.
        // Ports below the ephemeral range (32768-60999), so no connection of the test's
        // own can hold one of them.
        for port in [20001u16, 20002, 20003, 20004] {
            let local = SocketAddrV4::new(client_addr, port);
            let answers: BTreeSet<String> = nodes
                .values()
                .map(|addr| {
                    let to = SocketAddrV4::new(*addr, 30080);
                    in_pod(&client, || traffic::tcp_request_from(local, to))
                        .unwrap_or_else(|e| format!("error: {e:#}"))
                })
                .collect();
            assert_eq!(
                answers.len(),
                1,
                "one backend for {local} via every node: {answers:?}"
            );
        }
    }

    // UDP on the same NodePort number.
    let udp = SocketAddrV4::new(nodes[&first], 30080);
    let answer = in_pod(&client, || traffic::udp_request(udp));
    assert!(
        answer.as_ref().is_ok_and(|n| n.contains('@')),
        "a datagram to {udp} is answered: {answer:?}"
    );

    // A pod reaches a NodePort on its node's address (socket-level load balancing).
    let pod_netns = ClusterLab::pod_netns(&pods[0]);
    let own = nodes[pods[0]["spec"]["nodeName"].as_str().unwrap()];
    let answer = in_pod(&pod_netns, || ask(SocketAddrV4::new(own, 30080)));
    assert!(answer.contains('@'), "a pod reaches {own}:30080: {answer}");
    // A pod reaches the other node's NodePort, whichever node's pod answers. The pod leaves
    // its node masqueraded to that node's address, which is also an ExternalIP here (in the
    // service ranges): the answering node must still see its pod's replies as replies.
    for pod in &pods {
        let netns = ClusterLab::pod_netns(pod);
        let node = pod["spec"]["nodeName"].as_str().unwrap();
        for (other, addr) in nodes.iter().filter(|(n, _)| *n != node) {
            let to = SocketAddrV4::new(*addr, 30080);
            let answers: Vec<String> = (0..8).map(|_| in_pod(&netns, || ask(to))).collect();
            assert!(
                answers.iter().all(|a| a.contains('@')),
                "a pod on {node} reaches {other}'s NodePort {to} every time: {answers:?}"
            );
        }
    }

    // externalTrafficPolicy Local: only the addressed node's pods, which see the client.
    for (node, addr) in &nodes {
        let to = SocketAddrV4::new(*addr, 30081);
        eventually(30, &format!("{to} answering"), || {
            let (name, _) = gets(&client, to, 1).remove(0);
            seen(!name.starts_with("error"), (), &name.clone().into())
        });
        for (name, seen_client) in gets(&client, to, 30) {
            assert_eq!(node_of(&name), node, "only {node}'s pods answer on {to}");
            assert_eq!(
                client_ip(&seen_client),
                client_addr,
                "{name} sees the client's own address"
            );
        }
    }

    // The ExternalIP, routed to the first node: pods on both nodes answer.
    let to = SocketAddrV4::new(external_ip, 80);
    let answers = gets(&client, to, 60);
    let answering: BTreeSet<&str> = answers.iter().map(|(n, _)| node_of(n)).collect();
    assert_eq!(
        answering,
        nodes.keys().map(String::as_str).collect(),
        "pods on both nodes answer on the ExternalIP {to}: {answers:?}"
    );

    // An ExternalIP may be a node's own address.
    let to = SocketAddrV4::new(nodes[&first], 80);
    let answers = gets(&client, to, 10);
    assert!(
        answers.iter().all(|(n, _)| n.contains('@')),
        "the node address as an ExternalIP answers: {answers:?}"
    );

    // A pod's hostPort: its node's addresses answer on it, from the pod, which sees the
    // client; the other node does not; gone with the pod.
    lab.apply(
        &HOST_PORT
            .replace("THE_NODE", &first)
            .replace("NODE_IP", &nodes[&first].to_string()),
    )
    .unwrap();
    let to = SocketAddrV4::new(nodes[&first], 8088);
    let (name, seen_client) = eventually(60, &format!("the host port {to} answering"), || {
        let (name, seen_client) = gets(&client, to, 1).remove(0);
        seen(
            name.contains('@'),
            (name.clone(), seen_client),
            &name.into(),
        )
    });
    assert_eq!(name, format!("hostport@{first}"), "the pod answers on {to}");
    assert_eq!(
        client_ip(&seen_client),
        client_addr,
        "the pod sees the client"
    );
    let on_ip = SocketAddrV4::new(nodes[&first], 8089);
    let answer = in_pod(&client, || traffic::udp_request(on_ip));
    assert_eq!(
        answer.ok().as_deref(),
        Some(name.as_str()),
        "the UDP host port on its hostIP {on_ip}"
    );
    let other = nodes
        .iter()
        .find(|(n, _)| **n != first)
        .map(|(_, a)| *a)
        .unwrap();
    let (name, _) = gets(&client, SocketAddrV4::new(other, 8088), 1).remove(0);
    assert!(
        name.starts_with("error"),
        "no host port on the other node: {name}"
    );
    lab.kubectl_ok(&["delete", "pod", "hostport"]).unwrap();
    eventually(60, &format!("{to} closed with the pod gone"), || {
        let (name, _) = gets(&client, to, 1).remove(0);
        seen(name.starts_with("error"), (), &name.clone().into())
    });

    // The LoadBalancer service got an address of the lab's pool, routed to the first node.
    let lb_ip: Ipv4Addr = eventually(30, "a LoadBalancer address", || {
        let svc: serde_json::Value = serde_json::from_str(
            &lab.kubectl_ok(&["get", "svc", "echo-lb", "-o", "json"])
                .unwrap(),
        )
        .unwrap();
        let ip = svc["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .and_then(|ip| ip.parse().ok());
        ip.ok_or_else(|| svc["status"].to_string())
    });
    assert_eq!(
        u32::from(lb_ip) & !0xf,
        u32::from(pool.0),
        "{lb_ip} is in the pool {pool:?}"
    );
    let to = SocketAddrV4::new(lb_ip, 8000);
    eventually(30, &format!("{to} answering"), || {
        let (name, _) = gets(&client, to, 1).remove(0);
        seen(!name.starts_with("error"), (), &name.clone().into())
    });
    let answers = gets(&client, to, 40);
    let answering: BTreeSet<&str> = answers.iter().map(|(n, _)| node_of(n)).collect();
    assert_eq!(
        answering,
        nodes.keys().map(String::as_str).collect(),
        "pods on both nodes answer on the LoadBalancer address {to}: {answers:?}"
    );

    // externalTrafficPolicy Local on a LoadBalancer: its health-check node port says which
    // node has the one pod; the other node drops new flows instead of sending them away.
    lab.apply(&SOLO.replace("THE_NODE", &first)).unwrap();
    lab.wait_ready("app=solo", 1, Duration::from_secs(60))
        .expect("the solo pod ready");
    let svc: serde_json::Value = serde_json::from_str(
        &lab.kubectl_ok(&["get", "svc", "solo", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let hc = svc["spec"]["healthCheckNodePort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("a health check node port: {}", svc["spec"]));
    for (node, addr) in &nodes {
        let local = usize::from(*node == first);
        let (code, body) = eventually(30, &format!("{node}'s health check saying {local}"), || {
            let answer = in_pod(&client, || http_status(SocketAddrV4::new(*addr, hc)))?;
            let body: serde_json::Value =
                serde_json::from_str(&answer.1).map_err(|e| e.to_string())?;
            seen(body["localEndpoints"] == local, answer.clone(), &body)
        });
        assert_eq!(code, if local == 1 { 200 } else { 503 }, "{node}: {body}");
        assert!(body.contains("\"name\":\"solo\""), "{body}");
    }
    let (name, seen_client) = gets(&client, SocketAddrV4::new(nodes[&first], 30082), 1).remove(0);
    assert_eq!(node_of(&name), first, "the solo pod answers: {name}");
    assert_eq!(
        client_ip(&seen_client),
        client_addr,
        "the client's address is kept"
    );
    let other = nodes
        .iter()
        .find(|(n, _)| **n != first)
        .map(|(_, a)| *a)
        .unwrap();
    let (name, _) = gets(&client, SocketAddrV4::new(other, 30082), 1).remove(0);
    assert!(
        name.starts_with("error"),
        "a node without the pod drops the flow: {name}"
    );

    // ICMP errors about flows from outside reach their client, about what it sent: a datagram
    // to a port nothing listens on in the pod is refused (ECONNREFUSED on the connected
    // socket), from the pod's own node and through the other one, which masquerades it.
    for addr in nodes.values() {
        let to = SocketAddrV4::new(*addr, 30084);
        let answer = eventually(30, &format!("{to} refusing"), || {
            let answer = in_pod(&client, || traffic::udp_request(to));
            let refused = answer.as_ref().is_err_and(|e| {
                e.root_cause()
                    .downcast_ref::<std::io::Error>()
                    .map(|e| e.kind())
                    == Some(std::io::ErrorKind::ConnectionRefused)
            });
            let seen_answer = match &answer {
                Ok(name) => format!("an answer: {name}"),
                Err(e) => format!("{e:#}"),
            };
            seen(refused, seen_answer.clone(), &seen_answer.into())
        });
        assert!(answer.contains("refused"), "{to}: {answer}");
    }

    // loadBalancerSourceRanges: a client outside them cannot open flows to the LB address.
    let lb = SocketAddrV4::new(lb_ip, 8000);
    let ranges = |ranges: &str| {
        lab.kubectl_ok(&[
            "patch",
            "svc",
            "echo-lb",
            "-p",
            &format!("{{\"spec\":{{\"loadBalancerSourceRanges\":{ranges}}}}}"),
        ])
        .unwrap();
    };
    ranges("[\"192.0.2.0/24\"]");
    eventually(30, "the LB address refusing the client", || {
        let (name, _) = gets(&client, lb, 1).remove(0);
        seen(name.starts_with("error"), (), &name.clone().into())
    });
    ranges(&format!("[\"192.0.2.0/24\", \"{client_addr}/32\"]"));
    eventually(30, "the LB address accepting the client again", || {
        let (name, _) = gets(&client, lb, 1).remove(0);
        seen(!name.starts_with("error"), (), &name.clone().into())
    });

    // A connection masqueraded by the first node to a pod on the other keeps working while
    // the first node's agent is killed and started again (its flows are pinned), and new
    // connections opened all the while, through the same node, never fail.
    let to = SocketAddrV4::new(nodes[&first], 30080);
    let mut remote = None;
    for _ in 0..40 {
        let mut conn = in_pod(&client, || traffic::Connection::open(to)).expect("connect");
        let name = conn.ask().expect("an answer");
        if node_of(&name) != first {
            remote = Some((conn, name));
            break;
        }
    }
    let (mut conn, name) = remote.expect("a connection to a pod on the other node");
    let node = lab.nodes.iter_mut().find(|n| n.name == first).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (opened, failures) = std::thread::scope(|s| {
        let load = s.spawn(|| {
            in_pod(&client, || {
                let (mut opened, mut failures) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match traffic::tcp_request(to) {
                        Ok(_) => opened += 1,
                        Err(e) => failures.push(format!("{e:#}")),
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (opened, failures)
            })
        });
        // Stops the load also when an assertion below fails, so the scope can end.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let stopping = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(300));
        node.agent.kill();
        assert_eq!(
            conn.ask().ok().as_deref(),
            Some(name.as_str()),
            "the flow goes on while the agent is down"
        );
        std::thread::sleep(Duration::from_secs(1));
        node.agent.restart().unwrap();
        node.agent.wait_healthy(Duration::from_secs(60)).unwrap();
        assert_eq!(
            conn.ask().ok().as_deref(),
            Some(name.as_str()),
            "the flow goes on after the agent came back"
        );
        std::thread::sleep(Duration::from_millis(300));
        drop(stopping);
        load.join().expect("the load thread")
    });
    assert!(
        failures.is_empty(),
        "{} of {} connections failed across the restart: {:?}",
        failures.len(),
        opened as usize + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(opened >= 20, "connections kept coming: {opened}");
    let again = gets(&client, to, 20);
    assert!(
        again.iter().all(|(n, _)| !n.starts_with("error")),
        "new connections after the restart: {again:?}"
    );
}

/// Which machine answers: the client asks the first node's NodePort from a dozen ports while
/// capturing its frames; each SYN-ACK must come from the MAC address the SYN went to (the
/// first node), except, with DSR, those of pods on the other node, which must come from
/// another (their own node). The data planes must have sent and recorded the DSR options.
fn replies_come_from_the_backends_node(
    lab: &ClusterLab,
    client: &std::path::Path,
    client_addr: Ipv4Addr,
    dsr: bool,
) {
    let first = &lab.nodes[0];
    let to = SocketAddrV4::new(first.addr, 30080);
    let (answers, frames) = in_pod(client, || {
        captured(|| {
            // Below the ephemeral range: no other connection of the client holds these.
            (21001..=21012u16)
                .map(|port| {
                    let local = SocketAddrV4::new(client_addr, port);
                    let answer = traffic::tcp_request_from(local, to)
                        .unwrap_or_else(|e| format!("error: {e:#}"));
                    (port, answer)
                })
                .collect::<Vec<_>>()
        })
    });
    let mut remote = 0;
    for (port, name) in &answers {
        assert!(name.contains('@'), "{to} from port {port}: {name}");
        let segment = |src: SocketAddrV4, dst: SocketAddrV4, flags: u8| {
            frames
                .iter()
                .find(|f| tcp_of(f) == Some((src, dst, flags)))
                .unwrap_or_else(|| panic!("no {flags:#x} segment {src} -> {dst} captured"))
        };
        let client_end = SocketAddrV4::new(client_addr, *port);
        let syn = segment(client_end, to, 0x02);
        let syn_ack = segment(to, client_end, 0x12);
        let (sent_to, answered_by) = (&syn[0..6], &syn_ack[6..12]);
        if dsr && node_of(name) != first.name {
            remote += 1;
            assert_ne!(
                answered_by, sent_to,
                "{name} (port {port}) answers from its own node, not through {}",
                first.name
            );
        } else {
            assert_eq!(
                answered_by, sent_to,
                "{name} (port {port}) answers through {}",
                first.name
            );
        }
    }
    if dsr {
        assert!(remote > 0, "some answers from the other node: {answers:?}");
        for (node, counter) in [
            (&lab.nodes[0], ebpf_dataplane::Counter::DsrSent),
            (&lab.nodes[1], ebpf_dataplane::Counter::DsrRecorded),
        ] {
            let stats = ebpf_dataplane::Pinned::open(&node.pin_dir)
                .and_then(|p| p.stats())
                .expect("the node's counters");
            assert!(stats.get(counter) >= remote, "{}: {counter:?}", node.name);
        }
    }
}

/// Runs `f` while capturing the frames this namespace's interfaces send and receive (call
/// it inside the namespace).
fn captured<T>(f: impl FnOnce() -> T) -> (T, Vec<Vec<u8>>) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket() with constant arguments; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(all),
        )
    };
    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size: libc::c_int = 8 << 20;
    // SAFETY: an int option of its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let out = f();
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: a buffer of the length passed.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            break;
        }
        frames.push(buf[..n as usize].to_vec());
    }
    (out, frames)
}

/// A captured frame's TCP segment: (source, destination, flags).
fn tcp_of(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, u8)> {
    if frame.get(12..14)? != [0x08, 0x00] || *frame.get(23)? != 6 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let ip = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
    let tcp = frame.get(14 + ihl..14 + ihl + 14)?;
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    Some((
        SocketAddrV4::new(ip(26), port(0)),
        SocketAddrV4::new(ip(30), port(2)),
        tcp[13],
    ))
}
