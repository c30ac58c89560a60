//! The API's semantics over HTTPS, as a client sees them: Status errors with reasons and codes,
//! optimistic concurrency, allocation of ClusterIPs and NodePorts, watches, pagination,
//! subresources, graceful deletion. The control loops are off (`--disable-controllers`): these
//! tests are about what the API does with a client's writes, with nobody writing beside it.

mod common;

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use common::{Api, ControlPlane, events, runtime};
use reqwest::Method;
use serde_json::{Value, json};

fn pod(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}
    })
}

fn service(name: &str, kind: &str, cluster_ip: Option<&str>) -> Value {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"type": kind, "selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}
    });
    if let Some(ip) = cluster_ip {
        s["spec"]["clusterIP"] = json!(ip);
    }
    s
}

const PODS: &str = "/api/v1/namespaces/default/pods";
const SERVICES: &str = "/api/v1/namespaces/default/services";

fn errors_are_statuses_with_reasons_and_writes_are_optimistic(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let (code, body) = api.call(Method::GET, "/api/v1/namespaces", None).await;
        assert_eq!(code, 200);
        assert!(body["items"].as_array().unwrap().len() >= 4);

        let (code, _) = api.0.http.get(format!("{}/api/v1/namespaces", api.0.server)).send().await.map(|r| (r.status().as_u16(), ())).unwrap();
        assert_eq!(code, 401, "no token, no access");

        let (code, body) = api.call(Method::POST, "/api/v1/namespaces/nowhere/pods", Some(pod("p", json!({})))).await;
        assert_eq!((code, body["reason"].as_str()), (404, Some("NotFound")), "{body}");
        assert_eq!(body["kind"], "Status");

        let mut generated = pod("", json!({}));
        generated["metadata"] = json!({"generateName": "web-"});
        let (code, created) = api.call(Method::POST, PODS, Some(generated)).await;
        assert_eq!(code, 201, "{created}");
        let name = created["metadata"]["name"].as_str().unwrap().to_owned();
        assert!(name.starts_with("web-") && name.len() == 9, "generateName adds 5 characters: {name}");
        for field in ["uid", "creationTimestamp", "resourceVersion"] {
            assert!(created["metadata"][field].is_string(), "{field} is set");
        }
        assert_eq!(created["spec"]["restartPolicy"], "Always", "defaulted");

        let (code, body) = api.call(Method::POST, PODS, Some(pod(&name, json!({})))).await;
        assert_eq!((code, body["reason"].as_str()), (409, Some("AlreadyExists")));

        // Two writers from the same version: the second gets 409 Conflict.
        let mut first = created.clone();
        first["metadata"]["labels"] = json!({"writer": "one"});
        let (code, _) = api.call(Method::PUT, &format!("{PODS}/{name}"), Some(first)).await;
        assert_eq!(code, 200);
        let mut second = created.clone();
        second["metadata"]["labels"] = json!({"writer": "two"});
        let (code, body) = api.call(Method::PUT, &format!("{PODS}/{name}"), Some(second)).await;
        assert_eq!((code, body["reason"].as_str()), (409, Some("Conflict")), "{body}");

        let (code, body) = api
            .call(Method::POST, PODS, Some(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "empty"}, "spec": {"containers": []}})))
            .await;
        assert_eq!((code, body["reason"].as_str()), (422, Some("Invalid")));
        assert_eq!(body["details"]["causes"][0]["field"], "spec.containers");
        assert_eq!(body["details"]["kind"], "Pod");

        let resp = api.request(Method::POST, PODS).header("content-type", "application/json").body("{not json").send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 400, "bad input is a 400, never a 500");
        let (code, body) = api.call(Method::POST, PODS, Some(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": "no"}}))).await;
        assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")), "{body}");

        let (code, _) = api.call(Method::POST, "/api/v1/namespaces/default/endpoints", Some(json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "e"}}))).await;
        assert_eq!(code, 405, "endpoints are read-only for clients");
    });
}

fn ip_of(svc: &Value) -> Ipv4Addr {
    svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap()
}

