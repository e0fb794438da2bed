"""`cua-kit env`: look at the environment backends, watch a scripted player play them, sweep leaked cloud boxes.

    cua-kit env list                          backends, whether they run here, shipped task sets
    cua-kit env demo synth --task synth-L1 --player oracle --episodes 8
    cua-kit env sweep gbox --dry-run          boxes cua-kit left running in the GBox cloud

`demo` runs whole episodes through the same `Env` protocol the trainer uses, with the env's own oracle
(`env.oracle_action()`) or a uniformly random player (`actions.random_action`), and saves every step's
screenshot with the action drawn on it, so a person can see what an env looks like and check that its
reward means what it should (the oracle near 100%, random far below). The envs run in an `EnvPool` as in
training: an env error (a box answering 5xx, a browser that died) ends that episode, which is counted and
not scored, a fresh env takes over, and the demo goes on; its exit code is 1 when any episode hit one.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import importlib.util
import logging
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cua_kit.cli import command, print_json_line
from cua_kit.envs.base import Env, Task

DATA_DIR = Path(__file__).resolve().parents[1] / "data"  # the repo's data/ (not shipped in a wheel)
TASK_FILES = {"synth": "synth_tasks.jsonl", "miniwob": "miniwob_tasks.yaml", "gbox": "gbox_tasks.yaml"}  # defaults
# Also shipped: the quickstart's level-0 set; every MiniWoB++ task that runs (python -m cua_kit.envs.miniwob_tasks).
MORE_TASK_FILES = [("synth", "synth_L0.jsonl"), ("miniwob", "miniwob_all.jsonl")]
DEFAULT_MAX_STEPS = 20  # a cap for envs that never end an episode themselves (a random player on gbox)


def task_file(env: str, override: str | None = None) -> Path:
    """The task file of `env`: `override`, else data/<file> of the repo, else ./data/<file>."""
    if override:
        return Path(override)
    if env not in TASK_FILES:
        raise ValueError(f"env {env!r} ships no task file; pass --task-file PATH (JSONL or YAML)")
    return data_file(TASK_FILES[env])


def data_file(file_name: str) -> Path:
    """data/<file_name> of the repo, else ./data/<file_name>."""
    for folder in (DATA_DIR, Path.cwd() / "data"):
        if (folder / file_name).exists():
            return folder / file_name
    raise ValueError(f"task file data/{file_name} not found (looked in {DATA_DIR} and ./data); "
                     "run from the cua-kit checkout or pass --task-file PATH")


# ----------------------------------------------------------------------------- env list
def backend_status(name: str) -> tuple[str, str]:
    """(tool, why it is not usable here or "yes") for backend `name`, without starting anything."""
    from cua_kit.envs import env_class

    try:
        tool = env_class(name).tool
    except ImportError as exc:
        return "?", f"no: cannot import it ({exc})"
    missing = []
    if name == "miniwob":
        from cua_kit.envs.miniwob import CHROMIUM_PATH, INSTALL_LINE

        missing += [f"pip install {m}" for m in ("playwright", "miniwob") if importlib.util.find_spec(m) is None]
        chromium = os.environ.get("CUA_KIT_CHROMIUM") or CHROMIUM_PATH
        if not os.path.isfile(chromium):
            missing.append(f"no Chromium at {chromium} ({INSTALL_LINE})")
    if name == "gbox":
        if importlib.util.find_spec("gbox_sdk") is None:
            missing.append("pip install 'cua-kit[gbox]'")
        if not os.environ.get("GBOX_API_KEY"):
            missing.append("GBOX_API_KEY is not set")
    return tool, "no: " + "; ".join(missing) if missing else "yes"


def task_sets() -> list[dict[str, Any]]:
    """Every shipped task file with its task count per split."""
    from cua_kit.envs import load_tasks

    rows = []
    for env, file_name in [*TASK_FILES.items(), *MORE_TASK_FILES]:
        try:
            path = data_file(file_name)
            counts = Counter(task.split for task in load_tasks(path))
        except ValueError as exc:
            rows.append({"env": env, "file": f"data/{file_name}", "error": str(exc)})
            continue
        rows.append({"env": env, "file": f"data/{file_name}", "path": str(path), **dict(sorted(counts.items())),
                     "total": sum(counts.values())})
    return rows


def run_list(args: argparse.Namespace) -> int:
    from cua_kit.envs import ENV_BACKENDS

    backends = []
    print(f"{'backend':9s} {'tool':13s} usable here")
    for name in ENV_BACKENDS:
        tool, usable = backend_status(name)
        backends.append({"name": name, "tool": tool, "usable": usable == "yes", "status": usable})
        print(f"{name:9s} {tool:13s} {usable}")
    sets = task_sets()
    print(f"\n{'task file':26s} {'env':8s} {'train':>6s} {'eval':>6s}")
    for row in sets:
        if "error" in row:
            print(f"{row['file']:26s} {row['env']:8s} {row['error']}")
        else:
            print(f"{row['file']:26s} {row['env']:8s} {row.get('train', 0):>6d} {row.get('eval', 0):>6d}")
    if args.json:
        print_json_line({"backends": backends, "task_sets": sets})
    return 0


# ----------------------------------------------------------------------------- env demo
def pick_tasks(tasks: list[Task], spec: str | None, split: str | None) -> list[Task]:
    """Tasks whose id is `spec`, else those starting with it; all tasks when `spec` is None."""
    if split:
        tasks = [t for t in tasks if t.split == split]
        if not tasks:
            raise ValueError(f"the task file has no tasks in split {split!r}")
    if spec is None:
        return tasks
    exact = [t for t in tasks if t.id == spec]
    picked = exact or [t for t in tasks if t.id.startswith(spec)]
    if picked:
        return picked
    ids = [t.id for t in tasks]
    close = difflib.get_close_matches(spec, ids, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    examples = ", ".join(ids[:: max(1, len(ids) // 5)][:5])
    raise ValueError(f"no task with id or id prefix {spec!r}{' in split ' + split if split else ''}.{hint} "
                     f"Valid ids look like: {examples} ({len(ids)} tasks)")


@dataclass
class EpisodeResult:
    """One demo episode: what ran and what it scored."""

    task: str
    steps: int
    reward: float | None
    folder: str
    reset_s: float  # the reset alone (the first one includes starting a browser or a box)
    env_s: float  # time in env calls and the player, reset included (drawing and saving excluded)
    error: str | None = None  # the env error that ended the episode (then `reward` is None: not scored)


def safe_name(text: str) -> str:
    """A file-name-safe form of a task id (miniwob ids hold '/')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


