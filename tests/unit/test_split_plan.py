"""DatabaseSplit's pure parts: the model's defaults, names of the replication objects, where the spec wants
the writes, the application's Secret and the status line."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from pgscale.api.databasesplit import CutoverReport, DatabaseSplitSpec, DatabaseSplitStatus, TableSync
from pgscale.controllers.databasesplit import desired_side, reached, replication_info
from pgscale.kube import ObjectRef
from pgscale.pg.connection import ConnInfo
from pgscale.pg.split import CrossKey, Names, label, sql_name
from pgscale.specs.split import connection_secret, quote
from pgscale.split import Report, Side
from pgscale.statusview import split_progress

BASE = {
    "source": {"profileRef": {"name": "app"}},
    "target": {"profileRef": {"name": "messages"}},
    "tables": [{"name": "Message"}],
}


def spec(**changes: object) -> DatabaseSplitSpec:
    return DatabaseSplitSpec.model_validate({**BASE, **changes})


def test_defaults_live_in_the_model() -> None:
    s = spec()
    assert s.phase == "replicate" and s.cross_foreign_keys == "refuse" and s.drop_source_tables is False
    budget = s.lock_budget_or_default
    assert (budget.lock_timeout_ms, budget.retries, budget.catch_up_seconds) == (2000, 30, 10.0)
    assert s.secret_name_or_default("messages") == "messages-connection"
    with pytest.raises(ValidationError):
        spec(phase="switch")
    with pytest.raises(ValidationError):
        spec(tables=[{"name": 'Message"; DROP TABLE x'}])


def test_names_are_stable_identifiers_per_split() -> None:
    a, b = Names.of("ns/messages"), Names.of("ns/files")
    assert a == Names.of("ns/messages") and a != b
    assert a.forward == f"{a.publication}_fwd" and a.reverse == f"{a.publication}_rev"
    assert len(a.forward) <= 63 and a.forward.replace("_", "").isalnum() and a.forward == a.forward.lower()


def test_messages_write_sql_as_it_must_be_written() -> None:
    assert label(("public", "Message")) == 'public."Message"'
    assert label(("sales", "orders")) == "sales.orders"
    assert sql_name('we"ird') == '"we""ird"'
    key = CrossKey("Message_taskId_fkey", ("public", "Message"), ("public", "Task"), outgoing=True)
    assert key.drop_sql() == 'ALTER TABLE public."Message" DROP CONSTRAINT "Message_taskId_fkey"'


def report(phase: str, writes_to: str, done: bool = True) -> Report:
    return Report(phase=phase, writes_to=writes_to, message="", done=done)  # type: ignore[arg-type]


def test_ready_only_where_the_spec_asks() -> None:
    assert desired_side(spec()) == "source" and desired_side(spec(phase="rollback")) == "source"
    assert desired_side(spec(phase="cutover")) == "target" and desired_side(spec(phase="finalize")) == "finalize"
    assert reached(spec(), report("Replicating", "source"))
    assert not reached(spec(), report("Copying", "source", done=False))
    assert not reached(spec(phase="cutover"), report("Replicating", "source"))
    assert reached(spec(phase="cutover"), report("CutOver", "target"))
    assert reached(spec(phase="rollback"), report("Replicating", "source"))
    assert not reached(spec(phase="finalize"), report("CutOver", "target"))
    assert reached(spec(phase="finalize"), report("Finalized", "target"))


def test_replication_host_overrides_only_where_to_connect() -> None:
    info = ConnInfo(host="10.0.0.1", port=6432, dbname="app", user="u", password="p")
    s = spec(source={"profileRef": {"name": "app"}, "replicationHost": "db.internal"})
    got = replication_info(info, s.source)
    assert (got.host, got.port, got.dbname, got.user, got.password) == ("db.internal", 5432, "app", "u", "p")
    assert replication_info(info, s.target) == info


def test_subscription_connection_string_quotes_the_password() -> None:
    info = ConnInfo(host="h", port=5432, dbname="app", user="u", password="p w'x")
    text = Side(conn=None, state_schema="pgscale", replication=info).conninfo()  # type: ignore[arg-type]
    assert "password='p w\\'x'" in text and "host=h" in text


def test_the_applications_secret() -> None:
    owner = ObjectRef("pgscale.io/v1alpha1", "DatabaseSplit", "ns", "messages", "uid-1")
    info = ConnInfo(host="db", port=5433, dbname="my db", user="app@x", password="p/w:%")
    secret = connection_secret(owner, "messages-connection", info, "target")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["uri"] == "postgresql://app%40x:p%2Fw%3A%25@db:5433/my%20db"
    assert (data["host"], data["port"], data["dbname"], data["username"], data["password"]) == (
        "db",
        "5433",
        "my db",
        "app@x",
        "p/w:%",
    )
    assert secret["metadata"]["labels"]["pgscale.io/writes-to"] == "target"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert quote("é") == "%C3%A9"


def test_status_line() -> None:
    status = DatabaseSplitStatus(
        phase="CutOver",
        writes_to="target",
        tables=[TableSync(name="public.Message", state="ready")],
        lag_bytes=0,
        longest_write_block_ms=46,
        last_cutover=CutoverReport(direction="toTarget", time="2026-01-01T00:00:00Z", write_block_ms=46),
        connection_secret="messages-connection",
    )
    line = split_progress(status, wide=True)
    assert "CutOver (writes to target)" in line and "1/1 tables ready" in line
    assert "longest write block 46 ms" in line and "Secret messages-connection" in line
    assert split_progress(DatabaseSplitStatus()) == "-"
