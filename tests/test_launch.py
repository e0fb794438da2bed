"""The run launcher (cua_kit.launch, `cua-kit runs`): argv building, validation before spawning, and a real
tiny CPU training run started in its own process group and stopped with SIGTERM."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from cua_kit import launch
from cua_kit.cli import main as cli_main
from cua_kit.config import ConfigError
from cua_kit.trace import TraceWriter, queries

QUICKSTART = launch.REPO_ROOT / "configs" / "quickstart.yaml"
# A short real run: no SFT adapter, no eval, small groups (CPU, 2 cores).
TINY = ["model.adapter_path=", "trainer.eval_episodes=0", "trainer.batch_size=1", "rollout.n_samples=2",
        "rollout.max_turns=2"]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def run_status(run_dir: Path) -> str | None:
    if not (run_dir / "trace.db").exists():
        return None
    db = queries.open_db(run_dir)
    try:
        info = queries.run_info(db)
    finally:
        db.close()
    return info["status"] if info else None


def test_argv_is_plain_python_and_several_gpus_are_refused(tmp_path):
    cpu = launch.build_argv(QUICKSTART, ["trainer.max_steps=2"], 0)
    assert cpu == [sys.executable, "-m", "cua_kit.cli", "train", str(QUICKSTART), "trainer.max_steps=2"]
    assert launch.build_argv(QUICKSTART, [], 1)[0] == sys.executable
    overrides = launch.launch_overrides(["trainer.max_steps=2"], 1, "/tmp/runs")
    assert "launch.n_gpus=1" in overrides and overrides[-1] == f"output_dir={Path('/tmp/runs').resolve()}"
    assert "model.device=cpu" in launch.launch_overrides([], 0, "/tmp/runs")
    with pytest.raises(launch.LaunchError, match="n_gpus"):
        launch.build_argv(QUICKSTART, [], -1)
    # N copies of the one-process trainer would all write one run folder: refused, saying what to run instead
    with pytest.raises(launch.LaunchError, match=r"launch.n_gpus=4: the multi-GPU .* \(launch.n_gpus=1\)"):
        launch.launch_run(QUICKSTART, [], 4, tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("launch.json"))
    # and the trainer itself refuses to run as one of several torchrun workers
    from cua_kit.config import load_config
    from cua_kit.train import TrainingRun

    with pytest.raises(ConfigError, match="launch.n_gpus=2"):
        TrainingRun(load_config(QUICKSTART, [f"output_dir={tmp_path}", "launch.n_gpus=2"]))


def test_config_outside_the_allowed_folders_is_refused(tmp_path):
    outside = tmp_path / "evil.yaml"
    outside.write_text("trainer:\n  max_steps: 1\n")
    with pytest.raises(launch.LaunchError, match="outside the allowed folders"):
        launch.launch_run(outside, [], 0, tmp_path / "runs")
    sneaky = launch.REPO_ROOT / "configs" / ".." / "pyproject.toml"  # '..' must not escape configs/
    with pytest.raises(launch.LaunchError, match="outside the allowed folders"):
        launch.launch_run(sneaky, [], 0, tmp_path / "runs")


def test_unknown_override_is_refused_before_anything_is_spawned(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="trainer.max_stepz.*Did you mean 'trainer.max_steps'"):
        launch.launch_run(QUICKSTART, ["trainer.max_stepz=2"], 0, runs)
    assert not runs.exists() or not list(runs.rglob("launch.json"))


def test_running_row_with_dead_pid_reads_failed(tmp_path):
    import subprocess

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run_dir = tmp_path / "runs" / "exp" / "t0"
    run_dir.mkdir(parents=True)
    with TraceWriter(run_dir / "trace.db", "exp-t0") as writer:
        writer.start_run("exp", "t0", {}, pid=int(dead.stdout))
    [run] = launch.list_runs(tmp_path / "runs")
    assert run["status"] == "running" and run["effective_status"] == "failed" and run["name"] == "exp/t0"


def test_real_run_starts_in_its_own_group_and_stops_on_sigterm(tmp_path, capsys):
    runs = tmp_path / "runs"
    started = launch.launch_run(QUICKSTART, [*TINY, "trainer.max_steps=500", "trial_name=stopme"], 0, runs)
    run_dir = Path(started.run_dir)
    assert started.pgid == started.pid != os.getpgid(0)  # its own session: a stop reaches all its processes
    assert (run_dir / "launch.json").is_file()
    with pytest.raises(launch.LaunchError, match="already has a live run"):
        launch.launch_run(QUICKSTART, [*TINY, "trial_name=stopme"], 0, runs)
    try:
        wait_for(lambda: run_status(run_dir) == "running", 120, "the trainer to record status running")
        assert cli_main(["runs", "list", "--runs-dir", str(runs)]) == 0
        assert "stopme" in capsys.readouterr().out
        assert cli_main(["runs", "stop", "quickstart/stopme", "--runs-dir", str(runs), "--grace", "60"]) == 0
        assert "stopped (SIGTERM)" in capsys.readouterr().out
    finally:
        launch.stop_run(run_dir, grace_s=5)  # never leak the trainer, even when an assert above fails
    assert not launch.pid_alive(started.pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(started.pgid, 0)
    assert run_status(run_dir) == "stopped"
    assert "stopped_at" in launch.read_launch(run_dir)
    assert (run_dir / "train.log").stat().st_size > 0
