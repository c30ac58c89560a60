//! Authentication and authorization as kubectl users meet them: service account tokens from
//! `kubectl create token`, RBAC roles and bindings made with `kubectl create role|rolebinding`,
//! `kubectl auth whoami|can-i`, impersonation, the escalation checks, aggregated roles and
//! revocation, on both stores.

mod common;

use common::{ControlPlane, with_etcd};

/// kubectl as the holder of `token` (the kubeconfig's server and CA, another user).
fn as_token(cp: &ControlPlane, token: &str, args: &[&str]) -> std::process::Output {
    cp.kubectl(&[&["--token", token][..], args].concat())
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn rbac_scenario(cp: &ControlPlane) {
    cp.ok(&["create", "namespace", "team"]);
    cp.ok(&["create", "serviceaccount", "builder", "-n", "team"]);
    cp.ok(&["create", "serviceaccount", "reader", "-n", "team"]);
    let token = cp
        .ok(&["create", "token", "builder", "-n", "team"])
        .trim()
        .to_owned();
    assert_eq!(token.matches('.').count(), 2, "a JWT: {token}");

    // Who: the service account, in its groups.
    let me = as_token(cp, &token, &["auth", "whoami", "-o", "json"]);
    let me = stdout(&me);
    assert!(
        me.contains("\"username\": \"system:serviceaccount:team:builder\"")
            && me.contains("system:serviceaccounts:team")
            && me.contains("system:authenticated"),
        "{me}"
    );

    // Nothing is allowed until a role is bound.
    let denied = as_token(cp, &token, &["get", "pods", "-n", "team"]);
    assert!(!denied.status.success());
    assert!(
        stderr(&denied).contains(
            "pods is forbidden: User \"system:serviceaccount:team:builder\" cannot list resource \"pods\" in API group \"\" in the namespace \"team\""
        ),
        "{}",
        stderr(&denied)
    );
    let can = cp.kubectl(&[
        "auth",
        "can-i",
        "list",
        "pods",
        "-n",
        "team",
        "--as=system:serviceaccount:team:builder",
    ]);
    assert_eq!(stdout(&can), "no", "{}", stderr(&can));
    let metrics = as_token(cp, &token, &["get", "--raw", "/metrics"]);
    assert!(
        stderr(&metrics).contains("cannot get path \"/metrics\""),
        "{}",
        stderr(&metrics)
    );
    // Discovery is everyone's (system:discovery): kubectl finds the resources to ask for.
    assert!(stdout(&as_token(cp, &token, &["api-resources", "-o", "name"])).contains("pods"));

    // view in the namespace: reading there, nothing else.
    cp.ok(&[
        "create",
        "rolebinding",
        "builder-view",
        "--clusterrole=view",
        "--serviceaccount=team:builder",
        "-n",
        "team",
    ]);
    let pods = as_token(cp, &token, &["get", "pods", "-n", "team"]);
    assert!(pods.status.success(), "{}", stderr(&pods));
    // Its own namespace object is in the namespace, as in kube.
    let own = as_token(cp, &token, &["get", "namespace", "team"]);
    assert!(own.status.success(), "{}", stderr(&own));
    assert!(
        !as_token(cp, &token, &["get", "namespace", "default"])
            .status
            .success()
    );
    let elsewhere = as_token(cp, &token, &["get", "pods", "-n", "default"]);
    assert!(stderr(&elsewhere).contains("in the namespace \"default\""));
    let write = as_token(
        cp,
        &token,
        &[
            "create",
            "configmap",
            "x",
            "-n",
            "team",
            "--from-literal=a=b",
        ],
    );
    assert!(
        stderr(&write).contains("cannot create resource \"configmaps\""),
        "{}",
        stderr(&write)
    );
    let can = |args: &[&str]| stdout(&as_token(cp, &token, &[&["auth", "can-i"], args].concat()));
    assert_eq!(can(&["list", "pods", "-n", "team"]), "yes");
    assert_eq!(can(&["create", "configmaps", "-n", "team"]), "no");
    assert_eq!(can(&["get", "secrets", "-n", "team"]), "no");
    let list = can(&["--list", "-n", "team"]);
    assert!(
        list.contains("deployments.apps") && list.contains("[get list watch]"),
        "{list}"
    );

    // Aggregation: a ClusterRole labelled for view extends view at once.
    let widen = cp.file(
        "widen.yaml",
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: secret-peek\n  labels:\n    rbac.authorization.k8s.io/aggregate-to-view: \"true\"\nrules:\n- apiGroups: [\"\"]\n  resources: [\"secrets\"]\n  verbs: [\"get\"]\n",
    );
    cp.ok(&["apply", "-f", &widen]);
    assert_eq!(can(&["get", "secrets", "-n", "team"]), "yes");
    // ... and the aggregation controller writes it into view's rules, for kubectl to show.
    let view_shows_secrets = || {
        cp.ok(&[
            "get",
            "clusterrole",
            "view",
            "-o",
            "jsonpath={.rules[*].resources}",
        ])
        .contains("secrets")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !view_shows_secrets() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(view_shows_secrets(), "view's rules gathered secret-peek's");
    cp.ok(&["delete", "clusterrole", "secret-peek"]);
    assert_eq!(can(&["get", "secrets", "-n", "team"]), "no");

    // admin in the namespace may make roles, but not grant what it does not hold.
    cp.ok(&[
        "create",
        "rolebinding",
        "builder-admin",
        "--clusterrole=admin",
        "--serviceaccount=team:builder",
        "-n",
        "team",
    ]);
    let made = as_token(
        cp,
        &token,
        &[
            "create",
            "role",
            "pod-reader",
            "--verb=get",
            "--resource=pods",
            "-n",
            "team",
        ],
    );
    assert!(made.status.success(), "{}", stderr(&made));
    let bound = as_token(
        cp,
        &token,
        &[
            "create",
            "rolebinding",
            "reader-pods",
            "--role=pod-reader",
            "--serviceaccount=team:reader",
            "-n",
            "team",
        ],
    );
    assert!(bound.status.success(), "{}", stderr(&bound));
    let escalate = as_token(
        cp,
        &token,
        &[
            "create",
            "rolebinding",
            "sneaky",
            "--clusterrole=cluster-admin",
            "--serviceaccount=team:builder",
            "-n",
            "team",
        ],
    );
    assert!(
        stderr(&escalate).contains("is attempting to grant RBAC permissions not currently held"),
        "{}",
        stderr(&escalate)
    );
    let role = as_token(
        cp,
        &token,
        &[
            "create",
            "role",
            "node-deleter",
            "--verb=delete",
            "--resource=nodes",
            "-n",
            "team",
        ],
    );
    assert!(
        stderr(&role).contains("not currently held"),
        "{}",
        stderr(&role)
    );
    // A role too large to compare piece by piece is refused, not multiplied out.
    let many = |prefix: &str| {
        (0..400)
            .map(|i| format!("{prefix}{i}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let big = cp.file(
        "big.yaml",
        &format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: big\n  namespace: team\nrules:\n- apiGroups: [\"\"]\n  verbs: [{}]\n  resources: [{}]\n",
            many("v"),
            many("r")
        ),
    );
    let big = as_token(cp, &token, &["create", "-f", &big]);
    assert!(
        stderr(&big).contains("160000 verb/group/resource/name combinations"),
        "{}",
        stderr(&big)
    );
    // A binding's role never changes.
    let changed = cp.kubectl(&[
        "patch",
        "rolebinding",
        "reader-pods",
        "-n",
        "team",
        "--type=merge",
        "-p",
        "{\"roleRef\":{\"name\":\"admin\",\"kind\":\"ClusterRole\"}}",
    ]);
    assert!(
        stderr(&changed).contains("cannot change roleRef"),
        "{}",
        stderr(&changed)
    );
    // Nor may it act as someone else.
    let impersonate = as_token(
        cp,
        &token,
        &["get", "pods", "-n", "team", "--as=keel-admin"],
    );
    assert!(
        stderr(&impersonate).contains("cannot impersonate resource \"users\""),
        "{}",
        stderr(&impersonate)
    );

    // The reader's role: get pods, by the binding the builder made.
    let reader = cp
        .ok(&["create", "token", "reader", "-n", "team"])
        .trim()
        .to_owned();
    assert_eq!(
        stdout(&as_token(
            cp,
            &reader,
            &["auth", "can-i", "get", "pods", "-n", "team"]
        )),
        "yes"
    );
    assert_eq!(
        stdout(&as_token(
            cp,
            &reader,
            &["auth", "can-i", "list", "pods", "-n", "team"]
        )),
        "no"
    );

    // A token bound to a pod ends with it; a service account's ends with the account.
    cp.ok(&[
        "run",
        "holder",
        "--image=nginx:1.27",
        "-n",
        "team",
        "--restart=Never",
    ]);
    let bound_token = cp
        .ok(&[
            "create",
            "token",
            "reader",
            "-n",
            "team",
            "--bound-object-kind=Pod",
            "--bound-object-name=holder",
            "--duration=20m",
        ])
        .trim()
        .to_owned();
    let me = stdout(&as_token(
        cp,
        &bound_token,
        &["auth", "whoami", "-o", "json"],
    ));
    assert!(
        me.contains("authentication.kubernetes.io/pod-name") && me.contains("holder"),
        "{me}"
    );
    cp.ok(&[
        "delete",
        "pod",
        "holder",
        "-n",
        "team",
        "--grace-period=0",
        "--force",
    ]);
    let gone = as_token(cp, &bound_token, &["auth", "whoami"]);
    assert!(stderr(&gone).contains("Unauthorized"), "{}", stderr(&gone));
    let short = cp.kubectl(&["create", "token", "reader", "-n", "team", "--duration=5m"]);
    assert!(
        stderr(&short).contains("may not specify a duration less than 10 minutes"),
        "{}",
        stderr(&short)
    );
    cp.ok(&["delete", "serviceaccount", "builder", "-n", "team"]);
    let revoked = as_token(cp, &token, &["get", "pods", "-n", "team"]);
    assert!(
        stderr(&revoked).contains("Unauthorized"),
        "{}",
        stderr(&revoked)
    );
    let forged = format!("{}x", &token[..token.len() - 1]);
    assert!(stderr(&as_token(cp, &forged, &["auth", "whoami"])).contains("Unauthorized"));

    // kube-proxy's role: what a node agent fed by a kubeconfig needs, cluster-wide, and no
    // more.
    cp.ok(&["create", "serviceaccount", "proxy", "-n", "kube-system"]);
    cp.ok(&[
        "create",
        "clusterrolebinding",
        "keel-proxy",
        "--clusterrole=system:node-proxier",
        "--serviceaccount=kube-system:proxy",
    ]);
    let proxy = cp
        .ok(&["create", "token", "proxy", "-n", "kube-system"])
        .trim()
        .to_owned();
    let proxy_can =
        |args: &[&str]| stdout(&as_token(cp, &proxy, &[&["auth", "can-i"], args].concat()));
    assert_eq!(
        proxy_can(&["watch", "endpointslices.discovery.k8s.io", "-A"]),
        "yes"
    );
    assert_eq!(proxy_can(&["list", "services", "-A"]), "yes");
    assert_eq!(proxy_can(&["get", "nodes"]), "yes");
    assert_eq!(proxy_can(&["list", "secrets", "-A"]), "no");

    // The defaults kubectl users expect are there.
    let roles = cp.ok(&["get", "clusterroles", "-o", "name"]);
    for role in [
        "cluster-admin",
        "admin",
        "edit",
        "view",
        "system:discovery",
        "system:node-proxier",
    ] {
        assert!(
            roles.contains(&format!("clusterrole.rbac.authorization.k8s.io/{role}\n")),
            "{roles}"
        );
    }
}

#[test]
fn rbac_on_the_embedded_store() {
    let cp = ControlPlane::start("embedded:{dir}", &[]);
    rbac_scenario(&cp);
}

#[test]
fn rbac_on_etcd() {
    with_etcd(|endpoint| {
        let cp = ControlPlane::start(&format!("etcd:{endpoint}"), &[]);
        rbac_scenario(&cp);
    });
}
