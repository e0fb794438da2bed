"""Rollout engine end to end (issue 4 "Done means"): groups of the tiny Qwen3-VL on synth and on MiniWoB
(real Chromium), behaviour log-probs against a fresh scoring forward, the trace DB on a real SQLite file,
and a version bump picked up mid-episode.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from cua_kit.actions import Action
from cua_kit.agent import Agent, Prompt
from cua_kit.config import LoraConfig, ModelConfig
from cua_kit.envs import make_env
from cua_kit.envs.base import Task
from cua_kit.envs.pool import EnvPool, LatencyEnv
from cua_kit.envs.synth import synth_tasks
from cua_kit.grpo.scoring import score
from cua_kit.inference.base import GenerationRequest, SamplingParams
from cua_kit.inference.hf import HFPolicy
from cua_kit.models.loader import LoadedModel, load_model
from cua_kit.rollout.controller import ControllerSettings, Group, RolloutController, TaskSampler
from cua_kit.rollout.episode import EpisodeSettings, run_episode
from cua_kit.trace import TraceWriter, queries
from cua_kit.trace.rows import mark_consumed, write_group

TEMPERATURE = 0.7  # not 1: the comparison must fail if temperature is not folded into the log-probs
MAX_PIXELS = 61440  # 60 image tokens per screenshot: short prompts, fast tests
SYNTH_SCREEN = (180, 320)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    policy = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"),
                         LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():  # a non-trivial adapter: sampling and scoring must both go through it
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return policy


def sampling(max_new_tokens: int = 24) -> SamplingParams:
    return SamplingParams(temperature=TEMPERATURE, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens)


def env_factory(name: str, chromium_path: str | None):
    if name == "synth":
        return lambda: make_env("synth", screen_size=SYNTH_SCREEN)
    return lambda: make_env("miniwob", chromium_path=chromium_path)


def group_task(name: str) -> Task:
    if name == "synth":
        return synth_tasks(level=1, n=1)[0]
    return Task(id="click-button/train/0", env="miniwob", params={"task": "click-button", "seed": 0})


async def one_group(loaded: LoadedModel, env_name: str, task: Task, chromium_path: str | None,
                    run_dir: Path, trace: TraceWriter) -> Group:
    """One group of 4 episodes through the real controller (pool, agent, HF policy, trace rows)."""
    policy = HFPolicy(loaded, max_batch=4, batch_wait_ms=20)
    pool = EnvPool(env_factory(env_name, chromium_path), size=4)
    tool = "mobile_use" if env_name == "synth" else "computer_use"
    controller = RolloutController(
        policy, pool, Agent(loaded.processor, tool, "relative", history_images=2, max_pixels=MAX_PIXELS),
        TaskSampler([task]), ControllerSettings(n_samples=4, batch_size=1, max_concurrent_rollouts=4,
                                                max_staleness=0),
        EpisodeSettings(sampling(), max_turns=3), run_dir, on_group=lambda g: write_group(trace, g, env_name),
        run_id="t")
    try:
        await controller.start()
        batch = await asyncio.wait_for(controller.get_batch(), 240)
    finally:
        await controller.stop()
        await policy.close()
        await pool.close()
    mark_consumed(trace, batch, step=1, version=0)
    return batch[0]


def fresh_logprobs(loaded: LoadedModel, group: Group) -> list[tuple[list[float], list[float]]]:
    """(recorded, rescored) log-probs of every turn, rescored a few rows at a time in fp32."""
    turns = [t for e in group.episodes for t in e.turns]
    pairs = []
    loaded.model.eval()
    for start in range(0, len(turns), 4):
        chunk = turns[start:start + 4]
        rows = [(t.sample.prompt_ids, t.sample.completion_ids, t.sample.images) for t in chunk]
        with torch.no_grad():
            scored = score(loaded.model, loaded.processor, rows, TEMPERATURE, loaded.device)
        for i, t in enumerate(chunk):
            n = len(t.sample.completion_ids)
            pairs.append((t.sample.logprobs, scored.logprobs[i, scored.logprobs.shape[1] - n:].tolist()))
    return pairs


@pytest.mark.parametrize("env_name", ["synth", "miniwob"])
def test_group_logprobs_match_scoring_and_trace_holds_every_turn(env_name, loaded, tmp_path, request):
    chromium = request.getfixturevalue("chromium_path") if env_name == "miniwob" else None
    run_dir = tmp_path / "run"
    trace = TraceWriter(run_dir / "trace.db", "t")
    try:
        group = asyncio.run(one_group(loaded, env_name, group_task(env_name), chromium, run_dir, trace))
    finally:
        trace.close()

    assert len(group.episodes) == 4 and all(e.reward is not None for e in group.episodes)
    turns = [t for e in group.episodes for t in e.turns]
    assert len(turns) >= 4 and all(t.sample.completion_ids for t in turns)
    for recorded, rescored in fresh_logprobs(loaded, group):
        assert len(recorded) == len(rescored)
        assert max(abs(a - b) for a, b in zip(recorded, rescored)) < 1e-3

    db = queries.open_db(run_dir)
    try:
        assert queries.group(db, group.group_id)["step"] == 1
        episodes = queries.episodes_of_group(db, group.group_id)
        assert [r["episode_id"] for r in episodes] == [e.episode_id for e in group.episodes]
        for episode, row in zip(group.episodes, episodes):
            assert row["reward"] == episode.reward and row["n_turns"] == len(episode.turns)
            stored = queries.turns(db, episode.episode_id)
            assert [r["turn_idx"] for r in stored] == [t.idx for t in episode.turns]
            for turn, r in zip(episode.turns, stored):
                assert (run_dir / r["screenshot_path"]).is_file()
                assert r["completion_text"] == turn.text and r["version"] == 0 and r["staleness"] == 0
                assert r["n_completion_tokens"] == len(turn.sample.completion_ids)
    finally:
        db.close()


class CornerTapAgent(Agent):
    """The real prompt builder, but every completion is read as a tap on an empty corner of the screen: a
    random tiny model rarely writes a valid action, and an invalid one skips env.step (and its latency)."""

    def parse(self, completion: str, screen_size: tuple[int, int], prompt: Prompt) -> Action:
        return Action("click", x=2, y=2)


def test_version_bump_mid_episode_is_used_at_the_next_turn(loaded, tmp_path):
    """The trainer bumps the version from another task while the env is stepping (1 s, like a cloud box):
    the next turn of the same episode is generated by, and recorded with, the new version."""

    async def main():
        policy = HFPolicy(loaded, max_batch=1)
        env = LatencyEnv(make_env("synth", screen_size=SYNTH_SCREEN), step_latency_s=1.0)
        agent = CornerTapAgent(loaded.processor, "mobile_use", "relative", max_pixels=MAX_PIXELS)
        task = synth_tasks(level=2, n=1)[0]  # level 2 ignores a tap on nothing: all 3 turns run

        async def trainer():  # bump once after each of the first two generations, while the env sleeps
            for version in (1, 2):
                while len(policy.batch_sizes) < version:
                    await asyncio.sleep(0.01)
                await policy.update_weights(version, None)

        bumper = asyncio.create_task(trainer())
        settings = EpisodeSettings(sampling(8), max_turns=3)
        episode = await run_episode(env, task, agent, policy, settings, "e0", tmp_path)
        await asyncio.wait_for(bumper, 5)
        await policy.close()
        return episode

    episode = asyncio.run(main())
    assert episode.status == "max_turns" and episode.reward is not None
    assert episode.versions == [0, 1, 2]


def test_static_kv_cache_pads_to_buckets_and_returns_the_same_greedy_completions(loaded):
    """kv_cache=static pads the batch to a power of two and prompts to a multiple of 64 tokens (few shapes
    to compile on CUDA); the padding must not change what each real request gets back."""
    from cua_kit.agent import History
    from cua_kit.inference.base import GenerationRequest
    from cua_kit.inference.hf import _bucket

    assert [_bucket(n, 8) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8] and _bucket(9, 8) == 9
    agent = Agent(loaded.processor, "mobile_use", "relative", 1, 61440, tool_description="compact")
    env = make_env("synth", screen_size=(180, 320))
    requests = []
    for task in synth_tasks(0, 3, "eval"):
        obs = asyncio.run(env.reset(task))
        prompt = agent.build(History(obs.instruction or task.instruction, [obs.screenshot]))
        requests.append(GenerationRequest(prompt.ids, prompt.images, SamplingParams(0.0, 1.0, 0, 12)))
    dynamic = HFPolicy(loaded, max_batch=8).generate_sync(requests)
    static_policy = HFPolicy(loaded, max_batch=8, kv_cache="static")
    static = static_policy.generate_sync(requests)
    assert len(static) == 3 and static_policy.batch_sizes == [3]
    for d, s in zip(dynamic, static):
        assert d.token_ids == s.token_ids
        assert torch.allclose(torch.tensor(d.logprobs), torch.tensor(s.logprobs), atol=1e-4)
    with pytest.raises(ValueError, match="kv_cache"):
        HFPolicy(loaded, kv_cache="paged")


def test_pause_waits_for_the_batch_in_flight_and_holds_new_ones_until_resume(loaded):
    """The in-process backend shares the trainer's weights: after `pause()` returns no generation runs until
    `resume()`; a request submitted while paused is served after it (this is what keeps updates atomic)."""
    ids = loaded.tokenizer("Tap OK", add_special_tokens=False)["input_ids"]
    request = GenerationRequest(ids, [], sampling(16))

    async def main():
        policy = HFPolicy(loaded, max_batch=1)
        events: list[str] = []
        first = asyncio.create_task(policy.generate([request]))
        while policy._idle is None or (policy._idle.is_set() and not policy.batch_sizes):
            await asyncio.sleep(0.001)  # until the first batch is in flight (or already done)
        await policy.pause()
        events.append(f"paused after {len(policy.batch_sizes)} batch(es)")
        second = asyncio.create_task(policy.generate([request]))
        await asyncio.sleep(0.3)
        events.append(f"while paused: second done={second.done()}, batches={len(policy.batch_sizes)}")
        await policy.resume()
        await asyncio.gather(first, second)
        events.append(f"resumed: batches={len(policy.batch_sizes)}")
        await policy.close()
        return events

    assert asyncio.run(main()) == ["paused after 1 batch(es)", "while paused: second done=False, batches=1",
                                   "resumed: batches=2"]


def test_a_format_penalty_shapes_the_reward_not_the_success():
    """rollout.format_penalty lowers the reward of an episode with invalid turns; whether the task was done is the
    env's own score (held-out success rates and per-task tables must not move with a shaping knob)."""
    from cua_kit.envs.base import Task
    from cua_kit.rollout.episode import Episode

    task = Task("t", "synth")
    done_clumsily = Episode("e0", task, env_score=1.0, reward=1.0 - 0.1 * 6)  # 6 invalid turns, penalty 0.1
    assert done_clumsily.reward == pytest.approx(0.4) and done_clumsily.success
    assert not Episode("e1", task, env_score=0.0, reward=0.0).success
    assert not Episode("e2", task, status="env_error").success  # no score: never a success
