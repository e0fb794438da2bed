"""The GRPO update on the real tiny Qwen3-VL: ratio/KL at a fresh sample, the direction of one update,
garbage completions, and the full `cua-kit train` loop (SIGKILL and SIGTERM at random points, then resume, are
in tests/test_chaos.py)."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cua_kit.config import GRPOConfig, LoraConfig, ModelConfig, TrainerConfig
from cua_kit.grpo.trainer import GRPOTrainer, Sample, pack_micro_batches, split_minibatches
from cua_kit.inference.base import GenerationRequest, SamplingParams
from cua_kit.inference.hf import HFPolicy
from cua_kit.models.loader import load_model
from cua_kit.rollout.episode import TurnSample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_path(tiny_model_dir):
    return tiny_model_dir


def _samples(tiny_path, n=4, seed=0, sampling=None):
    """Real completions sampled by the policy for one screenshot prompt, with behaviour log-probs."""
    torch.manual_seed(seed)
    loaded = load_model(ModelConfig(name=str(tiny_path), device="cpu"), LoraConfig(r=4, alpha=8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Tap OK"}]}]
    text = loaded.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    image = Image.new("RGB", (128, 128), "white")
    ids = loaded.processor(text=[text], images=[image], do_resize=False, return_tensors="pt")["input_ids"][0].tolist()
    policy = HFPolicy(loaded)
    reqs = [GenerationRequest(ids, [image], sampling or SamplingParams(1.0, 1.0, 0, 12)) for _ in range(n)]
    completions = policy.generate_sync(reqs)
    turns = [TurnSample(ids, c.token_ids, c.logprobs, [image], c.version) for c in completions]
    return loaded, turns


def _trainer(loaded, lr=5e-2, **grpo):
    return GRPOTrainer(loaded, GRPOConfig(**grpo), TrainerConfig(learning_rate=lr, grad_clip=0.0), sampling=1.0)


def test_first_micro_step_has_ratio_one_and_zero_kl(tiny_path):
    loaded, turns = _samples(tiny_path)
    trainer = _trainer(loaded, kl_ctl=0.01)
    stats = trainer.update([Sample(t, a) for t, a in zip(turns, [1.0, -1.0, 0.5, -0.5])])
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-7)  # fresh LoRA (B = 0): policy == reference
    assert stats["clip_frac"] == 0.0 and trainer.version == 1


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.6), (8, 0.8)])
def test_truncated_sampling_is_scored_exactly(tiny_path, top_k, top_p):
    """Generation and scoring share one definition of the distribution (`process_logits`): with top-k/top-p the
    trainer's log-probs of fresh samples equal the behaviour ones, so the ratio is 1 and the gap ~0."""
    sampling = SamplingParams(0.9, top_p, top_k, 12)
    loaded, turns = _samples(tiny_path, n=4, seed=5, sampling=sampling)
    stats = GRPOTrainer(loaded, GRPOConfig(kl_ctl=0.0), TrainerConfig(learning_rate=1e-4), sampling).update(
        [Sample(t, a) for t, a in zip(turns, [1.0, -1.0, 0.5, -0.5])])
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["logprob_gap_abs"] < 1e-5 and abs(stats["logprob_gap_k3"]) < 1e-8
    # the same samples scored as if drawn without truncation: the gap shows (this is what the metric is for)
    loose = GRPOTrainer(loaded, GRPOConfig(kl_ctl=0.0), TrainerConfig(learning_rate=1e-4), 0.9).update(
        [Sample(t, a) for t, a in zip(turns, [1.0, -1.0, 0.5, -0.5])])
    assert loose["logprob_gap_abs"] > 1e-3


def _seq_logprob(trainer, turns):
    with torch.no_grad():
        scored = trainer._no_grad_logprobs([Sample(t, 0.0) for t in turns], reference=False)
    return scored.sum(dim=1)


def test_one_update_moves_logprobs_with_the_advantage_sign(tiny_path):
    loaded, turns = _samples(tiny_path, n=2, seed=1)
    # a small step: AdamW's first step moves every weight by ~lr, and at 5e-2 that overshoots on builder v4
    # (seeds 1 and 2 lowered the positive completion too); from 1e-2 down all three seeds move as the sign says
    trainer = _trainer(loaded, lr=1e-3, kl_ctl=0.0)
    before = _seq_logprob(trainer, turns)
    trainer.update([Sample(turns[0], 1.0), Sample(turns[1], -1.0)])
    after = _seq_logprob(trainer, turns)
    assert after[0] > before[0] and after[1] < before[1]


