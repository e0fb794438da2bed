"""Benchmark: training episodes per hour, synchronous (max_staleness 0) against asynchronous rollout.

Same workload in both modes, one process, the colocated layout of cua_kit.train: the tiny Qwen3-VL samples
every turn through HFPolicy (batched), synth envs wrapped in LatencyEnv sleep --env-latency seconds per step
(like a cloud phone), and a simulated optimizer step sleeps --train-s seconds *inside the model lock* in a
worker thread (the real trainer holds the lock the same way), then bumps the policy version. A tiny random
model rarely writes a valid action, and an invalid one skips env.step (and its latency), so an unparsable
completion is played as a seeded random tap: every turn pays the env latency, as with a trained model.

    python bench/rollout_async.py                       # defaults below; prints a table, writes JSON
    python bench/rollout_async.py --steps 4 --train-s 3 --async-staleness 1 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from cua_kit.actions import Action, InvalidAction
from cua_kit.agent import Agent, Prompt
from cua_kit.config import LoraConfig, ModelConfig
from cua_kit.envs.pool import EnvPool, LatencyEnv
from cua_kit.envs.synth import SynthEnv, synth_tasks
from cua_kit.inference.base import GenerationRequest, Policy, SamplingParams, writing_weights
from cua_kit.inference.hf import HFPolicy
from cua_kit.models.loader import LoadedModel, load_model
from cua_kit.models.tiny import make_tiny_model
from cua_kit.rollout.controller import ControllerSettings, RolloutController, TaskSampler
from cua_kit.rollout.episode import EpisodeSettings


class TapFallbackAgent(Agent):
    """The real agent; an unparsable completion becomes a random tap (so every turn steps the env)."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)

    def parse(self, completion: str, screen_size: tuple[int, int], prompt: Prompt) -> Action | InvalidAction:
        action = super().parse(completion, screen_size, prompt)
        if isinstance(action, Action) and action.kind != "finish":
            return action
        return Action("click", x=self.rng.randrange(screen_size[0]), y=self.rng.randrange(screen_size[1]))


async def train_step(policy: Policy, seconds: float) -> None:
    """A simulated optimizer step of `seconds`, then the new version served (as the training loop does it)."""
    async with writing_weights(policy):
        await asyncio.to_thread(time.sleep, seconds)
        await policy.update_weights(policy.version + 1, None)


async def run_mode(loaded: LoadedModel, args: argparse.Namespace, max_staleness: int) -> dict:
    policy = HFPolicy(loaded, max_batch=args.max_concurrent, batch_wait_ms=5)
    pool = EnvPool(lambda: LatencyEnv(SynthEnv(screen_size=(args.width, args.height)), args.env_latency, 0.0),
                   args.max_concurrent)
    agent = TapFallbackAgent(loaded.processor, "mobile_use", "relative", history_images=2, max_pixels=args.max_pixels)
    settings = ControllerSettings(args.n_samples, args.batch_size, args.max_concurrent, max_staleness)
    sampling = SamplingParams(0.7, 1.0, 0, args.max_new_tokens)
    controller = RolloutController(policy, pool, agent, TaskSampler(synth_tasks(2, 200)), settings,
                                   EpisodeSettings(sampling, max_turns=args.max_turns))
    staleness, turns, train_s = [], 0, 0.0
    start = time.perf_counter()
    await controller.start()
    try:
        for _ in range(args.steps):
            batch = await controller.get_batch()
            version = policy.version
            staleness += [version - v for g in batch for e in g.valid for v in e.versions]
            turns += sum(len(e.turns) for g in batch for e in g.valid)
            t0 = time.perf_counter()
            await train_step(policy, args.train_s)
            train_s += time.perf_counter() - t0
            await controller.notify_version()
        wall = time.perf_counter() - start
        gen = policy.stats()
    finally:
        await controller.stop()
        await policy.close()
        await pool.close()
    episodes = args.steps * args.batch_size * args.n_samples
    return {
        "max_staleness": max_staleness, "steps": args.steps, "wall_s": round(wall, 2),
        "episodes_consumed": episodes, "episodes_per_hour": round(episodes / wall * 3600, 1),
        "s_per_step": round(wall / args.steps, 2), "train_s": round(train_s, 2),
        "generate_busy_s": round(gen["gen_busy_s"], 2), "turns_per_episode": round(turns / episodes, 2),
        "mean_gen_batch": round(gen["gen_requests"] / max(1, gen["gen_calls"]), 2),
        "staleness_mean": round(sum(staleness) / max(1, len(staleness)), 3), "staleness_max": max(staleness, default=0),
        "episodes_started": controller.stats.episodes, "groups_dropped_stale": controller.stats.groups_dropped_stale,
    }


def warm_up(loaded: LoadedModel, args: argparse.Namespace) -> None:
    """One generation per batch size used later, so neither mode pays first-call costs."""
    policy = HFPolicy(loaded)
    agent = Agent(loaded.processor, "mobile_use", "relative", max_pixels=args.max_pixels)
    env = SynthEnv(screen_size=(args.width, args.height))
    from cua_kit.agent import History

    obs = asyncio.run(env.reset(synth_tasks(2, 1)[0]))
    prompt = agent.build(History(obs.instruction, [obs.screenshot]))
    request = GenerationRequest(prompt.ids, prompt.images, SamplingParams(0.7, 1.0, 0, args.max_new_tokens))
    for n in (1, args.max_concurrent):
        policy.generate_sync([request] * n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="training steps per mode")
    p.add_argument("--env-latency", type=float, default=1.0, help="seconds added to every env step")
    p.add_argument("--train-s", type=float, default=4.0, help="seconds one simulated optimizer step holds the lock")
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=2, help="groups per training step")
    p.add_argument("--max-concurrent", type=int, default=16, help="episodes in flight")
    p.add_argument("--max-turns", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--async-staleness", type=int, default=2, help="max_staleness of the async mode")
    p.add_argument("--width", type=int, default=360)
    p.add_argument("--height", type=int, default=640)
    p.add_argument("--max-pixels", type=int, default=61440)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--model-dir", default=None, help="a tiny model folder (default: build one in a temp dir)")
    p.add_argument("--out", default="bench/results/rollout_async.json")
    args = p.parse_args()

    torch.manual_seed(0)
    model_dir = args.model_dir or str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "qwen3_vl", "tiny"))
    loaded = load_model(ModelConfig(name=model_dir, device=args.device), LoraConfig(r=4, alpha=8))
    warm_up(loaded, args)
    results = [asyncio.run(run_mode(loaded, args, 0)), asyncio.run(run_mode(loaded, args, args.async_staleness))]
    ratio = results[1]["episodes_per_hour"] / results[0]["episodes_per_hour"]

    cols = ["max_staleness", "wall_s", "s_per_step", "episodes_per_hour", "train_s", "generate_busy_s",
            "turns_per_episode", "mean_gen_batch", "staleness_mean", "staleness_max", "groups_dropped_stale"]
    print(" | ".join(f"{c:>14}" for c in ["mode"] + cols))
    for name, row in zip(["sync", "async"], results):
        print(" | ".join(f"{v:>14}" for v in [name] + [row[c] for c in cols]))
    print(f"async / sync episodes per hour: {ratio:.2f}x (goal >= 2.5x at {args.env_latency:g} s env latency)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": torch.get_num_threads(),
               "device": str(loaded.device), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if loaded.device.type == "cuda" else None}
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "sync": results[0], "async": results[1],
                               "ratio": round(ratio, 3)}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
