"""The chaos suite (issue 18): faults and bad input thrown at the real kit, with figures printed at the end of the
run (cases tried, failures, time: tests/conftest.py's chaos table; docs/reliability.md keeps one run's table).

- parser fuzz: thousands of hostile completions; the parser never raises, and the action grammar only ever
  allows what the parser accepts;
- config fuzz: random keys, values, override tokens and YAML; a Config that passes its rules, or one ConfigError;
- SIGKILL and SIGTERM at random points of a real training run, then resume: every step traced once, the same
  tasks, and the final LoRA weights equal to an uninterrupted run's within WEIGHT_TOLERANCE;
- a full and a read-only screenshot folder (a small tmpfs in a user namespace where the machine allows, else a
  simulated ENOSPC / EROFS): the run stops with status failed and the reason, a checkpoint of its last step;
- Chromium killed again and again mid-episode: env errors, a fresh browser, batches keep coming, nothing leaks;
- GBox 429/5xx storms through the fake server (tests/fakes/gbox_server.py): no action run twice, every box
  terminated, the run finishes;
- dashboard launch validation and path confinement, fuzzed: nothing lands outside the runs folder.
The random seed of the timing-based cases is printed in their figure (set CUA_KIT_CHAOS_SEED to replay one).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cua_kit.actions import (KEYS_MAX, SECONDS_MAX, TEXT_MAX_CHARS, Action, InvalidAction, format_action,
                             parse_action)
from cua_kit.config import Config, ConfigError, _all_keys, load_config, parse_yaml, validate
from tests.fakes.gbox_server import ACTIONS

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SEED = int(os.environ.get("CUA_KIT_CHAOS_SEED") or time.time_ns() % 100_000)
WEIGHT_TOLERANCE = 1e-5  # max |w_resumed - w_uninterrupted| over every LoRA weight (CPU float32)
PHONE, DESKTOP = (360, 640), (1920, 1080)
def _examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))


# =============================================================================================== parser fuzz
def _escape(ch: str) -> str:
    return "\\u%04x" % ord(ch)


_json_string = st.lists(st.one_of(
    st.text(max_size=8).map(lambda t: json.dumps(t)[1:-1]),
    st.sampled_from(["\\ud800", "\\udfff", "\\ud83d\\ude00", "\\u0000", "\\n", "\\\"", "\\\\"]),
    st.integers(0xD800, 0xDFFF).map(lambda c: "\\u%04x" % c),
), max_size=12).map(lambda parts: '"' + "".join(parts) + '"')
_huge = st.integers(10**18, 10**300) | st.integers(-(10**300), -(10**18))
_number = st.one_of(st.integers(-2000, 2000), _huge, st.floats().map(repr), st.sampled_from(
    ["NaN", "Infinity", "-Infinity", "1e999", "-0.0", "1e-400", "99999", "100000", "100.0", "100.5"])).map(str)
_value = st.recursive(st.one_of(_number, _json_string, st.sampled_from(["true", "false", "null"])),
                      lambda inner: st.lists(inner, max_size=4).map(lambda v: "[" + ", ".join(v) + "]"), max_leaves=6)
_ACTIONS = ["click", "long_press", "swipe", "type", "key", "system_button", "wait", "answer", "terminate",
            "left_click", "double_click", "left_click_drag", "scroll", "hscroll", "mouse_move", "fly"]
_KEYS = ["coordinate", "coordinate2", "start_coordinate", "time", "text", "keys", "button", "status", "pixels"]


@st.composite
def _completions(draw) -> str:
    """A hostile completion: noise around a tool call whose values are huge, non-finite, escaped or mistyped."""
    tool = draw(st.sampled_from(["mobile_use", "computer_use", "x"]))
    args = {"action": json.dumps(draw(st.sampled_from(_ACTIONS)))}
    for key in draw(st.lists(st.sampled_from(_KEYS), max_size=4, unique=True)):
        args[key] = draw(_value | st.lists(_number, min_size=2, max_size=2).map(lambda v: f"[{v[0]}, {v[1]}]"))
    body = ", ".join(f'"{k}": {v}' for k, v in args.items())
    call = f'{{"name": "{tool}", "arguments": {{{body}}}}}'
    return draw(st.text(max_size=20)) + draw(st.sampled_from(["<tool_call>\n", "", "<tool_call>"])) + call + \
        draw(st.sampled_from(["\n</tool_call>", "", "}}}", "\n</tool_call><|im_end|>"]))


def _check_action(action: Action, size: tuple[int, int], tool: str, mode: str) -> None:
    for x, side in [(action.x, size[0]), (action.x2, size[0]), (action.y, size[1]), (action.y2, size[1])]:
        assert x is None or 0 <= x < side
    assert action.duration is None or 0 <= action.duration <= SECONDS_MAX
    for text in (action.text, action.answer):
        if text is not None:
            text.encode("utf-8")  # valid Unicode: the next turn's tokenizer takes it
            assert len(text) <= TEXT_MAX_CHARS * KEYS_MAX + KEYS_MAX
    assert parse_action(format_action(action, size, mode, tool), size, mode, tool) == action


def test_parser_fuzz_never_raises_and_every_action_is_bounded(chaos):
    chaos.name = "parser fuzz (completions)"
    chaos.note = "parse_action: never raised"

    @_examples(2500)
    @given(text=_completions(), tool=st.sampled_from(["mobile_use", "computer_use"]),
           mode=st.sampled_from(["relative", "absolute"]), desktop=st.booleans())
    def run(text, tool, mode, desktop):
        chaos.tried += 1
        size = DESKTOP if desktop else PHONE
        result = parse_action(text, size, mode, tool)
        if isinstance(result, Action):
            _check_action(result, size, tool, mode)
        else:
            assert isinstance(result, InvalidAction) and len(result.reason) < 400

    run()


@st.composite
def _grammar_shaped(draw) -> str:
    """Texts shaped like canonical calls, with number and string literals in every form JSON allows."""
    literal = st.one_of(st.integers(-5, 1200).map(str), st.integers(-5, 200_000).map(str), st.floats(-1, 1e18).map(repr),
                        st.sampled_from(["1e-05", "1E-5", "5e+00", "0.5e1", "007", "1e-400", "100.0", "99.999999999999999999"]))
    action = draw(st.sampled_from(["wait", "type", "scroll", "left_click", "key"]))
    if action == "wait":
        args = f'"time": {draw(literal)}'
    elif action == "type":
        args = f'"text": {draw(_json_string)}'
    elif action == "scroll":
        args = f'"pixels": {draw(literal)}'
    elif action == "key":
        args = '"keys": [' + ", ".join(draw(st.lists(_json_string, min_size=1, max_size=10))) + "]"
    else:
        args = f'"coordinate": [{draw(literal)}, {draw(literal)}]'
    return f'<tool_call>\n{{"name": "computer_use", "arguments": {{"action": "{action}", {args}}}}}\n</tool_call>'


def test_whatever_the_grammar_allows_the_parser_accepts(tiny_model_dir, chaos):
    """Constrained decoding can only write what the parser runs (and its canonical form is in the grammar). Relative
    coordinates: in absolute mode the grammar bounds pixels to 5 digits but can't know the screen, so a point off
    the screen is the parser's to refuse (an invalid action, never an error)."""
    chaos.name = "grammar vs parser fuzz"
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from cua_kit.inference.grammar import ActionGrammar

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    grammar = ActionGrammar(tokenizer, "computer_use", "relative", len(tokenizer))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def accepts(text: str) -> bool:  # every token, then <|im_end|>, accepted by the matcher decoding uses
        matcher = xgr.GrammarMatcher(grammar.compiled)
        ids = tokenizer.encode(text, add_special_tokens=False) + [end]
        return all(matcher.accept_token(t) for t in ids) and matcher.is_terminated()

    accepted = []

    @_examples(1500)
    @given(text=_grammar_shaped())
    def run(text):
        chaos.tried += 1
        if accepts(text):
            accepted.append(text)
            action = parse_action(text, DESKTOP, "relative", "computer_use")
            assert isinstance(action, Action), (text, action)
            assert accepts(format_action(action, DESKTOP, "relative", "computer_use"))

    run()
    chaos.note = f"{len(accepted)} texts the grammar allowed, all parsed"
    assert len(accepted) > 50  # the property was really exercised


