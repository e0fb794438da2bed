"""Runs never mix (issue 18 §3): a run id in every checkpoint and trace row, a fresh run over an old run's folder
archives it first (as `make demo` does on every re-run), a resume only continues its own run, pruning never deletes
the running run's newest checkpoint, and a folder a live trainer writes is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cua_kit.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from cua_kit.config import ConfigError, load_config
from cua_kit.run_folder import ARCHIVE, claim_run_folder
from cua_kit.trace import TraceWriter, queries

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.adapter_path=", "trainer.eval_episodes=0", "rollout.max_staleness=0", "rollout.n_samples=2",
        "trainer.batch_size=1", "rollout.max_turns=1", "rollout.max_new_tokens=12", "rollout.max_concurrent_rollouts=2",
        "saver.freq_steps=1", "logging.tensorboard=false", "logging.progress=false"]


def _cfg(out: Path, *extra: str):
    return load_config(ROOT / "configs/quickstart.yaml", [f"output_dir={out}", *TINY, *extra], environ={})


class _Trainer:
    """Stands in for the trainer: save_checkpoint only calls its save(folder)."""

    def save(self, folder: Path) -> None:
        (Path(folder) / "adapter").mkdir(parents=True)
        (Path(folder) / "adapter" / "adapter_config.json").write_text("{}")


def _checkpoint(run_dir: Path, step: int, run_id: str | None, keep_last: int = 10) -> Path:
    state = {"version": step, "controller": {}} | ({"run_id": run_id} if run_id else {})
    return save_checkpoint(run_dir / "checkpoints", step, _Trainer(), state, keep_last)


def _old_run(run_dir: Path, run_id: str, steps: int) -> None:
    """What an earlier run leaves: a finished trace, checkpoints, screenshots, an eval."""
    with TraceWriter(run_dir / "trace.db", run_id) as trace:
        trace.start_run("quickstart", "trial0", {})
        for step in range(1, steps + 1):
            trace.add_step({"step": step})
        trace.finish_run("finished")
    for step in range(1, steps + 1):
        _checkpoint(run_dir, step, run_id)
    (run_dir / "screens" / f"{run_id}-g000000-s0").mkdir(parents=True)
    (run_dir / "eval" / "before").mkdir(parents=True)


def test_a_fresh_run_archives_the_old_one_and_keeps_the_inputs(tmp_path):
    cfg = _cfg(tmp_path, "recover.mode=off")
    run_dir = cfg.run_dir
    _old_run(run_dir, "old-run", steps=3)
    for keep in ("sft/adapter/adapter_config.json", "train.log", "launch.json"):
        (run_dir / keep).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / keep).write_text("{}")
    run_id = claim_run_folder(cfg, None)
    assert run_id.startswith("quickstart-trial0-")
    archived = run_dir / ARCHIVE / "old-run"
    moved = {p.name for p in archived.iterdir()} - {"trace.db-wal", "trace.db-shm"}  # SQLite's, when present
    assert moved == {"checkpoints", "eval", "screens", "trace.db"}
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "trace.db").exists()
    assert all((run_dir / keep).exists() for keep in ("sft/adapter/adapter_config.json", "train.log", "launch.json"))
    [listed] = queries.list_runs(run_dir / ARCHIVE)  # the old run stays readable (the dashboard lists it)
    assert listed["run_id"] == "old-run" and listed["n_steps"] == 3


def test_pruning_never_deletes_the_running_runs_newest_checkpoint(tmp_path):
    """The issue's mix: an old run's checkpoints 60-80 beside a new run at step 10. Ranked by step alone, the new
    run's checkpoint-10 was the 'oldest' and was deleted as soon as it was written."""
    run_dir = tmp_path / "run"
    for step in (60, 70, 80):
        _checkpoint(run_dir, step, "old")
    newest = _checkpoint(run_dir, 10, "new", keep_last=3)
    assert newest.exists()
    for step in (20, 30, 40):
        _checkpoint(run_dir, step, "new", keep_last=2)
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert names == ["checkpoint-30", "checkpoint-40", "checkpoint-60", "checkpoint-70", "checkpoint-80"]


