"""Benchmark: one GRPO update through the kit's own path vs a plain peft LoRA step and TRL's GRPOTrainer,
same shapes, same rows, same run.

What is measured, per model shape (Qwen3-VL-2B-, -8B- and -32B-shaped, random weights built straight on the
device in bf16, no hub). A path is a base name with optional `-modifier`s, so each change of issue 16 has a
before row and an after row in the same run:
  kit      `GRPOTrainer.update` on fresh `Sample`/`TurnSample` rows every step, LoRA from `apply_lora` on the
           kit's three groups (vision attention, merger, language), gradient checkpointing on, sdpa attention,
           micro-batches bucketed by length. Every update includes what a real one does: collate + image
           processing on the CPU, the no-grad reference forward for the k3 KL (kl_ctl 0.01), the scoring
           forward with `logits_to_keep`, backward, grad clipping, AdamW. Samples are fresh (version =
           trainer.version), so no proximal recompute (the on-policy case).
  peft     the naive baseline: the same model and LoRA targets through plain `get_peft_model`, gradient
           checkpointing, inputs collated once up front, `labels=` loss over the completion tokens (full-vocab
           logits), backward, AdamW.
  trl      TRL's `GRPOTrainer` (bench/trl_grpo.py) on the same model, LoRA targets, screenshots, batch and
           completion length, beta 0.01 (its reference forward, adapter disabled, as the kit's), its generation
           replaced by the same completions (no generation is timed; see there).
Modifiers (kit unless said): nokl (kl_ctl 0, also trl: beta 0), prescored (the reference log-probs scored
before the update, as when a sample is scored on arrival; timed apart as reference_s), nogc (no gradient
checkpointing; also peft, trl), compile (trainer.compile), eager (eager attention in the vision tower and the
language model; also peft), nobuckets (micro-batches packed in order by the token budget alone: the old packing;
kit sorts rows by length first), pad10 (trainer.max_padding 0.1: a row that would make a micro-batch more than 10%
padding starts a new one; the default 1.0 packs by the budget alone), fsdp (the update through FSDP2 on one rank,
`cua_kit.distributed.ShardedTrainer`: fully_shard on every decoder layer and vision block, bf16 compute on
CUDA; its losses must be those of the same path without fsdp, whose rows it follows: `loss_vs_unsharded` is the
largest |difference| over every update, warm-up included, beside the two step times and peak memories).
  load-hf, load-unsloth: the kit's update on the model saved to a folder and loaded back by `load_model`
           with model.loader=hf or unsloth (FastVisionModel, its own LoRA wrapper and offloaded checkpointing);
           load time reported as load_s. Unsloth is imported first when a load-unsloth path is asked for.
Rows: --rows x --seq tokens (default 4 x 1,196: one 1280x736 screenshot = 920 image tokens, text, a 128-token
completion); --mixed halves every other row's screenshot height (rows of two lengths: what bucketing is for).
`--warmup` untimed steps (at least 3 with compile) then the median of `--steps`. A path that fails (e.g. out
of memory) is reported as a row with its error and the run goes on.

MFU by the 6N rule, the same for every path:  MFU = 6 * N * tokens_per_step / step_s / matmul_flops,
N = every parameter of the model (frozen base + LoRA), tokens = the rows' real tokens, matmul_flops = a bf16
8192^3 matmul measured in the same run. The reference forward (2N per token) and checkpointing's recompute
(2N) are overhead the rule does not count. Prints a table and writes JSON:

    PYTHONPATH=. python bench/train_step.py --shape 2b 8b --steps 8 --out bench/results/train_step.json
    PYTHONPATH=. python bench/train_step.py --shape tiny --image 64x64 --seq 96 --completion 16  # CPU
    bash bench/update_speed.sh   # every row of docs/BENCHMARKS.md "GRPO update on GPU", on the GPU
    PYTHONPATH=. python bench/train_step.py --shape 8b --paths kit kit-fsdp   # the 1-GPU FSDP2 figures
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if any(a.startswith("load-unsloth") for a in sys.argv):
    with contextlib.suppress(ImportError):  # without it, the row fails with the loader's own message
        import unsloth  # noqa: F401  -- Unsloth patches transformers and peft only if imported before them

import numpy as np
import peft
import torch
import transformers
from PIL import Image

from cua_kit.config import GRPOConfig, LoraConfig, ModelConfig, TrainerConfig
from cua_kit.grpo.scoring import score
from cua_kit.grpo.trainer import GRPOTrainer, Sample
from cua_kit.models.inputs import Row, collate
from cua_kit.models.loader import LoadedModel, apply_lora, load_model, reference_model
from cua_kit.models.tiny import _processor, build_tokenizer
from cua_kit.rollout.episode import TurnSample

# Real Qwen3-VL configs (config.json of Qwen/Qwen3-VL-2B-, -8B- and -32B-Instruct); tiny is for CPU tests.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32, vocab_size=2048),
                 vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                             deepstack_visual_indexes=[0]), tie=False),
    "2b": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936),
               vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                           deepstack_visual_indexes=[5, 11, 17]), tie=True),
    "8b": dict(text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936),
               vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                           deepstack_visual_indexes=[8, 16, 24]), tie=False),
    "32b": dict(text=dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                          num_key_value_heads=8, head_dim=128, vocab_size=151936),
                vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                            deepstack_visual_indexes=[8, 16, 24]), tie=False),
}
# base path -> the modifiers it takes (module docstring)
PATHS: dict[str, set[str]] = {
    "kit": {"nokl", "prescored", "nogc", "compile", "eager", "nobuckets", "pad10", "fsdp"},
    "peft": {"nogc", "eager"},
    "trl": {"nokl", "nogc"},
    "load": {"hf", "unsloth"},  # the kit's update on a model saved to a folder and loaded by model.loader=hf|unsloth
}
LORA = LoraConfig(r=16, alpha=32, dropout=0.0)  # the kit's defaults: all three groups
TEMPERATURE = 0.7


def qwen3_vl_config(shape: dict[str, Any], tok: Any) -> Any:
    """A Qwen3VLConfig of the real shape; special-token ids are the (tiny) tokenizer's own."""
    from transformers import Qwen3VLConfig

    ids = tok.convert_tokens_to_ids
    text = dict(shape["text"], max_position_embeddings=32768, tie_word_embeddings=shape["tie"],
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                 "mrope_section": mrope_section(shape["text"]["head_dim"])},
                pad_token_id=tok.pad_token_id, eos_token_id=ids("<|im_end|>"))
    vision = dict(shape["vision"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
                  out_hidden_size=shape["text"]["hidden_size"])
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape["tie"],
                         image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                         vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def mrope_section(head_dim: int) -> list[int]:
    """[24, 20, 20] for head_dim 128, as in the real configs; must sum to head_dim / 2."""
    half = head_dim // 2
    return [half - 2 * (half * 5 // 16), half * 5 // 16, half * 5 // 16]


def build_model(config: Any, device: torch.device, dtype: torch.dtype, attn: str = "sdpa",
                checkpointing: bool = True) -> Any:
    """Random weights allocated straight on the device (no CPU copy, ~seconds for 8B); `attn` goes to the vision
    tower and the language model alike (sdpa runs the ViT per image without a mask: its flash kernel)."""
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    if checkpointing:  # use_reentrant=False, as the kit's loader does (reentrant GC breaks with frozen inputs)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def parse_path(name: str) -> tuple[str, set[str]]:
    """'kit-nokl-compile' -> ('kit', {'nokl', 'compile'}); a clear error for an unknown base or modifier."""
    base, *mods = name.split("-")
    if base not in PATHS or not set(mods) <= PATHS[base] or (base == "load" and len(mods) != 1):
        allowed = "; ".join(f"{b}[-{'|-'.join(sorted(m))}]" for b, m in PATHS.items())
        raise SystemExit(f"--paths {name}: unknown path; give a base with modifiers: {allowed}")
    return base, set(mods)


def make_rows(tok: Any, args: argparse.Namespace, seed: int = 0) -> list[tuple[list[int], list[int], list[Image.Image]]]:
    """`rows` (prompt_ids, completion_ids, [image]): text ids around one screenshot's <|image_pad|> run."""
    rng = random.Random(seed)
    width, height = args.image
    n_image, n_text = token_layout(args)
    special = set(tok.all_special_ids)
    normal = [i for i in range(len(tok)) if i not in special]
    ids = tok.convert_tokens_to_ids
    rows = []
    for i in range(args.rows):
        # --mixed: every other screenshot is half as high (a multiple of 32), so rows come in two lengths
        h = max(64, height // 64 * 32) if args.mixed and i % 2 else height
        text = [rng.choice(normal) for _ in range(n_text)]
        prompt = text[: n_text // 2] + [ids("<|vision_start|>")] + [ids("<|image_pad|>")] * (n_image * h // height) \
            + [ids("<|vision_end|>")] + text[n_text // 2:]
        completion = [rng.choice(normal) for _ in range(args.completion)]
        pixels = np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (h, width, 3), dtype=np.uint8)
        rows.append((prompt, completion, [Image.fromarray(pixels)]))
    return rows


def token_layout(args: argparse.Namespace) -> tuple[int, int]:
    """(image tokens, text tokens) of one prompt; a clear error when the sizes cannot fit."""
    width, height = args.image
    if width % 32 or height % 32 or width < 64 or height < 64:
        raise SystemExit(f"--image {width}x{height}: both sides must be multiples of 32 (patch 16 x merge 2), "
                         "at least 64")
    n_image = (width // 32) * (height // 32)
    n_text = args.seq - args.completion - n_image - 2
    if n_text < 2 or args.completion < 1 or args.rows < 1:
        raise SystemExit(f"--seq {args.seq} is too short for {n_image} image tokens + 2 vision markers + "
                         f"--completion {args.completion} + 2 text tokens (or --rows/--completion < 1); "
                         "raise --seq or shrink --image")
    return n_image, n_text


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = call()
    synchronize(device)
    return time.perf_counter() - start, result


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> tuple[list[float], Any]:
    """Wall time of each timed call (device synchronized around it); returns times and the last result."""
    result = None
    for _ in range(warmup):
        result = step()
    times = []
    for _ in range(steps):
        elapsed, result = timed(step, device)
        times.append(elapsed)
    return times, result


def matmul_flops(device: torch.device, size: int) -> float:
    """Measured dense matmul rate (FLOP/s): bf16 on CUDA, fp32 on CPU; random data (zeros run faster)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    times, _ = time_steps(lambda: a @ b, device, warmup=3, steps=10)
    return 2 * size**3 / statistics.median(times)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def run_kit(policy: LoadedModel, rows: list, args: argparse.Namespace, mods: set[str]) -> dict[str, Any]:
    """The kit's update: GRPOTrainer.update on fresh Sample rows each step, as in training (the trainer keeps
    reference log-probs per sample, so reusing the rows would skip the reference after step 1)."""
    peft_model, device = policy.model, policy.device
    buckets = "nobuckets" not in mods
    trainer_cfg = TrainerConfig(micro_batch_tokens=args.micro_batch_tokens or args.rows * args.seq,
                                max_seq_length=args.seq, length_buckets=buckets,
                                max_padding=0.1 if "pad10" in mods else 1.0,
                                compile="compile" in mods)
    kl_ctl = 0.0 if "nokl" in mods else 0.01
    behaviour = reference_logprobs(policy, rows, device)  # = the policy's at step 0 (LoRA B is zero)
    trainer = (one_rank_trainer(policy, GRPOConfig(kl_ctl=kl_ctl), trainer_cfg) if "fsdp" in mods else
               GRPOTrainer(policy, GRPOConfig(kl_ctl=kl_ctl), trainer_cfg, TEMPERATURE))
    reference_s: list[float] = []
    update_s: list[float] = []
    losses: list[float] = []

    def step() -> dict[str, float]:
        samples = [Sample(TurnSample(p, c, lp, imgs, version=trainer.version), advantage=1.0 if i % 2 == 0 else -1.0)
                   for i, ((p, c, imgs), lp) in enumerate(zip(rows, behaviour))]
        if "prescored" in mods:  # scored as the samples arrive, before (and timed apart from) the update
            seconds, _ = timed(lambda: trainer.score_reference(samples), device)
            reference_s.append(seconds)
        seconds, stats = timed(lambda: trainer.update(samples), device)
        update_s.append(seconds)
        losses.append(stats["loss"])
        return stats

    warmup = max(args.warmup, 3) if "compile" in mods else args.warmup  # compiles (and recompiles once) first
    times, stats = time_steps(step, device, warmup, args.steps)
    if "prescored" in mods:  # the row is the update alone; the reference's time is reference_s
        times = update_s[-args.steps:]
    if "fsdp" in mods:
        trainer.channel.close()  # its keep-alive thread ends with the path
    result = {"times_s": times, "peak_gib": peak_gib(device), "last_update": stats, "losses": losses,
              "n_params": count(peft_model), "n_trainable": count(peft_model, trainable=True)}
    if reference_s:
        result["reference_s"] = statistics.median(reference_s[-args.steps:])
    if kl_ctl > 0 and args.breakdown and "fsdp" not in mods:
        result["breakdown"] = kit_breakdown(policy, rows, device)
    return result


def one_rank_trainer(policy: LoadedModel, grpo: GRPOConfig, trainer: TrainerConfig) -> Any:
    """A `ShardedTrainer` in a process group of one rank (NCCL on CUDA, gloo on the CPU), joined once per process."""
    import os
    import socket
    from unittest import mock

    from cua_kit import distributed
    from cua_kit.config import load_config

    global _RANKS
    if _RANKS is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        rank_env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # a torchrun worker's variables must not outlive the join: the launcher reads LOCAL_RANK as "placed"
        with mock.patch.dict(os.environ, rank_env):
            _RANKS = distributed.init(load_config(None, [f"model.device={policy.device.type}"]))
    return distributed.ShardedTrainer(policy, grpo, trainer, TEMPERATURE, _RANKS, distributed.Channel(_RANKS))


_RANKS = None  # the one-rank process group of the fsdp paths


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype):
    """The trainer's own rule: bf16 autocast on CUDA for non-fp32 weights."""
    if device.type == "cuda" and dtype != torch.float32:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def reference_logprobs(policy: LoadedModel, rows: list, device: torch.device) -> list[list[float]]:
    """The completions' log-probs under the adapter-disabled model (no grad), one list per row."""
    with torch.no_grad(), autocast(device, policy.dtype), reference_model(policy.model) as m:
        scored = score(m, policy.processor, rows, TEMPERATURE, device)
    return [scored.logprobs[i, -len(c):].float().tolist() for i, (_, c, _) in enumerate(rows)]


def kit_breakdown(policy: LoadedModel, rows: list, device: torch.device) -> dict[str, float]:
    """Where an update's extra time goes: the CPU collate (image processing) and the reference forward."""
    cpu_rows = [Row(p + c, imgs) for p, c, imgs in rows]
    collate_times, _ = time_steps(lambda: collate(policy.processor, cpu_rows, "cpu"), torch.device("cpu"),
                                  warmup=0, steps=2)  # warm already: the timed updates ran first
    ref_times, _ = time_steps(lambda: reference_logprobs(policy, rows, device), device, warmup=0, steps=2)
    return {"collate_s": statistics.median(collate_times), "reference_forward_s": statistics.median(ref_times)}


def run_peft(model: Any, processor: Any, rows: list, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The naive baseline: plain get_peft_model on the same targets, labels= loss, AdamW."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from cua_kit.models.lora import resolve_targets

    regex = resolve_targets(model, LORA.groups).regex
    peft_model = get_peft_model(model, PeftLoraConfig(r=LORA.r, lora_alpha=LORA.alpha, target_modules=regex))
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
    batch = collate(processor, [Row(p + c, imgs) for p, c, imgs in rows], device)
    labels = batch["input_ids"].clone()
    labels[:, : -args.completion] = -100  # loss on the completion only (left-padded: every completion ends the row)

    def step() -> float:
        loss = peft_model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    times, loss = time_steps(step, device, args.warmup, args.steps)
    return {"times_s": times, "peak_gib": peak_gib(device), "last_loss": loss,
            "n_params": count(peft_model), "n_trainable": count(peft_model, trainable=True)}


def count(model: Any, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def summarise(shape: str, path: str, run: dict[str, Any], tokens: int, flops: float) -> dict[str, Any]:
    if "error" in run:
        return {"shape": shape, "path": path, "tokens_per_step": tokens, **run}
    tokens = run.get("trl_tokens_per_step", tokens)  # TRL templates its own prompts (bench/trl_grpo.py)
    step_s = statistics.median(run["times_s"])
    mfu = 6 * run["n_params"] * tokens / step_s / flops
    return {"shape": shape, "path": path, "step_s": step_s, "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s, "peak_gib": run["peak_gib"], "mfu": mfu,
            "adam_state_gib": 8 * run["n_trainable"] / 2**30, **run}  # fp32 m and v of the LoRA weights


def run_path(path: str, config: Any, processor: Any, rows: list, args: argparse.Namespace, device: torch.device,
             dtype: torch.dtype) -> dict[str, Any]:
    """One path on a fresh model (peft wraps the model in place); a failure (e.g. out of memory) becomes
    the row's error, with the peak memory reached, so one failing path does not end the run."""
    base, mods = parse_path(path)
    reset_memory(device)
    torch.manual_seed(0)
    model = None
    try:
        model = build_model(config, device, dtype, attn="eager" if "eager" in mods else "sdpa",
                            checkpointing="nogc" not in mods)
        if base == "peft":
            return run_peft(model, processor, rows, args, device)
        if base == "load":
            return run_loaded(model, processor, rows, args, device, dtype, loader=mods.pop())
        if base == "trl":
            return bench_module("trl_grpo").run_trl(model, processor, rows, args, device, dtype, LORA,
                                                    beta=0.0 if "nokl" in mods else 0.01, temperature=TEMPERATURE,
                                                    checkpointing="nogc" not in mods)
        peft_model, targets = apply_lora(model, LORA)
        return run_kit(LoadedModel(peft_model, processor, "qwen3_vl", device, dtype, targets), rows, args, mods)
    except Exception as exc:  # noqa: BLE001 -- reported in the table and the JSON
        return {"error": f"{type(exc).__name__}: {str(exc)[:500]}", "peak_gib": peak_gib(device)}
    finally:
        del model


def run_loaded(model: Any, processor: Any, rows: list, args: argparse.Namespace, device: torch.device,
               dtype: torch.dtype, loader: str) -> dict[str, Any]:
    """The model saved to a folder (bf16, with the processor) and loaded back through `load_model` with the given
    loader, its LoRA put on by that loader (Unsloth: FastVisionModel.get_peft_model), then the kit's update.
    Loading time and peak memory of the loaded model are what Unsloth claims to improve."""
    with tempfile.TemporaryDirectory(dir=args.save_dir or None) as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        model.to("meta")  # free the device before loading the copy
        reset_memory(device)
        cfg = ModelConfig(name=folder, loader=loader, device=str(device), dtype=str(dtype).removeprefix("torch."),
                          attn_implementation="sdpa", gradient_checkpointing=True)
        load_s, policy = timed(lambda: load_model(cfg, LORA), device)
        result = run_kit(policy, rows, args, set())
    return {**result, "load_s": load_s}


def bench_module(name: str) -> Any:
    """A sibling script of bench/ as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_shape(name: str, tok: Any, processor: Any, args: argparse.Namespace, device: torch.device,
                dtype: torch.dtype, flops: float) -> list[dict[str, Any]]:
    """Every path on a fresh model each, in the order given (baseline first)."""
    rows = make_rows(tok, args)
    tokens = sum(len(p) + len(c) for p, c, _ in rows)
    config = qwen3_vl_config(SHAPES[name], tok)
    out = []
    for path in args.paths:
        out.append(summarise(name, path, run_path(path, config, processor, rows, args, device, dtype), tokens, flops))
        print(f"  {name} {path}: " + (f"{out[-1]['step_s']:.3f} s/step" if "step_s" in out[-1] else out[-1]["error"]),
              flush=True)
    compare_sharded(out)
    return out


def compare_sharded(results: list[dict[str, Any]]) -> None:
    """Each fsdp row beside the same path without fsdp (same rows, same updates): the largest |loss difference|
    and the ratios of step time and peak memory."""
    by_path = {r["path"]: r for r in results if "losses" in r}
    for r in by_path.values():
        base, mods = parse_path(r["path"])
        twin = by_path.get("-".join([base, *[m for m in r["path"].split("-")[1:] if m != "fsdp"]]))
        if "fsdp" in mods and twin is not None:
            r["unsharded"] = twin["path"]
            r["loss_vs_unsharded"] = max(abs(a - b) for a, b in zip(r["losses"], twin["losses"]))


def print_table(results: list[dict[str, Any]], flops: float) -> None:
    print(f"\nmatmul: {flops / 1e12:.0f} TFLOP/s measured")
    print(f"{'shape':>5} {'path':>24} {'params':>8} {'tokens':>6} {'s/step':>7} {'tok/s':>7} {'peak GiB':>8} "
          f"{'MFU':>6} {'vs peft':>7}")
    base = {r["shape"]: r["step_s"] for r in results if r["path"] == "peft" and "step_s" in r}
    for r in results:
        if "error" in r:
            print(f"{r['shape']:>5} {r['path']:>24} failed (peak {r['peak_gib']:.1f} GiB): {r['error'][:120]}")
            continue
        ratio = f"{base[r['shape']] / r['step_s']:.2f}x" if r["shape"] in base else "-"
        print(f"{r['shape']:>5} {r['path']:>24} {r['n_params'] / 1e9:>7.2f}B {r['tokens_per_step']:>6} "
              f"{r['step_s']:>7.3f} {r['tokens_per_s']:>7.0f} {r['peak_gib']:>8.1f} {100 * r['mfu']:>5.1f}% {ratio:>7}")
    for r in results:
        extra = [f"{k} {r[k]:.3f} s" for k in ("reference_s", "generate_s", "score_s", "load_s") if k in r]
        if "loss_vs_unsharded" in r:
            twin = next(t for t in results if t["path"] == r["unsharded"] and t["shape"] == r["shape"])
            extra += [f"losses vs {twin['path']}: largest |difference| {r['loss_vs_unsharded']:.2e}",
                      f"step {r['step_s'] / twin['step_s']:.2f}x, peak {r['peak_gib']:.1f} vs {twin['peak_gib']:.1f} GiB"]
        if "breakdown" in r:
            extra += [f"collate (CPU) {r['breakdown']['collate_s']:.3f} s",
                      f"reference forward {r['breakdown']['reference_forward_s']:.3f} s"]
        if extra:
            print(f"{r['shape']} {r['path']}: " + ", ".join(extra))


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT, e.g. 1280x736") from None
    return w, h


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["2b", "8b"], help="model shapes")
    parser.add_argument("--paths", nargs="+", default=["peft", "kit", "kit-nokl"],
                        help="base[-modifier...]: peft[-nogc|-eager], kit[-nokl|-prescored|-nogc|-compile|-eager|"
                             "-nobuckets|-pad10|-fsdp], trl[-nokl|-nogc], load-hf, load-unsloth (module docstring)")
    parser.add_argument("--rows", type=int, default=4, help="sequences per step")
    parser.add_argument("--mixed", action="store_true", help="every other screenshot half as high: two row lengths")
    parser.add_argument("--micro-batch-tokens", type=int, default=0,
                        help="kit's trainer.micro_batch_tokens (0: rows x seq, one micro-batch)")
    parser.add_argument("--save-dir", default="", help="folder for the load-* paths' model copy (default: the temp dir)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                        help="skip timing the kit's collate and reference forward apart (costly at 32B)")
    parser.add_argument("--seq", type=int, default=1196, help="tokens per sequence, prompt + completion")
    parser.add_argument("--completion", type=int, default=128, help="completion tokens per sequence")
    parser.add_argument("--image", type=parse_size, default=(1280, 736), help="screenshot WIDTHxHEIGHT")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--matmul-size", type=int, default=0, help="square matmul side (0: 8192 CUDA, 512 CPU)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--out", default="bench/results/train_step.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible; use --device cpu (with --shape tiny)")
    if device.type == "cpu" and set(args.shape) - {"tiny"}:
        raise SystemExit(f"--shape {' '.join(args.shape)} on the CPU would need tens of GiB and hours: "
                         "the 2b/8b shapes are for a CUDA GPU; on the CPU use --shape tiny")
    token_layout(args)  # fail on bad sizes or paths before any model is built
    for path in args.paths:
        parse_path(path)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the kit's dtype=auto rule
    tok = build_tokenizer(1024)
    processor = _processor("qwen3_vl", tok)
    flops = matmul_flops(device, args.matmul_size or (8192 if device.type == "cuda" else 512))
    results = [r for name in args.shape for r in bench_shape(name, tok, processor, args, device, dtype, flops)]
    print_table(results, flops)
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "python": platform.python_version(), "matmul_flops": flops,
            "dtype": str(dtype), "mfu_formula": "6 * n_params * tokens_per_step / step_s / matmul_flops",
            "args": {k: v for k, v in vars(args).items()}}
    meta.update(transformers=transformers.__version__, peft=peft.__version__)
    report = {"meta": meta, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
