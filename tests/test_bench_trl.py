"""CPU smoke test of the `trl` path of bench/train_step.py (bench/trl_grpo.py): TRL's GRPOTrainer runs GRPO steps
with LoRA on the tiny Qwen3-VL, with its generation replaced by the rows' completions, and reports its update.

TRL is not a runtime dependency of the kit, only of this benchmark: `make install` brings it with the `bench`
extra (TRL 1.16.0 beside torch 2.14.1 on CPU); the GPU machine carries TRL 1.15.0.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path



SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"


def test_trl_grpo_steps_run_with_lora_on_the_same_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    train_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_step)
    report = train_step.main(["--shape", "tiny", "--device", "cpu", "--image", "256x256", "--rows", "2", "--seq",
                              "110", "--completion", "8", "--warmup", "1", "--steps", "1", "--matmul-size", "256",
                              "--paths", "kit", "trl", "trl-nokl", "--out", str(tmp_path / "x.json")])
    by_path = {r["path"]: r for r in report["results"]}
    assert not [r for r in by_path.values() if "error" in r], by_path
    trl, kit = by_path["trl"], by_path["kit"]
    assert trl["n_trainable"] == kit["n_trainable"] > 0  # the same LoRA targets and rank
    assert trl["n_params"] == kit["n_params"]
    # TRL templates its own prompts around the same 64-token screenshot: close to the kit's 2 x 110 tokens
    assert 2 * 110 <= trl["tokens_per_step"] <= 2 * 150
    assert trl["step_s"] > 0 and math.isfinite(trl["mfu"]) and trl["generate_s"] < 0.01
    assert trl["score_s"] > 0 and trl["trl_version"].startswith("1.")
