//! Traffic from outside the cluster: a host on the node network that is not a node reaches
//! the echo pods of a two-node lab through NodePorts (TCP and UDP) and an ExternalIP, with
//! kube-proxy's traffic policies, through the eBPF data plane's `from_outside`; a masqueraded
//! connection survives its node's agent being restarted.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use common::*;
use node_agent_netns::traffic;

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo-cluster}
spec:
  type: NodePort
  selector: {app: echo}
  externalIPs: [EXTERNAL_IP]
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
"#;

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
fn nodeports_and_external_ips_reach_pods_with_their_traffic_policies() {
    let mut lab = lab("ext");
    let external_ip = Ipv4Addr::from(u32::from(lab.network.host) + 199);
    let nodes: BTreeMap<String, Ipv4Addr> =
        lab.nodes.iter().map(|n| (n.name.clone(), n.addr)).collect();
    let first = lab.nodes[0].name.clone();
    let (client_ns, client_addr) = lab
        .outside_host("client", &[(external_ip, nodes[&first])])
        .expect("an outside host");
    let client = client_ns.path();
    lab.apply(ECHO_DEPLOYMENT).unwrap();
    lab.apply(&SERVICES.replace("EXTERNAL_IP", &external_ip.to_string()))
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
            let expected = if node_of(name) == node {
                client_addr
            } else {
                *addr
            };
            assert_eq!(
                client_ip(seen_client),
                expected,
                "{name} through {to} sees the client as {seen_client}"
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

    // A connection masqueraded by the first node to a pod on the other keeps working while
    // the first node's agent is killed and started again (its flows are pinned).
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
    node.agent.kill();
    assert_eq!(
        conn.ask().ok().as_deref(),
        Some(name.as_str()),
        "the flow goes on while the agent is down"
    );
    node.agent.restart().unwrap();
    node.agent.wait_healthy(Duration::from_secs(60)).unwrap();
    assert_eq!(
        conn.ask().ok().as_deref(),
        Some(name.as_str()),
        "the flow goes on after the agent came back"
    );
    let again = gets(&client, to, 20);
    assert!(
        again.iter().all(|(n, _)| !n.starts_with("error")),
        "new connections after the restart: {again:?}"
    );
}
