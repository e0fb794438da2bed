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


def test_argv_is_plain_python_for_cpu_and_torchrun_for_several_gpus():
    cpu = launch.build_argv(QUICKSTART, ["trainer.max_steps=2"], 0)
    assert cpu == [sys.executable, "-m", "cua_kit.cli", "train", str(QUICKSTART), "trainer.max_steps=2"]
    assert launch.build_argv(QUICKSTART, [], 1)[0] == sys.executable
    multi = launch.build_argv(QUICKSTART, ["launch.n_gpus=4"], 4)
    assert Path(multi[0]).name == "torchrun" and multi[1:3] == ["--nproc_per_node", "4"]
    assert multi[3:6] == ["-m", "cua_kit.cli", "train"] and multi[-1] == "launch.n_gpus=4"
    overrides = launch.launch_overrides(["trainer.max_steps=2"], 4, "/tmp/runs")
    assert "launch.n_gpus=4" in overrides and overrides[-1] == f"output_dir={Path('/tmp/runs').resolve()}"
    assert "model.device=cpu" in launch.launch_overrides([], 0, "/tmp/runs")
    with pytest.raises(launch.LaunchError, match="n_gpus"):
        launch.build_argv(QUICKSTART, [], -1)


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


@pytest.mark.parametrize("overrides", [
    ["trial_name=../../escape"], ["experiment_name=/tmp/cua-kit-escape"], ["trial_name=.."],
    ["experiment_name=a/b"], ["trial_name=x/../../../escape"], ["experiment_name="],
])
def test_run_names_that_are_paths_are_refused_before_anything_starts(tmp_path, overrides):
    """Launch used to start the trainer with these and only then fail: an unlisted run, writing elsewhere."""
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="a folder name, not a path"):
        launch.launch_run(QUICKSTART, [*TINY, "trainer.max_steps=1", *overrides], 0, runs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and not Path("/tmp/cua-kit-escape").exists()


def test_a_launch_always_lands_under_the_runs_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    plan = launch.plan_launch(QUICKSTART, [f"output_dir={elsewhere}", "trial_name=t1"], 0, tmp_path / "runs")
    assert plan.run_dir == (tmp_path / "runs" / "quickstart" / "t1").resolve()  # output_dir is the runs folder
    assert not elsewhere.exists() and not (tmp_path / "runs").exists()  # planning writes nothing
    with pytest.raises(launch.LaunchError, match="n_gpus"):
        launch.plan_launch(QUICKSTART, [], -1, tmp_path / "runs")
    with pytest.raises(ConfigError, match="rollout.n_samples=1"):
        launch.plan_launch(QUICKSTART, ["rollout.n_samples=1"], 0, tmp_path / "runs")


def test_the_dashboard_refuses_bad_launches_in_one_line(tmp_path):
    from app.dashboard import Dashboard

    dash = Dashboard(tmp_path / "runs")
    for overrides, expected in [("trial_name=../../x", "config error"), ('trial_name="unclosed', "launch refused"),
                                ("trainer.learning_rate=.inf", "config error")]:
        message = dash.start(str(QUICKSTART), overrides, 0)[0]
        assert message.startswith(f"✗ **{expected}") and "\n" not in message, message
    assert dash.start(str(QUICKSTART), "", 1.5)[0].startswith("✗ **launch refused:** GPUs must be a whole number")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()
