#!/usr/bin/env bash
# Issue 16's GPU rows in one run (docs/BENCHMARKS.md "GRPO update on GPU"): every update-speed change before and
# after, plain peft, TRL, Unsloth vs the hf loader, and the 32B fit, each part through bench/train_step.py (a
# table on stdout, JSON under $OUT). A path that fails (out of memory, a missing package) is a row with its error.
# Usage: bash bench/update_speed.sh [all|8b|mixed|trl|unsloth|32b]...   (default all; ~2-7 min per part on an H200)
set -euo pipefail
source "$(dirname "$0")/device_env.sh"
OUT=${OUT:-bench/results}
PARTS=("${@:-all}")
want() { [[ " ${PARTS[*]} " == *" all "* || " ${PARTS[*]} " == *" $1 "* ]]; }
step() { python3 bench/train_step.py "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
if want 8b; then  # each change against kit (all on) and the combination; 4 x 1,196 tokens, one micro-batch
  step --shape 8b --steps 5 --out "$OUT/update_speed_8b.json" --paths peft peft-nogc kit kit-nokl kit-prescored \
    kit-eager kit-nogc kit-compile kit-prescored-nogc kit-prescored-nogc-compile
fi
if want mixed; then  # rows of 1,196 and 716 tokens under the same 4 x 1,196 budget: in order, sorted, and sorted
  # with at most 10% padding (two equal-length micro-batches instead of one padded one)
  step --shape 8b --steps 5 --mixed --micro-batch-tokens 4784 --out "$OUT/update_speed_mixed.json" \
    --paths peft kit-nobuckets kit kit-pad10
fi
if want trl; then  # TRL's GRPOTrainer (generation replaced by the same completions) beside the kit and peft
  step --shape 8b --steps 5 --out "$OUT/update_speed_trl.json" --paths peft kit trl trl-nokl kit-nokl
fi
if want unsloth; then  # the same folder loaded by model.loader=hf and =unsloth (Unsloth imported first)
  step --shape 8b --steps 5 --save-dir /tmp --out "$OUT/update_speed_unsloth.json" --paths load-hf load-unsloth
fi
if want 32b; then  # batch 8 x 4k tokens (a 1920x1088 screenshot = 2,040 image tokens), the kit's 8,192-token micro-batches
  step --shape 32b --rows 8 --seq 4096 --image 1920x1088 --completion 256 --micro-batch-tokens 8192 \
    --warmup 1 --steps 2 --no-breakdown --out "$OUT/update_speed_32b.json" --paths kit
fi
