"""The Kubernetes permissions the operator needs: one declared list, read from what the code calls.

The Helm chart renders its ClusterRole (or Roles) from `charts/pgscale/files/rbac.yaml`, which
`python -m pgscale.rbac --write charts/pgscale/files/rbac.yaml` generates from this module, and
the permission table in docs/operations.md comes from `--docs docs/operations.md` (both run by
hack/render-manifests.sh); tests/unit/test_chart.py fails when either differs, and the e2e tests run the operator with
exactly these rules, so a call the list lacks fails there and a rule nobody needs has no place
here. When a controller starts calling something new (see kube.Kube), add it here.

Four groups, because of where Kubernetes lets a rule live:
- NAMESPACED: what reconciles do in the namespaces of the resources. A ClusterRole by default,
  a Role in each namespace when the operator runs with `-n NS`.
- CLUSTER: cluster-scoped reads kopf makes in both modes.
- WATCH_NAMESPACES: cluster-scoped reads kopf makes only when it watches named namespaces.
- LEADER_ELECTION: the Lease, in the operator's own namespace (a Role there), when
  leader election is on (the chart's default).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api import GROUP

# The kinds, by plural (as in the CRDs).
KINDS = (
    "databaseprofiles",
    "partitionpolicies",
    "retentionpolicies",
    "filemigrations",
    "databasesplits",
    "caches",
)
# What the operator creates, changes and deletes by server-side apply (kube.Kube.apply/delete).
# An apply that creates the object is authorized as `patch` and then as `create`.
WRITE = ("create", "patch", "delete")


@dataclass(frozen=True)
class Rule:
    """One PolicyRule, with the reason it is needed."""

    api_group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str

    def as_policy_rule(self) -> dict[str, Any]:
        """The rule as it appears in a Role or ClusterRole."""
        return {"apiGroups": [self.api_group], "resources": list(self.resources), "verbs": list(self.verbs)}


NAMESPACED: tuple[Rule, ...] = (
    Rule(GROUP, KINDS, ("get", "list", "watch"),
         "kopf lists and watches the kinds; a worker GETs the current object before each reconcile; "
         "controllers list PartitionPolicies and RetentionPolicies to find two policies on one table, and "
         "DatabaseProfiles in every watched namespace to find two that set the settings of one server"),
    Rule(GROUP, tuple(f"{k}/status" for k in KINDS), ("patch",),
         "status, conditions and observedGeneration are merge-patched on the status subresource"),
    Rule(GROUP, ("databaseprofiles", "partitionpolicies", "retentionpolicies", "databasesplits", "caches"),
         ("patch",),
         "pgscale's finalizer is added and removed by a merge patch of metadata.finalizers, on the kinds "
         "that keep something outside the cluster (replication slots, a conversion's sync trigger, a pg_cron job, "
         "a split's subscriptions, a Cache's invalidation triggers and outbox)"),
    Rule(GROUP, ("databaseprofiles/finalizers", "partitionpolicies/finalizers", "retentionpolicies/finalizers",
                 "filemigrations/finalizers", "databasesplits/finalizers", "caches/finalizers"),
         ("update",),
         "owned objects carry blockOwnerDeletion owner references to these kinds; clusters enforcing "
         "OwnerReferencesPermissionEnforcement (OpenShift) require update on the owner's finalizers for that"),
    Rule("", ("events",), ("create",), "Events on the resources (kube.Kube.event)"),
    Rule("", ("secrets",), ("get",),
         "the connection Secret of a DatabaseProfile, the replication Secret, a FileMigration's S3 credentials, "
         "a Cache's password Secret: by name, never listed"),
    Rule("", ("secrets", "services", "configmaps"), WRITE,
         "PgBouncer's config Secret and Service; the replicas' -ro/-rw Services and bootstrap ConfigMap; a "
         "Cache's config ConfigMap, password and application Secrets and Service"),
    Rule("apps", ("deployments", "statefulsets"), WRITE,
         "PgBouncer's Deployment; the replicas' StatefulSet; a Cache's server and relay Deployments"),
    Rule("discovery.k8s.io", ("endpointslices",), WRITE, "the -rw Service's EndpointSlice to the primary"),
    Rule("batch", ("cronjobs",), WRITE, "a RetentionPolicy's CronJob; a PartitionPolicy's maintenance CronJob"),
    Rule("batch", ("jobs",), ("get", "list", "watch", *WRITE),
         "a FileMigration's Job per phase (read to see it finish, deleted to stop it); kopf watches the Jobs "
         "pgscale labelled so a policy's status follows its runs"),
    Rule("monitoring.coreos.com", ("prometheusrules",), WRITE,
         "a DatabaseProfile's and a Cache's alert thresholds as a PrometheusRule (prometheus-operator)"),
    Rule("monitoring.coreos.com", ("podmonitors",), WRITE,
         "a Cache's PodMonitor for its relay's metrics (spec.podMonitor)"),
    Rule("postgresql.cnpg.io", ("clusters",), ("get", "patch"),
         "the cloudnativepg settings method: read the CloudNativePG Cluster a profile names, server-side apply "
         "its spec.postgresql.parameters and spec.instances (field manager pgscale/<profile>). No create: an "
         "apply can never make a Cluster that was deleted meanwhile"),
    Rule("postgresql.cnpg.io", ("poolers",), ("get", *WRITE),
         "the cloudnativepg settings method's CloudNativePG Poolers (read first: one pgscale did not make is "
         "not taken over)"),
)  # fmt: skip

CLUSTER: tuple[Rule, ...] = (
    Rule("apiextensions.k8s.io", ("customresourcedefinitions",), ("list", "watch"),
         "kopf observes CRDs so a kind installed or upgraded after the operator started is served"),
)  # fmt: skip

WATCH_NAMESPACES: tuple[Rule, ...] = (
    Rule("", ("namespaces",), ("list", "watch"),
         "with -n NS, kopf lists and watches namespaces to start and stop watching as they come and go"),
)  # fmt: skip


LEADER_ELECTION: tuple[Rule, ...] = (
    Rule("coordination.k8s.io", ("leases",), ("get", "create", "update"),
         "leader election (pgscale run --leader-election, leader.py): read, create and renew the Lease; a Role "
         "in the operator's own namespace only"),
)  # fmt: skip


def policy_rules(namespaced_mode: bool) -> dict[str, list[dict[str, Any]]]:
    """The rules by where they are bound: `namespaced` (ClusterRole or a Role per namespace), `cluster`."""
    if namespaced_mode:
        return {
            "namespaced": [r.as_policy_rule() for r in NAMESPACED],
            "cluster": [r.as_policy_rule() for r in (*CLUSTER, *WATCH_NAMESPACES)],
            "leaderElection": [r.as_policy_rule() for r in LEADER_ELECTION],
        }
    return {
        "namespaced": [],
        "cluster": [r.as_policy_rule() for r in (*NAMESPACED, *CLUSTER)],
        "leaderElection": [r.as_policy_rule() for r in LEADER_ELECTION],
    }


# Where each group's rules are bound, for the docs' table.
BOUND = {
    "namespaced": "ClusterRole; with `watchNamespaces`, a Role in each watched namespace",
    "cluster": "ClusterRole, in both modes",
    "watchNamespaces": "ClusterRole, with `watchNamespaces` only",
    "leaderElection": "Role in the release namespace, with `leaderElection.enabled`",
}
GROUPS = (
    ("namespaced", NAMESPACED),
    ("cluster", CLUSTER),
    ("watchNamespaces", WATCH_NAMESPACES),
    ("leaderElection", LEADER_ELECTION),
)


def _flow(rule: Rule) -> str:
    def seq(items: tuple[str, ...]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    return f"- apiGroups: {seq((rule.api_group,))}\n  resources: {seq(rule.resources)}\n  verbs: {seq(rule.verbs)}\n"


def render() -> str:
    """The chart's rules file: one list per group, each rule under a comment saying why."""
    out = [
        "# Generated by `python -m pgscale.rbac --write charts/pgscale/files/rbac.yaml` from",
        "# operator/pgscale/rbac.py; do not edit.",
    ]
    for name, rules in GROUPS:
        out.append(f"{name}:")
        for rule in rules:
            out.append(f"# {rule.why}")
            out.append(_flow(rule).rstrip("\n"))
    return "\n".join(out) + "\n"


