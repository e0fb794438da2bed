"""The cua-kit dashboard: a Gradio Blocks app over the runs folder (`cua-kit dashboard`).

Tabs: Runs (status of every run), Curves (training curves, several runs overlaid, live refresh), Groups
(per-step GRPO groups with colour-coded rewards/advantages; click a sample to replay it), Replay (step
through an episode's screenshots with the action drawn on them) and Launch (start/stop runs through
`cua_kit.launch`). All trace reads go through `cua_kit.trace.queries` (via app.data); the app has no SQL.

Safety: binds 127.0.0.1 by default; any other host needs --auth user:password or a token in the env var
CUA_KIT_DASHBOARD_TOKEN (`check_access`). Replay only opens files inside the runs folder.
"""

from __future__ import annotations

import hmac
import os
import shlex
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from app import data
from cua_kit import launch
from cua_kit.allocation import visible_gpus
from cua_kit.config import ConfigError

TOKEN_ENV = "CUA_KIT_DASHBOARD_TOKEN"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
REFRESH_S = 5.0
CSS = """
table.groups {border-collapse: collapse; font-size: 13px; width: auto}
table.groups td, table.groups th {border: 1px solid #ddd; padding: 3px 6px; vertical-align: top; text-align: left}
table.groups td.sample div {border-radius: 4px; padding: 1px 5px; margin: 1px 0; white-space: nowrap; color: #111}
table.groups td.sample div.st {font-size: 11px; color: #666}
table.groups span.zv {background: #fff3cd; color: #8a6d00; border-radius: 4px; padding: 0 4px; font-size: 11px}
#replay-image img {object-fit: contain}
"""


class AccessError(SystemExit):
    """The dashboard refuses to start (an exposed host without auth); the message says how to fix it."""


def check_access(host: str, auth: str | None, environ: dict[str, str] | None = None):
    """The `auth` argument for gradio's launch, or AccessError for an exposed host without credentials."""
    environ = dict(os.environ if environ is None else environ)
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise AccessError("--auth must be user:password (both non-empty)")
        return [(user, password)]
    token = environ.get(TOKEN_ENV)
    if token:  # any user name; the password must be the token
        return lambda _user, password: hmac.compare_digest(password.encode(), token.encode())
    if host not in LOOPBACK_HOSTS:
        raise AccessError(f"refusing to serve on {host} without authentication: anyone who can reach it could "
                          f"start processes. Pass --auth user:password or set {TOKEN_ENV}, or use --host 127.0.0.1.")
    return None