# =============================================================================================== config fuzz
_KEYS_ALL = _all_keys()
_yamlish = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=12),
                     st.sampled_from(["../../x", "/abs/path", "a/b", "..", ".inf", "-.nan", "1e400", "synth", "miniwobb",
                                      "off", "[1, 2]", "{a: 1}", "&a [*a]", "\udc80"]))
_values = st.recursive(_yamlish, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                            max_size=3), max_leaves=5)


def _load_or_refuse(*args, **kwargs) -> Config | None:
    """load_config's whole contract: a Config that passes its own rules, or a one-line ConfigError."""
    try:
        cfg = load_config(*args, environ={}, **kwargs)
    except ConfigError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 2000
        return None
    validate(cfg)
    assert cfg.run_dir.parts[-2:] == (cfg.experiment_name, cfg.trial_name) and "/" not in cfg.trial_name
    return cfg


def test_config_fuzz_gives_a_valid_config_or_one_line(chaos, tmp_path):
    chaos.name = "config fuzz (keys, tokens, YAML)"
    refused = []

    @_examples(1500)
    @given(overrides=st.dictionaries(st.sampled_from(_KEYS_ALL) | st.text(max_size=12), _values, max_size=4),
           tokens=st.lists(st.sampled_from(_KEYS_ALL).map(lambda k: k + "=") | st.text(max_size=10), max_size=3)
           .map(lambda ts: [t + "1" if t.endswith("=") else t for t in ts]),
           yaml_text=st.text(alphabet="abcdrt:-[]{}&*!|>'\" \n0123456789.#", max_size=80))
    def run(overrides, tokens, yaml_text):
        chaos.tried += 3
        refused.append(_load_or_refuse(None, overrides) is None)
        refused.append(_load_or_refuse(None, tokens) is None)
        path = tmp_path / "c.yaml"
        path.write_text(yaml_text)
        refused.append(_load_or_refuse(path) is None)
        try:
            parse_yaml(yaml_text, "fuzz")
        except ConfigError:
            pass

    run()
    chaos.note = f"{sum(refused)} refused in one line, {len(refused) - sum(refused)} loaded and valid"


