"""The redaction layer: no shape of connection string gets its password past it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from malformed import CASES, PASSWORD
from pgscale import conditions as cond
from pgscale import redact
from pgscale.api.databaseprofile import ConnectionSpec
from pgscale.cli import setup_logging
from pgscale.errors import DependencyError
from pgscale.pg.connection import resolve, uri_problem


@pytest.fixture(autouse=True)
def fresh_registry() -> Iterator[None]:
    redact.forget_all()
    yield
    redact.forget_all()


@pytest.mark.parametrize(
    "text",
    [
        f"postgresql://app:{PASSWORD}@h/db",
        f"postgres://app:{PASSWORD}@h:5432/db?sslmode=require",
        f"postgresql://app:{PASSWORD}@x@h/db",
        f"postgresql://app:{PASSWORD}'q\"@h/db",
        f"postgresql://app:{PASSWORD}",
        f"host=h password={PASSWORD} user=app",
        f"host=h password='{PASSWORD} with space' user=app",
        f"host=h password='{PASSWORD}",
        f'{{"password": "{PASSWORD}"}}',
        f"{{'password': '{PASSWORD}'}}",
        f"PGPASSWORD={PASSWORD}",
        f"AWS_SECRET_ACCESS_KEY={PASSWORD}",
        f"aws_secret_access_key: {PASSWORD}",
        f's3 secretKey="{PASSWORD}"',
        f"db_password={PASSWORD}",
    ],
)
def test_shapes_are_redacted_without_knowing_the_value(text: str) -> None:
    out = redact.redact(f"failed: {text}; retry")
    assert PASSWORD not in out and redact.MASK in out
    assert redact.redact(out) == out  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "cannot connect to app@127.0.0.1:5432/db: connection refused",
        "http://127.0.0.1:8080/healthz and https://[::1]:6443/api",
        "Secret 'db' with keys username and password not found",
        "spec.maintenance.interval: must be at most 52w",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact.redact(text) == text


def test_remembered_values_are_removed_in_any_context() -> None:
    redact.remember_secret({"password": "has spaces and 'quotes", "username": "appuser", "token": "tok-123456"})
    out = redact.redact("x has spaces and 'quotes y tok-123456 z appuser")
    assert "spaces" not in out and "tok-123456" not in out and "appuser" in out


def test_short_values_are_not_remembered() -> None:
    redact.remember("s", "app")
    assert redact.redact("s3 app") == "s3 app"


@pytest.mark.parametrize("case", sorted(CASES))
def test_resolve_never_quotes_the_secret(case: str) -> None:
    """The root cause: resolve's own message names the key and the problem, never the value."""
    spec = ConnectionSpec.model_validate({"secretRef": {"name": "db"}})
    try:
        info = resolve(spec, CASES[case], "db")
    except DependencyError as exc:
        assert exc.reason == "InvalidSecret"
        assert PASSWORD not in exc.message and "'db'" in exc.message
        assert exc.__cause__ is None or PASSWORD not in redact.redact(str(exc.__cause__))
        return
    assert info.describe() and PASSWORD not in info.describe()


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_case_is_redacted_once_read(case: str) -> None:
    """Whatever a parser or libpq quotes of it, once the Secret is read no part of the password survives."""
    redact.remember_secret(CASES[case])
    raw = CASES[case]["uri"]
    text = f'invalid: "{raw}" ({raw!r}) {json.dumps(raw)}'
    assert PASSWORD not in redact.redact(text)
    conditions = cond.stalled([], "InvalidSecret", text, 1)
    assert PASSWORD not in json.dumps([c.wire() for c in conditions])


@pytest.mark.parametrize(("fmt", "level"), [("text", "info"), ("json", "info"), ("text", "debug"), ("json", "debug")])
def test_logs_in_every_format(fmt: str, level: str, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(fmt, level)
    log = logging.getLogger("pgscale.test")
    uri = f"postgresql://app:{PASSWORD}@[::1/db"
    log.info("connecting with %s", uri)
    log.debug("dsn host=h password='%s", PASSWORD)
    try:
        raise ValueError(f"bad uri {uri}")
    except ValueError:
        log.exception("failed %s", {"password": PASSWORD})
    logging.getLogger("kopf.objects").warning("uri=%s", uri)
    err = capsys.readouterr().err
    assert "connecting with" in err and "Traceback" in err
    assert PASSWORD not in err


def test_stream_redacts_whole_lines(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    stream = redact.RedactingStream(sys.stdout)
    stream.write(f"password={PASSWORD[:4]}")
    stream.write(f"{PASSWORD[4:]} end\nnext ")
    stream.flush()
    out = capsys.readouterr().out
    assert PASSWORD not in out and out.endswith("next ")


@pytest.mark.parametrize(
    "raw", ["mysql://a:b@c/d", "host=h password='x", "host=h password=x 'y", "postgresql://a@[::1/db", "%zz"]
)
def test_invalid_secret_messages_survive_redaction_intact(raw: str) -> None:
    """pgscale's own explanation is not mistaken for a secret (it quotes none)."""
    message = uri_problem(raw)
    assert redact.redact(message) == message


def test_a_remembered_value_is_masked_as_a_whole_word_only() -> None:
    """A Secret whose password is a common word must not garble field names in messages."""
    from pgscale import redact as r

    r.remember("secret")
    try:
        text = "Secret 'app-db' not found (spec.connection.secretRef.name); password secret, uri x:secret@h"
        assert r.redact(text) == "Secret 'app-db' not found (spec.connection.secretRef.name); password ***, uri x:***@h"
    finally:
        r.forget_all()
