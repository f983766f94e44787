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
