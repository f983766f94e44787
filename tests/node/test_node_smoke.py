"""The test node itself (hack/node.py): pods run, Services route, DNS resolves, pods reach the API
server and the host, claims bind, and stopping the node leaves the host clean.

Everything in containers from the small image built here (`node_image`); a pod's own output is in
each failure message.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from typing import Any

import localenv
import pytest

import node as nodemod
from conftest import Kubectl, wait_until

pytestmark = [pytest.mark.node, pytest.mark.cluster]


@pytest.fixture
def control_plane(node_control_plane: localenv.ControlPlane) -> localenv.ControlPlane:
    """The node's cluster: `namespace` and `kubectl` follow it."""
    return node_control_plane


def pod_manifest(name: str, image: str, script: str, mounts: list[dict[str, Any]] | None = None,
                 **spec: Any) -> dict[str, Any]:  # fmt: skip
    container = {"name": "main", "image": image, "command": ["bash", "-c", script], "volumeMounts": mounts or []}
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [container], **spec},
    }  # fmt: skip


def wait_service_account(k: Kubectl) -> None:
    """Pods are refused until the controller-manager has made the namespace's `default` ServiceAccount."""
    wait_until(lambda: k.cp.kubectl_run("-n", k.namespace, "get", "sa", "default").returncode == 0,
               timeout=30, what="default ServiceAccount")  # fmt: skip


def run_pod(k: Kubectl, name: str, image: str, script: str, timeout: float = 90,
            mounts: list[dict[str, Any]] | None = None, **spec: Any) -> str:  # fmt: skip
    """Run `script` with bash in a pod to completion; its log. Fails with the log unless it succeeded."""
    wait_service_account(k)
    k.apply(pod_manifest(name, image, script, mounts, **spec))

    def finished() -> str | None:
        phase = k.get("pod", name).get("status", {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_until(finished, timeout=timeout, what=f"pod {name} to finish")
    log = k.run("logs", name, check=False)
    assert phase == "Succeeded", f"pod {name} {phase}:\n{log}\n{json.dumps(k.get('pod', name)['status'], indent=1)}"
    return log


def test_job_runs_to_completion(node: nodemod.Node, node_image: str, kubectl: Kubectl) -> None:
    wait_service_account(kubectl)
    kubectl.apply({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "hello"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": node_image,
                            "command": ["bash", "-c", "echo hello from $(hostname) as $(id -u)"]}]}}},
    })  # fmt: skip
    started = time.monotonic()
    kubectl.wait("job", "hello", "Complete", timeout=90)
    elapsed = time.monotonic() - started
    log = kubectl.run("logs", "job/hello")
    assert log.startswith("hello from hello-") and log.strip().endswith("as 0"), log
    print(f"job complete after {elapsed:.1f}s")


def test_service_from_host_and_from_a_pod_by_name(node: nodemod.Node, node_image: str, kubectl: Kubectl) -> None:
    wait_service_account(kubectl)
    kubectl.apply({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}}, "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "httpd", "image": node_image, "ports": [{"containerPort": 8080}],
                "command": ["bash", "-c", "mkdir -p /www && hostname > /www/index.html && "
                                          "exec busybox httpd -f -p 8080 -h /www"],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}}},
    })  # fmt: skip
    kubectl.apply({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    })  # fmt: skip
    kubectl.wait("deployment", "web", "Available", timeout=90)
    ip = kubectl.get("service", "web")["spec"]["clusterIP"]
    assert ip.startswith("198.18.1"), ip  # from SERVICE_CIDR 198.18.128.0/20

    def from_host() -> str:
        try:
            return str(urllib.request.urlopen(f"http://{ip}/", timeout=2).read().decode())
        except OSError:
            return ""  # about 1 s of "No route to host" until kube-proxy has synced

    served = {wait_until(from_host, timeout=30, what=f"http://{ip}/ from the host").strip() for _ in range(10)}
    pods = json.loads(kubectl.run("get", "pods", "-l", "app=web", "-o", "json"))["items"]
    assert served <= {p["metadata"]["name"] for p in pods}, served
    log = run_pod(kubectl, "client", node_image,
                  f"getent hosts web.{kubectl.namespace}.svc.cluster.local && "
                  "for i in $(seq 20); do curl -sf http://web/ && exit 0; sleep 0.5; done; exit 1")  # fmt: skip
    assert log.splitlines()[0].split()[0] == ip, log
    assert log.splitlines()[-1].startswith("web-"), log
    # kubectl exec and logs go through the API server to the kubelet at the node's InternalIP.
    out = kubectl.run("exec", "deploy/web", "--", "cat", "/www/index.html")
    assert out.startswith("web-"), out