def test_loss_is_finite_with_a_garbage_completion(tiny_path):
    loaded, turns = _samples(tiny_path, n=2, seed=2)
    vocab = len(loaded.tokenizer)
    garbage = TurnSample(turns[0].prompt_ids, [vocab - 1, 0, 5, vocab - 2] * 8, [-50.0] * 32, turns[0].images, 0)
    empty = TurnSample(turns[0].prompt_ids, [], [], turns[0].images, 0)
    stats = _trainer(loaded, kl_ctl=0.01).update([Sample(garbage, 1.0), Sample(turns[1], -1.0), Sample(empty, 1.0)])
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert stats["n_samples"] == 2  # the empty completion carries no tokens and is left out


def test_minibatches_keep_groups_whole_and_split_evenly():
    rows = [Sample(TurnSample([0], [1], [0.0], [], 0), 1.0, group) for group in "aaabbcccdd"]
    chunks = split_minibatches(rows, 2)
    assert ["".join(s.group for s in c) for c in chunks] == ["aaabb", "cccdd"]
    assert len(split_minibatches(rows, 10)) == 4  # never more chunks than groups
    assert split_minibatches(rows, 1) == [rows]


def test_minibatches_take_several_steps_under_one_version(tiny_path):
    loaded, turns = _samples(tiny_path, n=4, seed=3)
    trainer = _trainer(loaded, kl_ctl=0.0, minibatches=2)
    stats = trainer.update([Sample(t, a, g) for t, a, g in zip(turns, [1.0, -1.0, 1.0, -1.0], "aabb")])
    assert stats["optimizer_steps"] == 2 and trainer.version == 1
    # the second mini-batch is scored by weights the first one moved: its ratio to the behaviour is not 1
    assert abs(stats["ratio_mean"] - 1.0) > 1e-4


def test_stale_samples_get_proximal_logprobs_from_before_the_first_step(tiny_path):
    loaded, turns = _samples(tiny_path, n=4, seed=4)
    trainer = _trainer(loaded, kl_ctl=0.0, minibatches=2)
    trainer.version = 1  # the samples were generated at version 0: stale by one
    expected = trainer._no_grad_logprobs([Sample(t, 0.0) for t in turns], reference=False)
    samples = [Sample(t, a, g) for t, a, g in zip(turns, [1.0, -1.0, 1.0, -1.0], "aabb")]
    prox = trainer._proximal(samples)
    for i, s in enumerate(samples):
        n = len(s.turn.completion_ids)
        assert torch.allclose(prox[id(s)], expected[i, -n:], atol=1e-5)


def test_micro_batches_respect_the_token_budget(tiny_path):
    rows = [Sample(TurnSample([0] * n, [1] * 4, [0.0] * 4, [], 0), 1.0) for n in (10, 10, 30, 5, 50)]
    batches = pack_micro_batches(rows, 64)
    # rows of 14, 14, 34, 9, 54 tokens; a padded micro-batch costs rows x longest row
    assert [[s.n_tokens for s in b] for b in batches] == [[14, 14], [34], [9], [54]]
    assert sum(len(b) for b in batches) == len(rows)
    assert all(max(s.n_tokens for s in b) * len(b) <= 64 or len(b) == 1 for b in batches)


# ----------------------------------------------------------------------------- the whole loop
def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cua_kit.cli", "train", str(ROOT / "configs/quickstart.yaml"),
            f"output_dir={out}", "model.adapter_path=", "trainer.eval_episodes=0", "rollout.max_staleness=0",
            "rollout.n_samples=2", "trainer.batch_size=1", "rollout.max_turns=2", "rollout.max_new_tokens=12",
            "rollout.max_concurrent_rollouts=2", "saver.freq_steps=1", "saver.keep_last=10", *extra]


def _env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _db_rows(out: Path, sql: str):
    db = out / "quickstart/trial0/trace.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


