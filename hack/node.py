"""A real Kubernetes node beside the local control plane: pods run in containers.

containerd and runc from Debian; kubelet, kube-proxy, kube-scheduler and CoreDNS built from the
pinned Go modules (hack/build-node.sh); a CNI bridge; images built on this machine and imported
(no registry is reachable). Facts, flags and the errors they avoid: ../shared/notes/real-node.md.

Network layout (fixed; one node per machine, serialised by an exclusive lock on LOCK_FILE):

    host (tests, kubectl, operator,           network namespace NETNS "pgscale-node"
          kube-apiserver on 0.0.0.0,          (containerd, kubelet, kube-proxy, CoreDNS
          Postgres, S3 server)                 run in it; started with nsenter --net)
    pgs-host 198.18.0.1/30  <──── veth ────>  pgs-node 198.18.0.2/30  = the node's InternalIP
    route 198.18.1.0/24   via 198.18.0.2      default via 198.18.0.1
    route 198.18.128.0/20 via 198.18.0.2      bridge pgs-cni0 198.18.1.1/24 (CNI bridge, host-local
                                                IPAM, portmap): pods get 198.18.1.2 ...
                                              kube-proxy (iptables) DNATs Service IPs

- Pod CIDR 198.18.1.0/24; Service CIDR 198.18.128.0/20 (localenv.SERVICE_CIDR): the
  `kubernetes` Service is 198.18.128.1 and points at the API server on 198.18.0.1; the
  `kube-dns` Service (kube-system) is 198.18.128.10 with a hand-made EndpointSlice pointing at
  CoreDNS on 198.18.0.2:53 (a host process in the namespace, `kubernetes` plugin).
- The host reaches pods and ClusterIPs through the two routes; pods reach servers on the host
  side (the API server, Postgres, the S3 server) at 198.18.0.1, so those must listen there
  (0.0.0.0 or 198.18.0.1), not on 127.0.0.1 alone. Names outside cluster.local do not resolve.
- Storage: a default StorageClass "standard" (no provisioner, Immediate binding) and VOLUMES
  static hostPath PersistentVolumes of 100Gi (nominal: hostPath is not limited) under the node's
  directory; a released volume is wiped and made Available again by a recycler thread.
- Images: the sandbox image PAUSE_IMAGE is built here from hack/pause; `Node.import_image`
  loads any OCI archive (hack/ociarchive.py); `test_image()` is a small Debian image for tests.

Everything lives under `<workdir>/node` except what the daemons write to fixed places (the
note lists them): OUTSIDE_PATHS, the `kubepods` cgroups in every hierarchy and the
kernel settings the kubelet changes (KERNEL_TUNABLES, restored on stop). `Node.stop()`
removes all of it, `leftovers()` checks, and `Node.start()` first cleans up after a run that
died without stopping (its directory and settings are recorded in STATE_FILE).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import localenv
import ociarchive

ROOT = localenv.ROOT
NETNS = "pgscale-node"
NETNS_DIR = Path("/run/netns")  # `ip netns` bind-mounts it onto itself the first time
NETNS_PATH = NETNS_DIR / NETNS
HOST_LINK, NODE_LINK = "pgs-host", "pgs-node"
HOST_IP = localenv.HOST_IP  # 198.18.0.1
NODE_IP = "198.18.0.2"
LINK_PREFIX = 30
POD_CIDR = "198.18.1.0/24"
BRIDGE = "pgs-cni0"
SERVICE_CIDR = localenv.SERVICE_CIDR  # 198.18.128.0/20
DNS_IP = "198.18.128.10"
HOST_ROUTES = (POD_CIDR, SERVICE_CIDR)
NODE_NAME = "pgscale-node"
CNI_NETWORK = "pgscale"
CNI_BIN = Path("/usr/lib/cni")
PAUSE_IMAGE = "pgscale.local/pause:1"
TEST_IMAGE = "pgscale.local/node-test:1"
STORAGE_CLASS = "standard"
VOLUMES = 8
VOLUME_LABEL = "pgscale.io/node-volume"
LOCK_FILE = Path("/run/pgscale-node.lock")
STATE_FILE = Path("/run/pgscale-node.json")
_XDG_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
CACHE = Path(os.environ.get("PGSCALE_CACHE", _XDG_CACHE / "pgscale"))  # as hack/build-*.sh
# Written by the kubelet, containerd and libcni whatever their configured directories are.
OUTSIDE_PATHS = (Path("/var/lib/kubelet/device-plugins"), Path("/var/log/containers"), Path("/var/log/pods"),
                 Path("/run/containerd/s"), Path("/run/containerd/fifo"), Path("/run/containerd/runc"),
                 Path("/var/lib/cni/results"))  # fmt: skip
OUTSIDE_PARENTS = (Path("/var/lib/kubelet"), Path("/run/containerd"), Path("/var/lib/cni"))  # removed when empty
# Set by the kubelet at start (host-wide, not per network namespace); restored on stop.
KERNEL_TUNABLES = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")  # fmt: skip
# The kubelet puts every pod under kubepods (cgroupfs driver). A /k8s.io cgroup is what `ctr run` makes
# for containerd's k8s.io namespace: another containerd's (the image builds'), never touched here.
CGROUP_ROOTS = ("kubepods",)
DAEMONS = ("kube-scheduler", "containerd", "kubelet", "kube-proxy", "coredns")


def node_bin() -> Path:
    """The cached node binaries (kubelet, kube-proxy, kube-scheduler, coredns, pause), built on first use."""
    out = subprocess.run([str(ROOT / "hack" / "build-node.sh")], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


MIN_FREE_BYTES = 4 * 2**30


def unsupported() -> str | None:
    """Why this machine cannot run the node, or None when it can."""
    if os.geteuid() != 0:
        return "the node needs root (network namespaces, mounts, cgroups); run the tests as root"
    for tool in ("ip", "nsenter", "containerd", "ctr", "runc", "iptables", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (hack/setup.sh installs containerd, runc, iptables)"
    for plugin in ("bridge", "host-local", "portmap", "loopback"):
        if not (CNI_BIN / plugin).exists():
            return f"CNI plugin {CNI_BIN / plugin} is missing (Debian package containernetworking-plugins)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay filesystem (containerd's snapshotter)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    if not Path("/sys/fs/cgroup/memory").is_dir() and not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "no memory cgroup (the kubelet needs one)"
    return None


def _run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _in_netns(*args: str) -> list[str]:
    """argv that runs `args` in the node's network namespace and the host's mount namespace
    (`ip netns exec` would give the kubelet a private /sys and mount namespace)."""
    return ["nsenter", f"--net={NETNS_PATH}", "--", *args]


# ---------------------------------------------------------------------------------------------- images


def pause_archive(bindir: Path) -> Path:
    """The sandbox image (the pause binary alone), cached by the binary's content."""
    binary = bindir / "pause"
    key = hashlib.sha256(binary.read_bytes() + f"{PAUSE_IMAGE} {ociarchive.FORMAT_VERSION}".encode()).hexdigest()[:16]
    out = CACHE / "images" / f"node-pause-{key}.tar"
    if not out.exists():
        tmp = out.parent / f".pause-rootfs-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            shutil.copy2(binary, tmp / "pause")
            ociarchive.write_oci_archive(tmp, out, PAUSE_IMAGE, entrypoint=["/pause"], user="65535:65535")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


