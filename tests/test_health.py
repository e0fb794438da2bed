"""Fail fast, never hang (issue 18 §1): an exception inside an episode ends that episode as `error` and is traced;
systemic faults (a full disk, the same error over and over, an error outside any episode, no batch in time) make
`get_batch` raise RunFailure with the reason instead of replaying failing groups forever. The tiny Qwen3-VL on real
synth envs, as in test_controller; each fault is injected at the point where it happened in the issue's runs."""

from __future__ import annotations

import asyncio
import errno
import pytest

from cua_kit.actions import Action
from cua_kit.rollout import health as health_module
from cua_kit.rollout.controller import RolloutController
from cua_kit.rollout.health import RunFailure, RunHealth, wait_for_batch
from cua_kit.trace import queries
from cua_kit.trace.rows import write_group
from cua_kit.trace.store import TraceWriter
from tests.test_controller import (WAIT_S, loaded, make_controller, scripted_pool,  # noqa: F401 - fixture
                                   scripted_task, shutdown)


async def _first_batch_or_failure(c: RolloutController, timeout: float = WAIT_S) -> str:
    """The RunFailure message get_batch raises (a timeout here means the old behaviour: it hangs)."""
    await c.start()
    try:
        with pytest.raises(RunFailure) as failure:
            await asyncio.wait_for(c.get_batch(), timeout)
        return str(failure.value)
    finally:
        await shutdown(c)


def test_a_crash_inside_every_episode_stops_the_run_with_the_reason(loaded, monkeypatch, tmp_path):
    """A parser that raises (any bug on the episode's path): each episode ends as `error`, is traced with its
    error, and after max_errors_in_a_row the run stops, instead of 'group failed' tracebacks forever."""
    c = make_controller(loaded, [scripted_task("t", "by_env")], scripted_pool(2), n_samples=2, batch_size=1,
                        max_concurrent_rollouts=2, max_errors_in_a_row=6)
    trace = TraceWriter(tmp_path / "trace.db", "run")
    c.on_group = lambda g: write_group(trace, g, "synth")

    def crash(*_):
        raise KeyError("parser crash 17")

    monkeypatch.setattr(c.agent, "parse", crash)
    reason = asyncio.run(_first_batch_or_failure(c))
    assert "6 episodes in a row ended with the same error" in reason and "KeyError" in reason
    assert c.stats.groups_env_failed == 3 and c.stats.tasks_skipped == 1  # retried twice, then given up
    trace.close()
    db = queries.open_db(tmp_path)
    statuses = {(r["status"], r["reward"], r["error"]) for r in queries.rows(db, "select * from episodes")}
    db.close()
    assert statuses == {("error", None, "KeyError: 'parser crash 17'")}


def test_a_full_screenshot_disk_stops_the_run_at_the_first_episode(loaded, monkeypatch, tmp_path):
    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cua_kit.rollout.episode._save_png", full)
    c = make_controller(loaded, [scripted_task("t", "by_env")], scripted_pool(4), n_samples=2, batch_size=1,
                        max_concurrent_rollouts=2)
    c.run_dir = tmp_path
    reason = asyncio.run(_first_batch_or_failure(c))
    assert "can't be written (No space left on device)" in reason and "recover.mode=auto" in reason
    assert c.stats.episodes <= 2  # no group admitted after the fault


def test_a_lone_surrogate_that_slips_past_the_parser_ends_only_its_episode(loaded, monkeypatch):
    """The issue's trigger: typing "\\ud800" crashed the next turn's tokenizer. The parser now sanitises it; were
    another path to let it through, the episode ends as `error` and the group is retried, the run goes on."""
    c = make_controller(loaded, [scripted_task("t", "by_env")], scripted_pool(2), n_samples=2, batch_size=1,
                        max_concurrent_rollouts=2, max_turns=2)
    real_parse, calls = c.agent.parse, []

    def once_a_surrogate(text, size, prompt):
        calls.append(1)
        return Action("type", text="\ud800") if len(calls) == 1 else real_parse(text, size, prompt)

    monkeypatch.setattr(c.agent, "parse", once_a_surrogate)

    async def main():
        await c.start()
        try:
            return await asyncio.wait_for(c.get_batch(), WAIT_S)
        finally:
            await shutdown(c)

    (group,) = asyncio.run(main())
    assert len(group.valid) == 2 and c.stats.env_errors == 1 and c.health.failure is None