def test_pod_calls_the_api_server_with_its_service_account_token(node: nodemod.Node, node_image: str,
                                                                  kubectl: Kubectl) -> None:  # fmt: skip
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    body = '{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}'
    log = run_pod(kubectl, "whoami", node_image,
                  f"curl -sS --fail-with-body --cacert {sa}/ca.crt -H \"Authorization: Bearer $(cat {sa}/token)\" "
                  f"-H 'Content-Type: application/json' -X POST -d '{body}' "
                  "https://kubernetes.default.svc/apis/authentication.k8s.io/v1/selfsubjectreviews")  # fmt: skip
    review = json.loads(log)
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{kubectl.namespace}:default", log


def test_pod_reaches_a_listener_on_the_host(node: nodemod.Node, node_image: str, kubectl: Kubectl) -> None:
    """Servers on the host side (Postgres, the S3 server) are reachable from pods at HOST_IP, without NAT."""
    peers: list[str] = []
    with socket.socket() as server:
        server.bind((nodemod.HOST_IP, 0))
        server.listen()
        server.settimeout(90)
        port = server.getsockname()[1]

        def serve() -> None:
            conn, addr = server.accept()
            with conn:
                peers.append(addr[0])
                conn.sendall(b"hello from the host\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        log = run_pod(kubectl, "caller", node_image,
                      f"hostname -i; exec 3<>/dev/tcp/{nodemod.HOST_IP}/{port} && cat <&3")  # fmt: skip
        thread.join(5)
    pod_ip, greeting = log.split("\n", 1)
    assert greeting.strip() == "hello from the host", log
    assert peers == [pod_ip.strip()], (peers, log)  # the pod's own address: routed, not masqueraded


def test_claim_binds_and_its_volume_is_recycled(node: nodemod.Node, node_image: str, kubectl: Kubectl) -> None:
    """A claim without a class gets the default one and binds a static volume that a non-root pod can
    write (Postgres runs as 999); once the claim is gone the volume is wiped and Available again."""
    kubectl.apply({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "5Gi"}}},
    })  # fmt: skip
    wait_until(lambda: kubectl.get("pvc", "data").get("status", {}).get("phase") == "Bound", timeout=30,
               what="claim Bound")  # fmt: skip
    claim = kubectl.get("pvc", "data")
    assert claim["spec"]["storageClassName"] == nodemod.STORAGE_CLASS
    volume = claim["spec"]["volumeName"]
    script = "mkdir /data/pgdata && echo kept > /data/pgdata/f && cat /data/pgdata/f"
    log = run_pod(kubectl, "writer", node_image, script,
                  mounts=[{"name": "data", "mountPath": "/data"}],
                  securityContext={"runAsUser": 999, "runAsGroup": 999},
                  volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}])  # fmt: skip
    assert log.split() == ["kept"], log
    kubectl.run("delete", "pod", "writer", "--wait=true")
    kubectl.run("delete", "pvc", "data", "--wait=true")

    def recycled() -> bool:
        pv = json.loads(kubectl.cp.kubectl_run("get", "pv", volume, "-o", "json", check=True).stdout)
        return bool(pv["status"]["phase"] == "Available")

    wait_until(recycled, timeout=30, what=f"{volume} Available again")


def test_stop_leaves_the_host_clean(node: nodemod.Node, node_image: str, control_plane: localenv.ControlPlane,
                                    kubectl: Kubectl) -> None:  # fmt: skip
    """With a pod running (overlay, shm, secret tmpfs, netns mounts, cgroups, shim), stop() leaves nothing;
    the node then starts again for the tests that follow."""
    wait_service_account(kubectl)
    kubectl.apply(pod_manifest("sleeper", node_image, "sleep 600"))
    kubectl.wait("pod", "sleeper", "Ready", timeout=60)
    assert node.leftovers(), "a running node should be visible to leftovers()"
    started = time.monotonic()
    node.stop()
    stopped = time.monotonic() - started
    assert node.leftovers() == []
    node.start()
    print(f"stop {stopped:.1f}s, start again {node.timings['start']:.1f}s")
    kubectl.run("delete", "pod", "sleeper", "--wait=false")
    assert node_image in node.images()
