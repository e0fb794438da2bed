"""MiniWoB++ in real headless Chromium: observations, actions, oracles, seeding, crashes and leaks.

Every test drives Debian's Chromium (chromium-headless-shell by default) through Playwright (a missing
binary fails via `chromium_path`).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from cua_kit.actions import Action
from cua_kit.envs import make_env
from cua_kit.envs.base import EnvError, Task, load_tasks
from cua_kit.envs.miniwob import (FULL_CHROMIUM_PATH, HEADLESS_SHELL_PATH, INSTALL_LINE, ORACLES, MiniWobBrowser,
                                  MiniWobEnv, descendant_pids, playwright_key, process_group_pids, resolve_chromium)

pytestmark = pytest.mark.browser
TASKS_YAML = Path(__file__).resolve().parents[1] / "data" / "miniwob_tasks.yaml"


def task(name: str, seed: int = 0) -> Task:
    return Task(id=f"{name}-{seed}", env="miniwob", params={"task": name, "seed": seed})


def chromium_pids_of_this_test() -> list[int]:
    """Chromium processes under this Python process (the Playwright driver's children), of the binary
    the tests run (the headless shell by default) or either Debian binary."""
    real = {os.path.realpath(p) for p in (resolve_chromium(), HEADLESS_SHELL_PATH, FULL_CHROMIUM_PATH)}
    found = []
    for pid in descendant_pids(os.getpid()):
        try:
            if os.path.realpath(f"/proc/{pid}/exe") in real:
                found.append(pid)
        except OSError:
            pass
    return found


async def run_oracle_episode(env: MiniWobEnv, t: Task, max_steps: int = 12) -> float:
    await env.reset(t)
    for _ in range(max_steps):
        if (await env.step(await env.oracle_action())).done:
            break
    return await env.evaluate()


def test_reset_returns_task_area_screenshot_and_instruction(chromium_path):
    async def main():
        env = make_env("miniwob", chromium_path=chromium_path)
        try:
            obs = await env.reset(task("click-button", 1))
            assert obs.size == (320, 420)
            assert obs.instruction.startswith('Click on the "') and obs.instruction.endswith('" button.')
            assert obs.screenshot.getpixel((310, 90)) == (255, 255, 0)  # the yellow #query band
        finally:
            await env.close()

    asyncio.run(main())


def test_same_seed_gives_identical_screenshot_bytes(chromium_path):
    async def main():
        a, b = MiniWobEnv(chromium_path=chromium_path), MiniWobEnv(chromium_path=chromium_path)
        try:
            for name in ["click-button", "click-checkboxes", "choose-list", "click-dialog"]:
                await a.reset(task(name, 7))
                await b.reset(task("click-link", 3))  # other work in between must not matter
                await b.reset(task(name, 7))
                assert a.last_screenshot == b.last_screenshot, name
                await b.reset(task(name, 8))
                assert a.last_screenshot != b.last_screenshot, f"{name}: seeds 7 and 8 look the same"
                await b.step(Action(kind="click", x=160, y=250))  # leave some state behind
                await b.reset(task(name, 7))  # same page, no reload
                assert a.last_screenshot == b.last_screenshot, f"{name} (page reused)"
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_oracles_solve_their_tasks(chromium_path):
    """>= 95% success for every task with an oracle, 10 seeds each, on 4 envs sharing one browser."""
    assert len(ORACLES) >= 10
    jobs = [task(name, seed) for name in sorted(ORACLES) for seed in range(1000, 1010)]

    async def worker(queue: asyncio.Queue, results: dict[str, list[float]]):
        env = MiniWobEnv(chromium_path=chromium_path)
        try:
            while not queue.empty():
                t = queue.get_nowait()
                results.setdefault(t.params["task"], []).append(await run_oracle_episode(env, t))
        finally:
            await env.close()

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        for t in jobs:
            queue.put_nowait(t)
        results: dict[str, list[float]] = {}
        await asyncio.gather(*(worker(queue, results) for _ in range(4)))
        return results

    results = asyncio.run(main())
    rates = {name: sum(r > 0 for r in rs) / len(rs) for name, rs in results.items()}
    assert set(rates) == set(ORACLES)
    assert not {n: r for n, r in rates.items() if r < 0.95}, rates


def test_random_clicks_score_far_below_the_oracle(chromium_path):
    names = ["click-button", "click-checkboxes", "click-option", "enter-text", "login-user", "click-tab"]
    rng = random.Random(0)

    async def main():
        env = MiniWobEnv(chromium_path=chromium_path)
        try:
            scores = []
            for name in names:
                for seed in range(5):
                    await env.reset(task(name, seed))
                    for _ in range(4):
                        click = Action(kind="click", x=rng.randrange(320), y=rng.randrange(420))
                        if (await env.step(click)).done:
                            break
                    scores.append(await env.evaluate() > 0)
            return sum(scores) / len(scores)
        finally:
            await env.close()

    assert asyncio.run(main()) < 0.5  # the oracles score >= 0.95 on these tasks


def test_actions_land_where_the_pixels_say(chromium_path):
    """Pixel (x, y) of the 2x screenshot -> CSS (x/2, y/2); every mouse action reaches the page."""
    async def main():
        env = MiniWobEnv(chromium_path=chromium_path)
        try:
            await env.reset(task("click-scroll-list", 0))  # a page with no handler that ends on a click
            await env._page.evaluate("""() => { window.seen = [];
                for (const t of ['mousedown', 'mouseup', 'dblclick', 'wheel', 'keydown'])
                  document.addEventListener(t, e => seen.push([t, e.clientX, e.clientY, e.key || '']), true); }""")
            await env.step(Action(kind="double_click", x=100, y=300))
            await env.step(Action(kind="long_press", x=40, y=240, duration=0.05))
            await env.step(Action(kind="swipe", x=20, y=220, x2=200, y2=380))
            await env.step(Action(kind="scroll", x=60, y=260, direction="down"))
            result = await env.step(Action(kind="key", text="ctrl+a"))
            seen = await env._page.evaluate("seen")
            return seen, result
        finally:
            await env.close()

    seen, result = asyncio.run(main())
    assert ["dblclick", 50, 150, ""] in seen
    assert ["mousedown", 20, 120, ""] in seen and ["mouseup", 20, 120, ""] in seen  # long press
    assert ["mousedown", 10, 110, ""] in seen and ["mouseup", 100, 190, ""] in seen  # drag
    assert ["wheel", 30, 130, ""] in seen
    assert [e[3] for e in seen if e[0] == "keydown"] == ["Control", "a"]
    assert result.observation.size == (320, 420) and "invalid" not in result.info


def test_typing_keys_and_policy_mistakes(chromium_path):
    async def main():
        env = MiniWobEnv(chromium_path=chromium_path)
        try:
            obs = await env.reset(task("enter-text", 2))
            want = obs.instruction.split('"')[1]
            oracle_click = await env.oracle_action()  # the oracle's first move: click the field
            await env.step(oracle_click)
            await env.step(Action(kind="type", text="wrong"))
            await env.step(Action(kind="key", text="ctrl+a"))
            await env.step(Action(kind="key", text="Backspace"))
            await env.step(Action(kind="type", text=want))
            bad_key = await env.step(Action(kind="key", text="back"))
            off_screen = await env.step(Action(kind="click", x=400, y=10))
            value = await env._page.evaluate("document.querySelector('#tt').value")
            submit = await env.oracle_action()
            done = await env.step(submit)
            return value, want, bad_key.info, off_screen.info, done, await env.evaluate()
        finally:
            await env.close()

    value, want, bad_key, off_screen, done, reward = asyncio.run(main())
    assert value == want
    assert "phone button" in bad_key["invalid"] and "outside" in off_screen["invalid"]
    assert done.done and reward == 1.0


def test_finish_ends_the_episode_unscored(chromium_path):
    async def main():
        env = MiniWobEnv(chromium_path=chromium_path)
        try:
            await env.reset(task("click-button", 0))
            result = await env.step(Action(kind="finish", status="success"))
            again = await env.step(Action(kind="click", x=10, y=250))
            return result.done, again.info, await env.evaluate()
        finally:
            await env.close()

    done, again_info, reward = asyncio.run(main())
    assert done and "ignored" in again_info and reward == 0.0


def test_key_names_map_to_playwright():
    assert playwright_key("enter") == "Enter"
    assert playwright_key("ctrl+a") == "Control+a"
    assert playwright_key("Down") == "ArrowDown"
    assert playwright_key("ArrowDown") == "ArrowDown"
    assert playwright_key("f5") == "F5"
    with pytest.raises(ValueError, match="phone button"):
        playwright_key("back")


def test_bad_input_says_what_to_do(chromium_path, tmp_path):
    with pytest.raises(EnvError, match=INSTALL_LINE):
        MiniWobEnv(chromium_path=str(tmp_path / "no-chromium"))

    async def main():
        env = MiniWobEnv(chromium_path=chromium_path)
        try:
            with pytest.raises(ValueError, match="not a MiniWoB"):
                await env.reset(task("click-buton"))
        finally:
            await env.close()

    asyncio.run(main())


def test_default_binary_is_the_headless_shell_then_full_chromium(monkeypatch, tmp_path):
    import cua_kit.envs.miniwob as miniwob

    monkeypatch.delenv("CUA_KIT_CHROMIUM", raising=False)
    shell, full = tmp_path / "chromium-headless-shell", tmp_path / "chromium"
    monkeypatch.setattr(miniwob, "HEADLESS_SHELL_PATH", str(shell))
    monkeypatch.setattr(miniwob, "FULL_CHROMIUM_PATH", str(full))
    with pytest.raises(EnvError, match=INSTALL_LINE):  # neither: the error names the shell's apt line
        resolve_chromium()
    full.write_text("")
    assert resolve_chromium() == str(full)  # only the full browser: it is used
    shell.write_text("")
    assert resolve_chromium() == str(shell)  # both: the (2x cheaper) headless shell
    monkeypatch.setenv("CUA_KIT_CHROMIUM", str(full))
    assert resolve_chromium() == str(full)  # the override still wins


def test_task_file_has_train_and_eval_splits_with_distinct_seeds():
    train, evals = load_tasks(TASKS_YAML, split="train"), load_tasks(TASKS_YAML, split="eval")
    assert {t.env for t in train + evals} == {"miniwob"}
    assert len({t.id for t in train + evals}) == len(train) + len(evals)
    seeds = lambda ts: {(t.params["task"], t.params["seed"]) for t in ts}  # noqa: E731
    assert not seeds(train) & seeds(evals)
    assert set(ORACLES) <= {t.params["task"] for t in evals}


def test_envs_share_one_browser_and_leave_no_process(chromium_path):
    async def main():
        a, b = MiniWobEnv(chromium_path=chromium_path), MiniWobEnv(chromium_path=chromium_path)
        await asyncio.gather(a.reset(task("click-test")), b.reset(task("click-test", 1)))
        assert a.browser is b.browser and a.browser.pid is not None
        browser, group = a.browser, process_group_pids(a.browser.pid)
        assert browser.pid in group and len(group) >= 3
        await a.close()
        assert browser.alive  # b still uses it
        await b.close()
        await a.close()  # twice is fine
        return browser, group

    browser, group = asyncio.run(main())
    assert browser.closed and not process_group_pids(browser.pid)
    assert not [p for p in group if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
    assert not chromium_pids_of_this_test()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_killed_browser_raises_env_error_and_a_new_env_works(chromium_path):
    async def main():
        env = MiniWobEnv(chromium_path=chromium_path)
        await env.reset(task("click-button", 3))
        dead = env.browser
        os.kill(dead.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EnvError):
            await env.step(await env.oracle_action())
        elapsed = time.monotonic() - start
        fresh = MiniWobEnv(chromium_path=chromium_path)
        reward = await run_oracle_episode(fresh, task("click-button", 3))
        assert fresh.browser is not dead
        await env.close()
        await fresh.close()
        return dead, elapsed, reward

    dead, elapsed, reward = asyncio.run(main())
    assert elapsed < 5.0 and reward == 1.0
    time.sleep(0.2)  # SIGKILLed children are reaped asynchronously
    assert not process_group_pids(dead.pid)
    assert not chromium_pids_of_this_test()


def test_env_pool_replaces_an_env_whose_browser_was_killed(chromium_path):
    from cua_kit.envs.pool import EnvPool

    async def main():
        pool = EnvPool(lambda: MiniWobEnv(chromium_path=chromium_path), size=2, step_timeout=10,
                       reset_timeout=20)
        try:
            async with pool.lease() as env:
                await env.reset(task("click-link", 1))
                os.kill(env.inner.browser.pid, signal.SIGKILL)
                with pytest.raises(EnvError):
                    await env.step(Action(kind="click", x=10, y=300))
            rewards = []
            for seed in range(2):
                async with pool.lease() as env:
                    await env.reset(task("click-link", seed))
                    for _ in range(5):
                        if (await env.step(await env.oracle_action())).done:
                            break
                    rewards.append(await env.evaluate())
            return pool.stats, rewards
        finally:
            await pool.close()

    stats, rewards = asyncio.run(main())
    assert stats.restarts == 1 and rewards == [1.0, 1.0]
    assert not chromium_pids_of_this_test()


def test_explicit_browser_is_closed_by_its_owner(chromium_path):
    async def main():
        browser = MiniWobBrowser(chromium_path)
        envs = [MiniWobEnv(browser=browser) for _ in range(3)]
        await asyncio.gather(*(e.reset(task("click-test", i)) for i, e in enumerate(envs)))
        for e in envs:
            await e.close()
        still_alive = browser.alive
        await browser.close()
        return still_alive, browser

    still_alive, browser = asyncio.run(main())
    assert still_alive and browser.closed and not chromium_pids_of_this_test()
