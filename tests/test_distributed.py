"""FSDP2 on the CPU under gloo (issue 14): two trainer ranks take the same steps as one process, checkpoints
move between them, and a rank that dies stops the other with a clear error.

The ranks are real processes on 127.0.0.1 (torch.multiprocessing spawn, or `cua-kit train` under torchrun);
the model is the tiny Qwen3-VL of the real architecture, in fp32 (and once in bf16, the GPU layout).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from cua_kit import launch
from cua_kit.config import GRPOConfig, LoraConfig, ModelConfig, TrainerConfig, load_config
from cua_kit.distributed import owners, partition, plan
from cua_kit.grpo.trainer import GRPOTrainer, Padding, Sample, pack_micro_batches
from cua_kit.inference.base import GenerationRequest, SamplingParams
from cua_kit.inference.hf import HFPolicy
from cua_kit.models.loader import load_model
from cua_kit.rollout.episode import TurnSample

LORA = LoraConfig(r=4, alpha=8)
SAMPLING = SamplingParams(1.0, 1.0, 0, 12)
UPDATES = 3
BF16_LOSS_ATOL = 0.01  # bf16 steps of 2 ranks vs 1 process: ~2e-3 apart on the tiny model (lr 1e-3)
BF16_LORA_ATOL = 0.03  # LoRA weights of magnitude ~0.2, ~4e-3 apart after 3 updates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the plan, no processes
def _rows(lengths: list[int], images: bool = True) -> list[Sample]:
    image = [Image.new("RGB", (32, 32))] if images else []
    return [Sample(TurnSample([0] * n, [1] * 4, [0.0] * 4, image, 0), 1.0, str(i)) for i, n in enumerate(lengths)]


def test_partition_balances_tokens_and_plan_pads_every_rank_to_the_same_forwards():
    rows = _rows([100, 10, 10, 10, 60, 30])
    parts = partition(rows, 2)
    loads = [sum(rows[i].n_tokens for i in p) for p in parts]
    assert sorted(i for p in parts for i in p) == list(range(6)) and max(loads) - min(loads) <= 20
    pack = lambda batch: pack_micro_batches(batch, 64)  # noqa: E731
    per_rank = plan(rows, owners(rows, 1, 2), 2, pack)
    assert len(per_rank[0]) == len(per_rank[1])  # the same number of forwards on every rank, or FSDP hangs
    counted = [s for batches in per_rank for batch in batches if not isinstance(batch, Padding) for s in batch]
    assert sorted(id(s) for s in counted) == sorted(id(s) for s in rows)  # every sample counted exactly once
    assert plan(rows, owners(rows, 1, 1), 1, pack) == [pack(rows)]  # one process: the trainer's own packing
    # two PPO mini-batches: each is split across the ranks (a rank never waits a whole mini-batch for the other)
    grouped = [Sample(s.turn, s.advantage, "ab"[i // 3]) for i, s in enumerate(rows)]
    owner = owners(grouped, 2, 2)
    assert {owner[id(s)] for s in grouped[:3]} == {owner[id(s)] for s in grouped[3:]} == {0, 1}
    lonely = plan(rows[:1], owners(rows[:1], 1, 3), 3, pack)  # more ranks than samples: the others pad
    assert [[isinstance(b, Padding) for b in r] for r in lonely] == [[False], [True], [True]]
    with pytest.raises(ValueError, match="without an image"):
        bad = _rows([5, 5], images=False)
        plan(bad, owners(bad, 1, 2), 2, pack)


# ----------------------------------------------------------------------------- 2 ranks = 1 process
def _samples(model_dir: Path) -> list[Sample]:
    """Real completions of the tiny model for two screenshot prompts (two GRPO groups), with behaviour log-probs."""
    torch.manual_seed(0)
    loaded = load_model(ModelConfig(name=str(model_dir), device="cpu"), LORA)
    policy, samples = HFPolicy(loaded), []
    for group, text in (("a", "Tap OK"), ("b", "Open the settings and turn on airplane mode")):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = loaded.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        image = Image.new("RGB", (128, 128), "white" if group == "a" else "gray")
        ids = loaded.processor(text=[prompt], images=[image], do_resize=False, return_tensors="pt")["input_ids"][0]
        completions = policy.generate_sync([GenerationRequest(ids.tolist(), [image], SAMPLING) for _ in range(4)])
        for c, adv in zip(completions, [1.0, -1.0, 0.5, -0.5]):
            samples.append(Sample(TurnSample(ids.tolist(), c.token_ids, c.logprobs, [image], 0), adv, group))
    return samples


def _warm_start(model_dir: Path, folder: Path) -> Path:
    """A warm-start adapter away from the base model, so the KL to it (the frozen reference) is not trivial."""
    torch.manual_seed(1)
    loaded = load_model(ModelConfig(name=str(model_dir), device="cpu"), LORA)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    loaded.model.save_pretrained(folder)
    return folder


def _configs(budget: int) -> tuple[GRPOConfig, TrainerConfig]:
    # KL to the warm start, two PPO mini-batches, decoupled loss on stale samples: every path of the update
    return (GRPOConfig(kl_ctl=0.05, minibatches=2, decoupled=True),
            TrainerConfig(learning_rate=1e-3, micro_batch_tokens=budget, max_seq_length=4096, seed=3))


def _train(trainer: GRPOTrainer, samples: list[Sample], updates: int = UPDATES, stale: bool = True
           ) -> list[dict[str, float]]:
    out = []
    for _ in range(updates):
        for i, s in enumerate(samples):  # half the samples one version stale: proximal log-probs recomputed
            s.turn.version = trainer.version - (i % 2 if stale else 0)
        out.append(trainer.update(samples))
    return out


def _model(model_dir: Path, warm: Path | None, checkpointing: bool = False, dtype: str = "float32"):
    """A warm start and it frozen as the KL reference (peft `set_adapter`), or a fresh LoRA whose reference is the
    adapter-disabled model (peft `disable_adapter`): both switch adapters on the sharded model. `checkpointing`:
    the loader's non-reentrant gradient checkpointing, recomputing inside FSDP2's hooks."""
    torch.manual_seed(0)
    warm_path = str(warm) if warm else None
    model_cfg = ModelConfig(name=str(model_dir), device="cpu", gradient_checkpointing=checkpointing, dtype=dtype)
    return load_model(model_cfg, LORA, adapter_path=warm_path, reference_adapter=warm_path)


def _rank_main(rank: int, world: int, port: int, work: str, mode: str) -> None:
    """One trainer rank: rank 0 drives (updates, checkpoint, export), the others follow its commands.
    mode: "train" (UPDATES updates), "save" (2 updates, checkpoint, 1 more), "resume" (that checkpoint, 1 more)."""
    from cua_kit import distributed
    from cua_kit.checkpoint import load_checkpoint, save_checkpoint

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    spec = pickle.loads(Path(work, "spec.pkl").read_bytes())
    cfg = load_config(None, ["model.device=cpu", "launch.collective_timeout_s=60"])
    ranks = distributed.init(cfg)
    channel = distributed.Channel(ranks)
    grpo, trainer_cfg = _configs(spec["budget"])
    model = _model(spec["model_dir"], spec["warm"], spec.get("checkpointing", False),
                   spec.get("dtype", "float32"))
    trainer = distributed.ShardedTrainer(model, grpo, trainer_cfg, 1.0, ranks,
                                         channel)
    if rank == 0:
        if mode == "resume":
            load_checkpoint(Path(work, "checkpoints", "checkpoint-2"), trainer)
        stats = _train(trainer, spec["samples"], 2 if mode == "save" else 1 if mode == "resume" else UPDATES,
                       spec.get("stale", True))
        if mode == "save":
            save_checkpoint(Path(work, "checkpoints"), 2, trainer, {"version": trainer.version})
            stats += _train(trainer, spec["samples"], 1)
        trainer.export(Path(work, f"adapters-{mode}"))
        Path(work, f"stats-{mode}.json").write_text(json.dumps(stats))
        channel.close()
    else:
        assert distributed.follow(trainer, channel) == "finished"
    torch.distributed.destroy_process_group()


def _lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}


def _exported(adapters_dir: Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of the newest adapter `ShardedTrainer.export` wrote (a plain peft folder)."""
    from safetensors.torch import load_file

    newest = max(adapters_dir.glob("v*"), key=lambda d: int(d.name[1:]))
    return _lora(load_file(newest / "adapter_model.safetensors"))


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), k


