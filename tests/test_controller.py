"""The async rollout controller with the tiny Qwen3-VL on real synth envs: AReaL's capacity rule, the
staleness bound under a slow trainer (max_staleness 0 = synchronous), zero-variance groups, env errors kept
apart from policy failures, and resume of admitted-but-unconsumed tasks.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from cua_kit.agent import Agent
from cua_kit.config import LoraConfig, ModelConfig
from cua_kit.envs.base import EnvError, Observation, Task
from cua_kit.envs.pool import EnvPool
from cua_kit.envs.synth import SynthEnv, synth_tasks
from cua_kit.inference.base import SamplingParams, writing_weights
from cua_kit.inference.hf import HFPolicy
from cua_kit.models.loader import LoadedModel, load_model
from cua_kit.rollout.controller import ControllerSettings, Group, RolloutController, TaskSampler
from cua_kit.rollout.episode import EpisodeSettings

SCREEN = (180, 320)
WAIT_S = 120  # generous: CI shares 2 cores with other jobs


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"), LoraConfig(r=4, alpha=8))


class ScriptedEnv(SynthEnv):
    """A real synth env whose reward (and failures) the test chooses, so groups have known rewards.

    task.params: "reward": "by_env" (env i of the pool scores i % 2) or a number for every env;
    "fail_resets": how many resets of this task raise EnvError (shared by the pool, counted down).
    """

    def __init__(self, index: int, failures: dict[str, int]):
        super().__init__(screen_size=SCREEN)
        self.index, self.failures = index, failures

    async def reset(self, task: Task) -> Observation:
        if self.failures.get(task.id, 0) > 0:
            self.failures[task.id] -= 1
            raise EnvError("the box died (scripted)")
        self.scripted = task.params.get("reward", 0.0)
        return await super().reset(task)

    async def evaluate(self) -> float:
        return float(self.index % 2) if self.scripted == "by_env" else float(self.scripted)


def scripted_pool(size: int, failures: dict[str, int] | None = None) -> EnvPool:
    made = iter(range(10_000))
    shared = dict(failures or {})
    return EnvPool(lambda: ScriptedEnv(next(made), shared), size)


def scripted_task(task_id: str, reward: Any, seed: int = 0) -> Task:
    return Task(id=task_id, env="synth", params={"level": 0, "seed": seed, "reward": reward})


def make_controller(loaded: LoadedModel, tasks: list[Task], pool: EnvPool | None = None, max_turns: int = 1,
                    **settings: Any) -> RolloutController:
    policy = HFPolicy(loaded, max_batch=8, batch_wait_ms=10)
    cs = ControllerSettings(**{"n_samples": 2, "batch_size": 2, "max_concurrent_rollouts": 8, **settings})
    pool = pool or EnvPool(lambda: SynthEnv(screen_size=SCREEN), cs.max_concurrent_rollouts)
    agent = Agent(loaded.processor, "mobile_use", "relative", history_images=1, max_pixels=61440)
    episode = EpisodeSettings(SamplingParams(0.7, 1.0, 0, max_new_tokens=4), max_turns=max_turns)
    return RolloutController(policy, pool, agent, TaskSampler(tasks), cs, episode)


async def shutdown(controller: RolloutController) -> None:
    await controller.stop()
    await controller.policy.close()  # type: ignore[attr-defined]
    await controller.pool.close()


async def wait_until(predicate, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def train_step(policy: HFPolicy, seconds: float) -> None:
    """A simulated optimizer step, as the training loop runs one: generation paused while the (shared) weights
    change, then the new version served."""
    async with writing_weights(policy):
        await asyncio.to_thread(time.sleep, seconds)
        await policy.update_weights(policy.version + 1, None)


# ---------------------------------------------------------------------------------------------- capacity
def test_capacity_formula_by_hand(loaded):
    c = make_controller(loaded, synth_tasks(0, 2), max_staleness=2, batch_size=4)
    asyncio.run(c.policy.update_weights(3, None))
    c.stats.groups_accepted = 5
    c._running = {object(), object(), object()}  # type: ignore[assignment] # three groups in flight
    assert c.capacity() == (2 + 3 + 1) * 4 - (5 + 3) == 16


def test_admission_stops_at_capacity_and_resumes_on_a_version_bump(loaded):
    async def main():
        c = make_controller(loaded, synth_tasks(0, 8), max_staleness=1, batch_size=2, max_concurrent_rollouts=16)
        await c.start()
        try:
            # version 0: (1 + 0 + 1) * 2 - 0 = 4 groups, then nothing more however long we wait
            await wait_until(lambda: len(c.buffer) == 4)
            await asyncio.sleep(0.5)
            assert c.group_seq == 4 and c.capacity() == 0
            await c.get_batch()
            await train_step(c.policy, 0.0)
            await c.notify_version()
            # version 1: (1 + 1 + 1) * 2 - 4 accepted = 2 more
            await wait_until(lambda: c.group_seq == 6 and not c._running)
            await asyncio.sleep(0.5)
            assert c.group_seq == 6 and c.capacity() == 0
        finally:
            await shutdown(c)

    asyncio.run(main())


def test_a_finished_group_frees_its_concurrency_slot(loaded):
    """One group in flight at a time (2 envs, 2 samples) and capacity for 6: the next group starts as soon
    as one finishes, without waiting for the trainer to wake the controller."""

    async def main():
        c = make_controller(loaded, synth_tasks(0, 8), max_staleness=5, batch_size=1, max_concurrent_rollouts=2)
        await c.start()
        try:
            await wait_until(lambda: c.stats.groups_accepted >= 3)
        finally:
            await shutdown(c)

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- staleness
@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_staleness_bound_under_a_slow_trainer(loaded, max_staleness):
    """Rollout is fast (synth, no latency), the trainer slow: every consumed turn is at most max_staleness
    versions old; with 0 every turn of every consumed group was sampled by the version that consumes it."""

    async def main() -> list[int]:
        c = make_controller(loaded, synth_tasks(0, 16), max_turns=2, max_staleness=max_staleness)
        staleness: list[int] = []
        await c.start()
        try:
            for _ in range(4):
                batch = await asyncio.wait_for(c.get_batch(), WAIT_S)
                version = c.policy.version
                staleness += [version - v for g in batch for e in g.valid for v in e.versions]
                await train_step(c.policy, 0.4)
                await c.notify_version()
        finally:
            await shutdown(c)
        return staleness

    staleness = asyncio.run(main())
    assert staleness and max(staleness) <= max_staleness
    if max_staleness == 0:
        assert set(staleness) == {0}
    else:  # the overlap really happens: groups admitted ahead were trained on one version later
        assert max(staleness) >= 1


# ---------------------------------------------------------------------------------------------- group filters
def test_a_run_starved_by_the_filter_says_why(loaded, caplog, monkeypatch):
    monkeypatch.setattr("cua_kit.rollout.controller.FILTERED_WARN_EVERY", 3)

    async def main() -> None:
        c = make_controller(loaded, [scripted_task("flat", 0.0)], scripted_pool(2), max_staleness=0, batch_size=1,
                            max_concurrent_rollouts=2, filter_zero_variance=True)
        await c.start()
        try:
            with pytest.raises(asyncio.TimeoutError):  # no group ever has a reward spread: no batch
                await asyncio.wait_for(c.get_batch(), 3.0)
        finally:
            await shutdown(c)

    with caplog.at_level("WARNING", logger="cua_kit.rollout.controller"):
        asyncio.run(main())
    assert any("no reward spread" in r.getMessage() and "warm-start" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("filter_zero_variance", [False, True])
def test_zero_variance_groups_kept_or_filtered_and_counted(loaded, filter_zero_variance):
    tasks = [scripted_task("flat", 0.0), scripted_task("mixed", "by_env")]

    async def main() -> tuple[list[Group], RolloutController]:
        c = make_controller(loaded, tasks, scripted_pool(2), max_staleness=0, batch_size=1,
                            max_concurrent_rollouts=2, filter_zero_variance=filter_zero_variance)
        consumed: list[Group] = []
        await c.start()
        try:
            while len(consumed) < 2:  # two epochs: both tasks drawn twice unless a kept batch comes first
                consumed += await asyncio.wait_for(c.get_batch(), WAIT_S)
                await train_step(c.policy, 0.0)
                await c.notify_version()
        finally:
            await shutdown(c)
        return consumed, c

    consumed, c = asyncio.run(main())
    flat_seen = c.stats.groups_zero_variance
    # the unbiased rollout success counts filtered groups too: flat groups score 0/2, mixed ones 1/2
    groups_scored = c.stats.episodes_scored // 2
    assert c.stats.episodes_succeeded == groups_scored - flat_seen
    if filter_zero_variance:
        assert [g.task.id for g in consumed] == ["mixed", "mixed"]
        assert flat_seen >= 1 and c.stats.groups_filtered == flat_seen
    else:
        assert c.stats.groups_filtered == 0
        assert flat_seen == sum(g.task.id == "flat" for g in consumed) + sum(g.task.id == "flat" for g in c.buffer)
    for g in consumed:
        assert sorted(g.rewards) == ([0.0, 0.0] if g.task.id == "flat" else [0.0, 1.0])
        assert g.zero_variance == (g.task.id == "flat")
        if g.zero_variance:
            assert g.advantages == [0.0, 0.0]


def test_env_errors_are_never_scored_and_are_counted_apart(loaded):
    """A group of 3 where one env dies at reset: 2 scored episodes; the dead one has no reward (not 0)."""
    task = scripted_task("flaky", "by_env")

    async def main() -> tuple[Group, RolloutController]:
        c = make_controller(loaded, [task], scripted_pool(3, {"flaky": 1}), n_samples=3, batch_size=1,
                            max_staleness=0, max_concurrent_rollouts=3)
        await c.start()
        try:
            (group,) = await asyncio.wait_for(c.get_batch(), WAIT_S)
        finally:
            await shutdown(c)
        return group, c

    group, c = asyncio.run(main())
    failed = [e for e in group.episodes if e.status == "env_error"]
    assert len(failed) == 1 and failed[0].reward is None and "died" in failed[0].error
    assert len(group.valid) == 2 and len(group.rewards) == 2 and len(group.advantages) == 2
    assert c.stats.env_errors == 1 and c.stats.episodes == 3 and c.stats.groups_env_failed == 0
    assert sum(len(e.turns) for e in group.valid) == len(group.samples())


def test_group_with_too_few_scored_episodes_is_counted_and_its_task_retried(loaded):
    task = scripted_task("dead", "by_env")

    async def main() -> RolloutController:
        c = make_controller(loaded, [task], scripted_pool(2, {"dead": 1}), n_samples=2, batch_size=1,
                            max_staleness=0, max_concurrent_rollouts=2)
        await c.start()
        try:
            (group,) = await asyncio.wait_for(c.get_batch(), WAIT_S)  # the retry, with both envs alive
            assert len(group.valid) == 2
        finally:
            await shutdown(c)
        return c

    c = asyncio.run(main())
    assert c.stats.groups_env_failed == 1 and c.stats.env_errors == 1
    assert c.sampler.state_dict() == {"epoch": 1, "index": 0}  # drawn once: the second run was the replay


# ---------------------------------------------------------------------------------------------- resume
def test_state_dict_replays_admitted_but_unconsumed_tasks_first(loaded):
    tasks = synth_tasks(0, 10)

    async def first_run() -> tuple[dict, list[str]]:
        c = make_controller(loaded, tasks, max_staleness=1, batch_size=2, max_concurrent_rollouts=16)
        await c.start()
        try:
            await wait_until(lambda: len(c.buffer) == 4)  # capacity (1 + 0 + 1) * 2 = 4 groups
            batch = await c.get_batch()
            # taken but not trained on (a stop came first): a resume still replays it
            assert len(c.state_dict()["replay"]) == 4
            c.consumed(batch)
            consumed = {g.group_id for g in batch}
            admitted = [task.id for gid, (task, _) in c.pending.items() if gid not in consumed]
            return c.state_dict(), admitted
        finally:
            await shutdown(c)

    async def resumed_run(state: dict) -> list[str]:
        c = make_controller(loaded, tasks, max_staleness=1, batch_size=2, max_concurrent_rollouts=16)
        c.load_state_dict(state)
        await c.start()
        try:
            await wait_until(lambda: c.group_seq >= 7)
            return [task.id for task, _ in list(c.pending.values())[:3]]
        finally:
            await shutdown(c)

    state, unconsumed = asyncio.run(first_run())
    assert len(unconsumed) == 2 and [t["id"] for t, _ in state["replay"]] == unconsumed
    reference = TaskSampler(tasks)
    for _ in range(4):
        reference.next()
    first_three = asyncio.run(resumed_run(state))
    assert first_three == unconsumed + [reference.next()[0].id]


# ---------------------------------------------------------------------------------------------- GiGPO
def _episode(episode_id: str, task: Task, screens: list[str], reward: float) -> Any:
    from PIL import Image

    from cua_kit.actions import InvalidAction
    from cua_kit.rollout.episode import Episode, Turn, TurnSample

    turns = [Turn(i, TurnSample([1], [2], [0.0], [Image.new("RGB", (8, 8), color)], 0), "",
                  InvalidAction("x", "x"), "", 0.0, "stop", "") for i, color in enumerate(screens)]
    return Episode(episode_id, task, turns=turns, status="finished", reward=reward)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_gigpo_adds_the_weighted_step_advantage_of_each_turn(loaded, weight):
    """Three episodes of one group: [red, blue] reward 1, [red, green, blue] reward 1, [red] reward 0 (the screens
    each turn saw). Episode advantages (no_std): 1/3, 1/3, -2/3. Step advantages (gamma 0.9, worked out in
    tests/test_grpo_math.py): red 0.33, 0.24, -0.57; blue 0, 0; green 0. Each turn trains on the sum, the step
    part times grpo.step_advantage_weight; weight 0 is plain GRPO."""
    c = make_controller(loaded, synth_tasks(0, 1), adv_mode="no_std", step_advantage_weight=weight, step_gamma=0.9)
    task = synth_tasks(0, 1)[0]
    episodes = [_episode("e0", task, ["red", "blue"], 1.0), _episode("e1", task, ["red", "green", "blue"], 1.0),
                _episode("e2", task, ["red"], 0.0)]
    group = c._make_group("g0", task, 0, episodes)
    got = [adv for _, adv in group.samples()]
    step = [0.33, 0.0, 0.24, 0.0, 0.0, -0.57]
    episode = [1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, -2 / 3]
    assert got == pytest.approx([e + weight * s for e, s in zip(episode, step)], abs=1e-5)
    assert (group.step_advantages is None) == (weight == 0)