def test_an_error_outside_any_episode_stops_the_run_at_once(loaded):
    """The trace writer failing (its disk is full) used to log 'group failed' and admit the next group forever."""
    c = make_controller(loaded, [scripted_task("t", "by_env")], scripted_pool(2), n_samples=2, batch_size=1,
                        max_concurrent_rollouts=2)

    def broken_trace(group):
        raise RuntimeError("trace writer failed: database or disk is full")

    c.on_group = broken_trace
    reason = asyncio.run(_first_batch_or_failure(c))
    assert "rollout controller error" in reason and "disk is full" in reason
    assert c.group_seq == 1  # nothing admitted after it


def test_no_batch_in_time_fails_and_says_why_every_interval(loaded, monkeypatch):
    """Every group filtered (no reward spread): a waiting line says so, then the stall timeout stops the run."""
    monkeypatch.setattr(health_module, "WAITING_LINE_EVERY_S", 0.5)
    c = make_controller(loaded, [scripted_task("flat", 0.0)], scripted_pool(2), max_staleness=0, batch_size=1,
                        max_concurrent_rollouts=2, filter_zero_variance=True)
    lines: list[str] = []

    async def main() -> str:
        await c.start()
        try:
            with pytest.raises(RunFailure) as failure:
                await wait_for_batch(c.get_batch(), asyncio.Event(), c.health, 3.0, c.waiting_line, lines.append)
            return str(failure.value)
        finally:
            await shutdown(c)

    reason = asyncio.run(main())
    assert "no batch in 3 s (trainer.stall_timeout_s=3)" in reason and "scored" in reason
    assert len(lines) >= 2 and "filtered (zero variance)" in lines[-1] and "0 of 1 ready" in lines[-1]


def test_a_stop_request_wins_over_waiting():
    async def main():
        stop = asyncio.Event()
        never = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.1, stop.set)
        return await wait_for_batch(never, stop, RunHealth(), 60.0, str, print)

    assert asyncio.run(main()) is None


def test_health_counts_the_same_error_only_in_a_row():
    class Ep:
        def __init__(self, reward=None, status="env_error", error="box 12 died after 3.5 s"):
            self.reward, self.status, self.error, self.exception = reward, status, error, None

    h = RunHealth(max_errors_in_a_row=3)
    for ep in [Ep(), Ep(error="box 99 died after 1.2 s"), Ep(1.0), Ep(), Ep(status="policy_error"), Ep(), Ep()]:
        h.record(ep)
    assert h.failure is None  # numbers differ (same error); a score and a different error break the row
    h.record(Ep(error="box 7 died after 0.1 s"))
    assert h.failure and "3 episodes in a row" in h.failure and "env_error: box" in h.failure



def test_the_eval_progress_bar_shows_on_a_terminal_that_reports_no_size():
    """`make demo`'s 200-episode 'before' eval takes minutes before the first step. On a pty with no size (under
    `script`, some CI consoles) tqdm read 0 columns and -1 rows and drew nothing: minutes of silence."""
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()  # a new pty reports 0x0
    code = ("from cua_kit.evaluate import _progress_bar\n"
            "bar = _progress_bar(3, 'eval before', True)\nbar.update(2)\nbar.refresh()\nbar.close()\n")
    proc = subprocess.run([sys.executable, "-c", code], stderr=slave, stdout=subprocess.DEVNULL, timeout=120,
                          env={**os.environ, "COLUMNS": "", "LINES": ""})
    os.close(slave)
    seen = b""
    try:
        while chunk := os.read(master, 4096):
            seen += chunk
    except OSError:  # the pty is closed once the child has gone and everything was read
        pass
    os.close(master)
    assert proc.returncode == 0 and b"eval before:  67%" in seen and b"2/3" in seen


def test_a_run_with_no_batch_says_why_then_fails_in_the_trace_and_the_dashboard(tmp_path, monkeypatch, capsys):
    """The whole loop: every group filtered (a random policy never succeeds), so no step comes. The log prints a
    waiting line, the trace and the dashboard's Runs table say why, and the stall timeout ends the run as failed."""
    from pathlib import Path

    from app import data
    from cua_kit import launch
    from cua_kit.config import load_config
    from cua_kit.train import train

    monkeypatch.setattr(health_module, "WAITING_LINE_EVERY_S", 1.0)
    quickstart = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    cfg = load_config(quickstart, [f"output_dir={tmp_path}", "model.adapter_path=", "trainer.eval_episodes=0",
                                   "rollout.n_samples=2", "trainer.batch_size=1", "rollout.max_turns=1",
                                   "rollout.max_new_tokens=8", "rollout.max_concurrent_rollouts=2",
                                   "rollout.filter_zero_variance=true", "trainer.stall_timeout_s=4",
                                   "logging.tensorboard=false"], environ={})
    summary = train(cfg)
    assert summary["status"] == "failed" and summary["reason"].startswith("no batch in 4 s")
    assert "waiting for step 1: no batch for" in capsys.readouterr().out
    [run] = launch.list_runs(tmp_path)
    assert run["status"] == "failed" and run["message"] == summary["reason"]
    [row] = data.runs_table([run])
    assert row[data.RUNS_HEADERS.index("note")] == summary["reason"]