@pytest.mark.parametrize("warm_start, one_per_micro_batch, checkpointing",
                         [(True, False, False), (False, True, True)])
def test_two_ranks_take_the_same_steps_as_one_process(tiny_model_dir, tmp_path, warm_start, one_per_micro_batch,
                                                      checkpointing):
    """Same global batch and seed: the loss and the LoRA weights after 3 updates equal one process's within 1e-5
    (fp32), with the KL to the reference, two mini-batches and the decoupled loss on stale samples.

    Both reference paths (a frozen warm start, the adapter-disabled model), the second with gradient checkpointing
    (non-reentrant, recomputing inside FSDP2's hooks). The fresh LoRA runs one sample per
    micro-batch: its B starts at 0, so A's first gradients are ~0 and AdamW's g / (sqrt(v) + eps) magnifies the
    last bits in which differently padded micro-batches differ (6e-4 apart when packed several to a micro-batch,
    1.5e-6 one to a micro-batch; the warm start, packed several to a micro-batch, is 1e-7 apart)."""
    from peft import get_peft_model_state_dict

    samples = _samples(tiny_model_dir)
    longest = max(s.n_tokens for s in samples)
    budget = longest if one_per_micro_batch else 4 * longest  # several samples per micro-batch: padding differs
    warm = _warm_start(tiny_model_dir, tmp_path / "warm") if warm_start else None
    spec = {"model_dir": tiny_model_dir, "warm": warm, "samples": samples, "budget": budget,
            "checkpointing": checkpointing}
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))

    solo = _model(tiny_model_dir, warm, checkpointing)
    grpo, trainer_cfg = _configs(budget)
    solo_stats = _train(GRPOTrainer(solo, grpo, trainer_cfg, 1.0), pickle.loads(pickle.dumps(samples)))
    solo_lora = _lora(get_peft_model_state_dict(solo.model, adapter_name="default"))

    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path), "train"), nprocs=2, join=True)
    ranks_stats = json.loads((tmp_path / "stats-train.json").read_text())
    ranks_lora = _exported(tmp_path / "adapters-train")

    for one, two in zip(solo_stats, ranks_stats):
        for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "optimizer_steps"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), key
    assert solo_stats[-1]["kl"] > 1e-6 and solo_stats[-1]["optimizer_steps"] == 2  # the paths ran for real
    start = _lora(get_peft_model_state_dict(_model(tiny_model_dir, warm).model, adapter_name="default"))
    assert all((solo_lora[k] - start[k]).abs().max() > 1e-4 for k in solo_lora if "lora_B" in k)  # every B moved
    _close(ranks_lora, solo_lora, atol=1e-5)