async def play_episode(env: Env, task: Task, player: str, rng: random.Random, max_steps: int,
                       folder: Path) -> EpisodeResult:
    """Reset, act until the env says done or `max_steps`, evaluate; save step_NN.png and final.png. An env error
    ends the episode: it comes back with `error` set and no reward."""
    from cua_kit.actions import random_action
    from cua_kit.draw import draw_action
    from cua_kit.envs import EnvError

    folder.mkdir(parents=True, exist_ok=True)
    result = EpisodeResult(task.id, 0, None, str(folder), 0.0, 0.0)
    t0 = time.perf_counter()
    try:
        obs = await env.reset(task)
        result.reset_s = result.env_s = time.perf_counter() - t0
        while result.steps < max_steps:
            t0 = time.perf_counter()
            action = await env.oracle_action() if player == "oracle" else random_action(rng, obs.size)
            stepped = await env.step(action)
            result.env_s += time.perf_counter() - t0
            picture = draw_action(obs.screenshot, action, label=f"step {result.steps}")
            picture.save(folder / f"step_{result.steps:02d}.png")
            obs, result.steps = stepped.observation, result.steps + 1
            if stepped.done:
                break
        t0 = time.perf_counter()
        result.reward = float(await env.evaluate())
        result.env_s += time.perf_counter() - t0
    except EnvError as exc:
        if result.reset_s == 0 and isinstance(exc.__cause__, ValueError):  # reset_s is set once reset returned
            raise exc.__cause__ from None  # the env refused the task itself at reset: bad input, not an env error
        result.error = " ".join(str(exc).split())[:300]
        return result
    draw_action(obs.screenshot, None, label=f"end: reward {result.reward:g}").save(folder / "final.png")
    return result