TEST_IMAGE_PACKAGES = ("curl", "busybox", "iproute2", "netcat-openbsd")


def test_image() -> tuple[Path, str]:
    """A small Debian image for the node's own tests (minbase plus curl, busybox for `httpd`, iproute2,
    netcat): its archive and name (TEST_IMAGE). Built with mmdebstrap once, cached by its inputs."""
    mirror = os.environ.get("PGSCALE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    inputs = json.dumps([TEST_IMAGE, "bookworm", mirror, TEST_IMAGE_PACKAGES, ociarchive.FORMAT_VERSION])
    key = hashlib.sha256(inputs.encode()).hexdigest()[:16]
    out = CACHE / "images" / f"node-test-{key}.tar"
    if out.exists():
        return out, TEST_IMAGE
    out.parent.mkdir(parents=True, exist_ok=True)
    rootfs = out.parent / f".node-test-rootfs-{os.getpid()}.tar"
    try:
        _run("mmdebstrap", "--variant=minbase", "--quiet", f"--include={','.join(TEST_IMAGE_PACKAGES)}",
             "--dpkgopt=path-exclude=/usr/share/{doc,man,locale}/*", "bookworm", str(rootfs), mirror,
             timeout=900)  # fmt: skip
        ociarchive.write_oci_archive(rootfs, out, TEST_IMAGE, cmd=["/bin/bash"])
    finally:
        rootfs.unlink(missing_ok=True)
    return out, TEST_IMAGE


# ---------------------------------------------------------------------------------------------- the node


class Node:
    """One node named NODE_NAME registered with `cp`: containerd, kubelet, kube-proxy and CoreDNS in
    the network namespace, kube-scheduler on the host. `start()` takes the machine-wide lock and
    returns when the node is Ready, DNS answers and the volumes exist; `stop()` leaves the host as
    it was (see leftovers()). It can be started again after a stop; containerd keeps its images.
    `timings` holds, after start(), the seconds from its beginning until each part was up, and the
    duration of each image import."""

    def __init__(self, workdir: Path, cp: localenv.ControlPlane, *, bindir: Path | None = None,
                 volumes: int = VOLUMES) -> None:  # fmt: skip
        self.dir = workdir / "node"
        self.cp = cp
        self.bin = bindir or node_bin()
        self.volumes = volumes
        self.logs = self.dir / "logs"
        self.kubeconfig = self.dir / "kubeconfig"  # admin, server https://198.18.0.1:<port>
        self.socket = self.dir / "containerd" / "containerd.sock"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.imported: list[Path] = []
        self.timings: dict[str, float] = {}
        self._lock: IO[str] | None = None
        self._tunables: dict[str, str] = {}
        self._recycler: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle

    def start(self) -> Node:
        reason = unsupported()
        if reason:
            raise RuntimeError(f"cannot run the node here: {reason}")
        if self._lock is not None:
            raise RuntimeError("the node is running already")
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        if free < MIN_FREE_BYTES:
            # Seen on a shared machine: with the disk nearly full the kubelet's eviction manager deletes
            # "unused" images (the pause image among them) and pods hang in ContainerCreating.
            raise RuntimeError(
                f"only {free / 2**30:.1f} GiB free under {self.dir}; the node needs {MIN_FREE_BYTES / 2**30:.0f} GiB "
                "(images, volumes, pod logs): free some space first"
            )
        t0 = time.monotonic()
        self.timings = {}
        self._take_lock()
        try:
            stale = _read_state()
            if stale or NETNS_PATH.exists() or _link_exists(HOST_LINK):
                sys.stderr.write(f"node: cleaning up after a node that did not stop ({stale or NETNS})\n")
                _cleanup(Path(stale["dir"]) if stale else None, dict(stale.get("tunables", {})) if stale else {})
            self._tunables = {k: _sysctl(k) for k in KERNEL_TUNABLES}
            # Fresh state; containerd's root (content, snapshots) stays, so a restart needs no re-import
            # (a new session has a new directory), and so do the volumes and the logs.
            for sub in ("containerd/state", "kubelet", "cni", "run"):
                shutil.rmtree(self.dir / sub, ignore_errors=True)
            self.logs.mkdir(parents=True, exist_ok=True)
            _write_state({"dir": str(self.dir), "tunables": self._tunables, "pid": os.getpid()})
            self._network()
            self.timings["network"] = time.monotonic() - t0
            self.cp.admin_kubeconfig(self.kubeconfig, HOST_IP)
            self._write_configs()
            self._start_containerd()
            self.import_image(pause_archive(self.bin), remember=False)
            for archive in list(self.imported):
                self.import_image(archive, remember=False)
            self.timings["containerd"] = time.monotonic() - t0
            self._cluster_objects()
            self._start_scheduler()
            self._start_kubelet()
            self.timings["kubelet"] = time.monotonic() - t0
            self._start_proxy_and_dns()
            self._recycler = threading.Thread(target=self._recycle_volumes, name="pv-recycler", daemon=True)
            self._stopping.clear()
            self._recycler.start()
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop every daemon and pod, unmount, delete the namespace, links, routes, cgroups and what the
        daemons wrote outside the node's directory, restore the kernel settings; release the lock."""
        with _signals_deferred():
            self._stopping.set()
            if self._recycler is not None:
                self._recycler.join(timeout=10)
                self._recycler = None
            if self._lock is None:
                return
            try:
                # Clients first (the kubelet would restart what is killed), then containerd; containers
                # and shims are killed by _cleanup (going through containerd took 10 s for one pod).
                for name in ("kube-scheduler", "kubelet", "kube-proxy", "coredns", "containerd"):
                    localenv._stop(self.procs.pop(name, None), timeout=15)
                _cleanup(self.dir, self._tunables)
                STATE_FILE.unlink(missing_ok=True)
            finally:
                self._release_lock()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def leftovers(self) -> list[str]:
        """What the node left on the host (empty after stop())."""
        return leftovers(self.dir, self._tunables)

    # -- images

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """ctr against the node's containerd, in the CRI's namespace k8s.io."""
        return _run("ctr", f"--address={self.socket}", "--namespace=k8s.io", *args, check=check, timeout=timeout)

    def import_image(self, archive: Path | str, *, remember: bool = True) -> None:
        """Load an OCI or docker image archive into containerd (unpacked), under the name it carries.
        Imported images are never pulled: give pods `imagePullPolicy: IfNotPresent` (or Never) and
        a tag other than :latest. Remembered images are imported again when the node restarts."""
        archive = Path(archive)
        t0 = time.monotonic()
        ref = ociarchive.read_ref(archive)
        if ref is None or self._image_digests().get(ref[0]) != ref[1]:
            self.ctr("images", "import", str(archive))
            self.timings[f"import {archive.name}"] = time.monotonic() - t0
        if remember and archive not in self.imported:
            self.imported.append(archive)

    def images(self) -> list[str]:
        """Names of the images containerd holds (k8s.io namespace)."""
        return [name for name in self._image_digests() if not name.startswith("sha256:")]

    def _image_digests(self) -> dict[str, str]:
        rows = self.ctr("images", "ls").stdout.splitlines()[1:]  # REF TYPE DIGEST SIZE PLATFORMS LABELS
        return {row.split()[0]: row.split()[2] for row in rows if len(row.split()) > 2}

    # -- internals

    def _take_lock(self) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        fh = LOCK_FILE.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            sys.stderr.write(f"node: waiting for the node of another session ({LOCK_FILE}, pid {holder})\n")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock = fh

    def _release_lock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.truncate(0)
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _network(self) -> None:
        _run("ip", "netns", "add", NETNS)
        _run("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", NODE_LINK, "netns", NETNS)
        _run("ip", "addr", "add", f"{HOST_IP}/{LINK_PREFIX}", "dev", HOST_LINK)
        _run("ip", "link", "set", HOST_LINK, "up")
        _run("ip", "-n", NETNS, "addr", "add", f"{NODE_IP}/{LINK_PREFIX}", "dev", NODE_LINK)
        _run("ip", "-n", NETNS, "link", "set", NODE_LINK, "up")
        _run("ip", "-n", NETNS, "link", "set", "lo", "up")
        _run("ip", "-n", NETNS, "route", "add", "default", "via", HOST_IP)
        for cidr in HOST_ROUTES:
            _run("ip", "route", "add", cidr, "via", NODE_IP, "dev", HOST_LINK)
        # Per namespace: forward between the bridge and the link; bridged pod-to-pod Service traffic
        # passes iptables (kube-proxy's DNAT), so replies are un-NATed.
        _run(*_in_netns("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1"))

    def _write_configs(self) -> None:
        d = self.dir
        for sub in ("containerd/root", "containerd/state", "cni/net.d", "cni/ipam", "kubelet/root", "kubelet/pki",
                    "kubelet/pod-logs", "kubelet/volume-plugins", "run/runc", "opt", "volumes"):  # fmt: skip
            (d / sub).mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (d / "containerd" / "config.toml").write_text(f"""version = 2
root = "{d / "containerd/root"}"
state = "{d / "containerd/state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: without this every sandbox fails (oom_score_adj -998).
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d / "run/runc"}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{d / "cni/net.d"}"
    max_conf_num = 1
""")  # fmt: skip
        conflist = {
            "cniVersion": "1.0.0", "name": CNI_NETWORK,
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(d / "cni/ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }  # fmt: skip
        (d / "cni/net.d/10-pgscale.conflist").write_text(json.dumps(conflist, indent=1))
        # Pods with dnsPolicy Default (and the kubelet's own view) resolve through CoreDNS too.
        (d / "kubelet/resolv.conf").write_text(f"nameserver {NODE_IP}\n")
        (d / "kubelet/config.yaml").write_text(f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
failSwapOn: false
failCgroupV1: false
containerRuntimeEndpoint: unix://{self.socket}
clusterDNS: [{DNS_IP}]
clusterDomain: cluster.local
resolvConf: {d / "kubelet/resolv.conf"}
podLogsDir: {d / "kubelet/pod-logs"}
volumePluginDir: {d / "kubelet/volume-plugins"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%,
               imagefs.available: 1%, imagefs.inodesFree: 1%}}
serializeImagePulls: false
shutdownGracePeriod: 0s
shutdownGracePeriodCriticalPods: 0s
nodeStatusUpdateFrequency: 5s
syncFrequency: 10s
fileCheckFrequency: 10s
""")  # fmt: skip
        (d / "kube-proxy.yaml").write_text(f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {self.kubeconfig}}}
hostnameOverride: {NODE_NAME}
bindAddress: {NODE_IP}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
mode: iptables
clusterCIDR: {POD_CIDR}
nodePortAddresses: [primary]
iptables: {{minSyncPeriod: 0s, syncPeriod: 30s}}
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
""")  # fmt: skip
        (d / "Corefile").write_text(f""".:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.kubeconfig} pgscale-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
}}
""")  # fmt: skip

    def _spawn(self, name: str, args: list[str], *, netns: bool = True) -> subprocess.Popen[bytes]:
        proc = localenv._spawn(_in_netns(*args) if netns else args, self.logs / f"{name}.log")
        self.procs[name] = proc
        return proc

    def _wait(self, name: str, check: object, timeout: float = 60) -> None:
        localenv.wait_for(name, check, timeout=timeout, proc=self.procs[name], log=self.logs / f"{name}.log")

    def _start_containerd(self) -> None:
        self._spawn("containerd", ["containerd", "--config", str(self.dir / "containerd/config.toml")])
        self._wait("containerd", lambda: self.ctr("version", timeout=5).returncode == 0)

    def _cluster_objects(self) -> None:
        """kube-dns Service and its EndpointSlice, the default StorageClass and the volumes."""
        docs: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
             "spec": {"clusterIP": DNS_IP, "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                                                     {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "kube-dns-coredns", "namespace": "kube-system",
                          "labels": {"kubernetes.io/service-name": "kube-dns",
                                     "endpointslice.kubernetes.io/managed-by": "node.pgscale.io"}},
             "addressType": "IPv4",
             "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}, "nodeName": NODE_NAME}],
             "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                       {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]},
            {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
             "metadata": {"name": STORAGE_CLASS,
                          "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
             "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate",
             "reclaimPolicy": "Retain"},
        ]  # fmt: skip
        for i in range(self.volumes):
            path = self.dir / "volumes" / f"pv-{i}"
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)  # hostPath ignores fsGroup: any pod user may write (Postgres runs as 999)
            docs.append({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": f"{NODE_NAME}-pv-{i}", "labels": {VOLUME_LABEL: "true"}},
                "spec": {"capacity": {"storage": "100Gi"}, "storageClassName": STORAGE_CLASS,
                         "accessModes": ["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany"],
                         "persistentVolumeReclaimPolicy": "Retain", "volumeMode": "Filesystem",
                         "hostPath": {"path": str(path), "type": "Directory"}},
            })  # fmt: skip
        text = "\n---\n".join(json.dumps(doc) for doc in docs)
        self.cp.kubectl_run("apply", "--server-side", "--force-conflicts", "--field-manager=pgscale-node",
                            "-f", "-", input=text, check=True)  # fmt: skip

    def _start_scheduler(self) -> None:
        port = localenv.free_port()
        # Its kubeconfig lies in the node's directory, so a scheduler left by a run that died is found by it.
        kubeconfig = self.cp.admin_kubeconfig(self.dir / "scheduler.kubeconfig", "127.0.0.1")
        self._spawn("kube-scheduler", [
            str(self.bin / "kube-scheduler"), f"--kubeconfig={kubeconfig}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={port}", "--v=1",
        ], netns=False)  # fmt: skip

    def _start_kubelet(self) -> None:
        d = self.dir / "kubelet"
        spawned = time.time() - 1  # a Node object left from a previous start may still say Ready
        self._spawn("kubelet", [
            str(self.bin / "kubelet"), f"--config={d / 'config.yaml'}", f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", f"--root-dir={d / 'root'}",
            f"--cert-dir={d / 'pki'}", "--v=1",
        ])  # fmt: skip

        def ready() -> bool:
            out = self.cp.kubectl_run("get", "node", NODE_NAME, "-o", "json")
            if out.returncode != 0:
                return False
            for cond in json.loads(out.stdout)["status"].get("conditions", []):
                if cond["type"] == "Ready":
                    beat = datetime.datetime.fromisoformat(cond["lastHeartbeatTime"].replace("Z", "+00:00"))
                    return bool(cond["status"] == "True" and beat.timestamp() >= spawned)
            return False

        self._wait("kubelet", ready, timeout=120)

    def _start_proxy_and_dns(self) -> None:
        self._spawn("kube-proxy", [str(self.bin / "kube-proxy"), f"--config={self.dir / 'kube-proxy.yaml'}", "--v=1"])
        self._spawn("coredns", [str(self.bin / "coredns"), "-conf", str(self.dir / "Corefile")])

        def local_get(port: int, path: str) -> bool:
            out = _run(*_in_netns("curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"),
                       check=False, timeout=5)  # fmt: skip
            return out.returncode == 0

        self._wait("kube-proxy", lambda: local_get(10256, "/healthz"), timeout=60)
        self._wait("coredns", lambda: local_get(8181, "/ready"), timeout=60)

    def _recycle_volumes(self) -> None:
        """Make Released volumes Available again (contents wiped): static volumes with no provisioner
        would otherwise be used once per session."""
        api = _Api(self.cp)
        while not self._stopping.wait(2):
            with contextlib.suppress(Exception):
                pvs = api.get(f"/api/v1/persistentvolumes?labelSelector={VOLUME_LABEL}%3Dtrue")["items"]
                for pv in pvs:
                    if pv.get("status", {}).get("phase") != "Released":
                        continue
                    path = Path(pv["spec"]["hostPath"]["path"])
                    for child in path.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            shutil.rmtree(child)
                        else:
                            child.unlink()
                    api.patch(f"/api/v1/persistentvolumes/{pv['metadata']['name']}", {"spec": {"claimRef": None}})


class _Api:
    """A tiny client for the recycler (no kubectl process every 2 s)."""

    def __init__(self, cp: localenv.ControlPlane) -> None:
        self.base = f"https://127.0.0.1:{cp.port}"
        self.ctx = ssl.create_default_context(cafile=str(cp.dir / "certs" / "ca.crt"))
        self.headers = {"Authorization": f"Bearer {localenv.ADMIN_TOKEN}"}

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.base + path, headers=self.headers)  # noqa: S310 - https only
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:  # noqa: S310
            return json.load(resp)

    def patch(self, path: str, body: dict[str, Any]) -> Any:
        headers = {**self.headers, "Content-Type": "application/merge-patch+json"}
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(), method="PATCH", headers=headers)  # noqa: S310
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:  # noqa: S310
            return json.load(resp)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block ends: a second Ctrl-C (or the SIGTERM a
    wrapper such as `uv run` forwards) must not cut a teardown short and leave the host dirty."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


