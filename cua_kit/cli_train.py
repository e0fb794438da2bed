"""`cua-kit train`, `cua-kit sft` and `cua-kit eval`: thin entry points over cua_kit.train/sft/evaluate."""

from __future__ import annotations

import argparse
import asyncio

from cua_kit.cli import _config_args, _load, command, print_json_line

TRAIN_EPILOG = """examples:
  cua-kit train configs/quickstart.yaml
  cua-kit train configs/quickstart.yaml trainer.max_steps=20 --verbose
  cua-kit train configs/single_gpu.yaml --model-name Qwen/Qwen3-VL-8B-Instruct --lora-r 16 --wandb
  cua-kit train configs/quickstart.yaml --recover.mode=resume --recover.ckpt_path=outputs/quickstart/trial0/checkpoints/checkpoint-10"""


@command("train", "GRPO training: async rollouts, updates, checkpoints, logs", TRAIN_EPILOG)(_config_args)
def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from cua_kit.train import train

    summary = train(_load(args, extra))
    reason = f"{summary['reason']} (run folder {summary['run_dir']})" if summary.get("reason") else summary["run_dir"]
    print(f"Run {summary['status']} at step {summary['step']}: {reason}", flush=True)
    return 0 if summary["status"] in ("finished", "stopped") else 1


@command("sft", "behaviour-cloning warm start on oracle demonstrations (writes a LoRA adapter)",
         "examples:\n  cua-kit sft configs/quickstart.yaml\n  cua-kit sft configs/quickstart.yaml sft.epochs=5")(_config_args)
def _sft(args: argparse.Namespace, extra: list[str]) -> int:
    from cua_kit.sft import run_sft

    run_sft(_load(args, extra))
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--checkpoint", default="", help="checkpoint folder or peft adapter folder (default: no adapter)")
    p.add_argument("--episodes", type=int, default=20, help="held-out episodes to run")
    p.add_argument("--label", default="cli", help="eval folder name under <run>/eval/")
    p.add_argument("--json", action="store_true", help="print a JSON object as the last line")


@command("eval", "held-out success of a checkpoint on the eval split",
         "examples:\n  cua-kit eval configs/quickstart.yaml --checkpoint outputs/quickstart/trial0/checkpoints/checkpoint-20 --episodes 40 --json")(_add_eval)
def _eval(args: argparse.Namespace, extra: list[str]) -> int:
    from cua_kit.build import make_agent, make_model, make_policy, make_pool
    from cua_kit.evaluate import adapter_folder, run_eval

    cfg = _load(args, extra)
    adapter = adapter_folder(args.checkpoint) if args.checkpoint else None
    loaded = make_model(cfg, adapter_path=adapter)

    async def go():
        policy, pool = make_policy(cfg, loaded), make_pool(cfg)
        try:
            return await run_eval(cfg, policy, pool, make_agent(cfg, loaded.processor), args.episodes,
                                  cfg.run_dir, args.label)
        finally:
            await policy.close()
            await pool.close()

    result = asyncio.run(go())
    print(f"held-out success: {100 * result['success_rate']:.1f}% over {result['episodes']} episodes "
          f"({result['env_errors']} env errors); trace: {result['trace']}")
    if args.json:
        print_json_line({"episodes": result["episodes"], "success_rate": result["success_rate"]})
    return 0