def test_a_weight_sync_that_fails_after_an_update_saves_that_step(tmp_path, monkeypatch):
    """A backend that cannot take step 2's weights (a vLLM server that died and could not restart raises from
    `update_weights`) stops the run as failed, with step 2 recorded and checkpointed: the update is not lost."""
    import sqlite3
    from pathlib import Path

    from cua_kit.config import load_config
    from cua_kit.inference.hf import HFPolicy
    from cua_kit.train import train

    real = HFPolicy.update_weights

    async def failing_at_version_2(self, version, adapter_dir=None):
        if version == 2:
            raise RuntimeError("vLLM server could not restart: address already in use")
        await real(self, version, adapter_dir)

    monkeypatch.setattr(HFPolicy, "update_weights", failing_at_version_2)
    quickstart = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    cfg = load_config(quickstart, [f"output_dir={tmp_path}", "model.adapter_path=", "trainer.eval_episodes=0",
                                   "rollout.n_samples=2", "trainer.batch_size=1", "rollout.max_turns=1",
                                   "rollout.max_new_tokens=8", "rollout.max_concurrent_rollouts=2",
                                   "trainer.max_steps=4", "saver.freq_steps=0", "logging.tensorboard=false"],
                      environ={})
    summary = train(cfg)
    assert summary["status"] == "failed" and summary["step"] == 2
    assert summary["reason"] == ("step 2's weights could not reach the generation backend: RuntimeError: "
                                 "vLLM server could not restart: address already in use")
    run = Path(summary["run_dir"])
    assert (run / "checkpoints" / "checkpoint-2" / "adapter").is_dir()
    with sqlite3.connect(run / "trace.db") as db:
        assert [s for (s,) in db.execute("select step from steps order by step")] == [1, 2]
        assert sorted(s for (s,) in db.execute("select distinct step from groups where step is not null")) == [1, 2]


def test_a_cancelled_wait_on_the_trainers_thread_returns_only_when_the_thread_is_done():
    """`train.in_thread`: a loop task cancelled mid-update (Ctrl-C in a notebook, shutdown) must not leave the update
    running on weights that generation then resumes on."""
    import threading
    import time

    from cua_kit.train import in_thread

    finished = threading.Event()

    def update() -> None:
        time.sleep(0.5)
        finished.set()

    async def cancel_mid_update() -> bool:
        task = asyncio.create_task(in_thread(update))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return finished.is_set()

    assert asyncio.run(cancel_mid_update())


def test_an_eval_whose_episodes_all_started_still_stops_on_a_full_disk(tmp_path, monkeypatch):
    """Fewer eval episodes than rollout slots: every one has started before the first fault is recorded, and the
    eval still fails with the reason instead of reporting a success rate over nothing."""
    from pathlib import Path

    from cua_kit.build import make_agent, make_model, make_policy, make_pool
    from cua_kit.config import load_config
    from cua_kit.evaluate import run_eval

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cua_kit.rollout.episode._save_png", full)
    quickstart = Path(__file__).parents[1] / "configs" / "quickstart.yaml"
    cfg = load_config(quickstart, [f"output_dir={tmp_path}", "model.adapter_path=", "rollout.max_turns=1",
                                   "rollout.max_new_tokens=8", "rollout.max_concurrent_rollouts=8"], environ={})
    loaded = make_model(cfg)

    async def go() -> None:
        policy, pool = make_policy(cfg, loaded), make_pool(cfg)
        try:
            await run_eval(cfg, policy, pool, make_agent(cfg, loaded.processor), 3, tmp_path, "before")
        finally:
            await policy.close()
            await pool.close()

    with pytest.raises(RunFailure, match="eval before: .*No space left on device"):
        asyncio.run(go())
