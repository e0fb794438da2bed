"""Environment backends behind one protocol (`base.Env`), created by name.

Backends are imported lazily so that `synth` works without a browser or the gbox SDK installed.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from cua_kit.envs.base import Env, EnvError, Observation, StepResult, Task, load_tasks

# name -> "module:Class"
ENV_BACKENDS: dict[str, str] = {
    "synth": "cua_kit.envs.synth:SynthEnv",
    "miniwob": "cua_kit.envs.miniwob:MiniWobEnv",
    "gbox": "cua_kit.envs.gbox:GboxEnv",
}


def env_class(name: str) -> type[Env]:
    """The class of backend `name`; an unknown name fails with the closest valid one."""
    if name not in ENV_BACKENDS:
        close = difflib.get_close_matches(name, ENV_BACKENDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown env {name!r}.{hint} Known envs: {', '.join(ENV_BACKENDS)}")
    module, cls = ENV_BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_env(name: str, **options: Any) -> Env:
    """Create one env of backend `name` with backend-specific keyword options."""
    return env_class(name)(**options)


__all__ = ["ENV_BACKENDS", "Env", "EnvError", "Observation", "StepResult", "Task", "env_class",
           "load_tasks", "make_env"]
