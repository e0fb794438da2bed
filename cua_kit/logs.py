"""Console lines in the original system's shapes, and metrics to TensorBoard (W&B optional).

    [10:30:45] Step 5/100 (5.0%) | Epoch 1 Step 5/20 | Reward: 0.250 | PG Loss: 0.0234 | KL: 0.0078 | LR: 1.00e-05
    [GRPO Group 0] Rewards: ['0.000', '1.000', '0.000', '0.000'] | Mean: 0.250 | Std: 0.433

The step line keeps that prefix exactly (users compare runs by it) and appends success rate,
staleness and episodes/hour.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def step_line(step: int, max_steps: int, epoch: int, epoch_step: int, steps_per_epoch: int,
              m: dict[str, float]) -> str:
    clock = time.strftime("%H:%M:%S")
    return (f"[{clock}] Step {step}/{max_steps} ({100 * step / max_steps:.1f}%) | "
            f"Epoch {epoch} Step {epoch_step}/{steps_per_epoch} | Reward: {m['reward_mean']:.3f} | "
            f"PG Loss: {m['pg_loss']:.4f} | KL: {m['kl']:.4f} | LR: {m['lr']:.2e} | "
            f"Success: {100 * m['success_rate']:.1f}% | Staleness: {m['staleness_mean']:.2f} | "
            f"Episodes/h: {m['episodes_per_hour']:.0f}")


def group_line(index: int, rewards: list[float]) -> str:
    arr = np.asarray(rewards, dtype=float)
    mean, std = (arr.mean(), arr.std()) if len(arr) else (0.0, 0.0)  # population std, as the original
    shown = [f"{r:.3f}" for r in rewards]
    return f"[GRPO Group {index}] Rewards: {shown} | Mean: {mean:.3f} | Std: {std:.3f}"


class MetricsLogger:
    """TensorBoard scalars under <run>/tb, and W&B when enabled."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb: bool = False, project: str = "cua-kit",
                 run_name: str = "", config: dict[str, Any] | None = None, resume_id: str | None = None):
        self.tb = None
        self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        if wandb:
            self.wandb = _start_wandb(project, run_name, config, resume_id)

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train/") -> None:
        scalars = {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(project: str, run_name: str, config: dict[str, Any] | None, resume_id: str | None):
    try:
        import wandb
    except ImportError as exc:
        raise RuntimeError("logging.wandb=true but wandb is not installed: pip install -e '.[wandb]'") from exc
    if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        raise RuntimeError("logging.wandb=true needs WANDB_API_KEY (or WANDB_MODE=offline)")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_name, config=config,
                      id=resume_id, resume="allow")
