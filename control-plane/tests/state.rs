//! The control plane's state on disk and its store: private files, one process per embedded
//! store, a CA that is never silently replaced, readiness that follows the store, and etcd
//! reached over TLS with a client certificate; and no acknowledged write lost to `kill -9`.

mod common;

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use common::{Api, ControlPlane, runtime};
use control_plane::launch::Process;
use control_plane_store::{
    EtcdOptions,
    etcd_process::{EtcdProcess, ServerTls},
};
use reqwest::Method;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_control-plane"))
}

#[test]
fn state_is_private_and_an_embedded_store_has_one_process() {
    let mut cp = ControlPlane::start("embedded:{dir}", &["--disable-controllers"]);
    let dir = cp.dir.path().to_owned();
    let state = dir.join("state");
    assert_eq!(mode(&state), 0o700, "the state directory");
    for secret in ["ca.key", "token", "node-token"] {
        assert_eq!(mode(&state.join(secret)), 0o600, "{secret}");
    }
    assert_eq!(
        mode(&cp.kubeconfig),
        0o600,
        "the kubeconfig holds the admin token"
    );
    let store = dir.join("store");
    assert_eq!(mode(&store), 0o700, "the store directory");
    for file in ["state.db", "state.db-wal"] {
        assert_eq!(mode(&store.join(file)), 0o600, "{file} holds every Secret");
    }
    // No temporary file left behind by the atomic writes.
    let leftovers: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A second process on the same store is refused, and says why.
    let other = tempfile::tempdir().unwrap();
    let spec = format!("embedded:{}", store.display());
    let refused = Process::start(binary(), &spec, other.path(), &["--disable-controllers"])
        .err()
        .expect("a second control plane on one embedded store");
    let why = format!("{refused:#}");
    assert!(why.contains("in use by another process"), "{why}");
    // The first one serves on, and its lock goes with it: a restart takes the store back.
    cp.ok(&["get", "namespaces"]);
    cp.restart();
    cp.ok(&["get", "namespaces"]);
}

#[test]
fn a_broken_ca_stops_the_server_and_a_lost_certificate_is_made_again_from_its_key() {
    let mut cp = ControlPlane::start("embedded:{dir}", &["--disable-controllers"]);
    let state = cp.dir.path().join("state");
    let (ca_crt, ca_key) = (state.join("ca.crt"), state.join("ca.key"));
    let (cert, key) = (
        std::fs::read_to_string(&ca_crt).unwrap(),
        std::fs::read_to_string(&ca_key).unwrap(),
    );
    let spec = format!("embedded:{}", cp.dir.path().join("store").display());
    let start_again = |cp: &mut ControlPlane| {
        cp.process_mut().kill();
        Process::start(binary(), &spec, cp.dir.path(), &["--disable-controllers"])
    };

    // A key cut short (a crash while writing it, with an editor's help): refused, not replaced.
    std::fs::write(&ca_key, &key[..key.len() / 2]).unwrap();
    let why = format!("{:#}", start_again(&mut cp).err().expect("refused"));
    assert!(
        why.contains("refusing to replace the cluster's CA"),
        "{why}"
    );
    assert_eq!(
        std::fs::read_to_string(&ca_crt).unwrap(),
        cert,
        "the CA is untouched"
    );

    // Another key than the certificate's: refused too.
    let other = rcgen::KeyPair::generate().unwrap().serialize_pem();
    std::fs::write(&ca_key, other).unwrap();
    let why = format!("{:#}", start_again(&mut cp).err().expect("refused"));
    assert!(why.contains("is not the key of"), "{why}");

    // The certificate without its key: nothing can sign; refused.
    std::fs::remove_file(&ca_key).unwrap();
    let why = format!("{:#}", start_again(&mut cp).err().expect("refused"));
    assert!(why.contains("exists without its key"), "{why}");

    // The key without its certificate (a first start interrupted between the two): the
    // certificate is made again from the key, and what trusted the old one trusts the server.
    std::fs::write(&ca_key, &key).unwrap();
    std::fs::remove_file(&ca_crt).unwrap();
    cp.process_mut().resume().unwrap();
    let old_kubeconfig = cp.file("old-kubeconfig", &{
        let mut k = std::fs::read_to_string(&cp.kubeconfig).unwrap();
        let fresh = std::fs::read_to_string(&ca_crt).unwrap();
        assert_ne!(fresh, cert, "a new certificate");
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        k = k.replace(&b64(&fresh), &b64(&cert));
        k
    });
    let out = cp.kubectl(&["--kubeconfig", &old_kubeconfig, "get", "namespaces"]);
    assert!(
        out.status.success(),
        "the old CA certificate still verifies the server: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn readiness_follows_the_store() {
    let rt = runtime();
    let etcd = rt.block_on(EtcdProcess::start()).expect("start etcd");
    let cp = ControlPlane::start(
        &format!("etcd:{}", etcd.endpoint),
        &["--disable-controllers", "--etcd-request-timeout", "1"],
    );
    let api = Api::new(&cp);
    rt.block_on(async {
        let status = |path: &'static str| {
            let api = &api;
            async move {
                api.request(Method::GET, path)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        assert_eq!(status("/readyz").await, 200);
        // The request timeout (1 s) bounds requests, not watches: one open for longer still
        // delivers.
        let watch = api
            .request(Method::GET, "/api/v1/namespaces/default/configmaps?watch=1")
            .send()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late"}});
        let (code, _) = api
            .call(Method::POST, "/api/v1/namespaces/default/configmaps", Some(cm))
            .await;
        assert_eq!(code, 201);
        let events = common::events(watch, 1, 10).await;
        assert_eq!(
            events.first().map(|e| e["object"]["metadata"]["name"].clone()),
            Some(serde_json::json!("late")),
            "{events:?}"
        );
        drop(etcd);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while status("/readyz").await != 500 {
            assert!(tokio::time::Instant::now() < deadline, "/readyz never failed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(status("/healthz").await, 500, "unhealthy too");
        assert_eq!(status("/livez").await, 200, "alive: restarting it would not help");
        // A request the store fails: the client learns it failed, not the store's address.
        let (code, body) = api
            .call(Method::GET, "/api/v1/namespaces/default/configmaps/late", None)
            .await;
        assert!(code >= 500, "{code} {body}");
        assert!(!body.to_string().contains("127.0.0.1"), "{body}");
        let body = api
            .request(Method::GET, "/readyz")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            body.contains("etcd failed") && !body.contains("connect"),
            "the check named, no internal detail: {body}"
        );
    });
}

/// A CA and a certificate it signs for `name` (server and client use), written to `dir`.
fn pki(dir: &Path) -> (std::path::PathBuf, Vec<std::path::PathBuf>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let mut files = Vec::new();
    for name in ["etcd", "client"] {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        files.extend([c, k]);
    }
    (ca_path, files)
}

#[test]
fn etcd_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, files) = pki(dir.path());
    let (server_cert, server_key, client_cert, client_key) =
        (&files[0], &files[1], &files[2], &files[3]);
    let client = EtcdOptions {
        ca_file: Some(ca.clone()),
        cert_file: Some(client_cert.clone()),
        key_file: Some(client_key.clone()),
        request_timeout: None,
    };
    let server = ServerTls {
        cert: server_cert.clone(),
        key: server_key.clone(),
        client_ca: ca.clone(),
    };
    let rt = runtime();
    let etcd = rt
        .block_on(EtcdProcess::start_tls(&server, &client))
        .expect("start etcd with TLS");
    let store = format!("etcd:{}", etcd.endpoint);
    let (ca, cert, key) = (
        ca.display().to_string(),
        client_cert.display().to_string(),
        client_key.display().to_string(),
    );
    // Without a client certificate etcd refuses the connection: the server says so and stops.
    let state = tempfile::tempdir().unwrap();
    let refused = Process::start(binary(), &store, state.path(), &["--etcd-cafile", &ca])
        .err()
        .expect("no client certificate, no store");
    assert!(
        format!("{refused:#}").contains("open the store"),
        "{refused:#}"
    );
    let cp = ControlPlane::start(
        &store,
        &[
            "--etcd-cafile",
            &ca,
            "--etcd-certfile",
            &cert,
            "--etcd-keyfile",
            &key,
        ],
    );
    let file = cp.file(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: over-tls}\ndata: {a: b}\n",
    );
    cp.ok(&["apply", "-f", &file]);
    let out = cp.ok(&["get", "configmap", "over-tls", "-o", "jsonpath={.data.a}"]);
    assert_eq!(out, "b");
    drop(cp);
    drop(etcd);
}