def clear_stale() -> bool:
    """Clean up after a node that died without stopping, unless another session's node is running (it
    holds the lock); True when the host is free of a node now. Node.start() does this by itself."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with LOCK_FILE.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        state = _read_state()
        if state or NETNS_PATH.exists() or _link_exists(HOST_LINK):
            _cleanup(Path(state["dir"]) if state else None, dict(state.get("tunables", {})) if state else {})
        STATE_FILE.unlink(missing_ok=True)
        return True


# ---------------------------------------------------------------------------------------------- host state


def _read_state() -> dict[str, Any] | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return dict(json.loads(STATE_FILE.read_text()))
    return None


def _write_state(state: dict[str, Any]) -> None:
    STATE_FILE.write_text(json.dumps(state))


def _sysctl(key: str) -> str:
    return Path("/proc/sys", key).read_text().strip()


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _netns_inode() -> int | None:
    with contextlib.suppress(OSError):
        return NETNS_PATH.stat().st_ino
    return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    return ""


def _cgroup_dirs() -> list[Path]:
    """The node's cgroups (CGROUP_ROOTS) in every hierarchy, deepest first."""
    found: list[Path] = []
    base = Path("/sys/fs/cgroup")
    hierarchies = [base] if (base / "cgroup.controllers").exists() else [h for h in base.iterdir() if h.is_dir()]
    for hierarchy in hierarchies:
        for name in CGROUP_ROOTS:
            top = hierarchy / name
            if top.is_dir():
                found.extend(Path(dirpath) for dirpath, _, _ in os.walk(top))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _node_pids(node_dir: Path | None) -> dict[int, str]:
    """Processes that belong to a node: in its network namespace, in its cgroups, or naming its directory."""
    me = os.getpid()
    found: dict[int, str] = {}
    inode = _netns_inode()
    marker = f"{node_dir}/" if node_dir else None
    for cg in _cgroup_dirs():
        with contextlib.suppress(OSError):
            for line in (cg / "cgroup.procs").read_text().split():
                found[int(line)] = f"in cgroup {cg}"
    for pid in _pids():
        if pid == me:
            continue
        cmd = _cmdline(pid)
        if marker and marker in cmd:
            found[pid] = cmd
            continue
        if inode is not None:
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                    found[pid] = f"in netns {NETNS}: {cmd}"
    found.pop(me, None)
    return {pid: f"{pid} {_cmdline(pid) or why}" for pid, why in found.items()}


