"""Hand-computed checks of the GRPO math in cua_kit.grpo.losses (every expected number is worked out in a
comment), plus the properties a training step relies on: ratio 1 / KL 0 on-policy, finite loss on bad input,
and the sign of the gradient."""

from __future__ import annotations

import math

import pytest
import torch

from cua_kit.grpo.losses import (
    aggregate,
    clipped_surrogate,
    decoupled_surrogate,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    kl_k3,
    step_advantages,
    token_logprobs,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def close(actual: torch.Tensor | float, expected: list | float, tol: float = 1e-5) -> bool:
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected), atol=tol)


# ---- advantages ----------------------------------------------------------------------------------------
def test_std_advantages_use_the_population_std() -> None:
    # mean 0.25; population std sqrt(0.25 * 0.75) = 0.4330127
    # (0 - .25) / .4330127 = -0.5773503;  (1 - .25) / .4330127 = 1.7320508
    adv = group_advantages(torch.tensor([0.0, 1.0, 0.0, 0.0]), "std", eps=0.0)
    assert close(adv, [-0.5773503, 1.7320508, -0.5773503, -0.5773503])


def test_no_std_and_leave_one_out_advantages() -> None:
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert close(group_advantages(rewards, "no_std"), [-0.25, 0.75, -0.25, -0.25])
    # loo: 1 - mean(0,0,0) = 1;  0 - mean(1,0,0) = -1/3
    assert close(group_advantages(rewards, "loo"), [-1 / 3, 1.0, -1 / 3, -1 / 3])
    # rewards 1, 2, 6: 1 - 4 = -3;  2 - 3.5 = -1.5;  6 - 1.5 = 4.5
    assert close(group_advantages(torch.tensor([1.0, 2.0, 6.0]), "loo"), [-3.0, -1.5, 4.5])


@pytest.mark.parametrize("mode", ["std", "no_std", "loo"])
def test_advantages_have_zero_mean_per_group_and_vanish_on_equal_rewards(mode: str) -> None:
    rewards = torch.tensor([[0.2, 0.9, 0.0, 1.0, 0.5], [3.0, -1.0, 2.0, 0.0, 0.0]])
    assert close(group_advantages(rewards, mode).mean(dim=-1), [0.0, 0.0])
    assert close(group_advantages(torch.ones(4), mode), [0.0] * 4)


def test_step_advantages_group_turns_by_the_screen_they_saw() -> None:
    # GiGPO, gamma 0.9. Episodes (screens seen per turn; reward): [A, B] 1; [A, C, B] 1; [A] 0.
    # Discounted returns gamma^(turns left) * r: [0.9, 1.0]; [0.81, 0.9, 1.0]; [0.0].
    # Screen A: 0.9, 0.81, 0.0, mean 0.57 -> no_std 0.33, 0.24, -0.57.
    # Screen B: 1.0, 1.0 -> 0, 0. Screen C: seen once -> 0.
    states, rewards = [["A", "B"], ["A", "C", "B"], ["A"]], [1.0, 1.0, 0.0]
    adv = step_advantages(states, rewards, gamma=0.9, mode="no_std")
    assert [len(a) for a in adv] == [2, 3, 1]
    assert close(sum(adv, []), [0.33, 0.0, 0.24, 0.0, 0.0, -0.57])
    # std: population std of (0.33, 0.24, -0.57) = sqrt((0.1089 + 0.0576 + 0.3249) / 3) = 0.4047221
    std = step_advantages(states, rewards, gamma=0.9, mode="std")
    assert close([std[0][0], std[1][0], std[2][0]], [0.33 / 0.4047221, 0.24 / 0.4047221, -0.57 / 0.4047221], 1e-4)
    # the shorter success from the shared first screen scores higher; nothing is shared: all 0
    assert std[0][0] > std[1][0] > 0 > std[2][0]
    assert step_advantages([["A"], ["B"]], [1.0, 0.0]) == [[0.0], [0.0]]


def test_bad_advantage_arguments_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="'std', 'no_std' or 'loo'"):
        group_advantages(torch.ones(3), "mean")
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.ones(1), "loo")


