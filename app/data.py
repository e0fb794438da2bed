"""What the dashboard shows, as plain data: run tables, curve figures, group cards and replay frames.

No Gradio here and no SQL: every read goes through `cua_kit.trace.queries`, so the same functions serve
notebooks and tests. Replay frames (screenshot + drawn action) are rendered once and kept as PNG files in
a cache folder, so stepping through an episode only serves files.
"""

from __future__ import annotations

import functools
import hashlib
import html
import json
import math
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from PIL import Image
from plotly.subplots import make_subplots

from cua_kit import launch
from cua_kit.actions import Action, InvalidAction
from cua_kit.draw import draw_action
from cua_kit.trace import queries

# Plain symbols, not emoji: headless/minimal systems often lack an emoji font.
STATUS_BADGES = {"running": "● running", "starting": "○ starting", "finished": "✓ finished",
                 "failed": "✗ failed", "stopped": "■ stopped"}
# (steps column, panel title); the last three say *why* a run may not learn (no signal, or a generation engine
# whose log-probs drift from the trainer's: mean |behaviour - trainer| on fresh tokens).
CURVES = [("reward_mean", "reward (mean)"), ("success_rate", "success rate"), ("pg_loss", "PG loss"),
          ("kl", "KL to reference"), ("lr", "learning rate"), ("staleness_mean", "staleness (mean)"),
          ("episodes_per_hour", "episodes / hour"), ("zero_variance_frac", "zero-variance groups (frac)"),
          ("logprob_gap_abs", "rollout vs trainer log-prob gap")]
GRID_COLS = 3
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


# ----------------------------------------------------------------------------- runs
def run_steps(run: dict[str, Any]) -> list[dict[str, Any]]:
    if not run.get("db_path"):
        return []
    db = queries.open_db(run["db_path"])
    try:
        return queries.steps(db, run["run_id"])
    finally:
        db.close()