def _mounts(node_dir: Path | None) -> list[str]:
    """Mount points under the node's directory (deepest first) and of its network namespace."""
    out: list[str] = []
    prefix = f"{node_dir}/" if node_dir else None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if (prefix and (point + "/").startswith(prefix)) or point == str(NETNS_PATH):
            out.append(point)
    return sorted(set(out), key=lambda p: p.count("/"), reverse=True)


def _host_iptables() -> list[str]:
    """The host's iptables rules and chains a node could have written (it writes them in its namespace)."""
    out: list[str] = []
    for tool in ("iptables-save", "iptables-legacy-save", "iptables-nft-save"):
        if shutil.which(tool) is None:
            continue
        text = subprocess.run([tool], capture_output=True, text=True).stdout
        out += [f"{tool}: {line}" for line in text.splitlines()
                if "KUBE-" in line or "CNI-" in line or "198.18." in line]  # fmt: skip
    return sorted(set(out))


def _host_routes() -> list[str]:
    text = _run("ip", "-4", "route", "show", check=False).stdout
    return [line for line in text.splitlines() if "198.18." in line or HOST_LINK in line]


def _outside_files(node_dir: Path | None) -> list[Path]:
    """What a node wrote outside its directory and left there: the kubelet's device-plugin socket and
    checkpoint, log symlinks into its directory (or dangling), shim sockets nobody listens on, the
    runc and fifo trees of the k8s.io namespace once empty, libcni's results for its sandboxes; then
    the OUTSIDE_PATHS directories (and their parents) that are empty. Files of another containerd or
    kubelet on the machine are never among them."""
    found: list[Path] = []
    plugins = Path("/var/lib/kubelet/device-plugins")
    found += [plugins / n for n in ("kubelet.sock", "kubelet_internal_checkpoint") if os.path.lexists(plugins / n)]
    logs = Path("/var/log/containers")
    if logs.is_dir():
        for link in logs.iterdir():
            target = os.readlink(link) if link.is_symlink() else ""
            if (node_dir and target.startswith(f"{node_dir}/")) or (target and not link.exists()):
                found.append(link)
    shim_sockets = Path("/run/containerd/s")
    if shim_sockets.is_dir():
        listening = _listening_unix_sockets()
        found += [sock for sock in shim_sockets.iterdir() if str(sock) not in listening]
    for tree in (Path("/run/containerd/runc/k8s.io"), Path("/run/containerd/fifo")):
        if tree.is_dir() and not any(p.is_dir() for p in tree.iterdir()):
            found.append(tree)
    sandboxes: set[str] = set()
    if node_dir:
        for where in ("root", "state"):
            with contextlib.suppress(OSError):
                sandboxes |= set(os.listdir(node_dir / "containerd" / where / "io.containerd.grpc.v1.cri/sandboxes"))
    results = Path("/var/lib/cni/results")  # <network>-<sandbox id>-<interface>, also for cni-loopback
    if results.is_dir():
        found += [r for r in results.iterdir() if any(f"-{sandbox}-" in r.name for sandbox in sandboxes)]
    removed = set(found)
    for directory in (*OUTSIDE_PATHS, *OUTSIDE_PARENTS):
        if directory.is_dir() and all(p in removed for p in directory.iterdir()):
            found.append(directory)
            removed.add(directory)
    return found


