"""Typed configuration: one dataclass per section, YAML files, dotted command-line overrides.

Every field has a default, a one-line meaning (the docstring-style comment under it) and its units.
Precedence, lowest first: dataclass defaults < YAML file < environment variables < command line.

    cfg = load_config("configs/quickstart.yaml", ["trainer.max_steps=5", "--lora-r", "8"])

An unknown key fails at load time with the closest valid name; a wrong type or value fails with the
field's name and what is allowed (`ConfigError`, one line): each section's `rules()` lists, next to its
fields, what every field with a meaning allows. YAML is read with a loader that bounds file size, nesting
depth and alias expansion (`read_yaml`), so a hostile or broken file is one line too, never a hang. The
original system's flags (`--model-name`, `--lora-r`, `--resume`, ...) and env vars (`MODEL_NAME`,
`OUTPUT_DIR`, ...) map onto fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value that can't be used; the message names the field and what is allowed."""


Rule = tuple[str, bool, str]  # (field, is the value allowed?, what is allowed): a section's `rules()`
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}")  # a folder name, never a path
INT_MAX = 2**31 - 1  # counts, sizes and seeds fit in 32 bits (numpy seeds, tensor sizes)


def _finite(x: float, low: float = -math.inf, low_open: bool = False) -> bool:
    """x is finite and >= low (> low with low_open)."""
    return math.isfinite(x) and (x > low if low_open else x >= low)


def _is_name(text: str) -> bool:
    return bool(NAME_PATTERN.fullmatch(text))


def _is_relative_folder(text: str) -> bool:
    """A relative path that stays inside its parent folder (no '..', not absolute)."""
    parts = Path(text).parts
    return bool(parts) and not Path(text).is_absolute() and ".." not in parts


@dataclass
class ModelConfig:
    name: str = "builtin:qwen3_vl-tiny"
    """Hub id (Qwen/Qwen3-VL-8B-Instruct), a local folder, or builtin:<arch>-<size> (built offline on first use)."""
    loader: Literal["hf", "unsloth"] = "hf"
    """hf = plain transformers ("verification mode"); unsloth = FastVisionModel ("accelerated mode", GPU only)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; auto = bfloat16 on CUDA, float32 on CPU."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel passed to from_pretrained."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (docs/training.md, OOM advice #3)."""
    load_in_4bit: bool = False
    """QLoRA-style 4-bit base weights (unsloth loader only). Env var LOAD_IN_4BIT."""
    coord_mode: Literal["relative", "absolute"] = "relative"
    """Model coordinates: relative 0-999 grid (Qwen3-VL) or absolute pixels (Qwen2.5-VL)."""
    cache_dir: str = "~/.cache/cua-kit/models"
    """Where builtin: models are built and kept (folder)."""
    adapter_path: str = ""
    """Warm-start LoRA adapter (peft folder, e.g. the output of `cua-kit sft`); empty = a fresh adapter."""

    def rules(self) -> list[Rule]:
        return [("name", bool(self.name.strip()), "a Hub id, a folder or builtin:<arch>-<size>, not empty"),
                ("device", bool(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device)),
                 "auto, cpu, mps, cuda or cuda:N"),
                ("cache_dir", bool(self.cache_dir.strip()), "a folder, not empty")]


