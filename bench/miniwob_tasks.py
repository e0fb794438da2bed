"""Benchmark: every runnable MiniWoB++ task of the wheel, one row each, in real headless Chromium.

For each task of `cua_kit.envs.miniwob_tasks.task_names()` it plays `--episodes` episodes with the kit's
uniformly random policy (`actions.random_action`, up to `--max-steps` steps) and, where the task has a
scripted oracle (`miniwob.ORACLES`), as many oracle episodes, on the eval seeds (10000..) of
data/miniwob_all.jsonl. Success is the page's raw reward > 0 (what `env.evaluate()` > 0 means).
steps/s of a task = its random episodes' steps / the time spent in their `reset` and `step` calls, with
the steps that sleep on purpose left out of both (`wait` and `long_press`: 6% of the random policy's
actions, 1 s each, which would rank tasks by luck), while `--envs` envs share one Chromium and the CPU:
it ranks tasks by env cost rather than giving an idle machine's rate. Prints a table, writes JSON:

    python bench/miniwob_tasks.py [--episodes 3] [--max-steps 10] [--envs 2] [--tasks a,b]
                                  [--out bench/results/miniwob_tasks.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cua_kit.actions import random_action
from cua_kit.envs.base import Task
from cua_kit.envs.miniwob import ORACLES, MiniWobBrowser, MiniWobEnv
from cua_kit.envs.miniwob_tasks import EVAL_SEED0, REFUSED, task_names

SLEEPS = ("wait", "long_press")  # actions that sleep ~1 s by design: left out of steps/s


@dataclass
class Run:
    """One episode's outcome; `error` is an exception's first line (the bench goes on with the next)."""

    task: str
    policy: str
    seed: int
    steps: int = 0
    success: bool = False
    timed_steps: int = 0  # steps that do not sleep on purpose (no wait, no long press)
    env_s: float = 0.0  # reset + those steps
    error: str | None = None


async def play(env: MiniWobEnv, name: str, policy: str, seed: int, max_steps: int) -> Run:
    """Reset, act with `policy` until done or `max_steps`, evaluate; env time excludes the oracle's look-ups."""
    run, rng = Run(name, policy, seed), random.Random(f"{name}:{seed}")
    try:
        t0 = time.perf_counter()
        obs = await env.reset(Task(id=f"{name}/eval/{seed}", env="miniwob", params={"task": name, "seed": seed}))
        run.env_s += time.perf_counter() - t0
        for _ in range(max_steps):
            action = await env.oracle_action() if policy == "oracle" else random_action(rng, obs.size)
            t0 = time.perf_counter()
            result = await env.step(action)
            if action.kind not in SLEEPS:
                run.env_s += time.perf_counter() - t0
                run.timed_steps += 1
            run.steps, obs = run.steps + 1, result.observation
            if result.done:
                break
        run.success = await env.evaluate() > 0
    except Exception as exc:  # noqa: BLE001 - recorded per task and shown in the table
        run.error = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return run


def jobs(names: list[str], episodes: int) -> list[tuple[str, str, int]]:
    """(task, policy, seed): random episodes of every task, oracle ones where an oracle exists, task by task."""
    seeds = range(EVAL_SEED0, EVAL_SEED0 + episodes)
    return [(name, policy, seed) for name in names for policy in ("random", "oracle")
            if policy == "random" or name in ORACLES for seed in seeds]


async def run_all(names: list[str], episodes: int, max_steps: int, n_envs: int) -> tuple[list[Run], float]:
    """Every job on `n_envs` envs of one browser; each env takes a contiguous share (reloads on task change)."""
    work = jobs(names, episodes)
    bounds = [round(i * len(work) / n_envs) for i in range(n_envs + 1)]
    browser = MiniWobBrowser()
    envs = [MiniWobEnv(browser=browser) for _ in range(n_envs)]

    async def worker(env: MiniWobEnv, share: list[tuple[str, str, int]]) -> list[Run]:
        return [await play(env, name, policy, seed, max_steps) for name, policy, seed in share]

    try:  # start the browser and a page per env before the clock: the first reset would carry ~1 s of it
        await asyncio.gather(*(env.reset(Task(id="warm", env="miniwob", params={"task": "click-test"}))
                               for env in envs))
        start = time.perf_counter()
        shares = await asyncio.gather(*(worker(env, work[bounds[i]:bounds[i + 1]]) for i, env in enumerate(envs)))
        wall = time.perf_counter() - start
    finally:
        for env in envs:
            await env.close()
        await browser.close()
    return [run for share in shares for run in share], wall


