"""The environment protocol shared by every backend (synth, miniwob, gbox), and task sets.

An env is async: `reset(task) -> Observation`, `step(action) -> StepResult`, `evaluate() -> reward`,
`close()`. Infrastructure failures (a dead browser, a box that times out) raise `EnvError`, which the
rollout keeps apart from policy failures: they are never scored as a 0 for the policy.
"""

from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from PIL import Image

from cua_kit.actions import Action

Split = Literal["train", "eval"]


class EnvError(RuntimeError):
    """An infrastructure failure of the environment, not a mistake of the policy."""


@dataclass(frozen=True)
class Task:
    """One task: data only. `params` hold whatever the env needs (seed, level, target ...)."""

    id: str
    env: str
    instruction: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    split: Split = "train"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Task":
        unknown = set(row) - {"id", "env", "instruction", "params", "split"}
        if unknown:
            raise ValueError(f"task {row.get('id')!r}: unknown keys {sorted(unknown)}")
        return cls(
            id=str(row["id"]),
            env=str(row["env"]),
            instruction=str(row.get("instruction", "")),
            params=dict(row.get("params") or {}),
            split=row.get("split", "train"),
        )


@dataclass
class Observation:
    """What the agent sees after reset or a step."""

    screenshot: Image.Image
    instruction: str
    extra: str | None = None  # optional text (e.g. a form's current value, an env message)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the screenshot in pixels."""
        return self.screenshot.size


@dataclass
class StepResult:
    """The result of one `step`. `done` is set when the env itself ended the episode."""

    observation: Observation
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Env(abc.ABC):
    """One GUI environment instance: holds one screen at a time. Not shared between episodes in flight."""

    name: ClassVar[str]
    # Which Qwen3-VL tool this env speaks: "mobile_use" (phones) or "computer_use" (desktop/web).
    tool: ClassVar[str] = "mobile_use"
    # The `params` key naming the task an episode is a seed of, when evals should report success per task
    # and the mean over tasks (MiniWoB++'s page name: its papers compare per-task tables); None = no table.
    task_key: ClassVar[str | None] = None

    @classmethod
    def validate_task(cls, task: Task) -> None:  # noqa: B027 - most backends take any params
        """Raise ValueError, saying why, when this backend cannot run `task` (runs check every task first)."""

    @abc.abstractmethod
    async def reset(self, task: Task) -> Observation: ...

    @abc.abstractmethod
    async def step(self, action: Action) -> StepResult: ...

    @abc.abstractmethod
    async def evaluate(self) -> float:
        """The task reward of the current state: 1.0 success, 0.0 failure (partial values allowed)."""

    async def oracle_action(self) -> Action:
        """The action a perfect agent takes now, computed from the env's state (for demos and SFT).

        Backends that have no oracle raise NotImplementedError.
        """
        raise NotImplementedError(f"env {self.name!r} has no oracle policy")

    async def close(self) -> None:  # noqa: B027 - optional for envs with nothing to release
        """Release every resource (browser context, box). Safe to call twice."""


TASK_FILE_MAX_BYTES = 256 << 20  # a task file is read whole; larger ones are refused rather than swapped in


def load_tasks(path: str | Path, split: str | None = None, env: str | None = None) -> list[Task]:
    """Read a task set from JSONL (one task a line) or YAML (a list, or `{tasks: [...]}`).

    `split`/`env` filter the tasks. An empty result is an error: a run with no tasks says so early. A file that
    is missing, not a file, not UTF-8, too large, or holds a row that is not a task fails with one line
    (ConfigError, a ValueError; FileNotFoundError when it is missing).
    """
    from cua_kit.config import ConfigError, parse_yaml, read_text_file  # local: config imports no env code

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task file not found: {path}")
    text = read_text_file(path, "task file", TASK_FILE_MAX_BYTES)
    if path.suffix in (".yaml", ".yml"):
        data = parse_yaml(text, f"task file {path}") or []
        rows = data.get("tasks") if isinstance(data, dict) else data
        where = [f"{path} task {i + 1}" for i in range(len(rows))] if isinstance(rows, list) else []
    else:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        rows, where = [], [f"{path} line {n}" for n, _ in lines]
        for n, line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ConfigError(f"{path} line {n}: not JSON ({exc})") from None
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: expected a list of tasks (or {{tasks: [...]}}), got {type(rows).__name__}")
    tasks = [_task(row, at) for row, at in zip(rows, where)]
    tasks = [t for t in tasks if (split is None or t.split == split) and (env is None or t.env == env)]
    if not tasks:
        raise ValueError(f"{path}: no tasks with split={split!r} env={env!r}")
    return tasks


def _task(row: Any, where: str) -> Task:
    """One row of a task file as a Task, or a one-line error that says where it is."""
    from cua_kit.config import ConfigError

    if not isinstance(row, dict) or "id" not in row or "env" not in row:
        raise ConfigError(f"{where}: a task is a mapping with at least 'id' and 'env', got {str(row)[:80]}")
    try:
        return Task.from_dict(row)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