# ----------------------------------------------------------------------------- handlers
class Dashboard:
    """The callbacks, bound to one runs folder and one frame cache."""

    def __init__(self, runs_dir: str | Path) -> None:
        self.runs_dir = Path(runs_dir).resolve()
        self.frames = data.FrameCache()

    def run_names(self) -> list[str]:
        return [r["name"] for r in launch.list_runs(self.runs_dir)]

    def training_names(self) -> list[str]:
        """Runs that are not another run's held-out eval, newest first: what the dashboard opens on (an eval's
        trace is written after its run started, so it is newer, but it is a sub-run with no steps)."""
        return [r["name"] for r in launch.training_runs(launch.list_runs(self.runs_dir))]

    def runs_tab(self) -> list[list[Any]]:
        return data.runs_table(launch.list_runs(self.runs_dir))

    def curves(self, names: list[str] | None) -> Any:
        runs = [r for r in launch.list_runs(self.runs_dir) if r["name"] in (names or [])]
        return data.curves_figure(runs)

    def curves_if_live(self, names: list[str] | None) -> Any:
        """Timer tick: redraw only while one of the shown runs is live (keeps zoom otherwise)."""
        runs = [r for r in launch.list_runs(self.runs_dir) if r["name"] in (names or [])]
        if not any(r["effective_status"] in ("running", "starting") for r in runs):
            return gr.skip()
        return data.curves_figure(runs)

    def _run(self, name: str | None) -> dict[str, Any] | None:
        run = data.run_by_name(self.runs_dir, name)
        return run if run and run.get("db_path") else None

    # ---- groups
    def step_choices(self, name: str | None) -> tuple[Any, str, list[list[Any]]]:
        run = self._run(name)
        steps = [s["step"] for s in data.run_steps(run)] if run else []
        choices = [str(s) for s in reversed(steps)] + ["unconsumed"]
        value = choices[0]
        html, table = self.groups(name, value)
        return gr.update(choices=choices, value=value), html, table

    def groups(self, name: str | None, step: str | None) -> tuple[str, list[list[Any]]]:
        run = self._run(name)
        if run is None or step is None:
            return "<p>No trace yet for this run.</p>", []
        groups = data.load_groups(run["db_path"], run["run_id"], None if step == "unconsumed" else int(step))
        return data.groups_html(groups), data.samples_table(groups)

    # ---- replay
    def episodes(self, name: str | None) -> tuple[Any, ...]:
        run = self._run(name)
        choices = data.episode_choices(run["db_path"], run["run_id"]) if run else []
        first = choices[0][1] if choices else None
        return (gr.update(choices=choices, value=first), *self.open_episode(name, first))

    def open_episode(self, name: str | None, episode_id: str | None) -> tuple[Any, ...]:
        """-> (state, slider, summary, image, turn details, raw output); prefetches every frame."""
        run = self._run(name)
        if run is None or not episode_id:
            return None, gr.update(maximum=1, value=0), "No episode selected.", None, "", ""
        episode, turns = data.load_episode(run["db_path"], episode_id)
        if episode is None:
            return None, gr.update(maximum=1, value=0), f"Episode {episode_id} not found.", None, "", ""
        state = {"run_dir": str(Path(run["db_path"]).parent), "episode": episode, "turns": turns}
        self.frames.prefetch([job for job in (self._safe_job(state, i) for i in range(len(turns))) if job])
        return (state, gr.update(maximum=max(1, len(turns) - 1), value=0), data.episode_summary(episode),
                *self.show_turn(state, 0))

    def _frame_job(self, state: dict[str, Any], idx: int) -> tuple[Path, str | None, str | None, str] | None:
        turn = state["turns"][idx]
        if not turn.get("screenshot_path"):
            return None
        path = data.screenshot_file(self.runs_dir, Path(state["run_dir"]), turn["screenshot_path"])
        return path, turn.get("action_json"), turn.get("parse_error"), f"turn {idx + 1}/{len(state['turns'])}"

    def _safe_job(self, state: dict[str, Any], idx: int) -> tuple[Path, str | None, str | None, str] | None:
        try:
            return self._frame_job(state, idx)
        except data.ReplayPathError:
            return None  # show_turn reports it when the turn is shown

    def show_turn(self, state: dict[str, Any] | None, idx: float | None) -> tuple[Any, str, str]:
        """-> (image path, details markdown, raw completion) of turn `idx`."""
        if not state or not state["turns"]:
            return None, "This episode has no turns.", ""
        idx = min(max(0, int(idx or 0)), len(state["turns"]) - 1)
        turn = state["turns"][idx]
        try:
            job = self._frame_job(state, idx)
            image = self.frames.frame(*job) if job else None
            note = "" if job else "\n\n_no screenshot recorded for this turn_"
        except (data.ReplayPathError, OSError) as exc:
            image, note = None, f"\n\n**screenshot not shown:** {exc}"
        return image, data.turn_details(turn) + note, turn.get("completion_text") or ""

    def step_turn(self, state: dict[str, Any] | None, idx: float, delta: int) -> tuple[Any, ...]:
        n = len(state["turns"]) if state else 1
        new = min(max(0, int(idx or 0) + delta), n - 1)
        return (new, *self.show_turn(state, new))

    def select_sample(self, name: str | None, evt: gr.SelectData) -> tuple[Any, ...]:
        """A click in the Groups samples table opens that episode in Replay."""
        row = evt.row_value or []
        episode_id = row[data.SAMPLE_HEADERS.index("episode_id")] if row else None
        run = self._run(name)
        choices = data.episode_choices(run["db_path"], run["run_id"]) if run else []
        return (gr.Tabs(selected="replay"), gr.update(choices=choices, value=episode_id),
                *self.open_episode(name, episode_id))

    # ---- launch
    def start(self, config: str | None, overrides: str, allocation: str | None = "",
              device: str | None = "cpu") -> tuple[str, Any, Any]:
        """Launch `config` + overrides in the layout `allocation` (launch.allocation) on `device` (model.device,
        unless the overrides set it)."""
        if not config:
            return "✗ pick a config first", gr.skip(), gr.skip()
        try:
            tokens = shlex.split(overrides or "")  # unbalanced quotes: a ValueError, refused below
            layout = [f"launch.allocation={allocation.strip()}"] if (allocation or "").strip() else []
            place = [f"model.device={device}"] if device and not any(t.lstrip("-").startswith("model.device=")
                                                                      for t in tokens) else []
            run = launch.launch_run(config, [*place, *layout, *tokens], self.runs_dir)
        except ConfigError as exc:
            return f"✗ **config error:** {exc}", gr.skip(), gr.skip()
        except (launch.LaunchError, ValueError, OSError) as exc:
            return f"✗ **launch refused:** {exc}", gr.skip(), gr.skip()
        name = str(Path(run.run_dir).relative_to(self.runs_dir))
        names = self.run_names()
        return (f"● started **{name}** (pid {run.pid}); log: `{run.run_dir}/train.log`\n\n`{shlex.join(run.argv)}`",
                gr.update(choices=names, value=name), gr.update(choices=names, value=name))

    def stop(self, name: str | None) -> str:
        if not name:
            return "✗ pick a run to stop"
        try:
            how = launch.stop_run(launch.find_run(self.runs_dir, name))
        except launch.LaunchError as exc:
            return f"✗ {exc}"
        run = data.run_by_name(self.runs_dir, name)
        return f"■ **{name}**: {how}; status `{run['effective_status'] if run else 'stopped'}`"

    def launch_status(self, name: str | None) -> tuple[str, str]:
        """(status line, last lines of train.log) of the run picked in Launch."""
        run = data.run_by_name(self.runs_dir, name) if name else None
        if run is None:
            return "", ""
        log = Path(run["run_dir"]) / launch.LOG_FILE
        tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
        badge = data.STATUS_BADGES.get(run["effective_status"], run["effective_status"])
        note = f"\n\n{run['message']}" if run.get("message") else ""  # why it failed, or why no step comes
        return f"**{name}**: {badge} · step {run.get('n_steps', 0)}{note}", tail


