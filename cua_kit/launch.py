"""Start, list and stop training runs as background processes (the dashboard's Launch tab and `cua-kit runs`).

A run is started from a config under an allowed folder (`configs/`, or an earlier run's saved config.yaml)
plus dotted overrides and a GPU count. The config and overrides are validated with `load_config` *before*
anything is spawned, so a typo is refused with the config system's message. The command is an argv list
(never a shell):

    CPU or 1 GPU: python -m cua_kit.cli train CONFIG [overrides...]

N > 1 GPUs is refused: the trainer has no distributed code yet (issue 14), and torchrun would start N identical
runs writing into one run folder.

The child runs in its own session (its own process group), so stopping it reaches torchrun's workers too.
Its stdout/stderr go to the run's train.log and `launch.json` in the run folder records argv, pid, pgid
and the start time. Stopping sends SIGTERM to the group (the trainer checkpoints and marks itself
'stopped'), then SIGKILL after a grace period; if the trainer could not record 'stopped', we do.
"""

from __future__ import annotations

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

from cua_kit.config import ConfigError, load_config, parse_overrides
from cua_kit.trace import TraceWriter, queries

REPO_ROOT = Path(__file__).resolve().parent.parent
LAUNCH_FILE = "launch.json"
LOG_FILE = "train.log"
STOP_GRACE_S = 60.0
# Children started by this process: we must reap them (a zombie still counts as alive for kill(pid, 0)).
_CHILDREN: dict[int, subprocess.Popen] = {}


MULTI_GPU_REFUSED = ("launch.n_gpus={n}: the multi-GPU (FSDP) trainer is not in the kit yet (issue 14), and {n} copies of "
                     "the one-GPU trainer would all write one run folder; run on one GPU (launch.n_gpus=1) or the CPU "
                     "(launch.n_gpus=0) instead")


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


def build_argv(config: Path, overrides: list[str], n_gpus: int) -> list[str]:
    """The trainer command as an argv list: plain python for CPU / 1 GPU; N > 1 is refused (see the docstring)."""
    if n_gpus < 0:
        raise LaunchError(f"n_gpus must be >= 0 (0 = CPU), got {n_gpus}")
    if n_gpus > 1:
        raise LaunchError(MULTI_GPU_REFUSED.format(n=n_gpus))
    return [sys.executable, "-m", "cua_kit.cli", "train", str(config), *overrides]


def launch_overrides(overrides: list[str], n_gpus: int, runs_dir: str | Path) -> list[str]:
    """The user's overrides plus ours: the GPU count, CPU placement, and output_dir = the runs folder.

    output_dir goes last so a run always lands under runs_dir, where the dashboard looks for it.
    """
    keys = parse_overrides(overrides)  # raises ConfigError on unreadable tokens
    extra = [f"launch.n_gpus={n_gpus}"]
    if n_gpus == 0 and "model.device" not in keys:
        extra.append("model.device=cpu")
    return [*overrides, *extra, f"output_dir={Path(runs_dir).resolve()}"]


def launch_run(config: str | Path, overrides: list[str], n_gpus: int, runs_dir: str | Path,
               allowed_dirs: list[Path] | None = None, env: dict[str, str] | None = None) -> LaunchedRun:
    """Validate, then start the trainer in its own process group. Raises LaunchError / ConfigError."""
    path = check_config_path(config, allowed_dirs or allowed_config_dirs(runs_dir))
    full_overrides = launch_overrides(list(overrides), n_gpus, runs_dir)
    cfg = load_config(path, full_overrides)  # ConfigError: refuse before spawning anything
    run_dir = cfg.run_dir.resolve()
    running = read_launch(run_dir)
    if running and pid_alive(running["pid"]):
        raise LaunchError(f"{run_dir} already has a live run (pid {running['pid']}); stop it or set trial_name=...")
    argv = build_argv(path, full_overrides, n_gpus)  # LaunchError before the run folder exists
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=REPO_ROOT, env=env)
    _CHILDREN[proc.pid] = proc
    launched = LaunchedRun(str(run_dir), argv, proc.pid, os.getpgid(proc.pid), time.time(), socket.gethostname())
    (run_dir / LAUNCH_FILE).write_text(json.dumps(asdict(launched), indent=2))
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


def _group_alive(pgid: int) -> bool:
    if pgid in _CHILDREN and _CHILDREN[pgid].poll() is None:
        return True
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid_alive(pgid) or _has_live_member(pgid)


def _has_live_member(pgid: int) -> bool:
    """Any non-zombie process in group `pgid` (torchrun workers may outlive the group leader)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _wait_group(pgid: int, timeout_s: float) -> bool:
    """Wait until group `pgid` has no live process; True if it went away in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return True
        time.sleep(0.1)
    return not _group_alive(pgid)


def stop_run(run_dir: str | Path, grace_s: float = STOP_GRACE_S) -> str:
    """SIGTERM the run's process group, SIGKILL it after `grace_s`; record status 'stopped'. Returns how it ended."""
    run_dir = Path(run_dir)
    launched = read_launch(run_dir)
    if launched is None:
        raise LaunchError(f"{run_dir} has no {LAUNCH_FILE}: it was not started by the launcher; stop it by its pid")
    if launched.get("host") not in (None, socket.gethostname()):
        raise LaunchError(f"{run_dir} runs on host {launched['host']}; stop it there")
    pgid = int(launched["pgid"])
    how = "already exited"
    if _group_alive(pgid):
        _signal_group(pgid, signal.SIGTERM)
        how = "stopped (SIGTERM)"
        if not _wait_group(pgid, grace_s):
            _signal_group(pgid, signal.SIGKILL)
            _wait_group(pgid, 10.0)
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
                             "effective_status": effective_status(info)})
    known = {r["run_dir"] for r in found}
    for launch_path in runs_dir.rglob(LAUNCH_FILE):
        run_dir = launch_path.parent
        if str(run_dir) in known:
            continue
        launched = json.loads(launch_path.read_text())
        status = "starting" if pid_alive(launched["pid"]) else ("stopped" if "stopped_at" in launched else "failed")
        found.append({"run_dir": str(run_dir), "name": str(run_dir.relative_to(runs_dir)), "status": status,
                      "effective_status": status, "started_at": launched["started_at"], "n_steps": 0,
                      "pid": launched["pid"], "db_path": None})
    return sorted(found, key=lambda r: r.get("started_at") or 0.0, reverse=True)


def find_run(runs_dir: str | Path, name: str) -> Path:
    """A run folder from its name relative to runs_dir (e.g. quickstart/trial0) or a path; must be inside runs_dir."""
    root = Path(runs_dir).resolve()
    candidate = Path(name) if Path(name).is_absolute() else root / name
    run_dir = candidate.resolve()
    if not run_dir.is_relative_to(root) or not run_dir.is_dir():
        names = ", ".join(r["name"] for r in list_runs(runs_dir)) or "none"
        raise LaunchError(f"no run {name!r} under {root} (runs: {names})")
    return run_dir


__all__ = ["ConfigError", "LaunchError", "LaunchedRun", "allowed_config_dirs", "build_argv", "check_config_path",
           "effective_status", "find_run", "launch_run", "list_configs", "list_runs", "pid_alive", "read_launch",
           "stop_run"]
