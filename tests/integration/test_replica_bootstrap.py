"""The replica pod's bootstrap, run for real: a second PostgreSQL becomes a streaming
standby of the test primary through its slot, sees new rows, and refuses writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import localenv
import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from conftest import pod_env, scalar
from pgscale.api.databaseprofile import ReadReplicasSpec
from pgscale.kube import ObjectRef
from pgscale.monitoring import ProfileCollector
from pgscale.pg import replication, stats
from pgscale.specs import replicas

# pg_basebackup and a second server of the primary's version: Debian's client programs (the other
# versions' package ships only the server).
pytestmark = [pytest.mark.postgres, pytest.mark.debian_pg15]


def test_bootstrap_makes_a_streaming_standby(postgres: Any, database: str, tmp_path: Path) -> None:
    role = f"repl_{uuid.uuid4().hex[:8]}"
    owner = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", "ns", f"app{uuid.uuid4().hex[:6]}", "uid")
    spec = ReadReplicasSpec.model_validate(
        {"instances": 1, "replicationSecretRef": {"name": "repl"}, "storage": {"size": "1Gi"}}
    )
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        problems = replication.readiness_problems(conn, role, 1)
        assert any("must exist with REPLICATION" in p for p in problems)
        conn.execute(f"CREATE ROLE {role} WITH REPLICATION LOGIN PASSWORD 'p:w\\x'")
        assert replication.readiness_problems(conn, role, 1) == []
        slot = replicas.slot_names(owner, 1)[0]
        replication.create_slot(conn, slot)
        conn.execute("CREATE TABLE replicated (x int)")
    sts = replicas.statefulset(owner, spec, image="postgres:15", primary_host="127.0.0.1", primary_port=postgres.port)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = pod_env(
        container["env"],
        {"repl": {"username": role, "password": "p:w\\x"}},
        pod_name=f"{replicas.statefulset_name(owner)}-0",
    )
    workdir = tmp_path / "replica"
    workdir.mkdir()
    user = localenv._os_user()
    if user:
        shutil.chown(workdir, user)
    for parent in [tmp_path, *tmp_path.parents]:
        if parent != Path("/"):
            parent.chmod(parent.stat().st_mode | 0o711)
    port = localenv.free_port()
    # Outside a pod: a data directory and a port of this machine, nothing else changed.
    server_args = f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={workdir}"
    env |= {
        "PGDATA": str(workdir / "pgdata"),
        "PATH": f"/usr/lib/postgresql/15/bin:{os.environ['PATH']}",
        "POSTGRES_ARGS": server_args,
    }
    script = workdir / "bootstrap.sh"
    script.write_text(replicas.config_map(owner)["data"]["bootstrap.sh"])
    cmd = ["sh", str(script)]
    if user:
        cmd = ["runuser", "-u", user, "--", "env", *[f"{k}={v}" for k, v in env.items()], *cmd]
    log = (tmp_path / "replica.log").open("wb")
    proc = subprocess.Popen(
        cmd, env=None if user else env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        standby = dict(host="127.0.0.1", port=port, dbname=database, user="postgres", password=postgres.PASSWORD)

        def accepts() -> bool:
            with psycopg.connect(**standby):
                return True

        localenv.wait_for("standby", accepts, timeout=60, log=tmp_path / "replica.log")
        with psycopg.connect(postgres.dsn(database), autocommit=True) as primary:
            primary.execute("INSERT INTO replicated VALUES (42)")
        with psycopg.connect(**standby, autocommit=True) as conn:
            assert scalar(conn, "SELECT pg_is_in_recovery()") is True
            deadline = time.monotonic() + 20
            while scalar(conn, "SELECT x FROM replicated") != 42:  # streamed, not copied by the clone
                assert time.monotonic() < deadline, "the row never reached the standby"
                time.sleep(0.1)
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO replicated VALUES (1)")
            auto = (workdir / "pgdata" / "postgresql.auto.conf").read_text()
        assert "p:w" not in auto and f"primary_slot_name = '{slot}'" in auto  # the password is in a passfile
        with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
            streaming = replication.standbys(conn)
            pod = f"{replicas.statefulset_name(owner)}-0"
            assert pod in streaming
            assert replication.slots(conn, replicas.slot_prefix(owner))[slot].active
            # The lag reaches the metrics endpoint's families.
            collector = ProfileCollector()
            collector.update("ns/app", stats.snapshot(conn), 0)
            registry = CollectorRegistry()
            registry.register(collector)
            text = generate_latest(registry).decode()
            assert f'pgscale_pg_replication_lag_bytes{{profile="ns/app",replica="{pod}"}}' in text
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
            for s in replication.slots(conn, replicas.slot_prefix(owner)).values():
                replication.drop_slot(conn, s)
            conn.execute(f"DROP ROLE {role}")