# ----------------------------------------------------------------------------- layout
def build_app(runs_dir: str | Path) -> gr.Blocks:
    dash = Dashboard(runs_dir)
    names, trained = dash.run_names(), dash.training_names()
    first = (trained or names or [None])[0]
    with gr.Blocks(title="cua-kit dashboard") as demo:
        gr.Markdown(f"## cua-kit dashboard · `{dash.runs_dir}`")
        with gr.Row():
            run_pick = gr.Dropdown(names, value=first, label="run (Groups, Replay)", elem_id="run-pick", scale=4)
            refresh = gr.Button("↻ refresh", scale=1, elem_id="refresh")
        with gr.Tabs(selected="runs", elem_id="tabs") as tabs:
            runs_df = _runs_tab(dash)
            curve_pick, plot = _curves_tab(dash, names, trained[:3])
            step_pick, groups_view, samples_df = _groups_tab()
            replay = _replay_tab()
            launch_ui = _launch_tab(dash, names, first)
        timer = gr.Timer(REFRESH_S)
        _wire(dash, demo, run_pick, refresh, tabs, runs_df, curve_pick, plot, step_pick, groups_view,
              samples_df, replay, launch_ui, timer)
    return demo


def _runs_tab(dash: Dashboard) -> gr.Dataframe:
    with gr.Tab("Runs", id="runs"):
        gr.Markdown("Every run under the runs folder. *reward first → last*: mean reward of the first vs the last "
                    "quarter of the steps (▲ = learning). A `running` run whose process is gone shows as failed.")
        return gr.Dataframe(dash.runs_tab, headers=data.RUNS_HEADERS, interactive=False, elem_id="runs-table",
                            wrap=True)