def test_bf16_weights_train_on_two_ranks_when_the_first_forward_is_the_reference(tiny_model_dir, tmp_path):
    """The GPU layout: bf16 base weights, fp32 LoRA, bf16 compute (`MixedPrecisionPolicy`), and a fresh LoRA
    whose KL reference is the adapter-disabled model, so the first forward runs with peft's LoRA flags off.
    FSDP2 reads those flags at its lazy init to pick the gradient dtype; `shard` runs that init first, or the
    first backward fails ("a gradient with dtype BFloat16 ... grad_dtype Float", seen on an H200). The steps
    match one process's within bf16 rounding."""
    from peft import get_peft_model_state_dict

    samples = _samples(tiny_model_dir)
    budget = 4 * max(s.n_tokens for s in samples)
    spec = {"model_dir": tiny_model_dir, "warm": None, "samples": samples, "budget": budget, "dtype": "bfloat16",
            "stale": False}  # fresh samples: no proximal recompute, so the reference's forward comes first
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path), "train"), nprocs=2, join=True)
    ranks_stats = json.loads((tmp_path / "stats-train.json").read_text())

    solo = _model(tiny_model_dir, None, dtype="bfloat16")
    grpo, trainer_cfg = _configs(budget)
    solo_stats = _train(GRPOTrainer(solo, grpo, trainer_cfg, 1.0), pickle.loads(pickle.dumps(samples)),
                        stale=False)
    assert solo.dtype == torch.bfloat16 and len(ranks_stats) == UPDATES
    for one, two in zip(solo_stats, ranks_stats):
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=0.25) and two["grad_norm"] > 0
        assert two["loss"] == pytest.approx(one["loss"], abs=BF16_LOSS_ATOL)
    ranks_lora = _exported(tmp_path / "adapters-train")
    solo_lora = _lora(get_peft_model_state_dict(solo.model, adapter_name="default"))
    assert all(v.dtype == torch.float32 for v in ranks_lora.values())  # fp32 master weights, exported as they are
    _close(ranks_lora, {k: v.float() for k, v in solo_lora.items()}, atol=BF16_LORA_ATOL)