# ====================================================================== SIGKILL / SIGTERM at random points
# A tiny run whose groups have a reward spread (the format penalty on completions that run out of tokens), so the
# weights really move, and whose sampling is deterministic (one group at a time, its 4 turns in one generate call).
RESUME_RUN = ["model.adapter_path=", "trainer.eval_episodes=0", "rollout.max_staleness=0", "rollout.n_samples=4",
              "trainer.batch_size=1", "rollout.max_turns=1", "rollout.max_new_tokens=48", "rollout.format_penalty=1.0",
              "rollout.max_concurrent_rollouts=4", "rollout.max_batch=4", "rollout.batch_wait_ms=5000",
              "trainer.learning_rate=1e-3", "saver.freq_steps=1", "saver.keep_last=10", "logging.tensorboard=false",
              "logging.progress=false", "trainer.max_steps=10"]


def _train_argv(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cua_kit.cli", "train", str(QUICKSTART), f"output_dir={out}", *RESUME_RUN, *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def _rows(run_dir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{run_dir / 'trace.db'}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


def _lora(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 400) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


def _latest_step(run_dir: Path) -> int:
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*")]
    return max(steps, default=0)


def _interrupt(out: Path, run_dir: Path, rng: random.Random, sig: signal.Signals) -> dict:
    """Resume the run (or start it), wait until it has written 1 or 2 new checkpoints (up to checkpoint-8 of 10),
    wait a random 0-1 s more, and send `sig`."""
    target = _latest_step(run_dir) + rng.randint(1, 2)
    if target > 8:  # too late to interrupt this run (a fast machine): the last resume finishes it
        return {"running": False, "seconds": 0.0, "code": None, "log": ""}
    proc = subprocess.Popen(_train_argv(out, "recover.mode=auto"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_for(run_dir / "checkpoints" / f"checkpoint-{target}", proc), proc.communicate()[0][-3000:]
        time.sleep(rng.uniform(0, 1.0))
        running = proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(sig)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"running": running, "seconds": time.monotonic() - sent, "code": proc.returncode, "log": log}


@pytest.mark.slow
def test_sigkill_and_sigterm_at_random_points_then_resume(tmp_path, chaos):
    """SIGKILL after a random checkpoint, resume, SIGTERM after a later one, resume to the end: the steps table
    holds every step once, the same tasks as an uninterrupted run, and weights within WEIGHT_TOLERANCE of it."""
    chaos.name = "SIGKILL + SIGTERM, then resume"
    rng = random.Random(SEED)
    reference = tmp_path / "ref"
    subprocess.run(_train_argv(reference), check=True, env=_env(), capture_output=True, timeout=900)
    out = tmp_path / "chaos"
    run_dir = out / "quickstart" / "trial0"
    killed = _interrupt(out, run_dir, rng, signal.SIGKILL)
    termed = _interrupt(out, run_dir, rng, signal.SIGTERM)
    if termed["running"]:
        assert termed["code"] == 0, termed["log"][-3000:]  # a graceful stop: its checkpoint vouches for every step it traced
        assert _rows(run_dir, "select status from runs") == [("stopped",)]
        state = json.loads(sorted((run_dir / "checkpoints").glob("checkpoint-*"),
                                  key=lambda p: int(p.name.split("-")[1]))[-1].joinpath("state.json").read_text())
        assert state["step"] == _rows(run_dir, "select max(step) from steps")[0][0]
    final = subprocess.run(_train_argv(out, "recover.mode=auto"), env=_env(), capture_output=True, text=True,
                           timeout=900)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    chaos.tried = killed["running"] + termed["running"]  # signals that hit a running trainer
    assert [s for (s,) in _rows(run_dir, "select step from steps order by step")] == list(range(1, 11))
    tasks = "select step, task_id from groups where step is not null order by step"
    assert _rows(run_dir, tasks) == _rows(reference / "quickstart" / "trial0", tasks)
    # max_staleness 0: a resumed run generates with the resumed version from its first turn (it once started at 0)
    assert _rows(run_dir, "select distinct staleness from turns where staleness is not null") == [(0,)]
    final = "checkpoints/checkpoint-10"
    ours, theirs = _lora(run_dir / final), _lora(reference / "quickstart" / "trial0" / final)
    diff = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    moved = max(float(w.abs().max()) for k, w in theirs.items() if "lora_B" in k)
    chaos.note = (f"seed {SEED}: max |dw| {diff:.1e} (tolerance {WEIGHT_TOLERANCE:g}, lora_B moved to {moved:.1e}); "
                  f"SIGTERM stop {termed['seconds']:.1f} s")
    assert moved > 0  # the run trained: equal weights are not equal zeros
    assert diff <= WEIGHT_TOLERANCE


# ============================================================================ a full / read-only screens/
FAULT_RUN = ["model.adapter_path=", "trainer.eval_episodes=0", "rollout.n_samples=2", "trainer.batch_size=1",
             "rollout.max_turns=1", "rollout.max_new_tokens=12", "rollout.max_concurrent_rollouts=2",
             "saver.freq_steps=1000", "logging.tensorboard=false", "logging.progress=false", "trainer.max_steps=200"]


def _can_mount_tmpfs() -> bool:
    """A user namespace where this process may mount a tmpfs (most Linux machines; some containers forbid it)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run([unshare, "-Urm", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_screenshot_folder_that_cant_be_written_fails_the_run_with_the_reason(tmp_path, chaos, fault, monkeypatch):
    """A disk fault under screens/ used to fail every group forever with status running. Now the run stops at the
    first one: exit code 1, one line, status failed with the reason, a checkpoint of its last completed step."""
    chaos.name = f"screens/ {fault}"
    out = tmp_path / "out"
    run_dir = out / "quickstart" / "trial0"
    screens = run_dir / "screens"
    screens.mkdir(parents=True)
    argv = [sys.executable, "-m", "cua_kit.cli", "train", str(QUICKSTART), f"output_dir={out}", *FAULT_RUN]
    started = time.monotonic()
    if _can_mount_tmpfs():  # the real thing: a 48 kB tmpfs (a few screenshots fit), or a read-only one
        options = "size=48k" if fault == "full" else "ro,size=16k"
        script = f'mount -t tmpfs -o {options} tmpfs "$1" && shift && exec "$@"'
        proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", str(screens), *argv], env=_env(),
                              capture_output=True, text=True, timeout=600)
        code, last_line, how = proc.returncode, (proc.stdout.strip().splitlines() or [""])[-1], "tmpfs"
    else:  # simulated: the screenshot writer fails as the file system would
        code, last_line, how = _simulated_disk_fault(out, fault, monkeypatch), "", "simulated"
    chaos.tried = 1
    reason = {"full": "No space left on device", "read-only": "Read-only file system"}[fault]
    status, message = _rows(run_dir, "select status, message from runs")[0]
    assert status == "failed" and reason in message, (status, message)
    assert code == 1 and (how == "simulated" or (last_line.startswith("Run failed at step") and reason in last_line))
    steps = _rows(run_dir, "select max(step) from steps")[0][0] or 0
    assert steps == 0 or (run_dir / "checkpoints" / f"checkpoint-{steps}").exists()  # the last step is kept
    chaos.note = f"{how}: stopped after {time.monotonic() - started:.0f} s at step {steps}"


def _simulated_disk_fault(out: Path, fault: str, monkeypatch) -> int:
    """The same run in-process, its screenshot writer raising what a full / read-only file system raises after a
    few screenshots; returns the exit code `cua-kit train` gives."""
    import errno

    from cua_kit.cli import main

    number = {"full": errno.ENOSPC, "read-only": errno.EROFS}[fault]
    written = []

    def save_png(image, path):
        written.append(path)
        if fault == "read-only" or len(written) > 4:
            raise OSError(number, os.strerror(number), str(path))

    monkeypatch.setattr("cua_kit.rollout.episode._save_png", save_png)
    return main(["train", str(QUICKSTART), f"output_dir={out}", *FAULT_RUN])


# ================================================================== Chromium killed mid-episode, again and again
@pytest.mark.browser
def test_a_browser_killed_mid_episode_never_stops_training(tiny_model_dir, chromium_path, chaos):
    chaos.name = "Chromium killed mid-episode"
    from cua_kit.agent import Agent
    from cua_kit.config import LoraConfig, ModelConfig
    from cua_kit.envs import load_tasks, make_env
    from cua_kit.envs.miniwob import descendant_pids
    from cua_kit.envs.pool import EnvPool
    from cua_kit.inference.base import SamplingParams
    from cua_kit.inference.hf import HFPolicy
    from cua_kit.models.loader import load_model
    from cua_kit.rollout.controller import ControllerSettings, RolloutController, TaskSampler
    from cua_kit.rollout.episode import EpisodeSettings

    loaded = load_model(ModelConfig(name=str(tiny_model_dir), device="cpu"), LoraConfig(r=4, alpha=8))
    chromium = os.path.realpath(chromium_path)
    rng = random.Random(SEED)

    def browsers() -> list[int]:  # the browser's main processes (each leads its own process group)
        return [p for p in descendant_pids(os.getpid()) if _exe(p) == chromium and os.getpgid(p) == p]

    async def main() -> tuple[RolloutController, int, int]:
        tasks = load_tasks(ROOT / "data" / "miniwob_tasks.yaml", split="train")[:6]
        pool = EnvPool(lambda: make_env("miniwob"), 2, step_timeout=20, reset_timeout=60)
        agent = Agent(loaded.processor, "computer_use", "relative", 1, 61440, tool_description="compact")
        c = RolloutController(HFPolicy(loaded, max_batch=4), pool, agent, TaskSampler(tasks),
                              ControllerSettings(n_samples=2, batch_size=1, max_concurrent_rollouts=2, max_staleness=8),
                              EpisodeSettings(SamplingParams(1.0, 1.0, 0, 16), max_turns=3))
        await c.start()
        kills = batches = 0
        try:
            for _ in range(4):  # kill every browser at a random moment, then wait for the next batch
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                for pid in browsers():
                    os.killpg(pid, signal.SIGKILL)
                    kills += 1
                await asyncio.wait_for(c.get_batch(), 180)
                batches += 1
        finally:
            await c.stop()
            await c.policy.close()
            await pool.close()
        return c, kills, batches

    c, kills, batches = asyncio.run(main())
    time.sleep(0.5)  # killed browsers are reaped asynchronously
    chaos.tried = kills
    chaos.note = f"seed {SEED}: {kills} kills, {c.stats.env_errors} env errors, {batches} batches"
    assert batches == 4 and c.health.failure is None and kills >= 2 and c.stats.env_errors >= 1
    assert browsers() == []  # nothing leaked (a cancelled close used to keep the last browser running)


def _exe(pid: int) -> str:
    try:
        return os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return ""


# ============================================================================== GBox 429/5xx storms
STORM_EVERY = 6
def test_gbox_storms_never_run_an_action_twice_and_the_run_goes_on(fake_gbox, tmp_path, chaos):
    """A storm every STORM_EVERY action requests: 429s on actions (refused before running: retried), a 503 after
    an action ran (never retried: an env error), 5xx on creation and screenshots (retried). A real `cua-kit train`
    on the fake cloud."""
    chaos.name = "GBox 429/5xx storms (fake cloud)"
    from cua_kit.train import train

    stop = threading.Event()

    def actions() -> int:
        return sum(r["endpoint"] in ACTIONS for r in list(fake_gbox.requests))

    def storms() -> None:  # the next two actions refused (429), the third run and then failed (503)
        seen = -STORM_EVERY
        while not stop.wait(0.05):
            if actions() >= seen + STORM_EVERY:
                seen = actions()
                fake_gbox.inject("action", 429, times=2)
                fake_gbox.inject("action", 503, execute=True)
                fake_gbox.inject("create", 503)
                fake_gbox.inject("screenshot", 502)

    thread = threading.Thread(target=storms, daemon=True)
    thread.start()
    try:
        summary = train(load_config(QUICKSTART, [
            f"output_dir={tmp_path}", "env.name=gbox", "env.task_file=data/gbox_tasks.yaml", "env.task_filter=[]",
            "env.options={backoff_s: 0.01, expires_in: 5m}", "model.adapter_path=", "trainer.eval_episodes=0",
            "rollout.n_samples=2", "trainer.batch_size=1", "rollout.max_turns=3", "rollout.max_new_tokens=60",
            "rollout.max_concurrent_rollouts=4", "trainer.max_steps=4", "logging.tensorboard=false",
            "logging.progress=false"], environ={}))
    finally:
        stop.set()
        thread.join()
    requests = [r for r in fake_gbox.requests if r["endpoint"] in ACTIONS]
    ran = [r for r in requests if r["status"] == 200] + [r for r in requests if r["status"] == 503]
    chaos.tried = sum(r["status"] >= 400 for r in fake_gbox.requests)
    run_dir = Path(summary["run_dir"])
    env_errors = _rows(run_dir, "select count(*) from episodes where status = 'env_error'")[0][0]
    chaos.note = f"{len(requests)} action requests, {len(fake_gbox.executed_actions)} ran, {env_errors} env errors"
    assert summary["status"] == "finished" and summary["step"] == 4
    assert len(fake_gbox.executed_actions) == len(ran)  # each action ran once: none was sent again after running
    assert all(r["retry_count"] == "0" for r in requests)  # the SDK never resent one behind our back
    assert fake_gbox.live_boxes() == []  # every box terminated, failed episodes' too
    assert env_errors >= 1  # a 503 really ended an episode, and the run went on


# ================================================================ dashboard launch validation and confinement
_path_like = st.one_of(st.sampled_from(["..", "../..", "/", "/tmp", "a/b", "./x", "~", "x/..", "\\..\\..", "..%2F",
                                        "\x00", " ", "-", "a" * 101]),
                       st.text(alphabet="./\\~-_a0 ", min_size=1, max_size=12),
                       st.sampled_from(["trial0", "ok.1+2=3", "exp", "lr3e-5"]))


def test_launch_fuzz_never_lands_outside_the_runs_folder(tmp_path, chaos):
    chaos.name = "launch + replay path fuzz"
    from app import data
    from cua_kit import launch

    runs = tmp_path / "runs"
    outcomes = {"refused": 0, "planned": 0}

    @_examples(600)
    @given(experiment=_path_like, trial=_path_like, output=_path_like,
           extra=st.sampled_from(["trainer.max_steps=2", "--lora-r=8", "sft.output=../x", "oops", "launch.n_gpus=-1"]))
    def run(experiment, trial, output, extra):
        chaos.tried += 1
        overrides = [f"experiment_name={experiment}", f"trial_name={trial}", f"output_dir={output}", extra]
        try:
            plan = launch.plan_launch(QUICKSTART, overrides, runs)
        except (ConfigError, launch.LaunchError):
            outcomes["refused"] += 1
        else:
            outcomes["planned"] += 1
            assert plan.run_dir.is_relative_to(runs.resolve()) and plan.run_dir != runs.resolve()
        for relative in (f"{experiment}/../../../{trial}", f"/{output}", f"../../../{experiment}"):
            try:  # a trace's screenshot path: served only from inside the runs folder
                assert data.screenshot_file(runs, runs / "x" / "y", relative).is_relative_to(runs.resolve())
            except data.ReplayPathError:
                pass

    run()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # planning wrote nothing, anywhere
    chaos.note = f"{outcomes['refused']} refused, {outcomes['planned']} planned (all under the runs folder)"
    assert outcomes["planned"] > 0

