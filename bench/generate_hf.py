"""Benchmark: one batched HF `generate` call of the rollout path, by cache and grammar setting.

Real synth L0 prompts (the learning proof's: 180x320 screens, compact tool text) go through
`HFPolicy.generate_sync`, exactly as rollouts call it, with every completion forced to --new-tokens tokens
(min_new_tokens) so each mode decodes the same number of steps. Modes: the default dynamic KV cache, a
static cache (`rollout.kv_cache: static`; on CUDA transformers compiles the decode step), and each with
the action grammar (`rollout.constrain_actions`). Prints a table, writes JSON.

    python bench/generate_hf.py --model builtin:qwen3_vl-small --device cuda --batch 128
    python bench/generate_hf.py --model builtin:qwen3_vl-tiny --device cpu --batch 8 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import torch

from cua_kit.agent import Agent, History
from cua_kit.config import LoraConfig, ModelConfig
from cua_kit.envs.synth import SynthEnv, synth_tasks
from cua_kit.inference.base import GenerationRequest, SamplingParams
from cua_kit.inference.grammar import ActionGrammar
from cua_kit.inference.hf import HFPolicy
from cua_kit.models.loader import load_model

MODES = {"dynamic": ("dynamic", False), "dynamic+grammar": ("dynamic", True),
         "static": ("static", False), "static+grammar": ("static", True)}


async def prompts(agent: Agent, n: int) -> list[GenerationRequest]:
    env, out = SynthEnv(screen_size=(180, 320)), []
    for task in synth_tasks(0, n, "eval"):
        obs = await env.reset(task)
        prompt = agent.build(History(obs.instruction or task.instruction, [obs.screenshot]))
        out.append(GenerationRequest(prompt.ids, prompt.images, SamplingParams(0.7, 1.0, 0, 0)))
    await env.close()
    return out


def time_mode(policy: HFPolicy, requests: list[GenerationRequest], repeats: int) -> dict:
    policy.generate_sync(requests)  # warm-up (and compilation, for the static cache on CUDA)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        completions = policy.generate_sync(requests)
    seconds = (time.perf_counter() - start) / repeats
    tokens = sum(len(c.token_ids) for c in completions)
    return {"s_per_call": round(seconds, 4), "tokens": tokens, "ms_per_decode_step":
            round(1000 * seconds / max(len(c.token_ids) for c in completions), 2),
            "completions_per_s": round(len(requests) / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:qwen3_vl-small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=33)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default="outputs/bench/generate_hf.json")
    args = ap.parse_args()
    loaded = load_model(ModelConfig(name=args.model, device=args.device), LoraConfig(r=32, alpha=64))
    agent = Agent(loaded.processor, "mobile_use", "relative", 1, 61440, tool_description="compact")
    requests = asyncio.run(prompts(agent, args.batch))
    for r in requests:
        r.sampling = SamplingParams(0.7, 1.0, 0, args.new_tokens)
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    grammar = ActionGrammar(loaded.tokenizer, "mobile_use", "relative", vocab)
    rows = []
    for mode in args.modes.split(","):
        kv_cache, constrained = MODES[mode]
        loaded.action_grammar = grammar if constrained else None
        # the grammar ends each call itself; forcing a length would leave it no token to allow
        forced = {} if constrained else {"min_new_tokens": args.new_tokens}
        policy = HFPolicy(loaded, max_batch=args.batch, kv_cache=kv_cache, generate_kwargs=forced)
        rows.append({"mode": mode, **time_mode(policy, requests, args.repeats)})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["s_per_call"]
    print(f"\n{'mode':<18}{'s/call':>9}{'ms/step':>9}{'compl/s':>9}{'vs ' + rows[0]['mode']:>14}")
    for r in rows:
        print(f"{r['mode']:<18}{r['s_per_call']:>9}{r['ms_per_decode_step']:>9}{r['completions_per_s']:>9}"
              f"{base / r['s_per_call']:>13.2f}x")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "device": device, "batch": args.batch,
                                          "new_tokens": args.new_tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
