"""A pool of envs for concurrent rollouts: bounded leases, timeouts, and restart of crashed envs.

    pool = EnvPool(lambda: make_env("miniwob"), size=8, step_timeout=30)
    async with pool.lease() as env:      # waits while `size` envs are leased
        obs = await env.reset(task)       # a timeout or any backend exception -> EnvError
    await pool.close()

Every failure of the backend (a timeout, a dead browser, any exception, EnvError included) surfaces as
`EnvError`, so the rollout can drop the episode instead of scoring it 0 for the policy. An env that
failed (or whose call was cancelled mid-way) is closed and replaced by a fresh one from the factory
when its lease ends: its state is unknown, so it is never handed out again. The pool knows nothing
about any backend. `LatencyEnv` adds sleeps to imitate a remote (cloud) env in benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from cua_kit.actions import Action
from cua_kit.envs.base import Env, EnvError, Observation, StepResult, Task

T = TypeVar("T")
CLOSE_TIMEOUT_S = 30.0  # a hung close must not hang pool shutdown


@dataclass
class PoolStats:
    """Counters since the pool was made."""

    env_errors: int = 0  # calls that failed (timeouts included)
    timeouts: int = 0  # calls that ran past their timeout
    restarts: int = 0  # broken envs closed and replaced
    created: int = 0  # envs made by the factory
    close_errors: int = 0  # envs whose close() failed or hung (they may have leaked)


class PooledEnv(Env):
    """An env on lease: the same protocol, with timeouts, and every backend failure as EnvError."""

    def __init__(self, inner: Env, pool: "EnvPool") -> None:
        self.inner, self._pool = inner, pool
        self.name, self.tool = inner.name, inner.tool  # type: ignore[misc]
        self.broken = False  # set on the first failure or cancelled call; the pool replaces the env
        self._released = False

    async def _call(self, what: str, call: Callable[[], Awaitable[T]], timeout: float) -> T:
        if self._released:
            raise RuntimeError("this env's lease has ended; lease another one from the pool")
        if self.broken:
            raise EnvError(f"{self.name} env failed earlier in this lease; end the lease to get a fresh one")
        try:
            return await asyncio.wait_for(call(), timeout)
        except asyncio.TimeoutError:
            self._fail(timeout=True)
            raise EnvError(f"{self.name} env: {what} timed out after {timeout:g} s") from None
        except asyncio.CancelledError:  # cancelled mid-call: the env's state is unknown, replace it
            self.broken = True
            raise
        except Exception as e:  # any backend failure is infrastructure, never a policy mistake
            self._fail(timeout=False)
            raise EnvError(f"{self.name} env: {what} failed: {type(e).__name__}: {e}") from e

    def _fail(self, timeout: bool) -> None:
        self.broken = True
        self._pool.stats.env_errors += 1
        self._pool.stats.timeouts += int(timeout)

    async def reset(self, task: Task) -> Observation:
        return await self._call("reset", lambda: self.inner.reset(task), self._pool.reset_timeout)

    async def step(self, action: Action) -> StepResult:
        return await self._call("step", lambda: self.inner.step(action), self._pool.step_timeout)

    async def evaluate(self) -> float:
        return await self._call("evaluate", self.inner.evaluate, self._pool.step_timeout)

    async def oracle_action(self) -> Action:
        """The inner env's oracle; NotImplementedError passes through (a missing feature, not a crash)."""
        try:
            return await asyncio.wait_for(self.inner.oracle_action(), self._pool.step_timeout)
        except NotImplementedError:
            raise
        except Exception as e:
            self._fail(timeout=isinstance(e, asyncio.TimeoutError))
            raise EnvError(f"{self.name} env: oracle_action failed: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        """No-op: the pool owns the env. End the lease instead."""


class EnvPool:
    """At most `size` envs, made lazily by `factory`, leased one episode (or more) at a time.

    Use one pool within one event loop (its semaphore binds to the loop that first waits on it).
    """

    def __init__(self, factory: Callable[[], Env], size: int, step_timeout: float = 30,
                 reset_timeout: float = 60) -> None:
        if size < 1:
            raise ValueError(f"EnvPool size must be >= 1, got {size}")
        if step_timeout <= 0 or reset_timeout <= 0:
            raise ValueError(f"timeouts must be > 0 s, got step={step_timeout} reset={reset_timeout}")
        self.factory, self.size = factory, size
        self.step_timeout, self.reset_timeout = step_timeout, reset_timeout
        self.stats = PoolStats()
        self._idle: list[Env] = []
        self._leased: set[int] = set()  # ids of envs on lease (for `in_use`)
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    @property
    def in_use(self) -> int:
        """How many envs are on lease now."""
        return len(self._leased)

    def _make(self) -> Env:
        try:
            env = self.factory()
        except Exception as e:
            self.stats.env_errors += 1
            raise EnvError(f"the env factory failed: {type(e).__name__}: {e}") from e
        self.stats.created += 1
        return env

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[PooledEnv]:
        """Lease an env (waiting while all `size` are out); it goes back to the pool when the block ends."""
        if self._closed:
            raise RuntimeError("the EnvPool is closed")
        async with self._slots:
            env = self._idle.pop() if self._idle else self._make()
            pooled = PooledEnv(env, self)
            self._leased.add(id(env))
            try:
                yield pooled
            finally:
                pooled._released = True
                self._leased.discard(id(env))
                await self._give_back(env, broken=pooled.broken)

    async def _give_back(self, env: Env, broken: bool) -> None:
        if self._closed:
            await self._close_env(env)
        elif broken:
            self.stats.restarts += 1
            await self._close_env(env)
            if self._closed:  # the pool closed during that await: a replacement would never be closed
                return
            with contextlib.suppress(EnvError):  # counted; the next lease tries the factory again
                self._idle.append(self._make())
        else:
            self._idle.append(env)

    async def _close_env(self, env: Env) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(env.close()), CLOSE_TIMEOUT_S)
        except Exception:  # a broken env may fail to close too; the pool must go on
            self.stats.close_errors += 1

    async def close(self) -> None:
        """Close every idle env now; envs on lease are closed when their lease ends. Safe to call twice."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._close_env(env) for env in idle))


class LatencyEnv(Env):
    """Wraps an env and sleeps before each reset/step: imitates a remote env (a cloud phone) in benchmarks."""

    def __init__(self, env: Env, step_latency_s: float = 0.0, reset_latency_s: float = 0.0) -> None:
        self.inner = env
        self.name, self.tool = env.name, env.tool  # type: ignore[misc]
        self.step_latency_s, self.reset_latency_s = step_latency_s, reset_latency_s

    async def reset(self, task: Task) -> Observation:
        await asyncio.sleep(self.reset_latency_s)
        return await self.inner.reset(task)

    async def step(self, action: Action) -> StepResult:
        await asyncio.sleep(self.step_latency_s)
        return await self.inner.step(action)

    async def evaluate(self) -> float:
        return await self.inner.evaluate()

    async def oracle_action(self) -> Action:
        return await self.inner.oracle_action()

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:  # e.g. screen_size of the wrapped env
        if name == "inner":  # not set yet: avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.inner, name)
