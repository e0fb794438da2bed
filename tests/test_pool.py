"""Tests of EnvPool: bounded leases, timeouts, crash -> EnvError -> restart, clean shutdown, LatencyEnv."""

from __future__ import annotations

import asyncio

import pytest

from cua_kit.actions import Action
from cua_kit.envs import EnvError
from cua_kit.envs.pool import EnvPool, LatencyEnv
from cua_kit.envs.synth import SynthEnv, synth_tasks

TASK = synth_tasks(2, 1)[0]


class CountingSynth(SynthEnv):
    """A real synth env that records how many are open, and can be told to crash on its next step."""

    open_envs: set[int] = set()

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.crash_next_step = False
        CountingSynth.open_envs.add(id(self))

    async def step(self, action: Action):
        if self.crash_next_step:
            raise ConnectionResetError("browser went away")
        return await super().step(action)

    async def close(self) -> None:
        CountingSynth.open_envs.discard(id(self))
        await super().close()


@pytest.fixture(autouse=True)
def _reset_counter():
    CountingSynth.open_envs = set()


async def solve(env) -> float:
    await env.reset(TASK)
    while not (await env.step(await env.oracle_action())).done:
        pass
    return await env.evaluate()


def test_leases_are_bounded_and_envs_reused():
    async def run():
        pool = EnvPool(CountingSynth, size=2)
        peak = 0

        async def episode() -> float:
            nonlocal peak
            async with pool.lease() as env:
                peak = max(peak, pool.in_use)
                await asyncio.sleep(0.01)  # hold the lease while others wait
                return await solve(env)

        scores = await asyncio.gather(*(episode() for _ in range(8)))
        await pool.close()
        return scores, peak, pool.stats
    scores, peak, stats = asyncio.run(run())
    assert scores == [1.0] * 8
    assert peak == 2 and stats.created == 2 and stats.env_errors == 0
    assert not CountingSynth.open_envs  # close() closed them all


def test_a_crash_surfaces_as_env_error_and_the_env_is_replaced():
    async def run():
        pool = EnvPool(CountingSynth, size=1)
        async with pool.lease() as env:
            crashed = env.inner
            await env.reset(TASK)
            crashed.crash_next_step = True
            with pytest.raises(EnvError, match="ConnectionResetError: browser went away"):
                await env.step(Action("wait", duration=0))
            with pytest.raises(EnvError, match="failed earlier"):  # no more calls on a broken env
                await env.evaluate()
        assert id(crashed) not in CountingSynth.open_envs  # closed on release
        async with pool.lease() as env:  # the pool goes on with a fresh env
            assert env.inner is not crashed
            score = await solve(env)
        await pool.close()
        return score, pool.stats
    score, stats = asyncio.run(run())
    assert score == 1.0
    assert (stats.env_errors, stats.restarts, stats.timeouts, stats.created) == (1, 1, 0, 2)
    assert not CountingSynth.open_envs


def test_a_slow_step_times_out_as_env_error_and_is_restarted():
    async def run():
        pool = EnvPool(lambda: LatencyEnv(CountingSynth(), step_latency_s=5.0), size=1, step_timeout=0.05)
        async with pool.lease() as env:
            await env.reset(TASK)
            with pytest.raises(EnvError, match="timed out after 0.05 s"):
                await env.step(Action("wait", duration=0))
        await pool.close()
        return pool.stats
    stats = asyncio.run(run())
    assert (stats.env_errors, stats.timeouts, stats.restarts) == (1, 1, 1)
    assert not CountingSynth.open_envs


def test_an_error_in_the_lease_body_keeps_a_healthy_env():
    async def run():
        pool = EnvPool(CountingSynth, size=1)
        with pytest.raises(KeyError):
            async with pool.lease() as env:
                first = env.inner
                await env.reset(TASK)
                raise KeyError("a policy bug, not the env's")
        async with pool.lease() as env:
            same = env.inner is first
        await pool.close()
        return same, pool.stats
    same, stats = asyncio.run(run())
    assert same and stats.restarts == 0


def test_cancelling_a_call_replaces_the_env():
    async def run():
        pool = EnvPool(lambda: LatencyEnv(CountingSynth(), reset_latency_s=5.0), size=1)

        async def episode():
            async with pool.lease() as env:
                await env.reset(TASK)

        task = asyncio.ensure_future(episode())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pool.close()
        return pool.stats
    stats = asyncio.run(run())
    assert stats.restarts == 1 and stats.env_errors == 0
    assert not CountingSynth.open_envs


def test_latency_env_adds_its_sleep():
    async def run() -> float:
        env = LatencyEnv(SynthEnv(), step_latency_s=0.05, reset_latency_s=0.05)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await env.reset(TASK)
        await env.step(Action("wait", duration=0))
        assert env.screen_size == (360, 640)  # attributes of the wrapped env show through
        return loop.time() - start
    assert asyncio.run(run()) >= 0.1


def test_bad_arguments_and_closed_pool():
    with pytest.raises(ValueError, match="size"):
        EnvPool(SynthEnv, size=0)

    async def run():
        pool = EnvPool(SynthEnv, size=1)
        await pool.close()
        async with pool.lease():
            pass
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(run())
