"""The cloudnativepg method's pure parts: the Cluster's apply configuration, Poolers, field managers,
and reading server-side apply's conflicts and managedFields (shapes as the real API server sends them;
tests/e2e/test_cloudnativepg_e2e.py runs the same against it and CloudNativePG's CRDs)."""

from __future__ import annotations

from typing import Any

from pgscale.api.databaseprofile import FORBIDDEN_PARAMETERS, PGBOUNCER_PARAMETERS, DatabaseProfileSpec, PoolingSpec
from pgscale.kube import ObjectRef
from pgscale.specs import cnpg

OWNER = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", "ns", "app", "1234-5678-90ab")


def profile(**spec: Any) -> DatabaseProfileSpec:
    return DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "app-db"}}, **spec})


def test_field_manager_is_per_profile_and_fits_the_limit() -> None:
    assert cnpg.field_manager("app") == "pgscale/app"
    long = cnpg.field_manager("a" * 253)
    assert len(long) <= 128 and long.startswith("pgscale/aaa")
    assert long != cnpg.field_manager("a" * 252)  # the digest keeps long names apart


def test_cluster_name_from_ref_then_label() -> None:
    spec = profile(settings={"method": "cloudnativepg", "clusterRef": {"name": "pg"}})
    assert cnpg.cluster_name(spec, {cnpg.CLUSTER_LABEL: "other"}) == ("pg", "spec.settings.clusterRef")
    spec = profile(settings={"method": "cloudnativepg"})
    name, origin = cnpg.cluster_name(spec, {cnpg.CLUSTER_LABEL: "other"})
    assert name == "other" and "cnpg.io/cluster label" in origin
    assert cnpg.cluster_name(spec, {}) == (None, "")
    assert cnpg.cluster_name(spec, None) == (None, "")


def test_instances_counts_the_primary() -> None:
    replicas = {"replicationSecretRef": {"name": "repl"}, "storage": {"size": "1Gi"}}
    assert cnpg.instances(profile()) is None  # not ours: whoever set it keeps it
    assert cnpg.instances(profile(readReplicas={**replicas, "instances": 2})) == 3
    assert cnpg.instances(profile(readReplicas={**replicas, "instances": 0})) == 1


def test_fixed_parameters_are_reported_not_sent() -> None:
    desired = {
        "work_mem": ("4MB", "parameters"),
        "shared_preload_libraries": ("pg_stat_statements", "parameters"),
        "log_destination": ("stderr", "parameters"),
        "max_connections": ("200", "tier"),
    }
    send, refused = cnpg.split_parameters(desired)
    assert send == {"work_mem": "4MB", "max_connections": "200"}
    assert refused == ["log_destination", "shared_preload_libraries"]


def test_fixed_list_covers_what_cloudnativepg_manages_that_pgscale_allows() -> None:
    assert len(set(cnpg.FIXED_PARAMETERS)) == len(cnpg.FIXED_PARAMETERS)
    assert list(cnpg.FIXED_PARAMETERS) == sorted(cnpg.FIXED_PARAMETERS)
    # The CRD's CEL already refuses pgscale's own list; these reach the method and are reported.
    allowed_by_pgscale = set(cnpg.FIXED_PARAMETERS) - set(FORBIDDEN_PARAMETERS)
    assert {"shared_preload_libraries", "logging_collector", "synchronous_standby_names"} <= allowed_by_pgscale
    assert set(cnpg.FIXED_HINTS) <= set(cnpg.FIXED_PARAMETERS)


def test_cluster_apply_holds_only_pgscales_fields() -> None:
    obj = cnpg.cluster_apply("ns", "pg", {"work_mem": "4MB", "max_connections": "200"}, 3)
    assert obj == {
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Cluster",
        "metadata": {"name": "pg", "namespace": "ns"},
        "spec": {"postgresql": {"parameters": {"max_connections": "200", "work_mem": "4MB"}}, "instances": 3},
    }
    assert "instances" not in cnpg.cluster_apply("ns", "pg", {"a": "1"}, None)["spec"]
    # The release: nothing but the name, so the manager gives back every field it held.
    assert cnpg.cluster_apply("ns", "pg", {}, None) == {
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Cluster",
        "metadata": {"name": "pg", "namespace": "ns"},
    }


