//! Kubernetes semantics clients depend on, through kubectl and raw requests, on both stores:
//! dry runs change nothing, service updates allocate and release what the new version needs,
//! writes that change nothing store nothing, and a create cannot set a status. The control
//! loops are off (`--disable-controllers`): nothing but the test writes, so the store's
//! revision says whether anything was written.

mod common;

use common::{Api, ControlPlane, events, runtime};
use reqwest::Method;
use serde_json::{Value, json};

const SERVICES: &str = "/api/v1/namespaces/default/services";
const PODS: &str = "/api/v1/namespaces/default/pods";

/// The store's revision, as a list reports it.
async fn revision(api: &Api) -> String {
    let (code, list) = api.call(Method::GET, "/api/v1/namespaces", None).await;
    assert_eq!(code, 200, "{list}");
    list["metadata"]["resourceVersion"]
        .as_str()
        .expect("a list's resourceVersion")
        .to_owned()
}

/// A merge patch: (status code, body).
async fn merge_patch(api: &Api, path: &str, patch: Value) -> (u16, Value) {
    api.patch(path, "application/merge-patch+json", patch).await
}

fn node_ports(svc: &Value) -> Vec<u64> {
    svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["nodePort"].as_u64())
        .collect()
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: "busybox:1.36"}]}
"#;

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30444}]
"#;

fn dry_runs_change_nothing(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    let deployment = cp.file("deployment.yaml", DEPLOYMENT);
    cp.ok(&["apply", "-f", &deployment]);
    let namespace = cp.file(
        "namespace.yaml",
        "{apiVersion: v1, kind: Namespace, metadata: {name: scratch}}",
    );
    cp.ok(&["apply", "-f", &namespace]);
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}
    });
    runtime().block_on(async {
        let (code, created) = api.call(Method::POST, PODS, Some(pod.clone())).await;
        assert_eq!(code, 201, "{created}");
    });
    let before = runtime().block_on(revision(&api));

    // What kubectl users run to see a change before making it.
    let service = cp.file("service.yaml", SERVICE);
    let out = cp.ok(&["apply", "--dry-run=server", "-f", &service, "-o", "json"]);
    let would: Value = serde_json::from_str(&out).unwrap();
    assert!(
        would["spec"]["clusterIP"].is_string(),
        "a dry-run create is defaulted and allocated: {would}"
    );
    assert_eq!(node_ports(&would), [30444]);
    cp.ok(&[
        "scale",
        "deployment/web",
        "--replicas=5",
        "--dry-run=server",
    ]);
    cp.ok(&[
        "patch",
        "deployment/web",
        "--dry-run=server",
        "-p",
        r#"{"spec":{"replicas":3}}"#,
    ]);
    let changed = cp.file(
        "changed.yaml",
        &DEPLOYMENT.replace("replicas: 1", "replicas: 2"),
    );
    let diff = cp.kubectl(&["diff", "-f", &changed]);
    assert_eq!(
        diff.status.code(),
        Some(1),
        "kubectl diff finds the change: {}",
        String::from_utf8_lossy(&diff.stderr)
    );
    assert!(String::from_utf8_lossy(&diff.stdout).contains("replicas: 2"));
    cp.ok(&["delete", "deployment/web", "--dry-run=server"]);
    cp.ok(&["delete", "pods", "--all", "--dry-run=server"]);
    cp.ok(&["delete", "namespace", "scratch", "--dry-run=server"]);

    runtime().block_on(async {
        // A binding, and a create that would fail: the checks run, nothing is kept.
        let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
            "target": {"apiVersion": "v1", "kind": "Node", "name": "n1"}});
        let (code, body) = api
            .call(
                Method::POST,
                &format!("{PODS}/p/binding?dryRun=All"),
                Some(binding),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        let (code, body) = api
            .call(
                Method::POST,
                &format!("{PODS}?dryRun=All"),
                Some(pod.clone()),
            )
            .await;
        assert_eq!(
            (code, body["reason"].as_str()),
            (409, Some("AlreadyExists")),
            "a dry-run create still checks the name: {body}"
        );
        let mut invalid = pod.clone();
        invalid["metadata"]["name"] = json!("q");
        invalid["spec"]["containers"] = json!([]);
        let (code, body) = api
            .call(Method::POST, &format!("{PODS}?dryRun=All"), Some(invalid))
            .await;
        assert_eq!(
            (code, body["reason"].as_str()),
            (422, Some("Invalid")),
            "{body}"
        );
        let (code, body) = api
            .call(
                Method::POST,
                &format!("{PODS}?dryRun=Yes"),
                Some(pod.clone()),
            )
            .await;
        assert_eq!(
            (code, body["reason"].as_str()),
            (400, Some("BadRequest")),
            "an unknown dryRun value is refused: {body}"
        );
        assert!(
            body["message"].as_str().unwrap().contains("dryRun"),
            "{body}"
        );

        assert_eq!(
            revision(&api).await,
            before,
            "no dry run wrote anything to the store"
        );
        let (_, pod) = api.call(Method::GET, &format!("{PODS}/p"), None).await;
        assert!(pod["spec"]["nodeName"].is_null(), "not bound: {pod}");
    });
    assert_eq!(
        cp.ok(&["get", "deployment/web", "-o", "jsonpath={.spec.replicas}"]),
        "1"
    );
    cp.fails(&["get", "service/web"]);
    cp.ok(&["get", "namespace/scratch"]);
    // The dry-run service held nothing: its node port is still free.
    cp.ok(&["apply", "-f", &service]);
}

