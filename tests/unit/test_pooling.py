from __future__ import annotations

import base64

import pytest

from pgscale.api.databaseprofile import PGBOUNCER_PARAMETERS, PoolingSpec
from pgscale.kube import ObjectRef
from pgscale.specs import pooling

OWNER = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", "ns", "app", "1234-5678-90ab")


def ini(spec: PoolingSpec | None = None, /, **kwargs: object) -> str:
    args: dict[str, object] = {
        "backend_host": "app-rw.ns.svc",
        "backend_port": 5432,
        "dbname": "app",
        "auth_file": "/etc/pgbouncer/userlist.txt",
        **kwargs,
    }
    return pooling.pgbouncer_ini(spec or PoolingSpec(), **args)  # type: ignore[arg-type]


def settings(text: str) -> dict[str, str]:
    """The [pgbouncer] section as PgBouncer's parser reads it (key = rest of line, stripped)."""
    section = text.split("[pgbouncer]\n", 1)[1]
    out: dict[str, str] = {}
    for line in section.splitlines():
        if line and not line.startswith(";"):
            key, _, value = line.partition("=")
            assert key.strip() not in out, f"{key} twice"
            out[key.strip()] = value.strip()
    return out


def test_defaults() -> None:
    text = ini()
    assert "[databases]\napp = host='app-rw.ns.svc' port=5432 dbname='app'\n" in text
    assert settings(text) == {
        "listen_addr": "*",
        "listen_port": "5432",
        "unix_socket_dir": "",
        "auth_type": "scram-sha-256",
        "auth_file": "/etc/pgbouncer/userlist.txt",
        "pool_mode": "transaction",
        "default_pool_size": "20",
        "min_pool_size": "0",
        "reserve_pool_size": "0",
        "max_client_conn": "1000",
        "max_db_connections": "0",
        "ignore_startup_parameters": "extra_float_digits",
        "logfile": "",
        "pidfile": "",
        "syslog": "0",
    }
    assert text.endswith("\n") and "admin_users" not in text


def test_overrides_and_parameters_in_stable_order() -> None:
    spec = PoolingSpec.model_validate(
        {
            "poolMode": "session",
            "defaultPoolSize": 7,
            "minPoolSize": 2,
            "reservePoolSize": 3,
            "maxClientConnections": 50,
            "maxDbConnections": 9,
            "parameters": {
                "server_lifetime": "600",
                "ignore_startup_parameters": "options, extra_float_digits",
                "log_connections": "0",
            },
        }
    )
    text = ini(
        spec, listen_port=6432, admin_users=["admin", "ops"], unix_socket_dir="/run/pgbouncer", listen_addr="0.0.0.0"
    )
    got = settings(text)
    assert got["pool_mode"] == "session" and got["default_pool_size"] == "7"
    assert (got["min_pool_size"], got["reserve_pool_size"]) == ("2", "3")
    assert (got["max_client_conn"], got["max_db_connections"]) == ("50", "9")
    assert (got["listen_addr"], got["listen_port"], got["unix_socket_dir"]) == ("0.0.0.0", "6432", "/run/pgbouncer")
    assert got["admin_users"] == got["stats_users"] == "admin,ops"
    # ours first, the user's added, none twice
    assert got["ignore_startup_parameters"] == "extra_float_digits,options"
    keys = list(got)
    assert keys[-2:] == ["log_connections", "server_lifetime"]  # user parameters last, sorted
    assert (
        ini(
            spec,
            listen_port=6432,
            admin_users=["admin", "ops"],
            unix_socket_dir="/run/pgbouncer",
            listen_addr="0.0.0.0",
        )
        == text
    )
    assert settings(ini(admin_users=["a"], stats_users=["m"]))["stats_users"] == "m"


@pytest.mark.parametrize("dbname", ["", "a b", "a=b", "a;b", "a'b", 'a"b', "a\nb", "*", "pgbouncer", "app#1"])
def test_unsafe_dbname_rejected(dbname: str) -> None:
    with pytest.raises(ValueError, match="database name"):
        ini(dbname=dbname)


@pytest.mark.parametrize("host", ["", "h\nlisten_port = 1", "a=b", "h;x", "h'x", 'h"x', "h x", "h\\x"])
def test_unsafe_host_rejected(host: str) -> None:
    with pytest.raises(ValueError, match="backend host"):
        ini(backend_host=host)


def test_hosts_that_are_fine() -> None:
    for host in ("10.0.0.7", "::1", "db-0.db.ns.svc.cluster.local"):
        assert f"host='{host}'" in ini(backend_host=host)


def test_parameters_rechecked_against_allow_list() -> None:
    spec = PoolingSpec.model_validate({"parameters": {"listen_port": "1"}})  # the CRD, not pydantic, forbids it
    with pytest.raises(ValueError, match="listen_port not allowed"):
        ini(spec)
    spec = PoolingSpec.model_validate({"parameters": {"server_reset_query": "DISCARD ALL\nauth_type = trust"}})
    with pytest.raises(ValueError, match="line break"):
        ini(spec)
    assert "verbose" in PGBOUNCER_PARAMETERS


UNSAFE = [
    {"admin_users": ["a,b"]},
    {"admin_users": ["a b"]},
    {"auth_file": "/x\n"},
    {"unix_socket_dir": "/x\ny = 1"},
    {"listen_addr": "* x"},
    {"backend_port": 0},
]