@dataclass
class LoraConfig:
    enabled: bool = True
    """Train a LoRA adapter (False = full fine-tuning is not supported; env var USE_LORA)."""
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input (probability); 0 keeps the PPO ratio exactly 1 on fresh samples."""
    groups: list[str] = field(default_factory=lambda: ["vision_attention", "merger", "language"])
    """Target groups: vision_attention, merger (vision->language, 'cross-modal'), language."""

    def rules(self) -> list[Rule]:
        from cua_kit.models.lora import LORA_GROUPS  # local: config stays importable without torch

        unknown = [g for g in self.groups if g not in LORA_GROUPS]
        return [("r", self.r >= 1, "an integer >= 1"), ("alpha", self.alpha >= 1, "an integer >= 1"),
                ("dropout", _finite(self.dropout, 0) and self.dropout < 1, "a number in [0, 1)"),
                ("groups", bool(self.groups) and not unknown,
                 f"a non-empty list of {list(LORA_GROUPS)}" + (f" (unknown group {unknown[0]!r})" if unknown else ""))]


@dataclass
class EnvConfig:
    name: str = "synth"
    """Env backend: synth, miniwob or gbox."""
    task_file: str = "data/synth_tasks.jsonl"
    """Task set (JSONL or YAML) with train/eval splits."""
    train_split: str = "train"
    """Split that training samples tasks from."""
    eval_split: str = "eval"
    """Held-out split for `cua-kit eval`."""
    task_filter: list[str] = field(default_factory=list)
    """Keep only task ids starting with one of these prefixes (empty = all)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Backend-specific constructor options (e.g. screen_size for synth)."""
    pool_size: int = 0
    """Envs kept alive (0 = rollout.max_concurrent_rollouts)."""
    step_timeout_s: float = 30.0
    """Seconds before a step counts as an env error."""
    reset_timeout_s: float = 60.0
    """Seconds before a reset counts as an env error."""
    step_latency_s: float = 0.0
    """Injected latency per step in seconds (benchmarks that imitate cloud boxes)."""

    def rules(self) -> list[Rule]:
        from cua_kit.envs import ENV_BACKENDS  # local: the env registry, without importing any backend

        close = difflib.get_close_matches(self.name, ENV_BACKENDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [("name", self.name in ENV_BACKENDS, f"one of {list(ENV_BACKENDS)}{hint}"),
                ("task_file", bool(self.task_file.strip()), "a JSONL or YAML task file"),
                ("train_split", self.train_split in ("train", "eval"), "train or eval"),
                ("eval_split", self.eval_split in ("train", "eval"), "train or eval"),
                ("pool_size", self.pool_size >= 0, "an integer >= 0 (0 = rollout.max_concurrent_rollouts)"),
                ("step_timeout_s", _finite(self.step_timeout_s, 0, low_open=True), "seconds > 0"),
                ("reset_timeout_s", _finite(self.reset_timeout_s, 0, low_open=True), "seconds > 0"),
                ("step_latency_s", _finite(self.step_latency_s, 0), "seconds >= 0")]


@dataclass
class RolloutConfig:
    backend: Literal["hf", "vllm"] = "hf"
    """Generation backend: hf = transformers in this process (shares the trainer's weights); vllm = a vLLM server
    sent each new LoRA adapter (section vllm, docs/rollout.md)."""
    n_samples: int = 4
    """Episodes per task (GRPO group size). Flag --num-rollouts."""
    max_turns: int = 15
    """Turns before an episode ends unfinished."""
    temperature: float = 0.7
    """Sampling temperature (> 0: groups of identical samples have zero advantage)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    max_new_tokens: int = 1024
    """Tokens generated per turn at most."""
    history_images: int = 2
    """Screenshots kept as images in the prompt (older turns become text lines)."""
    max_pixels: int = 401408
    """Pixel cap per prompt image (resized keeping aspect ratio); 401408 = 512 image tokens."""
    tool_description: Literal["full", "compact"] = "full"
    """Tool description in the system prompt: full (what Qwen3-VL knows) or compact (~60 tokens, tiny models)."""
    max_concurrent_rollouts: int = 8
    """Episodes in flight at once (concurrent envs/boxes)."""
    max_staleness: int = 1
    """Max policy versions a turn may lag the trainer; 0 = synchronous on-policy GRPO."""
    filter_zero_variance: bool = False
    """Drop groups whose rewards are all equal (they carry no gradient); counted either way."""
    format_penalty: float = 0.0
    """Subtracted from the reward of an episode per unparsable action (reward units)."""
    constrain_actions: bool = False
    """Constrained decoding: every completion is a well-formed tool call of the env's tool (xgrammar); the
    scoring forward applies the same mask. Off for models that think before they act (text before the call)."""
    max_batch: int = 8
    """Generation requests batched into one generate call at most."""
    kv_cache: Literal["dynamic", "static"] = "dynamic"
    """HF backend KV cache. static: preallocated, and on CUDA transformers compiles the decode step (2.2-3.9x
    faster generation for the small model on an H100, bench/generate_hf.py); batches are padded to powers of
    two and prompts to multiples of 64 tokens so few shapes compile."""
    batch_wait_ms: float = 5.0
    """Milliseconds the batcher waits to gather requests."""
    max_errors_in_a_row: int = 16
    """The run stops (status failed, with the reason) when episodes end with the same error this many times in
    a row, no episode scored in between: a bug or a dead backend would otherwise loop forever."""

    def rules(self) -> list[Rule]:
        return [("n_samples", self.n_samples >= 2, "an integer >= 2 (GRPO compares the samples of one task)"),
                ("max_turns", self.max_turns >= 1, "an integer >= 1"),
                ("temperature", _finite(self.temperature, 0, low_open=True),
                 "a finite number > 0 (0 makes every sample of a group identical)"),
                ("top_p", _finite(self.top_p, 0, low_open=True) and self.top_p <= 1, "a number in (0, 1]"),
                ("top_k", self.top_k >= 0, "an integer >= 0 (0 = off)"),
                ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
                ("history_images", self.history_images >= 1, "an integer >= 1"),
                ("max_pixels", self.max_pixels >= 1, "an integer >= 1 (pixels)"),
                ("max_concurrent_rollouts", self.max_concurrent_rollouts >= 1, "an integer >= 1"),
                ("max_staleness", self.max_staleness >= 0, "an integer >= 0"),
                ("format_penalty", _finite(self.format_penalty, 0), "a number >= 0"),
                ("max_batch", self.max_batch >= 1, "an integer >= 1"),
                ("batch_wait_ms", _finite(self.batch_wait_ms, 0), "milliseconds >= 0"),
                ("max_errors_in_a_row", self.max_errors_in_a_row >= 1, "an integer >= 1")]


@dataclass
class VLLMConfig:
    api_base: str = ""
    """A vLLM server you already run (http://host:port, started with cua_kit/inference/vllm_server.py; env var
    VLLM_API_BASE); empty = the kit starts its own and owns it (restarts, stops). See docs/rollout.md."""
    python: str = ""
    """Interpreter that runs the kit's server (a venv with vllm, e.g. .venv-vllm/bin/python); empty = this one."""
    gpu_memory_utilization: float = 0.35
    """Share of each server GPU's memory vLLM may take (weights + KV cache); 0.35 leaves the rest to a trainer
    on the same GPU."""
    tensor_parallel_size: int = 1
    """GPUs one server shards the model over."""
    max_model_len: int = 0
    """Prompt + completion tokens per request at most (0 = trainer.max_seq_length: longer samples are dropped anyway)."""
    gpus: str = ""
    """CUDA_VISIBLE_DEVICES of the server, e.g. "1" or "2,3" (split layout); empty = the same GPUs as the trainer."""
    port: int = 0
    """Port of the kit's server on 127.0.0.1 (0 = a free one)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Server weights dtype; auto = the trainer's (model.dtype: bfloat16 on CUDA, float32 on CPU)."""
    enforce_eager: bool = False
    """No CUDA graphs at all (slower decode; for debugging). The vision encoder always runs eager: encoder CUDA
    graphs can apply the wrong LoRA adapter (vLLM PR #52376)."""
    max_lora_rank: int = 0
    """vLLM's LoRA slot rank (0 = the smallest of vLLM's sizes 1, 8, 16, 32, 64, 128, 256, 320, 512 that holds lora.r)."""
    cpu_kv_cache_gib: int = 1
    """KV cache size when the server runs on the CPU (vLLM's VLLM_CPU_KVCACHE_SPACE, GiB); GPUs use gpu_memory_utilization."""
    startup_timeout_s: float = 600.0
    """Seconds the kit waits for its server to answer /health before the run stops with the server's log tail."""
    max_restarts: int = 3
    """Times the kit restarts a server that died (its requests in flight end as policy errors); then the run stops."""
    extra_args: list[str] = field(default_factory=list)
    """More flags for vLLM's server, e.g. ["--max-num-seqs", "64"]."""


@dataclass
class GRPOConfig:
    adv_mode: Literal["std", "no_std", "loo"] = "std"
    """Advantage: (r-mean)/(std+eps), Dr. GRPO's r-mean, or leave-one-out."""
    step_advantage_weight: float = 0.0
    """GiGPO (Feng et al. 2025): each turn's advantage is its episode's plus this weight times a step-level
    advantage, from the turns of the group that saw the same screen (`grpo.step_advantages`). 0 = plain GRPO;
    the paper uses 1."""
    step_gamma: float = 0.95
    """GiGPO's discount: a turn's return is step_gamma^(turns left after it) * the episode's reward."""
    eps_clip: float = 0.2
    """PPO clip range below 1 (and above, unless eps_clip_high is set)."""
    eps_clip_high: float = 0.0
    """Clip-higher (DAPO) upper range; 0 = same as eps_clip."""
    kl_ctl: float = 0.01
    """beta: weight of the k3 KL to the reference (adapter-disabled) model."""
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    """token_mean (DAPO) or seq_mean (GRPO) loss aggregation."""
    decoupled: bool = True
    """Decoupled PPO objective for stale samples (proximal log-probs recomputed before the update)."""
    max_is_weight: float = 5.0
    """Clamp on the behaviour importance weight exp(prox - behav) in the decoupled objective."""
    minibatches: int = 1
    """Optimizer steps per rollout batch (PPO mini-batches, whole groups each); the clip keeps later ones close."""
    rollout_correction: bool = False
    """Recompute the trainer's log-probs of every sample (not only stale ones) before the update, so the decoupled
    objective's weight exp(prox - behav), clamped at max_is_weight, corrects the generation engine's log-prob
    mismatch: truncated importance sampling (verl's rollout TIS, TRL's vllm_importance_sampling_correction).
    Costs one no-grad forward per sample; useful with rollout.backend=vllm."""

    def rules(self) -> list[Rule]:
        return [("eps_clip", _finite(self.eps_clip, 0, low_open=True), "a number > 0"),
                ("eps_clip_high", _finite(self.eps_clip_high, 0), "a number >= 0 (0 = eps_clip)"),
                ("kl_ctl", _finite(self.kl_ctl, 0), "a number >= 0"),
                ("max_is_weight", _finite(self.max_is_weight, 0, low_open=True), "a number > 0"),
                ("minibatches", self.minibatches >= 1, "an integer >= 1"),
                ("step_advantage_weight", _finite(self.step_advantage_weight, 0), "a number >= 0 (0 = off)"),
                ("step_gamma", _finite(self.step_gamma, 0, low_open=True) and self.step_gamma <= 1,
                 "a number in (0, 1]")]


@dataclass
class TrainerConfig:
    max_steps: int = 200
    """Optimizer steps in the run. Flag --max-steps."""
    batch_size: int = 2
    """Groups (tasks) per step; episodes per step = batch_size * n_samples. Flag --batch-size."""
    learning_rate: float = 1e-5
    """AdamW peak learning rate. Flag --learning-rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """LR after warm-up."""
    grad_clip: float = 1.0
    """Max global grad norm (0 = off)."""
    micro_batch_tokens: int = 8192
    """Token budget of one micro-batch (gradient accumulation over micro-batches)."""
    length_buckets: bool = True
    """Sort samples by length (longest first) before packing micro-batches, with at most max_padding of each padded:
    less padding, and equal lengths let sdpa drop the attention mask; the loss is the same sum either way."""
    max_padding: float = 1.0
    """With length_buckets: largest share of a micro-batch's tokens that may be padding (a row that would pad
    more starts a new micro-batch). 1.0 = the budget alone: on an H200 at 8B, splitting 2 x 1,196 + 2 x 716
    tokens into two equal-length micro-batches (0.1) took 2.12 s, one 20%-padded batch 1.34 s (BENCHMARKS.md)."""
    compile: bool = False
    """torch.compile the language model's decoder layers for the update (regional, dynamic shapes; generation stays
    eager). 1.17x faster updates at 8B on an H200 (bench/train_step.py path kit-compile, docs/BENCHMARKS.md);
    off by default, because the first updates pay the compile and the CPU gains nothing."""
    max_seq_length: int = 8192
    """Prompt+completion tokens of one sample at most; longer samples are dropped and counted."""
    seed: int = 1
    """Seed for task order, sampling and init."""
    eval_episodes: int = 0
    """Held-out episodes run before training and at the end (0 = no eval); success is printed and traced."""
    eval_temperature: float = 0.0
    """Sampling temperature for eval (0 = greedy)."""
    eval_sampled: bool = False
    """Each eval also runs the held-out episodes sampled at rollout.temperature (the policy GRPO trains);
    printed beside the first and written to the curve as success_rate_sampled."""
    eval_every: int = 0
    """Also run the held-out eval every N steps (0 = only before and after); the learning curve."""
    stall_timeout_s: float = 3600.0
    """The run stops (status failed, with what the rollouts were doing) when no training step completes for
    this many seconds; held-out evals don't count. While it waits, a line every minute says why."""

    def rules(self) -> list[Rule]:
        return [("max_steps", self.max_steps >= 1, "an integer >= 1"),
                ("batch_size", self.batch_size >= 1, "an integer >= 1"),
                ("learning_rate", _finite(self.learning_rate, 0, low_open=True), "a finite number > 0"),
                ("weight_decay", _finite(self.weight_decay, 0), "a number >= 0"),
                ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0"),
                ("grad_clip", _finite(self.grad_clip, 0), "a number >= 0 (0 = off)"),
                ("micro_batch_tokens", self.micro_batch_tokens >= 1, "an integer >= 1 (tokens)"),
                ("max_seq_length", self.max_seq_length >= 1, "an integer >= 1 (tokens)"),
                ("seed", self.seed >= 0, "an integer >= 0"),
                ("eval_episodes", self.eval_episodes >= 0, "an integer >= 0 (0 = no eval)"),
                ("eval_temperature", _finite(self.eval_temperature, 0), "a number >= 0 (0 = greedy)"),
                ("eval_every", self.eval_every >= 0, "an integer >= 0 (0 = before and after only)"),
                ("stall_timeout_s", _finite(self.stall_timeout_s, 0, low_open=True), "seconds > 0")]