fn service_updates_allocate_and_release(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    let svc = |name: &str, spec: Value| json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec});
    let port = json!([{"port": 80, "targetPort": 8080}]);
    runtime().block_on(async {
        let at = |name: &str| format!("{SERVICES}/{name}");
        let create = |name: &'static str, spec: Value| {
            let body = svc(name, spec);
            let api = &api;
            async move {
                let (code, created) = api.call(Method::POST, SERVICES, Some(body)).await;
                assert_eq!(code, 201, "{created}");
                created
            }
        };

        // ClusterIP -> NodePort: node ports allocated.
        let a = create("a", json!({"ports": port})).await;
        let a_ip = a["spec"]["clusterIP"].as_str().unwrap().to_owned();
        let (code, a) = merge_patch(&api, &at("a"), json!({"spec": {"type": "NodePort"}})).await;
        assert_eq!(code, 200, "{a}");
        let [a_port] = node_ports(&a)[..] else {
            panic!("a node port: {a}");
        };
        assert!((30000..=32767).contains(&a_port), "{a}");
        // A port's nodePort is kept when an update leaves it out (kubectl apply of the
        // original manifest).
        let mut put = a.clone();
        put["spec"]["ports"][0]
            .as_object_mut()
            .unwrap()
            .remove("nodePort");
        put["metadata"]["labels"] = json!({"touched": "yes"});
        let (code, kept) = api.call(Method::PUT, &at("a"), Some(put)).await;
        assert_eq!((code, node_ports(&kept)), (200, vec![a_port]), "{kept}");

        // A nodePort set in an update is reserved: another service cannot take it.
        let b = create(
            "b",
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30555}]}),
        )
        .await;
        assert_eq!(node_ports(&b), [30555]);
        let (code, body) = merge_patch(
            &api,
            &at("a"),
            json!({"spec": {"ports": [{"port": 80, "targetPort": 8080, "nodePort": 30555}]}}),
        )
        .await;
        assert_eq!(
            (code, body["reason"].as_str()),
            (422, Some("Invalid")),
            "{body}"
        );
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("already allocated"),
            "{body}"
        );
        let (code, body) = merge_patch(
            &api,
            &at("a"),
            json!({"spec": {"ports": [{"port": 80, "targetPort": 8080, "nodePort": 30556}]}}),
        )
        .await;
        assert_eq!((code, node_ports(&body)), (200, vec![30556]), "{body}");
        let (code, body) = api
            .call(
                Method::POST,
                SERVICES,
                Some(svc(
                    "c",
                    json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30556}]}),
                )),
            )
            .await;
        assert_eq!(code, 422, "30556 is a's now: {body}");
        // a's first port went back to the range when it changed.
        create(
            "d",
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": a_port}]}),
        )
        .await;

        // NodePort -> ClusterIP: the node port goes with the type, and is free again.
        let (code, body) =
            merge_patch(&api, &at("a"), json!({"spec": {"type": "ClusterIP"}})).await;
        assert_eq!(code, 200, "{body}");
        assert!(node_ports(&body).is_empty(), "{body}");
        create(
            "e",
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30556}]}),
        )
        .await;

        // ClusterIP -> ExternalName releases the address; ExternalName -> ClusterIP gets one.
        let (code, body) = merge_patch(
            &api,
            &at("a"),
            json!({"spec": {"type": "ExternalName", "externalName": "example.com"}}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert!(body["spec"]["clusterIP"].is_null(), "{body}");
        create("f", json!({"clusterIP": a_ip, "ports": port})).await;
        let (code, body) = merge_patch(
            &api,
            &at("a"),
            json!({"spec": {"type": "ClusterIP", "externalName": null}}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let ip = body["spec"]["clusterIP"].as_str().expect("an address");
        assert_ne!(ip, a_ip, "{body}");
        assert_eq!(body["spec"]["clusterIPs"], json!([ip]));

        // A LoadBalancer turning Local gets a health check node port, and loses it again.
        let (code, body) = merge_patch(
            &api,
            &at("a"),
            json!({"spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local"}}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let hc = body["spec"]["healthCheckNodePort"]
            .as_u64()
            .expect("a port");
        let (code, body) = merge_patch(
            &api,
            &at("a"),
            json!({"spec": {"externalTrafficPolicy": "Cluster"}}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert!(body["spec"]["healthCheckNodePort"].is_null(), "{body}");
        create(
            "g",
            json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": hc}]}),
        )
        .await;

        // A nodePort on a ClusterIP service is refused, as kube-apiserver does.
        let (code, body) = api
            .call(
                Method::POST,
                SERVICES,
                Some(svc(
                    "h",
                    json!({"ports": [{"port": 80, "nodePort": 30999}]}),
                )),
            )
            .await;
        assert_eq!(
            (code, body["reason"].as_str()),
            (422, Some("Invalid")),
            "{body}"
        );
    });
}

fn writes_that_change_nothing_store_nothing(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    let deployment = cp.file("deployment.yaml", DEPLOYMENT);
    cp.ok(&["apply", "-f", &deployment]);
    runtime().block_on(async {
        let path = "/apis/apps/v1/namespaces/default/deployments/web";
        let (_, current) = api.call(Method::GET, path, None).await;
        let before = revision(&api).await;
        let (code, same) =
            merge_patch(&api, path, json!({"metadata": {"labels": {"app": "web"}}})).await;
        assert_eq!(code, 200, "{same}");
        let (code, put) = api.call(Method::PUT, path, Some(current.clone())).await;
        assert_eq!(code, 200, "{put}");
        for answer in [&same, &put] {
            assert_eq!(
                answer["metadata"]["resourceVersion"], current["metadata"]["resourceVersion"],
                "a no-op write keeps the resourceVersion"
            );
        }
        assert_eq!(revision(&api).await, before, "nothing was stored");
    });
    // kubectl apply of the same manifest again: unchanged, and says so.
    let out = cp.ok(&["apply", "-f", &deployment]);
    assert!(out.contains("unchanged"), "{out}");
}

fn a_create_cannot_set_a_status(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "forged"},
            "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]},
            "status": {"phase": "Running", "podIP": "10.244.0.99",
                "conditions": [{"type": "Ready", "status": "True"}]}
        });
        let (code, created) = api.call(Method::POST, PODS, Some(pod)).await;
        assert_eq!(code, 201, "{created}");
        assert_eq!(created["status"], json!({"phase": "Pending"}), "{created}");
        let svc = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "forged"},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}
        });
        let (code, created) = api.call(Method::POST, SERVICES, Some(svc)).await;
        assert_eq!(code, 201, "{created}");
        assert!(
            created["status"]["loadBalancer"]["ingress"].is_null(),
            "{created}"
        );
        let deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}},
            "status": {"replicas": 5, "readyReplicas": 5, "availableReplicas": 5}
        });
        let (code, created) = api
            .call(
                Method::POST,
                "/apis/apps/v1/namespaces/default/deployments",
                Some(deployment),
            )
            .await;
        assert_eq!(code, 201, "{created}");
        assert!(created["status"]["readyReplicas"].is_null(), "{created}");
        // Through /status, a status is written as before.
        let (code, updated) = merge_patch(
            &api,
            &format!("{PODS}/forged/status"),
            json!({"status": {"podIP": "10.244.0.99"}}),
        )
        .await;
        assert_eq!(
            (code, updated["status"]["podIP"].as_str()),
            (200, Some("10.244.0.99")),
            "{updated}"
        );
    });
}