fn cluster_ips_and_node_ports_are_unique_under_concurrency_and_across_restarts(store: &str) {
    let mut cp = ControlPlane::start(
        store,
        &[
            "--service-cluster-ip-range",
            "10.100.0.0/24",
            "--service-node-port-range",
            "30000-30099",
            "--disable-controllers",
        ],
    );
    let rt = runtime();
    let taken = rt.block_on(async {
        let api = Api::new(&cp);
        let creates = (0..40).map(|i| {
            let kind = if i % 2 == 0 { "ClusterIP" } else { "NodePort" };
            api.call(
                Method::POST,
                SERVICES,
                Some(service(&format!("s{i}"), kind, None)),
            )
        });
        let results = futures::future::join_all(creates).await;
        let mut ips = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for (code, svc) in &results {
            assert_eq!(*code, 201, "{svc}");
            let ip = ip_of(svc);
            assert!(
                ip > Ipv4Addr::new(10, 100, 0, 1) && ip < Ipv4Addr::new(10, 100, 0, 255),
                "in range, not the first: {ip}"
            );
            assert!(ips.insert(ip), "duplicate ClusterIP {ip}");
            if let Some(p) = svc["spec"]["ports"][0]["nodePort"].as_u64() {
                assert!((30000..30100).contains(&p), "in range: {p}");
                assert!(ports.insert(p), "duplicate NodePort {p}");
            }
        }
        assert_eq!(ports.len(), 20);

        let used = results[0].1["spec"]["clusterIP"]
            .as_str()
            .unwrap()
            .to_owned();
        let (code, body) = api
            .call(
                Method::POST,
                SERVICES,
                Some(service("dup", "ClusterIP", Some(&used))),
            )
            .await;
        assert_eq!(code, 422, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("already allocated"),
            "{body}"
        );
        assert_eq!(body["details"]["causes"][0]["field"], "spec.clusterIPs");
        let (code, body) = api
            .call(
                Method::POST,
                SERVICES,
                Some(service("out", "ClusterIP", Some("10.200.0.1"))),
            )
            .await;
        assert_eq!(code, 422, "{body}");
        let mut np = service("np", "NodePort", None);
        np["spec"]["ports"][0]["nodePort"] = json!(31000);
        let (code, body) = api.call(Method::POST, SERVICES, Some(np)).await;
        assert_eq!(
            (code, body["details"]["causes"][0]["field"].as_str()),
            (422, Some("spec.ports[0].nodePort")),
            "{body}"
        );

        // A deleted service's address is free again.
        let (code, _) = api
            .call(Method::DELETE, &format!("{SERVICES}/s0"), None)
            .await;
        assert_eq!(code, 200);
        let (code, svc) = api
            .call(
                Method::POST,
                SERVICES,
                Some(service("reuse", "ClusterIP", Some(&used))),
            )
            .await;
        assert_eq!((code, ip_of(&svc).to_string()), (201, used.clone()));
        ips
    });
    cp.restart();
    rt.block_on(async {
        let api = Api::new(&cp);
        for i in 0..10 {
            let (code, svc) = api
                .call(
                    Method::POST,
                    SERVICES,
                    Some(service(&format!("after{i}"), "ClusterIP", None)),
                )
                .await;
            assert_eq!(code, 201, "{svc}");
            assert!(
                !taken.contains(&ip_of(&svc)),
                "an address allocated before the restart is not handed out again"
            );
        }
    });
}

