"""The policy's next-token distribution, defined once: generation samples from it, the trainer scores under it.

    logits -> -inf outside `allowed`   (the vision special tokens, and the action grammar when it is on)
           -> / temperature
           -> top-k truncation         (keep logits >= the k-th largest; ties kept)
           -> top-p (nucleus)          (drop the low tail whose mass is <= 1 - top_p; the top token always stays)
    behaviour log-prob = log_softmax(processed)[token]   (`grpo.losses.token_logprobs` at temperature 1)

Generation (`HFPolicy`, through `DistributionProcessor`) and the scoring forward (`grpo.scoring.score`) call
the same `process_logits`, so at a fresh sample the importance ratio is exactly 1 whatever the sampling knobs;
the order and the tie rules are those of transformers' and vLLM's samplers (temperature, then top-k, then top-p).
Why the vision tokens are banned: an `<|image_pad|>` in a completion crashes the scoring forward, which then
expects pixel features for it.
"""

from __future__ import annotations

import torch
import transformers

from cua_kit.inference.base import SamplingParams

NEG_INF = float("-inf")


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   allowed: torch.Tensor | None = None, banned: list[int] | None = None) -> torch.Tensor:
    """[..., V] logits -> the processed logits whose log-softmax is the policy (float32; -inf = impossible).

    temperature 0 means greedy: no scaling or truncation (the log-probs are then only informative)."""
    out = logits.float()
    if allowed is not None:
        out = out.masked_fill(~allowed, NEG_INF)
    if banned:
        out = out.clone() if out is logits else out
        out[..., banned] = NEG_INF
    if temperature <= 0:
        return out
    out = out / temperature
    if top_k > 0 and top_k < out.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, NEG_INF)
    if top_p < 1.0:
        out = _top_p(out, top_p)
    return out


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus truncation as transformers' TopPLogitsWarper and vLLM's sampler do it: sort ascending, drop the
    tokens whose cumulative probability is <= 1 - top_p, never the most likely one."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - top_p)
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), NEG_INF)


class DistributionProcessor(transformers.LogitsProcessor):
    """`process_logits` as the one logits processor of an HF `generate` call (whose own temperature/top-k/top-p
    warpers are then turned off by `hf_sampling_kwargs`): `grammar_step` (the action grammar's per-step mask,
    optional) runs first, then the rest of the definition above."""

    def __init__(self, sampling: SamplingParams, banned: list[int], grammar_step: transformers.LogitsProcessor | None):
        self.sampling, self.banned, self.grammar_step = sampling, banned, grammar_step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.grammar_step is not None:
            scores = self.grammar_step(input_ids, scores)
        s = self.sampling
        return process_logits(scores, s.temperature, s.top_k, s.top_p, banned=self.banned)


def hf_sampling_kwargs(sampling: SamplingParams) -> dict:
    """`generate` arguments that leave all processing to `DistributionProcessor`: explicit neutral values, so a
    model's generation_config defaults (e.g. top_k=50) cannot leak in; temperature 0 = greedy."""
    if sampling.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
