"""The official Kubernetes Python client against the control plane, unmodified.

Run by control-plane/tests/clients.rs with KUBECONFIG pointing at a running control plane whose
history is compacted every second. Exits non-zero (with the reason) on the first failure.
"""
import sys
import time

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

NS = "py-client"


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def pod(name, labels):
    # Left to a scheduler that does not run here, the pods stay as this test writes them: no
    # control loop writes beside it (the same as kube-scheduler ignoring another's pods).
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(
            containers=[client.V1Container(name="c", image="busybox:1.36")],
            scheduler_name="py-test-scheduler",
        ),
    )


def main():
    config.load_kube_config()
    core = client.CoreV1Api()
    apps = client.AppsV1Api()

    names = [ns.metadata.name for ns in core.list_namespace().items]
    check("default" in names and "kube-system" in names, f"default namespaces are listed: {names}")
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))

    # Create, then list with a label selector: typed objects come back (no nulls where the
    # client requires values).
    core.create_namespaced_pod(NS, pod("a", {"app": "web"}))
    core.create_namespaced_pod(NS, pod("b", {"app": "api"}))
    web = core.list_namespaced_pod(NS, label_selector="app=web")
    check([p.metadata.name for p in web.items] == ["a"], "label selector picks pod a")
    check(web.items[0].spec.containers[0].image == "busybox:1.36", "the pod reads back typed")
    check(web.items[0].status.phase == "Pending", "a new pod is Pending")

    # Pagination.
    page = core.list_namespaced_pod(NS, limit=1)
    check(len(page.items) == 1 and page.metadata._continue, "a page of one with a continue token")
    rest = core.list_namespaced_pod(NS, limit=1, _continue=page.metadata._continue)
    check(len(rest.items) == 1 and rest.items[0].metadata.name != page.items[0].metadata.name, "the next page")

    # Watch: from a listed resourceVersion, changes arrive in order.
    listed = core.list_namespaced_pod(NS)
    rv = listed.metadata.resource_version
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"stage": "1"}}})
    core.delete_namespaced_pod("b", NS)
    w = watch.Watch()
    seen = []
    for event in w.stream(core.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=5):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 2:
            w.stop()
    check(seen == [("MODIFIED", "a"), ("DELETED", "b")], f"watch delivers the changes: {seen}")

    # Updates with conflicts: a stale resourceVersion gets 409 Conflict.
    current = core.read_namespaced_pod("a", NS)
    stale = current.metadata.resource_version
    current.metadata.labels["stage"] = "2"
    core.replace_namespaced_pod("a", NS, current)
    current.metadata.labels["stage"] = "3"
    current.metadata.resource_version = stale
    try:
        core.replace_namespaced_pod("a", NS, current)
        check(False, "a stale update must conflict")
    except ApiException as e:
        check(e.status == 409, f"a stale update gets 409 Conflict ({e.status} {e.reason})")
    # The usual answer: read again and retry.
    fresh = core.read_namespaced_pod("a", NS)
    fresh.metadata.labels["stage"] = "3"
    updated = core.replace_namespaced_pod("a", NS, fresh)
    check(updated.metadata.labels["stage"] == "3", "the retry on the latest version succeeds")

    # Watching from a compacted resourceVersion: 410 Gone, then recover by relisting.
    old_rv = core.list_namespaced_pod(NS).metadata.resource_version
    for i in range(3):
        core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"tick": str(i)}}})
    time.sleep(2.5)  # the control plane compacts every second, to the previous tick's revision
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"tick": "x"}}})
    time.sleep(1.5)
    gone = None
    try:
        for _ in watch.Watch().stream(core.list_namespaced_pod, NS, resource_version=old_rv, timeout_seconds=5):
            pass
    except ApiException as e:
        gone = e.status
    check(gone == 410, f"watching from a compacted version fails with 410 Gone (got {gone})")
    relisted = core.list_namespaced_pod(NS)
    w = watch.Watch()
    core.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"after": "relist"}}})
    recovered = None
    for event in w.stream(core.list_namespaced_pod, NS, resource_version=relisted.metadata.resource_version, timeout_seconds=5):
        if event["object"].metadata.labels.get("after") == "relist":
            recovered = event["type"]
            w.stop()
    check(recovered == "MODIFIED", "after relisting, the watch resumes")

    # Apps: a Deployment through the typed client, scaled through the scale subresource.
    body = client.V1Deployment(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels={"app": "web"}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": "web"}),
                spec=client.V1PodSpec(containers=[client.V1Container(name="web", image="nginx:1.27")]),
            ),
        ),
    )
    apps.create_namespaced_deployment(NS, body)
    apps.patch_namespaced_deployment_scale("web", NS, {"spec": {"replicas": 4}})
    check(apps.read_namespaced_deployment("web", NS).spec.replicas == 4, "scaled to 4 through /scale")
    try:
        apps.create_namespaced_deployment(NS, body)
        check(False, "a second create must fail")
    except ApiException as e:
        check(e.status == 409, "creating an existing name gets 409 AlreadyExists")
    print("all Python client checks passed")


if __name__ == "__main__":
    main()
