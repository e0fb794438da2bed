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
# One vLLM server (`cua-kit serve`, the flags a run would use) for every vLLM variant: each run loads its adapters
# under names of its own and unloads them at the end, so the variants differ only in what they measure. It starts
# beside the HF variant, whose first (warm-up, unmeasured) step covers the server's start-up.
PORT=${PORT:-8011}
python3 -m cua_kit.cli serve configs/bench_8b_synth.yaml "${COMMON[@]}" vllm.port=$PORT > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
VLLM=(rollout.backend=vllm vllm.api_base=http://127.0.0.1:$PORT)
wait_server() { until grep -q "ready at" "$OUT/serve.log"; do kill -0 $SERVER || { tail -30 "$OUT/serve.log"; exit 1; }; sleep 2; done; }
if want backends; then
  python3 bench/train_throughput.py configs/bench_8b_synth.yaml --steps "$STEPS" --warmup 1 \
    --out "$OUT/throughput_hf.json" --common "${COMMON[@]}" --variant hf rollout.backend=hf
  wait_server
  python3 bench/train_throughput.py configs/bench_8b_synth.yaml --steps "$STEPS" --warmup 1 \
    --out "$OUT/throughput_vllm.json" --common "${COMMON[@]}" --variant vllm "${VLLM[@]}"
fi
if want async; then
  wait_server
  python3 bench/train_throughput.py configs/bench_8b_synth.yaml --steps "$STEPS" --warmup 1 \
    --out "$OUT/throughput_async.json" --common "${COMMON[@]}" "${VLLM[@]}" env.step_latency_s=1 \
    --variant sync rollout.max_staleness=0 --variant async rollout.max_staleness=2
fi
