"""GboxEnv through the official gbox-sdk over real HTTP, against the local FakeGboxServer (a cloud fake).

Covers: the oracle solves every shipped task (judged by the task's shell validator), wrong policies fail,
actions under a 429/5xx storm never run twice, creation retries through 5xx, sweep, missing key.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from cua_kit.actions import Action
from cua_kit.envs import EnvError, load_tasks, make_env
from cua_kit.envs.gbox import GboxEnv, make_client, sweep_boxes
from tests.fakes.gbox_server import FakeGboxServer

TASKS = Path(__file__).resolve().parents[1] / "data" / "gbox_tasks.yaml"
MAX_ORACLE_STEPS = 8


@pytest.fixture
def fake(fake_gbox: FakeGboxServer) -> FakeGboxServer:
    return fake_gbox  # conftest.py starts it


def fast_env(**options: object) -> GboxEnv:
    """A gbox env with short backoff so retry tests stay fast."""
    return make_env("gbox", backoff_s=0.01, **options)  # type: ignore[return-value]


async def run_oracle(env: GboxEnv, task) -> tuple[float, int]:
    await env.reset(task)
    for steps in range(1, MAX_ORACLE_STEPS + 1):
        result = await env.step(await env.oracle_action())
        if result.done:
            return await env.evaluate(), steps
    return await env.evaluate(), MAX_ORACLE_STEPS


def test_task_file_has_train_and_eval_splits() -> None:
    tasks = load_tasks(TASKS, env="gbox")
    assert len(tasks) >= 20
    assert load_tasks(TASKS, split="train") and load_tasks(TASKS, split="eval")
    assert len({t.id for t in tasks}) == len(tasks)


def test_oracle_solves_every_shipped_task(fake: FakeGboxServer) -> None:
    tasks = load_tasks(TASKS, env="gbox")

    async def main() -> list[tuple[str, float, int]]:
        env = fast_env()
        try:
            return [(t.id, *(await run_oracle(env, t))) for t in tasks]
        finally:
            await env.close()

    results = asyncio.run(main())
    assert [r for r in results if r[1] != 1.0] == []
    assert all(steps >= 2 for _, _, steps in results)  # every task needs at least one real action
    assert fake.live_boxes() == []  # close() terminated the last box, reset() the others
    assert sum(r["endpoint"] == "create" for r in fake.requests) == len(tasks)


def test_finishing_at_once_fails_every_task(fake: FakeGboxServer) -> None:
    """The validators are not trivially true: the start state of every task fails its own check."""

    async def main() -> list[float]:
        env = fast_env(pool_boxes=True)
        rewards = []
        try:
            for task in load_tasks(TASKS, env="gbox"):
                await env.reset(task)
                assert (await env.step(Action("finish", status="success"))).done
                rewards.append(await env.evaluate())
        finally:
            await env.close()
        return rewards

    assert asyncio.run(main()) == [0.0] * len(load_tasks(TASKS))
    assert sum(r["endpoint"] == "create" for r in fake.requests) == 1  # the pool reused one box


def test_random_taps_rarely_succeed(fake: FakeGboxServer) -> None:
    tasks = [t for t in load_tasks(TASKS) if t.id.startswith(("note-", "message-", "toggle-"))]
    rng = random.Random(0)

    async def main() -> float:
        env = fast_env(pool_boxes=True)
        total = 0.0
        try:
            for task in tasks:
                obs = await env.reset(task)
                for _ in range(4):
                    w, h = obs.size
                    tap = Action("click", x=rng.randrange(w), y=rng.randrange(h))
                    obs = (await env.step(tap)).observation
                total += await env.evaluate()
        finally:
            await env.close()
        return total

    assert asyncio.run(main()) < len(tasks) / 4


def test_scaled_screenshots_map_to_display_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Screenshots at half the display size: actions in screenshot pixels still hit their targets."""
    with FakeGboxServer(api_key="k", screenshot_scale=0.5, display=(720, 1280)) as server:
        monkeypatch.setenv("GBOX_API_KEY", "k")
        monkeypatch.setenv("GBOX_CLIENT_BASE_URL", server.base_url)
        task = next(t for t in load_tasks(TASKS) if t.id == "toggle-wi-fi-off")

        async def main() -> tuple[tuple[int, int], float]:
            env = fast_env()
            try:
                obs = await env.reset(task)
                reward, _ = await run_oracle(env, task)
                return obs.size, reward
            finally:
                await env.close()

        size, reward = asyncio.run(main())
    assert size == (360, 640)
    assert reward == 1.0
    clicks = [a["body"] for a in server.executed_actions if a["action"] == "click"]
    assert clicks and clicks[-1]["x"] > 360  # the switch sits right of the 360 px screenshot: display pixels


