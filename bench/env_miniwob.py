"""Benchmark: MiniWoB++ throughput in real headless Chromium, N envs at once on one shared browser.

Each env runs oracle episodes back to back (reset, oracle steps until done) for `--seconds`. steps/s
counts `env.step` calls over the wall time with resets and oracle look-ups included (what a rollout
with an instant policy sees); each step includes its 320x420 PNG screenshot. steps per CPU-second
(Python + Playwright driver + Chromium, all processes) is also given: it is what the env costs, and
it is less disturbed by other work on a shared machine (2 cores x steps/cpu-s = the ceiling there). The goal on the 2-core dev
machine: >= 50 steps/s with 8 envs. use-autocomplete is left out: its oracle sleeps 0.4 s for the
page's suggestion delay, which measures the page, not the env. Prints a table and writes JSON:

    python bench/env_miniwob.py [--envs 1,8] [--episodes-per-task 1,8] [--seconds 20] [--fixed-work]
                                [--player oracle|random] [--max-steps 12] [--out bench/results/env_miniwob.json]

`--player random` plays the kit's uniformly random policy instead (no DOM look-ups, so the wall time is
env time only; episodes run until the page ends them or --max-steps): the rate a rollout whose policy
costs nothing would see, with fewer resets per step than the oracle's one- and two-step episodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from cua_kit.actions import random_action
from cua_kit.envs.base import Task
from cua_kit.envs.miniwob import ORACLES, MiniWobBrowser, MiniWobEnv, descendant_pids, process_group_pids

BENCH_TASKS = sorted(set(ORACLES) - {"use-autocomplete"})


def pss_mb(pids: list[int]) -> float:
    """Proportional set size of these processes in MiB: shared pages split, so the sum is honest."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
    return total_kb / 1024