# ---- surrogates ----------------------------------------------------------------------------------------
def ratios_as_logp(ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, old_logp) [1, n] with exp(logp - old) = ratios."""
    old = torch.full((1, len(ratios)), -2.0)
    return old + torch.log(torch.tensor([ratios])), old


def test_clipped_surrogate_hand_values() -> None:
    # eps 0.2. ratio 1.5, A=+1: min(1.5, 1.2) = 1.2 -> loss -1.2 (clipped)
    #          ratio 1.5, A=-1: min(-1.5, -1.2) = -1.5 -> loss 1.5
    #          ratio 0.5, A=+1: min(0.5, 0.8) = 0.5 -> loss -0.5
    #          ratio 0.5, A=-1: min(-0.5, -0.8) = -0.8 -> loss 0.8 (clipped)
    logp, old = ratios_as_logp([1.5, 1.5, 0.5, 0.5])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clip_frac = clipped_surrogate(logp, old, adv, torch.ones(1, 4))
    assert close(loss, [[-1.2, 1.5, -0.5, 0.8]])
    assert close(clip_frac, 0.5)


def test_clip_higher_widens_only_the_upper_range() -> None:
    # ratio 1.25, A=+1: eps_high 0.28 -> min(1.25, 1.25) = 1.25; symmetric 0.2 -> 1.2.  ratio 0.75, A=-1:
    # lower range still 0.2 -> min(-0.75, -0.8) = -0.8 -> loss 0.8 either way
    logp, old = ratios_as_logp([1.25, 0.75])
    adv, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    assert close(clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)[0], [[-1.25, 0.8]])
    assert close(clipped_surrogate(logp, old, adv, mask, 0.2)[0], [[-1.2, 0.8]])
    assert close(clipped_surrogate(logp, old, adv, mask, 0.2, 0.0)[0], [[-1.2, 0.8]])  # 0 = unset


def test_per_sequence_advantages_broadcast_over_tokens() -> None:
    # ratio 1 everywhere: loss = -A per token; A = [2, -3] per sequence
    logp = torch.zeros(2, 3)
    loss, _ = clipped_surrogate(logp, logp, torch.tensor([2.0, -3.0]), torch.ones(2, 3))
    assert close(loss, [[-2.0] * 3, [3.0] * 3])


def test_decoupled_surrogate_hand_values() -> None:
    behav = torch.full((1, 3), -1.0)
    # token 0: prox - behav = ln 2 -> w = 2; logp - prox = ln 1.5 -> ratio 1.5, A = 1:
    #          -2 * min(1.5, 1.2) = -2.4
    # token 1: prox - behav = ln 10 -> w = min(10, 5) = 5; ratio 1, A = 1: -5 * 1 = -5
    # token 2: prox - behav = -ln 2 -> w = 0.5; ratio 0.5, A = -1: -0.5 * min(-0.5, -0.8) = 0.4 (clipped)
    prox = behav + torch.tensor([[LN2, math.log(10.0), -LN2]])
    logp = prox + torch.tensor([[math.log(1.5), 0.0, -LN2]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, clip_frac = decoupled_surrogate(logp, prox, behav, adv, torch.ones(1, 3), 0.2, None,
                                          max_is_weight=5.0)
    assert close(loss, [[-2.4, -5.0, 0.4]])
    assert close(clip_frac, 2 / 3)


def test_decoupled_equals_clipped_when_the_sampler_is_the_proximal_policy() -> None:
    gen = torch.Generator().manual_seed(0)
    logp, old = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    adv, mask = torch.randn(3, generator=gen), torch.ones(3, 5)
    decoupled, frac_d = decoupled_surrogate(logp, old, old, adv, mask, 0.2, 0.28)
    clipped, frac_c = clipped_surrogate(logp, old, adv, mask, 0.2, 0.28)
    assert torch.allclose(decoupled, clipped) and frac_d == frac_c


# ---- KL, aggregation, entropy, log-probs ---------------------------------------------------------------
def test_kl_k3_hand_values() -> None:
    # ref - logp = ln 2: 2 - ln 2 - 1 = 0.3068528;  ref - logp = -ln 2: 0.5 + ln 2 - 1 = 0.1931472;  equal: 0
    logp = torch.zeros(1, 3)
    kl = kl_k3(logp, torch.tensor([[LN2, -LN2, 0.0]]))
    assert close(kl, [[0.3068528, 0.1931472, 0.0]])
    assert (kl_k3(torch.randn(50), torch.randn(50)) >= 0).all()


def test_aggregate_token_mean_and_seq_mean() -> None:
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # token_mean: (1 + 2 + 3 + 4) / 4 = 2.5;  seq_mean: mean(2, 4) = 3 (the empty row is left out)
    assert close(aggregate(per_token, mask, "token_mean"), 2.5)
    assert close(aggregate(per_token, mask, "seq_mean"), 3.0)
    assert close(aggregate(per_token, torch.zeros(3, 3), "seq_mean"), 0.0)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(per_token, mask, "sum")


def test_entropy_from_logits_hand_values() -> None:
    # uniform over 4: ln 4 = 1.3862944;  two equal, two banned (-inf): ln 2;  one-hot: 0
    inf = float("inf")
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, -inf, -inf], [0.0, -inf, -inf, -inf]]])
    assert close(entropy_from_logits(logits), [[math.log(4.0), LN2, 0.0]])


def test_token_logprobs_hand_values_with_temperature() -> None:
    logits = torch.tensor([[[0.0, LN3], [LN3, 0.0]]])
    ids = torch.tensor([[1, 1]])
    # T=1: softmax(0, ln 3) = (1/4, 3/4): log 3/4 and log 1/4
    assert close(token_logprobs(logits, ids), [[math.log(0.75), math.log(0.25)]])
    # T=2: logits (0, ln3/2) -> p(1) = sqrt3 / (1 + sqrt3) = 0.6339746
    assert close(token_logprobs(logits, ids, temperature=2.0)[0, 0], math.log(0.6339746))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(logits, ids, temperature=0.0)


# ---- the combined loss ---------------------------------------------------------------------------------
def test_on_policy_ratio_is_one_and_kl_is_zero() -> None:
    logp = torch.randn(2, 4)
    _, stats = grpo_loss(logp, logp.clone(), torch.tensor([1.0, -1.0]), torch.ones(2, 4),
                         ref_logp=logp.clone(), beta=0.1)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["kl"] == pytest.approx(0.0)
    assert stats["clip_frac"] == 0.0


def test_grpo_loss_hand_values() -> None:
    # ratio 1 everywhere, A = [1, -1] -> pg per token [[-1, -1], [1, pad]]
    # token_mean pg: (-1 - 1 + 1) / 3 = -1/3;  seq_mean pg: (-1 + 1) / 2 = 0
    # ref - logp = ln 2 on every token -> k3 = 0.3068528;  beta 0.1 adds 0.03068528
    logp = torch.full((2, 2), -1.0)
    ref = logp + LN2
    adv, mask = torch.tensor([1.0, -1.0]), torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo_loss(logp, logp, adv, mask, ref_logp=ref, beta=0.1, agg="token_mean")
    assert close(loss, -1 / 3 + 0.03068528)
    assert stats["pg_loss"] == pytest.approx(-1 / 3) and stats["kl"] == pytest.approx(0.3068528, abs=1e-6)
    loss, _ = grpo_loss(logp, logp, adv, mask, ref_logp=ref, beta=0.1, agg="seq_mean")
    assert close(loss, 0.03068528)
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, logp, adv, mask, beta=0.1)


def test_loss_is_finite_with_an_empty_row_and_garbage_logits() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 6, 11, generator=gen) * 1e4).requires_grad_()
    ids = torch.randint(0, 11, (3, 6), generator=gen)
    logp = token_logprobs(logits, ids)
    old = logp.detach() + torch.randn(3, 6, generator=gen) * 50  # ratios far outside any trust region
    old[1, 3:] = float("nan")  # padding with NaN behaviour log-probs
    mask = torch.ones(3, 6)
    mask[0] = 0  # an all-padding row
    mask[1, 3:] = 0
    for prox in (None, old.detach() + 30):
        for agg in ("token_mean", "seq_mean"):
            loss, stats = grpo_loss(token_logprobs(logits, ids), old, torch.tensor([1.0, -2.0, 3.0]), mask,
                                    ref_logp=old + 40, prox_logp=prox, beta=0.04, agg=agg)
            (grad,) = torch.autograd.grad(loss, logits)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
            assert all(math.isfinite(v) for v in stats.values())


def test_nan_log_probs_in_padding_get_a_zero_gradient() -> None:
    logp = torch.tensor([[-1.0, float("nan")], [-2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.1, float("nan")], [-2.0, float("inf")]])
    mask = torch.tensor([[1, 0], [1, 0]])
    for prox in (None, old):
        loss, _ = grpo_loss(logp, old, torch.tensor([1.0, -1.0]), mask, ref_logp=old, prox_logp=prox,
                            beta=0.1)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad[0, 1] == 0 and grad[1, 1] == 0 and grad[0, 0] != 0


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_one_sgd_step_moves_logp_with_the_sign_of_the_advantage(advantage: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7, requires_grad=True)
    ids = torch.tensor([[2, 5, 0, 6]])
    before = token_logprobs(logits, ids).detach()
    loss, _ = grpo_loss(token_logprobs(logits, ids), before, torch.tensor([advantage]), torch.ones(1, 4))
    loss.backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    after = token_logprobs(logits, ids).detach()
    assert (torch.sign(after - before) == advantage).all()
