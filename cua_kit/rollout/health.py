"""Run health: which failures end one episode, which stop the whole run, and why no step is coming.

The rules (issue 18), applied to every episode as it ends (`RunHealth.record`):

- An exception inside an episode ends that episode, never the run's event loop: `EnvError` -> status
  `env_error`, `PolicyError` -> `policy_error`, anything else -> `error`. It gets no reward, is traced with its
  error, and never counts for or against the policy. A group keeps its scored episodes when it has at least two
  (GRPO compares samples); otherwise it is dropped and its task replayed, at most MAX_TASK_ATTEMPTS times
  (`rollout.controller`).
- Systemic faults stop the run, which ends with status `failed` and the reason (one line), its trace committed
  and a checkpoint of the last completed step:
  * a disk error writing the run folder (no space, read-only, no permission, I/O error): at the first one;
  * the same error `rollout.max_errors_in_a_row` times in a row with no scored episode in between: a bug or a
    dead backend would otherwise fail every episode forever;
  * an error outside any episode (in the controller or the trace writer): at once;
  * no batch for `trainer.stall_timeout_s` while the trainer waits for one (`wait_for_batch`, the loop's
    watchdog; the update, evals and checkpoints between steps don't count);
  * a generation backend broken for good (the policy's `failed()`: a vLLM server that could not be restarted).
- While no step comes, a line every WAITING_LINE_EVERY_S says what the rollouts are doing (`waiting_line`); the
  training loop prints it and writes it to the trace (`runs.message`), where the dashboard shows it.
"""

from __future__ import annotations

import asyncio
import errno
import re
import time
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
MAX_TASK_ATTEMPTS = 3  # a task whose group has < 2 scored episodes this many times is skipped (it may be broken)
WAITING_LINE_EVERY_S = 60.0


class RunFailure(RuntimeError):
    """A fault of the run, not of one episode: the run stops with status `failed` and this message."""


def _signature(status: str, error: str | None) -> str:
    """What "the same error" means: the status and the message with its numbers (ids, sizes, times) blanked."""
    return f"{status}: {re.sub(r'[0-9]+', '#', error or '')[:200]}"


class RunHealth:
    """Counts how episodes end and decides when the run must stop (`failure` is then the reason)."""

    def __init__(self, max_errors_in_a_row: int = 16):
        self.max_errors_in_a_row = max_errors_in_a_row
        self.failure: str | None = None
        self.in_a_row = 0  # errors with the same signature in a row, no scored episode between
        self._last: str | None = None
        self.ended = self.scored = self.errors = 0  # since the last `mark()` (the last batch taken)
        self.last_error: str | None = None

    def record(self, episode: Any) -> None:
        """One finished episode (rollout.episode.Episode): scored, or an error that may be systemic."""
        self.ended += 1
        if episode.reward is not None:
            self.scored += 1
            self.in_a_row, self._last = 0, None
            return
        self.errors += 1
        self.last_error = f"{episode.status}: {episode.error}"
        exc = getattr(episode, "exception", None)
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            self.fail(f"the run folder can't be written ({exc.strerror}): {episode.error}. Free space or fix the "
                      "folder's permissions, then resume with recover.mode=auto")
        signature = _signature(episode.status, episode.error)
        self.in_a_row = self.in_a_row + 1 if signature == self._last else 1
        self._last = signature
        if self.in_a_row >= self.max_errors_in_a_row:
            self.fail(f"{self.in_a_row} episodes in a row ended with the same error, none scored in between "
                      f"(rollout.max_errors_in_a_row={self.max_errors_in_a_row}): {self.last_error}")

    def fail(self, reason: str) -> None:
        """Record a systemic fault (the first one wins: it is the cause, later ones are consequences)."""
        if self.failure is None:
            self.failure = " ".join(reason.split())[:1000]

    def mark(self) -> None:
        """The trainer took a batch: the waiting counters start again."""
        self.ended = self.scored = self.errors = 0

    def summary(self) -> str:
        """How the episodes since the last step ended, for the waiting line and the stall message."""
        line = f"{self.ended} episodes ended since the last step, {self.scored} scored, {self.errors} errors"
        return line + (f" (last: {self.last_error[:200]})" if self.errors and self.last_error else "")


async def wait_for_batch(get_batch: Awaitable[T], stop: asyncio.Event, health: RunHealth, stall_timeout_s: float,
                         waiting_line: Callable[[float], str], on_wait: Callable[[str], None],
                         broken: Awaitable[BaseException] | None = None) -> T | None:
    """The next batch, or None when `stop` is set first. Every WAITING_LINE_EVERY_S without one, `on_wait` gets
    `waiting_line(seconds waited)`; after `stall_timeout_s`, RunFailure saying how the rollouts went. `broken`
    (the policy's `failed()`) returns the error of a backend that can't generate any more: RunFailure too."""
    getter = asyncio.ensure_future(get_batch)
    stopper = asyncio.ensure_future(stop.wait())
    breaker = asyncio.ensure_future(broken if broken is not None else asyncio.Event().wait())
    started = time.monotonic()
    try:
        while True:
            waited = time.monotonic() - started
            timeout = min(WAITING_LINE_EVERY_S, max(0.0, stall_timeout_s - waited))
            done, _ = await asyncio.wait({getter, stopper, breaker}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if stopper in done or stop.is_set():
                return None
            if breaker in done:
                error = breaker.result()
                raise RunFailure(f"the generation backend can't generate any more: {error}") from error
            if getter in done:
                return getter.result()
            waited = time.monotonic() - started
            if waited >= stall_timeout_s:
                raise RunFailure(f"no batch in {waited:.0f} s (trainer.stall_timeout_s={stall_timeout_s:g}): "
                                 f"{health.summary()}")
            on_wait(waiting_line(waited))
    finally:
        for future in (getter, stopper, breaker):
            if not future.done():
                future.cancel()
