"""bench/train_throughput.py on the CPU: two variants of the quickstart config, each a real `cua-kit train`
process, read back from their traces (the GPU rows of docs/BENCHMARKS.md come from the same script)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_two_variants_run_and_their_rates_come_from_the_trace(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "bench" / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    out = tmp_path / "throughput.json"
    results = bench.main(["configs/quickstart.yaml", "--steps", "2", "--warmup", "1", "--out", str(out),
                          "--common", f"output_dir={tmp_path / 'runs'}", "model.adapter_path=",
                          "--variant", "sync", "rollout.max_staleness=0",
                          "--variant", "async", "rollout.max_staleness=1"])
    saved = json.loads(out.read_text())
    assert saved["results"] == results and [r["variant"] for r in results] == ["sync", "async"]
    for r in results:
        assert r["steps"] == 1 and r["seconds"] > 0 and r["episodes"] > 0  # the step after the warm-up
        assert r["episodes_per_hour"] == pytest.approx(r["episodes"] / r["seconds"] * 3600, rel=0.01)
        assert r["logprob_gap_abs"] is None or r["logprob_gap_abs"] >= 0  # None: no step scored a fresh sample
    assert (tmp_path / "runs" / "quickstart" / "bench-async" / "trace.db").exists()
