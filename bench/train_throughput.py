"""Benchmark: episodes per hour of the real training loop (`cua-kit train`), one variant against another.

Each variant is a set of dotted overrides on one config (e.g. `rollout.backend=hf` vs `rollout.backend=vllm`,
or `rollout.max_staleness=0` vs `1` for sync vs async); each runs as its own `cua-kit train` process (a fresh
GPU per variant), for --steps GRPO steps with no eval and no periodic checkpoint. The rate is read from the
run's trace: episodes consumed by the trainer over the steps after --warmup, divided by the wall time between
those steps' rows (so start-up, model loading and compilation are left out). Prints a table with each variant's
ratio to the first, writes JSON.

    python bench/train_throughput.py configs/bench_8b_synth.yaml --steps 6 \\
        --variant hf rollout.backend=hf --variant vllm rollout.backend=vllm
    python bench/train_throughput.py configs/quickstart.yaml --steps 3 --warmup 1 \\
        --variant sync rollout.max_staleness=0 --variant async rollout.max_staleness=1 --common env.step_latency_s=1
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from cua_kit.config import load_config
from cua_kit.trace import queries


def run_variant(config: str, name: str, overrides: list[str], common: list[str], steps: int) -> Path:
    """One `cua-kit train` run of the variant; returns its run folder."""
    fixed = [f"trial_name=bench-{name}", "recover.mode=off", f"trainer.max_steps={steps}", "trainer.eval_episodes=0",
             "saver.freq_steps=0", "saver.freq_epochs=0"]
    args = [*common, *overrides, *fixed]
    cfg = load_config(config, args)  # a bad override fails here, before any process starts
    print(f"== {name}: cua-kit train {config} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "cua_kit.cli", "train", config, *args], check=True)
    return cfg.run_dir


def rate(run_dir: Path, warmup: int, n_samples: int) -> dict:
    """Episodes/h over the steps after `warmup`, from the trace's steps rows."""
    db = queries.open_db(run_dir)
    try:
        info = queries.run_info(db)
        rows = queries.steps(db, info["run_id"]) if info else []
    finally:
        db.close()
    window = [r for r in rows if r["step"] > warmup]
    if len(window) < 1 or len(rows) <= warmup:
        raise SystemExit(f"{run_dir}: {len(rows)} steps traced, need more than --warmup {warmup}")
    start = next(r["time"] for r in rows if r["step"] == warmup) if warmup else None
    if start is None:
        raise SystemExit("--warmup must be >= 1: the first step's start time is not traced")
    seconds = window[-1]["time"] - start
    episodes = sum(r["n_groups"] * n_samples for r in window)
    extra = [json.loads(r["extra_json"] or "{}") for r in window]
    return {"steps": len(window), "seconds": round(seconds, 2), "episodes": episodes,
            "episodes_per_hour": round(episodes / seconds * 3600, 1), "s_per_step": round(seconds / len(window), 2),
            "update_s": round(sum(e.get("update_s", 0.0) for e in extra) / len(extra), 2),
            "gen_busy_s": round(sum(e.get("gen_busy_s", 0.0) for e in extra) / len(extra), 2),
            "turns_per_episode": round(sum(e.get("turns_per_episode", 0.0) for e in extra) / len(extra), 2),
            # the generation engine's log-probs vs the trainer's, on samples of the trainer's current version only
            # (none under async, where every sample is a version behind): None when no step had one
            "logprob_gap_abs": max((e["logprob_gap_abs"] for e in extra if "logprob_gap_abs" in e), default=None)}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "OVERRIDE"),
                   help="a name, then its dotted overrides; repeat for each variant (the first is the baseline)")
    p.add_argument("--steps", type=int, default=6, help="GRPO steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="first steps left out of the rate (compilation, warm-up)")
    p.add_argument("--out", default="bench/results/train_throughput.json")
    p.add_argument("--common", nargs="+", default=[], metavar="OVERRIDE", help="overrides for every variant")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")
    results = []
    for name, *overrides in args.variant:
        t0 = time.time()
        run_dir = run_variant(args.config, name, overrides, args.common, args.steps)
        n_samples = load_config(Path(run_dir) / "config.yaml").rollout.n_samples
        results.append({"variant": name, "overrides": overrides, "wall_s": round(time.time() - t0, 1),
                        **rate(Path(run_dir), args.warmup, n_samples)})
    base = results[0]["episodes_per_hour"]
    print(f"{'variant':>10} {'episodes/h':>11} {'ratio':>6} {'s/step':>7} {'update s':>9} {'gen busy s':>10} "
          f"{'turns/ep':>8} {'gap':>8}")
    for r in results:
        print(f"{r['variant']:>10} {r['episodes_per_hour']:>11.1f} {r['episodes_per_hour'] / base:>5.2f}x "
              f"{r['s_per_step']:>7.2f} {r['update_s']:>9.2f} {r['gen_busy_s']:>10.2f} {r['turns_per_episode']:>8.2f} "
              f"{'-' if r['logprob_gap_abs'] is None else format(r['logprob_gap_abs'], '.4f'):>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.node(), "config": args.config, "common": args.common,
                               "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
