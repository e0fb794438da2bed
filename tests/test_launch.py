"""The run launcher (cua_kit.launch, `cua-kit runs`): argv building, validation before spawning, and a real
tiny CPU training run started in its own process group and stopped with SIGTERM."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from cua_kit import allocation, launch
from cua_kit.allocation import Allocation
from cua_kit.cli import main as cli_main
from cua_kit.config import ConfigError, load_config
from cua_kit.trace import TraceWriter, queries

QUICKSTART = launch.REPO_ROOT / "configs" / "quickstart.yaml"
# A short real run: no SFT adapter, no eval, small groups (CPU, 2 cores).
TINY = ["model.device=cpu", "model.adapter_path=", "trainer.eval_episodes=0", "trainer.batch_size=1",
        "rollout.n_samples=2", "rollout.max_turns=2"]


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


@pytest.mark.parametrize("text, expected", [
    ("", Allocation(0, 1, 1)),
    ("fsdp:d4", Allocation(0, 1, 4)),
    ("vllm:d1t2+fsdp:d4", Allocation(1, 2, 4)),
    ("vllm:d1p1t4+d4p1t1", Allocation(1, 4, 4)),  # the original system's spelling
    ("vllm:d1t2", Allocation(1, 2, 1)),
])
def test_layouts_parse(text, expected):
    assert allocation.parse(text) == expected


def test_the_layout_becomes_the_command_and_one_that_does_not_fit_is_refused(tmp_path):
    cfg = lambda *o: load_config(QUICKSTART, list(o))  # noqa: E731
    argv, env = launch.run_command(QUICKSTART, ["trainer.max_steps=2"], cfg("trainer.max_steps=2"), {})
    assert argv == [sys.executable, "-m", "cua_kit.cli", "train", str(QUICKSTART), "trainer.max_steps=2"]
    assert env[launch.LAUNCHED_ENV] == "1"  # what it starts runs its layout as is, never relaunches
    four = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    two = ["launch.allocation=fsdp:d2", "model.device=cuda"]
    argv, env = launch.run_command(QUICKSTART, two, cfg(*two), four)
    assert argv[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    assert argv[6:] == ["-m", "cua_kit.cli", "train", str(QUICKSTART), *two]
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5"  # the trainer ranks' GPUs, in the listed order
    nodes = [*two, "launch.nnodes=2", "launch.node_rank=1", "launch.rdzv_endpoint=node0:29500"]
    argv, _ = launch.run_command(QUICKSTART, nodes, cfg(*nodes), four)
    assert argv[3:11] == ["--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "static", "--rdzv-endpoint",
                          "node0:29500"]
    cpu = ["launch.allocation=fsdp:d2", "model.device=cpu"]  # no GPU asked for: processes under gloo
    assert "CUDA_VISIBLE_DEVICES" not in launch.run_command(QUICKSTART, cpu, cfg(*cpu), {})[1]
    # a vLLM server on its own GPUs first, then the trainer ranks; node 1 runs only trainer ranks
    assert allocation.place(Allocation(1, 2, 2), ["0", "1", "2", "3"]) == (["2", "3"], ["0", "1"])
    assert allocation.place(Allocation(1, 2, 2), ["0", "1"], node_rank=1) == (["0", "1"], [])
    big = ["launch.allocation=fsdp:d8", "model.device=cuda"]
    with pytest.raises(launch.LaunchError, match="needs 8 GPUs on node 0 .* but 4 are visible"):
        launch.run_command(QUICKSTART, big, cfg(*big), four)
    runs = tmp_path / "runs"
    with pytest.raises(launch.LaunchError, match="needs 8 GPUs"):  # refused before anything starts
        launch.launch_run(QUICKSTART, big, runs, env=four)
    assert not runs.exists() or not list(runs.rglob("launch.json"))


def test_the_processes_a_launcher_placed_never_launch_again(monkeypatch):
    cfg = load_config(QUICKSTART, ["launch.allocation=fsdp:d2"])
    assert launch.needs_launcher(cfg)  # `cua-kit train` places this layout
    monkeypatch.setenv("LOCAL_RANK", "0")  # a worker of a torchrun the user started: it runs where torchrun put it
    assert not launch.needs_launcher(cfg)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv(launch.LAUNCHED_ENV, "1")  # what run_command started
    assert not launch.needs_launcher(cfg)


def test_replaced_keys_and_unplaced_layouts_say_what_to_run(tmp_path):
    with pytest.raises(ConfigError, match="launch.n_gpus was replaced by launch.allocation"):
        load_config(QUICKSTART, ["launch.n_gpus=4"])
    with pytest.raises(ConfigError, match="launch.rdzv_endpoint='' is not allowed; allowed: host:port of node 0"):
        load_config(QUICKSTART, ["launch.nnodes=2"])
    from cua_kit.train import TrainingRun

    # train() in this process would train alone while the layout says 2 ranks: it says to use `cua-kit train`
    with pytest.raises(ConfigError, match="start it with `cua-kit train CONFIG"):
        TrainingRun(load_config(QUICKSTART, [f"output_dir={tmp_path}", "launch.allocation=fsdp:d2"]))


def test_config_outside_the_allowed_folders_is_refused(tmp_path):
    outside = tmp_path / "evil.yaml"
    outside.write_text("trainer:\n  max_steps: 1\n")
    with pytest.raises(launch.LaunchError, match="outside the allowed folders"):
        launch.launch_run(outside, [], tmp_path / "runs")
    sneaky = launch.REPO_ROOT / "configs" / ".." / "pyproject.toml"  # '..' must not escape configs/
    with pytest.raises(launch.LaunchError, match="outside the allowed folders"):
        launch.launch_run(sneaky, [], tmp_path / "runs")


def test_unknown_override_is_refused_before_anything_is_spawned(tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="trainer.max_stepz.*Did you mean 'trainer.max_steps'"):
        launch.launch_run(QUICKSTART, ["trainer.max_stepz=2"], runs)
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
    started = launch.launch_run(QUICKSTART, [*TINY, "trainer.max_steps=500", "trial_name=stopme"], runs)
    run_dir = Path(started.run_dir)
    assert started.pgid == started.pid != os.getpgid(0)  # its own session: a stop reaches all its processes
    assert (run_dir / "launch.json").is_file()
    with pytest.raises(launch.LaunchError, match="already has a live run"):
        launch.launch_run(QUICKSTART, [*TINY, "trial_name=stopme"], runs)
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
        launch.launch_run(QUICKSTART, [*TINY, "trainer.max_steps=1", *overrides], runs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [] and not Path("/tmp/cua-kit-escape").exists()


def test_a_launch_always_lands_under_the_runs_folder(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    plan = launch.plan_launch(QUICKSTART, [f"output_dir={elsewhere}", "trial_name=t1"], tmp_path / "runs")
    assert plan.run_dir == (tmp_path / "runs" / "quickstart" / "t1").resolve()  # output_dir is the runs folder
    assert not elsewhere.exists() and not (tmp_path / "runs").exists()  # planning writes nothing
    with pytest.raises(ConfigError, match="launch.n_gpus was replaced by launch.allocation"):
        launch.plan_launch(QUICKSTART, ["launch.n_gpus=-1"], tmp_path / "runs")
    with pytest.raises(ConfigError, match="rollout.n_samples=1"):
        launch.plan_launch(QUICKSTART, ["rollout.n_samples=1"], tmp_path / "runs")


def test_the_dashboard_refuses_bad_launches_in_one_line(tmp_path):
    from app.dashboard import Dashboard

    dash = Dashboard(tmp_path / "runs")
    for overrides, expected in [("trial_name=../../x", "config error"), ('trial_name="unclosed', "launch refused"),
                                ("trainer.learning_rate=.inf", "config error")]:
        message = dash.start(str(QUICKSTART), overrides)[0]
        assert message.startswith(f"✗ **{expected}") and "\n" not in message, message
    assert dash.start(str(QUICKSTART), "", "fsdp:d1.5")[0].startswith("✗ **config error:** launch.allocation=")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()