def test_a_checkpoint_of_two_ranks_resumes_on_two_ranks_and_on_one_process(tiny_model_dir, tmp_path):
    """2 ranks: 2 updates, checkpoint, 1 more. Resuming that checkpoint and taking the same update gives the same
    weights on 2 ranks and on one process (the optimizer state counts: AdamW's moments and step shape it)."""
    from peft import get_peft_model_state_dict

    from cua_kit.checkpoint import load_checkpoint

    samples = _samples(tiny_model_dir)
    warm = _warm_start(tiny_model_dir, tmp_path / "warm")
    budget = 4 * max(s.n_tokens for s in samples)
    spec = {"model_dir": tiny_model_dir, "warm": warm, "samples": samples, "budget": budget}
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path), "save"), nprocs=2, join=True)
    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    assert {p.name for p in ckpt.iterdir()} >= {"adapter", "weights", "optimizer", "trainer.pt", "rng.pt",
                                                "rng-rank1.pt", "state.json"}
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path), "resume"), nprocs=2, join=True)
    straight = _exported(tmp_path / "adapters-save")
    _close(_exported(tmp_path / "adapters-resume"), straight, atol=1e-6)
    assert json.loads((tmp_path / "stats-resume.json").read_text())[0]["loss"] == pytest.approx(
        json.loads((tmp_path / "stats-save.json").read_text())[-1]["loss"], abs=1e-6)

    solo = _model(tiny_model_dir, warm)
    grpo, trainer_cfg = _configs(spec["budget"])
    trainer = GRPOTrainer(solo, grpo, trainer_cfg, 1.0)
    load_checkpoint(ckpt, trainer)
    assert trainer.version == 2 and trainer.optimizer.state
    _train(trainer, pickle.loads(pickle.dumps(samples)), 1)
    _close(_lora(get_peft_model_state_dict(solo.model, adapter_name="default")), straight, atol=1e-5)


# ----------------------------------------------------------------------------- `cua-kit train` on 2 ranks
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20  # launch.collective_timeout_s of these runs


def _train_args(out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "configs/quickstart.yaml"), f"output_dir={out}", "model.adapter_path=",
            "trainer.eval_episodes=0", "rollout.max_staleness=0", "rollout.n_samples=2", "trainer.batch_size=1", "rollout.max_turns=2",
            "rollout.max_new_tokens=12", "rollout.max_concurrent_rollouts=2", "saver.keep_last=10",
            f"launch.collective_timeout_s={TIMEOUT_S}", *extra]


