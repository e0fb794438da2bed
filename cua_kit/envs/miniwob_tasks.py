"""Which MiniWoB++ tasks exist, which the kit refuses and why, and the generator of the full task file.

The PyPI `miniwob` 1.1.0 wheel ships 130 task pages under `html/miniwob/` and 4 FlightWoB sites under
`html/flight/` (named `flight.<site>` as the wheel's own registry names them). Every page of
`html/miniwob/` runs by name in `MiniWobEnv` except those in `REFUSED`, which `check_task` turns away
with the reason. Write the task file of every runnable task:

    python -m cua_kit.envs.miniwob_tasks > data/miniwob_all.jsonl
    python -m cua_kit.envs.miniwob_tasks --train 4 --eval 50 > my_tasks.jsonl   # other seed counts

Train rows use seeds 0.., eval rows seeds 10000.. (the curated data/miniwob_tasks.yaml's scheme), so
the splits never share a (task, seed).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
from pathlib import Path

from cua_kit.envs.base import EnvError, Task

EVAL_SEED0 = 10000
FLIGHT_PREFIX = "flight."
_REAL_TIME = "the wheel leaves it out of its registered tasks"
_FLIGHT = ("FlightWoB: a 375x667 airline site in an iframe with the instruction beside it, while the env "
           "shows only MiniWoB's 160x210 task area")
# Task -> why the kit refuses it. The real-time pages score wall-clock timing that an agent acting once per
# screenshot does not control (a VLM's seconds per turn would decide the score, not its actions).
REFUSED: dict[str, str] = {
    "button-delay": "real time: scored on the wall-clock delay between two clicks (1-4 s, within 15% for "
                    f"full reward), which the policy's seconds per turn decide; {_REAL_TIME}",
    "chase-circle": "real time: scored on how long the pointer stays on a circle that moves for ~10 s after "
                    f"the start; one action per screenshot cannot follow it; {_REAL_TIME}",
    "hover-shape": "never scored: the page's reward call is commented out, so only its time limit (lifted "
                   f"by the env) would end an episode; {_REAL_TIME}",
    "moving-items": "real time: circles cross the area for 9.9 s of wall time, then the page ends the "
                    f"episode on its own, however many turns the agent had; {_REAL_TIME}",
    "simon-says": "real time: the sequence is shown as blinks 600 ms apart right after the start, between "
                  f"the agent's screenshots; {_REAL_TIME}",
    "flight.AA": _FLIGHT,
    "flight.Alaska": _FLIGHT,
    "flight.Alaska-auto": _FLIGHT,
    "flight.Alaska-auto-medium": _FLIGHT,
}


def miniwob_html_dir() -> Path:
    """The folder of task pages inside the installed `miniwob` wheel."""
    try:
        import miniwob
    except ImportError as exc:
        raise EnvError("the miniwob env needs `pip install miniwob==1.1.0 playwright`") from exc
    return Path(miniwob.__file__).parent / "html" / "miniwob"


@functools.lru_cache(maxsize=1)  # the installed wheel does not change while a process runs
def wheel_task_names() -> tuple[str, ...]:
    """Every task page of the wheel: html/miniwob/<name>.html and the FlightWoB sites as flight.<site>."""
    pages = [p.stem for p in miniwob_html_dir().glob("*.html")]
    flights = [FLIGHT_PREFIX + p.parent.name for p in (miniwob_html_dir().parent / "flight").glob("*/wrapper.html")]
    return tuple(sorted(pages + flights))


def task_names() -> list[str]:
    """The tasks that run by name in the env: every wheel task not in REFUSED (e.g. 'click-button')."""
    return [name for name in wheel_task_names() if name not in REFUSED]


def check_task(name: str | None) -> Path:
    """The page file of task `name`; ValueError naming the closest tasks, or the reason it is refused."""
    if name in REFUSED:
        raise ValueError(f"miniwob task {name!r} is refused: {REFUSED[name]}")
    if name not in wheel_task_names():
        close = difflib.get_close_matches(str(name), task_names(), n=3, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else "e.g. 'click-button'"
        raise ValueError(f"{name!r} is not a MiniWoB++ task ({hint}; `python -m cua_kit.envs.miniwob_tasks "
                         "--names` lists them all)")
    return miniwob_html_dir() / f"{name}.html"


def suite_tasks(n_train: int = 16, n_eval: int = 8) -> list[Task]:
    """Every runnable task x `n_train` train seeds (0..) and `n_eval` eval seeds (EVAL_SEED0..), task by task."""
    tasks = []
    for name in task_names():
        for split, seeds in (("train", range(n_train)), ("eval", range(EVAL_SEED0, EVAL_SEED0 + n_eval))):
            tasks += [Task(id=f"{name}/{split}/{seed}", env="miniwob", params={"task": name, "seed": seed},
                           split=split) for seed in seeds]
    return tasks


def _main() -> None:
    parser = argparse.ArgumentParser(description="Write every runnable MiniWoB++ task as JSONL to stdout.")
    parser.add_argument("--train", type=int, default=16, help="train seeds per task (0..)")
    parser.add_argument("--eval", type=int, default=8, help=f"eval seeds per task ({EVAL_SEED0}..)")
    parser.add_argument("--names", action="store_true", help="list the runnable and refused names instead")
    args = parser.parse_args()
    if args.names:
        print("\n".join(task_names()))
        print("\n".join(f"refused {name}: {why}" for name, why in REFUSED.items()))
        return
    for task in suite_tasks(args.train, args.eval):
        print(json.dumps(task.to_dict()))


if __name__ == "__main__":
    _main()
