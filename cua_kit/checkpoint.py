"""Checkpoints: atomic folders `checkpoints/checkpoint-<step>/` that a killed run resumes from exactly.

A checkpoint holds the LoRA adapter in plain peft format (`adapter/`, loads with
`PeftModel.from_pretrained`), the trained tensors (`weights/`) and the optimizer state (`optimizer/`, once
it has taken a step) through `torch.distributed.checkpoint` (keyed by parameter name, so a checkpoint
written by N FSDP ranks loads on M ranks or on one process), the LR schedule and version (`trainer.pt`),
every RNG state (`rng.pt`; `rng-rank<r>.pt` for the other ranks of a distributed run), and `state.json`
(step, version, controller/data position, counters). It is written into a temporary folder and renamed
into place, so a SIGKILL at any moment leaves either the whole checkpoint or none; `latest_checkpoint`
ignores leftovers. The last `keep_last` of the run are kept, and never the one just written: state.json
carries the run's id, and only checkpoints of the same run are pruned (`cua_kit.run_folder` keeps other
runs' checkpoints out of the folder).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, trainer: Any, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write checkpoint-<step> atomically (temp folder, fsync'd files, rename) and prune old ones.
    `trainer.save(folder)` writes the model and optimizer part (on every rank of a distributed run)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainer.save(tmp)
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    _fsync_tree(tmp)
    replaced = ckpt_dir / f".tmp-checkpoint-{step}-replaced-{os.getpid()}"
    if final.exists():  # re-saving the same step (e.g. SIGTERM right after a periodic save): renamed away whole
        os.rename(final, replaced)  # first, so a kill never leaves a half-deleted checkpoint-<step>
    os.rename(tmp, final)
    shutil.rmtree(replaced, ignore_errors=True)
    _prune(ckpt_dir, keep_last, final)
    return final


ADAPTERS_KEPT = 2  # exported versions kept on disk: the served one, and the one before it while it is swapped


def save_adapter(model: Any, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The trained LoRA adapter ("default", never the frozen KL-reference one) as a plain peft folder.
    `state_dict`: its full tensors when the model's own are shards (FSDP; `cua_kit.distributed`)."""
    selected = {"selected_adapters": ["default"]} if "default" in getattr(model, "peft_config", {}) else {}
    model.save_pretrained(folder, state_dict=state_dict, **selected)


def export_adapter(model: Any, adapters_dir: Path, version: int,
                   state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The trained LoRA adapter of `version` as a plain peft folder `adapters_dir/v<version>` (written atomically,
    for a generation server to load); older exports beyond ADAPTERS_KEPT are deleted. An existing `v<version>` is
    replaced: it may hold another run's weights (a fresh run in an old run folder), and a server must never load
    those."""
    final = adapters_dir / f"v{version}"
    tmp = adapters_dir / f".tmp-v{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, state_dict)
    if final.exists():
        old = adapters_dir / f".old-v{version}-{os.getpid()}"
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)
    for folder in adapters_dir.glob("v*"):  # keep this version and the one before; later ones are another run's
        if folder.name[1:].isdigit() and not version - ADAPTERS_KEPT < int(folder.name[1:]) <= version:
            shutil.rmtree(folder, ignore_errors=True)
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _prune(ckpt_dir: Path, keep_last: int, newest: Path) -> None:
    """Delete all but the `keep_last` newest checkpoints of `newest`'s run (by step); `newest` always stays."""
    run_id = _run_id(newest)
    ours = [p for p in list_checkpoints(ckpt_dir) if p != newest and _run_id(p) == run_id
            and checkpoint_step(p) < checkpoint_step(newest)]
    for old in ours[: max(0, len(ours) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in ckpt_dir.glob(".tmp-checkpoint-*"):  # from a process killed mid-write
        if not leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)


def _run_id(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / "state.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def checkpoint_step(checkpoint: Path) -> int:
    """The step in a checkpoint folder's name (checkpoint-<step>)."""
    match = _NAME.match(Path(checkpoint).name)
    if match is None:
        raise ValueError(f"{checkpoint} is not a checkpoint-<step> folder")
    return int(match.group(1))


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.exists():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))
             and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, trainer: Any) -> dict[str, Any]:
    """state.json of a checkpoint; `trainer.load(path)` and the RNG states are restored as side effects."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a checkpoint (no state.json); pass a checkpoints/checkpoint-<step> folder")
    state = json.loads((path / "state.json").read_text())
    trainer.load(path)
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return state


# ----------------------------------------------------------------------------- model and optimizer tensors
WEIGHTS, OPTIMIZER = "weights", "optimizer"


def save_weights(folder: Path, model: Any, optimizer: torch.optim.Optimizer) -> None:
    """The trained tensors into `folder/weights` and the optimizer state into `folder/optimizer` through
    torch.distributed.checkpoint: every rank writes its own shards (a plain model: one process, no process
    group). Keyed by parameter name, so they load back on any number of ranks. An optimizer that has not
    stepped yet is not written: torch would initialise its state with a zero-gradient step, which moves the
    step count a resumed run then depends on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save(get_model_state_dict(model, options=_trained()), checkpoint_id=folder / WEIGHTS)
    if optimizer.state:
        dcp.save(get_optimizer_state_dict(model, optimizer, options=_trained()), checkpoint_id=folder / OPTIMIZER)


def load_weights(folder: Path, model: Any, optimizer: torch.optim.Optimizer) -> None:
    """What `save_weights` wrote, resharded onto this model (its shards, when it is FSDP-sharded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    weights = get_model_state_dict(model, options=_trained())
    dcp.load(weights, checkpoint_id=folder / WEIGHTS)
    set_model_state_dict(model, weights, options=_trained())
    if (folder / OPTIMIZER).exists():
        state = get_optimizer_state_dict(model, optimizer, options=_trained())
        dcp.load(state, checkpoint_id=folder / OPTIMIZER)
        set_optimizer_state_dict(model, optimizer, state, options=_trained())


def _trained():
    """The trained (LoRA) tensors only: the frozen base comes from the Hub or the model folder."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)
