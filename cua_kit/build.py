"""Wiring from a Config to the run's parts: tasks, env pool, agent, model, generation backend, episode settings.

One place for it, so `train`, `evaluate`, `sft`, the CLI, `bench/` and the notebooks build the same parts the
same way (the training recipe in `train.py` only wires them into its loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cua_kit.agent import Agent
from cua_kit.checkpoint import latest_checkpoint
from cua_kit.config import Config, ConfigError
from cua_kit.envs import env_class, load_tasks, make_env
from cua_kit.envs.base import Task
from cua_kit.envs.pool import EnvPool, LatencyEnv
from cua_kit.inference.base import Policy, SamplingParams
from cua_kit.models.loader import LoadedModel
from cua_kit.rollout.episode import EpisodeSettings


def tasks_for(cfg: Config, split: str) -> list[Task]:
    tasks = load_tasks(cfg.env.task_file, split=split, env=cfg.env.name)
    if cfg.env.task_filter:
        tasks = [t for t in tasks if t.id.startswith(tuple(cfg.env.task_filter))]
    if not tasks:
        raise ConfigError(f"env.task_filter={cfg.env.task_filter} keeps no {split} task of {cfg.env.task_file}")
    try:  # a task the backend cannot run stops the run here, not as env errors episode after episode
        for task in tasks:
            env_class(cfg.env.name).validate_task(task)
    except ValueError as exc:
        raise ConfigError(f"{cfg.env.task_file}: {exc}") from None
    return tasks


def make_pool(cfg: Config) -> EnvPool:
    env_class(cfg.env.name)  # an unknown env name fails here, before anything starts

    def factory():
        env = make_env(cfg.env.name, **cfg.env.options)
        return LatencyEnv(env, cfg.env.step_latency_s, 0.0) if cfg.env.step_latency_s > 0 else env

    size = cfg.env.pool_size or cfg.rollout.max_concurrent_rollouts
    return EnvPool(factory, size, step_timeout=cfg.env.step_timeout_s, reset_timeout=cfg.env.reset_timeout_s)


def make_agent(cfg: Config, processor: Any) -> Agent:
    r = cfg.rollout
    return Agent(processor, env_class(cfg.env.name).tool, cfg.model.coord_mode, r.history_images, r.max_pixels,
                 tool_description=r.tool_description)


def attach_action_grammar(cfg: Config, loaded: LoadedModel) -> LoadedModel:
    """`rollout.constrain_actions`: generation and scoring of `loaded` keep to the env tool's call grammar."""
    if cfg.rollout.constrain_actions:
        from cua_kit.inference.grammar import ActionGrammar

        vocab = loaded.model.get_output_embeddings().weight.shape[0]
        loaded.action_grammar = ActionGrammar(loaded.tokenizer, env_class(cfg.env.name).tool, cfg.model.coord_mode,
                                              vocab)
    return loaded


def make_policy(cfg: Config, loaded: LoadedModel) -> Policy:
    """The generation backend of `rollout.backend`: HF in this process (the run's batching and cache settings), or
    a vLLM server (section `vllm`: the kit's own, logging to <run>/vllm.log, or vllm.api_base)."""
    r = cfg.rollout
    if r.backend == "vllm":  # the action grammar (rollout.constrain_actions) comes with `loaded`
        from cua_kit.inference.vllm import VLLMPolicy, max_model_len, vllm_server

        return VLLMPolicy(loaded, vllm_server(cfg), cfg.run_dir / "adapters", max_model_len(cfg))
    from cua_kit.inference.hf import HFPolicy

    return HFPolicy(loaded, r.max_batch, r.batch_wait_ms, kv_cache=r.kv_cache)


def episode_settings(cfg: Config, temperature: float | None = None) -> EpisodeSettings:
    """How episodes sample: the rollout's distribution, or `temperature` instead (evals: 0 = greedy)."""
    r = cfg.rollout
    sampling = SamplingParams(r.temperature if temperature is None else temperature, r.top_p, r.top_k, r.max_new_tokens)
    return EpisodeSettings(sampling, r.max_turns, r.format_penalty)


def resume_checkpoint(cfg: Config) -> Path | None:
    """recover.mode: auto = latest if any; resume = required (ckpt_path or latest); off = none."""
    mode, explicit = cfg.recover.mode, cfg.recover.ckpt_path
    if mode == "off":
        return None
    if explicit:
        return Path(explicit)
    latest = latest_checkpoint(cfg.run_dir / "checkpoints")
    if latest is None and mode == "resume":
        raise ConfigError(f"recover.mode=resume but {cfg.run_dir / 'checkpoints'} has no checkpoint; "
                          "use recover.mode=auto to start fresh, or set recover.ckpt_path")
    return latest


def make_model(cfg: Config, adapter_path: str | None = None, reference_adapter: str | None = None) -> LoadedModel:
    """The run's model (loader, LoRA, optional warm-start adapter and KL reference) with its action grammar."""
    from cua_kit.models.loader import load_model

    return attach_action_grammar(cfg, load_model(cfg.model, cfg.lora, adapter_path=adapter_path,
                                                 reference_adapter=reference_adapter))
