"""GRPO math as small pure torch functions: advantages, the clipped and decoupled PPO surrogates, the k3 KL,
loss aggregation, entropy and token log-probs. Each docstring gives the formula; the tests check values
worked out by hand.

Shapes: B sequences (completions) of T tokens; `mask` [B, T] is 1 on completion tokens, 0 on prompt/padding.
Per-token functions return [B, T] and put 0 where mask is 0, so NaN/inf in padding never reach the loss.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AdvantageMode = Literal["std", "no_std", "loo"]
AggMode = Literal["token_mean", "seq_mean"]
# exp() of a log-ratio beyond this overflows float32/bf16 to inf; clamping keeps garbage logits finite, and
# clamp passes no gradient to NaN inputs, so NaN log-probs in padding never reach the gradient (0 * NaN).
MAX_LOG_RATIO = 20.0


def group_advantages(rewards: Tensor, mode: AdvantageMode = "std", eps: float = 1e-6) -> Tensor:
    """Advantages of the G samples of one group (last dim), each mode with zero mean per group.

    std (GRPO):       A_i = (r_i - mean(r)) / (std(r) + eps), population std (Std of [0,1,0,0] = 0.433)
    no_std (Dr. GRPO): A_i = r_i - mean(r)
    loo (leave-one-out, RLOO): A_i = r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean(r))
    A group whose rewards are all equal gets all-zero advantages in every mode.
    """
    rewards = rewards.float()
    n = rewards.shape[-1]
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if mode == "std":
        return centred / (rewards.std(dim=-1, unbiased=False, keepdim=True) + eps)
    if mode == "no_std":
        return centred
    if mode == "loo":
        if n < 2:
            raise ValueError("leave-one-out advantages need at least 2 samples per group")
        return centred * n / (n - 1)
    raise ValueError(f"unknown advantage mode {mode!r}; use 'std', 'no_std' or 'loo'")


def step_advantages(states: list[list[str]], rewards: list[float], gamma: float = 0.95,
                    mode: AdvantageMode = "std") -> list[list[float]]:
    """GiGPO's step-level advantages (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent
    Training"; verl-agent's `gigpo`): the turns of a group's episodes that saw the same state (an anchor state:
    `states[i][t]` is a key of episode i's observation at turn t) form a step group, and each turn's discounted
    return R_it = gamma^(T_i - 1 - t) * r_i (the episode's reward, paid at its last turn) is normalised inside its
    step group with `group_advantages(mode)`. A state seen once gets 0. So among turns from the same screen, those
    whose episode succeeded sooner score higher: credit for one turn, not the whole episode.
    """
    returns = [[gamma ** (len(keys) - 1 - t) * r for t in range(len(keys))] for keys, r in zip(states, rewards)]
    by_state: dict[str, list[tuple[int, int]]] = {}
    for i, keys in enumerate(states):
        for t, key in enumerate(keys):
            by_state.setdefault(key, []).append((i, t))
    out = [[0.0] * len(keys) for keys in states]
    for members in by_state.values():
        if len(members) < 2:
            continue
        adv = group_advantages(torch.tensor([returns[i][t] for i, t in members]), mode=mode).tolist()
        for (i, t), a in zip(members, adv):
            out[i][t] = a
    return out


def _ppo_terms(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float | None) -> tuple[Tensor, Tensor]:
    """(min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A), whether the clipped term was the smaller)."""
    eps_high = eps_high or eps_low  # None or 0 (the config's "unset") = symmetric clipping
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv
    return torch.minimum(unclipped, clipped), clipped < unclipped


def _per_sequence(adv: Tensor, like: Tensor) -> Tensor:
    """Advantages [B] broadcast over tokens as [B, 1]; [B, T] passes through."""
    return adv.unsqueeze(-1) if adv.dim() == like.dim() - 1 else adv


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    mask = mask.bool()
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def clipped_surrogate(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, eps_low: float = 0.2,
                      eps_high: float | None = None) -> tuple[Tensor, Tensor]:
    """PPO/GRPO clipped surrogate per token: (loss [B, T], clip fraction).

    ratio = exp(logp - old_logp);  loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    eps_high None (or 0) means eps_low; DAPO's clip-higher uses eps_high = 0.28. `adv` is [B] or [B, T].
    clip fraction = share of masked tokens where the clipped term is the one taken (no gradient there).
    """
    log_ratio = (logp - old_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    objective, was_clipped = _ppo_terms(torch.exp(log_ratio), _per_sequence(adv, logp), eps_low, eps_high)
    loss = torch.where(mask.bool(), -objective, 0.0)
    return loss, _masked_mean(was_clipped.float(), mask).detach()


def decoupled_surrogate(logp: Tensor, prox_logp: Tensor, behav_logp: Tensor, adv: Tensor, mask: Tensor,
                        eps_low: float = 0.2, eps_high: float | None = None,
                        max_is_weight: float = 5.0) -> tuple[Tensor, Tensor]:
    """Decoupled PPO (AReaL, Hilton et al. 2021) for stale samples: (loss [B, T], clip fraction).

    w = min(exp(prox_logp - behav_logp), max_is_weight), detached   (behaviour -> proximal policy correction)
    ratio = exp(logp - prox_logp);  loss = -w * min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    The trust region is around the proximal policy (recomputed just before the update), not the stale
    sampler. With prox == behav, w = 1 and this is `clipped_surrogate`.
    """
    log_w = (prox_logp - behav_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    weight = torch.exp(log_w).clamp(max=max_is_weight).detach()
    log_ratio = (logp - prox_logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    objective, was_clipped = _ppo_terms(torch.exp(log_ratio), _per_sequence(adv, logp), eps_low, eps_high)
    loss = torch.where(mask.bool(), -weight * objective, 0.0)
    return loss, _masked_mean(was_clipped.float(), mask).detach()


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(policy || ref) per token: exp(ref - logp) - (ref - logp) - 1  (>= 0).

    Unbiased for the KL with samples from the policy, and never negative (x - 1 >= log x).
    """
    diff = (ref_logp - logp).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(diff) - diff - 1.0