def test_boxes_carry_labels_and_expiry(fake: FakeGboxServer) -> None:
    task = load_tasks(TASKS)[0]

    async def main() -> None:
        env = fast_env(run_id="run42", expires_in="10m")
        try:
            await env.reset(task)
            box = fake.boxes[env.box_id]
            assert box.labels == {"cua-kit": "1", "run": "run42", "task": task.id}
            assert 590 <= (box.expires_at - box.created_at).total_seconds() <= 610
        finally:
            await env.close()

    asyncio.run(main())


def test_action_storm_never_runs_an_action_twice(fake: FakeGboxServer) -> None:
    """429/423 are refused before running: retried. 500/503/408 may have run: never retried -> EnvError."""
    task = next(t for t in load_tasks(TASKS) if t.id == "note-buy-milk")

    async def main() -> None:
        env = fast_env()
        try:
            await env.reset(task)
            fake.inject("action", 429, times=2)
            fake.inject("action", 423, times=1)
            await env.step(await env.oracle_action())  # home -> Notes icon, after 3 refusals
            fake.inject("click", 503, execute=True)  # runs the tap, then fails: outcome unknown to us
            with pytest.raises(EnvError, match="503"):
                await env.step(await env.oracle_action())
            fake.inject("type", 500)
            with pytest.raises(EnvError, match="500"):
                await env.step(await env.oracle_action())
            assert (await env.oracle_action()).kind == "type"  # nothing was typed: state unchanged
        finally:
            await env.close()

    asyncio.run(main())
    action_requests = [r for r in fake.requests if r["endpoint"] in ("click", "type")]
    assert [r["status"] for r in action_requests] == [429, 429, 423, 200, 503, 500]
    assert [a["action"] for a in fake.executed_actions] == ["click", "click"]  # one per accepted request
    assert all(r["retry_count"] == "0" for r in action_requests)  # the SDK itself never resent one


def test_creation_and_reads_retry_through_5xx(fake: FakeGboxServer) -> None:
    task = next(t for t in load_tasks(TASKS) if t.id == "open-clock")
    fake.inject("create", 503, times=2)
    fake.inject("create", 408, times=1)
    fake.inject("screenshot", 500, times=2)
    fake.inject("commands", 502, times=1, delay_s=0.05)

    async def main() -> float:
        env = fast_env()
        try:
            reward, _ = await run_oracle(env, task)
            return reward
        finally:
            await env.close()

    assert asyncio.run(main()) == 1.0
    creates = [r["status"] for r in fake.requests if r["endpoint"] == "create"]
    assert creates == [503, 503, 408, 200]


def test_creation_gives_up_with_env_error(fake: FakeGboxServer) -> None:
    fake.inject("create", 500, times=10)

    async def main() -> None:
        env = make_env("gbox", backoff_s=0.01, max_attempts=3)
        try:
            with pytest.raises(EnvError, match="create box failed after 3 attempts"):
                await env.reset(load_tasks(TASKS)[0])
        finally:
            await env.close()

    asyncio.run(main())
    assert fake.live_boxes() == []


def test_sweep_terminates_only_labelled_running_boxes(fake: FakeGboxServer) -> None:
    ours = [fake.add_box({"cua-kit": "1", "run": f"r{i}"}) for i in range(55)]  # more than one page
    theirs = fake.add_box({"team": "other"})

    async def main() -> tuple[list[str], list[str]]:
        listed = await sweep_boxes(dry_run=True)
        assert len(fake.live_boxes()) == 56  # dry run terminated nothing
        return listed, await sweep_boxes()

    listed, swept = asyncio.run(main())
    assert sorted(listed) == sorted(ours) == sorted(swept)
    assert [b.id for b in fake.live_boxes()] == [theirs]
    with pytest.raises(ValueError, match="at least one label"):
        asyncio.run(sweep_boxes(labels={}))


def test_missing_api_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GBOX_API_KEY", raising=False)
    with pytest.raises(EnvError, match="GBOX_API_KEY"):
        make_env("gbox")
    with pytest.raises(EnvError, match="GBOX_API_KEY"):
        make_client()


def test_wrong_key_is_an_env_error(fake: FakeGboxServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GBOX_API_KEY", "not-the-key")

    async def main() -> None:
        env = fast_env()
        try:
            with pytest.raises(EnvError, match="401"):
                await env.reset(load_tasks(TASKS)[0])
        finally:
            await env.close()

    asyncio.run(main())


def test_bad_validator_and_linux_are_clear_errors(fake: FakeGboxServer) -> None:
    from cua_kit.envs.base import Task

    async def main() -> None:
        env = fast_env()
        try:
            with pytest.raises(ValueError, match="validator"):
                await env.reset(Task(id="t", env="gbox", params={"validator": [{"cmd": "true"}]}))
        finally:
            await env.close()

    asyncio.run(main())
    with pytest.raises(ValueError, match="android"):
        make_env("gbox", box_type="linux")