def _curves_tab(dash: Dashboard, names: list[str], shown: list[str]) -> tuple[gr.Dropdown, gr.Plot]:
    with gr.Tab("Curves", id="curves"):
        pick = gr.Dropdown(names, value=shown, multiselect=True, label="runs to overlay", elem_id="curve-pick")
        plot = gr.Plot(lambda: dash.curves(shown), elem_id="curves-plot")
    return pick, plot


def _groups_tab() -> tuple[gr.Dropdown, gr.HTML, gr.Dataframe]:
    with gr.Tab("Groups", id="groups"):
        step = gr.Dropdown([], label="training step (the groups it consumed)", elem_id="step-pick")
        view = gr.HTML(elem_id="groups-view")
        gr.Markdown("Click a row to replay that episode.")
        samples = gr.Dataframe(headers=data.SAMPLE_HEADERS, interactive=False, elem_id="samples-table", max_height=360)
    return step, view, samples


def _replay_tab() -> dict[str, Any]:
    with gr.Tab("Replay", id="replay"):
        ui: dict[str, Any] = {"episode": gr.Dropdown([], label="episode", elem_id="episode-pick"),
                              "summary": gr.Markdown(elem_id="episode-summary"), "state": gr.State(None)}
        with gr.Row():
            with gr.Column(scale=3):
                ui["image"] = gr.Image(type="filepath", label="screen + action", elem_id="replay-image",
                                       interactive=False, height=560, buttons=["fullscreen", "download"])
            with gr.Column(scale=2):
                ui["details"] = gr.Markdown(elem_id="turn-details")
                ui["raw"] = gr.Textbox(label="raw model output", lines=10, max_lines=24, elem_id="raw-output")
        with gr.Row():
            ui["prev"] = gr.Button("◀ prev", elem_id="prev-turn", scale=1)
            ui["slider"] = gr.Slider(0, 1, step=1, value=0, label="turn", elem_id="turn-slider", scale=6)
            ui["next"] = gr.Button("next ▶", elem_id="next-turn", scale=1)
    return ui


def _launch_tab(dash: Dashboard, names: list[str], first: str | None) -> dict[str, Any]:
    configs = launch.list_configs(dash.runs_dir)
    with gr.Tab("Launch", id="launch"):
        ui: dict[str, Any] = {}
        with gr.Row():
            ui["config"] = gr.Dropdown(configs, value=configs[0] if configs else None, label="config",
                                       elem_id="launch-config", allow_custom_value=False, scale=3)
            ui["device"] = gr.Dropdown(["cpu", "auto", "cuda"], value="auto" if visible_gpus() else "cpu",
                                       label="device (model.device)", elem_id="launch-device", scale=1)
            ui["allocation"] = gr.Textbox(label="layout (launch.allocation)", elem_id="launch-allocation", scale=2,
                                          placeholder="empty = one process · fsdp:d2 = 2 trainer ranks · "
                                                      "vllm:d1t2+fsdp:d4")
        ui["overrides"] = gr.Textbox(label="overrides (section.key=value, space separated)", elem_id="launch-overrides",
                                     placeholder="trainer.max_steps=20 rollout.n_samples=4 trial_name=lr3e-5")
        ui["start"] = gr.Button("▶ start run", variant="primary", elem_id="launch-start")
        ui["message"] = gr.Markdown(elem_id="launch-message")
        with gr.Row():
            ui["run"] = gr.Dropdown(names, value=first, label="run", elem_id="launch-run", scale=3)
            ui["stop"] = gr.Button("■ stop (SIGTERM, then SIGKILL)", variant="stop", elem_id="launch-stop", scale=1)
        ui["status"] = gr.Markdown(elem_id="launch-status")
        ui["log"] = gr.Textbox(label="train.log (tail)", lines=12, max_lines=12, elem_id="launch-log", autoscroll=True)
    return ui