def test_constrained_run_writes_only_valid_actions_and_a_sampled_curve(tmp_path):
    out = tmp_path / "grammar"
    subprocess.run(_train_cmd(out, "trainer.max_steps=1", "rollout.constrain_actions=true", "rollout.max_turns=1",
                              "rollout.max_new_tokens=120", "trainer.eval_episodes=2", "trainer.eval_sampled=true"),
                   check=True, env=_env(tmp_path), capture_output=True, timeout=600)
    # a random tiny model under the grammar: every turn it finished is an action the parser runs
    errors = _db_rows(out, "select parse_error from turns where n_completion_tokens < 120")
    assert errors and all(e is None for (e,) in errors)
    curve = [json.loads(line) for line in (out / "quickstart/trial0/eval/curve.jsonl").read_text().splitlines()]
    assert [p["label"] for p in curve] == ["before", "after"]
    assert all(0.0 <= p["success_rate_sampled"] <= 1.0 for p in curve)


def test_warm_start_adapter_is_the_kl_reference(tiny_path, tmp_path):
    """With a warm-start adapter, KL is measured against it (frozen), not against the bare base model."""
    from cua_kit.models.loader import reference_model

    loaded, turns = _samples(tiny_path, n=2, seed=3)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    loaded.model.save_pretrained(tmp_path / "warm")
    warm = load_model(ModelConfig(name=str(tiny_path), device="cpu"), LoraConfig(r=4, alpha=8),
                       adapter_path=str(tmp_path / "warm"), reference_adapter=str(tmp_path / "warm"))
    trainer = _trainer(warm, kl_ctl=0.01)
    stats = trainer.update([Sample(t, a) for t, a in zip(turns, [1.0, -1.0])])
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == warm start at the first step
    trained = [p for n, p in warm.model.named_parameters() if p.requires_grad]
    assert trained and all(".default." in n for n, p in warm.model.named_parameters() if p.requires_grad)
    with reference_model(warm.model):
        pass
    assert all(".default." in n for n, p in warm.model.named_parameters() if p.requires_grad)


def test_eval_folder_is_reconciled_like_the_steps_rows(tmp_path):
    from cua_kit.evaluate import reconcile_evals

    def write_run(run_dir: Path) -> None:
        (run_dir / "eval").mkdir(parents=True, exist_ok=True)
        labels = [("before", 0), ("step20", 20), ("step40", 40)]
        (run_dir / "eval/curve.jsonl").write_text("".join(
            json.dumps({"label": label, "step": step, "success_rate": 0.5}) + "\n" for label, step in labels))
        for label, _ in labels:
            for name in (label, f"{label}-sampled"):
                (run_dir / "eval" / name).mkdir(exist_ok=True)
                (run_dir / "eval" / name / "trace.db").write_bytes(b"x")

    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    write_run(resumed)
    reconcile_evals(resumed, 20, resumed=True)  # killed after the step-40 eval, resumed from checkpoint-20
    curve = [json.loads(line) for line in (resumed / "eval/curve.jsonl").read_text().splitlines()]
    assert [p["label"] for p in curve] == ["before", "step20"]
    assert sorted(d.name for d in (resumed / "eval").iterdir() if d.is_dir()) == [
        "before", "before-sampled", "step20", "step20-sampled"]
    write_run(fresh)
    (fresh / "eval/after").mkdir()  # a folder of an older run whose curve point is gone
    reconcile_evals(fresh, 0, resumed=False)  # recover.mode=off over an old run: its evals go too
    assert (fresh / "eval/curve.jsonl").read_text() == ""
    assert not [d for d in (fresh / "eval").iterdir() if d.is_dir()]
    reconcile_evals(tmp_path / "new", 0, resumed=False)  # a first run: nothing there, nothing to do


