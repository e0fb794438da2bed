"""Replay speed: open a 15-turn episode of 1920x1080 screenshots and step through it (cold vs cached frames).

    python bench/dashboard_replay.py [--json out.json]

Prints a table and writes JSON. The dashboard pre-renders an episode's frames in the background when it is
opened; 'next' then only serves a cached PNG file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from app.dashboard import Dashboard
from cua_kit.trace import TraceWriter

N_TURNS = 15


def make_episode(runs_dir: Path) -> None:
    run_dir = runs_dir / "bench" / "t0"
    (run_dir / "screens" / "ep0").mkdir(parents=True)
    with TraceWriter(run_dir / "trace.db", "bench-t0") as writer:
        writer.start_run("bench", "t0", {})
        writer.add_episode({"episode_id": "ep0", "task_id": "t", "reward": 1.0, "success": 1, "n_turns": N_TURNS,
                            "status": "finished", "started_at": time.time()})
        for i in range(N_TURNS):
            image = Image.new("RGB", (1920, 1080), (240, 240, 240))
            ImageDraw.Draw(image).rectangle((100 * i, 100, 100 * i + 300, 400), fill=(30, 136, 229))
            image.save(run_dir / "screens" / "ep0" / f"{i:02d}.png")
            writer.add_turn({"episode_id": "ep0", "turn_idx": i, "screenshot_path": f"screens/ep0/{i:02d}.png",
                             "action_json": json.dumps({"kind": "click", "x": 100 * i + 150, "y": 250}),
                             "completion_text": "<tool_call>...</tool_call>", "version": 3, "staleness": 0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench/dashboard_replay.json")
    args = parser.parse_args()
    runs_dir = Path(tempfile.mkdtemp(prefix="bench-runs-"))
    make_episode(runs_dir)
    dash = Dashboard(runs_dir)
    t0 = time.perf_counter()
    state, *_ = dash.open_episode("bench/t0", "ep0")
    open_s = time.perf_counter() - t0
    time.sleep(0.0)
    t0 = time.perf_counter()
    for i in range(N_TURNS):
        dash.show_turn(state, i)
    first_pass_s = (time.perf_counter() - t0) / N_TURNS
    t0 = time.perf_counter()
    for i in range(N_TURNS):
        dash.show_turn(state, i)
    cached_s = (time.perf_counter() - t0) / N_TURNS
    result = {"turns": N_TURNS, "screen": "1920x1080", "open_episode_s": open_s,
              "per_turn_first_pass_s": first_pass_s, "per_turn_cached_s": cached_s}
    print(f"{'measure':28s} seconds\n{'open episode (turn 0 shown)':28s} {open_s:.3f}\n"
          f"{'per turn, first pass':28s} {first_pass_s:.4f}\n{'per turn, cached':28s} {cached_s:.5f}")
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
