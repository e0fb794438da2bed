"""`cua-kit train`, `cua-kit sft` and `cua-kit eval`: thin entry points over cua_kit.train/sft/evaluate."""

from __future__ import annotations

import argparse
import asyncio

from cua_kit.cli import _config_and_overrides, _config_args, _load, command, print_json_line
from cua_kit.config import load_config

TRAIN_EPILOG = """examples:
  cua-kit train configs/quickstart.yaml
  cua-kit train configs/quickstart.yaml trainer.max_steps=20 --verbose
  cua-kit train configs/single_gpu.yaml --model-name Qwen/Qwen3-VL-8B-Instruct --lora-r 16 --wandb
  cua-kit train configs/quickstart.yaml --recover.mode=resume --recover.ckpt_path=outputs/quickstart/trial0/checkpoints/checkpoint-10
  cua-kit train configs/multi_gpu.yaml launch.allocation=fsdp:d4                  # 4 trainer GPUs (torchrun)
  cua-kit train configs/quickstart.yaml launch.allocation=fsdp:d2 model.device=cpu  # 2 CPU ranks (gloo)
  cua-kit train configs/multi_gpu.yaml launch.nnodes=2 launch.node_rank=0 launch.rdzv_endpoint=node0:29500"""


@command("train", "GRPO training: async rollouts, updates, checkpoints, logs", TRAIN_EPILOG)(_config_args)
def _train(args: argparse.Namespace, extra: list[str]) -> int:
    from cua_kit import launch
    from cua_kit.train import train

    config, overrides = _config_and_overrides(args, extra)
    cfg = load_config(config, overrides)
    if launch.needs_launcher(cfg):  # a layout: place its processes (torchrun, GPUs, vLLM) and wait for them
        try:
            return launch.run_foreground(*launch.run_command(config, overrides, cfg))
        except launch.LaunchError as exc:
            raise SystemExit(f"train: {exc}") from None
    summary = train(cfg)
    if summary.get("rank", 0) == 0:  # the other ranks of an FSDP run have nothing to add
        at = f" at step {summary['step']}" if "step" in summary else ""
        where = summary["run_dir"]
        reason = f"{summary['reason']} (run folder {where})" if summary.get("reason") else where
        print(f"Run {summary['status']}{at}: {reason}", flush=True)
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
    from cua_kit.evaluate import adapter_folder, per_task_table, run_eval

    cfg = _load(args, extra)
    adapter = adapter_folder(args.checkpoint) if args.checkpoint else None
    loaded = make_model(cfg, adapter_path=adapter)

    async def go():
        policy = make_policy(cfg, loaded)
        try:
            pool = make_pool(cfg)
            try:
                return await run_eval(cfg, policy, pool, make_agent(cfg, loaded.processor), args.episodes,
                                      cfg.run_dir, args.label)
            finally:
                await pool.close()
        finally:
            await policy.close()

    result = asyncio.run(go())
    if "per_task" in result:  # envs with a task_key (MiniWoB++): per-task table, mean over tasks
        print(per_task_table(result))
    print(f"held-out success: {100 * result['success_rate']:.1f}% over {result['episodes']} episodes "
          f"({result['env_errors']} env errors); trace: {result['trace']}")
    if args.json:
        per_task = ("per_task", "task_mean_success_rate", "tasks_scored", "tasks_in_split")
        print_json_line({"episodes": result["episodes"], "success_rate": result["success_rate"],
                         **{k: result[k] for k in per_task if k in result}})
    return 0


SERVE_EPILOG = """examples:
  cua-kit serve configs/single_gpu.yaml vllm.port=8000 vllm.gpu_memory_utilization=0.9
  cua-kit train configs/single_gpu.yaml rollout.backend=vllm vllm.api_base=http://127.0.0.1:8000"""


@command("serve", "start the kit's vLLM server for a config and keep it for later runs (vllm.api_base)",
         SERVE_EPILOG)(_config_args)
def _serve(args: argparse.Namespace, extra: list[str]) -> int:
    """The server `rollout.backend: vllm` would start, with the same flags, run in the foreground until Ctrl-C or
    SIGTERM: runs given `vllm.api_base=<url>` share it (each loads its adapters under names of its own)."""
    import signal

    from cua_kit.inference.vllm import vllm_server
    from cua_kit.inference.vllm_process import ServerStartError

    cfg = _load(args, extra)
    cfg.vllm.api_base = ""  # serve starts a server; it never connects to one
    server = vllm_server(cfg)

    async def serve() -> bool:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        print(f"vLLM server ready at {server.url} (log: {server.log_path}); Ctrl-C stops it", flush=True)
        try:
            while not stop.is_set() and server.alive():
                await asyncio.sleep(0.5)
        finally:
            await server.stop()
        if not stop.is_set():
            print(f"the vLLM server exited on its own; see {server.log_path}", flush=True)
        return stop.is_set()

    try:
        return 0 if asyncio.run(serve()) else 1
    except ServerStartError as exc:
        print(f"error: {exc}", flush=True)
        return 1
