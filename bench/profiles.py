"""Benchmark: DatabaseProfile reconcile latency (apply -> Ready) and operator memory at 1, 200, 1000 profiles.

One local control plane, one dedicated PostgreSQL 15 (a profile's tier changes the
server's settings with ALTER SYSTEM, so it is never a shared one) and one operator
(`pgscale run --all-namespaces`, default workers) for all sizes. For each size N: a
fresh namespace with one Secret pointing at one database, then N DatabaseProfiles
(the first with tier development, the others without server settings, since one profile per
server owns them; monitoring on by default, no explicit parameters) applied in one
server-side `kubectl apply`; with --policies, one RetentionPolicy per profile in the same apply
(deleting tasks completed over 90 days ago, monthly, as a CronJob; every policy on the same table,
each through its own profile), and all of them count. From just before that apply (t0),
`kubectl get databaseprofiles,retentionpolicies -o json` is polled every --poll seconds (back to back when a poll
takes longer) and the first poll that sees each profile's Ready=True gives its
latency (so the resolution is one poll period, reported too). Meanwhile the
operator's RSS is sampled from /proc/<pid>/status; its VmHWM is reset before each
size (clear_refs) so the peak is that size's own.

Reports time to the first and the last Ready, the median and p95 per-profile latency,
the mean reconcile time from pgscale_reconcile_duration_seconds (delta over the size), the
reconcile rate (reconciles finished per second until the last Ready),
the operator's RSS at idle before the apply, its peak and its RSS once all are Ready,
the outcomes of the reconciles (a failure is retried with backoff, which shows in latency),
and scaling ratios between the largest and the smallest size. There is no baseline
tool for this: the figures are absolute.

    uv run python bench/profiles.py --counts 1,200,1000 --policies --out bench/results/profiles.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
import localenv  # noqa: E402

DATABASE = "bench_profiles"
SECRET = "app-db"
KIND = "DatabaseProfile"
POLICY = "RetentionPolicy"


@dataclass
class SizeResult:
    profiles: int
    policies: int
    ready: int
    timed_out: bool
    apply_seconds: float
    first_ready_seconds: float | None
    median_ready_seconds: float | None
    p95_ready_seconds: float | None
    all_ready_seconds: float | None
    polls: int
    poll_period_seconds: float
    reconciles: int
    reconcile_mean_seconds: float | None
    reconciles_per_second: float | None
    reconcile_outcomes: dict[str, int]
    idle_rss_mb: float
    peak_rss_mb: float
    peak_rss_source: str
    rss_after_ready_mb: float
    not_ready: dict[str, str] = field(default_factory=dict)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of a process in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0); False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def mb(kb: float) -> float:
    return round(kb / 1024, 1)


def machine() -> dict[str, Any]:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "nproc": int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout),
        "memory_total_mb": mb(int(meminfo["MemTotal"].split()[0])),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def reconcile_metrics(port: int) -> tuple[float, float, dict[str, float]]:
    """(sum, count) of pgscale_reconcile_duration_seconds and reconciles by outcome, of the kinds the bench applies."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = count = 0.0
    outcomes: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("kind") not in (KIND, POLICY):
                continue
            if s.name == "pgscale_reconcile_duration_seconds_sum":
                total += s.value
            elif s.name == "pgscale_reconcile_duration_seconds_count":
                count += s.value
            elif s.name == "pgscale_reconcile_total":
                outcomes[s.labels["outcome"]] = outcomes.get(s.labels["outcome"], 0.0) + s.value
    return total, count, outcomes