async def run_demo_episodes(env_name: str, tasks: list[Task], player: str, episodes: int, out: Path,
                            seed: int, max_steps: int) -> list[EpisodeResult]:
    """`episodes` episodes cycling through `tasks`, on an env pool of one (timeouts, a fresh env after an env
    error, as in training); prints one line per episode. The first env is made at once: a missing key or
    browser fails here, before any episode."""
    from cua_kit.config import EnvConfig
    from cua_kit.envs import make_env
    from cua_kit.envs.pool import EnvPool

    rng = random.Random(seed)
    first = [make_env(env_name)]
    limits = EnvConfig()
    pool = EnvPool(lambda: first.pop() if first else make_env(env_name), 1, limits.step_timeout_s,
                   limits.reset_timeout_s)
    results = []
    try:
        for i in range(episodes):
            task = tasks[i % len(tasks)]
            async with pool.lease() as env:
                result = await play_episode(env, task, player, rng, max_steps, out / f"ep{i:03d}_{safe_name(task.id)}")
            results.append(result)
            outcome = f"reward {result.reward:.2f}" if result.error is None else f"env error: {result.error[:160]}"
            print(f"episode {i + 1}/{episodes}  {task.id:28s} steps {result.steps:3d}  {outcome}", flush=True)
    finally:
        await pool.close()
        for env in first:  # never leased (no episode ran)
            await env.close()
    return results


def summarize(env_name: str, task_spec: str, player: str, results: list[EpisodeResult], wall_s: float,
              out: Path) -> dict[str, Any]:
    """The machine-readable summary of a demo (the --json last line); success and reward are over the scored
    episodes (those without an env error)."""
    steps = sum(r.steps for r in results)
    scored = [r.reward for r in results if r.error is None and r.reward is not None]
    # The first reset starts the browser (miniwob) or is the cold start of caches: timed apart.
    env_s = sum(r.env_s for r in results) - results[0].reset_s
    return {"env": env_name, "task": task_spec, "player": player, "episodes": len(results),
            "env_errors": len(results) - len(scored), "scored": len(scored),
            "success_rate": sum(r > 0 for r in scored) / len(scored) if scored else 0.0,
            "mean_reward": sum(scored) / len(scored) if scored else 0.0, "steps": steps,
            "steps_per_s": steps / env_s if env_s > 0 else 0.0, "first_reset_s": results[0].reset_s,
            "wall_s": wall_s, "out": str(out), "per_episode": [asdict(r) for r in results]}


def run_demo(args: argparse.Namespace) -> int:
    from cua_kit.envs import env_class, load_tasks

    env_class(args.env)  # an unknown name fails here, with the closest valid one
    tasks = pick_tasks(load_tasks(task_file(args.env, args.task_file), env=args.env), args.task, args.split)
    out = Path(args.out or f"outputs/env_demo/{args.env}")
    start = time.perf_counter()
    results = asyncio.run(run_demo_episodes(args.env, tasks, args.player, args.episodes, out, args.seed,
                                            args.max_steps))
    summary = summarize(args.env, args.task or "*", args.player, results, time.perf_counter() - start, out)
    print(f"{args.env} {args.player}: {summary['episodes']} episodes, {summary['env_errors']} env errors, "
          f"success {summary['success_rate']:.0%} of {summary['scored']} scored, "
          f"mean reward {summary['mean_reward']:.2f}, {summary['steps']} steps, "
          f"{summary['steps_per_s']:.1f} steps/s (env + player, first reset "
          f"{summary['first_reset_s']:.2f} s apart), pictures in {out}/")
    if args.json:
        print_json_line(summary)
    return 1 if summary["env_errors"] else 0  # the exit code says whether an env failed


