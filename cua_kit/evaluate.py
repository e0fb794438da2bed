"""Held-out evaluation: success rate of a policy on the eval split, episodes written to a trace DB.

Each eval episode is one sample of one task (tasks cycle in file order, so two evals of the same config
see the same tasks); sampling uses trainer.eval_temperature (0 = greedy). On envs with a `task_key`
(MiniWoB++) the tasks cycle one task name at a time, and the result adds success per task and the mean
over tasks, the number papers on MiniWoB++ report, beside the mean over episodes. Episodes that end in an
error are not scored (counted as `env_errors`); a systemic one (`rollout.health`: a full disk, the same error
over and over) stops the eval with RunFailure instead of running the rest into the same wall.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cua_kit.agent import Agent
from cua_kit.build import episode_settings, tasks_for
from cua_kit.config import Config
from cua_kit.envs import Task, env_class
from cua_kit.envs.pool import EnvPool
from cua_kit.inference.base import Policy
from cua_kit.rollout.episode import Episode, run_episode
from cua_kit.rollout.health import RunFailure, RunHealth
from cua_kit.trace.rows import episode_row, turn_row
from cua_kit.trace.store import TraceWriter


async def run_eval(cfg: Config, policy: Policy, pool: EnvPool, agent: Agent, episodes: int, run_dir: Path,
                   label: str, temperature: float | None = None) -> dict[str, Any]:
    """Run `episodes` held-out episodes at `temperature` (default trainer.eval_temperature);
    returns {"episodes", "success_rate", "env_errors", "trace"}, and `per_task_summary`'s keys on envs with
    a `task_key`."""
    key = env_class(cfg.env.name).task_key
    tasks = tasks_for(cfg, cfg.env.eval_split)
    tasks = round_robin(tasks, key) if key else tasks
    settings = episode_settings(cfg, cfg.trainer.eval_temperature if temperature is None else temperature)
    out_dir = run_dir / "eval" / label
    limit = asyncio.Semaphore(max(1, cfg.rollout.max_concurrent_rollouts))
    health = RunHealth(cfg.rollout.max_errors_in_a_row)

    bar = _progress_bar(episodes, f"eval {label}", cfg.logging.progress)

    async def one(i: int) -> Episode:
        async with limit:
            if health.failure is not None:
                raise RunFailure(f"eval {label}: {health.failure}")
            async with pool.lease() as env:
                episode = await run_episode(env, tasks[i % len(tasks)], agent, policy, settings,
                                            f"eval-{label}-{i:04d}", out_dir, 0)
        health.record(episode)
        bar.update(1)
        return episode

    jobs = [asyncio.ensure_future(one(i)) for i in range(episodes)]
    try:
        results = await asyncio.gather(*jobs)
    except BaseException:  # RunFailure (or a cancel): the episodes still running stop too
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        raise
    finally:
        bar.close()
    _write_trace(out_dir, f"eval-{label}", cfg, results)
    if health.failure is not None:  # recorded by the last episodes, after every job had started
        raise RunFailure(f"eval {label}: {health.failure}")
    scored = [e for e in results if e.reward is not None]
    rate = sum(e.success for e in scored) / len(scored) if scored else 0.0
    summary = {"episodes": len(scored), "success_rate": rate, "env_errors": len(results) - len(scored),
               "trace": str(out_dir / "trace.db")}
    if key:
        summary.update(per_task_summary(results, key, len({t.params.get(key) for t in tasks})))
    return summary


def round_robin(tasks: list[Task], key: str) -> list[Task]:
    """`tasks` one task name at a time (each name's first row, then each one's second, ...), so that the first
    N episodes of an eval cover N tasks instead of the seeds of the file's first few."""
    groups: dict[Any, list[Task]] = {}
    for task in tasks:
        groups.setdefault(task.params.get(key), []).append(task)
    return [t for column in itertools.zip_longest(*groups.values()) for t in column if t is not None]


def per_task_summary(episodes: list[Episode], key: str, tasks_in_split: int) -> dict[str, Any]:
    """{"per_task": {name: {episodes, successes, env_errors, success_rate}}, "task_mean_success_rate" (the
    unweighted mean of the tasks' success rates), "tasks_scored", "tasks_in_split"}."""
    rows: dict[str, dict[str, Any]] = {}
    for e in episodes:
        row = rows.setdefault(str(e.task.params.get(key)), {"episodes": 0, "successes": 0, "env_errors": 0})
        if e.reward is None:
            row["env_errors"] += 1
        else:
            row["episodes"] += 1
            row["successes"] += int(e.success)
    for row in rows.values():
        row["success_rate"] = row["successes"] / row["episodes"] if row["episodes"] else None
    rates = [row["success_rate"] for row in rows.values() if row["episodes"]]
    return {"per_task": dict(sorted(rows.items())), "task_mean_success_rate": sum(rates) / len(rates) if rates else 0.0,
            "tasks_scored": len(rates), "tasks_in_split": tasks_in_split}