fn watches_replay_follow_filter_bookmark_and_report_compaction(store: &str) {
    let cp = ControlPlane::start(
        store,
        &["--compaction-interval", "1", "--disable-controllers"],
    );
    let api = Api::new(&cp);
    runtime().block_on(async {
        api.call(Method::POST, PODS, Some(pod("a", json!({"app": "web"}))))
            .await;
        api.call(Method::POST, PODS, Some(pod("b", json!({"app": "api"}))))
            .await;

        // No resourceVersion: synthetic ADDED for what exists, then changes.
        let resp = api
            .request(
                Method::GET,
                &format!("{PODS}?watch=1&labelSelector=app%3Dweb"),
            )
            .send()
            .await
            .unwrap();
        let (code, _) = (resp.status().as_u16(), ());
        assert_eq!(code, 200);
        let watching = tokio::spawn(events(resp, 3, 10));
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.call(Method::POST, PODS, Some(pod("c", json!({"app": "web"}))))
            .await;
        let resp = api
            .request(Method::PATCH, &format!("{PODS}/a"))
            .header("content-type", "application/merge-patch+json")
            .body(r#"{"metadata":{"labels":{"app":"gone"}}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let seen: Vec<(String, String)> = watching
            .await
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().to_owned(),
                    e["object"]["metadata"]["name"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let expected: Vec<(String, String)> = [("ADDED", "a"), ("ADDED", "c"), ("DELETED", "a")]
            .iter()
            .map(|(t, n)| ((*t).to_owned(), (*n).to_owned()))
            .collect();
        assert_eq!(
            seen, expected,
            "b never matched; a leaving the selector is a DELETED"
        );

        // Tables, with column definitions in the first event only.
        let resp = api
            .request(Method::GET, &format!("{PODS}?watch=1"))
            .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .send()
            .await
            .unwrap();
        let table_events = events(resp, 2, 10).await;
        assert_eq!(table_events[0]["object"]["kind"], "Table");
        assert!(
            !table_events[0]["object"]["columnDefinitions"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert!(
            table_events[1]["object"]["columnDefinitions"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert_eq!(table_events[0]["object"]["rows"][0]["cells"][0], "a");

        // Bookmarks on request.
        let (_, list) = api.call(Method::GET, PODS, None).await;
        let rv = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned();
        let resp = api
            .request(
                Method::GET,
                &format!("{PODS}?watch=1&allowWatchBookmarks=true&resourceVersion={rv}"),
            )
            .send()
            .await
            .unwrap();
        let bookmark = events(resp, 1, 15).await;
        assert_eq!(
            bookmark.first().map(|e| e["type"].clone()),
            Some(json!("BOOKMARK")),
            "{bookmark:?}"
        );

        // A compacted resourceVersion: an ERROR event carrying a 410 Status.
        for i in 0..3 {
            let resp = api
                .request(Method::PATCH, &format!("{PODS}/b"))
                .header("content-type", "application/merge-patch+json")
                .body(format!(r#"{{"metadata":{{"labels":{{"n":"{i}"}}}}}}"#))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200);
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let resp = api
            .request(Method::GET, &format!("{PODS}?watch=1&resourceVersion=2"))
            .send()
            .await
            .unwrap();
        let gone = events(resp, 1, 10).await;
        assert_eq!(gone[0]["type"], "ERROR");
        assert_eq!(
            (
                gone[0]["object"]["code"].as_u64(),
                gone[0]["object"]["reason"].as_str()
            ),
            (Some(410), Some("Expired"))
        );
        let (code, body) = api
            .call(
                Method::GET,
                &format!("{PODS}?limit=1&resourceVersion=2&resourceVersionMatch=Exact"),
                None,
            )
            .await;
        assert_eq!(
            (code, body["reason"].as_str()),
            (410, Some("Expired")),
            "a list at a compacted version is 410 too"
        );
    });
}

fn lists_page_selectors_subresources_and_deletion(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        for i in 0..7 {
            let (code, _) = api.call(Method::POST, PODS, Some(pod(&format!("p{i}"), json!({"i": i.to_string()})))).await;
            assert_eq!(code, 201);
        }
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let path = match &token {
                Some(t) => format!("{PODS}?limit=3&continue={t}"),
                None => format!("{PODS}?limit=3"),
            };
            let (code, page) = api.call(Method::GET, &path, None).await;
            assert_eq!(code, 200, "{page}");
            pages += 1;
            names.extend(page["items"].as_array().unwrap().iter().map(|p| p["metadata"]["name"].as_str().unwrap().to_owned()));
            token = page["metadata"]["continue"].as_str().map(str::to_owned);
            if token.is_none() {
                break;
            }
            // Writes between pages do not show up in them: the pages read one revision.
            api.call(Method::POST, PODS, Some(pod(&format!("late{pages}"), json!({})))).await;
        }
        assert_eq!(pages, 3);
        assert_eq!(names, ["p0", "p1", "p2", "p3", "p4", "p5", "p6"]);

        // Binding, then field selectors.
        let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p1"}, "target": {"kind": "Node", "name": "node-a"}});
        let (code, body) = api.call(Method::POST, &format!("{PODS}/p1/binding"), Some(binding.clone())).await;
        assert_eq!(code, 201, "{body}");
        let (code, body) = api.call(Method::POST, &format!("{PODS}/p1/binding"), Some(binding)).await;
        assert_eq!((code, body["reason"].as_str()), (409, Some("Conflict")), "a bound pod cannot be bound again");
        let (_, bound) = api.call(Method::GET, &format!("{PODS}?fieldSelector=spec.nodeName%3Dnode-a"), None).await;
        let bound: Vec<&str> = bound["items"].as_array().unwrap().iter().map(|p| p["metadata"]["name"].as_str().unwrap()).collect();
        assert_eq!(bound, ["p1"]);
        let (code, body) = api.call(Method::GET, &format!("{PODS}?fieldSelector=spec.image%3Dx"), None).await;
        assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")));

        // Graceful deletion of a scheduled pod: marked, then gone when the grace period is 0.
        let (code, marked) = api.call(Method::DELETE, &format!("{PODS}/p1"), None).await;
        assert_eq!(code, 200, "kube-apiserver answers 200 with the marked object");
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        let (code, _) = api.call(Method::GET, &format!("{PODS}/p1"), None).await;
        assert_eq!(code, 200, "still there during its grace period");
        let (code, _) = api.call(Method::DELETE, &format!("{PODS}/p1?gracePeriodSeconds=0"), None).await;
        assert_eq!(code, 200);
        let (code, _) = api.call(Method::GET, &format!("{PODS}/p1"), None).await;
        assert_eq!(code, 404);
        // An unscheduled pod goes at once.
        let (code, _) = api.call(Method::DELETE, &format!("{PODS}/p2"), None).await;
        assert_eq!(code, 200);

        // Status and scale subresources.
        let deploy = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "d"}},
                     "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}
        });
        const DEPLOYS: &str = "/apis/apps/v1/namespaces/default/deployments";
        let (code, created) = api.call(Method::POST, DEPLOYS, Some(deploy)).await;
        assert_eq!(code, 201, "{created}");
        let mut with_status = created.clone();
        with_status["status"] = json!({"replicas": 9});
        let (_, updated) = api.call(Method::PUT, &format!("{DEPLOYS}/d"), Some(with_status.clone())).await;
        assert!(updated["status"].get("replicas").is_none(), "status is not written through the main resource");
        with_status["metadata"]["resourceVersion"] = updated["metadata"]["resourceVersion"].clone();
        with_status["spec"]["replicas"] = json!(5);
        let (code, updated) = api.call(Method::PUT, &format!("{DEPLOYS}/d/status"), Some(with_status)).await;
        assert_eq!(code, 200, "{updated}");
        assert_eq!((updated["status"]["replicas"].as_i64(), updated["spec"]["replicas"].as_i64()), (Some(9), Some(2)), "/status writes only status");
        let (code, scale) = api.call(Method::GET, &format!("{DEPLOYS}/d/scale"), None).await;
        assert_eq!((code, scale["kind"].as_str(), scale["spec"]["replicas"].as_i64()), (200, Some("Scale"), Some(2)));
        assert_eq!(scale["status"]["selector"], "app=d");
        let mut stale = scale.clone();
        stale["metadata"]["resourceVersion"] = json!("1");
        stale["spec"]["replicas"] = json!(3);
        let (code, _) = api.call(Method::PUT, &format!("{DEPLOYS}/d/scale"), Some(stale)).await;
        assert_eq!(code, 409, "a Scale with a stale version conflicts");

        // Foreground deletion waits for dependents (the garbage collector removes the finalizer).
        let (code, body) = api.call(Method::DELETE, &format!("{DEPLOYS}/d?propagationPolicy=Foreground"), None).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["metadata"]["finalizers"], json!(["foregroundDeletion"]));
    });
}

fn discovery_answers_in_both_forms(store: &str) {
    let cp = ControlPlane::start(store, &["--disable-controllers"]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let accept =
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json";
        let resp = api
            .request(Method::GET, "/apis")
            .header("accept", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["kind"], "APIGroupDiscoveryList");
        let (code, legacy) = api.call(Method::GET, "/apis", None).await;
        assert_eq!((code, legacy["kind"].as_str()), (200, Some("APIGroupList")));
        let (_, v) = api.call(Method::GET, "/version", None).await;
        assert!(v["gitVersion"].as_str().unwrap().starts_with("v1.37."));

        // OpenAPI v2, for older tools: one Swagger 2.0 document whose references all resolve.
        let (code, swagger) = api.call(Method::GET, "/openapi/v2", None).await;
        assert_eq!((code, swagger["swagger"].as_str()), (200, Some("2.0")));
        let definitions = swagger["definitions"].as_object().unwrap();
        assert_eq!(
            definitions["io.k8s.api.apps.v1.Deployment"]["x-kubernetes-group-version-kind"][0]["kind"],
            "Deployment"
        );
        let create = &swagger["paths"]["/api/v1/namespaces/{namespace}/pods"]["post"];
        let body = create["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["in"] == "body")
            .expect("a body parameter");
        assert_eq!(body["schema"]["$ref"], "#/definitions/io.k8s.api.core.v1.Pod");
        fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
            match v {
                Value::Object(m) => m.iter().for_each(|(k, v)| match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(v, out),
                }),
                Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut all = Vec::new();
        refs(&swagger, &mut all);
        assert!(all.len() > 100);
        let dangling: Vec<&&str> = all
            .iter()
            .filter(|r| {
                r.strip_prefix("#/definitions/")
                    .is_none_or(|name| !definitions.contains_key(name))
            })
            .collect();
        assert!(dangling.is_empty(), "references that resolve nowhere: {dangling:?}");
        // A client that takes only the protobuf form is told it is not served.
        let pb = api
            .request(Method::GET, "/openapi/v2")
            .header("accept", "application/com.github.proto-openapi.spec.v2@v1.0+protobuf")
            .send()
            .await
            .unwrap();
        assert_eq!(pb.status().as_u16(), 406);
        // Resources: JSON for a client that takes it beside protobuf (client-go's typed
        // clients), 406 for one that takes protobuf only.
        for (accept, code) in [
            ("application/vnd.kubernetes.protobuf, application/json", 200),
            ("application/vnd.kubernetes.protobuf", 406),
        ] {
            let answer = api
                .request(Method::GET, "/api/v1/namespaces/default")
                .header("accept", accept)
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status().as_u16(), code, "{accept}");
        }
    });
}

