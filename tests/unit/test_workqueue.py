from __future__ import annotations

import asyncio

from pgscale.runtime import WorkQueue


def test_key_is_queued_once_and_rerun_when_dirty() -> None:
    async def scenario() -> list[str]:
        q = WorkQueue()
        q.add("a")
        q.add("a")
        assert len(q) == 1
        key = await q.get()
        q.add("a")  # changed while in work
        assert len(q) == 0
        q.done(key)
        assert len(q) == 1
        return [str(await q.get())]

    assert asyncio.run(scenario()) == ["a"]


def test_add_after_keeps_the_earliest() -> None:
    async def scenario() -> str:
        q = WorkQueue()
        q.add_after("k", 0.05)
        q.add_after("k", 10)
        return str(await asyncio.wait_for(q.get(), 2))

    assert asyncio.run(scenario()) == "k"


def test_failures_back_off_exponentially_and_reset_on_success() -> None:
    from pgscale.controllers.base import Context, Outcome, Settings
    from pgscale.runtime import MAX_BACKOFF_SECONDS, Runtime

    runtime = Runtime(Context(kube=None, settings=Settings()), workers=1)  # type: ignore[arg-type]
    key = ("retentionpolicies", "ns", "rp")
    delays = [runtime.delay(key, Outcome(10.0, failed=True)) for _ in range(8)]
    assert delays[:4] == [10.0, 20.0, 40.0, 80.0] and delays[-1] == MAX_BACKOFF_SECONDS
    assert runtime.delay(key, Outcome(300.0, failed=False)) == 300.0
    assert runtime.delay(key, Outcome(10.0, failed=True)) == 10.0


def test_a_new_profile_wakes_the_policies_waiting_for_it() -> None:
    """A policy created before its profile looks again when the profile appears, not after its backoff."""
    from typing import Any, cast

    import kopf

    from pgscale.controllers.base import Context, Outcome, Settings
    from pgscale.runtime import Runtime

    async def scenario() -> list[Any]:
        runtime = Runtime(Context(kube=None, settings=Settings()), workers=1)  # type: ignore[arg-type]

        async def event(plural: str, name: str, spec: dict[str, Any]) -> None:
            raw = cast("kopf.RawBody", {"metadata": {"namespace": "ns", "name": name, "generation": 1}, "spec": spec})
            await runtime.on_event(event={"type": "ADDED", "object": raw}, body=kopf.Body(raw),
                                   resource=kopf.Resource("pgscale.io", "v1alpha1", plural))  # fmt: skip

        await event("partitionpolicies", "pp", {"profileRef": {"name": "app"}})
        await event("retentionpolicies", "other", {"profileRef": {"name": "elsewhere"}})
        for key in [await runtime.queue.get(), await runtime.queue.get()]:
            runtime.queue.done(key)
            assert isinstance(key, tuple)
            runtime.delay(key, Outcome(30.0, failed=True))  # both fail: ProfileNotFound
        await event("databaseprofiles", "app", {"connection": {}})
        woken = [await runtime.queue.get(), await runtime.queue.get()]
        return [woken, len(runtime.queue), runtime.delay(("partitionpolicies", "ns", "pp"), Outcome(5.0, True))]

    woken, left, delay = asyncio.run(scenario())
    assert sorted(woken) == [("databaseprofiles", "ns", "app"), ("partitionpolicies", "ns", "pp")]
    assert left == 0 and delay == 5.0  # the backoff started over


def test_an_api_outage_is_one_line() -> None:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    from pgscale.runtime import describe, unreachable

    refused = urllib3.exceptions.MaxRetryError(
        None,  # type: ignore[arg-type]
        "/apis/pgscale.io/v1alpha1",
        reason=urllib3.exceptions.NewConnectionError(None, "Failed to establish a new connection: refused"),  # type: ignore[arg-type]
    )
    assert unreachable(refused) and unreachable(ApiException(status=503)) and unreachable(ConnectionRefusedError())
    assert not unreachable(ApiException(status=404)) and not unreachable(KeyError("x"))
    line = describe(refused)
    assert "\n" not in line and line.startswith("MaxRetryError: ") and "refused" in line