fn watches_keep_what_clients_rely_on(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        for name in ["a", "b", "c"] {
            let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}});
            let (code, body) = api.call(Method::POST, PODS, Some(pod)).await;
            assert_eq!(code, 201, "{body}");
        }
        let rv: i64 = revision(&api).await.parse().unwrap();

        // A streaming list (client-go's WatchList): the whole state first, even with a
        // resourceVersion, then the bookmark that ends it.
        let resp = api
            .request(
                Method::GET,
                &format!(
                    "{PODS}?watch=1&sendInitialEvents=true&allowWatchBookmarks=true\
                     &resourceVersionMatch=NotOlderThan&resourceVersion={rv}"
                ),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let got = events(resp, 4, 10).await;
        let kinds: Vec<&str> = got.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(kinds, ["ADDED", "ADDED", "ADDED", "BOOKMARK"], "{got:?}");
        let end = &got[3]["object"]["metadata"];
        assert_eq!(
            end["annotations"]["k8s.io/initial-events-end"], "true",
            "{end}"
        );
        let end_rv: i64 = end["resourceVersion"].as_str().unwrap().parse().unwrap();
        assert!(end_rv >= rv, "{end}");

        // Combinations kube-apiserver refuses, refused the same way.
        for query in [
            "resourceVersionMatch=Exact",
            "resourceVersionMatch=Exact&resourceVersion=0",
            "resourceVersionMatch=Sometime&resourceVersion=1",
            "sendInitialEvents=true",
            "watch=1&resourceVersionMatch=NotOlderThan",
            "watch=1&sendInitialEvents=true&allowWatchBookmarks=true",
            "watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan",
        ] {
            let (code, body) = api
                .call(Method::GET, &format!("{PODS}?{query}"), None)
                .await;
            assert_eq!(
                (
                    code,
                    body["reason"].as_str(),
                    body["details"]["kind"].as_str()
                ),
                (422, Some("Invalid"), Some("ListOptions")),
                "{query}: {body}"
            );
        }

        // A revision the store has not reached: waited for, then refused with the cause
        // client-go's reflector falls back on.
        for query in [
            format!("resourceVersion={}", rv + 1000),
            format!("watch=1&resourceVersion={}", rv + 1000),
        ] {
            let (code, body) = api
                .call(Method::GET, &format!("{PODS}?{query}"), None)
                .await;
            assert_eq!(
                (code, body["details"]["causes"][0]["reason"].as_str()),
                (504, Some("ResourceVersionTooLarge")),
                "{query}: {body}"
            );
        }

        // An idle watch's bookmarks follow the store, not only its own last event: writes to
        // other kinds move them on.
        let resp = api
            .request(
                Method::GET,
                &format!("{PODS}?watch=1&allowWatchBookmarks=true&resourceVersion={rv}"),
            )
            .send()
            .await
            .unwrap();
        let watching = tokio::spawn(events(resp, 2, 20));
        for name in ["x", "y"] {
            let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                "spec": {"ports": [{"port": 80}]}});
            let (code, body) = api.call(Method::POST, SERVICES, Some(svc)).await;
            assert_eq!(code, 201, "{body}");
        }
        let after: i64 = revision(&api).await.parse().unwrap();
        let got = watching.await.unwrap();
        let last = got.last().expect("bookmarks");
        assert_eq!(last["type"], "BOOKMARK", "{got:?}");
        let bookmarked: i64 = last["object"]["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            bookmarked >= after,
            "the second bookmark carries the store's revision {after}: {got:?}"
        );
    });
}

