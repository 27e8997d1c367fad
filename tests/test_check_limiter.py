"""The bound on polkit checks (authority.CheckLimiter), without a bus: per-uid bounds, the
total in flight, and round-robin service across uids (issue 9, item 5)."""

from __future__ import annotations

import asyncio

import pytest

from vhostuserd.core.errors import BrokerError, Err
from vhostuserd.edges.authority import CheckLimiter


async def _hold(limiter: CheckLimiter, uid: int, order: list[int], gate: asyncio.Event) -> None:
    async with limiter.slot(uid, "org.vhostuserd.test"):
        order.append(uid)
        await gate.wait()


def test_a_uid_over_its_bound_is_refused_at_once_with_limits_exceeded() -> None:
    async def main() -> None:
        limiter = CheckLimiter(in_flight=10, per_uid=2)
        gate = asyncio.Event()
        order: list[int] = []
        held = [asyncio.ensure_future(_hold(limiter, 1000, order, gate)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(BrokerError) as e:
            async with limiter.slot(1000, "org.vhostuserd.manage"):
                pass
        assert e.value.name is Err.LIMITS_EXCEEDED
        assert "uid 1000" in str(e.value) and "org.vhostuserd.manage" in str(e.value)
        async with limiter.slot(1001, "org.vhostuserd.spawn"):  # another uid is not affected
            pass
        gate.set()
        await asyncio.gather(*held)
        assert limiter.running == 0 and not limiter.outstanding

    asyncio.run(main())


def test_checks_beyond_the_total_wait_and_are_served_one_uid_after_another() -> None:
    async def main() -> None:
        limiter = CheckLimiter(in_flight=2, per_uid=8)
        gates = [asyncio.Event() for _ in range(9)]
        order: list[int] = []
        # uid 1 fills both slots and queues four more; uid 2 and uid 3 queue one each after it.
        tasks = [asyncio.ensure_future(_hold(limiter, 1, order, gates[i])) for i in range(6)]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(_hold(limiter, 2, order, gates[6])))
        tasks.append(asyncio.ensure_future(_hold(limiter, 3, order, gates[7])))
        for _ in range(3):
            await asyncio.sleep(0)
        assert order == [1, 1] and limiter.running == 2
        for g in gates:
            g.set()
        await asyncio.gather(*tasks)
        # After the two running checks of uid 1, the queue alternates between uids: 2 and 3
        # are served before the rest of uid 1's burst.
        assert order[:2] == [1, 1]
        assert order[2:5] == [1, 2, 3], order
        assert limiter.running == 0 and not limiter.outstanding

    asyncio.run(main())


def test_a_waiting_check_that_is_cancelled_gives_its_place_back() -> None:
    async def main() -> None:
        limiter = CheckLimiter(in_flight=1, per_uid=4)
        gate = asyncio.Event()
        order: list[int] = []
        first = asyncio.ensure_future(_hold(limiter, 1, order, gate))
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(_hold(limiter, 2, order, gate))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not limiter.outstanding.get(2)
        gate.set()
        await first
        assert limiter.running == 0
        async with limiter.slot(3, "x"):
            assert limiter.running == 1

    asyncio.run(main())