@dataclass
class SFTConfig:
    demos_per_task: int = 1
    """Oracle episodes recorded per train task for behaviour cloning."""
    max_tasks: int = 0
    """Train tasks used for demos (0 = all)."""
    epochs: int = 3
    """Passes over the demonstration turns."""
    batch_size: int = 8
    """Turns per optimizer step."""
    learning_rate: float = 1e-3
    """AdamW learning rate for the SFT LoRA."""
    output: str = "sft"
    """Folder under the run folder where the adapter is written (adapter/ inside it)."""

    def rules(self) -> list[Rule]:
        return [("demos_per_task", self.demos_per_task >= 1, "an integer >= 1"),
                ("max_tasks", self.max_tasks >= 0, "an integer >= 0 (0 = all)"),
                ("epochs", self.epochs >= 1, "an integer >= 1"),
                ("batch_size", self.batch_size >= 1, "an integer >= 1"),
                ("learning_rate", _finite(self.learning_rate, 0, low_open=True), "a finite number > 0"),
                ("output", _is_relative_folder(self.output), "a folder inside the run folder (no '..', not absolute)")]


@dataclass
class SaverConfig:
    freq_steps: int = 50
    """Save a checkpoint every N steps (0 = off); also at the end and on SIGTERM."""
    freq_epochs: int = 1
    """Save at the end of every N epochs (0 = off)."""
    keep_last: int = 3
    """Checkpoints kept (older ones deleted)."""

    def rules(self) -> list[Rule]:
        return [("freq_steps", self.freq_steps >= 0, "an integer >= 0 (0 = off)"),
                ("freq_epochs", self.freq_epochs >= 0, "an integer >= 0 (0 = off)"),
                ("keep_last", self.keep_last >= 1, "an integer >= 1 (the newest checkpoint is always kept)")]


