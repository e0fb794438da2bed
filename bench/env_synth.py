"""Benchmark: synth env throughput on one CPU core, for the oracle and a random policy, per level.

steps/s counts `env.step` calls over the whole loop time, resets and policy included (what a rollout
sees); steps per CPU-second (process time) is also given, as it is less disturbed by other
processes on a shared machine. The first pass over the tasks is "cold" (sprites are drawn and cached); the reported numbers are
from a second, warm pass over the same tasks, which is what a long training run sees. Prints a table and
writes JSON:

    python bench/env_synth.py [--episodes 200] [--out bench/results/env_synth.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from pathlib import Path

from cua_kit.actions import random_action
from cua_kit.envs.synth import LEVELS, SynthEnv, synth_tasks


async def run_episodes(env: SynthEnv, level: int, episodes: int, policy: str) -> dict:
    """Run `episodes` episodes; returns steps, resets, success rate and wall time."""
    rng = random.Random(0)
    steps, successes, reset_s = 0, 0.0, 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    for task in synth_tasks(level, episodes, "eval"):
        t0 = time.perf_counter()
        await env.reset(task)
        reset_s += time.perf_counter() - t0
        done = False
        while not done:
            action = await env.oracle_action() if policy == "oracle" else random_action(rng, env.screen_size)
            done = (await env.step(action)).done
            steps += 1
        successes += await env.evaluate()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"level": level, "policy": policy, "episodes": episodes, "steps": steps,
            "success_rate": successes / episodes, "wall_s": wall, "steps_per_s": steps / wall,
            "steps_per_cpu_s": steps / cpu,
            "reset_ms": 1000 * reset_s / episodes, "step_ms": 1000 * (wall - reset_s) / max(1, steps)}


async def main(args: argparse.Namespace) -> list[dict]:
    env = SynthEnv(screen_size=(args.width, args.height))
    rows = []
    for level in LEVELS:
        for policy in ("oracle", "random"):
            cold = await run_episodes(env, level, args.episodes, policy)
            warm = await run_episodes(env, level, args.episodes, policy)
            rows.append({**warm, "cold_steps_per_s": cold["steps_per_s"]})
    await env.close()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'level':>5} {'policy':>7} {'success':>8} {'steps':>6} {'steps/s':>8} {'cold st/s':>9} "
          f"{'reset ms':>8} {'step ms':>8} {'st/cpu-s':>8}")
    for r in rows:
        print(f"{r['level']:>5} {r['policy']:>7} {r['success_rate']:>8.2f} {r['steps']:>6} {r['steps_per_s']:>8.0f} "
              f"{r['cold_steps_per_s']:>9.0f} {r['reset_ms']:>8.3f} {r['step_ms']:>8.3f} {r['steps_per_cpu_s']:>8.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=200, help="episodes per level and policy")
    parser.add_argument("--width", type=int, default=360)
    parser.add_argument("--height", type=int, default=640)
    parser.add_argument("--cpu", type=int, default=0, help="pin to this core (-1: don't pin)")
    parser.add_argument("--out", default="bench/results/env_synth.json")
    args = parser.parse_args()
    if args.cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    rows = asyncio.run(main(args))
    print_table(rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = {"machine": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores_visible": os.cpu_count(), "pinned_core": args.cpu, "load_avg_1min": load,
            "screen_size": [args.width, args.height], "python": platform.python_version()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}  (load average {load})")
