"""Start, list and stop training runs: in the foreground (`cua-kit train`) or as background processes (the
dashboard's Launch tab and `cua-kit runs`).

A run is started from a config (under an allowed folder for the dashboard: `configs/`, or an earlier run's saved
config.yaml) plus dotted overrides; its layout is `launch.allocation` (`cua_kit.allocation`). Everything is
checked *before* anything is spawned (`plan_launch`): the config and overrides with `load_config` (a typo, a
nonsense value or a run name that is a path is refused with the config system's message), the run folder lands
under the runs folder (output_dir is forced to it), is writable and has no live run, and the layout fits this
node's visible GPUs. The command is an argv list (never a shell):

    one process:            python -m cua_kit.cli train CONFIG [overrides...]
    fsdp:dZ (Z > 1):        python -m torch.distributed.run --standalone --nproc-per-node Z -m cua_kit.cli train ...
    launch.nnodes = N > 1:  ... torch.distributed.run --nnodes N --node-rank R --rdzv-backend static
                            --rdzv-endpoint HOST:PORT --nproc-per-node Z -m cua_kit.cli train ...

with CUDA_VISIBLE_DEVICES set to the trainer ranks' GPUs; a vLLM part becomes `rollout.backend=vllm` with
`vllm.gpus` (its own GPUs) and `vllm.tensor_parallel_size`, and rank 0 starts that server (it watches rank 0 and
stops with it).

A background run is started in its own session (its own process group), so stopping it reaches torchrun, its
workers and the vLLM server. Its stdout/stderr go to the run's train.log and `launch.json` in the run folder
records argv, pid, pgid and the start time. Stopping sends SIGTERM to the group (the trainer checkpoints and
marks itself 'stopped'; torchrun waits STOP_GRACE_S for its workers), then SIGKILL after a grace period; if the
trainer could not record 'stopped', we do. The dashboard and `cua-kit runs` stop runs on this host only: the
other nodes of a multi-node run are stopped by SIGTERM on their own `cua-kit train` (docs/training.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cua_kit import allocation
from cua_kit.config import Config, ConfigError, load_config, parse_overrides
from cua_kit.trace import TraceWriter, queries

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCH_FILE = "launch.json"
LOG_FILE = "train.log"
STOP_GRACE_S = 60.0
# Children started by this process: we must reap them (a zombie still counts as alive for kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen] = {}


class LaunchError(ValueError):
    """A launch or stop request that can't be done; the message says what to do instead."""


@dataclass
class LaunchedRun:
    run_dir: str
    argv: list[str]
    pid: int
    pgid: int
    started_at: float
    host: str


def allowed_config_dirs(runs_dir: str | Path) -> list[Path]:
    """Where Launch may read configs from: the repo's configs/ and the runs folder (saved config.yaml)."""
    return [(REPO_ROOT / "configs").resolve(), Path(runs_dir).resolve()]


def list_configs(runs_dir: str | Path) -> list[str]:
    """Launchable configs: configs/*.yaml (the embedded default, quickstart, first), then every saved run
    config.yaml under runs_dir."""
    shipped = sorted((REPO_ROOT / "configs").glob("*.y*ml"), key=lambda p: (p.stem != "quickstart", p.name))
    saved = sorted(Path(runs_dir).glob("**/config.yaml")) if Path(runs_dir).is_dir() else []
    return [str(p) for p in shipped + saved]


def check_config_path(config: str | Path, allowed_dirs: list[Path]) -> Path:
    """The resolved config path, or LaunchError if it is missing or outside every allowed folder."""
    path = Path(config).resolve()  # resolve() follows symlinks and '..', so neither can escape
    if not any(path.is_relative_to(folder) for folder in allowed_dirs):
        allowed = ", ".join(str(d) for d in allowed_dirs)
        raise LaunchError(f"config {config} is outside the allowed folders ({allowed}); copy it into configs/")
    if not path.is_file():
        raise LaunchError(f"config file not found: {path}")
    return path


LAUNCHED_ENV = "CUA_KIT_LAUNCHED"  # set in the environment of what `run_command` starts: it runs its layout as is


def needs_torchrun(cfg: Config) -> bool:
    """More than one trainer process: several ranks on this node, or several nodes."""
    return allocation.parse(cfg.launch.allocation).trainers > 1 or cfg.launch.nnodes > 1


