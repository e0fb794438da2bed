"""CPU smoke test of bench/train_step.py: the GRPO-update benchmark runs end to end on a tiny Qwen3-VL shape.

The numbers themselves are not checked (speed goals live in the benchmark, not in tests); what is checked
is that each path really trained (a finite loss, a non-zero gradient), that the baseline and the kit train
the same LoRA targets, and that the report adds up.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--shape", "tiny", "--device", "cpu", "--image", "64x64", "--rows", "2", "--seq", "40",
        "--completion", "8", "--warmup", "0", "--steps", "1", "--matmul-size", "256"]


def test_tiny_run_reports_every_path(train_step, tmp_path):
    out = tmp_path / "train_step.json"
    report = train_step.main(TINY + ["--warmup", "1", "--paths", "peft", "kit", "kit-nokl", "fsdp", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"], default=str))
    by_path = {r["path"]: r for r in report["results"]}
    assert set(by_path) == {"peft", "kit", "kit-nokl", "fsdp"}
    for r in by_path.values():
        assert r["tokens_per_step"] == 2 * 40
        assert r["step_s"] > 0 and math.isclose(r["tokens_per_s"], 80 / r["step_s"])
        expected_mfu = 6 * r["n_params"] * 80 / r["step_s"] / report["meta"]["matmul_flops"]
        assert math.isclose(r["mfu"], expected_mfu)
    # same model, same LoRA targets on both paths: the comparison is like for like
    assert by_path["peft"]["n_params"] == by_path["kit"]["n_params"]
    assert 0 < by_path["kit"]["n_trainable"] == by_path["peft"]["n_trainable"] < by_path["kit"]["n_params"]
    assert math.isfinite(by_path["peft"]["last_loss"])
    update = by_path["kit"]["last_update"]
    assert update["n_samples"] == 2 and update["n_too_long"] == 0
    assert math.isfinite(update["loss"]) and update["grad_norm"] > 0
    assert update["kl"] >= 0 and by_path["kit"]["breakdown"]["reference_forward_s"] > 0
    assert by_path["kit-nokl"]["last_update"]["kl"] == 0 and "breakdown" not in by_path["kit-nokl"]
    assert by_path["kit-nokl"]["last_update"]["grad_norm"] > 0
    # FSDP2 on one rank takes the kit's steps: the same losses on the same batch (fp32 on the CPU)
    fsdp, kit_losses = by_path["fsdp"], by_path["kit"]["losses"]
    assert len(fsdp["losses"]) == len(kit_losses) == 2 and abs(kit_losses[-1]) > 1e-4  # the 2nd update's loss is not 0
    assert fsdp["loss_vs_kit"] < 1e-5
    assert fsdp["n_trainable"] == by_path["kit"]["n_trainable"] and fsdp["last_update"]["grad_norm"] > 0


@pytest.mark.parametrize("bad, message", [
    (["--seq", "10"], "--seq 10 is too short"),
    (["--image", "70x64"], "multiples of 32"),
    (["--shape", "8b"], "on the CPU use --shape tiny"),
])
def test_bad_sizes_fail_before_any_model_is_built(train_step, tmp_path, bad, message):
    args = TINY + bad + ["--out", str(tmp_path / "x.json")]
    with pytest.raises(SystemExit, match=message):
        train_step.main(args)
    assert not (tmp_path / "x.json").exists()