on_both_stores!(
    errors_are_statuses_with_reasons_and_writes_are_optimistic,
    cluster_ips_and_node_ports_are_unique_under_concurrency_and_across_restarts,
    watches_replay_follow_filter_bookmark_and_report_compaction,
    lists_page_selectors_subresources_and_deletion,
    discovery_answers_in_both_forms,
);

/// Reads one sample of the control plane's `/metrics` (0 when absent).
fn sample(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("/metrics parses as Prometheus text");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => h.last().map_or(0.0, |b| b.count),
            _ => 0.0,
        })
        .sum()
}

#[test]
fn metrics_count_requests_watches_store_operations_and_agents() {
    let cp = ControlPlane::start("embedded:{dir}", &["--disable-controllers"]);
    let api = Api::new(&cp);
    runtime().block_on(async {
        let metrics = || async {
            let (code, text) = {
                let resp = api.request(Method::GET, "/metrics").send().await.unwrap();
                (resp.status().as_u16(), resp.text().await.unwrap())
            };
            assert_eq!(code, 200, "{text}");
            text
        };
        let (code, _) = api
            .0
            .http
            .get(format!("{}/metrics", api.0.server))
            .send()
            .await
            .map(|r| (r.status().as_u16(), ()))
            .unwrap();
        assert_eq!(code, 401, "metrics need the token, as kube-apiserver's");

        for i in 0..3 {
            let (code, _) = api
                .call(Method::POST, PODS, Some(pod(&format!("m{i}"), json!({}))))
                .await;
            assert_eq!(code, 201);
        }
        api.call(Method::GET, PODS, None).await;
        let watch = api
            .request(Method::GET, &format!("{PODS}?watch=true"))
            .send()
            .await
            .unwrap();
        let (mut feed, _, _) = cp
            .process()
            .join(control_plane_api::feed::RegisterRequest {
                node_name: "n1".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let _stream = feed
            .watch(control_plane_api::feed::WatchRequest {
                node_name: "n1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();

        let text = metrics().await;
        let creates = sample(
            &text,
            "apiserver_request_total",
            &[("verb", "CREATE"), ("resource", "pods"), ("code", "201")],
        );
        assert_eq!(creates, 3.0, "{text}");
        assert!(
            sample(
                &text,
                "apiserver_request_total",
                &[("verb", "LIST"), ("resource", "pods")]
            ) >= 1.0
        );
        assert!(
            sample(
                &text,
                "apiserver_request_duration_seconds_count",
                &[("verb", "CREATE"), ("resource", "pods")]
            ) >= 3.0,
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "apiserver_longrunning_requests",
                &[("verb", "WATCH"), ("resource", "pods")]
            ),
            1.0,
            "{text}"
        );
        assert!(
            sample(
                &text,
                "keel_store_operation_duration_seconds_count",
                &[("operation", "create"), ("store", "embedded")]
            ) >= 3.0,
            "{text}"
        );
        assert_eq!(
            sample(&text, "keel_feed_agents_connected", &[]),
            1.0,
            "{text}"
        );

        drop(watch);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sample(
            &metrics().await,
            "apiserver_longrunning_requests",
            &[("resource", "pods")],
        ) != 0.0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "a closed watch stops counting"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}