# ----------------------------------------------------------------------------- the faster update (issue 16 §2)
def _varied_samples(loaded, turns):
    """Rows of different lengths: two screenshot sizes (64 and 16 image tokens), completions cut to 12..3 tokens;
    two groups, stale by one version (proximal recompute too)."""
    small = Image.new("RGB", (64, 64), "white")
    ids = loaded.processor(text=[loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Tap OK"}]}],
        add_generation_prompt=True, tokenize=False)], images=[small], do_resize=False,
        return_tensors="pt")["input_ids"][0].tolist()
    out = []
    for i, (t, n) in enumerate(zip(turns, [12, 3, 9, 5, 12, 7])):
        prompt, images = (t.prompt_ids, t.images) if i % 2 == 0 else (ids, [small])
        out.append(Sample(TurnSample(prompt, t.completion_ids[:n], t.logprobs[:n], images, 0), [1.0, -1.0, 0.5][i % 3],
                          group="ab"[i // 3]))
    return out


def _gradients(trainer, samples):
    """The update's loss and the gradients its optimizer step saw (lr 0: the weights stay put)."""
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in trainer.params]))
    stats = trainer.update(samples)
    return stats, seen[0]


def test_length_buckets_and_the_reference_pass_keep_the_loss_and_gradient(tiny_path):
    """Sorted micro-batches and the reference scored once before the step give the loss and gradient of the plain
    formula: every row in one padded batch, the reference scored beside it, grpo_loss, backward."""
    from cua_kit.grpo.losses import grpo_loss
    from cua_kit.grpo.scoring import score
    from cua_kit.models.loader import reference_model

    loaded, turns = _samples(tiny_path, n=6, seed=6)
    with torch.no_grad():  # a trained adapter: the KL and the proximal ratio are not trivially 0 / 1
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    samples = _varied_samples(loaded, turns)
    rows = [(s.turn.prompt_ids, s.turn.completion_ids, s.turn.images) for s in samples]
    scored = score(loaded.model, loaded.processor, rows, 1.0, loaded.device)
    with torch.no_grad(), reference_model(loaded.model) as m:
        ref = score(m, loaded.processor, rows, 1.0, loaded.device).logprobs
    from cua_kit.grpo.trainer import _right_aligned
    behav = _right_aligned([s.turn.logprobs for s in samples], loaded.device)
    loss, _ = grpo_loss(scored.logprobs, behav, torch.tensor([s.advantage for s in samples]), scored.mask,
                        ref_logp=ref, prox_logp=scored.logprobs.detach(), beta=0.1)
    loss.backward()
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    expected = [p.grad.clone() for p in params]
    loaded.model.zero_grad(set_to_none=True)
    budget = 2 * max(s.n_tokens for s in samples)  # several micro-batches
    for buckets in (True, False):
        trainer = GRPOTrainer(loaded, GRPOConfig(kl_ctl=0.1), TrainerConfig(learning_rate=0.0, grad_clip=0.0,
                              micro_batch_tokens=budget, length_buckets=buckets), sampling=1.0)
        trainer.version = 1  # stale samples: proximal log-probs recomputed before the step
        stats, grads = _gradients(trainer, samples)
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6) and stats["kl"] > 1e-4
        for got, want in zip(grads, expected):
            # fp32: summation order differs (padding, micro-batches); 1e-5 of the tensor's scale
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), buckets


def test_micro_batches_by_length_pad_less():
    from cua_kit.grpo.trainer import micro_batches

    rows = [Sample(TurnSample([0] * n, [1] * 4, [0.0] * 4, [], 0), 1.0) for n in (50, 6, 46, 4, 48, 5)]
    padded = lambda batches: sum(len(b) * max(s.n_tokens for s in b) for b in batches)  # noqa: E731
    in_order = micro_batches(rows, 200, by_length=False)
    assert [[s.n_tokens for s in b] for b in in_order] == [[54, 10, 50], [8, 52, 9]]  # the budget alone
    by_length = micro_batches(rows, 200, max_padding=0.1)
    assert [[s.n_tokens for s in b] for b in by_length] == [[54, 52, 50], [10, 9, 8]]
    assert padded(by_length) == 192 < padded(in_order) == 318
    assert [len(b) for b in micro_batches(rows, 200, max_padding=1.0)] == [3, 3]  # sorted, budget only
    assert [len(b) for b in micro_batches(rows, 200, max_padding=0.02)] == [2, 1, 1, 1, 1]  # 54+52: 1.9% padded
    assert sorted(map(id, sum(by_length, []))) == sorted(map(id, rows))


