#!/usr/bin/env bash
# Issue 13's GPU rows (docs/BENCHMARKS.md "The training loop at 8B"): episodes/h of `cua-kit train` at 8B shape on
# 3-turn synth, the HF backend against the vLLM backend, and sync against async with vLLM at 1 s of env latency per
# step, through bench/train_throughput.py (a table on stdout, JSON under $OUT).
# Needs: vLLM importable (pip install -e '.[vllm]', or the parts of bench/carry/ unpacked to /tmp/site) and an
# 8B-shaped model folder (bench/decode_vllm.py --build-only builds one at $MODEL).
# Usage: bash bench/scale_out_gpu.sh [backends|hf|vllm] [async] [start]   (default: backends async; hf ~8 min, vllm
# ~4, async ~6 on an H200; start only starts the server). KEEP_SERVER=1 leaves the server running (in its own
# session) after the script; a later call finds it by its pid file, reuses it, and stops it at the end unless
# KEEP_SERVER=1 again: so the parts can go in separate device calls, each under the 10-minute cap.
set -euo pipefail
source "$(dirname "$0")/device_env.sh"
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:$PYTHONPATH"
# the carried vLLM leaves flashinfer out (bench/carry/pack.sh): vLLM then samples in PyTorch
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
OUT=${OUT:-bench/results}
MODEL=${MODEL:-/tmp/qwen3vl-8b}
STEPS=${STEPS:-4}
PARTS=("${@:-backends async}")
for p in ${PARTS[*]}; do
  [[ " backends hf vllm async start " == *" $p "* ]] || { echo "unknown part '$p': give backends, hf, vllm, async or start" >&2; exit 2; }
done
want() { [[ " ${PARTS[*]} " == *" $1 "* || ( " ${PARTS[*]} " == *" backends "* && ( $1 == hf || $1 == vllm ) ) ]]; }
[ -f "$MODEL/config.json" ] || python3 bench/decode_vllm.py --model-dir "$MODEL" --build-only
COMMON=(model.name="$MODEL" output_dir=/tmp/bench_runs)
# One vLLM server (`cua-kit serve`, the flags a run would use) for every vLLM variant: each run loads its adapters
# under names of its own and unloads them at the end, so the variants differ only in what they measure. It starts
# beside the HF variant, whose first (warm-up, unmeasured) step covers the server's start-up.
PORT=${PORT:-8011}
SERVE_LOG=${SERVE_LOG:-/tmp/cua-serve-$PORT.log}
SERVE_PID=/tmp/cua-serve-$PORT.pid  # the server's pid, for a later call that reuses it (and stops it at the end)
healthy() { python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; }
if [ -f "$SERVE_PID" ] && kill -0 "$(cat "$SERVE_PID")" 2>/dev/null; then
  SERVER=$(cat "$SERVE_PID")
  echo "reusing the vLLM server already started on port $PORT (pid $SERVER, log: $SERVE_LOG)"
else
  setsid python3 -m cua_kit.cli serve configs/bench_8b_synth.yaml "${COMMON[@]}" vllm.port=$PORT > "$SERVE_LOG" 2>&1 &
  SERVER=$!
  echo $SERVER > "$SERVE_PID"
fi
stop_server() {
  cp "$SERVE_LOG" "$OUT/" 2>/dev/null || true
  [ "${KEEP_SERVER:-0}" = 1 ] && return
  kill $SERVER 2>/dev/null || true  # `cua-kit serve` stops its vLLM child on SIGTERM; give it a minute
  for _ in $(seq 60); do kill -0 $SERVER 2>/dev/null || break; sleep 1; done
  rm -f "$SERVE_PID"
}
trap stop_server EXIT
VLLM=(rollout.backend=vllm vllm.api_base=http://127.0.0.1:$PORT)
wait_server() { until healthy; do kill -0 $SERVER || { tail -30 "$SERVE_LOG"; exit 1; }; sleep 2; done; }
if want hf; then
  python3 bench/train_throughput.py configs/bench_8b_synth.yaml --steps "$STEPS" --warmup 1 \
    --out "$OUT/throughput_hf.json" --common "${COMMON[@]}" --variant hf rollout.backend=hf
fi
if want vllm; then
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
