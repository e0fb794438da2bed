"""The Gradio dashboard, driven in Debian's headless Chromium (Playwright) against a real tiny training run:
Replay shows the screenshot, the group table equals the DB, Launch starts and stops a real CPU run and shows
config errors, an exposed host without auth refuses to start, and reads never fail while a writer writes."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from app import data
from app.dashboard import TOKEN_ENV, check_access, serve
from cua_kit import launch
from cua_kit.cli import main as cli_main
from cua_kit.trace import TraceWriter, queries
from tests.test_launch import QUICKSTART, TINY, run_status, wait_for

UI_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """A runs folder holding one finished real training run (tiny Qwen3-VL, synth env, 2 steps, CPU) with its
    held-out evals before and after (their traces are sub-runs, newer than the run)."""
    runs = tmp_path_factory.mktemp("runs")
    started = launch.launch_run(QUICKSTART, [*TINY, "trainer.max_steps=2", "trial_name=tiny", "trainer.eval_episodes=2",
                                             "trainer.eval_sampled=false"], runs)
    try:
        wait_for(lambda: not launch.pid_alive(started.pid), 300, "the tiny training run to finish")
    finally:
        launch.stop_run(started.run_dir, grace_s=5)
    log = (Path(started.run_dir) / "train.log").read_text()[-3000:]
    assert run_status(Path(started.run_dir)) == "finished", log
    return runs


@pytest.fixture(scope="module")
def url(runs_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = serve(runs_dir, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser(chromium_path):
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture
def page(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#runs-table")
    yield page
    context.close()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_opens_on_the_training_run_not_on_its_eval(page, runs_dir):
    """The eval traces (quickstart/tiny/eval/before, .../after) are the newest runs; the dashboard opened on one."""
    evals = [r["name"] for r in launch.list_runs(runs_dir) if r["eval_of"] == "quickstart/tiny"]
    assert sorted(evals) == ["quickstart/tiny/eval/after", "quickstart/tiny/eval/before"]
    expect(page.locator("#run-pick input")).to_have_value("quickstart/tiny")
    open_tab(page, "Launch")
    expect(page.locator("#launch-run input")).to_have_value("quickstart/tiny")


def test_replay_shows_the_screenshot_and_steps_through_turns(page):
    open_tab(page, "Replay")
    image = page.locator("#replay-image img").first
    expect(image).to_be_visible()
    wait_for(lambda: image.evaluate("i => i.complete && i.naturalWidth") > 0, 30, "the screenshot to decode")
    expect(page.locator("#turn-details")).to_contain_text("turn 0")
    expect(page.locator("#episode-summary")).to_contain_text("reward")
    first_src = image.get_attribute("src")
    page.locator("#next-turn").click()
    expect(page.locator("#turn-details")).to_contain_text("turn 1")
    expect(image).not_to_have_attribute("src", first_src)


def test_group_table_numbers_equal_the_db(page, runs_dir):
    db = queries.open_db(runs_dir / "quickstart" / "tiny")
    try:
        run_id = queries.run_info(db)["run_id"]
        last_step = queries.step_numbers(db, run_id)[-1]
        expected = {g["group_id"]: g for g in queries.groups_at_step(db, run_id, last_step)}
    finally:
        db.close()
    open_tab(page, "Groups")
    page.wait_for_selector("table.groups tr.group")
    shown = page.locator("table.groups tr.group").evaluate_all("""rows => rows.map(r => ({
        id: r.dataset.groupId, mean: r.querySelector('td.mean').textContent, std: r.querySelector('td.std').textContent,
        rewards: [...r.querySelectorAll('td.sample')].map(c => Number(c.dataset.reward)),
        advantages: [...r.querySelectorAll('td.sample')].map(c => Number(c.dataset.advantage))}))""")
    assert expected and {g["id"] for g in shown} == set(expected)
    for g in shown:
        row = expected[g["id"]]
        assert g["rewards"] == json.loads(row["rewards_json"])
        assert g["advantages"] == json.loads(row["advantages_json"])
        assert (g["mean"], g["std"]) == (f"{row['reward_mean']:.3f}", f"{row['reward_std']:.3f}")
    # clicking a sample opens it in Replay
    last_col = data.SAMPLE_HEADERS.index("episode_id")
    episode_id = page.locator(f'#samples-table [data-testid="cell-0-{last_col}"]').inner_text().strip()
    page.locator('#samples-table [data-testid="cell-0-0"]').click()
    expect(page.get_by_role("tab", name="Replay")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#episode-pick input")).to_have_value(data.episode_label(_episode(runs_dir, episode_id)))


def _episode(runs_dir: Path, episode_id: str) -> dict:
    db = queries.open_db(runs_dir / "quickstart" / "tiny")
    try:
        run_id = queries.run_info(db)["run_id"]
        return next(e for e in queries.episodes_of_run(db, run_id) if e["episode_id"] == episode_id)
    finally:
        db.close()


def _fill_overrides(page, text: str) -> None:
    box = page.locator("#launch-overrides").locator("textarea, input").first
    box.fill(text)


def test_unknown_override_is_refused_with_the_config_error(page, runs_dir):
    open_tab(page, "Launch")
    _fill_overrides(page, "trainer.max_stepz=3")
    page.locator("#launch-start").click()
    message = page.locator("#launch-message")
    expect(message).to_contain_text("config error")
    expect(message).to_contain_text("unknown config key 'trainer.max_stepz'")
    expect(message).to_contain_text("Did you mean 'trainer.max_steps'")
    assert not list(runs_dir.rglob("launch.json"))[1:]  # only the fixture's run was ever launched


def test_launch_two_cpu_ranks_from_the_ui_then_stop_every_process(page, runs_dir):
    """Launch with the layout fsdp:d2 starts one real distributed run (torchrun, 2 gloo ranks writing one run
    folder); Stop ends every process it started."""
    run_dir = runs_dir / "quickstart" / "ui"
    open_tab(page, "Launch")
    page.locator("#launch-allocation").locator("textarea, input").first.fill("fsdp:d2")
    _fill_overrides(page, " ".join([*TINY, "trainer.max_steps=500", "trial_name=ui", "saver.freq_steps=0"]))
    page.locator("#launch-start").click()
    try:
        expect(page.locator("#launch-message")).to_contain_text("started quickstart/ui")
        launched = launch.read_launch(run_dir)
        assert "torch.distributed.run" in launched["argv"] and "--nproc-per-node" in launched["argv"]
        wait_for(lambda: run_status(run_dir) == "running", 180, "the trainer to record status running")
        wait_for(lambda: "Step 1/500" in (run_dir / "train.log").read_text(), 180, "a first step on 2 ranks")
        started = launch._run_processes(launched["pgid"], {launched["pid"]})
        assert len(started) >= 3  # torchrun and its two workers (each in a session of its own)
        expect(page.locator("#launch-status")).to_contain_text("running", timeout=20_000)  # timer refresh
        page.locator("#launch-stop").click()
        expect(page.locator("#launch-message")).to_contain_text("stopped (SIGTERM)", timeout=90_000)
    finally:  # whatever this test launched is stopped, even when an assertion failed first
        for found in runs_dir.glob("*/*/launch.json"):
            launch.stop_run(found.parent, grace_s=5)
    assert not any(launch.pid_alive(p) for p in started)  # every process it started is gone
    assert run_status(run_dir) == "stopped"
    log = (run_dir / "train.log").read_text()
    assert "Run stopped" in log and "checkpoint-" in log  # rank 0 checkpointed on the way out
    assert len(list(run_dir.glob("checkpoints/checkpoint-*/rng-rank1.pt"))) == 1  # ...with rank 1's part
    expect(page.locator("#launch-status")).to_contain_text("stopped", timeout=20_000)


def test_exposed_host_without_auth_refuses_to_start(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit, match="refusing to serve on 0.0.0.0 without authentication"):
        cli_main(["dashboard", "--host", "0.0.0.0", "--runs-dir", "/nonexistent"])
    assert check_access("0.0.0.0", "alice:pw") == [("alice", "pw")]
    with pytest.raises(SystemExit, match="user:password"):
        check_access("0.0.0.0", "alice")
    token_check = check_access("0.0.0.0", None, {TOKEN_ENV: "s3cret"})
    assert token_check("anyone", "s3cret") and not token_check("anyone", "guess")
    assert check_access("127.0.0.1", None, {}) is None


def test_replay_paths_are_confined_to_the_runs_dir(runs_dir, tmp_path):
    run_dir = runs_dir / "quickstart" / "tiny"
    with pytest.raises(data.ReplayPathError):
        data.screenshot_file(runs_dir, run_dir, "../../../../etc/passwd")
    with pytest.raises(data.ReplayPathError):
        data.screenshot_file(runs_dir, run_dir, "/etc/passwd")
    (run_dir / "escape.png").symlink_to(tmp_path)
    with pytest.raises(data.ReplayPathError):
        data.screenshot_file(runs_dir, run_dir, "escape.png")


def test_stays_responsive_while_a_writer_writes(page, runs_dir):
    """A live run commits a step every few ms; the Runs tab keeps refreshing and never hits a lock."""
    run_dir = runs_dir / "live" / "t0"
    run_dir.mkdir(parents=True)
    writer = TraceWriter(run_dir / "trace.db", "live-t0")
    writer.start_run("live", "t0", {"model": {"name": "tiny"}}, pid=os.getpid())
    writer.flush()  # the runs row is committed before the first refresh (the writer commits on its own thread)
    stop = threading.Event()

    def write() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            writer.add_step({"step": step, "reward_mean": step % 5 / 4, "success_rate": 0.5, "n_groups": 1,
                             "episodes_per_hour": 100.0, "time": time.time()})
            writer.add_turn({"episode_id": f"e{step}", "turn_idx": 0, "completion_text": "x" * 2000})
            writer.flush()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        seen_steps = []
        for _ in range(5):
            page.locator("#refresh").click()
            row = page.locator("#runs-table [role=row]", has_text="live/t0").first
            expect(row).to_be_visible()
            seen_steps.append(int(row.locator("[role=gridcell]").nth(2).inner_text()))
            for run in launch.list_runs(runs_dir):  # the same reads, from this thread, must not fail either
                data.run_steps(run)
        assert seen_steps[-1] > seen_steps[0]  # it really was live
        assert "locked" not in page.content()
    finally:
        stop.set()
        thread.join()
        writer.finish_run("finished")
        writer.close()


def test_curves_show_the_rollout_trainer_logprob_gap(tmp_path):
    """The gap a separate generation engine (vLLM) leaves between its log-probs and the trainer's is a curve of its
    own; it lives in the steps rows' extra_json, and the panel shows exactly those values."""
    run_dir = tmp_path / "runs" / "gap" / "t0"
    run_dir.mkdir(parents=True)
    with TraceWriter(run_dir / "trace.db", "gap-t0") as writer:
        writer.start_run("gap", "t0", {})
        for step, gap in [(1, 0.02), (2, 0.03), (3, 0.025)]:
            writer.add_step({"step": step, "reward_mean": 0.5, "n_groups": 1, "time": time.time(),
                             "extra_json": {"logprob_gap_abs": gap}})
        writer.finish_run("finished")
    fig = data.curves_figure(launch.list_runs(tmp_path / "runs"))
    panel = [title for _, title in data.CURVES].index("rollout vs trainer log-prob gap")
    trace = fig.data[panel]
    assert list(trace.x) == [1, 2, 3] and list(trace.y) == [0.02, 0.03, 0.025]