@dataclass
class RecoverConfig:
    mode: Literal["auto", "resume", "off"] = "auto"
    """auto: resume from the latest checkpoint if any; resume: require one; off: start fresh."""
    ckpt_path: str = ""
    """Checkpoint folder to resume from (default: the latest under the run folder)."""


@dataclass
class LoggingConfig:
    verbose: bool = False
    """Print the [GRPO Group i] lines. Flag --verbose."""
    tensorboard: bool = True
    """Write TensorBoard scalars under the run folder."""
    wandb: bool = False
    """Also log to Weights & Biases (needs WANDB_API_KEY). Flag --wandb."""
    wandb_project: str = "cua-kit"
    """W&B project (env var WANDB_PROJECT)."""

    def rules(self) -> list[Rule]:
        return [("wandb_project", bool(self.wandb_project.strip()), "a project name, not empty")]
    progress: bool = True
    """Show a progress bar while held-out evals run (they can take minutes before the first step)."""


@dataclass
class LaunchConfig:
    allocation: str = ""
    """GPU layout (docs/training.md, "Multi-GPU and multi-node"): "" = one process on one GPU (or the CPU);
    "fsdp:dZ" = Z trainer ranks per node under torchrun; "vllm:d1tY+fsdp:dZ" = a vLLM server on Y GPUs of its own."""
    nnodes: int = 1
    """Nodes of the run (torchrun --nnodes); each node runs `cua-kit train` with its own launch.node_rank."""
    node_rank: int = 0
    """This node's rank (torchrun --node-rank); node 0 runs the orchestrator (rank 0) and the vLLM server."""
    rdzv_endpoint: str = ""
    """host:port on node 0 where the nodes meet (torchrun --rdzv-endpoint); needed when nnodes > 1."""
    collective_timeout_s: float = 600.0
    """Seconds a collective of a multi-process run may wait for the other ranks: past it, a dead or stuck rank
    stops every rank with an error (rank 0 pings the others every 10 s while it waits for rollouts)."""

    def rules(self) -> list[Rule]:
        from cua_kit.allocation import SYNTAX, AllocationError, parse

        try:
            parse(self.allocation)
            layout = ""
        except AllocationError as exc:
            layout = str(exc)  # which part, and why
        endpoint = re.fullmatch(r"[^:\s]+:\d+", self.rdzv_endpoint) is not None
        return [("allocation", not layout, layout or SYNTAX), ("nnodes", self.nnodes >= 1, "an integer >= 1"),
                ("node_rank", 0 <= self.node_rank < self.nnodes, "an integer in [0, launch.nnodes)"),
                ("rdzv_endpoint", self.nnodes == 1 or endpoint,
                 "host:port of node 0 (e.g. node0.cluster:29500), needed when launch.nnodes > 1"),
                ("collective_timeout_s", _finite(self.collective_timeout_s, 0) and self.collective_timeout_s > 0,
                 "a number of seconds > 0")]


