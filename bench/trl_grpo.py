"""TRL's `GRPOTrainer` on the rows of bench/train_step.py (its `trl` path): the update a user would get from TRL,
side by side with the kit's, on the same model object, LoRA, screenshots, batch and completion length.

What is compared, and what is left out:
- The same model (built by train_step.py on the device), the same LoRA (r, alpha, dropout 0, the kit's target
  regex through `peft_config`), the same screenshots (one per prompt), `--rows` sequences per optimizer step
  (`per_device_train_batch_size`, groups of 2 generations), `--completion` tokens per completion, beta 0.01
  (TRL's reference forward with the adapter disabled, as the kit's), gradient checkpointing with
  use_reentrant=False, bf16 on CUDA. TRL's default loss (`dapo`: token-level, as the kit's token_mean).
- TRL's generation is not timed: `_generate_single_turn` (the same signature in TRL 1.15.0 and 1.16.0) returns
  the rows' own completions. Everything TRL does after generation is in the step: prompt templating and image
  processing, the reference forward (`_generate_and_score_completions`, timed apart as score_s), the loss
  forward, backward and AdamW.
- The prompts are TRL's own: the chat template around the screenshot and the rows' text decoded to a string, so
  their token counts are close to, not exactly, the kit's rows; tokens per step are counted from what TRL ran.
times_s = one optimizer step (callback on_step_begin -> on_step_end, device synchronized) minus the canned
generation. TRL is not a kit dependency: `pip install trl` (1.15.0 on the GPU machine, 1.16.0 tested on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dataset(tok: Any, rows: list, n_prompts: int) -> Any:
    """One conversational prompt per group: the row's screenshot and its text ids decoded back to a string."""
    from datasets import Dataset

    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    special = set(tok.all_special_ids)
    items = []
    for i in range(n_prompts):
        prompt, _, images = rows[(2 * i) % len(rows)]
        text = tok.decode([t for t in prompt if t not in special and t != image_id])
        items.append({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                      "image": images[0]})
    return Dataset.from_list(items)


def run_trl(model: Any, processor: Any, rows: list, args: argparse.Namespace, device: torch.device,
            dtype: torch.dtype, lora: Any, beta: float, temperature: float, checkpointing: bool = True
            ) -> dict[str, Any]:
    """TRL's GRPO steps on `model` (wrapped in LoRA by TRL); returns the same keys as train_step's other paths."""
    import trl
    from peft import LoraConfig as PeftLoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cua_kit.models.lora import resolve_targets

    if args.rows % 2:
        raise ValueError(f"--rows {args.rows}: the trl path needs an even number (groups of 2 generations)")
    completions = [list(c) for _, c, _ in rows]
    timing: dict[str, list[float]] = {"generate": [], "score": [], "step": []}
    counted: dict[str, int] = {}

    class CannedGRPO(GRPOTrainer):  # generation replaced by the rows' completions (module docstring)
        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            start = time.perf_counter()
            out = [completions[i % len(completions)] for i in range(len(prompt_ids))]
            counted["tokens"] = sum(len(p) for p in prompt_ids) + sum(len(c) for c in out)
            timing["generate"].append(time.perf_counter() - start)
            return out, None

        def _generate_and_score_completions(self, inputs):
            _synchronize(device)
            start = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            _synchronize(device)
            timing["score"].append(time.perf_counter() - start)
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            _synchronize(device)
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            _synchronize(device)
            timing["step"].append(time.perf_counter() - self.start)

    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, per_device_train_batch_size=args.rows, num_generations=2, max_steps=steps,
            max_completion_length=args.completion, beta=beta, temperature=temperature, learning_rate=1e-5,
            gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=device.type == "cuda" and dtype == torch.bfloat16, use_cpu=device.type == "cpu",
            save_strategy="no", report_to="none", logging_steps=steps, disable_tqdm=True, seed=0)
        regex = resolve_targets(model, lora.groups).regex
        trainer = CannedGRPO(
            model=model, reward_funcs=[_alternating_reward], args=config, processing_class=processor,
            train_dataset=_dataset(processor.tokenizer, rows, steps * args.rows // 2),
            peft_config=PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=regex),
            callbacks=[StepTimer()])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        n_params = sum(p.numel() for p in trainer.model.parameters())
        n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    timed = slice(args.warmup, steps)
    times = [s - g for s, g in zip(timing["step"][timed], timing["generate"][timed])]
    return {"times_s": times, "peak_gib": peak, "n_params": n_params, "n_trainable": n_trainable,
            "trl_tokens_per_step": counted["tokens"], "trl_version": trl.__version__,
            "generate_s": statistics.median(timing["generate"][timed]),
            "score_s": statistics.median(timing["score"][timed])}


def _alternating_reward(completions: list, **_: Any) -> list[float]:
    """1, 0, 1, 0, ...: each group of 2 has one better and one worse completion, so every advantage is non-zero."""
    return [float(i % 2 == 0) for i in range(len(completions))]
