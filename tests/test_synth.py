"""Tests of the synth phone env: oracle solves every level, random play scores clearly lower, determinism."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cua_kit.actions import Action, format_action, parse_action, random_action
from cua_kit.envs import load_tasks, make_env
from cua_kit.envs.synth import LEVELS, SynthEnv, default_task_set, make_scenario, synth_tasks

DATA = Path(__file__).resolve().parents[1] / "data" / "synth_tasks.jsonl"


async def play(env: SynthEnv, task, policy: str, rng: random.Random, through_text: bool = False) -> float:
    """One episode; with through_text the oracle's action goes through format -> parse like a model's."""
    await env.reset(task)
    done = False
    while not done:
        action = await env.oracle_action() if policy == "oracle" else random_action(rng, env.screen_size)
        if through_text:
            action = parse_action(format_action(action, env.screen_size), env.screen_size)
        done = (await env.step(action)).done
    return await env.evaluate()


def success_rate(level: int, policy: str, n: int = 40, **kw) -> float:
    async def run() -> float:
        env, rng = make_env("synth", **kw), random.Random(1)
        scores = [await play(env, task, policy, rng) for task in synth_tasks(level, n, "eval")]
        await env.close()
        return sum(scores) / n
    return asyncio.run(run())


@pytest.mark.parametrize("level", LEVELS)
def test_oracle_solves_every_level_and_random_play_does_not(level):
    oracle, rand = success_rate(level, "oracle"), success_rate(level, "random")
    assert oracle >= 0.95
    assert rand <= 0.3 and rand <= oracle - 0.6


def test_oracle_on_a_landscape_screen_through_the_text_format():
    async def run() -> list[float]:
        env, rng = SynthEnv(screen_size=(640, 360)), random.Random(0)
        return [await play(env, t, "oracle", rng, through_text=True) for lv in LEVELS for t in synth_tasks(lv, 5)]
    assert asyncio.run(run()) == [1.0] * 20


def test_same_seed_gives_identical_screens_and_other_seeds_differ():
    async def screens(seed: int) -> list[bytes]:
        env, shots = SynthEnv(), []
        for level in LEVELS:
            task = synth_tasks(level, 1, seed0=seed)[0]
            shots.append((await env.reset(task)).screenshot.tobytes())
            while True:
                result = await env.step(await env.oracle_action())
                shots.append(result.observation.screenshot.tobytes())
                if result.done:
                    break
        return shots
    first, again, other = asyncio.run(screens(7)), asyncio.run(screens(7)), asyncio.run(screens(8))
    assert first == again
    assert first[0] != other[0]


def test_tapping_a_distractor_fails_and_ends_the_episode():
    async def run():
        env = SynthEnv()
        task = synth_tasks(1, 1, seed0=3)[0]
        obs = await env.reset(task)
        scenario = make_scenario(1, 3)
        wrong = next(w for w in env._screens["main"] if w.kind == "button" and w.label != scenario.target)
        result = await env.step(Action("click", x=wrong.center[0], y=wrong.center[1]))
        return obs, result, await env.evaluate()
    obs, result, score = asyncio.run(run())
    assert obs.screenshot.size == (360, 640) and obs.instruction.startswith("Tap the '")
    assert result.done and score == 0.0 and result.info["success"] is False


def test_finish_ends_the_episode_but_success_is_read_from_state():
    async def run():
        env = SynthEnv()
        await env.reset(synth_tasks(2, 1)[0])
        result = await env.step(Action("finish", status="success"))
        return result.done, await env.evaluate()
    assert asyncio.run(run()) == (True, 0.0)


def test_level_2_wrong_app_then_back_then_right_app():
    async def run() -> float:
        env = SynthEnv()
        task = synth_tasks(2, 1, seed0=11)[0]
        await env.reset(task)
        target = make_scenario(2, 11).target
        wrong = next(w for w in env._screens["home"] if w.kind == "icon" and w.label != target)
        await env.step(Action("click", x=wrong.center[0], y=wrong.center[1]))
        assert (await env.oracle_action()) == Action("key", text="back")
        done = False
        while not done:
            done = (await env.step(await env.oracle_action())).done
        return await env.evaluate()
    assert asyncio.run(run()) == 1.0


def test_level_3_wrong_text_is_cleared_by_the_oracle():
    async def run() -> float:
        env = SynthEnv()
        await env.reset(synth_tasks(3, 1, seed0=5)[0])
        await env.step(await env.oracle_action())  # focus the field
        await env.step(Action("type", text="oops"))
        assert (await env.oracle_action()) == Action("key", text="clear")
        done = False
        while not done:
            done = (await env.step(await env.oracle_action())).done
        return await env.evaluate()
    assert asyncio.run(run()) == 1.0


def test_task_file_matches_the_generator_and_splits_are_disjoint():
    tasks = load_tasks(DATA)
    assert [t.to_dict() for t in tasks] == [t.to_dict() for t in default_task_set()]
    train, evals = load_tasks(DATA, split="train"), load_tasks(DATA, split="eval")
    assert len(train) == 800 and len(evals) == 200
    seeds = lambda ts: {(t.params["level"], t.params["seed"]) for t in ts}  # noqa: E731
    assert not seeds(train) & seeds(evals)
    assert len({t.id for t in tasks}) == 1000 and {t.params["level"] for t in evals} == set(LEVELS)


def test_level_file_is_what_its_documented_command_prints():
    """data/synth_L0.jsonl (the quickstart's tasks) = `python -m cua_kit.envs.synth --level 0 --train 2000
    --eval 200`, run for real; its first 100 train tasks are those of data/synth_tasks.jsonl (the SFT demos)."""
    printed = subprocess.run([sys.executable, "-m", "cua_kit.envs.synth", "--level", "0", "--train", "2000",
                              "--eval", "200"], check=True, capture_output=True, text=True).stdout
    assert printed == (DATA.parent / "synth_L0.jsonl").read_text()
    train = load_tasks(DATA.parent / "synth_L0.jsonl", split="train")
    evals = load_tasks(DATA.parent / "synth_L0.jsonl", split="eval")
    assert len(train) == 2000 and len(evals) == 200
    assert not {t.params["seed"] for t in train} & {t.params["seed"] for t in evals}
    assert [t.id for t in train[:100]] == [t.id for t in load_tasks(DATA, split="train")[:100]]


def test_a_sized_level_2_task_is_two_turns_with_the_icon_anywhere():
    """apps=1, settings=1 (the tasks of the CPU multi-turn attempt, docs/BENCHMARKS.md): the oracle needs exactly
    2 taps, the icon's cell is drawn from the seed (not always the first), and the sizes travel in the task file
    through the documented command."""
    from cua_kit.envs.synth import layout

    tasks = synth_tasks(2, 30, "eval", apps=1, settings=1)
    assert tasks[0].id == "synth-L2-100000-apps1-settings1" and tasks[0].params["apps"] == 1

    async def oracle_steps(task) -> tuple[int, float]:
        env, steps = SynthEnv(screen_size=(180, 320)), 0
        await env.reset(task)
        while not (await env.step(await env.oracle_action())).done:
            steps += 1
        return steps + 1, await env.evaluate()

    assert {asyncio.run(oracle_steps(t)) for t in tasks} == {(2, 1.0)}
    icons = {layout(make_scenario(2, t.params["seed"], apps=1, settings=1), 180, 320)["home"][0].box for t in tasks}
    assert len(icons) > 10  # scattered over the grid
    printed = subprocess.run([sys.executable, "-m", "cua_kit.envs.synth", "--level", "2", "--train", "0", "--eval",
                              "30", "--apps", "1", "--settings", "1"], check=True, capture_output=True, text=True)
    assert [json.loads(line) for line in printed.stdout.splitlines()] == [t.to_dict() for t in tasks]


def test_bad_sizes_are_refused_with_the_range():
    with pytest.raises(ValueError, match="apps must be an integer in 1..16, got 0"):
        synth_tasks(2, 1, apps=0)
    with pytest.raises(ValueError, match="not a size of a level-0 task"):
        synth_tasks(0, 1, settings=2)
    task = synth_tasks(2, 1)[0]
    bad = task.__class__(id="x", env="synth", params={"level": 2, "seed": 1, "settings": 99})
    with pytest.raises(ValueError, match="task 'x': settings must be an integer in 1..12"):
        asyncio.run(SynthEnv().reset(bad))
    cli = subprocess.run([sys.executable, "-m", "cua_kit.envs.synth", "--apps", "2"], capture_output=True, text=True)
    assert cli.returncode == 2 and "--apps/--settings need --level 2" in cli.stderr


def test_bad_input_fails_with_a_clear_message():
    env = SynthEnv()
    with pytest.raises(ValueError, match="params.level"):
        asyncio.run(env.reset(synth_tasks(0, 1)[0].__class__(id="x", env="synth", params={"level": 9, "seed": 1})))
    with pytest.raises(RuntimeError, match="reset"):
        asyncio.run(SynthEnv().step(Action("wait", duration=1)))
    with pytest.raises(ValueError, match="at least"):
        SynthEnv(screen_size=(50, 50))


@pytest.mark.parametrize("size", [(360, 640), (640, 360), (160, 240), (1080, 1920)])
def test_widgets_are_on_screen_and_never_overlap(size):
    from cua_kit.envs.synth import layout

    for level in LEVELS:
        for seed in range(20):
            for widgets in layout(make_scenario(level, seed), *size).values():
                for i, a in enumerate(widgets):
                    assert 0 <= a.box[0] < a.box[2] <= size[0] and 0 <= a.box[1] < a.box[3] <= size[1]
                    for b in widgets[i + 1:]:
                        overlap = a.box[0] < b.box[2] and b.box[0] < a.box[2] and a.box[1] < b.box[3] and b.box[1] < a.box[3]
                        assert not overlap, (level, seed, a, b)