def per_task_table(result: dict[str, Any]) -> str:
    """The printed per-task table of a `run_eval` result, ending with the mean over tasks and over episodes."""
    lines = [f"{'task':32s} {'episodes':>8s} {'success':>8s}"]
    for name, row in result["per_task"].items():
        rate = "-" if row["success_rate"] is None else f"{100 * row['success_rate']:.1f}%"
        errors = f"  ({row['env_errors']} env errors)" if row["env_errors"] else ""
        lines.append(f"{name:32s} {row['episodes']:>8d} {rate:>8s}{errors}")
    lines.append(f"mean over {result['tasks_scored']} tasks: {100 * result['task_mean_success_rate']:.1f}% "
                 f"(mean over {result['episodes']} episodes: {100 * result['success_rate']:.1f}%)")
    missing = result["tasks_in_split"] - result["tasks_scored"]
    if missing:  # the mean over tasks is then over a subset: say so, and how to cover every task
        lines.append(f"{missing} of the split's {result['tasks_in_split']} tasks got no scored episode; "
                     f"{result['tasks_in_split']} or more episodes give each task one")
    return "\n".join(lines)


def _progress_bar(total: int, label: str, enabled: bool) -> tqdm:
    """The eval's bar on stderr. The screen size comes from shutil (80x24 when the terminal reports none: a pty
    with no size, as under `script` or some CI consoles, made tqdm read 0 columns and -1 rows and hide the bar
    altogether); a file (the launcher's train.log) gets a frame every 30 s instead of every 0.1 s."""
    size, tty = shutil.get_terminal_size(), sys.stderr.isatty()
    return tqdm(total=total, desc=label, unit="ep", disable=not enabled, leave=False, file=sys.stderr,
                ncols=size.columns, nrows=size.lines, mininterval=0.1 if tty else 30.0)


def curve_path(run_dir: Path) -> Path:
    """The run's learning curve: one JSON line per held-out eval (label, step, success rates)."""
    return run_dir / "eval" / "curve.jsonl"


def reconcile_evals(run_dir: Path, step: int, resumed: bool) -> None:
    """Make <run>/eval/ agree with the run that starts now, as the steps rows do: a fresh run (not resumed)
    starts with no evals; a run resumed at `step` keeps the curve points (and their folders) of steps up to
    `step` (the eval at a step runs before that step's checkpoint) and drops later ones, which a killed run
    wrote after its last checkpoint and the resumed run writes again."""
    eval_dir, curve = run_dir / "eval", curve_path(run_dir)
    if not eval_dir.exists():
        return
    points = [json.loads(line) for line in curve.read_text().splitlines() if line.strip()] if curve.exists() else []
    if resumed:
        kept = [p for p in points if p["step"] <= step]
        dropped = {p["label"] for p in points} - {p["label"] for p in kept}
        stale = [eval_dir / name for label in dropped for name in (label, f"{label}-sampled")]
    else:  # every label folder goes, including those of a run whose curve was lost
        kept, stale = [], [d for d in eval_dir.iterdir() if d.is_dir()]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if curve.exists():
        tmp = curve.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(p) + "\n" for p in kept))
        os.replace(tmp, curve)


def _write_trace(out_dir: Path, run_id: str, cfg: Config, episodes: list[Episode]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with TraceWriter(out_dir / "trace.db", run_id) as trace:
        trace.start_run(cfg.experiment_name, run_id, cfg.to_dict())
        for e in episodes:
            trace.add_episode(episode_row(e, "", cfg.env.name, None))
            for turn in e.turns:
                trace.add_turn(turn_row(e.episode_id, turn))
        trace.finish_run("finished")


def adapter_folder(checkpoint: str | Path) -> str:
    """Accept a checkpoint folder (adapter/ inside) or an adapter folder itself."""
    path = Path(checkpoint)
    if (path / "adapter" / "adapter_config.json").exists():
        return str(path / "adapter")
    if (path / "adapter_config.json").exists():
        return str(path)
    raise FileNotFoundError(f"{path}: no peft adapter here (expected adapter_config.json or adapter/)")