/// Writers create NodePort services as fast as they can; the server is killed (-9) in the
/// middle and started again: every create that got a 201 is there as it was answered, and no
/// ClusterIP or NodePort is held twice, also by services created after the restart.
fn acknowledged_writes_survive_kill_9(store: &str) {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    };
    let mut cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    let rt = runtime();
    let path = "/api/v1/namespaces/default/services";
    let service = |name: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"type": "NodePort", "ports": [{"port": 80}]}})
    };
    // (name, clusterIP, nodePort) of every acknowledged create.
    let acked: Arc<Mutex<Vec<(String, String, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (client, acked, stop) = (api.0.clone(), acked.clone(), stop.clone());
            rt.spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let name = format!("w{w}-{i}");
                    i += 1;
                    if let Ok((201, svc)) =
                        client.call(Method::POST, path, Some(service(&name))).await
                    {
                        acked.lock().unwrap().push((
                            name,
                            svc["spec"]["clusterIP"].as_str().unwrap().to_owned(),
                            svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap(),
                        ));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    cp.process_mut().kill();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        rt.block_on(w).unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 20,
        "writes were acknowledged before the kill: {}",
        acked.len()
    );
    cp.process_mut().resume().unwrap();
    rt.block_on(async {
        // More after the restart: the allocators must know everything held.
        for i in 0..20 {
            let (code, body) = api
                .call(Method::POST, path, Some(service(&format!("after-{i}"))))
                .await;
            assert_eq!(code, 201, "{body}");
        }
        let (code, list) = api.call(Method::GET, path, None).await;
        assert_eq!(code, 200);
        let stored: std::collections::HashMap<String, (String, u64)> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["spec"]["type"] == "NodePort")
            .map(|s| {
                (
                    s["metadata"]["name"].as_str().unwrap().to_owned(),
                    (
                        s["spec"]["clusterIP"].as_str().unwrap().to_owned(),
                        s["spec"]["ports"][0]["nodePort"].as_u64().unwrap(),
                    ),
                )
            })
            .collect();
        for (name, ip, port) in &acked {
            assert_eq!(
                stored.get(name),
                Some(&(ip.clone(), *port)),
                "{name}: acknowledged, so kept as answered"
            );
        }
        let ips: std::collections::HashSet<&String> = stored.values().map(|(ip, _)| ip).collect();
        let ports: std::collections::HashSet<u64> = stored.values().map(|(_, p)| *p).collect();
        assert_eq!(ips.len(), stored.len(), "no ClusterIP held twice");
        assert_eq!(ports.len(), stored.len(), "no NodePort held twice");
    });
}

on_both_stores!(acknowledged_writes_survive_kill_9);
