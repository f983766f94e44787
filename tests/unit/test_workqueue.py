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
    from pgscale.controllers.base import Context, OperatorConfig, Outcome
    from pgscale.runtime import MAX_BACKOFF_SECONDS, Runtime

    runtime = Runtime(Context(kube=None, config=OperatorConfig()), workers=1)  # type: ignore[arg-type]
    key = ("retentionpolicies", "ns", "rp")
    delays = [runtime.delay(key, Outcome(10.0, failed=True)) for _ in range(8)]
    assert delays[:4] == [10.0, 20.0, 40.0, 80.0] and delays[-1] == MAX_BACKOFF_SECONDS
    assert runtime.delay(key, Outcome(300.0, failed=False)) == 300.0
    assert runtime.delay(key, Outcome(10.0, failed=True)) == 10.0


def test_clear_drops_queued_keys_and_timers() -> None:
    """A deposed leader takes no new work: nothing queued, nothing scheduled."""

    async def scenario() -> int:
        q = WorkQueue()
        q.add("a")
        q.add("b")
        q.add_after("c", 0.05)
        q.clear()
        await asyncio.sleep(0.1)
        return len(q)

    assert asyncio.run(scenario()) == 0


def test_a_standby_queues_nothing_until_it_leads() -> None:
    """Events are remembered while standing by; leading queues every resource seen."""
    from types import SimpleNamespace

    from pgscale.controllers.base import Context, OperatorConfig
    from pgscale.runtime import Runtime

    async def scenario() -> tuple[int, int, int]:
        runtime = Runtime(Context(kube=None, config=OperatorConfig()), workers=1)  # type: ignore[arg-type]
        body = {"metadata": {"namespace": "ns", "name": "p", "generation": 1}}
        await runtime.on_event(event={"type": "ADDED"}, body=body, resource=SimpleNamespace(plural="databaseprofiles"))  # type: ignore[arg-type,typeddict-item]
        standing_by = len(runtime.queue)
        runtime.lead()
        leading = len(runtime.queue)
        runtime.follow()
        return standing_by, leading, len(runtime.queue)

    assert asyncio.run(scenario()) == (0, 1, 0)


def test_a_profile_deleted_or_changed_wakes_failing_profiles() -> None:
    """A profile Stalled by SettingsConflict waits for the earlier one: its deletion brings a prompt look."""
    from types import SimpleNamespace

    from pgscale.controllers.base import Context, OperatorConfig, Outcome
    from pgscale.runtime import Runtime

    async def scenario() -> tuple[list[object], list[object]]:
        runtime = Runtime(Context(kube=None, config=OperatorConfig()), workers=1)  # type: ignore[arg-type]
        runtime.lead()
        res = SimpleNamespace(plural="databaseprofiles")
        for name in ("owner", "waiting"):
            body = {"metadata": {"namespace": "ns", "name": name, "generation": 1}}
            await runtime.on_event(event={"type": "ADDED"}, body=body, resource=res)  # type: ignore[arg-type,typeddict-item]
        while len(runtime.queue):
            runtime.queue.done(await runtime.queue.get())
        runtime.delay(("databaseprofiles", "ns", "waiting"), Outcome(30.0, failed=True))
        changed = {"metadata": {"namespace": "ns", "name": "owner", "generation": 2}}
        await runtime.on_event(event={"type": "MODIFIED"}, body=changed, resource=res)  # type: ignore[arg-type,typeddict-item]
        after_change = []
        while len(runtime.queue):
            key = await runtime.queue.get()
            after_change.append(key)
            runtime.queue.done(key)
        runtime.delay(("databaseprofiles", "ns", "waiting"), Outcome(30.0, failed=True))
        await runtime.on_event(event={"type": "DELETED"}, body=changed, resource=res)  # type: ignore[arg-type,typeddict-item]
        after_delete = [await runtime.queue.get() for _ in range(len(runtime.queue))]
        return after_change, after_delete

    after_change, after_delete = asyncio.run(scenario())
    assert sorted(after_change) == [("databaseprofiles", "ns", "owner"), ("databaseprofiles", "ns", "waiting")]  # type: ignore[type-var]
    assert after_delete == [("databaseprofiles", "ns", "waiting")]


def test_a_new_profile_wakes_the_policies_waiting_for_it() -> None:
    """A policy created before its profile looks again when the profile appears, not after its backoff."""
    from typing import Any, cast

    import kopf

    from pgscale.controllers.base import Context, OperatorConfig, Outcome
    from pgscale.runtime import Runtime

    async def scenario() -> list[Any]:
        runtime = Runtime(Context(kube=None, config=OperatorConfig()), workers=1)  # type: ignore[arg-type]
        runtime.lead()

        async def event(plural: str, name: str, spec: dict[str, Any]) -> None:
            raw = cast("kopf.RawBody", {"metadata": {"namespace": "ns", "name": name, "generation": 1}, "spec": spec})
            await runtime.on_event(
                event={"type": "ADDED", "object": raw},
                body=kopf.Body(raw),
                resource=kopf.Resource("pgscale.io", "v1alpha1", plural),
            )

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