def test_a_resume_only_continues_its_own_run(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = cfg.run_dir
    _old_run(run_dir, "run-a", steps=4)
    ckpt2 = run_dir / "checkpoints" / "checkpoint-2"
    assert claim_run_folder(cfg, ckpt2) == "run-a"  # a rollback to step 2: the later checkpoints leave
    assert latest_checkpoint(run_dir / "checkpoints") == ckpt2
    assert sorted(p.name for p in (run_dir / ARCHIVE / "run-a-after-step-2" / "checkpoints").iterdir()) == [
        "checkpoint-3", "checkpoint-4"]
    other = tmp_path / "elsewhere" / "checkpoint-1"
    other.mkdir(parents=True)
    (other / "state.json").write_text(json.dumps({"step": 1, "run_id": "run-a"}))
    with pytest.raises(ConfigError, match="a run only resumes itself.*model.adapter_path="):
        claim_run_folder(cfg, other)
    (ckpt2 / "state.json").write_text(json.dumps({"step": 2, "run_id": "run-b"}))
    with pytest.raises(ConfigError, match="belongs to run run-b but .* holds run run-a"):
        claim_run_folder(cfg, ckpt2)


def test_checkpoints_written_before_run_ids_resume_as_the_folders_old_run(tmp_path):
    cfg = _cfg(tmp_path)
    _old_run(cfg.run_dir, "quickstart-trial0", steps=1)  # the id every run of this folder had before
    legacy = cfg.run_dir / "checkpoints" / "checkpoint-1"
    (legacy / "state.json").write_text(json.dumps({"step": 1, "version": 1, "controller": {}}))
    assert claim_run_folder(cfg, legacy) == "quickstart-trial0"


def test_a_folder_a_live_trainer_writes_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "recover.mode=off")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with TraceWriter(cfg.run_dir / "trace.db", "live-run") as trace:
            trace.start_run("quickstart", "trial0", {}, pid=other.pid)
        with pytest.raises(ConfigError, match=f"live trainer \\(pid {other.pid}\\).*runs stop quickstart/trial0"):
            claim_run_folder(cfg, None)
    finally:
        other.kill()
        other.wait()
    assert claim_run_folder(cfg, None)  # once it is gone, a fresh run archives it
    assert (cfg.run_dir / ARCHIVE / "live-run" / "trace.db").exists()


def test_a_fresh_run_over_an_old_folder_then_auto_resume_never_mixes(tmp_path):
    """`make demo` runs recover.mode=off over the same folder every time. Run A trains 3 steps; run B starts fresh
    over it (1 step), then B is resumed with recover.mode=auto: it must continue B, not A's newer checkpoint."""
    from cua_kit.train import train

    a = train(_cfg(tmp_path, "trainer.max_steps=3", "saver.keep_last=2"))
    b = train(_cfg(tmp_path, "trainer.max_steps=1", "saver.keep_last=2", "recover.mode=off"))
    run_dir = Path(b["run_dir"])
    [ckpt] = list_checkpoints(run_dir / "checkpoints")  # before: pruned as "older" than A's 2 and 3
    b_id = json.loads((ckpt / "state.json").read_text())["run_id"]
    c = train(_cfg(tmp_path, "trainer.max_steps=2", "saver.keep_last=2", "recover.mode=auto"))
    assert (a["status"], b["status"], c["status"], c["step"]) == ("finished", "finished", "finished", 2)
    db = queries.open_db(run_dir)
    try:
        assert [r["run_id"] for r in queries.rows(db, "select run_id from runs")] == [b_id]
        assert queries.step_numbers(db, b_id) == [1, 2]
    finally:
        db.close()
    archived = [p for p in (run_dir / ARCHIVE).iterdir()]
    assert len(archived) == 1 and len(list_checkpoints(archived[0] / "checkpoints")) == 2  # A's 2 and 3, intact
    assert all(json.loads((p / "state.json").read_text())["run_id"] == b_id
               for p in list_checkpoints(run_dir / "checkpoints"))
    assert os.listdir(run_dir / "screens") and all(d.startswith(b_id) for d in os.listdir(run_dir / "screens"))
