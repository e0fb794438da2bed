"""Benchmark: decode ms per step of vLLM (offline `vllm.LLM`) vs the kit's HF backend (static cache).

One run on one GPU, the same model and the same prompts for both engines:
  model    a Qwen3-VL-8B-shaped model (bench/train_step.py's SHAPES["8b"], 8.77B params) with random bf16
           weights, the kit's tokenizer and processor (cua_kit/models/tiny.py), vocab padded to 151,936
           as in the real model, `save_pretrained`ed to --model-dir (built once; reused if there).
  prompts  `cua_kit.agent.Agent` prompts (mobile_use, compact tool text): ~950 tokens, one 1024x576
           screenshot each (576 image tokens), distinct random images. vLLM gets the same token ids
           with each image's pad run cut to one pad (vLLM expands it again: 576 tokens) and the same
           PIL images; the run checks that the expanded lengths equal the kit's.
  vllm     `LLM(model_dir, dtype=bfloat16)` with its defaults (torch.compile + CUDA graphs, FlashAttention 3
           on sm_90), prefix caching off; temperature 0.7, `ignore_eos` + `min_tokens` so every
           completion has exactly the asked length, `detokenize=False` (random weights sample ids the
           small tokenizer does not have).
  hf       the kit's `HFPolicy` (kv_cache=static: transformers compiles the decode step), the path of
           bench/generate_hf.py, no LoRA (the same weights as vLLM), `min_new_tokens` forcing the length.
Decode ms per step, prefill apart:
  vllm     each batch is generated with N and with 2N new tokens; (t(2N) - t(N)) / N is one decode step
           of the whole batch (median of --repeats), t(N) - N * step the prefill (+ scheduling).
  hf       a stopping criterion stamps the wall time of every generated token (generate syncs each
           step); the median gap between stamps is one decode step, the time to the first stamp prefill.
Bandwidth limit: a decode step must read the language model's weights (lm_head included, the embedding
table and the vision tower not) and the batch's KV cache; over the device copy bandwidth measured in the
same run (bytes read + written of a 2 GiB copy) that is the least time a step can take. Reported: that
time / the measured step time (= the fraction of the limit reached).

    python bench/decode_vllm.py --model-dir /tmp/qwen3vl-8b --batch 16 64 --out $OUT/decode_vllm.json
    python bench/decode_vllm.py --model-dir /tmp/qwen3vl-8b --build-only       # just build the folder
Needs a CUDA GPU; vLLM for --engines vllm, Unsloth + TRL for --engines unsloth (a load check, no timing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

for p in (Path.cwd(), Path.cwd() / "bench", Path(__file__).resolve().parents[1],
          Path(__file__).resolve().parents[1] / "bench"):
    if (p / "cua_kit").is_dir() or (p / "train_step.py").is_file():
        sys.path.insert(0, str(p))

IMAGE = (1024, 576)  # 576 image tokens; with the Agent's compact prompt ~950 tokens in all
DONE = ".built"  # written last into --model-dir by the builder


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10 after 3 warm-ups)."""
    import torch

    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_()
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n * 2 / statistics.median(times)


# ---------------------------------------------------------------- the model folder

