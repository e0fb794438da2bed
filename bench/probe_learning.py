"""Probe for the GPU learning proof (docs/BENCHMARKS.md): how strong a warm start do N oracle demos give?

For each N in --demos, a fresh LoRA is trained by SFT on the first N train tasks' demonstrations for
--sft-steps optimizer steps (as many epochs as that takes: SFT to convergence on scarce demos, not an
under-trained run), then held-out success is measured greedy and sampled at rollout.temperature. With
--grpo-steps > 0, GRPO then starts from the adapter whose greedy success is closest to --target.

Usage (on the GPU box, after bench/gpu_learn.sh wrote the task file):
    python bench/probe_learning.py --demos 16,32,64,128 --sft-steps 100 [--grpo-steps 20] [overrides...]
Prints one JSON line per warm start; the GRPO curve lands in <run>/eval/curve.jsonl as usual.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch

from cua_kit.config import Config, load_config
from cua_kit.evaluate import run_eval
from cua_kit.models.loader import LoadedModel
from cua_kit.sft import record_demos, train_sft_steps
from cua_kit.build import make_agent, make_model, make_policy, make_pool, tasks_for
from cua_kit.train import train


async def held_out(cfg: Config, loaded: LoadedModel, temperature: float, label: str) -> float:
    cfg.trainer.eval_temperature = temperature
    policy, pool = make_policy(cfg, loaded), make_pool(cfg)
    try:
        agent = make_agent(cfg, loaded.processor)
        return (await run_eval(cfg, policy, pool, agent, cfg.trainer.eval_episodes, cfg.run_dir, label))["success_rate"]
    finally:
        await policy.close()
        await pool.close()


def warm_start(cfg: Config, n_demos: int, sft_steps: int) -> dict:
    """SFT a fresh LoRA on `n_demos` tasks' demos for `sft_steps` steps; returns its row (adapter saved)."""
    torch.manual_seed(cfg.trainer.seed)
    loaded = make_model(cfg)
    agent = make_agent(cfg, loaded.processor)
    demos = asyncio.run(record_demos(cfg, agent, tasks_for(cfg, "train")[:n_demos], 1))
    t = time.time()
    losses = train_sft_steps(loaded, demos, sft_steps, cfg.sft.batch_size, cfg.sft.learning_rate, cfg.trainer.seed)
    train_s = time.time() - t
    out = cfg.run_dir / f"demos{n_demos}" / "adapter"
    loaded.model.save_pretrained(out)
    row = {"demos": n_demos, "sft_steps": len(losses), "nll": round(sum(losses[-5:]) / len(losses[-5:]), 4),
           "train_s": round(train_s, 1), "greedy": asyncio.run(held_out(cfg, loaded, 0.0, f"demos{n_demos}g")),
           "sampled": asyncio.run(held_out(cfg, loaded, cfg.rollout.temperature, f"demos{n_demos}s")),
           "adapter": str(out)}
    del loaded
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demos", default="16,32,64,128")
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--grpo-steps", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.3)
    ap.add_argument("--config", default="configs/learn_synth_gpu.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, ["model.adapter_path=", "trial_name=probe", *args.overrides])
    rows = []
    for n in (int(x) for x in args.demos.split(",")):
        rows.append(warm_start(cfg, n, args.sft_steps))
        print(json.dumps(rows[-1]), flush=True)
    if args.grpo_steps:
        picked = min(rows, key=lambda r: abs(r["greedy"] - args.target))
        print(json.dumps({"picked": picked["adapter"]}), flush=True)
        cfg.model.adapter_path, cfg.trainer.max_steps, cfg.trainer.eval_temperature = picked["adapter"], args.grpo_steps, 0.0
        print(json.dumps(train(cfg), default=str)[:2000], flush=True)


if __name__ == "__main__":
    main()