def leftovers(node_dir: Path | None = None, tunables: dict[str, str] | None = None) -> list[str]:
    """Everything a node leaves on the host when it is not running: processes, mounts, the network
    namespace, links, routes, iptables rules, cgroups, files outside its directory and changed
    kernel settings. [] means clean. Without `node_dir`, the one recorded in STATE_FILE (if any)."""
    state = _read_state()
    if node_dir is None and state:
        node_dir = Path(state["dir"])
    if tunables is None:
        tunables = dict(state.get("tunables", {})) if state else {}
    found: list[str] = []
    found += [f"process {desc}" for desc in _node_pids(node_dir).values()]
    found += [f"mount {point}" for point in _mounts(node_dir)]
    if NETNS_PATH.exists():
        found.append(f"network namespace {NETNS_PATH}")
    if NETNS_DIR.is_dir() and not any(NETNS_DIR.iterdir()):
        found.append(f"empty {NETNS_DIR} (ip netns's mount point)")
    found += [f"link {name}" for name in (HOST_LINK, NODE_LINK, BRIDGE) if _link_exists(name)]
    found += [f"route {line}" for line in _host_routes()]
    found += [f"iptables {line}" for line in _host_iptables()]
    found += [f"cgroup {cg}" for cg in _cgroup_dirs()]
    found += [f"path {p}" for p in _outside_files(node_dir)]
    found += [f"sysctl {k}={_sysctl(k)} (was {v})" for k, v in tunables.items() if _sysctl(k) != v]
    if STATE_FILE.exists() and state and state.get("pid") != os.getpid():
        found.append(f"state file {STATE_FILE} of pid {state.get('pid')}")
    return found