fn objects_are_validated_as_kube_does(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    let pod = |name: &str, resources: Value| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "busybox:1.36", "resources": resources}]}})
    };
    runtime().block_on(async {
        let expect = |code: u16, reason: &'static str| move |(got, body): (u16, Value)| {
            // A created object has no reason: "".
            assert_eq!((got, body["reason"].as_str().unwrap_or("")), (code, reason), "{body}");
            body
        };
        let post = |path: &'static str, body: Value| api.call(Method::POST, path, Some(body));

        // A quantity that is not one fails decoding (400), as in kube-apiserver; the
        // scheduler never sees `cpu: lots`.
        let body = expect(400, "BadRequest")(
            post(PODS, pod("lots", json!({"requests": {"cpu": "lots"}}))).await,
        );
        assert!(body["message"].as_str().unwrap().contains("quantities must match"), "{body}");
        expect(422, "Invalid")(
            post(PODS, pod("over", json!({"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}))).await,
        );
        expect(422, "Invalid")(post(PODS, pod("neg", json!({"requests": {"memory": "-1Gi"}}))).await);
        expect(201, "")(
            post(PODS, pod("fine", json!({"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1000m", "memory": "1024Mi"}}))).await,
        );

        // Names by kind, labels, annotations, owner references.
        let named = |kind: &str, name: &str| {
            json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": name},
                "spec": {"ports": [{"port": 80}], "containers": [{"name": "c", "image": "i"}]}})
        };
        let body = expect(422, "Invalid")(post(SERVICES, named("Service", "1web")).await);
        assert!(body["message"].as_str().unwrap().contains("DNS-1035"), "{body}");
        expect(422, "Invalid")(post(PODS, named("Pod", "Web")).await);
        let mut labelled = named("Pod", "labelled");
        labelled["metadata"]["labels"] = json!({"bad key": "v"});
        expect(422, "Invalid")(post(PODS, labelled.clone()).await);
        labelled["metadata"]["labels"] = json!({"k": "v".repeat(64)});
        expect(422, "Invalid")(post(PODS, labelled.clone()).await);
        labelled["metadata"]["labels"] = json!({"app.kubernetes.io/name": "web_1.x"});
        expect(201, "")(post(PODS, labelled).await);
        let mut annotated = named("Pod", "annotated");
        annotated["metadata"]["annotations"] = json!({"big": "x".repeat(300 * 1024)});
        expect(422, "Invalid")(post(PODS, annotated).await);
        let mut owned = named("Pod", "owned");
        owned["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs"}]);
        expect(422, "Invalid")(post(PODS, owned.clone()).await);
        owned["metadata"]["ownerReferences"] = json!([
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "a", "uid": "1", "controller": true},
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "b", "uid": "2", "controller": true}
        ]);
        let body = expect(422, "Invalid")(post(PODS, owned).await);
        assert!(body["message"].as_str().unwrap().contains("Only one reference"), "{body}");

        // generateName keeps at most 58 characters of its prefix, so the name fits 63.
        let mut generated = named("Pod", "");
        generated["metadata"] = json!({"generateName": "p".repeat(70)});
        let body = expect(201, "")(post(PODS, generated).await);
        let name = body["metadata"]["name"].as_str().unwrap();
        assert_eq!(name.len(), 63, "{name}");
        assert!(name.starts_with(&"p".repeat(58)), "{name}");
    });
}

