#!/usr/bin/env bash
# Issue 13's GPU rows (docs/BENCHMARKS.md "vLLM in the training loop"): episodes/h of `cua-kit train` at 8B shape on
# 3-turn synth, the HF backend against the vLLM backend, and sync against async with vLLM at 1 s of env latency per
# step, through bench/train_throughput.py (a table on stdout, JSON under $OUT).
# Needs: vLLM importable (pip install -e '.[vllm]', or the parts of bench/carry/ unpacked to /tmp/site) and an
# 8B-shaped model folder (bench/decode_vllm.py --build-only builds one at $MODEL).
# Usage: bash bench/scale_out_gpu.sh [backends] [async]      (default both; ~6 min each on an H200)
set -euo pipefail
source "$(dirname "$0")/device_env.sh"
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PYTHONPATH"
# the carried vLLM leaves flashinfer out (bench/carry/pack.sh): vLLM then samples in PyTorch
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
OUT=${OUT:-bench/results}
MODEL=${MODEL:-/tmp/qwen3vl-8b}
STEPS=${STEPS:-4}
PARTS=("${@:-backends async}")
want() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }
[ -f "$MODEL/config.json" ] || python3 bench/decode_vllm.py --model-dir "$MODEL" --build-only
COMMON=(model.name="$MODEL" output_dir=/tmp/bench_runs)
if want backends; then
  python3 bench/train_throughput.py configs/bench_8b_synth.yaml --steps "$STEPS" --warmup 1 \
    --out "$OUT/throughput_backends.json" --common "${COMMON[@]}" \
    --variant hf rollout.backend=hf --variant vllm rollout.backend=vllm
fi
if want async; then
  python3 bench/train_throughput.py configs/bench_8b_synth.yaml --steps "$STEPS" --warmup 1 \
    --out "$OUT/throughput_async.json" --common "${COMMON[@]}" rollout.backend=vllm env.step_latency_s=1 \
    --variant sync rollout.max_staleness=0 --variant async rollout.max_staleness=2
fi