def needs_launcher(cfg: Config) -> bool:
    """A layout (launch.allocation or several nodes) that `run_command` must place, unless this process is what it
    started already, or a worker of a torchrun the user started (LOCAL_RANK set): it runs as torchrun placed it."""
    placed = os.environ.get(LAUNCHED_ENV) or "LOCAL_RANK" in os.environ
    return (bool(cfg.launch.allocation.strip()) or cfg.launch.nnodes > 1) and not placed


def run_command(config: Path | str | None, overrides: list[str], cfg: Config,
                environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run `cfg` (loaded from `config` + `overrides`) in its layout on this node; see the
    module docstring. LaunchError when the layout does not fit this node's visible GPUs."""
    env = {**(os.environ if environ is None else environ), LAUNCHED_ENV: "1"}
    alloc = allocation.parse(cfg.launch.allocation)
    gpus = allocation.visible_gpus(env)
    on_gpu = cfg.model.device != "cpu" and (bool(gpus) or cfg.model.device.startswith("cuda"))
    extra: list[str] = []
    try:
        trainer_gpus, vllm_gpus = allocation.place(alloc, gpus, cfg.launch.node_rank) if on_gpu else ([], [])
    except allocation.AllocationError as exc:
        raise LaunchError(str(exc)) from None
    if on_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(trainer_gpus)
    if alloc.vllm_servers:
        extra += _vllm_overrides(alloc, vllm_gpus, cfg.launch.allocation)
    train = ["-m", "cua_kit.cli", "train", *([str(config)] if config else []), *overrides, *extra]
    if not needs_torchrun(cfg):
        return [sys.executable, *train], env
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(int(STOP_GRACE_S))  # torchrun's wait for a checkpointing worker
    lc = cfg.launch
    nodes = (["--nnodes", str(lc.nnodes), "--node-rank", str(lc.node_rank), "--rdzv-backend", "static",
              "--rdzv-endpoint", lc.rdzv_endpoint] if lc.nnodes > 1 else ["--standalone"])
    return [sys.executable, "-m", "torch.distributed.run", *nodes, "--nproc-per-node", str(alloc.trainers),
            *train], env


def _vllm_overrides(alloc: allocation.Allocation, gpus: list[str], text: str) -> list[str]:
    """The vLLM part of a layout as the vLLM backend's settings (issue 13's `vllm` config section)."""
    from cua_kit.config import _all_keys

    if "vllm.gpus" not in _all_keys():
        raise LaunchError(f"launch.allocation={text}: this kit has no vLLM backend yet (issue 13); "
                          "use fsdp:dZ (rank 0 generates with the HF backend)")
    gpu_setting = [f"vllm.gpus={','.join(gpus)}"] if gpus else []
    return ["rollout.backend=vllm", f"vllm.tensor_parallel_size={alloc.vllm_tp}", *gpu_setting]


def run_foreground(argv: list[str], env: dict[str, str]) -> int:
    """`cua-kit train` with a layout: its command in the foreground, until it exits (its exit code). A Ctrl-C
    reaches it through the terminal (torchrun passes it to its workers, which run in sessions of their own), so
    we ignore ours; a SIGTERM sent to us alone (a scheduler's) is passed on."""
    proc = subprocess.Popen(argv, env=env)

    def pass_on(sig: int, frame: Any) -> None:
        proc.send_signal(sig)

    previous = signal.signal(signal.SIGTERM, pass_on), signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def launch_overrides(overrides: list[str], runs_dir: str | Path) -> list[str]:
    """The user's overrides plus output_dir = the runs folder (last, so a run always lands under runs_dir,
    where the dashboard looks for it)."""
    parse_overrides(overrides)  # raises ConfigError on unreadable tokens
    return [*overrides, f"output_dir={Path(runs_dir).resolve()}"]


@dataclass
class LaunchPlan:
    """A launch request that passed every check: what would be run, in which environment, and where it writes."""

    run_dir: Path
    argv: list[str]
    env: dict[str, str]


def plan_launch(config: str | Path, overrides: list[str], runs_dir: str | Path,
                allowed_dirs: list[Path] | None = None, environ: dict[str, str] | None = None) -> LaunchPlan:
    """Every check of a launch, spawning and writing nothing. Raises LaunchError / ConfigError."""
    from cua_kit.run_folder import live_trainer

    path = check_config_path(config, allowed_dirs or allowed_config_dirs(runs_dir))
    full_overrides = launch_overrides(list(overrides), runs_dir)
    cfg = load_config(path, full_overrides)  # ConfigError: refuse before spawning anything
    root, run_dir = Path(runs_dir).resolve(), cfg.run_dir.resolve()
    if not run_dir.is_relative_to(root) or run_dir == root:  # names are checked by the config; this is the guard
        raise LaunchError(f"the run folder {run_dir} is not inside the runs folder {root}")
    running = read_launch(run_dir)
    if running and pid_alive(running["pid"]):
        raise LaunchError(f"{run_dir} already has a live run (pid {running['pid']}); stop it or set trial_name=...")
    pid = live_trainer(run_dir)
    if pid is not None:
        raise LaunchError(f"{run_dir} is being written by a live trainer (pid {pid}); stop it or set trial_name=...")
    argv, env = run_command(path, full_overrides, cfg, environ)  # LaunchError: the layout does not fit this node
    return LaunchPlan(run_dir, argv, env)


def launch_run(config: str | Path, overrides: list[str], runs_dir: str | Path,
               allowed_dirs: list[Path] | None = None, env: dict[str, str] | None = None) -> LaunchedRun:
    """`plan_launch`, then start the run's layout in its own process group. Raises LaunchError / ConfigError."""
    plan = plan_launch(config, overrides, runs_dir, allowed_dirs, env)
    run_dir = plan.run_dir
    try:  # the folder and its log are made before the trainer starts: a failure here leaves no process behind
        run_dir.mkdir(parents=True, exist_ok=True)
        log = open(run_dir / LOG_FILE, "ab")
    except OSError as exc:
        raise LaunchError(f"can't write the run folder {run_dir}: {exc.strerror or exc}") from None
    with log:
        proc = subprocess.Popen(plan.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=REPO_ROOT, env=plan.env)
    _CHILDREN[proc.pid] = proc
    launched = LaunchedRun(str(run_dir), plan.argv, proc.pid, os.getpgid(proc.pid), time.time(), socket.gethostname())
    try:
        (run_dir / LAUNCH_FILE).write_text(json.dumps(asdict(launched), indent=2))
    except OSError as exc:  # a run the UI could neither list nor stop must not keep running
        _signal_group(launched.pgid, signal.SIGKILL)
        proc.wait()
        raise LaunchError(f"can't record the run in {run_dir / LAUNCH_FILE} ({exc.strerror}); it was stopped") from None
    return launched


def read_launch(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / LAUNCH_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def pid_alive(pid: int | None) -> bool:
    """True if `pid` is a live (not zombie) process on this host."""
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    try:  # a zombie (exited, not reaped by its parent) answers kill(0) but is not running
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _proc_table() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live, not zombie, process on this host."""
    rows = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            rows.append((int(stat.parent.name), int(fields[1]), int(fields[2])))
    return rows


def _run_processes(pgid: int, known: set[int]) -> set[int]:
    """The run's live processes: its process group, and every descendant of a process already known to be the
    run's (torchrun starts each worker in a session of its own, and a worker outlives a killed torchrun)."""
    table = _proc_table()
    found = {pid for pid, _, group in table if group == pgid} | {p for p in known if pid_alive(p)}
    children: dict[int, list[int]] = {}
    for pid, parent, _ in table:
        children.setdefault(parent, []).append(pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _wait_gone(pgid: int, known: set[int], timeout_s: float) -> set[int]:
    """Wait until the run has no live process (tracking new descendants meanwhile); the ones left at the end."""
    deadline = time.monotonic() + timeout_s
    while True:
        known |= _run_processes(pgid, known)
        alive = {p for p in known if pid_alive(p)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def stop_run(run_dir: str | Path, grace_s: float = STOP_GRACE_S) -> str:
    """SIGTERM the run's process group (torchrun passes it to its workers), SIGKILL every process of the run still
    there after `grace_s`; record status 'stopped'. Returns how it ended."""
    run_dir = Path(run_dir)
    launched = read_launch(run_dir)
    if launched is None:
        raise LaunchError(f"{run_dir} has no {LAUNCH_FILE}: it was not started by the launcher; stop it by its pid")
    if launched.get("host") not in (None, socket.gethostname()):
        raise LaunchError(f"{run_dir} runs on host {launched['host']}; stop it there")
    pgid = int(launched["pgid"])
    known = _run_processes(pgid, {int(launched["pid"])})
    how = "already exited"
    if any(pid_alive(p) for p in known):
        _signal_group(pgid, signal.SIGTERM)
        how = "stopped (SIGTERM)"
        left = _wait_gone(pgid, known, grace_s)
        if left:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _wait_gone(pgid, known, 10.0)
            how = f"killed (SIGKILL after {grace_s:g} s)"
    child = _CHILDREN.pop(launched["pid"], None)
    if child is not None:
        child.wait(timeout=10)
    _record_stopped(run_dir, launched)
    return how


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _record_stopped(run_dir: Path, launched: dict[str, Any]) -> None:
    """Mark the run 'stopped' in launch.json, and in trace.db if the trainer left it 'running'."""
    launched["stopped_at"] = time.time()
    (run_dir / LAUNCH_FILE).write_text(json.dumps(launched, indent=2))
    if not (run_dir / queries.TRACE_FILE).is_file():
        return
    db = queries.open_db(run_dir)
    try:
        info = queries.run_info(db)
    finally:
        db.close()
    if info is not None and info["status"] == "running":
        with TraceWriter(run_dir / queries.TRACE_FILE, info["run_id"]) as writer:
            writer.finish_run("stopped")


def effective_status(info: dict[str, Any]) -> str:
    """The runs row's status, except a 'running' run whose process is gone on this host is 'failed'."""
    status = info.get("status") or "running"
    if status == "running" and info.get("host") in (None, socket.gethostname()) and not pid_alive(info.get("pid")):
        return "failed"
    return status


def list_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every run under runs_dir with `run_dir`, `name` (relative path) and `effective_status`, newest first.

    Runs the launcher started that have not written trace.db yet appear as 'starting' (or 'failed' /
    'stopped' if their process is already gone).
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = []
    for info in queries.list_runs(runs_dir):
        run_dir = Path(info["db_path"]).parent
        found.append(info | {"run_dir": str(run_dir), "name": str(run_dir.relative_to(runs_dir)),
                             "effective_status": effective_status(info), "eval_of": _eval_owner(run_dir, runs_dir)})
    known = {r["run_dir"] for r in found}
    for launch_path in runs_dir.rglob(LAUNCH_FILE):
        run_dir = launch_path.parent
        if str(run_dir) in known:
            continue
        launched = json.loads(launch_path.read_text())
        status = "starting" if pid_alive(launched["pid"]) else ("stopped" if "stopped_at" in launched else "failed")
        found.append({"run_dir": str(run_dir), "name": str(run_dir.relative_to(runs_dir)), "status": status,
                      "effective_status": status, "started_at": launched["started_at"], "n_steps": 0,
                      "pid": launched["pid"], "db_path": None, "eval_of": None})
    return sorted(found, key=lambda r: r.get("started_at") or 0.0, reverse=True)


def _eval_owner(run_dir: Path, runs_dir: Path) -> str | None:
    """The name of the training run whose held-out eval this trace is (`<run>/eval/<label>/`, as
    cua_kit.evaluate writes it), else None."""
    owner = run_dir.parent.parent
    if run_dir.parent.name == "eval" and owner != runs_dir and (owner / "config.yaml").is_file():
        return str(owner.relative_to(runs_dir))
    return None


def training_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that are not held-out evals of another run (what a user means by 'the run')."""
    return [r for r in runs if not r.get("eval_of")]


def find_run(runs_dir: str | Path, name: str) -> Path:
    """A run folder from its name relative to runs_dir (e.g. quickstart/trial0) or a path; must be inside runs_dir."""
    root = Path(runs_dir).resolve()
    candidate = Path(name) if Path(name).is_absolute() else root / name
    run_dir = candidate.resolve()
    if not run_dir.is_relative_to(root) or not run_dir.is_dir():
        names = ", ".join(r["name"] for r in list_runs(runs_dir)) or "none"
        raise LaunchError(f"no run {name!r} under {root} (runs: {names})")
    return run_dir


__all__ = ["ConfigError", "LaunchError", "LaunchPlan", "LaunchedRun", "allowed_config_dirs", "check_config_path",
           "effective_status", "find_run", "launch_run", "list_configs", "list_runs", "needs_launcher", "needs_torchrun",
           "pid_alive", "plan_launch", "read_launch", "run_command", "run_foreground", "stop_run", "training_runs"]