def test_pooler_maps_the_pooling_spec() -> None:
    spec = PoolingSpec.model_validate(
        {
            "instances": 2,
            "poolMode": "session",
            "defaultPoolSize": 30,
            "maxClientConnections": 500,
            "parameters": {"server_idle_timeout": "60", "max_prepared_statements": "100"},
        }
    )
    obj = cnpg.pooler(OWNER, "app-pooler-rw", "pg", "rw", spec)
    assert obj["apiVersion"] == "postgresql.cnpg.io/v1" and obj["kind"] == "Pooler"
    assert obj["metadata"]["name"] == "app-pooler-rw" and obj["metadata"]["namespace"] == "ns"
    assert obj["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "pgscale"
    assert obj["metadata"]["labels"][cnpg.CLUSTER_LABEL] == "pg"
    assert obj["spec"] == {
        "cluster": {"name": "pg"},
        "instances": 2,
        "type": "rw",
        "pgbouncer": {
            "poolMode": "session",
            "parameters": {
                "default_pool_size": "30",
                "max_client_conn": "500",
                "max_db_connections": "0",
                "max_prepared_statements": "100",
                "min_pool_size": "0",
                "reserve_pool_size": "0",
                "server_idle_timeout": "60",
            },
        },
    }
    ro = cnpg.pooler(OWNER, "app-pooler-ro", "pg", "ro", spec)
    assert ro["spec"]["type"] == "ro"


def test_pooler_template_only_for_image_or_resources() -> None:
    spec = PoolingSpec.model_validate({"image": "example/pgbouncer:1", "resources": {"limits": {"memory": "64Mi"}}})
    template = cnpg.pooler(OWNER, "app-pooler-rw", "pg", "rw", spec)["spec"]["template"]
    assert template == {
        "metadata": {},
        "spec": {
            "containers": [
                {"name": "pgbouncer", "image": "example/pgbouncer:1", "resources": {"limits": {"memory": "64Mi"}}}
            ]
        },
    }


def test_every_pgscale_pgbouncer_parameter_is_allowed_by_cloudnativepg() -> None:
    assert set(PGBOUNCER_PARAMETERS) <= set(cnpg.PGBOUNCER_PARAMETERS)
    spec = PoolingSpec.model_construct(**{**PoolingSpec().__dict__, "parameters": {"listen_port": "1"}})
    params, dropped = cnpg.pgbouncer_parameters(spec)
    assert dropped == ["listen_port"] and "listen_port" not in params


def test_conflicts_from_a_409_body() -> None:
    body = {
        "kind": "Status",
        "reason": "Conflict",
        "code": 409,
        "details": {
            "causes": [
                {"reason": "FieldManagerConflict", "message": 'conflict with "argocd"', "field": ".spec.instances"},
                {
                    "reason": "FieldManagerConflict",
                    "message": 'conflict with "kubectl-edit" using postgresql.cnpg.io/v1',
                    "field": ".spec.postgresql.parameters.pg_stat_statements.max",
                },
            ]
        },
    }
    found = cnpg.conflicts(body)
    assert [(c.manager, c.path, c.parameter) for c in found] == [
        ("argocd", "spec.instances", None),
        ("kubectl-edit", "spec.postgresql.parameters.pg_stat_statements.max", "pg_stat_statements.max"),
    ]
    assert cnpg.conflicts({}) == []


CLUSTER: dict[str, Any] = {
    "metadata": {
        "managedFields": [
            {
                "manager": "argocd",
                "operation": "Apply",
                "fieldsV1": {
                    "f:spec": {
                        "f:instances": {},
                        "f:postgresql": {"f:parameters": {"f:max_connections": {}, "f:pg_stat_statements.max": {}}},
                    }
                },
            },
            {
                "manager": "pgscale/app",
                "operation": "Apply",
                "fieldsV1": {"f:spec": {"f:postgresql": {"f:parameters": {"f:max_connections": {}, "f:work_mem": {}}}}},
            },
            {"manager": "pgscale/app", "operation": "Update", "fieldsV1": {"f:spec": {"f:instances": {}}}},
        ]
    },
    "spec": {
        "instances": 1,
        "postgresql": {"parameters": {"max_connections": "100", "work_mem": "4MB", "pg_stat_statements.max": "5000"}},
    },
}


def test_managed_fields_by_manager() -> None:
    assert cnpg.owned_parameters(CLUSTER, "pgscale/app") == {"max_connections", "work_mem"}
    assert cnpg.owned_parameters(CLUSTER, "argocd") == {"max_connections", "pg_stat_statements.max"}
    assert not cnpg.owns_instances(CLUSTER, "pgscale/app")  # an Update entry is not the apply set
    assert cnpg.owns_instances(CLUSTER, "argocd")
    assert cnpg.owned_parameters(CLUSTER, "nobody") == set()
    assert cnpg.managers_of(CLUSTER, "spec.postgresql.parameters.max_connections") == ["argocd", "pgscale/app"]
    assert cnpg.managers_of(CLUSTER, "spec.instances") == ["argocd", "pgscale/app"]
    assert cnpg.managers_of(CLUSTER, "spec.postgresql.parameters.pg_stat_statements.max") == ["argocd"]


def test_value_at_reads_parameters_by_whole_name() -> None:
    assert cnpg.value_at(CLUSTER, "spec.postgresql.parameters.pg_stat_statements.max") == "5000"
    assert cnpg.value_at(CLUSTER, "spec.instances") == 1
    assert cnpg.value_at(CLUSTER, "spec.storage.size") is None


def test_owned_by_and_hash() -> None:
    mine = cnpg.pooler(OWNER, "app-pooler-rw", "pg", "rw", PoolingSpec())
    assert cnpg.owned_by(mine, OWNER)
    assert not cnpg.owned_by({"metadata": {"name": "x"}}, OWNER)
    other = cnpg.pooler(OWNER, "app-pooler-rw", "pg", "rw", PoolingSpec(instances=3))
    assert cnpg.spec_hash(mine) != cnpg.spec_hash(other) and len(cnpg.spec_hash(mine)) == 16


def test_removal_ops_take_only_what_pgscale_alone_holds() -> None:
    live = {**CLUSTER, "metadata": {**CLUSTER["metadata"], "resourceVersion": "42"}}
    ops = cnpg.removal_ops(live, "pgscale/app", keep=set(), keep_instances=False)
    # max_connections is argocd's too (it stays, with argocd's value); instances is argocd's by apply.
    assert ops == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
        {"op": "remove", "path": "/spec/postgresql/parameters/work_mem"},
    ]
    assert cnpg.removal_ops(live, "pgscale/app", keep={"work_mem"}, keep_instances=False) == []
    mine = {
        "metadata": {
            "resourceVersion": "7",
            "managedFields": [
                {
                    "manager": "pgscale/app",
                    "operation": "Apply",
                    "fieldsV1": {"f:spec": {"f:instances": {}, "f:postgresql": {"f:parameters": {"f:a/b~c": {}}}}},
                }
            ],
        }
    }
    assert [o["path"] for o in cnpg.removal_ops(mine, "pgscale/app", set(), keep_instances=False)] == [
        "/metadata/resourceVersion",
        "/spec/postgresql/parameters/a~1b~0c",
        "/spec/instances",
    ]
    assert len(cnpg.removal_ops(mine, "pgscale/app", set(), keep_instances=True)) == 2


def test_empties_a_map_recognises_the_api_servers_null_map() -> None:
    message = (
        'Cluster.postgresql.cnpg.io "db" is invalid: [spec.postgresql.parameters: Invalid value: "null": '
        'spec.postgresql.parameters in body must be of type object: "null"]'
    )
    assert cnpg.empties_a_map({"code": 422, "message": message})
    assert not cnpg.empties_a_map({"code": 422, "message": "spec.instances: Invalid value: 0"})
    assert not cnpg.empties_a_map({"code": 409, "message": message})