def aggregate(per_token: Tensor, mask: Tensor, mode: AggMode = "token_mean") -> Tensor:
    """Reduce a [B, T] per-token quantity over the masked tokens to a scalar.

    token_mean (DAPO, Dr. GRPO):  sum_{b,t} m x / sum_{b,t} m    (every token weighs the same)
    seq_mean (GRPO):  mean over sequences b with >= 1 token of (sum_t m x / sum_t m)  (each sequence the same)
    Rows with no tokens are left out of seq_mean; an all-empty batch gives 0, not NaN.
    """
    mask = mask.bool()
    values = torch.where(mask, per_token, 0.0)
    if mode == "token_mean":
        return values.sum() / mask.sum().clamp(min=1)
    if mode == "seq_mean":
        tokens = mask.sum(dim=-1)
        per_seq = values.sum(dim=-1) / tokens.clamp(min=1)
        return per_seq.sum() / (tokens > 0).sum().clamp(min=1)
    raise ValueError(f"unknown aggregation {mode!r}; use 'token_mean' or 'seq_mean'")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-token entropy H = -sum_v p_v log p_v of softmax(logits) over the last dim, in nats (for logging).

    Uses entr(p) = -p log p with entr(0) = 0, so -inf logits (banned tokens) are fine.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.special.entr(probs).sum(dim=-1)


def token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[ids]: [B, T, V], [B, T] -> [B, T].

    Use the sampling temperature: the ratio must compare the distribution the tokens were drawn from.
    Computed as logit[id] - logsumexp(logits) so no [B, T, V] log-prob tensor is kept for backward.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); pass the sampling temperature")
    scaled = logits.float() / temperature
    picked = scaled.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def grpo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
              ref_logp: Tensor | None = None, prox_logp: Tensor | None = None, beta: float = 0.0,
              eps_low: float = 0.2, eps_high: float | None = None, agg: AggMode = "token_mean",
              max_is_weight: float = 5.0) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss: aggregate(pg + beta * k3 KL), plus logging stats.

    logp [B, T] (with grad), old_logp [B, T] the behaviour (sampling) log-probs, advantages [B] or [B, T],
    mask [B, T]. With `prox_logp` the policy-gradient term is `decoupled_surrogate` (stale samples),
    else `clipped_surrogate`. `ref_logp` (the reference, adapter-disabled model) is needed when beta > 0.
    stats: pg_loss, kl (masked token mean; 0 without ref), clip_frac, ratio_mean (logp vs the trust-region
    anchor: prox if given, else old), loss.
    """
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (reference log-probs); pass them or set beta = 0")
    if prox_logp is None:
        anchor = old_logp
        pg, clip_frac = clipped_surrogate(logp, old_logp, advantages, mask, eps_low, eps_high)
    else:
        anchor = prox_logp
        pg, clip_frac = decoupled_surrogate(logp, prox_logp, old_logp, advantages, mask, eps_low, eps_high,
                                            max_is_weight)
    pg_loss = aggregate(pg, mask, agg)
    if ref_logp is not None:
        kl = aggregate(kl_k3(logp, ref_logp), mask, agg)
    else:
        kl = torch.zeros_like(pg_loss)
    loss = pg_loss + beta * kl if beta > 0 else pg_loss
    with torch.no_grad():
        log_ratio = (logp - anchor).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        ratio_mean = _masked_mean(torch.exp(log_ratio), mask)
    stats = {"loss": loss.item(), "pg_loss": pg_loss.item(), "kl": kl.item(), "clip_frac": clip_frac.item(),
             "ratio_mean": ratio_mean.item()}
    return loss, stats