def profiles(n: int, policies: bool = False) -> str:
    items: list[dict[str, Any]] = [
        {
            "apiVersion": "pgscale.io/v1alpha1",
            "kind": KIND,
            "metadata": {"name": f"app-{i:03d}"},
            # One owner of the server's settings (a later profile setting them too is Stalled with
            # SettingsConflict): the first has the tier, the others monitor only.
            "spec": {"connection": {"secretRef": {"name": SECRET}}, **({"tier": "development"} if i == 0 else {})},
        }
        for i in range(n)
    ]
    if policies:
        items += [
            {
                "apiVersion": "pgscale.io/v1alpha1",
                "kind": POLICY,
                "metadata": {"name": f"tasks-{i:03d}"},
                "spec": {
                    "profileRef": {"name": f"app-{i:03d}"},
                    "table": {"name": "Task"},
                    "ageColumn": "completedAt",
                    "olderThan": "90d",
                    "filters": [{"column": "status", "operator": "In", "values": ["COMPLETED"]}],
                    "action": "delete",
                    "children": {"mode": "delete"},
                    "schedule": "0 2 1 * *",
                },
            }
            for i in range(n)
        ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def ready_state(item: dict[str, Any]) -> tuple[bool, str]:
    """(Ready=True for the current generation, a short reason otherwise)."""
    status = item.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            ok = c.get("status") == "True" and status.get("observedGeneration") == item["metadata"]["generation"]
            return ok, f"Ready={c.get('status')} {c.get('reason')}: {c.get('message', '')[:160]}"
    return False, "no Ready condition yet"


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


def measure(
    cp: localenv.ControlPlane,
    pg: localenv.Postgres,
    op: localenv.OperatorProcess,
    n: int,
    policies: bool,
    poll: float,
    timeout: float,
    settle: float,
) -> SizeResult:
    assert op.proc is not None
    pid = op.proc.pid
    ns = f"bench-profiles-{n}"
    cp.kubectl_run("create", "namespace", ns, check=True)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET},
        "stringData": {
            "uri": pg.uri(DATABASE),
            "host": pg.host,
            "port": str(pg.port),
            "dbname": DATABASE,
            "username": "postgres",
            "password": pg.PASSWORD,
        },
    }
    cp.kubectl_run("-n", ns, "apply", "-f", "-", input=json.dumps(secret), check=True)
    time.sleep(settle)  # the operator at rest before the apply
    idle_kb = proc_status(pid)["VmRSS"]
    hwm_reset = reset_peak(pid)
    sum0, count0, outcomes0 = reconcile_metrics(op.metrics_port)

    t0 = time.monotonic()
    cp.kubectl_run("-n", ns, "apply", "--server-side", "-f", "-", input=profiles(n, policies), check=True)
    apply_seconds = time.monotonic() - t0
    seen: dict[str, float] = {}
    total = n * (2 if policies else 1)
    last: dict[str, str] = {}
    peak_sampled = idle_kb
    polls = 0
    deadline = t0 + timeout
    while True:
        got = cp.kubectl_run("-n", ns, "get", "databaseprofiles,retentionpolicies", "-o", "json", check=True)
        now = time.monotonic() - t0
        polls += 1
        for item in json.loads(got.stdout)["items"]:
            name = f"{item['kind']}/{item['metadata']['name']}"
            ok, why = ready_state(item)
            if ok:
                seen.setdefault(name, now)
            else:
                last[name] = why
        peak_sampled = max(peak_sampled, proc_status(pid)["VmRSS"])
        if len(seen) == total or time.monotonic() > deadline:
            break
        time.sleep(max(0.0, t0 + polls * poll - time.monotonic()))  # a poll every `poll` s, or back to back
    elapsed = time.monotonic() - t0
    status = proc_status(pid)
    sum1, count1, outcomes1 = reconcile_metrics(op.metrics_port)
    reconciles = int(count1 - count0)
    latencies = sorted(seen.values())
    delta = {k: int(v - outcomes0.get(k, 0.0)) for k, v in outcomes1.items() if v > outcomes0.get(k, 0.0)}
    result = SizeResult(
        profiles=n,
        policies=n if policies else 0,
        ready=len(seen),
        timed_out=len(seen) < total,
        apply_seconds=round(apply_seconds, 2),
        first_ready_seconds=round(latencies[0], 2) if latencies else None,
        median_ready_seconds=round(statistics.median(latencies), 2) if latencies else None,
        p95_ready_seconds=round(percentile(latencies, 95), 2) if latencies else None,
        all_ready_seconds=round(latencies[-1], 2) if len(seen) == total else None,
        polls=polls,
        poll_period_seconds=round(elapsed / polls, 3),
        reconciles=reconciles,
        reconcile_mean_seconds=round((sum1 - sum0) / reconciles, 4) if reconciles else None,
        reconciles_per_second=round(reconciles / elapsed, 1) if reconciles and elapsed else None,
        reconcile_outcomes=delta,
        idle_rss_mb=mb(idle_kb),
        peak_rss_mb=mb(status["VmHWM"] if hwm_reset else peak_sampled),
        peak_rss_source="VmHWM (reset before the apply)" if hwm_reset else "max VmRSS sampled at each poll",
        rss_after_ready_mb=mb(status["VmRSS"]),
        not_ready={k: v for k, v in sorted(last.items()) if k not in seen},
    )
    cp.kubectl_run("delete", "namespace", ns, "--wait=true", "--timeout=180s", timeout=240)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--counts", default="1,200,1000", help="comma-separated numbers of DatabaseProfiles")
    p.add_argument("--policies", action="store_true", help="and one RetentionPolicy per DatabaseProfile")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between `kubectl get` polls")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all profiles of one size")
    p.add_argument("--settle", type=float, default=5.0, help="seconds the operator idles before each apply")
    p.add_argument("--workers", type=int, help="pgscale run --workers (default: the operator's default)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    command = shlex.join(["uv", "run", "python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    results: list[SizeResult] = []
    with tempfile.TemporaryDirectory(prefix="pgscale-bench-") as tmp:
        workdir = Path(tmp)
        cp = localenv.ControlPlane(workdir)
        pg = localenv.Postgres(workdir, name="postgres-bench")
        op = localenv.OperatorProcess(workdir, cp.kubeconfig)
        try:
            cp.start()
            pg.start()
            pg.execute(f'CREATE DATABASE "{DATABASE}"')
            with psycopg.connect(pg.dsn(DATABASE), autocommit=True) as conn:
                conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
                pg_version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            cp.kubectl_run("apply", "--server-side", "-f", str(ROOT / "crds"), check=True)
            cp.kubectl_run("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s", check=True)
            op.start("--all-namespaces", *(["--workers", str(args.workers)] if args.workers else []))
            assert op.proc is not None
            env = {"KUBECONFIG": str(op.kubeconfig), "PGSCALE_STALLED_RETRY_SECONDS": "5"}  # what localenv sets
            operator_command = shlex.join([*(f"{k}={v}" for k, v in env.items()), *map(str, op.proc.args)])  # type: ignore[arg-type]
            print(f"benchmark: {command}\noperator:  {operator_command}", flush=True)
            # kubectl's first server-side apply fetches discovery and OpenAPI: not the operator's time.
            cp.kubectl_run("apply", "--server-side", "--dry-run=server", "-f", "-", input=profiles(1), check=True)
            for n in counts:
                r = measure(cp, pg, op, n, args.policies, args.poll, args.timeout, args.settle)
                results.append(r)
                print(
                    f"  {n} profiles, {r.policies} policies: {r.ready} Ready, all after {r.all_ready_seconds} s, "
                    f"{r.reconciles_per_second} reconciles/s, peak RSS {r.peak_rss_mb} MB",
                    flush=True,
                )
        except BaseException:
            sys.stderr.write(f"operator log: {localenv._tail(op.log)}\n")
            raise
        finally:
            op.stop()
            pg.stop()
            cp.stop()

    lo, hi = results[0], results[-1]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    ratios = {
        f"median latency {hi.profiles}/{lo.profiles}": ratio(hi.median_ready_seconds, lo.median_ready_seconds),
        f"p95 latency {hi.profiles}/{lo.profiles}": ratio(hi.p95_ready_seconds, lo.p95_ready_seconds),
        f"all-Ready time {hi.profiles}/{lo.profiles}": ratio(hi.all_ready_seconds, lo.all_ready_seconds),
        f"mean reconcile {hi.profiles}/{lo.profiles}": ratio(hi.reconcile_mean_seconds, lo.reconcile_mean_seconds),
        f"reconciles per second {hi.profiles}/{lo.profiles}": ratio(hi.reconciles_per_second, lo.reconciles_per_second),
        f"peak RSS {hi.profiles}/{lo.profiles}": ratio(hi.peak_rss_mb, lo.peak_rss_mb),
        f"RSS after Ready {hi.profiles}/{lo.profiles}": ratio(hi.rss_after_ready_mb, lo.rss_after_ready_mb),
        f"RSS growth above idle per profile at {hi.profiles} (MB)": round(
            (hi.rss_after_ready_mb - hi.idle_rss_mb) / hi.profiles, 3
        ),
    }
    facts = {**machine(), "postgresql": pg_version, "commit": git_commit()}
    cols = [
        "profiles",
        "policies",
        "ready",
        "apply_seconds",
        "first_ready_seconds",
        "median_ready_seconds",
        "p95_ready_seconds",
        "all_ready_seconds",
        "poll_period_seconds",
        "reconciles",
        "reconcile_mean_seconds",
        "reconciles_per_second",
        "idle_rss_mb",
        "peak_rss_mb",
        "rss_after_ready_mb",
    ]
    print(
        f"\nDatabaseProfile benchmark: {facts['nproc']} CPUs, {facts['memory_total_mb']} MB, "
        f"PostgreSQL {pg_version}, the first profile with tier development, monitoring on"
        f"{', one RetentionPolicy per profile' if args.policies else ''}; "
        "seconds from the start of the apply"
    )
    print(" | ".join(cols))
    for r in results:
        print(" | ".join(str(getattr(r, c)) for c in cols))
        if r.not_ready:
            print(f"  not Ready after {args.timeout:.0f} s: {len(r.not_ready)}, e.g. {next(iter(r.not_ready.items()))}")
        if set(r.reconcile_outcomes) - {"success"}:
            print(f"  reconcile outcomes: {r.reconcile_outcomes}")
    for name, value in ratios.items():
        print(f"{name}: {value}")
    print(f"benchmark: {command}\noperator:  {operator_command}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        applied = json.loads(profiles(1, args.policies))["items"]
        settings = {
            "poll_seconds": args.poll,
            "timeout_seconds": args.timeout,
            "settle_seconds": args.settle,
            "workers": args.workers or "default",
            "spec": applied[0]["spec"],
            "policy_spec": applied[1]["spec"] if args.policies else None,
        }
        report = {
            "command": command,
            "operator_command": operator_command,
            "machine": facts,
            "settings": settings,
            "results": {str(r.profiles): asdict(r) for r in results},
            "ratios": ratios,
        }
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