def _kill(pids: dict[int, str]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _cleanup(node_dir: Path | None, tunables: dict[str, str]) -> None:
    """Remove whatever a node (running or dead) left: kill its processes, unmount, delete the network
    namespace, link, routes and cgroups, remove the files it wrote outside `node_dir`, restore the
    kernel settings. Idempotent; used by Node.stop() and, for a run that died, by Node.start()."""
    for _ in range(50):  # container processes, shims, daemons; a dying shim may still reap children
        pids = _node_pids(node_dir)
        if not pids:
            break
        _kill(pids)
        time.sleep(0.1)
    for _ in range(5):
        points = _mounts(node_dir)
        if not points:
            break
        for point in points:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
    if NETNS_PATH.exists():
        subprocess.run(["ip", "netns", "delete", NETNS], capture_output=True)
    if NETNS_DIR.is_dir() and not any(NETNS_DIR.iterdir()):  # nobody else's namespaces: undo `ip netns`
        subprocess.run(["umount", str(NETNS_DIR)], capture_output=True)
        with contextlib.suppress(OSError):
            NETNS_DIR.rmdir()
    if _link_exists(HOST_LINK):  # normally gone with its peer's namespace
        subprocess.run(["ip", "link", "delete", HOST_LINK], capture_output=True)
    for cidr in HOST_ROUTES:
        subprocess.run(["ip", "route", "delete", cidr], capture_output=True)
    for _ in range(50):
        remaining = _cgroup_dirs()
        for cg in remaining:
            with contextlib.suppress(OSError):
                cg.rmdir()
        if not _cgroup_dirs():
            break
        time.sleep(0.1)
    _remove_outside_files(node_dir)
    for key, value in tunables.items():
        if _sysctl(key) != value:
            Path("/proc/sys", key).write_text(value)


def _remove_outside_files(node_dir: Path | None) -> None:
    """Remove _outside_files(): files first, then the directories they leave empty."""
    for path in _outside_files(node_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _listening_unix_sockets() -> set[str]:
    paths: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and int(fields[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
                paths.add(fields[7].lstrip("@"))
    return paths
