"""Every MiniWoB++ task of the wheel through the kit's env: the generated task file, the refused tasks and
their reasons, every runnable task in real Chromium with the random policy, a user's own task file, and
the per-task eval (`cua-kit eval` on MiniWoB++ with the offline tiny model).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cua_kit.actions import Action, random_action
from cua_kit.cli import main
from cua_kit.envs import Task, load_tasks
from cua_kit.envs.miniwob import MiniWobBrowser, MiniWobEnv
from cua_kit.envs.miniwob_tasks import REFUSED, task_names, wheel_task_names
from cua_kit.evaluate import per_task_summary, round_robin
from cua_kit.rollout.episode import Episode

ROOT = Path(__file__).resolve().parents[1]
ALL_TASKS = ROOT / "data" / "miniwob_all.jsonl"
ENVIRONMENTS_MD = ROOT / "docs" / "environments.md"


def task(name: str, seed: int = 10000) -> Task:
    return Task(id=f"{name}/eval/{seed}", env="miniwob", params={"task": name, "seed": seed}, split="eval")


# ---- the task catalogue (no browser) ----------------------------------------------------------------
def test_generator_command_writes_the_committed_file():
    out = subprocess.run([sys.executable, "-m", "cua_kit.envs.miniwob_tasks"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert out == ALL_TASKS.read_text()


def test_every_wheel_task_is_in_the_file_or_refused():
    wheel, in_file = set(wheel_task_names()), load_tasks(ALL_TASKS)
    names = {t.params["task"] for t in in_file}
    assert len(wheel) == 134  # miniwob 1.1.0: 130 pages in html/miniwob/, 4 FlightWoB sites in html/flight/
    assert names == set(task_names()) and len(names) == 125
    assert set(REFUSED) <= wheel and not set(REFUSED) & names and names | set(REFUSED) == wheel
    train = {(t.params["task"], t.params["seed"]) for t in in_file if t.split == "train"}
    evals = {(t.params["task"], t.params["seed"]) for t in in_file if t.split == "eval"}
    assert (len(train), len(evals)) == (125 * 16, 125 * 8) and not train & evals


def test_docs_list_every_refused_task():
    section = ENVIRONMENTS_MD.read_text().split("**Every task of the wheel runs by name**")[1].split("###")[0]
    listed = set(re.findall(r"`([\w.-]+)`", section.split("| task | why it is refused |")[1].split("\n\n")[0]))
    assert listed == set(REFUSED)


def test_per_task_summary_means_over_tasks_and_round_robin_covers_each_task():
    tasks = [task("a", s) for s in range(3)] + [task("b", s) for s in range(2)] + [task("c")]
    assert [t.id for t in round_robin(tasks, "task")[:3]] == ["a/eval/0", "b/eval/0", "c/eval/10000"]
    rewards = {"a": [1.0, 1.0, 1.0], "b": [0.0], "c": [None]}  # None: an env error, never scored
    episodes = [Episode(f"e{i}", task(name, i), reward=r) for name, rs in rewards.items() for i, r in enumerate(rs)]
    summary = per_task_summary(episodes, "task", 4)
    assert summary["per_task"]["a"] == {"episodes": 3, "successes": 3, "env_errors": 0, "success_rate": 1.0}
    assert summary["per_task"]["c"] == {"episodes": 0, "successes": 0, "env_errors": 1, "success_rate": None}
    assert summary["task_mean_success_rate"] == 0.5  # (1.0 + 0.0) / 2, while the episode mean is 3 / 4
    assert (summary["tasks_scored"], summary["tasks_in_split"]) == (2, 4)


# ---- real Chromium --------------------------------------------------------------------------------
@pytest.mark.browser
def test_every_runnable_task_resets_and_takes_random_steps(chromium_path):
    """One short random episode per task (125) on 4 envs sharing one browser: no crash, a real instruction,
    320x420 screenshots, a reward in [0, 1]. Sleeping actions are shortened (the test checks the env)."""
    names, n_envs = task_names(), 4

    async def worker(env: MiniWobEnv, share: list[str], seen: dict[str, float]) -> None:
        rng = random.Random(0)
        for name in share:
            obs = await env.reset(task(name))
            assert isinstance(obs.instruction, str) and obs.instruction and obs.size == (320, 420), name
            for _ in range(3):
                action = random_action(rng, obs.size)
                if action.kind in ("wait", "long_press"):
                    action = dataclasses.replace(action, duration=0.05)
                result = await env.step(action)
                assert result.observation.size == (320, 420), name
                if result.done:
                    break
            seen[name] = await env.evaluate()

    async def run() -> dict[str, float]:
        browser, seen = MiniWobBrowser(chromium_path), {}
        envs = [MiniWobEnv(browser=browser) for _ in range(n_envs)]
        try:
            await asyncio.gather(*(worker(env, names[i::n_envs], seen) for i, env in enumerate(envs)))
        finally:
            for env in envs:
                await env.close()
            await browser.close()
        return seen

    seen = asyncio.run(run())
    assert set(seen) == set(names) and all(0.0 <= r <= 1.0 for r in seen.values())


@pytest.mark.browser
def test_refused_and_unknown_tasks_say_why_before_a_browser_starts(chromium_path):
    async def run() -> MiniWobEnv:
        env = MiniWobEnv(chromium_path=chromium_path)
        for name, why in REFUSED.items():
            with pytest.raises(ValueError, match="is refused") as refused:
                await env.reset(task(name))
            assert why in str(refused.value) and name in str(refused.value)
        with pytest.raises(ValueError, match=r"closest: click-button\b"):
            await env.reset(task("click-buton"))
        return env

    assert asyncio.run(run()).browser is None  # checked before any page or Chromium was opened


def _docs_user_file(tmp_path: Path) -> Path:
    """The example task file of docs/environments.md, as a user would copy it."""
    block = ENVIRONMENTS_MD.read_text().split("### Your own MiniWoB++ task file")[1].split("```jsonl\n")[1]
    path = tmp_path / "my_tasks.jsonl"
    path.write_text(block.split("```")[0])
    return path


@pytest.mark.browser
def test_a_users_own_task_file_runs_and_a_refused_task_fails_in_one_line(chromium_path, capsys, tmp_path):
    user_file = _docs_user_file(tmp_path)
    names = {t.params["task"] for t in load_tasks(user_file)}
    curated = {t.params["task"] for t in load_tasks(ROOT / "data" / "miniwob_tasks.yaml")}
    assert names and not names & curated  # tasks outside the curated list
    code = main(["env", "demo", "miniwob", "--task-file", str(user_file), "--player", "random", "--episodes", "3",
                 "--max-steps", "3", "--out", str(tmp_path / "demo"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    ran = json.loads(out.strip().splitlines()[-1])["per_episode"]
    assert {r["task"].split("/")[0] for r in ran} == names and all(0 <= r["reward"] <= 1 for r in ran)

    refused = tmp_path / "refused.jsonl"
    refused.write_text(json.dumps(task("hover-shape").to_dict()) + "\n")
    code = main(["env", "demo", "miniwob", "--task-file", str(refused), "--episodes", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and REFUSED["hover-shape"] in err


@pytest.mark.browser
def test_eval_on_miniwob_reports_each_task_and_the_mean_over_tasks(chromium_path, capsys, tmp_path):
    """`cua-kit eval` with the tiny model on the docs' user file: 6 episodes = 2 per task (round robin), the
    per-task numbers agree with the eval's own trace, and synth's eval output keeps its old keys."""
    user_file = _docs_user_file(tmp_path)
    common = ["configs/quickstart.yaml", "model.adapter_path=", f"output_dir={tmp_path}", "rollout.max_turns=1",
              "rollout.max_new_tokens=24", "rollout.max_concurrent_rollouts=3", "--json"]
    code = main(["eval", *common, "env.name=miniwob", f"env.task_file={user_file}", "env.task_filter=[]",
                 "--episodes", "6"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result, lines = json.loads(out.strip().splitlines()[-1]), out.splitlines()
    names = {t.params["task"] for t in load_tasks(user_file)}
    assert set(result["per_task"]) == names and (result["tasks_scored"], result["tasks_in_split"]) == (3, 3)
    db = tmp_path / "quickstart" / "trial0" / "eval" / "cli" / "trace.db"
    with sqlite3.connect(db) as conn:
        traced = conn.execute("select task_id, success from episodes where reward is not null").fetchall()
    for name, row in result["per_task"].items():
        mine = [s for task_id, s in traced if task_id.split("/")[0] == name]
        assert row["episodes"] + row["env_errors"] == 2 and row["episodes"] == len(mine)
        assert row["success_rate"] == (sum(mine) / len(mine) if mine else None)
        assert any(line.startswith(name) for line in lines)  # the printed table has its row
    rates = [r["success_rate"] for r in result["per_task"].values() if r["success_rate"] is not None]
    assert result["task_mean_success_rate"] == pytest.approx(sum(rates) / len(rates))
    assert any(line.startswith("mean over 3 tasks: ") for line in lines)

    code = main(["eval", *common, "--episodes", "2"])  # synth: no task_key, the output it always had
    assert code == 0 and set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])) == {"episodes",
                                                                                               "success_rate"}

    refused = tmp_path / "refused.jsonl"  # a refused task stops the eval before any episode, with the reason
    refused.write_text(user_file.read_text() + json.dumps(task("simon-says").to_dict()) + "\n")
    code = main(["eval", *common, "env.name=miniwob", f"env.task_file={refused}", "env.task_filter=[]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("config error: ") and REFUSED["simon-says"] in err[-1]


async def _click(env: MiniWobEnv, selector: str, index: int = 0) -> None:
    """Click the centre of the `index`-th match of `selector`, in screenshot pixels (2x CSS px)."""
    x, y = await env._page.evaluate("([s, i]) => { const r = document.querySelectorAll(s)[i].getBoundingClientRect();"
                                    " return [r.left + r.width / 2, r.top + r.height / 2]; }", [selector, index])
    await env.step(Action(kind="click", x=int(2 * x), y=int(2 * y)))


async def _keys(env: MiniWobEnv, *names: str) -> None:
    for name in names:
        await env.step(Action(kind="key", text=name))


@pytest.mark.browser
def test_clipboard_and_multiple_choice_pages_are_solvable_with_the_action_set(chromium_path):
    """What docs/environments.md says works headless: copy-paste through ctrl+a/c/v, and click-scroll-list's
    two choices through the keyboard (ctrl+ArrowDown moves in the list, ctrl+Space toggles)."""
    async def copy_paste(env: MiniWobEnv, seed: int) -> float:
        await env.reset(task("copy-paste", seed))
        await _click(env, "#to-copy")
        await _keys(env, "ctrl+a", "ctrl+c")
        await _click(env, "#answer-input")
        await _keys(env, "ctrl+v")
        await _click(env, "#subbtn")
        return await env.evaluate()

    async def scroll_list(env: MiniWobEnv, seed: int) -> float:
        obs = await env.reset(task("click-scroll-list", seed))
        want = obs.instruction.removeprefix("Select ").removesuffix(" from the scroll list and click Submit.")
        options = await env._page.evaluate("[...document.querySelectorAll('#options option')].map(o => o.textContent)")
        wanted = [i for i, text in enumerate(options) if text in want.split(", ")]
        await _click(env, "#options option", 0)  # the top option: selected and focused
        if 0 not in wanted:
            await _keys(env, "ctrl+Space")
        for prev, i in zip([0, *wanted], wanted):
            await _keys(env, *["ctrl+ArrowDown"] * (i - prev), *(["ctrl+Space"] if i else []))
        await _click(env, "#area button")
        return await env.evaluate()

    async def run() -> list[float]:
        env = MiniWobEnv(chromium_path=chromium_path)
        try:
            return [await copy_paste(env, s) for s in range(2)] + [await scroll_list(env, s) for s in range(4)]
        finally:
            await env.close()

    assert asyncio.run(run()) == [1.0] * 6


@pytest.mark.browser
def test_train_evals_on_miniwob_report_each_task(chromium_path, tmp_path):
    """The evals `cua-kit train` runs: a per-task table in the log and per-task rates on the learning curve."""
    names = ["click-color", "drag-items", "email-inbox-nl-turk"]
    task_file = tmp_path / "tasks.jsonl"
    task_file.write_text("".join(json.dumps(t.to_dict()) + "\n" for name in names
                                 for t in (dataclasses.replace(task(name, 0), id=f"{name}/train/0", split="train"),
                                           task(name))))
    cmd = [sys.executable, "-m", "cua_kit.cli", "train", "configs/quickstart.yaml", "model.adapter_path=",
           "env.name=miniwob", f"env.task_file={task_file}", "env.task_filter=[]", f"output_dir={tmp_path}",
           "trainer.max_steps=1", "trainer.batch_size=1", "rollout.n_samples=2", "rollout.max_turns=1",
           "rollout.max_new_tokens=12", "rollout.max_concurrent_rollouts=2", "trainer.eval_episodes=3",
           "trainer.eval_sampled=false"]
    log = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    assert "[Eval before] per task:" in log and log.count("mean over 3 tasks: ") == 2  # before and after
    curve = [json.loads(line) for line in (tmp_path / "quickstart/trial0/eval/curve.jsonl").read_text().splitlines()]
    assert [p["label"] for p in curve] == ["before", "after"]
    for point in curve:
        assert set(point["per_task"]) == set(names)
        assert point["task_mean_success_rate"] == pytest.approx(sum(point["per_task"].values()) / 3)