@dataclass
class Config:
    experiment_name: str = "quickstart"
    """Experiment folder name under output_dir."""
    trial_name: str = "trial0"
    """Trial folder name under the experiment."""
    output_dir: str = "outputs"
    """Root of all runs (env var OUTPUT_DIR, flag --output-dir)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    saver: SaverConfig = field(default_factory=SaverConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def rules(self) -> list[Rule]:
        name = "a name of letters, digits and ._+=- (a folder name, not a path), at most 100 characters"
        return [("experiment_name", _is_name(self.experiment_name), name),
                ("trial_name", _is_name(self.trial_name), name),
                ("output_dir", bool(self.output_dir.strip()), "a folder, not empty")]

    @property
    def run_dir(self) -> Path:
        """outputs/<experiment>/<trial>: everything a run writes lives here."""
        return Path(self.output_dir) / self.experiment_name / self.trial_name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The original system's flags -> dotted keys. A flag mapped to a value (not None) takes no argument.
LEGACY_FLAGS: dict[str, tuple[str, Any]] = {
    "--model-name": ("model.name", None),
    "--lora-r": ("lora.r", None),
    "--lora-alpha": ("lora.alpha", None),
    "--batch-size": ("trainer.batch_size", None),
    "--num-rollouts": ("rollout.n_samples", None),
    "--max-steps": ("trainer.max_steps", None),
    "--learning-rate": ("trainer.learning_rate", None),
    "--output-dir": ("output_dir", None),
    "--resume": ("recover.mode", "resume"),
    "--verbose": ("logging.verbose", True),
    "--wandb": ("logging.wandb", True),
}

# Environment variables users of the original system set -> dotted keys.
ENV_VARS: dict[str, str] = {
    "MODEL_NAME": "model.name",
    "OUTPUT_DIR": "output_dir",
    "LOAD_IN_4BIT": "model.load_in_4bit",
    "USE_LORA": "lora.enabled",
    "WANDB_PROJECT": "logging.wandb_project",
    "VLLM_API_BASE": "vllm.api_base",
}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


# Keys that were replaced: the message says what to write instead.
RENAMED: dict[str, str] = {
    "launch.n_gpus": "launch.n_gpus was replaced by launch.allocation: \"\" = one GPU (model.device=cpu for the CPU), "
                     "\"fsdp:dN\" = N trainer GPUs, \"vllm:d1tY+fsdp:dN\" = a vLLM server on Y more",
}


def _unknown_key(key: str) -> ConfigError:
    if key in RENAMED:
        return ConfigError(RENAMED[key])
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}.{hint} See `cua-kit config show` for all keys.")


def _short(value: Any) -> str:
    """A value for a one-line message: its repr, cut at 80 characters."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**80 else "a huge integer"
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads off/on/yes/no as booleans
            value = {False: "off", True: "on"}[value] if ("off" if not value else "on") in args else value
        if not isinstance(value, typing.Hashable) or value not in args:
            raise ConfigError(f"{key}: {_short(value)} is not allowed; choose one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {_short(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_short(value)}")
        if abs(value) > INT_MAX:
            raise ConfigError(f"{key}={_short(value)} is out of range; allowed: an integer of at most {INT_MAX}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_short(value)}")
        if isinstance(value, int) and abs(value) > INT_MAX or not math.isfinite(value):
            raise ConfigError(f"{key}={_short(value)} is not allowed; allowed: a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {_short(value)}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_short(value)}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_short(value)}")
        return dict(value)
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    """Set dotted `key` on `cfg`, type-checked."""
    parts = key.split(".")
    obj = cfg
    for part in parts[:-1]:
        sub = getattr(obj, part, None) if part in _field_types(type(obj)) else None
        if not dataclasses.is_dataclass(sub):
            raise _unknown_key(key)
        obj = sub
    types_ = _field_types(type(obj))
    if parts[-1] not in types_ or dataclasses.is_dataclass(types_[parts[-1]]):
        raise _unknown_key(key)
    setattr(obj, parts[-1], _coerce(key, value, types_[parts[-1]]))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, except under mapping-typed fields like env.options."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and full not in _MAPPING_KEYS:
            flat.update(_flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


_MAPPING_KEYS = {"env.options"}


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """Turn CLI tokens into {dotted.key: value}. Accepts `a.b=v`, `--a.b=v`, `--a.b v` and legacy flags.

    Values are read as YAML scalars (`5` -> int, `true` -> bool, `[a,b]` -> list).
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, raw = token.partition("=")
        if name in LEGACY_FLAGS:
            key, fixed = LEGACY_FLAGS[name]
            if fixed is not None and not eq:
                out[key] = fixed
                i += 1
                continue
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value")
                raw, i = argv[i + 1], i + 1
            out[key] = _yaml_scalar(raw)
        elif eq:
            out[name.removeprefix("--")] = _yaml_scalar(raw)
        elif token.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[token[2:]], i = _yaml_scalar(argv[i + 1]), i + 1
        else:
            raise ConfigError(f"can't read override {token!r}: write section.key=value (e.g. trainer.max_steps=5)")
        i += 1
    return out


def _yaml_scalar(raw: str) -> Any:
    try:
        return parse_yaml(raw, "override") if raw != "" else ""
    except ConfigError:
        return raw


# ----------------------------------------------------------------------------- bounded YAML
YAML_MAX_BYTES = 1 << 20  # configs are a few kB; task files may be larger (load_tasks passes its own bound)
YAML_MAX_DEPTH = 32  # nesting levels (a 5,000-deep file would otherwise hit Python's recursion limit)
# Nodes after expanding aliases: a 371-byte file of aliases of aliases ("billion laughs") is ~10^9 nodes,
# cheap to parse but not to walk (the config is copied and written out as JSON).
YAML_MAX_NODES = 200_000


class _TooLarge(yaml.YAMLError):
    """A YAML document past one of the bounds above."""


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses deep nesting while composing, and documents that expand (through aliases)
    to too many nodes or into a cycle before anything is constructed."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > YAML_MAX_DEPTH:
                raise _TooLarge(f"nested deeper than {YAML_MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """Nodes in the document under `node` with every alias expanded (shared nodes counted once per use)."""
    if id(node) in sizes:
        if sizes[id(node)] is None:
            raise _TooLarge("an alias refers to a node that contains it (a cycle)")
        return sizes[id(node)]  # type: ignore[return-value]
    sizes[id(node)] = None  # in progress: meeting it again below is a cycle
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > YAML_MAX_NODES:
            raise _TooLarge(f"more than {YAML_MAX_NODES:,} nodes once its aliases are expanded")
    sizes[id(node)] = total
    return total


def parse_yaml(text: str, what: str) -> Any:
    """YAML text -> Python data with the bounds above; ConfigError (one line) for anything else."""
    try:
        loader = _BoundedLoader(text)  # its reader already refuses non-printable characters
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node, {})
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except _TooLarge as exc:
        raise ConfigError(f"{what}: refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what}: not valid YAML: {' '.join(str(exc).split())[:300]}") from None


def read_text_file(path: str | Path, what: str, max_bytes: int = YAML_MAX_BYTES) -> str:
    """The UTF-8 text of a file the user named; ConfigError (one line) if it is missing, not a regular file,
    larger than `max_bytes`, unreadable or not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file (a folder?); pass a file")
    if path.stat().st_size > max_bytes:
        raise ConfigError(f"{what} {path} is {path.stat().st_size:,} bytes; at most {max_bytes:,} are read")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} can't be read: {exc.strerror}") from None


