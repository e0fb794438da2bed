#!/usr/bin/env bash
# GRPO settings sweep for the CPU quickstart (docs/BENCHMARKS.md "Quickstart on CPU"): several
# `cua-kit train configs/quickstart.yaml` runs at once from one SFT adapter, 2 CPU threads each (so a
# 16-core machine runs 7 like 7 copies of the 2-core dev box), greedy held-out on the 200 eval tasks of
# data/synth_L0.jsonl. Prints each run's curve and step time, and writes $OUT/sweep.json (default /tmp).
# Usage (one run per line of VARIANTS: a name, then overrides):
#   cua-kit sft configs/quickstart.yaml     # the adapter every run starts from
#   VARIANTS=$'lr1e4 trainer.learning_rate=1e-4\nlr2e4 trainer.learning_rate=2e-4' STEPS=80 bash bench/quickstart_sweep.sh
# On a machine without the kit installed, device_env.sh installs the wheels in .whl/ to /tmp/site first.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
export CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=${THREADS:-2} MKL_NUM_THREADS=${THREADS:-2}
mkdir -p outputs/sweep
COMMON=(recover.mode=off model.device=cpu model.adapter_path=outputs/quickstart/trial0/sft/adapter
        trainer.eval_episodes=200 trainer.eval_sampled=false trainer.max_steps=${STEPS:-40}
        trainer.eval_every=${EVAL_EVERY:-20} logging.tensorboard=false saver.freq_steps=1000)
run() { name=$1; shift  # a run past LIMIT seconds is stopped; its curve so far is still reported
  timeout "${LIMIT:-540}" python3 -m cua_kit.cli train configs/quickstart.yaml trial_name="$name" "${COMMON[@]}" "$@" \
    > "outputs/sweep/$name.log" 2>&1; echo "$name rc=$?"; }
while read -r line; do [ -z "$line" ] && continue; run $line & sleep 2; done <<< "${VARIANTS:?one run per line: name overrides...}"
wait
python3 - <<'PY'
import glob, json, os, sqlite3, statistics
report = {}
for log in sorted(glob.glob("outputs/sweep/*.log")):
    name = os.path.basename(log)[:-4]
    curve_file, db = f"outputs/quickstart/{name}/eval/curve.jsonl", f"outputs/quickstart/{name}/trace.db"
    curve = [json.loads(line) for line in open(curve_file)] if os.path.exists(curve_file) else []
    steps = sqlite3.connect(db).execute("select step, success_rate, entropy, time from steps order by step"
                                        ).fetchall() if os.path.exists(db) else []
    gaps = [b[3] - a[3] for a, b in zip(steps, steps[1:])]
    report[name] = {"curve": [(p["step"], p["success_rate"]) for p in curve], "steps": len(steps),
                    "step_s_median": statistics.median(gaps) if gaps else None,
                    "rollout_success_by_10": [round(statistics.mean(s[1] for s in steps[i:i + 10]), 3)
                                              for i in range(0, len(steps), 10)],
                    "entropy_last": steps[-1][2] if steps else None}
    print(name, json.dumps(report[name]))
    if not curve:
        print(open(log).read()[-1500:])
json.dump(report, open(os.path.join(os.environ.get("OUT", "/tmp"), "sweep.json"), "w"), indent=1)
PY
