"""Cache: key templates, sizing, the SQL a template becomes, and the objects the builders return."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from pgscale.api.cache import CacheSpec, InvalidateRule
from pgscale.api.databaseprofile import DatabaseProfileSpec
from pgscale.cache import (
    MI,
    Column,
    cache_id,
    container_memory,
    function_name,
    maxmemory,
    parse_template,
    plan_table,
)
from pgscale.errors import SpecError
from pgscale.kube import ObjectRef
from pgscale.pg.cache import function_sql, key_expression
from pgscale.specs import cache as specs

OWNER = ObjectRef("pgscale.io/v1alpha1", "Cache", "shop", "tasks", "0123-4567")
PASSWORD = "a" * 64


def spec(**extra: Any) -> CacheSpec:
    return CacheSpec.model_validate({"profileRef": {"name": "app"}, **extra})


def profile(**extra: Any) -> DatabaseProfileSpec:
    return DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "db"}}, **extra})


def test_defaults() -> None:
    s = spec()
    assert (s.image, s.maxmemory_policy, s.persistence, s.maxmemory_percent) == (
        "valkey/valkey:8.1",
        "allkeys-lru",
        "off",
        75,
    )
    assert s.relay_or_default.batch_size == 500 and s.invalidate == []


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("task:{id}", ("task:", Column("id"))),
        ("user-tasks:{userId}", ("user-tasks:", Column("userId"))),
        ("{a}{b}", (Column("a"), Column("b"))),
        ("all-tasks", ("all-tasks",)),
        ("q'\"x:{Code}:y", ("q'\"x:", Column("Code"), ":y")),
    ],
)
def test_templates_parse_into_text_and_columns(text: str, parts: tuple[Any, ...]) -> None:
    assert parse_template(text).parts == parts


@pytest.mark.parametrize("text", ["task:{id", "task:}", "task:{1x}", "a b", "", "{}"])
def test_bad_templates_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_template(text)


def test_model_refuses_what_the_parser_refuses() -> None:
    for bad in ["task:{id", "x:{id);DROP TABLE t;--}", "a b"]:
        with pytest.raises(ValidationError):
            InvalidateRule.model_validate({"table": {"name": "Task"}, "keys": [bad]})


def test_unknown_column_names_the_field_and_the_fix() -> None:
    rule = InvalidateRule.model_validate({"table": {"name": "Task"}, "keys": ["task:{id}", "u:{userid}"]})
    with pytest.raises(SpecError) as err:
        plan_table(rule, 2, ["id", "userId", "title"])
    assert err.value.field == "invalidate[2].keys[1]" and err.value.reason == "ColumnNotFound"
    assert "did you mean {userId}" in err.value.message and "id, userId, title" in err.value.message
    tag = InvalidateRule.model_validate({"table": {"name": "Task"}, "tag": "t:{nope}"})
    with pytest.raises(SpecError) as err:
        plan_table(tag, 0, ["id"])
    assert err.value.field == "invalidate[0].tag"
    plan = plan_table(rule.model_copy(update={"keys": ["task:{id}"], "tag": "tasks"}), 0, ["id"])
    assert [t.source for t in plan.keys] == ["task:{id}"] and [t.source for t in plan.tags] == ["tasks"]


def test_glob_of_a_template_escapes_its_text() -> None:
    assert parse_template("task:{id}").glob() == "task:*"
    assert parse_template("a*[b]?:{x}:{y}").glob() == "a\\*\\[b\\]\\?:*:*"
    assert parse_template("all").glob() == "all"


def test_render_matches_what_sql_gives_for_plain_values() -> None:
    t = parse_template("user-tasks:{userId}")
    assert t.render({"userId": 7}) == "user-tasks:7"
    assert t.render({"userId": None}) is None


def test_key_expression_quotes_identifiers_and_literals() -> None:
    expr = key_expression(parse_template("it's:{Code}:x"), "OLD").as_string(None)
    assert expr == "'it''s:'::text || (OLD.\"Code\")::text || ':x'::text"
    with pytest.raises(AssertionError):
        key_expression(parse_template("a:{id}"), "NEW; DROP")


def test_function_sql_has_no_raw_spec_text() -> None:
    rule = InvalidateRule.model_validate(
        {"table": {"schema": "App", "name": "Task"}, "keys": ["t:{id}", "q'x:{Code}"], "tag": "tag:{id}"}
    )
    plan = plan_table(rule, 0, ["id", "Code"])
    cid = cache_id("ns", "c")
    text = function_sql("pgscale", cid, plan).as_string(None)
    assert f'"pgscale"."{function_name(cid, plan.table)}"' in text
    assert "SECURITY DEFINER" in text and "SET search_path = pg_catalog, pg_temp" in text
    assert "'UTC'" in text and "pg_notify" in text
    # The body is one literal: the template's quote is doubled twice (inside the body, and the body itself).
    assert "q''''x:" in text and "q'x" not in text.replace("q''''x", "")


def test_sizing_from_tier_resources_and_explicit_memory() -> None:
    assert container_memory(spec(), profile(tier="development")) == 256 * MI
    assert container_memory(spec(), profile(tier="production")) == 1024 * MI
    assert container_memory(spec(), profile(tier="high-load")) == 4096 * MI
    assert container_memory(spec(), profile(resources={"cpu": 4, "memory": "16Gi"})) == 1024 * MI
    assert container_memory(spec(), profile(resources={"cpu": 64, "memory": "1Ti"})) == 4096 * MI
    assert container_memory(spec(), profile()) == 256 * MI
    assert container_memory(spec(memory="512Mi"), profile(tier="high-load")) == 512 * MI
    assert maxmemory(spec(), 256 * MI) == 192 * MI
    assert maxmemory(spec(maxmemoryPercent=50), 1000 * MI) == 500 * MI
    for odd in ("1e3", "500m", "-1"):  # quantities the CRD accepts and memory cannot be
        with pytest.raises(SpecError) as err:
            maxmemory(spec(memory=odd), container_memory(spec(memory=odd), None))
        assert err.value.field == "memory"
    with pytest.raises(SpecError) as err:
        maxmemory(spec(memory="16Mi"), 16 * MI)
    assert err.value.field == "memory" and err.value.reason == "MemoryTooSmall"


def test_server_config() -> None:
    text = specs.server_config(spec(), maxmemory_bytes=192 * MI)
    lines = text.splitlines()
    assert f"maxmemory {192 * MI}" in lines and "maxmemory-policy allkeys-lru" in lines
    assert 'save ""' in lines and "appendonly no" in lines
    assert lines[-1] == "include /etc/cache-auth/auth.conf"  # last: nothing after it can set a password
    assert "requirepass" not in text
    aof = specs.server_config(spec(persistence="aof"), maxmemory_bytes=MI).splitlines()
    assert "appendonly yes" in aof and 'save ""' in aof
    rdb = specs.server_config(spec(persistence="rdb", maxmemoryPolicy="allkeys-lfu"), maxmemory_bytes=MI)
    assert "appendonly no" in rdb and "maxmemory-policy allkeys-lfu" in rdb and 'save ""' not in rdb
    with pytest.raises(ValueError):
        specs.auth_config("a b\nrequirepass x")


def decoded(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_secrets() -> None:
    auth = decoded(specs.auth_secret(OWNER, PASSWORD))
    assert auth == {"password": PASSWORD, "auth.conf": f"requirepass {PASSWORD}\n"}
    app = decoded(specs.app_secret(OWNER, PASSWORD))
    assert app["url"] == f"redis://:{PASSWORD}@tasks-cache.shop.svc:6379/0"
    assert app["host"] == "tasks-cache.shop.svc" and app["port"] == "6379"


def test_server_deployment_is_hardened_and_reads_the_password_from_the_secret() -> None:
    dep = specs.deployment(OWNER, spec(cpu="250m"), memory_bytes=256 * MI, config_hash="abc")
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    assert container["resources"] == {
        "requests": {"memory": str(256 * MI), "cpu": "250m"},
        "limits": {"memory": str(256 * MI)},
    }
    assert container["args"] == ["/etc/cache/cache.conf"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "tasks-cache-auth"
    assert volumes["config"]["configMap"]["name"] == "tasks-cache"
    assert dep["spec"]["template"]["metadata"]["annotations"]["pgscale.io/config-hash"] == "abc"
    assert dep["metadata"]["ownerReferences"][0]["kind"] == "Cache"
    assert specs.service(OWNER)["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_relay_deployment_gets_secrets_by_reference_only() -> None:
    s = spec(invalidate=[{"table": {"name": "Task"}, "keys": ["task:{id}"]}], relay={"batchSize": 50})
    raw = s.wire()
    dep = specs.relay_deployment(OWNER, s, raw, profile(), image="pgscale:1", cid="abc123abc123", memory_bytes=MI)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "pgscale:1" and container["args"][:2] == ["cache", "relay"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert container["args"][-2:] == ["--metrics-port", str(container["ports"][0]["containerPort"])]
    env = {e["name"]: e for e in container["env"]}
    assert env[specs.ENV_CACHE_URL]["valueFrom"]["secretKeyRef"] == {"name": "tasks-cache-app", "key": "url"}
    options = json.loads(env["PGSCALE_JOB_INPUT"]["value"])["options"]
    assert options == {
        "cacheId": "abc123abc123",
        "outbox": "cache_outbox_abc123abc123",
        "channel": "pgscale_cache_abc123abc123",
        "batchSize": 50,
        "pollInterval": "5s",
        "memoryBytes": MI,
    }
    assert "valueFrom" in env["PGSCALE_DB_PASSWORD"]
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_names_fit_postgres() -> None:
    cid = cache_id("a" * 63, "b" * 253)
    assert re.fullmatch(r"[0-9a-f]{12}", cid)
    rule = InvalidateRule.model_validate({"table": {"schema": "s" * 63, "name": "t" * 63}, "tag": "x"})
    assert len(function_name(cid, rule.table)) <= 63


def test_alert_rules_select_the_cache_and_use_the_thresholds() -> None:
    from pgscale.api.cache import CacheAlertsSpec

    alerts = CacheAlertsSpec.model_validate({"hitRatioPercent": 75, "memoryPercent": 90, "relayLagSeconds": 30})
    rules = {r["alert"]: r for r in specs.alert_rules(OWNER, alerts)}
    assert list(rules) == ["PgscaleCacheHitRatio", "PgscaleCacheMemory", "PgscaleCacheRelayLag"]
    assert all('cache="shop/tasks"' in r["expr"] for r in rules.values())
    assert rules["PgscaleCacheHitRatio"]["expr"].endswith("< 0.75")
    assert rules["PgscaleCacheMemory"]["expr"].endswith("> 0.9")
    assert rules["PgscaleCacheRelayLag"]["expr"].endswith("> 30")
    off = specs.alert_rules(OWNER, CacheAlertsSpec(hit_ratio_percent=0))
    assert [r["alert"] for r in off] == ["PgscaleCacheMemory", "PgscaleCacheRelayLag"]
    rule = specs.prometheus_rule(OWNER, alerts, {"release": "x", "app.kubernetes.io/managed-by": "me"})
    assert rule["metadata"]["labels"]["release"] == "x"
    assert rule["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "pgscale"  # ours win
    monitor = specs.pod_monitor(OWNER, {})
    relay = specs.relay_deployment(OWNER, spec(), {}, profile(), image="i", cid="c" * 12, memory_bytes=MI)
    assert monitor["spec"]["selector"]["matchLabels"] == relay["spec"]["selector"]["matchLabels"]