def learning_trend(steps: list[dict[str, Any]]) -> str:
    """'0.10 → 0.45 ▲': mean reward of the first vs the last quarter of the steps (why: one glance says 'learns')."""
    rewards = [s["reward_mean"] for s in steps if s.get("reward_mean") is not None]
    if len(rewards) < 2:
        return "—"
    k = max(1, len(rewards) // 4)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    arrow = "▲" if last > first + 1e-9 else ("▼" if last < first - 1e-9 else "▬")
    return f"{first:.2f} → {last:.2f} {arrow}"


def _config_summary(run: dict[str, Any]) -> str:
    try:
        cfg = json.loads(run.get("config_json") or "{}")
    except json.JSONDecodeError:
        return "?"
    model = cfg.get("model", {}).get("name", "?")
    env = cfg.get("env", {}).get("name", "?")
    n = cfg.get("rollout", {}).get("n_samples", "?")
    lr = cfg.get("trainer", {}).get("learning_rate", "?")
    return f"{model} · {env} · G={n} · lr={lr}"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def runs_table(runs: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per run for the Runs tab (see RUNS_HEADERS)."""
    table = []
    for run in runs:
        steps = run_steps(run)
        last = steps[-1] if steps else {}
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["started_at"])) if run.get("started_at") else "—"
        table.append([run["name"], STATUS_BADGES.get(run["effective_status"], run["effective_status"]),
                      last.get("step", 0), _fmt(last.get("success_rate")), learning_trend(steps),
                      _fmt(last.get("episodes_per_hour"), 0), _config_summary(run), started, run.get("message") or ""])
    return table


# "note": why a run failed, or why no step has come for a while (the trainer's watchdog line, runs.message)
RUNS_HEADERS = ["run", "status", "step", "success rate", "reward first → last", "episodes/h", "config", "started",
                "note"]


# ----------------------------------------------------------------------------- curves
def _curve_value(step: dict[str, Any], column: str) -> float | None:
    if column == "zero_variance_frac":
        n = step.get("n_groups")
        return step["n_zero_variance"] / n if n and step.get("n_zero_variance") is not None else None
    if column not in step:  # measured per step but kept in extra_json (e.g. logprob_gap_abs)
        return json.loads(step.get("extra_json") or "{}").get(column)
    return step.get(column)


def curves_figure(runs: list[dict[str, Any]]) -> go.Figure:
    """A grid of training curves against step; each run is one colour across all panels."""
    rows = -(-len(CURVES) // GRID_COLS)
    fig = make_subplots(rows=rows, cols=GRID_COLS, subplot_titles=[title for _, title in CURVES],
                        horizontal_spacing=0.06, vertical_spacing=0.16)
    for i, run in enumerate(runs):
        steps = run_steps(run)
        colour = PALETTE[i % len(PALETTE)]
        for j, (column, _) in enumerate(CURVES):
            points = [(s["step"], _curve_value(s, column)) for s in steps]
            points = [(x, y) for x, y in points if y is not None]
            fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                     name=run["name"], legendgroup=run["name"], showlegend=j == 0,
                                     line={"color": colour, "width": 2}, marker={"size": 4}),
                          row=j // GRID_COLS + 1, col=j % GRID_COLS + 1)
    fig.update_layout(height=280 * rows, margin={"l": 40, "r": 20, "t": 50, "b": 40}, template="plotly_white",
                      legend={"orientation": "h", "y": -0.12})
    fig.update_xaxes(title_text="step", title_font={"size": 10})
    return fig


# ----------------------------------------------------------------------------- groups
def _reward_colour(reward: float | None) -> str:
    """Red (0) to green (1): success is green whatever the advantage; grey for no reward (an env error)."""
    if reward is None:
        return "#eeeeee"
    r = min(1.0, max(0.0, reward))
    return f"hsl({int(120 * r)}, 70%, 85%)"


def _advantage_colour(advantage: float | None) -> str:
    """Blue for positive (pushed up), red for negative (pushed down), white for 0."""
    if advantage is None:
        return "#eeeeee"
    strength = min(1.0, abs(advantage) / 1.5)
    hue = 215 if advantage > 0 else 0
    return f"hsl({hue}, 75%, {int(97 - 27 * strength)}%)"


def load_groups(db_path: str, run_id: str, step: int | None) -> list[dict[str, Any]]:
    """The groups of a step, each with its episodes (sample order)."""
    db = queries.open_db(db_path)
    try:
        groups = queries.groups_at_step(db, run_id, step)
        for g in groups:
            g["episodes"] = queries.episodes_of_group(db, g["group_id"])
        return groups
    finally:
        db.close()


def _sample_cell(i: int, reward: float | None, advantage: float | None, episode: dict[str, Any] | None) -> str:
    mark = "✓" if episode and episode.get("success") else "✗"
    status = html.escape(episode.get("status") or "") if episode else ""
    return (f'<td class="sample" data-reward="{reward!r}" data-advantage="{advantage!r}">'
            f'<div class="r" style="background:{_reward_colour(reward)}">#{i} {mark} r={_fmt(reward)}</div>'
            f'<div class="a" style="background:{_advantage_colour(advantage)}">A={_fmt(advantage)}</div>'
            f'<div class="st">{status}</div></td>')


def groups_html(groups: list[dict[str, Any]]) -> str:
    """One table row per group: task, mean, std, zero-variance flag, then each sample colour-coded."""
    if not groups:
        return "<p>No groups at this step.</p>"
    rows = []
    for g in groups:
        rewards = json.loads(g.get("rewards_json") or "[]")
        advantages = json.loads(g.get("advantages_json") or "[]") or [None] * len(rewards)
        episodes = {e["sample_idx"]: e for e in g.get("episodes", [])}
        cells = "".join(_sample_cell(i, r, a, episodes.get(i)) for i, (r, a) in enumerate(zip(rewards, advantages)))
        flag = '<span class="zv">zero variance: no signal</span>' if g.get("zero_variance") else ""
        rows.append(f'<tr class="group" data-group-id="{html.escape(g["group_id"])}">'
                    f'<td class="task">{html.escape(g.get("task_id") or "?")}<br>{flag}</td>'
                    f'<td class="mean">{_fmt(g.get("reward_mean"), 3)}</td><td class="std">{_fmt(g.get("reward_std"), 3)}'
                    f"</td>{cells}</tr>")
    n_zero = sum(1 for g in groups if g.get("zero_variance"))
    header = (f"<p><b>{len(groups)} groups</b>, {n_zero} with zero variance. Reward: red 0 → green 1; "
              "advantage: blue pushed up, red pushed down.</p>")
    return header + ('<table class="groups"><tr><th>task</th><th>mean</th><th>std</th><th colspan="99">samples'
                     "</th></tr>" + "".join(rows) + "</table>")


SAMPLE_HEADERS = ["task", "sample", "reward", "advantage", "success", "status", "turns", "episode_id"]


def samples_table(groups: list[dict[str, Any]]) -> list[list[Any]]:
    """One clickable row per episode of the groups (click -> Replay)."""
    return [[g.get("task_id"), e["sample_idx"], e.get("reward"), e.get("advantage"),
             "✓" if e.get("success") else "✗", e.get("status"), e.get("n_turns"), e["episode_id"]]
            for g in groups for e in g.get("episodes", [])]


# ----------------------------------------------------------------------------- replay
class ReplayPathError(ValueError):
    """A screenshot path that points outside the runs folder."""


def screenshot_file(runs_dir: Path, run_dir: Path, relative: str) -> Path:
    """The screenshot's absolute path; refuses anything that resolves outside runs_dir ('..', absolute, links)
    or can't be a path at all (a NUL byte)."""
    try:
        path = (run_dir / relative).resolve()
    except (OSError, ValueError) as exc:
        raise ReplayPathError(f"screenshot path {relative!r} is not a usable path ({exc}); not shown") from None
    if not path.is_relative_to(runs_dir.resolve()):
        raise ReplayPathError(f"screenshot path {relative!r} is outside the runs folder; not shown")
    return path


def parsed_action(turn: dict[str, Any]) -> Action | InvalidAction | None:
    if turn.get("parse_error") and not turn.get("action_json"):
        return InvalidAction(str(turn["parse_error"]))
    try:
        data = json.loads(turn.get("action_json") or "null")
    except json.JSONDecodeError:
        return InvalidAction(f"unreadable action_json: {turn.get('action_json')!r}")
    if not data:
        return None
    if "invalid" in data:
        return InvalidAction(str(data["invalid"]))
    try:
        return Action.from_dict(data)
    except TypeError as exc:
        return InvalidAction(f"unknown action fields: {exc}")


class FrameCache:
    """Rendered replay frames as PNG files, keyed by (screenshot, mtime, action, label); LRU by count."""

    def __init__(self, folder: Path | None = None, max_frames: int = 512) -> None:
        self.folder = Path(folder or tempfile.mkdtemp(prefix="cua-kit-frames-"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self._render = functools.lru_cache(maxsize=max_frames)(self._render_uncached)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="frame-prefetch")

    def frame(self, screenshot: Path, action_json: str | None, parse_error: str | None, label: str) -> str:
        stamp = screenshot.stat().st_mtime_ns if screenshot.exists() else 0
        return self._render(str(screenshot), stamp, action_json, parse_error, label)

    def prefetch(self, jobs: list[tuple[Path, str | None, str | None, str]]) -> None:
        """Render an episode's frames in the background so prev/next only serves files."""
        for job in jobs:
            self._pool.submit(self.frame, *job)

    def _render_uncached(self, screenshot: str, stamp: int, action_json: str | None, parse_error: str | None,
                         label: str) -> str:
        key = hashlib.sha1(f"{screenshot}|{stamp}|{action_json}|{parse_error}|{label}".encode()).hexdigest()[:20]
        out = self.folder / f"{key}.png"
        if not out.exists():
            with Image.open(screenshot) as image:
                drawn = draw_action(image, parsed_action({"action_json": action_json, "parse_error": parse_error}), label)
            # a unique temp name per writer: the prefetcher and a click may render the same frame at once
            tmp = out.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp.png")
            drawn.save(tmp, format="PNG", compress_level=1)  # fast encode; files are temporary
            tmp.replace(out)
        return str(out)


def episode_choices(db_path: str, run_id: str) -> list[tuple[str, str]]:
    """(label, episode_id) for the Replay dropdown, newest first."""
    db = queries.open_db(db_path)
    try:
        episodes = queries.episodes_of_run(db, run_id)
    finally:
        db.close()
    return [(episode_label(e), e["episode_id"]) for e in episodes]


def episode_label(e: dict[str, Any]) -> str:
    step = f"step {e['step']}" if e.get("step") is not None else "unconsumed"
    mark = "✓" if e.get("success") else "✗"
    return f"{step} · {e.get('task_id')} #{e.get('sample_idx')} · {mark} r={_fmt(e.get('reward'))} · {e['episode_id']}"


def load_episode(db_path: str, episode_id: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    db = queries.open_db(db_path)
    try:
        return queries.episode(db, episode_id), queries.turns(db, episode_id)
    finally:
        db.close()


def episode_summary(e: dict[str, Any]) -> str:
    """Markdown headline: did it succeed, and if not, how it ended (why an episode failed, at a glance)."""
    verdict = ("<span style='color:#2e7d32'>✓ **success**</span>" if e.get("success")
               else "<span style='color:#c62828'>✗ **failed**</span>")
    parts = [verdict, f"reward **{_fmt(e.get('reward'))}**", f"advantage {_fmt(e.get('advantage'))}",
             f"ended: `{e.get('status')}`", f"{e.get('n_turns')} turns", f"task `{e.get('task_id')}`",
             f"versions {e.get('min_version')}–{e.get('max_version')}"]
    text = " · ".join(parts)
    if e.get("error"):
        text += f"\n\n**env error:** {e['error']}"
    return text


def turn_details(turn: dict[str, Any]) -> str:
    """Markdown for one turn: parsed action or parse error, version/staleness, tokens and latency."""
    action = parsed_action(turn)
    if turn.get("parse_error") or isinstance(action, InvalidAction):
        reason = turn.get("parse_error") or action.reason
        head = f"**parse error:** <span style='color:#c62828'>{html.escape(str(reason))}</span>"
    elif action is None:
        head = "**action:** none"
    else:
        head = f"**action:** `{json.dumps(action.to_dict())}`"
    return (f"{head}\n\n**turn** {turn['turn_idx']} · **version** {_fmt(turn.get('version'))} · **staleness** "
            f"{_fmt(turn.get('staleness'))} · tokens {_fmt(turn.get('n_prompt_tokens'))}+"
            f"{_fmt(turn.get('n_completion_tokens'))} · latency {_fmt(turn.get('latency_s'))} s")


def run_by_name(runs_dir: str | Path, name: str | None) -> dict[str, Any] | None:
    for run in launch.list_runs(runs_dir):
        if run["name"] == name:
            return run
    return None