def test_the_reference_is_scored_once_per_sample(tiny_path, monkeypatch):
    """Mini-batches and repeated updates over the same turns reuse their reference log-probs; a caller can score
    them ahead of the update; the cache lets go of a turn with the turn."""
    import gc

    import cua_kit.grpo.trainer as trainer_module

    passes = []
    real = trainer_module.reference_model

    def counting(model):
        passes.append(1)
        return real(model)

    monkeypatch.setattr(trainer_module, "reference_model", counting)
    loaded, turns = _samples(tiny_path, n=4, seed=7)
    trainer = _trainer(loaded, lr=1e-3, kl_ctl=0.01, minibatches=2)
    samples = lambda: [Sample(t, a, g) for t, a, g in zip(turns, [1.0, -1.0, 1.0, -1.0], "aabb")]  # noqa: E731
    trainer.update(samples())
    first = len(passes)
    assert first == 1  # 4 short rows fit one micro-batch: one reference pass for both mini-batches
    stats = trainer.update(samples())  # the same turns again (new Sample objects): nothing re-scored
    assert len(passes) == first and stats["kl"] > 0  # the policy moved away from the cached reference
    _, fresh = _samples(tiny_path, n=2, seed=8)
    assert trainer.score_reference([Sample(t, 1.0) for t in fresh]) == 2 and len(passes) == first + 1
    trainer.update([Sample(t, a) for t, a in zip(fresh, [1.0, -1.0])])
    assert len(passes) == first + 1  # scored ahead of the update: the update skips it
    del fresh, turns, samples
    gc.collect()
    assert trainer._ref == {}


def test_compiled_layers_run_only_inside_the_update(tiny_path, monkeypatch):
    """trainer.compile: the decoder layers are compiled for the update only (generation stays eager) and the
    update computes the same loss. Dynamo's eager backend keeps the test fast; inductor is what the GPU runs."""
    import cua_kit.grpo.trainer as trainer_module

    real_compile = torch.compile
    monkeypatch.setattr(trainer_module.torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    loaded, turns = _samples(tiny_path, n=2, seed=9)
    samples = [Sample(t, a) for t, a in zip(turns, [1.0, -1.0])]
    plain = _trainer(loaded, lr=0.0, kl_ctl=0.01)
    compiled = GRPOTrainer(loaded, GRPOConfig(kl_ctl=0.01), TrainerConfig(learning_rate=0.0, compile=True), 1.0)
    layers = trainer_module.decoder_layers(loaded.model)
    seen = []
    layers[0].register_forward_pre_hook(lambda m, _: seen.append(m._compiled_call_impl is not None))
    expected = plain.update(samples)
    got = compiled.update(samples)
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-6)
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert seen and not any(seen[:len(seen) // 2]) and all(seen[len(seen) // 2:])
    assert all(layer._compiled_call_impl is None for layer in layers)  # off again for generation


def test_the_logged_lr_is_the_rate_the_update_used(tiny_path):
    """Under warm-up, an update's `lr` is the rate its optimizer step used, not the next one's."""
    loaded, turns = _samples(tiny_path, n=2, seed=3)
    trainer = GRPOTrainer(loaded, GRPOConfig(), TrainerConfig(learning_rate=3e-3, warmup_steps=2, grad_clip=0.0),
                          sampling=1.0)
    first = trainer.update([Sample(t, a) for t, a in zip(turns, [1.0, -1.0])])
    assert first["optimizer_steps"] == 1 and first["lr"] == pytest.approx(1e-3)  # warm-up: (0 + 1) / (2 + 1)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)  # the next update's rate


def test_a_padding_micro_batch_runs_its_passes_with_the_kl_on(tiny_path):
    """An FSDP rank with fewer micro-batches runs `Padding` ones to keep in step (cua_kit.distributed.plan): with
    the KL on, such a micro-batch has no reference log-probs and must still run forward and backward, adding 0."""
    from cua_kit.grpo.trainer import Padding

    loaded, turns = _samples(tiny_path, n=2, seed=4)
    trainer = _trainer(loaded, kl_ctl=0.05)
    trainer._micro_step(Padding([Sample(turns[0], 1.0)]), 0.0, {})
    grads = [p.grad for p in trainer.params]
    assert any(g is not None for g in grads) and all(g is None or not g.any() for g in grads)