def _start_ranks(out: Path, *extra: str, world: int = 2) -> list[subprocess.Popen]:
    """`cua-kit train` as `world` ranks, with the environment torchrun gives its workers (static rendezvous)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "cua_kit.cli", "train", *_train_args(out, *extra)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT))
    return procs


def _finish(procs: list[subprocess.Popen], timeout_s: float = 300) -> list[tuple[int, str]]:
    """(exit code, output) of every rank; none is left running, whatever happens."""
    try:
        outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
        return [(p.returncode, text) for p, text in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _db(out: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{out / 'quickstart/trial0/trace.db'}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


def _wait(predicate, timeout_s: float, what: str, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    outputs = _finish(procs, 30) if any(p.poll() is not None for p in procs) else []
    raise AssertionError(f"timed out (or a rank exited) waiting for {what}: {outputs}")


def _steps(out: Path) -> int:
    try:
        return _db(out, "select count(*) from steps")[0][0]
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
def test_sigterm_on_the_other_rank_checkpoints_and_stops_every_rank(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from cua_kit.models.loader import resolve_model_path

    out = tmp_path / "run"
    procs = _start_ranks(out, "trainer.max_steps=1000", "saver.freq_steps=0")
    _wait(lambda: _steps(out) >= 2, 300, "two steps", procs)
    procs[1].send_signal(signal.SIGTERM)  # not the orchestrator: it must hear of it and stop everyone
    (code0, log0), (code1, log1) = _finish(procs, 120)
    assert code0 == 0 and code1 == 0, log0 + log1
    assert "Rank 1 asked to stop" in log0 and "Rank 1 received SIGTERM" in log1
    assert _db(out, "select status from runs")[0][0] == "stopped"
    [ckpt] = (out / "quickstart/trial0/checkpoints").glob("checkpoint-*")
    assert json.loads((ckpt / "state.json").read_text())["step"] == _db(out, "select max(step) from steps")[0][0]
    assert (ckpt / "rng-rank1.pt").exists() and (ckpt / "weights/.metadata").exists()
    base = AutoModelForImageTextToText.from_pretrained(resolve_model_path(ModelConfig()))
    PeftModel.from_pretrained(base, ckpt / "adapter")  # plain peft + transformers load what 2 ranks saved


@pytest.mark.slow
def test_a_dead_rank_stops_the_other_with_a_clear_error_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    checkpoints = out / "quickstart/trial0/checkpoints"
    for victim in (1, 0):  # a trainer rank, then the orchestrator
        procs = _start_ranks(out, "trainer.max_steps=1000", "saver.freq_steps=2")
        start = max([int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*")], default=0)
        _wait(lambda: (checkpoints / f"checkpoint-{start + 2}").exists(), 300, "a new checkpoint", procs)
        procs[victim].kill()
        killed = time.monotonic()
        survivor = procs[1 - victim]
        code, log = _finish([survivor], TIMEOUT_S + 30)[0]
        assert time.monotonic() - killed < TIMEOUT_S + 10  # it stopped on its own, well within the timeout
        assert code != 0 and (f"rank {1 - victim} lost " in log), log[-2000:]
        assert "recover.mode=auto resumes it" in log
        _finish([procs[victim]])
        if victim == 1:
            assert _db(out, "select status from runs")[0][0] == "failed"
    last = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    (code0, log0), (code1, _) = _finish(_start_ranks(out, f"trainer.max_steps={last + 2}"))
    assert code0 == 0 and code1 == 0, log0
    assert f"Resumed from {checkpoints / f'checkpoint-{last}'} at step {last}" in log0
    steps = [r[0] for r in _db(out, "select step from steps order by step")]
    assert steps == list(range(1, last + 3))  # every step exactly once across the three runs
    # the resumed ranks serve the checkpoint's version from the first turn: nothing is counted stale
    assert all(s == 0 for (s,) in _db(out, "select staleness_mean from steps"))


@pytest.mark.slow
def test_two_nodes_of_one_process_finish_a_run_through_the_launcher(tmp_path):
    """Two "nodes" on this host, each `cua-kit train ... launch.nnodes=2 launch.node_rank=R`: each starts torchrun
    with the static rendezvous at node 0's endpoint, and the two ranks finish a 2-step run together."""
    out, port = tmp_path / "run", free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(launch.LAUNCHED_ENV, None)
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "cua_kit.cli", "train",
         *_train_args(out, "trainer.max_steps=2", "saver.freq_steps=1", "model.device=cpu", "launch.allocation=fsdp:d1",
                      "launch.nnodes=2", f"launch.node_rank={rank}", f"launch.rdzv_endpoint=127.0.0.1:{port}")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) for rank in (0, 1)]
    (code0, log0), (code1, log1) = _finish(nodes)
    assert code0 == 0 and code1 == 0, log0[-3000:] + log1[-3000:]
    assert "Run finished at step 2" in log0 and "Run finished" not in log1  # node 1 holds rank 1, a follower
    assert [r[0] for r in _db(out, "select step from steps order by step")] == [1, 2]
    assert (out / "quickstart/trial0/checkpoints/checkpoint-2/rng-rank1.pt").exists()  # rank 1 wrote its part


@pytest.mark.slow
@pytest.mark.vllm
def test_a_layout_with_a_vllm_server_and_two_ranks_trains_through_cua_kit_train(tmp_path, vllm_python):
    """`cua-kit train ... launch.allocation=vllm:d1t1+fsdp:d2` on the CPU: the launcher starts torchrun with 2 gloo
    ranks, rank 0 starts the kit's vLLM server (issue 13) and serves it the LoRA tensors it gathers after each
    update; the run finishes, and the server loaded every version."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(launch.LAUNCHED_ENV, None)
    argv = [sys.executable, "-m", "cua_kit.cli", "train",
            *_train_args(out, "trainer.max_steps=2", "saver.freq_steps=1", "model.device=cpu",
                         "launch.allocation=vllm:d1t1+fsdp:d2", f"vllm.python={vllm_python}",
                         "vllm.extra_args=[--enforce-eager]", "vllm.max_model_len=4096")]
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Run finished at step 2" in done.stdout
    assert [r[0] for r in _db(out, "select step from steps order by step")] == [1, 2]
    run = out / "quickstart/trial0"
    assert (run / "vllm.log").stat().st_size > 0 and (run / "adapters/v2/adapter_model.safetensors").exists()
    assert done.stdout.count("/v1/load_lora_adapter") >= 3  # v0 at start, then one per update
    assert (run / "checkpoints/checkpoint-2/rng-rank1.pt").exists()