def _wire(dash: Dashboard, demo: gr.Blocks, run_pick, refresh, tabs, runs_df, curve_pick, plot, step_pick,
          groups_view, samples_df, replay: dict[str, Any], launch_ui: dict[str, Any], timer: gr.Timer) -> None:
    turn_out = [replay["image"], replay["details"], replay["raw"]]
    episode_out = [replay["state"], replay["slider"], replay["summary"], *turn_out]
    on_run: Callable = lambda name: (*dash.step_choices(name), *dash.episodes(name))
    run_out = [step_pick, groups_view, samples_df, replay["episode"], *episode_out]
    demo.load(on_run, run_pick, run_out)
    run_pick.input(on_run, run_pick, run_out)
    step_pick.input(dash.groups, [run_pick, step_pick], [groups_view, samples_df])
    samples_df.select(dash.select_sample, run_pick, [tabs, replay["episode"], *episode_out])
    replay["episode"].input(dash.open_episode, [run_pick, replay["episode"]], episode_out)
    replay["slider"].input(dash.show_turn, [replay["state"], replay["slider"]], turn_out)
    replay["prev"].click(lambda s, i: dash.step_turn(s, i, -1), [replay["state"], replay["slider"]],
                         [replay["slider"], *turn_out])
    replay["next"].click(lambda s, i: dash.step_turn(s, i, +1), [replay["state"], replay["slider"]],
                         [replay["slider"], *turn_out])
    curve_pick.change(dash.curves, curve_pick, plot)
    refresh_names = lambda: [gr.update(choices=dash.run_names())] * 3
    refresh.click(dash.runs_tab, None, runs_df).then(refresh_names, None, [run_pick, curve_pick, launch_ui["run"]])
    refresh.click(dash.curves, curve_pick, plot)
    launch_ui["start"].click(dash.start, [launch_ui["config"], launch_ui["overrides"], launch_ui["allocation"],
                                          launch_ui["device"]],
                             [launch_ui["message"], launch_ui["run"], run_pick]).then(
        dash.runs_tab, None, runs_df).then(dash.launch_status, launch_ui["run"], [launch_ui["status"], launch_ui["log"]])
    launch_ui["stop"].click(dash.stop, launch_ui["run"], launch_ui["message"]).then(
        dash.runs_tab, None, runs_df).then(dash.launch_status, launch_ui["run"], [launch_ui["status"], launch_ui["log"]])
    launch_ui["run"].change(dash.launch_status, launch_ui["run"], [launch_ui["status"], launch_ui["log"]])
    timer.tick(dash.runs_tab, None, runs_df, show_progress="hidden")
    timer.tick(dash.curves_if_live, curve_pick, plot, show_progress="hidden")
    timer.tick(dash.launch_status, launch_ui["run"], [launch_ui["status"], launch_ui["log"]], show_progress="hidden")


def serve(runs_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
          block: bool = True) -> gr.Blocks:
    """Check access, build the app and serve it. block=False returns at once (tests; call .close())."""
    credentials = check_access(host, auth)
    demo = build_app(runs_dir)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=host, server_port=port, auth=credentials, prevent_thread_lock=not block,
                quiet=not block, css=CSS, footer_links=[], theme=gr.themes.Soft())
    return demo
