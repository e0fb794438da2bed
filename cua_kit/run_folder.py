"""A run folder (`outputs/<experiment>/<trial>/`) belongs to one run at a time: runs never mix.

    run_dir = make_run_dir(cfg)                       # created and writable, or one ConfigError line
    run_id = claim_run_folder(cfg, resume_from)       # the id the trace, the checkpoints and W&B carry

Every run has its own id (`<experiment>-<trial>-<date>-<time>-<4 hex>`), written into each checkpoint's
state.json and into every trace row. The rules:

- A fresh run (recover.mode=off, or auto with no checkpoint) over a folder an older run wrote to moves that
  run's outputs (RUN_OUTPUTS: trace, checkpoints, screenshots, evals, TensorBoard, exported adapters, config)
  into `archive/<its run id>/` first, so its checkpoints can't be pruned as "older" or resumed later, and its
  trace stays readable (the dashboard lists it). The folder's inputs stay: `sft/` (the warm start
  `cua-kit sft` wrote for this run), `train.log` and `launch.json` (the launcher's).
- A resume continues the run whose checkpoint it loads, under that run's id; the checkpoint must be one of this
  folder's (to start a new run from another run's weights, use its adapter as model.adapter_path), and the
  trace must belong to the same run. Checkpoints after the resumed one (a rollback) are archived, so the newest
  checkpoint is always the running run's.
- A folder a live trainer is writing (its trace says running, its process is alive on this host) is refused.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

from cua_kit.config import Config, ConfigError

ARCHIVE = "archive"
# What a training run writes into its folder; a fresh run moves an older run's into archive/<run id>/.
RUN_OUTPUTS = ("trace.db", "trace.db-wal", "trace.db-shm", "config.yaml", "checkpoints", "screens", "eval", "tb",
               "adapters")


def make_run_dir(cfg: Config) -> Path:
    """Create the run folder and check that it can be written, before any model is loaded or env started."""
    run_dir = cfg.run_dir
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output_dir={cfg.output_dir}: can't write the run folder {run_dir} "
                          f"({exc.strerror or exc}); pick a writable output_dir") from None
    return run_dir


def new_run_id(cfg: Config) -> str:
    return f"{cfg.experiment_name}-{cfg.trial_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def checkpoint_run_id(checkpoint: Path, cfg: Config) -> str:
    """The run a checkpoint belongs to; checkpoints written before runs had ids carry the folder's old id."""
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    return state.get("run_id") or f"{cfg.experiment_name}-{cfg.trial_name}"


def traced_run(run_dir: Path) -> dict | None:
    """The runs row of the folder's trace.db (None if there is no trace, or it holds no run yet)."""
    from cua_kit.trace import queries

    if not (run_dir / queries.TRACE_FILE).is_file():
        return None
    db = queries.open_db(run_dir)
    try:
        return queries.run_info(db)
    finally:
        db.close()


def live_trainer(run_dir: Path) -> int | None:
    """The pid of another live trainer writing this folder (its trace says running, on this host), else None."""
    from cua_kit.launch import pid_alive

    run = traced_run(run_dir)
    if not run or run.get("status") != "running" or run.get("host") != socket.gethostname():
        return None
    pid = run.get("pid")
    return pid if pid and pid != os.getpid() and pid_alive(pid) else None


def claim_run_folder(cfg: Config, resume_from: Path | None) -> str:
    """Make cfg.run_dir hold only the run that starts now (the rules above); returns its run id."""
    run_dir = cfg.run_dir
    pid = live_trainer(run_dir)
    if pid is not None:
        raise ConfigError(f"{run_dir} is being written by a live trainer (pid {pid}): stop it "
                          f"(`cua-kit runs stop {cfg.experiment_name}/{cfg.trial_name}`) or pick another trial_name=")
    if resume_from is None:
        archived = archive([run_dir / item for item in RUN_OUTPUTS], run_dir / ARCHIVE, _previous_id(run_dir, cfg))
        if archived is not None:
            print(f"A fresh run: the previous run in {run_dir} was moved to {archived}", flush=True)
        return new_run_id(cfg)
    checkpoints = (run_dir / "checkpoints").resolve()
    if Path(resume_from).resolve().parent != checkpoints:
        raise ConfigError(f"recover.ckpt_path={resume_from} is not a checkpoint of this run folder ({checkpoints}): "
                          "a run only resumes itself. To start a new run from its weights, set "
                          f"model.adapter_path={Path(resume_from) / 'adapter'} and recover.mode=off")
    run_id = checkpoint_run_id(resume_from, cfg)
    traced = traced_run(run_dir)
    if traced and traced["run_id"] != run_id:
        raise ConfigError(f"{resume_from} belongs to run {run_id} but {run_dir}/trace.db holds run {traced['run_id']}: "
                          "resuming would mix them. Start fresh with recover.mode=off (the old run is archived)")
    _archive_later_checkpoints(run_dir, resume_from, run_id)
    return run_id


def _previous_id(run_dir: Path, cfg: Config) -> str:
    """A name for what an older run left: its trace's run id, else its newest checkpoint's, else a time stamp."""
    from cua_kit.checkpoint import latest_checkpoint

    traced = traced_run(run_dir)
    if traced:
        return traced["run_id"]
    latest = latest_checkpoint(run_dir / "checkpoints")
    return checkpoint_run_id(latest, cfg) if latest else f"run-before-{time.strftime('%Y%m%d-%H%M%S')}"


def archive(items: list[Path], archive_dir: Path, name: str) -> Path | None:
    """Move the `items` that exist (empty folders stay) into a new folder archive_dir/<name> (renames on one file
    system: nothing is copied); None if there was nothing to move."""
    present = [item for item in items if item.is_file() or (item.is_dir() and any(item.iterdir()))]
    if not present:
        return None
    dest, n = archive_dir / name, 1
    while dest.exists():
        n += 1
        dest = archive_dir / f"{name}.{n}"
    try:
        dest.mkdir(parents=True)
        for item in present:
            os.replace(item, dest / item.name)
    except OSError as exc:
        raise ConfigError(f"can't move the previous run's outputs to {dest} ({exc.strerror}): move or delete "
                          f"{', '.join(p.name for p in present)} yourself, or pick another trial_name=") from None
    return dest


def _archive_later_checkpoints(run_dir: Path, resume_from: Path, run_id: str) -> None:
    """A resume from an older checkpoint than the newest: the later ones (a future this run now rewrites) leave
    checkpoints/, so pruning and recover.mode=auto only ever see the running run's newest checkpoint."""
    from cua_kit.checkpoint import checkpoint_step, list_checkpoints

    step = checkpoint_step(resume_from)
    later = [p for p in list_checkpoints(run_dir / "checkpoints") if checkpoint_step(p) > step]
    if later:
        dest = archive(later, run_dir / ARCHIVE / f"{run_id}-after-step-{step}", "checkpoints")
        print(f"Resuming from step {step}: the {len(later)} later checkpoints were moved to {dest}", flush=True)
