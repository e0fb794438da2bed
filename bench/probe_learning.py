"""Scratch probe for the GPU learning proof (docs/BENCHMARKS.md): SFT in blocks with held-out evals after
each block (greedy and sampled), then GRPO from the first block whose greedy success reaches --pick.

Usage (on the GPU box, after bench/gpu_learn.sh wrote the task file):
    python bench/probe_learning.py --block-steps 150 --sft-budget-s 200 --pick 0.2 [config overrides...]
Prints one JSON line per SFT block and runs `train()` with the picked adapter; the GRPO curve lands in
<run>/eval/curve.jsonl as usual.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch

from cua_kit.config import load_config
from cua_kit.evaluate import run_eval
from cua_kit.inference.hf import HFPolicy
from cua_kit.models.loader import load_policy
from cua_kit.sft import record_demos, train_sft
from cua_kit.train import make_agent, make_pool, tasks_for, train


async def held_out(cfg, loaded, agent, temperature: float, label: str) -> float:
    cfg.trainer.eval_temperature = temperature
    policy, pool = HFPolicy(loaded, cfg.rollout.max_batch, 5), make_pool(cfg)
    try:
        return (await run_eval(cfg, policy, pool, agent, cfg.trainer.eval_episodes, cfg.run_dir, label))["success_rate"]
    finally:
        await policy.close()
        await pool.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-steps", type=int, default=150)
    ap.add_argument("--sft-budget-s", type=float, default=200)
    ap.add_argument("--pick", type=float, default=0.2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config("configs/learn_synth_gpu.yaml", ["model.adapter_path=", "trial_name=probe", *args.overrides])
    torch.manual_seed(cfg.trainer.seed)
    loaded = load_policy(cfg.model, cfg.lora)
    agent = make_agent(cfg, loaded.processor)
    tasks = tasks_for(cfg, "train")[: cfg.sft.max_tasks or None]
    t0 = time.time()
    demos = asyncio.run(record_demos(cfg, agent, tasks, 1))
    print(json.dumps({"demos": len(demos), "record_s": round(time.time() - t0, 1)}), flush=True)
    per_epoch = -(-len(demos) // cfg.sft.batch_size)
    steps, picked, t_sft = 0, None, time.time()
    for block in range(100):
        t = time.time()
        # epochs of a fraction: train on a slice of a shuffled copy so a block is block_steps optimizer steps
        n = args.block_steps * cfg.sft.batch_size
        order = torch.randperm(len(demos), generator=torch.Generator().manual_seed(block)).tolist()
        chunk = [demos[order[i % len(order)]] for i in range(n)]
        losses = train_sft(loaded, chunk, 1, cfg.sft.batch_size, cfg.sft.learning_rate, seed=block, log_every=10**9)
        steps += len(losses)
        train_s = time.time() - t
        greedy = asyncio.run(held_out(cfg, loaded, agent, 0.0, f"sft{steps}g"))
        sampled = asyncio.run(held_out(cfg, loaded, agent, cfg.rollout.temperature, f"sft{steps}s"))
        out = cfg.run_dir / f"sft{steps}" / "adapter"
        loaded.model.save_pretrained(out)
        print(json.dumps({"sft_steps": steps, "epochs": round(steps / per_epoch, 2), "nll": round(sum(losses[-5:]) / 5, 4),
                          "train_s": round(train_s, 1), "greedy": greedy, "sampled": sampled}), flush=True)
        if picked is None and greedy >= args.pick:
            picked = out
            break
        if time.time() - t_sft > args.sft_budget_s:
            break
    picked = picked or out
    print(json.dumps({"picked": str(picked)}), flush=True)
    del loaded
    torch.cuda.empty_cache()
    cfg.model.adapter_path = str(picked)
    cfg.trainer.eval_temperature = 0.0
    print(json.dumps(train(cfg), default=str)[:2000], flush=True)


if __name__ == "__main__":
    main()