# ----------------------------------------------------------------------------- env sweep
def run_sweep(args: argparse.Namespace) -> int:
    if args.env != "gbox":
        raise ValueError(f"only 'gbox' has remote boxes to sweep, got {args.env!r}")
    from cua_kit.envs.gbox import sweep_boxes

    ids = asyncio.run(sweep_boxes(dry_run=args.dry_run))
    verb = "would terminate" if args.dry_run else "terminated"
    print("\n".join(f"{verb} {box_id}" for box_id in ids) if ids else "no leaked boxes")
    if args.json:
        print_json_line({"env": "gbox", "dry_run": args.dry_run, "boxes": ids})
    return 0


# ----------------------------------------------------------------------------- wiring
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_env_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="env_action", required=True, metavar="{list,demo,sweep}")
    lst = sub.add_parser("list", help="backends, whether they run here, and the shipped task sets")
    lst.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    demo = sub.add_parser("demo", help="run episodes with the oracle or a random player and save pictures",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_DEMO_EPILOG)
    demo.add_argument("env", help="backend name: synth, miniwob or gbox")
    demo.add_argument("--task", help="a task id, or an id prefix (e.g. synth-L1) to cycle through; "
                                     "default: every task of the file")
    demo.add_argument("--player", "--policy", dest="player", choices=["oracle", "random"], default="oracle",
                      help="the scripted player: the env's oracle or uniformly random actions (--policy: the old name)")
    demo.add_argument("--episodes", type=_positive, default=4)
    demo.add_argument("--out", help="folder for the pictures (default outputs/env_demo/ENV/)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random player")
    demo.add_argument("--max-steps", type=_positive, default=DEFAULT_MAX_STEPS,
                      help=f"cap on steps per episode (default {DEFAULT_MAX_STEPS}; envs may end sooner)")
    demo.add_argument("--split", choices=["train", "eval"], help="only tasks of this split")
    demo.add_argument("--task-file", help="task file (JSONL/YAML) instead of the env's one under data/")
    demo.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    sweep = sub.add_parser("sweep", help="terminate boxes cua-kit left running (gbox)")
    sweep.add_argument("env", help="only 'gbox' has remote resources")
    sweep.add_argument("--dry-run", action="store_true", help="list the boxes, terminate nothing")
    sweep.add_argument("--json", action="store_true", help="print a JSON object as the last line")


_DEMO_EPILOG = """examples:
  cua-kit env demo synth --task synth-L1 --player oracle --episodes 8
  cua-kit env demo synth --task synth-L3-0000 --player random --episodes 3 --seed 1 --json
  cua-kit env demo miniwob --task click-button/eval --episodes 4 --out /tmp/wob
  GBOX_API_KEY=... cua-kit env demo gbox --task toggle-wifi --episodes 1"""


@command("env", "list env backends, run a scripted player in one, sweep leaked cloud boxes",
         "examples:\n  cua-kit env list\n  cua-kit env demo synth --task synth-L1 --player oracle --episodes 8\n"
         "  cua-kit env demo miniwob --task click-test --player random --episodes 4 --json\n"
         "  cua-kit env sweep gbox --dry-run\n"
         "run `cua-kit env demo --help` for the demo's options")(_add_env_args)
def run_env(args: argparse.Namespace, extra: list[str]) -> int:
    """Dispatch `cua-kit env ACTION`; bad input and env failures become one clear line on stderr."""
    from cua_kit.envs import EnvError

    if extra:
        print(f"error: unknown arguments {' '.join(extra)}; see `cua-kit env {args.env_action} --help`",
              file=sys.stderr)
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the gbox SDK logs every HTTP request at INFO
    action = {"list": run_list, "demo": run_demo, "sweep": run_sweep}[args.env_action]
    try:
        return action(args)
    except (ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EnvError as exc:
        print(f"env error: {exc}", file=sys.stderr)
        return 1