def per_task(runs: list[Run]) -> list[dict]:
    """One row per task: random success, oracle success (None without an oracle), steps/s, errors."""
    rows = []
    for name in dict.fromkeys(r.task for r in runs):
        mine = [r for r in runs if r.task == name]
        rand, orac = [r for r in mine if r.policy == "random"], [r for r in mine if r.policy == "oracle"]
        timed, env_s = sum(r.timed_steps for r in rand), sum(r.env_s for r in rand)
        rows.append({"task": name, "random_success": sum(r.success for r in rand) / len(rand),
                     "oracle_success": sum(r.success for r in orac) / len(orac) if orac else None,
                     "random_steps": sum(r.steps for r in rand), "steps_per_s": timed / env_s if env_s else 0.0,
                     "errors": [r.error for r in mine if r.error]})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'task':30s} {'random':>7s} {'oracle':>7s} {'steps':>6s} {'steps/s':>8s}  errors")
    for r in rows:
        oracle = "-" if r["oracle_success"] is None else f"{r['oracle_success']:.2f}"
        print(f"{r['task']:30s} {r['random_success']:>7.2f} {oracle:>7s} {r['random_steps']:>6d} "
              f"{r['steps_per_s']:>8.1f}  {'; '.join(r['errors'])}")


def summary(rows: list[dict], runs: list[Run], wall: float) -> dict:
    """Means over tasks (as MiniWoB++ tables report) and the whole run's throughput."""
    oracle = [r["oracle_success"] for r in rows if r["oracle_success"] is not None]
    steps = sum(r.steps for r in runs)
    return {"tasks": len(rows), "refused": len(REFUSED), "episodes": len(runs),
            "random_success_mean_over_tasks": sum(r["random_success"] for r in rows) / len(rows),
            "tasks_random_solved_once": sum(r["random_success"] > 0 for r in rows),
            "oracle_tasks": len(oracle), "oracle_success_mean_over_tasks": sum(oracle) / len(oracle) if oracle else None,
            "tasks_with_errors": sum(bool(r["errors"]) for r in rows), "steps": steps, "wall_s": wall,
            "steps_per_s_all_envs": steps / wall}


def machine() -> dict:
    """Where and on what this ran: cores, CPU model, commit, load (other jobs skew every rate)."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"machine": platform.platform(), "cpu": model, "cores_visible": os.cpu_count(), "commit": commit,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=3, help="episodes per task and policy (eval seeds 10000..)")
    parser.add_argument("--max-steps", type=int, default=10, help="steps per episode at most")
    parser.add_argument("--envs", type=int, default=2, help="envs sharing one Chromium")
    parser.add_argument("--tasks", help="comma-separated task names (default: every runnable task)")
    parser.add_argument("--out", default="bench/results/miniwob_tasks.json")
    args = parser.parse_args()
    names = args.tasks.split(",") if args.tasks else task_names()
    load_before = os.getloadavg()[0]
    runs, wall = asyncio.run(run_all(names, args.episodes, args.max_steps, args.envs))
    rows = per_task(runs)
    print_table(rows)
    total = summary(rows, runs, wall)
    print(json.dumps(total))
    meta = {**machine(), "args": vars(args), "load_avg_1min_before": load_before,
            "load_avg_1min_after": os.getloadavg()[0]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": total, "per_task": rows,
                               "episodes": [asdict(r) for r in runs]}, indent=1))
    print(f"wrote {out} (load average {meta['load_avg_1min_before']:.2f} before, "
          f"{meta['load_avg_1min_after']:.2f} after)")


if __name__ == "__main__":
    main()