DOCS_BEGIN = "<!-- BEGIN rbac table: generated from operator/pgscale/rbac.py by hack/render-manifests.sh -->"
DOCS_END = "<!-- END rbac table -->"


def markdown_table() -> str:
    """The permission table of docs/operations.md, one row per rule."""
    rows = ["| API group | resources | verbs | bound in | why |", "| --- | --- | --- | --- | --- |"]
    for name, rules in GROUPS:
        for rule in rules:
            group = f"`{rule.api_group}`" if rule.api_group else "core"
            cells = (group, ", ".join(rule.resources), ", ".join(rule.verbs), BOUND[name], rule.why)
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def with_table(doc: str) -> str:
    """A document with the text between its table markers replaced by the current table."""
    head, begin, rest = doc.partition(DOCS_BEGIN)
    _, end, tail = rest.partition(DOCS_END)
    if not (begin and end):
        raise ValueError(f"no {DOCS_BEGIN!r} ... {DOCS_END!r} markers")
    return f"{head}{DOCS_BEGIN}\n{markdown_table()}{DOCS_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """Print the rules file, write it, or check that a file is current; or refresh the docs' table."""
    p = argparse.ArgumentParser(prog="python -m pgscale.rbac", description=main.__doc__)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--write", metavar="FILE", help="write the rules file")
    where.add_argument("--check", metavar="FILE", help="exit 1 when FILE differs")
    where.add_argument("--docs", metavar="FILE", help="rewrite the permission table in a Markdown file")
    args = p.parse_args(argv)
    if args.docs:
        path = Path(args.docs)
        path.write_text(with_table(path.read_text()))
        return 0
    text = render()
    if args.check:
        path = Path(args.check)
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale; run `python -m pgscale.rbac --write {path}`", file=sys.stderr)
            return 1
        return 0
    if args.write:
        Path(args.write).write_text(text)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
