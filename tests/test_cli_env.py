"""`cua-kit env list|demo|sweep`: real envs (synth, MiniWoB++ in Chromium, GBox SDK over HTTP to the fake).

Checks what a user relies on: the JSON last line, the pictures written per step, the oracle solving its
tasks while a random policy mostly fails, clear errors for bad input, and no leaked boxes or browsers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from cua_kit.cli import main
from cua_kit.envs import ENV_BACKENDS, Task
from cua_kit.envs.synth import SynthEnv
from tests.fakes.gbox_server import FakeGboxServer

DATA = Path(__file__).resolve().parents[1] / "data"
CLI = Path(sys.executable).with_name("cua-kit")  # the console script `pip install -e .` puts beside python


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    """`cua-kit ARGS` in-process -> (exit code, stdout lines, stderr)."""
    code = main(args)
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def demo_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    code, lines, err = run_cli(["env", "demo", *args, "--json"], capsys)
    assert code == 0, err
    return json.loads(lines[-1])


# ---- env list --------------------------------------------------------------------------------------
def test_list_shows_backends_usability_and_task_counts(capsys, monkeypatch) -> None:
    monkeypatch.delenv("GBOX_API_KEY", raising=False)
    code, lines, _ = run_cli(["env", "list", "--json"], capsys)
    assert code == 0
    report = json.loads(lines[-1])
    backends = {b["name"]: b for b in report["backends"]}
    assert list(backends) == list(ENV_BACKENDS)
    assert backends["synth"]["usable"] and backends["synth"]["tool"] == "mobile_use"
    assert backends["miniwob"]["tool"] == "computer_use"
    assert not backends["gbox"]["usable"] and "GBOX_API_KEY" in backends["gbox"]["status"]
    rows = [json.loads(line) for line in (DATA / "synth_tasks.jsonl").read_text().splitlines()]
    synth = next(s for s in report["task_sets"] if s["env"] == "synth")
    assert (synth["train"], synth["eval"]) == (sum(r["split"] == "train" for r in rows),
                                               sum(r["split"] == "eval" for r in rows))
    table_row = next(line for line in lines if line.startswith("data/synth_tasks.jsonl"))
    assert table_row.split()[1:] == ["synth", str(synth["train"]), str(synth["eval"])]
    level0 = next(s for s in report["task_sets"] if s["file"] == "data/synth_L0.jsonl")
    assert (level0["env"], level0["train"], level0["eval"]) == ("synth", 2000, 200)

    monkeypatch.setenv("GBOX_API_KEY", "some-key")
    report = json.loads(run_cli(["env", "list", "--json"], capsys)[1][-1])
    assert next(b for b in report["backends"] if b["name"] == "gbox")["usable"]


# ---- env demo on synth -----------------------------------------------------------------------------
@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_synth_oracle_solves_and_random_mostly_fails(level: int, capsys, tmp_path: Path) -> None:
    oracle = demo_json(["synth", "--task", f"synth-L{level}", "--episodes", "8", "--out", str(tmp_path / "o")],
                       capsys)
    random = demo_json(["synth", "--task", f"synth-L{level}", "--player", "random", "--episodes", "16",
                        "--seed", "3", "--out", str(tmp_path / "r")], capsys)
    assert oracle["env"] == "synth" and oracle["task"] == f"synth-L{level}" and oracle["episodes"] == 8
    assert oracle["success_rate"] >= 0.95
    assert random["success_rate"] <= 0.35 and random["success_rate"] < oracle["success_rate"]
    assert oracle["steps_per_s"] > 0 and random["steps"] > 0
    ran = [e["task"] for e in oracle["per_episode"]]
    assert ran == [f"synth-L{level}-{i:04d}" for i in range(8)]  # the prefix cycles the file's tasks


def test_demo_saves_each_step_with_the_action_drawn(capsys, tmp_path: Path) -> None:
    import asyncio

    summary = demo_json(["synth", "--task", "synth-L2-0005", "--episodes", "2", "--out", str(tmp_path)], capsys)
    assert summary["per_episode"][0]["task"] == summary["per_episode"][1]["task"] == "synth-L2-0005"
    for episode in summary["per_episode"]:
        folder = Path(episode["folder"])
        assert folder.parent == tmp_path
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted([f"step_{i:02d}.png" for i in range(episode["steps"])] + ["final.png"])
    # step 0 is the start screen plus the oracle's first tap drawn on it, around the tapped point
    async def first_screen_and_action():
        env = SynthEnv()
        task = Task("synth-L2-0005", "synth", params={"level": 2, "seed": 5})
        obs = await env.reset(task)
        return obs.screenshot, await env.oracle_action()

    screen, action = asyncio.run(first_screen_and_action())
    picture = Image.open(Path(summary["per_episode"][0]["folder"]) / "step_00.png").convert("RGB")
    assert picture.size == screen.size
    x0, y0, x1, y1 = ImageChops.difference(picture, screen).getbbox()
    assert x0 <= action.x <= x1 and y0 <= action.y <= y1


def test_max_steps_and_split_and_task_file(capsys, tmp_path: Path) -> None:
    capped = demo_json(["synth", "--task", "synth-L2", "--player", "random", "--max-steps", "2",
                        "--episodes", "5", "--out", str(tmp_path / "a")], capsys)
    assert all(e["steps"] <= 2 for e in capped["per_episode"]) and capped["steps"] > 5
    evals = demo_json(["synth", "--task", "synth-L0", "--split", "eval", "--episodes", "2",
                       "--out", str(tmp_path / "b")], capsys)
    assert [e["task"] for e in evals["per_episode"]] == ["synth-L0-100000", "synth-L0-100001"]
    own = tmp_path / "mine.jsonl"
    own.write_text(json.dumps({"id": "my-task", "env": "synth", "params": {"level": 1, "seed": 77}}) + "\n")
    mine = demo_json(["synth", "--task-file", str(own), "--episodes", "1", "--out", str(tmp_path / "c")], capsys)
    assert mine["per_episode"][0]["task"] == "my-task" and mine["success_rate"] == 1.0


def test_demo_as_a_user_runs_it(tmp_path: Path) -> None:
    """The installed console script, in a fresh process: the last stdout line is the JSON summary."""
    assert CLI.exists(), f"{CLI} missing: install the kit with `pip install -e .`"
    proc = subprocess.run([str(CLI), "env", "demo", "synth", "--task", "synth-L3-0001", "--episodes", "2",
                           "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[2] for line in lines[:2]] == ["synth-L3-0001"] * 2  # one line per episode
    summary = json.loads(lines[-1])
    assert summary["success_rate"] == 1.0 and summary["episodes"] == 2
    assert (tmp_path / "outputs" / "env_demo" / "synth" / "ep001_synth-L3-0001" / "final.png").exists()


# ---- bad input ---------------------------------------------------------------------------------------
def test_unknown_env_names_the_closest(capsys) -> None:
    code, _, err = run_cli(["env", "demo", "synht", "--task", "x"], capsys)
    assert code == 2 and "unknown env 'synht'" in err and "Did you mean 'synth'" in err


def test_unknown_task_lists_valid_ids(capsys) -> None:
    code, _, err = run_cli(["env", "demo", "synth", "--task", "synth-L7"], capsys)
    assert code == 2 and "synth-L7" in err and "synth-L0-0000" in err


def test_env_problems_are_one_clear_line(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GBOX_API_KEY", raising=False)
    code, _, err = run_cli(["env", "demo", "gbox", "--task", "open-clock", "--out", str(tmp_path)], capsys)
    assert code == 1 and "GBOX_API_KEY is not set" in err and "Traceback" not in err
    code, _, err = run_cli(["env", "sweep", "synth"], capsys)
    assert code == 2 and "only 'gbox'" in err
    code, _, err = run_cli(["env", "demo", "synth", "--task-file", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "nope.jsonl" in err


# ---- gbox through the SDK against the fake cloud ----------------------------------------------------
def test_gbox_demo_and_sweep(fake_gbox: FakeGboxServer, capsys, tmp_path: Path) -> None:
    oracle = demo_json(["gbox", "--task", "toggle-wi-fi", "--episodes", "2", "--out", str(tmp_path / "o")], capsys)
    assert oracle["success_rate"] == 1.0 and {e["task"] for e in oracle["per_episode"]} == {
        "toggle-wi-fi-on", "toggle-wi-fi-off"}
    random = demo_json(["gbox", "--task", "note-buy-milk", "--player", "random", "--max-steps", "3",
                        "--episodes", "2", "--out", str(tmp_path / "r")], capsys)
    assert random["success_rate"] == 0.0 and [e["steps"] for e in random["per_episode"]] == [3, 3]
    assert fake_gbox.live_boxes() == []  # every demo box was terminated

    leaked = fake_gbox.add_box({"cua-kit": "1", "run": "old"})
    other = fake_gbox.add_box({"team": "someone-else"})
    code, lines, _ = run_cli(["env", "sweep", "gbox", "--dry-run", "--json"], capsys)
    assert code == 0 and json.loads(lines[-1])["boxes"] == [leaked]
    assert {b.id for b in fake_gbox.live_boxes()} == {leaked, other}
    code, lines, _ = run_cli(["env", "sweep", "gbox"], capsys)
    assert code == 0 and lines == [f"terminated {leaked}"]
    assert [b.id for b in fake_gbox.live_boxes()] == [other]
    assert run_cli(["env", "sweep", "gbox"], capsys)[1] == ["no leaked boxes"]


# ---- miniwob in real Chromium ----------------------------------------------------------------------
@pytest.mark.browser
def test_miniwob_demo_oracle_and_random(chromium_path: str, capsys, tmp_path: Path) -> None:
    from cua_kit.envs.miniwob import descendant_pids

    oracle = demo_json(["miniwob", "--task", "click-button/eval", "--episodes", "3",
                        "--out", str(tmp_path / "o")], capsys)
    random = demo_json(["miniwob", "--task", "click-button/eval", "--player", "random", "--episodes", "3",
                        "--max-steps", "4", "--out", str(tmp_path / "r")], capsys)
    assert oracle["success_rate"] >= 0.95 and random["success_rate"] < oracle["success_rate"]
    picture = Image.open(Path(oracle["per_episode"][0]["folder"]) / "step_00.png")
    assert picture.size == (320, 420)
    real = os.path.realpath(chromium_path)
    left = [p for p in descendant_pids(os.getpid()) if _exe(p) == real]
    assert left == [], f"Chromium processes left running: {left}"


def _exe(pid: int) -> str:
    try:
        return os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return ""


# ---- env errors end an episode, not the demo (issue 18 §7) -----------------------------------------
def test_gbox_5xx_mid_demo_is_counted_and_the_demo_goes_on(fake_gbox: FakeGboxServer, capsys, tmp_path: Path) -> None:
    """A tap answered 503 after it ran (never retried: it may have happened) ends that episode; the demo used to
    stop there with no summary."""
    fake_gbox.inject("click", 503, execute=True)
    code, lines, err = run_cli(["env", "demo", "gbox", "--task", "toggle-wi-fi", "--episodes", "3",
                                "--out", str(tmp_path), "--json"], capsys)
    summary = json.loads(lines[-1])
    assert code == 1 and (summary["episodes"], summary["env_errors"], summary["scored"]) == (3, 1, 2)
    [failed] = [e for e in summary["per_episode"] if e["error"]]
    assert "503" in failed["error"] and failed["reward"] is None
    assert summary["success_rate"] == 1.0  # over the scored episodes: the oracle solved both
    assert "1 env errors" in lines[-2] and "Traceback" not in err
    assert fake_gbox.live_boxes() == []  # the failed episode's box was terminated too


@pytest.mark.browser
def test_a_browser_killed_mid_demo_is_counted_and_a_new_one_takes_over(chromium_path: str, capsys, monkeypatch,
                                                                        tmp_path: Path) -> None:
    import asyncio
    import signal

    from cua_kit.envs.miniwob import MiniWobEnv, descendant_pids

    real_step, calls = MiniWobEnv.step, []

    async def step_then_die(self, action):  # the second episode's browser dies after its reset
        calls.append(action)
        if len(calls) == 2:
            os.killpg(self.browser.pid, signal.SIGKILL)
            await asyncio.sleep(0.3)
        return await real_step(self, action)

    monkeypatch.setattr(MiniWobEnv, "step", step_then_die)
    code, lines, _ = run_cli(["env", "demo", "miniwob", "--task", "click-button/eval", "--episodes", "3",
                              "--out", str(tmp_path), "--json"], capsys)
    summary = json.loads(lines[-1])
    assert code == 1 and (summary["episodes"], summary["env_errors"]) == (3, 1)
    assert [e["error"] is not None for e in summary["per_episode"]] == [False, True, False]
    assert summary["success_rate"] == 1.0
    real = os.path.realpath(chromium_path)
    assert [p for p in descendant_pids(os.getpid()) if _exe(p) == real] == []
