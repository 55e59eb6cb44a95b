"""The asyncio-in-a-thread bridge that runs asyncssh for the Trio queen."""

from __future__ import annotations

import asyncio

import pytest
import trio

from rbee.queen.asyncio_bridge import AsyncioBridge


@pytest.fixture
def bridge():
    b = AsyncioBridge()
    yield b
    b.close()
    assert b.loop.is_closed()


def test_run_returns_the_coroutine_result(bridge: AsyncioBridge) -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def main() -> int:
        with trio.fail_after(5):
            return await bridge.run(double, 21)

    assert trio.run(main) == 42


def test_exceptions_cross_the_bridge(bridge: AsyncioBridge) -> None:
    async def fail() -> None:
        raise ConnectionRefusedError("nobody home")

    async def main() -> None:
        with trio.fail_after(5):
            await bridge.run(fail)

    with pytest.raises(ConnectionRefusedError, match="nobody home"):
        trio.run(main)


def test_trio_cancellation_cancels_and_unwinds_the_asyncio_task(bridge: AsyncioBridge) -> None:
    seen: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("unwound")

    async def main() -> None:
        with trio.fail_after(5):
            with trio.move_on_after(0.1) as scope:
                await bridge.run(slow)
            assert scope.cancelled_caught
            # By the time run() has raised Cancelled, the asyncio side has unwound.
            assert seen == ["cancelled", "unwound"]

    trio.run(main)


def test_calls_run_concurrently(bridge: AsyncioBridge) -> None:
    async def nap(x: int) -> int:
        await asyncio.sleep(0.2)
        return x

    async def main() -> list[int]:
        results: list[int] = []
        with trio.fail_after(5):
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(lambda i=i: _append(results, bridge.run(nap, i)))
            assert trio.current_time() - start < 1.5  # ten 0.2 s naps overlapped
        return sorted(results)

    async def _append(into: list[int], awaitable) -> None:
        into.append(await awaitable)

    assert trio.run(main) == list(range(10))
