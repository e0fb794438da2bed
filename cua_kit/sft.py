"""Behaviour-cloning warm start: oracle demonstrations -> the policy's action format -> a LoRA.

A random tiny model never emits a valid tool call, so RL alone has no signal: the usual recipe is SFT
on demonstrations, then GRPO. Demos are recorded through the same Agent as rollouts (same prompt, same
images), the target is `agent.target_text(oracle_action)` + `<|im_end|>`, and the loss is the mean
negative log-likelihood of the target tokens. The adapter is saved in plain peft format.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cua_kit.agent import Agent, History
from cua_kit.config import Config, ConfigError, save_config
from cua_kit.envs import make_env
from cua_kit.envs.base import Task
from cua_kit.grpo.scoring import score
from cua_kit.models.loader import LoadedModel


@dataclass
class Demo:
    prompt_ids: list[int]
    target_ids: list[int]
    images: list[Any]


async def record_demos(cfg: Config, agent: Agent, tasks: list[Task], per_task: int) -> list[Demo]:
    """Play the env's oracle on each task and keep (prompt, target) for every turn."""
    env = make_env(cfg.env.name, **cfg.env.options)
    tok = agent.processor.tokenizer
    demos: list[Demo] = []
    try:
        for task in tasks:
            for _ in range(per_task):
                demos += await _one_demo(env, task, agent, tok, cfg.rollout.max_turns)
    finally:
        await env.close()
    return demos


async def _one_demo(env: Any, task: Task, agent: Agent, tok: Any, max_turns: int) -> list[Demo]:
    obs = await env.reset(task)
    history, out = History(obs.instruction or task.instruction), []
    for _ in range(max_turns):
        history.screens.append(obs.screenshot)
        prompt = agent.build(history)
        action = await env.oracle_action()
        target = tok(agent.target_text(action, obs.screenshot.size, prompt) + "<|im_end|>",
                     add_special_tokens=False)["input_ids"]
        out.append(Demo(prompt.ids, target, prompt.images))
        history.action_lines.append(agent.action_line(action, obs.screenshot.size, prompt))
        if action.kind == "finish":
            break
        result = await env.step(action)
        obs = result.observation
        if result.done:
            break
    return out


def train_sft(loaded: LoadedModel, demos: list[Demo], epochs: int, batch_size: int, lr: float,
              seed: int = 1, log_every: int = 10) -> list[float]:
    """Minimise the NLL of the demo targets; returns the loss of every optimizer step."""
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    rng, losses = random.Random(seed), []
    loaded.model.train()
    for epoch in range(epochs):
        order = list(range(len(demos)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = [demos[i] for i in order[start:start + batch_size]]
            scored = score(loaded.model, loaded.processor, [(d.prompt_ids, d.target_ids, d.images) for d in batch],
                           1.0, loaded.device)
            loss = -(scored.logprobs * scored.mask).sum() / scored.mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) % log_every == 0:
                print(f"[{time.strftime('%H:%M:%S')}] SFT epoch {epoch + 1}/{epochs} step {len(losses)} "
                      f"| NLL: {loss.item():.4f}", flush=True)
    return losses


def train_sft_steps(loaded: LoadedModel, demos: list[Demo], steps: int, batch_size: int, lr: float,
                    seed: int = 1, log_every: int = 10**9) -> list[float]:
    """`train_sft` for about `steps` optimizer steps: as many whole epochs over `demos` as that takes (SFT to
    convergence on few demos, not a run cut short); the batch is capped at the number of demos."""
    batch = min(batch_size, len(demos))
    epochs = max(1, math.ceil(steps * batch / len(demos)))
    return train_sft(loaded, demos, epochs, batch, lr, seed, log_every)


def run_sft(cfg: Config) -> Path:
    """`cua-kit sft`: record demos on the train split, train a LoRA, save it to <run>/<sft.output>/adapter."""
    from cua_kit.build import make_agent, tasks_for
    from cua_kit.models.loader import load_model
    from cua_kit.run_folder import make_run_dir

    make_run_dir(cfg)  # an unwritable output_dir fails now, not after the demos and the training
    torch.manual_seed(cfg.trainer.seed)
    loaded = load_model(cfg.model, cfg.lora)
    agent = make_agent(cfg, loaded.processor)
    tasks = tasks_for(cfg, cfg.env.train_split)
    tasks = tasks[: cfg.sft.max_tasks] if cfg.sft.max_tasks else tasks
    demos = asyncio.run(record_demos(cfg, agent, tasks, cfg.sft.demos_per_task))
    print(f"SFT: {len(demos)} demonstration turns from {len(tasks)} tasks", flush=True)
    if not demos:  # training on nothing would save an untrained adapter as if it were a warm start
        raise ConfigError(f"sft: no demonstration turns from {len(tasks)} tasks of env {cfg.env.name!r}: its oracle "
                          "has no action for them (or every demo episode failed). Pick tasks with an oracle "
                          "(docs/environments.md), or skip the warm start")
    train_sft(loaded, demos, cfg.sft.epochs, cfg.sft.batch_size, cfg.sft.learning_rate, cfg.trainer.seed)
    out = cfg.run_dir / cfg.sft.output / "adapter"
    loaded.model.save_pretrained(out)
    save_config(cfg, out.parent)
    print(f"SFT adapter saved to {out}", flush=True)
    return out