@pytest.mark.parametrize("kwargs", UNSAFE)
def test_other_unsafe_values_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ini(**kwargs)


def test_userlist_quoting() -> None:
    assert pooling.userlist("postgres", "secret") == '"postgres" "secret"\n'
    assert pooling.userlist('we"ird', 'p"w""x') == '"we""ird" "p""w""""x"\n'
    scram = "SCRAM-SHA-256$4096:c2FsdA==$abc=:def="
    assert pooling.userlist("app", scram) == f'"app" "{scram}"\n'
    for user, password in (("", "x"), ("a\nb", "x"), ("a", "x\ny")):
        with pytest.raises(ValueError):
            pooling.userlist(user, password)


def test_config_hash() -> None:
    h = pooling.config_hash("a", "b")
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == pooling.config_hash("a", "b")
    assert h != pooling.config_hash("a", "c")
    assert pooling.config_hash("ab", "c") != pooling.config_hash("a", "bc")


def test_names() -> None:
    assert pooling.pooler_name("app", "rw") == "app-pooler-rw"
    assert pooling.pooler_name("app", "ro") == "app-pooler-ro"


def test_config_secret() -> None:
    obj = pooling.config_secret(OWNER, "app-pooler-rw", "INI", 'USERS "x"')
    assert obj["kind"] == "Secret" and obj["type"] == "Opaque"
    assert base64.b64decode(obj["data"]["pgbouncer.ini"]) == b"INI"
    assert base64.b64decode(obj["data"]["userlist.txt"]) == b'USERS "x"'
    assert obj["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "pooler"


def test_deployment() -> None:
    spec = PoolingSpec.model_validate({"instances": 3, "resources": {"limits": {"memory": "64Mi"}}})
    obj = pooling.deployment(OWNER, "app-pooler-ro", spec, "pgbouncer:1", "app-pooler-ro", "abc123", "ro")
    meta = obj["metadata"]
    assert (obj["apiVersion"], obj["kind"], meta["name"], meta["namespace"]) == (
        "apps/v1",
        "Deployment",
        "app-pooler-ro",
        "ns",
    )
    owner_ref = meta["ownerReferences"][0]
    assert (owner_ref["kind"], owner_ref["name"], owner_ref["uid"], owner_ref["controller"]) == (
        "DatabaseProfile",
        "app",
        OWNER.uid,
        True,
    )
    assert meta["labels"] == {
        "app.kubernetes.io/managed-by": "pgscale",
        "app.kubernetes.io/component": "pooler",
        "pgscale.io/databaseprofile": "app",
        "pgscale.io/pooler-role": "ro",
    }
    assert obj["spec"]["replicas"] == 3
    template = obj["spec"]["template"]
    selector = obj["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()
    assert selector["pgscale.io/pooler-role"] == "ro"
    assert template["metadata"]["annotations"] == {"pgscale.io/config-hash": "abc123"}
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert pod["volumes"] == [{"name": "config", "secret": {"secretName": "app-pooler-ro", "defaultMode": 0o440}}]
    (container,) = pod["containers"]
    assert container["image"] == "pgbouncer:1"
    assert container["command"] == ["pgbouncer", "/etc/pgbouncer/pgbouncer.ini"]
    assert container["volumeMounts"] == [{"name": "config", "mountPath": "/etc/pgbouncer", "readOnly": True}]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"] == {"port": 5432}
    assert container["ports"][0]["containerPort"] == 5432
    assert container["resources"] == {"limits": {"memory": "64Mi"}}


def test_deployment_spec_image_wins_and_no_resources_by_default() -> None:
    spec = PoolingSpec.model_validate({"image": "custom/pgbouncer:2"})
    obj = pooling.deployment(OWNER, "app-pooler-rw", spec, "default:1", "s", "h", "rw")
    container = obj["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "custom/pgbouncer:2" and "resources" not in container
    assert obj["spec"]["replicas"] == 1


def test_new_config_changes_only_the_annotation() -> None:
    spec = PoolingSpec()
    a = pooling.deployment(OWNER, "n", spec, "img", "s", pooling.config_hash(ini()), "rw")
    b = pooling.deployment(OWNER, "n", spec, "img", "s", pooling.config_hash(ini(dbname="other")), "rw")
    assert a["spec"]["template"]["metadata"]["annotations"] != b["spec"]["template"]["metadata"]["annotations"]
    a["spec"]["template"]["metadata"].pop("annotations")
    b["spec"]["template"]["metadata"].pop("annotations")
    assert a == b


def test_service_selects_the_pooler_pods() -> None:
    svc = pooling.service(OWNER, "app-pooler-rw", "rw")
    dep = pooling.deployment(OWNER, "app-pooler-rw", PoolingSpec(), "img", "s", "h", "rw")
    assert svc["kind"] == "Service" and svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "pgbouncer", "port": 5432, "targetPort": "pgbouncer", "protocol": "TCP"}]
    assert svc["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert svc["metadata"]["labels"]["pgscale.io/pooler-role"] == "rw"
    ro = pooling.service(OWNER, "app-pooler-ro", "ro")
    assert ro["spec"]["selector"]["pgscale.io/pooler-role"] == "ro"
