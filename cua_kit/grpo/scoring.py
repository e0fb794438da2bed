"""The scoring forward: log-probs (and entropy) of recorded completions under the current weights.

Rows are prompt ids + completion ids exactly as generated, left-padded by `collate`, so every
completion ends at the right edge; `logits_to_keep` then builds vocab logits only for the last
Tc + 1 positions instead of every image token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from cua_kit.grpo.losses import entropy_from_logits, token_logprobs
from cua_kit.inference.base import SamplingParams
from cua_kit.inference.distribution import process_logits
from cua_kit.models.inputs import Row, collate, vision_special_ids

if TYPE_CHECKING:  # xgrammar is imported only where a run constrains its actions
    from cua_kit.inference.grammar import ActionGrammar


@dataclass
class Scored:
    logprobs: torch.Tensor  # [B, Tc] log-probs of the completion tokens (right-aligned)
    mask: torch.Tensor  # [B, Tc] 1 on real completion tokens
    entropy: torch.Tensor | None  # [B, Tc] per-token entropy (no grad), when asked for


def completion_targets(completions: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned [B, Tc] target ids and mask."""
    width = max(len(c) for c in completions)
    ids = torch.zeros((len(completions), width), dtype=torch.long)
    mask = torch.zeros((len(completions), width), dtype=torch.float32)
    for i, c in enumerate(completions):
        if c:
            ids[i, width - len(c):] = torch.tensor(list(c), dtype=torch.long)
            mask[i, width - len(c):] = 1.0
    return ids.to(device), mask.to(device)


def score(model: Any, processor: Any, rows: Sequence[tuple[list[int], list[int], list[Any]]],
          sampling: SamplingParams | float, device: torch.device, with_entropy: bool = False,
          grammar: ActionGrammar | None = None, inputs: dict[str, torch.Tensor] | None = None) -> Scored:
    """rows: (prompt_ids, completion_ids, images). Grad flows unless the caller is under no_grad.
    `inputs`: the rows already collated (`models.inputs.collate`, on `device`), to reuse across passes.

    The log-probs are those of the sampling distribution (`inference.distribution.process_logits`: vision
    special tokens banned, the action grammar's mask when the policy was sampled under it (`grammar`),
    temperature, top-k, top-p), the one definition generation uses too, so ratios at a fresh sample are 1.
    A bare float is the temperature with no truncation.
    """
    if not isinstance(sampling, SamplingParams):
        sampling = SamplingParams(temperature=float(sampling))
    if sampling.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {sampling.temperature}); pass the sampling temperature")
    batch = inputs if inputs is not None else collate(processor, [Row(p + c, imgs) for p, c, imgs in rows], device)
    targets, mask = completion_targets([c for _, c, _ in rows], device)
    width = targets.shape[1]
    logits = model(**batch, logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
    allowed = grammar.allowed([c for _, c, _ in rows], width, device) if grammar is not None else None
    processed = process_logits(logits[:, -width:], sampling.temperature, sampling.top_k, sampling.top_p,
                               allowed=allowed, banned=vision_special_ids(processor.tokenizer))
    logprobs = token_logprobs(processed, targets)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(processed.detach())
    # padding positions (target id 0) may sit outside a truncated distribution (-inf): zero them, never -inf * 0
    return Scored(torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs)), mask, entropy)