def read_yaml(path: str | Path, what: str = "config file", max_bytes: int = YAML_MAX_BYTES) -> Any:
    """A small YAML file, read with every bound above."""
    return parse_yaml(read_text_file(path, what, max_bytes), f"{what} {path}")


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    return {key: _yaml_scalar(environ[var]) for var, key in ENV_VARS.items() if environ.get(var)}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Config:
    """Build a Config: defaults < YAML at `path` < env vars < `overrides` (CLI tokens or a dict)."""
    cfg = Config()
    if path is not None:
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for key, value in _flatten(data).items():
            _set(cfg, key, value)
    for key, value in _env_overrides(dict(os.environ if environ is None else environ)).items():
        _set(cfg, key, value)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in _flatten(overrides or {}).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every section's `rules()`, then the checks across sections: the first value that is not allowed fails,
    naming its key and what is allowed."""
    sections = [("", cfg)] + [(f"{f.name}.", getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                              if dataclasses.is_dataclass(getattr(cfg, f.name))]
    for prefix, section in sections:
        for name, ok, allowed in section.rules() if hasattr(section, "rules") else []:
            if not ok:
                raise ConfigError(f"{prefix}{name}={_short(getattr(section, name))} is not allowed; allowed: {allowed}")
    for ok, message in _vllm_checks(cfg):
        if not ok:
            raise ConfigError(message)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values (0.26 to 0.32)


def _vllm_checks(cfg: Config) -> list[tuple[bool, str]]:
    v = cfg.vllm
    checks = [
        (0 < v.gpu_memory_utilization <= 1, "vllm.gpu_memory_utilization must be in (0, 1]"),
        (v.tensor_parallel_size >= 1, "vllm.tensor_parallel_size must be >= 1"),
        (v.max_model_len >= 0, "vllm.max_model_len must be >= 0 (0 = trainer.max_seq_length)"),
        (0 <= v.port <= 65535, "vllm.port must be in 0..65535 (0 = a free port)"),
        (v.max_lora_rank == 0 or v.max_lora_rank in VLLM_LORA_RANKS,
         f"vllm.max_lora_rank must be 0 (from lora.r) or one of {list(VLLM_LORA_RANKS)}"),
        (v.startup_timeout_s > 0, "vllm.startup_timeout_s must be > 0"),
        (v.max_restarts >= 0, "vllm.max_restarts must be >= 0"),
        (v.cpu_kv_cache_gib > 0, "vllm.cpu_kv_cache_gib must be > 0"),
        (not v.api_base or v.api_base.startswith(("http://", "https://")),
         f"vllm.api_base must start with http:// or https:// (got {v.api_base!r}); empty = the kit starts its own"),
        (all(g.strip().isdigit() for g in v.gpus.split(",")) if v.gpus else True,
         f"vllm.gpus must be GPU indices separated by commas, e.g. \"1\" or \"2,3\" (got {v.gpus!r})"),
    ]
    if cfg.rollout.backend == "vllm":
        checks += [
            (cfg.lora.enabled, "rollout.backend=vllm needs lora.enabled=true: the server is sent LoRA adapters "
                               "(full-weight sync is not implemented)"),
            (cfg.lora.r <= (v.max_lora_rank or VLLM_LORA_RANKS[-1]),
             f"lora.r={cfg.lora.r} is above vLLM's LoRA rank limit {v.max_lora_rank or VLLM_LORA_RANKS[-1]} "
             "(vllm.max_lora_rank)"),
        ]
    return checks


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, folder: str | Path) -> Path:
    """Write the resolved config next to a run (`config.yaml`); it reloads with load_config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(config_to_yaml(cfg))
    return path


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, one-line doc) for every field: the config reference in docs/."""
    docs = _field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((prefix + f.name, repr(default), docs.get(f.name, "")))
    return rows


def _field_docs(cls: type) -> dict[str, str]:
    """Read the string literal under each field in the class source (attribute docstrings)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[attr-defined]
    return docs