fn patches_are_bounded_and_directives_checked(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    let deployment = cp.file("deployment.yaml", DEPLOYMENT);
    cp.ok(&["apply", "-f", &deployment]);
    runtime().block_on(async {
        let path = "/apis/apps/v1/namespaces/default/deployments/web";
        let before = revision(&api).await;
        // Sixty copies of a growing subtree would need exabytes: refused at once.
        let doubling: Vec<Value> = (0..60)
            .map(|i| json!({"op": "copy", "from": "/spec/template", "path": format!("/metadata/annotations/x{i}")}))
            .collect();
        let (code, body) = api.patch(path, "application/json-patch+json", json!(doubling)).await;
        assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")), "{body}");
        for bad in [
            json!({"spec": {"template": {"spec": {"$patch": "bogus"}}}}),
            json!({"spec": {"$unknownDirective": true}}),
        ] {
            let (code, body) =
                api.patch(path, "application/strategic-merge-patch+json", bad.clone()).await;
            assert_eq!(code, 400, "{bad}: {body}");
        }
        assert_eq!(revision(&api).await, before, "nothing was written");
        // $setElementOrder (what kubectl apply sends) orders the merged containers.
        let (code, body) = api.patch(path,
            "application/strategic-merge-patch+json",
            json!({"spec": {"template": {"spec": {
                "$setElementOrder/containers": [{"name": "side"}, {"name": "c"}],
                "containers": [{"name": "side", "image": "busybox:1.36"}]}}}}),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        let names: Vec<&str> = body["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["side", "c"]);
    });
}

const CONFIG: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {greeting: hello, "app.properties": "a=1"}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: s3cret}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: builder}
"#;

