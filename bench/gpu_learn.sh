#!/usr/bin/env bash
# The GPU learning proof (docs/BENCHMARKS.md): SFT warm start, then GRPO with held-out evals.
# On a machine without the kit installed, device_env.sh installs the wheels in .whl/ to /tmp/site first.
# Writes the task file the proof uses (level $LEVEL, default 0: 4,000 train seeds, 100 held-out seeds; disjoint
# by construction; TASK_ARGS adds generator flags, e.g. "--apps 1 --settings 1" for level 2) and passes
# env.task_file and env.task_filter to both commands; overrides given here come after, so they win.
# Usage: bash bench/gpu_learn.sh [extra overrides for both commands...]
#   multi-turn (issue 17), plain GRPO and GiGPO on the same warm start recipe, one seed each:
#   LEVEL=2 bash bench/gpu_learn.sh rollout.max_turns=4 rollout.history_images=2 trainer.seed=1
#   LEVEL=2 bash bench/gpu_learn.sh rollout.max_turns=4 rollout.history_images=2 trainer.seed=1 \
#       grpo.step_advantage_weight=1
set -euo pipefail
source "$(dirname "$0")/device_env.sh"
CONFIG=${CONFIG:-configs/learn_synth_gpu.yaml}
# A fresh trial per run: with a fixed trial name, recover.mode=auto would resume the last run's checkpoint
# (seen on a warm GPU box, where outputs/ survives between calls) instead of training from the new SFT.
TRIAL=${TRIAL:-gpu-$(date +%Y%m%d-%H%M%S)}
LEVEL=${LEVEL:-0}
OUTPUT_DIR=${OUTPUT_DIR:-outputs}  # passed as output_dir, and where the SFT adapter is looked for
EXPERIMENT=${EXPERIMENT:-learn_synth_gpu}
TASKS=${TASKS:-$OUTPUT_DIR/$EXPERIMENT/tasks_L$LEVEL.jsonl}
mkdir -p "$(dirname "$TASKS")"
# shellcheck disable=SC2086  # TASK_ARGS is a list of flags
python3 -m cua_kit.envs.synth --level "$LEVEL" --train 4000 --eval 100 ${TASK_ARGS:-} > "$TASKS"
start=$(date +%s)
RUN=(env.task_file="$TASKS" "env.task_filter=[synth-L$LEVEL]" output_dir="$OUTPUT_DIR" experiment_name="$EXPERIMENT"
     trial_name="$TRIAL" model.adapter_path="$OUTPUT_DIR/$EXPERIMENT/$TRIAL/sft/adapter")
python3 -m cua_kit.cli sft "$CONFIG" "${RUN[@]}" "$@"
# TRAIN_WRAP: an optional profiler in front of the GRPO run, e.g. "py-spy record -o prof.json --format speedscope --"
${TRAIN_WRAP:-} python3 -m cua_kit.cli train "$CONFIG" "${RUN[@]}" "$@"
echo "curve: $OUTPUT_DIR/$EXPERIMENT/$TRIAL/eval/curve.jsonl"
echo "wall time: $(( $(date +%s) - start )) s (SFT + GRPO + evals)"