def process_kind(pid: int) -> str:
    """'driver' (Playwright's node), 'browser' (Chromium's main process) or Chromium's --type (renderer,
    gpu-process, utility, zygote). Chromium rewrites its argv into one string, hence the search."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        exe = os.path.basename(os.path.realpath(f"/proc/{pid}/exe"))
    except OSError:
        return "gone"
    match = re.search(r"--type=(\S+)", cmdline)
    return match.group(1) if match else "driver" if "node" in exe else "browser"


def cpu_seconds_by_process() -> dict[int | str, tuple[str, float]]:
    """pid -> (kind, CPU seconds user+system) for this process ('python') and every live descendant."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int | str, tuple[str, float]] = {"python": ("python", time.process_time())}
    for pid in descendant_pids(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[pid] = (process_kind(pid), (int(fields[11]) + int(fields[12])) / ticks)  # utime, stime
    return found


def cpu_used_by_kind(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two `cpu_seconds_by_process` snapshots, summed per process kind."""
    used: dict[str, float] = {}
    for pid, (kind, cpu) in after.items():
        used[kind] = used.get(kind, 0.0) + cpu - before.get(pid, (kind, 0.0))[1]
    return dict(sorted(used.items(), key=lambda kv: -kv[1]))


def cpu_seconds_of_tree() -> float:
    """CPU time (user+system) of this process and every live descendant (driver, Chromium)."""
    return sum(cpu for _, cpu in cpu_seconds_by_process().values())


@dataclass(frozen=True)
class Workload:
    """Who acts and for how long: the oracle (policy time = its DOM look-ups) or the kit's uniformly random
    policy (`actions.random_action`, ~0 policy time: every step is env time), at most `max_steps` a episode."""

    policy: str = "oracle"
    max_steps: int = 12


async def episode(env: MiniWobEnv, name: str, seed: int, label: str, stats: dict, work: Workload) -> None:
    """One episode (reset, policy steps until done or max_steps); appends latencies and the outcome."""
    task = Task(id=f"{name}-{label}-{seed}", env="miniwob", params={"task": name, "seed": seed})
    rng = random.Random(f"{label}:{name}:{seed}")
    t0 = time.perf_counter()
    obs = await env.reset(task)
    stats["reset_s"].append(time.perf_counter() - t0)
    for _ in range(work.max_steps):
        t0 = time.perf_counter()
        action = await env.oracle_action() if work.policy == "oracle" else random_action(rng, obs.size)
        stats["policy_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        done = (await env.step(action)).done
        stats["step_s"].append(time.perf_counter() - t0)
        if done:
            break
    stats["success"].append(await env.evaluate() > 0)


async def worker(env: MiniWobEnv, index: int, deadline: float, per_task: int, stats: dict, work: Workload) -> None:
    """Oracle episodes until the deadline, `per_task` seeds of a task before the next task (a new
    task reloads the page, ~170 ms CPU)."""
    n = 0
    while time.perf_counter() < deadline:
        await episode(env, BENCH_TASKS[(index + n // per_task) % len(BENCH_TASKS)], n, str(index), stats, work)
        n += 1


async def fixed_worker(env: MiniWobEnv, share: list[tuple[str, int]], stats: dict, work: Workload) -> None:
    """This env's contiguous share of the fixed work (so reloads happen only on a task change)."""
    for name, seed in share:
        await episode(env, name, seed, "fixed", stats, work)


def fixed_shares(n_envs: int, per_task: int) -> list[list[tuple[str, int]]]:
    """Every bench task x `per_task` seeds, split into `n_envs` contiguous shares of near-equal size."""
    work = [(name, seed) for name in BENCH_TASKS for seed in range(per_task)]
    bounds = [round(i * len(work) / n_envs) for i in range(n_envs + 1)]
    return [work[bounds[i]:bounds[i + 1]] for i in range(n_envs)]


async def run(n_envs: int, per_task: int, seconds: float, chromium_path: str | None, fixed: bool = False,
              work: Workload = Workload()) -> dict:
    browser = MiniWobBrowser(chromium_path)
    envs = [MiniWobEnv(browser=browser) for _ in range(n_envs)]
    try:
        # Warm up: start the browser and load a page in every env before the clock starts.
        await asyncio.gather(*(env.reset(Task(id="warm", env="miniwob", params={"task": "click-test"}))
                               for env in envs))
        stats: dict[str, list] = {"reset_s": [], "step_s": [], "policy_s": [], "success": []}
        start, cpu_start = time.perf_counter(), cpu_seconds_by_process()
        if fixed:
            await asyncio.gather(*(fixed_worker(env, share, stats, work)
                                   for env, share in zip(envs, fixed_shares(n_envs, per_task))))
        else:
            await asyncio.gather(*(worker(env, i, start + seconds, per_task, stats, work)
                                   for i, env in enumerate(envs)))
        wall, cpu_by_kind = time.perf_counter() - start, cpu_used_by_kind(cpu_start, cpu_seconds_by_process())
        cpu = sum(cpu_by_kind.values())
        memory = pss_mb(process_group_pids(browser.pid)) if browser.pid else float("nan")
    finally:
        for env in envs:
            await env.close()
        await browser.close()
    steps, step_ms = len(stats["step_s"]), sorted(1000 * s for s in stats["step_s"])
    return {"envs": n_envs, "episodes_per_task": per_task, "fixed_work": fixed, "policy": work.policy, "wall_s": wall, "steps": steps, "episodes": len(stats["success"]),
            "steps_per_s": steps / wall, "resets_per_s": len(stats["reset_s"]) / wall,
            "success_rate": sum(stats["success"]) / max(1, len(stats["success"])),
            "step_ms_p50": statistics.median(step_ms), "step_ms_p95": step_ms[int(0.95 * (steps - 1))],
            "reset_ms_p50": 1000 * statistics.median(stats["reset_s"]),
            # Policy time, not env time (the oracle's DOM look-ups and animation waits), yet inside wall_s:
            "policy_ms_p50": 1000 * statistics.median(stats["policy_s"]), "policy_s_sum": sum(stats["policy_s"]),
            "cpu_s": cpu, "steps_per_cpu_s": steps / cpu, "chromium_pss_mb": memory,
            "chromium": browser.chromium_path,
            "cpu_ms_per_step_by_process": {k: round(1000 * v / max(1, steps), 1) for k, v in cpu_by_kind.items()}}


def print_table(rows: list[dict]) -> None:
    print(f"{'envs':>4} {'ep/task':>7} {'steps':>6} {'steps/s':>8} {'resets/s':>8} {'success':>7} {'step p50':>8} "
          f"{'step p95':>8} {'reset p50':>9} {'st/cpu-s':>8} {'Chromium PSS MiB':>16}")
    for r in rows:
        print(f"{r['envs']:>4} {r['episodes_per_task']:>7} {r['steps']:>6} {r['steps_per_s']:>8.1f} {r['resets_per_s']:>8.1f} "
              f"{r['success_rate']:>7.2f} {r['step_ms_p50']:>8.1f} {r['step_ms_p95']:>8.1f} "
              f"{r['reset_ms_p50']:>9.1f} {r['steps_per_cpu_s']:>8.1f} {r['chromium_pss_mb']:>16.0f}")
    print("CPU ms per step by process:")
    for r in rows:
        parts = ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_step_by_process"].items() if v >= 0.1)
        print(f"  envs {r['envs']}, ep/task {r['episodes_per_task']}: {parts}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default="1,8", help="comma-separated env counts to measure")
    parser.add_argument("--episodes-per-task", default="1,8",
                        help="comma-separated: episodes of one task before switching (1 = reload every reset)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time per env count")
    parser.add_argument("--fixed-work", action="store_true",
                        help="instead of --seconds: every task x episodes-per-task seeds, split among the envs")
    parser.add_argument("--player", "--policy", dest="policy", choices=("oracle", "random"), default="oracle",
                        help="oracle (default; success should be 1.00) or the kit's random policy (no policy time)")
    parser.add_argument("--max-steps", type=int, default=12, help="steps per episode at most")
    parser.add_argument("--chromium", default=None,
                        help="Chromium binary (default: the env's, Debian's chromium-headless-shell)")
    parser.add_argument("--out", default="bench/results/env_miniwob.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # the run itself drives the load up: check this one is < 1
    work = Workload(args.policy, args.max_steps)
    rows = [asyncio.run(run(int(n), int(k), args.seconds, args.chromium, args.fixed_work, work))
            for n in args.envs.split(",") for k in args.episodes_per_task.split(",")]
    print_table(rows)
    load = os.getloadavg()[0]
    meta = {"machine": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cores_visible": os.cpu_count(), "load_avg_1min": load, "tasks": BENCH_TASKS,
            "screenshot_px": [320, 420], "python": platform.python_version(), "load_avg_1min_before": load_before}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}  (load average {load_before:.2f} before, {load:.2f} after)")