fn the_kinds_every_manifest_uses(store: &str) {
    // The controllers run: they make each namespace's default ServiceAccount.
    let cp = ControlPlane::start(store, &[]);
    let api = Api::new(&cp);
    let config = cp.file("config.yaml", CONFIG);
    cp.ok(&["apply", "-f", &config]);
    assert_eq!(
        cp.ok(&[
            "get",
            "configmap",
            "settings",
            "-o",
            "jsonpath={.data.greeting}"
        ]),
        "hello"
    );
    // stringData is written into data (base64), and not kept.
    let secret: Value =
        serde_json::from_str(&cp.ok(&["get", "secret", "creds", "-o", "json"])).unwrap();
    assert_eq!(secret["data"]["password"], "czNjcmV0", "{secret}");
    assert!(secret.get("stringData").is_none(), "{secret}");
    assert_eq!(secret["type"], "Opaque");
    cp.ok(&["get", "serviceaccount", "builder"]);
    runtime().block_on(async {
        let (code, body) = api
            .call(
                Method::POST,
                "/api/v1/namespaces/default/configmaps",
                Some(json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "bad"}, "data": {"no/slash": "x"}})),
            )
            .await;
        assert_eq!(
            (code, body["reason"].as_str()),
            (422, Some("Invalid")),
            "{body}"
        );
        let (code, body) = api
            .call(
                Method::POST,
                "/api/v1/namespaces/default/secrets",
                Some(json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "bad"}, "data": {"k": "not base64!"}})),
            )
            .await;
        assert_eq!(code, 400, "data must be base64: {body}");

        // default/kubernetes: the first service address, port 443.
        let (code, svc) = api
            .call(
                Method::GET,
                "/api/v1/namespaces/default/services/kubernetes",
                None,
            )
            .await;
        assert_eq!(code, 200, "{svc}");
        assert_eq!(svc["spec"]["clusterIP"], "10.96.0.1", "{svc}");
        assert_eq!(svc["spec"]["ports"][0]["port"], 443, "{svc}");

        // Every namespace gets its default ServiceAccount, again if it is deleted.
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}});
        api.call(Method::POST, "/api/v1/namespaces", Some(ns)).await;
        let account = "/api/v1/namespaces/team/serviceaccounts/default";
        let present = || async { api.call(Method::GET, account, None).await.0 == 200 };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !present().await {
            assert!(
                std::time::Instant::now() < deadline,
                "a default ServiceAccount in team"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let (code, _) = api.call(Method::DELETE, account, None).await;
        assert_eq!(code, 200);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !present().await {
            assert!(
                std::time::Instant::now() < deadline,
                "the default ServiceAccount made again"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
}

/// events.k8s.io/v1 serves the same Events as core/v1, each in its own form: what one writes
/// the other reads, selectors and watches included.
fn events_are_served_in_both_apis(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let v1 = "/apis/events.k8s.io/v1/namespaces/default/events";
        let core = "/api/v1/namespaces/default/events";
        let watch = api
            .request(Method::GET, &format!("{v1}?watch=1"))
            .send()
            .await
            .unwrap();
        let event = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "new-style"},
            "regarding": {"kind": "Pod", "namespace": "default", "name": "p"},
            "note": "pulled the image", "reason": "Pulled", "type": "Normal", "action": "Pull",
            "eventTime": "2026-12-02T06:00:00.000000Z",
            "reportingController": "example.com/puller", "reportingInstance": "puller-1",
        });
        let (code, created) = api.call(Method::POST, v1, Some(event)).await;
        assert_eq!(code, 201, "{created}");
        assert_eq!(created["apiVersion"], "events.k8s.io/v1");
        assert_eq!(created["note"], "pulled the image");
        assert!(created.get("message").is_none(), "{created}");
        // Core readers (kubectl describe, kubectl events) see it in their form.
        let (code, old) = api.call(Method::GET, &format!("{core}/new-style"), None).await;
        assert_eq!(code, 200);
        assert_eq!(old["apiVersion"], "v1");
        assert_eq!(
            (old["involvedObject"]["name"].as_str(), old["message"].as_str(), old["reportingComponent"].as_str()),
            (Some("p"), Some("pulled the image"), Some("example.com/puller"))
        );
        // And the other way: a core event read through events.k8s.io.
        let core_event = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "old-style"},
            "involvedObject": {"kind": "Pod", "namespace": "default", "name": "q"},
            "message": "started", "reason": "Started", "type": "Normal", "count": 3,
            "eventTime": "2026-12-02T06:00:01.000000Z",
            "source": {"component": "kubelet"}});
        let (code, body) = api.call(Method::POST, core, Some(core_event)).await;
        assert_eq!(code, 201, "{body}");
        let (_, new) = api.call(Method::GET, &format!("{v1}/old-style"), None).await;
        assert_eq!(
            (new["regarding"]["name"].as_str(), new["note"].as_str(), new["deprecatedCount"].as_i64(), new["deprecatedSource"]["component"].as_str()),
            (Some("q"), Some("started"), Some(3), Some("kubelet")),
            "{new}"
        );
        // Field selectors in each API's own names.
        let (_, list) = api.call(Method::GET, &format!("{v1}?fieldSelector=regarding.name%3Dp"), None).await;
        let names: Vec<&str> = list["items"].as_array().unwrap().iter().map(|e| e["metadata"]["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["new-style"]);
        let (_, list) = api.call(Method::GET, &format!("{core}?fieldSelector=involvedObject.name%3Dq"), None).await;
        assert_eq!(list["items"][0]["metadata"]["name"], "old-style");
        // A patch through events.k8s.io, in its names.
        let (code, patched) = merge_patch(&api, &format!("{v1}/new-style"), json!({"note": "pulled again"})).await;
        assert_eq!((code, patched["note"].as_str()), (200, Some("pulled again")), "{patched}");
        let (_, old) = api.call(Method::GET, &format!("{core}/new-style"), None).await;
        assert_eq!(old["message"], "pulled again");
        // Its watchers get its form.
        let events = common::events(watch, 3, 10).await;
        assert!(events.iter().all(|e| e["object"]["apiVersion"] == "events.k8s.io/v1" && e["object"].get("involvedObject").is_none()), "{events:?}");
        assert_eq!(events[1]["object"]["note"], "started");
        // Deleted through one, gone from both.
        let (code, _) = api.call(Method::DELETE, &format!("{v1}/old-style"), None).await;
        assert_eq!(code, 200);
        let (code, _) = api.call(Method::GET, &format!("{core}/old-style"), None).await;
        assert_eq!(code, 404);
    });
    // kubectl lists them through the new API too.
    let out = cp.ok(&["get", "events.v1.events.k8s.io", "-o", "name"]);
    assert!(out.contains("new-style"), "{out}");
}

on_both_stores!(
    events_are_served_in_both_apis,
    the_kinds_every_manifest_uses,
    patches_are_bounded_and_directives_checked,
    objects_are_validated_as_kube_does,
    watches_keep_what_clients_rely_on,
    dry_runs_change_nothing,
    service_updates_allocate_and_release,
    writes_that_change_nothing_store_nothing,
    a_create_cannot_set_a_status,
);
