from __future__ import annotations

from pgscale.api.databaseprofile import ReadReplicasSpec
from pgscale.kube import ObjectRef
from pgscale.specs import replicas

OWNER = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", "team-a", "app", "uid-1")
SPEC = ReadReplicasSpec.model_validate(
    {"instances": 2, "replicationSecretRef": {"name": "repl"}, "storage": {"size": "50Gi", "storageClassName": "fast"}}
)


def test_slot_names_are_safe_per_ordinal_and_never_shared() -> None:
    names = replicas.slot_names(OWNER, 2)
    assert names[0].startswith("pgscale_team_a_app_") and names[0].endswith("_0") and names[1].endswith("_1")
    long = ObjectRef("v", "K", "n" * 60, "p" * 60, "u")
    assert all(len(s) <= 63 and s.isidentifier() for s in replicas.slot_names(long, 16))
    # Names that sanitise alike, or that extend another profile's name, get prefixes of their own.
    a = replicas.slot_prefix(ObjectRef("v", "K", "a-b", "c", "u"))
    b = replicas.slot_prefix(ObjectRef("v", "K", "a", "b-c", "u"))
    db = replicas.slot_prefix(ObjectRef("v", "K", "prod", "db", "u"))
    dbx = replicas.slot_prefix(ObjectRef("v", "K", "prod", "db-x", "u"))
    assert a != b and not dbx.startswith(db) and not db.startswith(dbx)


def test_statefulset_runs_the_bootstrap_with_secret_credentials() -> None:
    sts = replicas.statefulset(OWNER, SPEC, image="postgres:15", primary_host="db.example", primary_port=5432)
    pod = sts["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["REPLICATION_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "repl", "key": "password"}
    assert env["SLOT_PREFIX"]["value"] == replicas.slot_prefix(OWNER)
    assert pod["containers"][0]["command"] == ["sh", "/pgscale/bootstrap.sh"]
    claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["resources"]["requests"]["storage"] == "50Gi" and claim["storageClassName"] == "fast"
    assert sts["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_read_write_service_by_address_kind() -> None:
    (external,) = replicas.read_write_service(OWNER, "app-db.team-a.svc", 5432)
    assert external["spec"] == {"type": "ExternalName", "externalName": "app-db.team-a.svc"}
    service, eps = replicas.read_write_service(OWNER, "10.1.2.3", 6432)
    assert "selector" not in service["spec"] and service["spec"]["ports"][0]["targetPort"] == 6432
    assert eps["kind"] == "EndpointSlice" and eps["endpoints"][0]["addresses"] == ["10.1.2.3"]
    assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == "app-rw"
    assert replicas.read_write_service(OWNER, "127.0.0.1", 5432) == []


def test_bootstrap_script_is_shipped_in_the_package() -> None:
    script = replicas.config_map(OWNER)["data"]["bootstrap.sh"]
    assert script.startswith("#!/bin/sh") and "pg_basebackup" in script and "passfile" in script
