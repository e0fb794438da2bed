"""GRPO groups and the async rollout controller with staleness control (AReaL style).

- A group is `n_samples` episodes of one task, run concurrently on separate envs of the pool.
- The controller keeps up to `max_concurrent_rollouts` episodes in flight and admits a new group only
  while AReaL's capacity rule allows it:  (max_staleness + version + 1) * batch_size - (accepted + running) > 0.
  With max_staleness 0 that is synchronous on-policy GRPO: batch_size groups per version, all sampled
  by that version.
- Every turn asks the policy for the newest version when it starts (interruptible at turn boundaries).
- Finished groups go to a buffer; the trainer takes batch_size groups at a time. A group whose oldest
  turn is more than max_staleness versions behind is dropped and counted.
- Groups with zero reward variance carry no gradient: kept or filtered by config, counted either way.
- Every finished episode goes through `RunHealth` (`rollout.health`): an error ends only its episode, a systemic
  fault stops admission and makes `get_batch` raise `RunFailure`; a group with fewer than two scored episodes is
  dropped and its task replayed, at most MAX_TASK_ATTEMPTS times.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from cua_kit.envs.base import Task
from cua_kit.envs.pool import EnvPool
from cua_kit.grpo.losses import group_advantages, step_advantages
from cua_kit.inference.base import Policy
from cua_kit.agent import Agent
from cua_kit.rollout.episode import Episode, EpisodeSettings, Turn, TurnSample, run_episode
from cua_kit.rollout.health import MAX_TASK_ATTEMPTS, RunFailure, RunHealth

log = logging.getLogger(__name__)
FILTERED_WARN_EVERY = 50  # filtered (zero-variance) groups in a row between two warnings


class TaskSampler:
    """Deterministic task order: epoch e visits every task once, shuffled with seed + e."""

    def __init__(self, tasks: list[Task], seed: int = 1):
        if not tasks:
            raise ValueError("no tasks to sample from")
        self.tasks, self.seed = tasks, seed
        self.epoch, self.index = 0, 0

    def next(self) -> tuple[Task, int]:
        """(task, epoch) of the next draw."""
        order = list(range(len(self.tasks)))
        random.Random(self.seed + self.epoch).shuffle(order)
        task, epoch = self.tasks[order[self.index]], self.epoch
        self.index += 1
        if self.index == len(self.tasks):
            self.epoch, self.index = self.epoch + 1, 0
        return task, epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


def screen_key(turn: Turn) -> str:
    """The state a turn acted on, for GiGPO's anchor-state groups: a hash of the screenshot it saw (the prompt's
    last image). A turn without one is a state of its own."""
    if not turn.sample.images:
        return f"no-screen-{id(turn)}"
    image = turn.sample.images[-1]
    return hashlib.sha1(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


@dataclass
class Group:
    group_id: str
    task: Task
    epoch: int
    episodes: list[Episode]
    advantages: list[float]  # one per valid (non env-error) episode, in order
    created_at: float = field(default_factory=time.time)
    # GiGPO's step-level term (grpo.step_advantage_weight > 0), already weighted: per turn of each valid episode
    step_advantages: list[list[float]] | None = None

    @property
    def valid(self) -> list[Episode]:
        return [e for e in self.episodes if e.reward is not None]

    @property
    def rewards(self) -> list[float]:
        return [e.reward for e in self.valid]  # type: ignore[misc]

    @property
    def min_version(self) -> int:
        return min(v for e in self.valid for v in e.versions) if any(e.turns for e in self.valid) else 0

    @property
    def zero_variance(self) -> bool:
        return len(set(self.rewards)) <= 1

    def samples(self) -> list[tuple[TurnSample, float]]:
        """Every turn of every valid episode, carrying its episode's advantage (plus its weighted step-level
        advantage under GiGPO)."""
        steps = self.step_advantages or [[0.0] * len(e.turns) for e in self.valid]
        return [(t.sample, adv + step) for e, adv, per_turn in zip(self.valid, self.advantages, steps)
                for t, step in zip(e.turns, per_turn)]


@dataclass
class RolloutStats:
    groups_accepted: int = 0
    groups_dropped_stale: int = 0
    groups_zero_variance: int = 0
    groups_filtered: int = 0
    groups_env_failed: int = 0
    tasks_skipped: int = 0  # tasks given up after MAX_TASK_ATTEMPTS groups with < 2 scored episodes
    episodes: int = 0
    env_errors: int = 0
    # every scored episode, in kept *and* filtered groups: the unbiased rollout success rate is
    # episodes_succeeded / episodes_scored (a batch of kept groups over-represents mixed outcomes)
    episodes_scored: int = 0
    episodes_succeeded: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class ControllerSettings:
    n_samples: int = 4
    batch_size: int = 2
    max_concurrent_rollouts: int = 8
    max_staleness: int = 1
    filter_zero_variance: bool = False
    adv_mode: str = "std"
    max_errors_in_a_row: int = 16
    step_advantage_weight: float = 0.0  # GiGPO's weight on step-level advantages (0: plain GRPO)
    step_gamma: float = 0.95


class RolloutController:
    """Runs groups in the background and hands finished ones to the trainer, within the staleness bound."""

    def __init__(self, policy: Policy, pool: EnvPool, agent: Agent, sampler: TaskSampler,
                 settings: ControllerSettings, episode_settings: EpisodeSettings, run_dir: Path | None = None,
                 on_group: Callable[[Group], None] | None = None, run_id: str = "run"):
        self.policy, self.pool, self.agent, self.sampler = policy, pool, agent, sampler
        self.s, self.episode_settings, self.run_dir = settings, episode_settings, run_dir
        self.on_group, self.run_id = on_group, run_id
        self.stats = RolloutStats()
        self.health = RunHealth(settings.max_errors_in_a_row)
        self._attempts: dict[tuple[str, int], int] = {}  # (task id, epoch) -> groups run without 2 scored episodes
        self._filtered_in_a_row = 0
        self.buffer: list[Group] = []
        self._gathering: list[Group] = []  # the batch `get_batch` is putting together
        self.pending: dict[str, tuple[Task, int]] = {}  # admitted, not yet trained on: replayed on resume
        self.replay: list[tuple[Task, int]] = []
        self.group_seq = 0
        self._running: set[asyncio.Task] = set()
        self._accepted_base = 0
        self._cond: asyncio.Condition | None = None
        self._admitter: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._cond = asyncio.Condition()
        # groups consumed before a resume count as accepted, so the capacity rule starts where it was
        self._accepted_base = self.policy.version * self.s.batch_size
        self._admitter = asyncio.create_task(self._admit_loop())

    async def stop(self) -> None:
        tasks = [t for t in [self._admitter, *self._running] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._running.clear()

    async def notify_version(self) -> None:
        """The trainer bumped the version: capacity grows, admission may resume."""
        async with self._cond:  # type: ignore[union-attr]
            self._cond.notify_all()  # type: ignore[union-attr]

    # ------------------------------------------------------------------ admission
    def capacity(self) -> int:
        """AReaL: (max_staleness + version + 1) * batch_size - (accepted + running)."""
        accepted = self._accepted_base + self.stats.groups_accepted
        return (self.s.max_staleness + self.policy.version + 1) * self.s.batch_size - (accepted + len(self._running))

    def _can_admit(self) -> bool:
        max_groups = max(1, self.s.max_concurrent_rollouts // self.s.n_samples)
        return self.health.failure is None and self.capacity() > 0 and len(self._running) < max_groups

    async def _admit_loop(self) -> None:
        assert self._cond is not None
        while True:
            async with self._cond:
                await self._cond.wait_for(self._can_admit)
                task, epoch = self.replay.pop(0) if self.replay else self.sampler.next()
                group_id = f"{self.run_id}-g{self.group_seq:06d}"
                self.group_seq += 1
                self.pending[group_id] = (task, epoch)
                job = asyncio.create_task(self._run_group(group_id, task, epoch))
                self._running.add(job)
                job.add_done_callback(self._running.discard)

    async def _run_group(self, group_id: str, task: Task, epoch: int) -> None:
        try:
            episodes = await asyncio.gather(*(self._run_one(group_id, task, i) for i in range(self.s.n_samples)))
            group = self._make_group(group_id, task, epoch, list(episodes))
            await self._accept(group)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # outside any episode (the trace writer, a bug here): the run must stop
            if self.health.failure is None:
                log.exception("group %s failed", group_id)
            self.health.fail(f"rollout controller error in group {group_id}: {type(exc).__name__}: {exc}")
            self.pending.pop(group_id, None)
        finally:
            # leave the running set before waking the admitter: the done-callback that also discards
            # this task runs only after the admitter has re-checked, which would then see no free slot
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]
            async with self._cond:  # type: ignore[union-attr]
                self._cond.notify_all()  # type: ignore[union-attr]

    async def _run_one(self, group_id: str, task: Task, idx: int) -> Episode:
        async with self.pool.lease() as env:
            episode = await run_episode(env, task, self.agent, self.policy, self.episode_settings,
                                        f"{group_id}-s{idx}", self.run_dir, idx)
        self.health.record(episode)
        if self.health.failure is not None:  # wake get_batch now, not when the group ends
            async with self._cond:  # type: ignore[union-attr]
                self._cond.notify_all()  # type: ignore[union-attr]
        return episode

    def _make_group(self, group_id: str, task: Task, epoch: int, episodes: list[Episode]) -> Group:
        valid = [e for e in episodes if e.reward is not None]
        self.stats.episodes += len(episodes)
        self.stats.env_errors += len(episodes) - len(valid)
        self.stats.episodes_scored += len(valid)
        self.stats.episodes_succeeded += sum(e.success for e in valid)
        advantages: list[float] = []
        steps = None
        if len(valid) >= 2:
            rewards = torch.tensor([e.reward for e in valid], dtype=torch.float32)
            advantages = group_advantages(rewards, mode=self.s.adv_mode).tolist()
            if self.s.step_advantage_weight > 0:
                per_turn = step_advantages([[screen_key(t) for t in e.turns] for e in valid], rewards.tolist(),
                                           self.s.step_gamma, self.s.adv_mode)
                steps = [[self.s.step_advantage_weight * a for a in turns] for turns in per_turn]
        return Group(group_id, task, epoch, episodes, advantages, step_advantages=steps)

    async def _accept(self, group: Group) -> None:
        if self.on_group is not None:
            self.on_group(group)  # trace rows for every group, kept or not
        if len(group.valid) < 2:  # advantages need at least two scored samples
            self.stats.groups_env_failed += 1
            self.pending.pop(group.group_id, None)
            self._retry(group)
            return
        if group.zero_variance:
            self.stats.groups_zero_variance += 1
            if self.s.filter_zero_variance:
                self.stats.groups_filtered += 1
                self.pending.pop(group.group_id, None)
                self._warn_if_starving(group)
                return
        self._filtered_in_a_row = 0
        self._attempts.pop((group.task.id, group.epoch), None)
        self.stats.groups_accepted += 1
        self.buffer.append(group)

    def _retry(self, group: Group) -> None:
        """Replay the task of a group that had < 2 scored episodes, unless it failed MAX_TASK_ATTEMPTS times."""
        key = (group.task.id, group.epoch)
        self._attempts[key] = self._attempts.get(key, 0) + 1
        if self._attempts[key] < MAX_TASK_ATTEMPTS:
            self.replay.append((group.task, group.epoch))  # retried, not lost
            return
        self.stats.tasks_skipped += 1
        log.warning("task %s skipped: %d groups in a row had fewer than 2 scored episodes (last error: %s)",
                    group.task.id, self._attempts.pop(key), next((e.error for e in group.episodes if e.error), "-"))

    def waiting_line(self, waited_s: float) -> str:
        """Why no batch has come for `waited_s` seconds: what runs, what is ready, how episodes ended."""
        return (f"no batch for {waited_s:.0f} s: {len(self._running)} groups running, {len(self.buffer)} of "
                f"{self.s.batch_size} ready, {self.stats.groups_filtered} filtered (zero variance) and "
                f"{self.stats.groups_env_failed} with < 2 scored episodes so far; {self.health.summary()}")

    def _warn_if_starving(self, group: Group) -> None:
        """Every FILTERED_WARN_EVERY filtered groups in a row, say why no batch comes (a run can wait forever)."""
        self._filtered_in_a_row += 1
        if self._filtered_in_a_row % FILTERED_WARN_EVERY == 0:
            log.warning("%d groups in a row had no reward spread (last: all %s) and were filtered "
                        "(rollout.filter_zero_variance): no batch yet. A policy that never (or always) succeeds "
                        "gives GRPO no signal: warm-start it (cua-kit sft), change rollout.temperature, or "
                        "pick easier/harder tasks.", self._filtered_in_a_row, group.rewards[0] if group.rewards else "-")

    # ------------------------------------------------------------------ consumption
    async def get_batch(self) -> list[Group]:
        """The next batch_size groups within the staleness bound (stale ones are dropped and counted). They stay
        pending (replayed by a resume) until `consumed`: a batch that a stop or a failure keeps from the update is
        not lost."""
        assert self._cond is not None
        batch = self._gathering = []
        while len(batch) < self.s.batch_size:
            async with self._cond:
                await self._cond.wait_for(lambda: bool(self.buffer) or self.health.failure is not None)
                if self.health.failure is not None:
                    raise RunFailure(self.health.failure)
                group = self.buffer.pop(0)
                if self.policy.version - group.min_version > self.s.max_staleness:
                    self.stats.groups_dropped_stale += 1
                    self.stats.groups_accepted -= 1  # it frees its slot under the capacity rule
                    self.pending.pop(group.group_id, None)
                    self._cond.notify_all()
                    continue
            batch.append(group)
        self._gathering = []
        self.health.mark()
        return batch

    def consumed(self, batch: list[Group]) -> None:
        """An update has trained on `batch`: a resume no longer replays its tasks."""
        for group in batch:
            self.pending.pop(group.group_id, None)

    def ready_groups(self) -> list[Group]:
        """Accepted groups that no update has taken yet: the batch being gathered, then the buffer."""
        return self._gathering + self.buffer

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Data position: the sampler, plus tasks admitted but not consumed (re-run first on resume)."""
        replay = [(t.to_dict(), e) for t, e in list(self.pending.values()) + self.replay]
        return {"sampler": self.sampler.state_dict(), "replay": replay, "group_seq": self.group_seq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.replay = [(Task.from_dict(t), e) for t, e in state["replay"]]
        self.group_seq = state["group_seq"]
