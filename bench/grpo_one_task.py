"""Does the GRPO loop raise reward? The smallest end-to-end check: GRPO on ONE task, on the CPU, in ~1 minute.

A fresh LoRA is warm-started by SFT on oracle demos (`--sft-steps`), then the script looks through the first
`--search` train tasks for one whose sampled success (`--samples` episodes at `--temperature`) lies in
[--low, --high], and runs `--steps` GRPO updates on that task alone: each step plays `--samples` episodes
of it through the real env, agent and HF policy, scores them, computes group advantages and calls
`GRPOTrainer.update`. A working trainer drives that task's success towards 100%; a broken one (a sign
error, misaligned log-probs, advantages matched to the wrong episodes) does not. tests/test_grpo_one_task.py
runs it in CI. This checks the optimiser, not generalisation (that is the learning proof in BENCHMARKS.md).

    python bench/grpo_one_task.py [--config configs/quickstart.yaml] [--steps 10] [--out bench/results/grpo_one_task.json]
                                  [overrides...]
Prints a table (step, success, pg_loss, grad_norm, entropy) and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import torch

from cua_kit.config import Config, load_config
from cua_kit.grpo.losses import group_advantages
from cua_kit.grpo.trainer import GRPOTrainer, Sample
from cua_kit.inference.base import writing_weights
from cua_kit.rollout.episode import Episode, run_episode
from cua_kit.sft import record_demos, train_sft_steps
from cua_kit.build import episode_settings, make_agent, make_model, make_policy, make_pool, tasks_for


class OneTask:
    """The warm-started policy, its trainer, and episode play for one config."""

    def __init__(self, cfg: Config, sft_steps: int):
        torch.manual_seed(cfg.trainer.seed)
        self.cfg = cfg
        self.loaded = make_model(cfg)
        self.agent = make_agent(cfg, self.loaded.processor)
        self.sft_steps = sft_steps
        self.policy = make_policy(cfg, self.loaded)
        self.trainer = GRPOTrainer(self.loaded, cfg.grpo, cfg.trainer, episode_settings(cfg).sampling)
        self.pool, self.settings = make_pool(cfg), episode_settings(cfg)  # one env pool for every episode played

    async def warm_start(self) -> None:
        """SFT on the oracle demos of the config's train tasks for `sft_steps` optimizer steps."""
        cfg, sft_steps = self.cfg, self.sft_steps
        demos = await record_demos(cfg, self.agent, tasks_for(cfg, "train")[: cfg.sft.max_tasks or None], 1)
        train_sft_steps(self.loaded, demos, sft_steps, cfg.sft.batch_size, cfg.sft.learning_rate, cfg.trainer.seed)

    async def play(self, task, n: int) -> list[Episode]:
        async def one(i: int) -> Episode:
            async with self.pool.lease() as env:
                return await run_episode(env, task, self.agent, self.policy, self.settings, f"{task.id}-{i}", None, i)

        return list(await asyncio.gather(*(one(i) for i in range(n))))

    async def close(self) -> None:
        await self.policy.close()
        await self.pool.close()

    async def pick_task(self, search: int, n: int, low: float, high: float):
        """The first train task whose sampled success is in [low, high] (else the one closest to the middle)."""
        seen = []
        for task in tasks_for(self.cfg, "train")[:search]:
            rate = sum(e.success for e in await self.play(task, n)) / n
            if low <= rate <= high:
                return task, rate
            seen.append((abs(rate - (low + high) / 2), rate, task))
        _, rate, task = min(seen, key=lambda row: row[0])
        return task, rate

    async def step(self, task, n: int) -> dict[str, float]:
        episodes = await self.play(task, n)
        rewards = torch.tensor([float(e.reward or 0.0) for e in episodes])
        advantages = group_advantages(rewards, mode=self.cfg.grpo.adv_mode).tolist()
        samples = [Sample(t.sample, a, task.id) for e, a in zip(episodes, advantages) for t in e.turns]
        async with writing_weights(self.policy):
            stats = await asyncio.to_thread(self.trainer.update, samples)
            await self.policy.update_weights(self.trainer.version, None)
        return {"success": sum(e.success for e in episodes) / n, "pg_loss": stats.get("pg_loss", 0.0),
                "grad_norm": stats["grad_norm"], "entropy": stats.get("entropy", 0.0)}


async def run(cfg: Config, args: argparse.Namespace) -> dict:
    t0 = time.time()
    check = OneTask(cfg, args.sft_steps)
    try:
        await check.warm_start()
        task, start_rate = await check.pick_task(args.search, args.samples, args.low, args.high)
        print(f"task {task.id}: sampled success {start_rate:.2f} before GRPO", flush=True)
        print(f"{'step':>4} {'success':>8} {'pg_loss':>9} {'grad_norm':>9} {'entropy':>8}")
        rows = []
        for step in range(1, args.steps + 1):
            rows.append({"step": step, **await check.step(task, args.samples)})
            r = rows[-1]
            print(f"{step:>4} {r['success']:>8.2f} {r['pg_loss']:>9.4f} {r['grad_norm']:>9.3f} {r['entropy']:>8.3f}",
                  flush=True)
    finally:
        await check.close()
    return {"task": task.id, "start_success": start_rate, "steps": rows, "model": cfg.model.name,
            "temperature": cfg.rollout.temperature, "learning_rate": cfg.trainer.learning_rate,
            "samples": args.samples, "wall_s": round(time.time() - t0, 1), "machine": platform.processor() or platform.machine()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--search", type=int, default=40)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--low", type=float, default=0.25)
    ap.add_argument("--high", type=float, default=0.75)
    ap.add_argument("--out", default="bench/results/grpo_one_task.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    defaults = ["model.adapter_path=", "rollout.temperature=0.5", "rollout.max_turns=1", "grpo.kl_ctl=0",
                "rollout.max_staleness=0"]
    cfg = load_config(args.config, [*defaults, *args.overrides])
    result = asyncio.run(run(cfg, args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"task": result["task"], "start": result["start_success"],
                      "last3": sum(r["success"] for r in result["steps"][-3:]) / min(3, len(result["steps"]))}))


if __name__ == "__main__":
    main()
