#!/usr/bin/env bash
# The GPU learning proof (docs/BENCHMARKS.md): SFT warm start, then GRPO with held-out evals.
# On a machine without the kit installed, wheels in .whl/ are installed to /tmp/site first.
# Usage: bash bench/gpu_learn.sh [extra overrides for both commands...]
set -euo pipefail
if [ -d .whl ] && ! python3 -c "import peft, sqlite_utils" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
CONFIG=${CONFIG:-configs/learn_synth_gpu.yaml}
start=$(date +%s)
python3 -m cua_kit.cli sft "$CONFIG" "$@"
python3 -m cua_kit.cli train "$CONFIG" "$@"
echo "wall time: $(( $(date +%s) - start )) s (SFT + GRPO + evals)"
