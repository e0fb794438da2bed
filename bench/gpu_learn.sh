#!/usr/bin/env bash
# The GPU learning proof (docs/BENCHMARKS.md): SFT warm start, then GRPO with held-out evals.
# On a machine without the kit installed, device_env.sh installs the wheels in .whl/ to /tmp/site first.
# Writes the L0 task file the proof uses (4,000 train seeds, 100 held-out seeds; disjoint by construction)
# and passes env.task_file to both commands; overrides given here come after, so they win.
# Usage: bash bench/gpu_learn.sh [extra overrides for both commands...]
set -euo pipefail
source "$(dirname "$0")/device_env.sh"
CONFIG=${CONFIG:-configs/learn_synth_gpu.yaml}
# A fresh trial per run: with a fixed trial name, recover.mode=auto would resume the last run's checkpoint
# (seen on a warm GPU box, where outputs/ survives between calls) instead of training from the new SFT.
TRIAL=${TRIAL:-gpu-$(date +%Y%m%d-%H%M%S)}
TASKS=${TASKS:-outputs/learn_synth_gpu/tasks_L0.jsonl}
mkdir -p "$(dirname "$TASKS")"
python3 -m cua_kit.envs.synth --level 0 --train 4000 --eval 100 > "$TASKS"
start=$(date +%s)
RUN=(env.task_file="$TASKS" trial_name="$TRIAL" model.adapter_path="outputs/learn_synth_gpu/$TRIAL/sft/adapter")
python3 -m cua_kit.cli sft "$CONFIG" "${RUN[@]}" "$@"
# TRAIN_WRAP: an optional profiler in front of the GRPO run, e.g. "py-spy record -o prof.json --format speedscope --"
${TRAIN_WRAP:-} python3 -m cua_kit.cli train "$CONFIG" "${RUN[@]}" "$@"
echo "curve: outputs/learn_synth_gpu/$TRIAL/eval/curve.jsonl"
echo "wall time: $(( $(date +%s) - start )) s (SFT + GRPO + evals)"