def build(model_dir: Path, shape: str = "8b", device: str = "cuda") -> None:
    """8B-shaped (or --shape) Qwen3-VL, random bf16 weights built on the GPU, saved with the processor."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    from cua_kit.models.tiny import _processor, build_tokenizer
    from train_step import SHAPES, qwen3_vl_config

    start = time.perf_counter()
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / ".building").write_text(str(os.getpid()))
    tok = build_tokenizer(1024)
    processor = _processor("qwen3_vl", tok)
    # the kit's image processor, max_pixels capped at the benchmark's screenshot: vLLM sizes its memory
    # profiling by the largest image the processor allows (16.7M pixels = 16k tokens by default)
    processor.image_processor = Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": 65536, "longest_edge": IMAGE[0] * IMAGE[1]})
    config = qwen3_vl_config(SHAPES[shape], tok)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    lm = model.model.language_model
    decode_params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n) \
        + model.lm_head.weight.numel()
    meta = {"n_params": sum(p.numel() for p in model.parameters()), "decode_weight_bytes": 2 * decode_params,
            "layers": config.text_config.num_hidden_layers,
            "kv_heads": config.text_config.num_key_value_heads,
            "head_dim": config.text_config.head_dim, "vocab": config.text_config.vocab_size,
            "tokenizer_vocab": len(tok), "build_s": None}
    model.save_pretrained(model_dir, max_shard_size="4GB")
    processor.save_pretrained(model_dir)
    meta["build_s"] = round(time.perf_counter() - start, 1)
    (model_dir / "bench_meta.json").write_text(json.dumps(meta, indent=1))
    (model_dir / DONE).write_text("ok")
    (model_dir / ".building").unlink(missing_ok=True)
    log(f"built {meta['n_params'] / 1e9:.2f}B params into {model_dir} in {meta['build_s']} s")


def ensure_model(model_dir: Path, shape: str = "8b", device: str = "cuda") -> dict:
    """Build the folder unless it is built; wait for a builder already running (e.g. in the background)."""
    pid_file = model_dir / ".building"
    while not (model_dir / DONE).exists() and pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
        except (OSError, ValueError):
            break  # the builder died: build again
        time.sleep(1)
    if not (model_dir / DONE).exists():
        import torch

        build(model_dir, shape, device)
        if device == "cuda":
            torch.cuda.empty_cache()  # the built model is gone with build()'s frame
    return json.loads((model_dir / "bench_meta.json").read_text())


def make_requests(processor, n: int) -> list:
    """n Agent prompts (token ids with expanded image pads + the resized PIL image), deterministic."""
    import numpy as np
    from PIL import Image

    from cua_kit.agent import Agent, History

    agent = Agent(processor, "mobile_use", "relative", 1, IMAGE[0] * IMAGE[1], tool_description="compact")
    tasks = ["Open the settings app and turn on airplane mode", "Send a message to Alice saying hello",
             "Set an alarm for 7:30 tomorrow", "Search the web for the weather in Paris"]
    out = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (IMAGE[1], IMAGE[0], 3), dtype=np.uint8)
        out.append(agent.build(History(tasks[i % len(tasks)], [Image.fromarray(pixels)])))
    return out


# ---------------------------------------------------------------- engines (each in its own process)

def engine_vllm(args) -> dict:
    import importlib.util

    if importlib.util.find_spec("flashinfer") is None:
        # vLLM 0.26's samplers import its FlashInfer backend (hence flashinfer) unless this is 0; the carry
        # (bench/carry/pack.sh) leaves flashinfer out, and on sm_90 vLLM falls back to its PyTorch sampler
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    import vllm
    from vllm import LLM, SamplingParams

    from cua_kit.models.loader import load_processor

    prompts_all = make_requests(load_processor(str(args.model_dir)), max(args.batch))
    start = time.perf_counter()
    llm = LLM(model=str(args.model_dir), dtype="bfloat16", max_model_len=4096, max_num_seqs=max(args.batch),
              gpu_memory_utilization=args.gpu_memory, enable_prefix_caching=False, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0},
              compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]})
    startup_s = time.perf_counter() - start
    log(f"vllm {vllm.__version__} ready in {startup_s:.0f} s")

    def generate(prompts, n: int):
        # no per-request seed: seeded requests take a slower sampling path
        sp = SamplingParams(temperature=0.7, top_p=1.0, max_tokens=n, min_tokens=n, ignore_eos=True,
                            detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        lengths = {len(o.outputs[0].token_ids) for o in outs}
        assert lengths == {n}, f"completion lengths {lengths}, expected {n}"
        return dt, outs

    rows = []
    for b in args.batch:
        # vLLM expands each image's placeholder itself (a token prompt whose pads are already expanded
        # would get a second expansion), so it gets the Agent's ids with each pad run cut to one pad
        prompts = [{"prompt_token_ids": collapse_pads(p.ids, args.image_pad_id),
                    "multi_modal_data": {"image": p.images[0]}} for p in prompts_all[:b]]
        _, outs = generate(prompts, 8)  # warm-up
        expanded = [len(o.prompt_token_ids) for o in outs]
        same = expanded == [len(p.ids) for p in prompts_all[:b]]
        log(f"vllm batch {b}: prompts expand to {statistics.mean(expanded):.0f} tokens; "
            f"{'the same lengths as' if same else 'NOT the same lengths as'} the kit's")
        short, long = [], []
        for _ in range(args.repeats):
            short.append(generate(prompts, args.new_tokens)[0])
            long.append(generate(prompts, 2 * args.new_tokens)[0])
        step = (statistics.median(long) - statistics.median(short)) / args.new_tokens
        rows.append({"engine": "vllm", "batch": b, "ms_per_step": 1000 * step,
                     "prefill_s": statistics.median(short) - args.new_tokens * step,
                     "t_n_s": short, "t_2n_s": long, "prompt_tokens": statistics.mean(expanded),
                     "same_prompt_lengths_as_kit": same})
        log(f"vllm batch {b}: {1000 * step:.2f} ms/step, prefill {rows[-1]['prefill_s']:.2f} s")
    return {"rows": rows, "vllm": vllm.__version__, "startup_s": startup_s}


def collapse_pads(ids: list[int], pad: int) -> list[int]:
    out = []
    for t in ids:
        if not (t == pad and out and out[-1] == pad):
            out.append(t)
    return out


def engine_hf(args) -> dict:
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from cua_kit.config import LoraConfig, ModelConfig
    from cua_kit.inference.base import GenerationRequest, SamplingParams
    from cua_kit.inference.hf import HFPolicy
    try:
        from cua_kit.models.loader import load_model
    except ImportError:  # the loader's name before it was renamed
        from cua_kit.models.loader import load_policy as load_model

    class Stamps(StoppingCriteria):
        """Never stops; records the wall time at which each token was generated."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    start = time.perf_counter()
    loaded = load_model(ModelConfig(name=str(args.model_dir), device=args.device), LoraConfig(enabled=False))
    log(f"hf model loaded in {time.perf_counter() - start:.0f} s")
    prompts = make_requests(loaded.processor, max(args.batch))
    n = args.new_tokens
    rows = []
    for b in args.batch:
        stamps = Stamps()
        policy = HFPolicy(loaded, max_batch=b, kv_cache="static",
                          generate_kwargs={"min_new_tokens": n,
                                           "stopping_criteria": StoppingCriteriaList([stamps])})
        requests = [GenerationRequest(p.ids, p.images, SamplingParams(0.7, 1.0, 0, n)) for p in prompts[:b]]
        t0 = time.perf_counter()
        policy.generate_sync(requests)  # warm-up: compiles the static-cache decode step for this shape
        log(f"hf batch {b}: warm-up (compile) {time.perf_counter() - t0:.0f} s")
        steps, prefills, totals = [], [], []
        for _ in range(args.repeats):
            stamps.times.clear()
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            policy.generate_sync(requests)
            totals.append(time.perf_counter() - t0)
            assert len(stamps.times) == n, f"{len(stamps.times)} steps stamped, expected {n}"
            gaps = [b2 - a2 for a2, b2 in zip(stamps.times, stamps.times[1:])]
            steps.append(statistics.median(gaps))
            prefills.append(stamps.times[0] - t0)
        rows.append({"engine": "hf-static", "batch": b, "ms_per_step": 1000 * statistics.median(steps),
                     "prefill_s": statistics.median(prefills), "total_s": totals,
                     "ms_per_step_incl_prefill": 1000 * statistics.median(totals) / n,
                     "prompt_tokens": statistics.mean(len(p.ids) for p in prompts[:b])})
        log(f"hf batch {b}: {rows[-1]['ms_per_step']:.2f} ms/step, prefill {rows[-1]['prefill_s']:.2f} s")
        del policy
    return {"rows": rows}


