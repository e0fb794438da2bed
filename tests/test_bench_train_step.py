"""CPU smoke test of bench/train_step.py: the GRPO-update benchmark runs end to end on a tiny Qwen3-VL shape.

The numbers themselves are not checked (speed goals live in the benchmark, not in tests); what is checked
is that each path really trained (a finite loss, a non-zero gradient), that the baseline and the kit train
the same LoRA targets, and that the report adds up.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
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
    report = train_step.main(TINY + ["--paths", "peft", "kit", "kit-nokl", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"], default=str))
    by_path = {r["path"]: r for r in report["results"]}
    assert set(by_path) == {"peft", "kit", "kit-nokl"}
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


def test_fsdp_on_one_rank_takes_the_kit_s_steps(train_step, tmp_path):
    """FSDP2 on one rank (`kit-fsdp`) beside the kit's own update: the same losses on the same rows (fp32 on the
    CPU), with its step time and peak memory in the same report."""
    report = train_step.main(TINY + ["--warmup", "1", "--paths", "kit", "kit-fsdp", "--out", str(tmp_path / "x.json")])
    kit, fsdp = (next(r for r in report["results"] if r["path"] == p) for p in ("kit", "kit-fsdp"))
    assert len(fsdp["losses"]) == len(kit["losses"]) == 2 and abs(kit["losses"][-1]) > 1e-4  # the 2nd loss is not 0
    assert fsdp["unsharded"] == "kit" and fsdp["loss_vs_unsharded"] < 1e-5
    assert fsdp["n_trainable"] == kit["n_trainable"] and fsdp["last_update"]["grad_norm"] > 0 and fsdp["step_s"] > 0
    # the one-rank group's torchrun variables are gone after the join: a launcher in this process reads them as placed
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(os.environ)


def test_every_update_speed_path_runs_and_the_prescored_reference_is_timed_apart(train_step, tmp_path, monkeypatch):
    """The before/after paths of issue 16 on mixed row lengths; compile through dynamo's eager backend (inductor
    takes minutes on 2 cores; the wiring is what is checked here)."""
    import cua_kit.grpo.trainer as trainer_module
    import torch

    real_compile = torch.compile
    monkeypatch.setattr(trainer_module.torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    paths = ["peft-nogc", "peft-eager", "kit-prescored", "kit-nogc", "kit-eager", "kit-nobuckets", "kit-pad10",
             "kit-compile", "kit-prescored-nogc-compile", "load-hf", "load-unsloth"]
    report = train_step.main(TINY + ["--image", "64x128", "--seq", "56", "--mixed", "--micro-batch-tokens", "60",
                                     "--paths", *paths, "--out", str(tmp_path / "x.json")])
    by_path = {r["path"]: r for r in report["results"]}
    unsloth = by_path.pop("load-unsloth")  # no GPU here: the loader's own message, as a row; the run goes on
    assert "needs an NVIDIA GPU" in unsloth["error"] and "unsloth==2026.10.7" in unsloth["error"]
    assert set(by_path) == set(paths[:-1]) and not [r for r in by_path.values() if "error" in r]
    assert by_path["kit-nogc"]["tokens_per_step"] == 56 + 52  # --mixed: the second screenshot 64x64, 4 tokens not 8
    assert by_path["load-hf"]["load_s"] > 0
    for path in paths[2:-1]:
        update = by_path[path]["last_update"]
        assert update["n_samples"] == 2 and math.isfinite(update["loss"]) and update["grad_norm"] > 0
    assert by_path["kit-prescored"]["reference_s"] > 0 and "reference_s" not in by_path["kit-nogc"]


def test_a_failing_path_is_a_row_with_its_error(train_step, tmp_path, monkeypatch):
    def out_of_memory(*_, **__):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_step, "run_peft", out_of_memory)  # a stand-in for the GPU's failure
    report = train_step.main(TINY + ["--paths", "peft", "kit-nokl", "--out", str(tmp_path / "x.json")])
    failed, ran = report["results"]
    assert failed["path"] == "peft" and failed["error"].startswith("RuntimeError: CUDA out of memory")
    assert ran["path"] == "kit-nokl" and ran["step_s"] > 0


def test_32b_shape_is_the_real_qwen3_vl_32b(train_step):
    """Built on the meta device (no memory): the sizes of Qwen3-VL-32B-Instruct's config.json give ~33B weights."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from cua_kit.models.tiny import build_tokenizer

    config = train_step.qwen3_vl_config(train_step.SHAPES["32b"], build_tokenizer(1024))
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration._from_config(config)
    n = sum(p.numel() for p in model.parameters())
    assert 33.0e9 < n < 33.8e9, n
    assert len(model.model.language_model.layers) == 64 and len(model.model.visual.blocks) == 27
    assert model.model.language_model.layers[0].self_attn.q_proj.out_features == 64 * 128


@pytest.mark.parametrize("bad, message", [
    (["--seq", "10"], "--seq 10 is too short"),
    (["--image", "70x64"], "multiples of 32"),
    (["--shape", "8b"], "on the CPU use --shape tiny"),
    (["--paths", "kit-fast"], "unknown path"),
    (["--paths", "peft-compile"], "unknown path"),
])
def test_bad_sizes_fail_before_any_model_is_built(train_step, tmp_path, bad, message):
    args = TINY + bad + ["--out", str(tmp_path / "x.json")]
    with pytest.raises(SystemExit, match=message):
        train_step.main(args)
    assert not (tmp_path / "x.json").exists()
