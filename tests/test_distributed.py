"""FSDP2 on the CPU under gloo (issue 14): two trainer ranks take the same steps as one process, checkpoints
move between them, and a rank that dies stops the other with a clear error.

The ranks are real processes on 127.0.0.1 (torch.multiprocessing spawn, or `cua-kit train` under torchrun);
the model is the tiny Qwen3-VL of the real architecture, fp32.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from cua_kit.config import GRPOConfig, LoraConfig, ModelConfig, TrainerConfig, load_config
from cua_kit.distributed import partition, plan
from cua_kit.grpo.trainer import GRPOTrainer, Sample, pack_micro_batches
from cua_kit.inference.base import GenerationRequest, SamplingParams
from cua_kit.inference.hf import HFPolicy
from cua_kit.models.loader import load_model
from cua_kit.rollout.episode import TurnSample

LORA = LoraConfig(r=4, alpha=8)
SAMPLING = SamplingParams(1.0, 1.0, 0, 12)
UPDATES = 3


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
    per_rank = plan(rows, budget=64, world=2)
    assert len(per_rank[0]) == len(per_rank[1])  # the same number of forwards on every rank, or FSDP hangs
    counted = [s for batches in per_rank for batch, c in batches if c for s in batch]
    assert sorted(id(s) for s in counted) == sorted(id(s) for s in rows)  # every sample counted exactly once
    assert plan(rows, budget=64, world=1) == [[(b, True) for b in pack_micro_batches(rows, 64)]]  # one process
    lonely = plan(rows[:1], budget=64, world=3)  # more ranks than samples: the others run uncounted copies
    assert [[c for _, c in r] for r in lonely] == [[True], [False], [False]]
    with pytest.raises(ValueError, match="without an image"):
        plan(_rows([5, 5], images=False), budget=64, world=2)


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


def _train(trainer: GRPOTrainer, samples: list[Sample]) -> list[dict[str, float]]:
    out = []
    for _ in range(UPDATES):
        for i, s in enumerate(samples):  # half the samples one version stale: proximal log-probs recomputed
            s.turn.version = trainer.version - i % 2
        out.append(trainer.update(samples))
    return out


def _model(model_dir: Path, warm: Path | None):
    """A warm start and it frozen as the KL reference (peft `set_adapter`), or a fresh LoRA whose reference is the
    adapter-disabled model (peft `disable_adapter`): both switch adapters on the sharded model."""
    torch.manual_seed(0)
    warm_path = str(warm) if warm else None
    return load_model(ModelConfig(name=str(model_dir), device="cpu"), LORA, adapter_path=warm_path,
                      reference_adapter=warm_path)


def _rank_main(rank: int, world: int, port: int, work: str) -> None:
    """One trainer rank: rank 0 drives the updates and the export, the other follows its commands."""
    from cua_kit import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    spec = pickle.loads(Path(work, "spec.pkl").read_bytes())
    cfg = load_config(None, ["model.device=cpu", "launch.collective_timeout_s=60"])
    ranks = distributed.init(cfg)
    channel = distributed.Channel(ranks)
    grpo, trainer_cfg = _configs(spec["budget"])
    trainer = distributed.ShardedTrainer(_model(spec["model_dir"], spec["warm"]), grpo, trainer_cfg, 1.0, ranks,
                                         channel)
    if rank == 0:
        stats = _train(trainer, spec["samples"])
        trainer.export(Path(work, "adapters"))
        Path(work, "stats.json").write_text(json.dumps(stats))
        channel.close("stop")
    else:
        assert distributed.follow(trainer, channel) == "finished"
    torch.distributed.destroy_process_group()


def _lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v for k, v in state.items() if "lora_" in k}


@pytest.mark.parametrize("warm_start, one_per_micro_batch", [(True, False), (False, True)])
def test_two_ranks_take_the_same_steps_as_one_process(tiny_model_dir, tmp_path, warm_start, one_per_micro_batch):
    """Same global batch and seed: the loss and the LoRA weights after 3 updates equal one process's within 1e-5
    (fp32), with the KL to the reference, two mini-batches and the decoupled loss on stale samples.

    Both reference paths (a frozen warm start, the adapter-disabled model). The fresh LoRA runs one sample per
    micro-batch: its B starts at 0, so A's first gradients are ~0 and AdamW's g / (sqrt(v) + eps) magnifies the
    last bits in which differently padded micro-batches differ (6e-4 apart when packed several to a micro-batch,
    1.5e-6 one to a micro-batch; the warm start, packed several to a micro-batch, is 1e-7 apart)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    samples = _samples(tiny_model_dir)
    longest = max(s.n_tokens for s in samples)
    budget = longest if one_per_micro_batch else 4 * longest  # several samples per micro-batch: padding differs
    warm = _warm_start(tiny_model_dir, tmp_path / "warm") if warm_start else None
    spec = {"model_dir": tiny_model_dir, "warm": warm, "samples": samples, "budget": budget}
    (tmp_path / "spec.pkl").write_bytes(pickle.dumps(spec))

    solo = _model(tiny_model_dir, warm)
    grpo, trainer_cfg = _configs(budget)
    solo_stats = _train(GRPOTrainer(solo, grpo, trainer_cfg, 1.0), pickle.loads(pickle.dumps(samples)))
    solo_lora = _lora(get_peft_model_state_dict(solo.model, adapter_name="default"))

    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks_stats = json.loads((tmp_path / "stats.json").read_text())
    ranks_lora = _lora(load_file(tmp_path / "adapters" / f"v{UPDATES}" / "adapter_model.safetensors"))

    for one, two in zip(solo_stats, ranks_stats):
        for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "optimizer_steps"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), key
    assert solo_stats[-1]["kl"] > 1e-6 and solo_stats[-1]["optimizer_steps"] == 2  # the paths ran for real
    assert ranks_lora.keys() == solo_lora.keys() and len(solo_lora) > 0
    start = _lora(get_peft_model_state_dict(_model(tiny_model_dir, warm).model, adapter_name="default"))
    assert all((solo_lora[k] - start[k]).abs().max() > 1e-4 for k in solo_lora if "lora_B" in k)  # every B moved
    for k, v in solo_lora.items():
        assert torch.allclose(ranks_lora[k], v, atol=1e-5, rtol=0), k