def engine_unsloth(args) -> dict:
    """Does Unsloth's FastVisionModel load the 8B folder in 16-bit, and does TRL import?"""
    import torch

    t0 = time.perf_counter()
    import unsloth
    from unsloth import FastVisionModel

    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, processor = FastVisionModel.from_pretrained(str(args.model_dir), load_in_4bit=False,
                                                       dtype=torch.bfloat16, use_gradient_checkpointing=False)
    load_s = time.perf_counter() - t0
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    import trl

    out = {"unsloth": unsloth.__version__, "trl": trl.__version__, "import_s": round(import_s, 1),
           "load_s": round(load_s, 1), "model_class": type(model).__name__,
           "processor_class": type(processor).__name__, "param_dtypes": dtypes,
           "n_params": sum(p.numel() for p in model.parameters()),
           "gpu_gib": round(torch.cuda.memory_allocated() / 2**30, 1)}
    log(f"unsloth: {out}")
    return out


ENGINES = {"vllm": engine_vllm, "hf": engine_hf, "unsloth": engine_unsloth}


# ---------------------------------------------------------------- driver

def roofline(meta: dict, bandwidth: float, row: dict, new_tokens: int) -> float:
    """Least ms a decode step can take: weights + the batch's KV at the mean context of the timed steps."""
    ctx = row["prompt_tokens"] + (1.5 * new_tokens if row["engine"] == "vllm" else 0.5 * new_tokens)
    kv = row["batch"] * ctx * meta["layers"] * 2 * meta["kv_heads"] * meta["head_dim"] * 2
    return 1000 * (meta["decode_weight_bytes"] + kv) / bandwidth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/qwen3vl-8b"))
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--new-tokens", type=int, default=64, help="N (vLLM also runs 2N)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--engines", default="vllm,hf,unsloth")
    ap.add_argument("--gpu-memory", type=float, default=0.5, help="vLLM gpu_memory_utilization")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per engine process")
    ap.add_argument("--budget", type=float, default=0,
                    help="seconds for the whole run (0: no limit): an engine gets at most what is left, "
                    "and is skipped when under 60 s are left")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--shape", default="8b", help="bench/train_step.py SHAPES key (tiny: CPU smoke tests)")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for smoke tests of --engines hf")
    ap.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine in this process
    ap.add_argument("--image-pad-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="outputs/bench/decode_vllm.json")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="print one table from several runs' JSON files (e.g. the engines run in separate "
                    "calls on the same machine), then exit")
    args = ap.parse_args()
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {**runs[0], "engines": {k: v for r in runs for k, v in r["engines"].items()}}
        print_table(merged, int(runs[0]["args"]["new_tokens"]))
        return
    if args.engine:
        result = ENGINES[args.engine](args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    import torch
    import transformers

    if args.build_only:
        ensure_model(args.model_dir, args.shape, args.device)
        return
    bandwidth = copy_bandwidth() if args.device == "cuda" else float("nan")
    log(f"device copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    meta = ensure_model(args.model_dir, args.shape, args.device)
    from cua_kit.models.loader import load_processor

    args.image_pad_id = load_processor(str(args.model_dir)).tokenizer.convert_tokens_to_ids("<|image_pad|>")
    results: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                     "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version(),
                     "copy_bandwidth_Bps": bandwidth, "model": meta,
                     "args": {k: str(v) for k, v in vars(args).items()},
                     "engines": {}}
    t_start = time.perf_counter()
    for engine in args.engines.split(","):
        timeout = args.timeout
        if args.budget:
            left = args.budget - (time.perf_counter() - t_start)
            if left < 60:
                log(f"engine {engine}: skipped, {left:.0f} s of --budget left")
                results["engines"][engine] = {"error": "skipped: out of --budget"}
                continue
            timeout = int(min(timeout, left - 5))
        cmd = [sys.executable, __file__, "--engine", engine, "--model-dir", str(args.model_dir),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--gpu-memory",
               str(args.gpu_memory), "--image-pad-id", str(args.image_pad_id), "--device", args.device,
               "--batch", *map(str, args.batch)]
        log(f"engine {engine}: start")
        t0 = time.perf_counter()
        # the engine's output is echoed as it comes (a long run shows where it is) and kept for the JSON
        # in its own process group: a timeout (or a leftover vLLM engine-core child) is ended with the group
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        timer = threading.Timer(timeout, kill_group, (proc,))
        timer.start()
        lines = []
        for text_line in proc.stdout:
            lines.append(text_line)
            if not text_line.startswith("RESULT "):
                print(f"  [{engine}] {text_line}", end="", flush=True)
        rc = proc.wait()
        rc = "timeout" if not timer.is_alive() and rc != 0 else rc
        timer.cancel()
        kill_group(proc)
        out, err = "".join(lines), ""
        line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
        wall = round(time.perf_counter() - t0, 1)
        if line:
            results["engines"][engine] = {**json.loads(line[7:]), "wall_s": wall}
        else:
            tail = (out + err)[-3000:]
            results["engines"][engine] = {"error": f"rc={rc}", "tail": tail, "wall_s": wall}
            print(f"--- engine {engine} failed (rc={rc}); output tail:\n{tail}", flush=True)
        log(f"engine {engine}: done in {wall} s")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    print_table(results, args.new_tokens)
    Path(args.out).write_text(json.dumps(results, indent=1))


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def print_table(results: dict, new_tokens: int) -> None:
    meta, bw = results["model"], results["copy_bandwidth_Bps"]
    print(f"\n{results['device']}, torch {results['torch']}, transformers {results['transformers']}, "
          f"vllm {results['engines'].get('vllm', {}).get('vllm', '-')}; copy bandwidth {bw / 1e12:.2f} TB/s; "
          f"model {meta['n_params'] / 1e9:.2f}B, decode reads {meta['decode_weight_bytes'] / 1e9:.1f} GB "
          "of weights")
    print(f"{'engine':<10}{'batch':>6}{'ms/step':>9}{'tok/s':>8}{'prefill s':>10}{'limit ms':>9}"
          f"{'of limit':>9}{'vs hf':>7}")
    hf = {r["batch"]: r["ms_per_step"] for r in results["engines"].get("hf", {}).get("rows", [])}
    for name in ("vllm", "hf"):
        for r in results["engines"].get(name, {}).get("rows", []):
            limit = roofline(meta, bw, r, new_tokens)
            r["limit_ms"], r["fraction_of_limit"] = limit, limit / r["ms_per_step"]
            r["tokens_per_s"] = 1000 * r["batch"] / r["ms_per_step"]
            vs = f"{hf[r['batch']] / r['ms_per_step']:.2f}x" if r["batch"] in hf else "-"
            print(f"{r['engine']:<10}{r['batch']:>6}{r['ms_per_step']:>9.2f}{r['tokens_per_s']:>8.0f}"
                  f"{r['prefill_s']:>10.2f}{limit:>9.2f}{100 * r['fraction_of_limit']:>8.0f}%{vs:>7}")
    u = results["engines"].get("unsloth")
    if u:
        print(f"unsloth: {json.dumps(u)[:600]}")


if __name__ == "__main__":
    main()
