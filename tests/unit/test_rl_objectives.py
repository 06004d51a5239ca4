"""GRPO's formulas against the reference's check values and hand-computed cases."""

import math

import pytest
import torch

from megatron_patch.rl.objectives import (
    POLICY_LOSSES,
    aggregate,
    cispo_policy_loss,
    gmpo_policy_loss,
    group_advantages,
    gspo_policy_loss,
    kl_penalty,
    ppo_clip_policy_loss,
    rollout_correction,
    sapo_policy_loss,
)


def test_advantages_match_the_check_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    grpo = group_advantages(rewards, "grpo")
    assert torch.allclose(grpo, torch.tensor([[0.866, -0.866, -0.866, 0.866]]), atol=5e-4)
    assert torch.allclose(grpo, torch.tensor([[1, -1, -1, 1]]) * 0.5 / (math.sqrt(1 / 3) + 1e-6))
    assert torch.equal(group_advantages(rewards, "drgrpo"), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    assert torch.allclose(group_advantages(rewards, "rloo"), torch.tensor([[2, -2, -2, 2]]) / 3)


def test_equal_rewards_and_a_group_of_one_give_no_signal():
    for estimator in ("grpo", "drgrpo", "rloo"):
        assert torch.equal(group_advantages(torch.full((2, 4), 0.7), estimator), torch.zeros(2, 4))
        assert torch.equal(group_advantages(torch.tensor([[1.0], [0.0]]), estimator), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="advantage estimator 'ppo'"):
        group_advantages(torch.zeros(1, 2), "ppo")


def test_groups_are_independent():
    rewards = torch.tensor([[1.0, 0.0], [5.0, 3.0]])
    assert torch.allclose(group_advantages(rewards, "drgrpo"), torch.tensor([[0.5, -0.5], [1.0, -1.0]]))


def test_the_clip_has_separate_low_and_high_bounds():
    advantage = torch.tensor([[1.0], [-1.0]])
    ratios = torch.tensor([[0.5, 1.0, 1.25, 1.5], [0.5, 0.75, 1.0, 1.5]])
    logp_old = torch.zeros(2, 4)
    loss, clipped = ppo_clip_policy_loss(ratios.log(), logp_old, advantage, None, clip_low=0.2, clip_high=0.28)
    # A > 0: -A·min(ρ, 1.28) (the clip only ever lowers the gain); A < 0: A·max(ρ, 0.8)
    assert torch.allclose(loss[0], torch.tensor([-0.5, -1.0, -1.25, -1.28]))
    assert torch.allclose(loss[1], torch.tensor([0.8, 0.8, 1.0, 1.5]))
    assert clipped.tolist() == [[False, False, False, True], [True, True, False, False]]


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    ratio = torch.tensor([[10.0], [10.0]]).log()
    advantage = torch.tensor([[-1.0], [1.0]])
    loss, _ = ppo_clip_policy_loss(ratio, torch.zeros(2, 1), advantage, None, dual_clip=3.0)
    assert loss[:, 0].tolist() == pytest.approx([3.0, -1.2])  # -A·c for A < 0; positive A untouched


def test_the_log_ratio_is_clamped_before_exp():
    loss, _ = ppo_clip_policy_loss(torch.tensor([[1000.0]]), torch.zeros(1, 1), torch.tensor([[-1.0]]), None)
    assert torch.isfinite(loss).all() and loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)
    assert rollout_correction(torch.tensor([0.0, 5.0, -1.0]), torch.zeros(3), cap=2.0).tolist() == \
        pytest.approx([1.0, 2.0, math.exp(-1.0)])


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    delta = logp - ref  # [0.5, -1.0]
    assert torch.allclose(kl_penalty(logp, ref, "k1"), delta)
    assert torch.allclose(kl_penalty(logp, ref, "k2"), delta.square() / 2)
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 2]))
    assert kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3").item() == 10.0  # clamped
    assert (kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()  # exp(x) >= 1 + x


def test_the_four_aggregations():
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])  # 3 and 1 response tokens; 9s are padding
    assert aggregate(values, mask, "token-mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-sum-norm", norm=5.0).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="loss aggregation 'mean'"):
        aggregate(values, mask, "mean")


def test_masked_importance_sampling_drops_tokens_and_sequences_outside_the_bounds():
    from megatron_patch.rl.objectives import masked_importance_keep

    # ρ per token: e^0 = 1, e^1 = 2.72, e^-1 = 0.37, e^0.5 = 1.65; the last column is padding.
    logp_old = torch.tensor([[0.0, 1.0, -1.0, 0.5], [0.2, 0.2, 0.0, 9.0]])
    logp_rollout = torch.zeros(2, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    keep = masked_importance_keep(logp_old, logp_rollout, mask, low=0.5, high=2.0, level="token")
    assert torch.equal(keep, torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]))
    # Sequence level: row 0's mean log-ratio (0 + 1 - 1 + 0.5) / 4 = 0.125 -> ρ 1.13 stays whole;
    # row 1's (0.2 + 0.2) / 2 = 0.2 -> 1.22 stays; with high 1.2 row 1 drops out whole.
    whole = masked_importance_keep(logp_old, logp_rollout, mask, level="sequence")
    assert torch.equal(whole, mask)
    tight = masked_importance_keep(logp_old, logp_rollout, mask, low=0.5, high=1.2, level="sequence")
    assert torch.equal(tight, torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="must hold 1"):
        masked_importance_keep(logp_old, logp_rollout, mask, low=1.5, high=2.0)
    with pytest.raises(ValueError, match="level 'batch'"):
        masked_importance_keep(logp_old, logp_rollout, mask, level="batch")


def test_rollout_mismatch_sums_k3_and_the_tokens_beyond_the_cap():
    from megatron_patch.rl.objectives import rollout_mismatch

    train = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    rollout = torch.tensor([[-1.0, -1.0, -1.5, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    sums = rollout_mismatch(train, rollout, mask, cap=2.0)
    # Δ = rollout - train: 0, 1, -1 (the padded 5 is left out); k3 = e^Δ - 1 - Δ.
    expected = 0.0 + (math.e - 2.0) + (math.exp(-1.0))
    assert sums["rollout_kl"].item() == pytest.approx(expected, rel=1e-6)
    # ratio = e^-Δ: 1, 0.37 (< 1/2), 2.72 (> 2): two tokens beyond the cap.
    assert sums["beyond_cap"].item() == 2 and sums["tokens"].item() == 3
    same = rollout_mismatch(train, train, mask)
    assert same["rollout_kl"].item() == 0 and same["beyond_cap"].item() == 0


def _grad(function, log_ratio, advantage, mask, aggregation, **numbers):
    """(per-token loss, clipped, d aggregated loss / d logp) with logp_old = 0."""
    logp = torch.tensor(log_ratio, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(mask, dtype=torch.float64)
    loss, clipped = function(logp, torch.zeros_like(logp), torch.tensor(advantage, dtype=torch.float64), mask,
                             **numbers)
    aggregate(loss, mask, aggregation).backward()
    return loss.detach(), clipped, logp.grad


def test_gspo_uses_the_responses_ratio_and_its_narrow_clip():
    """s = exp(mean log ρ) over the response (the padded token's wild ratio is not in it); every token carries s,
    and the gradient of seq-mean-token-mean is GSPO's, s / |y| per token."""
    loss, clipped, grad = _grad(gspo_policy_loss, [[0.1, -0.3, 9.0]], [[1.0]], [[1, 1, 0]], "seq-mean-token-mean")
    s = math.exp(-0.1)  # below 1 - 3e-4, but with A > 0 the clip only ever lowers the gain: not clipped
    assert loss[0, :2].tolist() == pytest.approx([-s, -s]) and not clipped[0, :2].any()
    assert grad[0].tolist() == pytest.approx([-s / 2, -s / 2, 0.0])
    loss, clipped, grad = _grad(gspo_policy_loss, [[0.01, 0.01]], [[1.0]], [[1, 1]], "seq-mean-token-mean")
    assert loss[0].tolist() == pytest.approx([-(1 + 4e-4)] * 2) and clipped.all()  # e^0.01 > 1 + 4e-4
    assert grad.abs().max() == 0
    assert POLICY_LOSSES["gspo"][1:] == ((3e-4, 4e-4), "seq-mean-token-mean")


def test_cispo_clips_the_weight_and_keeps_every_tokens_gradient():
    """-sg(clip(ρ, 0, 5)) · A · log π: the token at ρ = 6 is clipped to weight 5 and still has a gradient (PPO's
    clip would give it none)."""
    logp_old = torch.full((1, 3), -1.0, dtype=torch.float64)
    logp = (logp_old + torch.tensor([[0.5, 1.0, 6.0]], dtype=torch.float64).log()).requires_grad_()
    loss, clipped = cispo_policy_loss(logp, logp_old, torch.tensor([[2.0]], dtype=torch.float64), None)
    weights = torch.tensor([[0.5, 1.0, 5.0]], dtype=torch.float64)
    assert torch.allclose(loss, -weights * 2 * logp.detach()) and clipped.tolist() == [[False, False, True]]
    loss.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-1.0, -2.0, -10.0])


def test_gmpo_takes_the_geometric_mean_of_clipped_token_ratios():
    """log ρ clipped to [-0.4, 0.4] on the side that would raise the objective (A's sign); loss -A · exp(mean)."""
    loss, clipped, grad = _grad(gmpo_policy_loss, [[0.6, -0.2, 0.1]], [[1.0]], [[1, 1, 1]], "seq-mean-token-mean")
    ratio = math.exp((0.4 - 0.2 + 0.1) / 3)
    assert loss[0].tolist() == pytest.approx([-ratio] * 3) and clipped.tolist() == [[True, False, False]]
    assert grad[0].tolist() == pytest.approx([0.0, -ratio / 3, -ratio / 3])  # the clipped token gives none
    loss, clipped, _ = _grad(gmpo_policy_loss, [[0.6, -0.6, 0.1]], [[-1.0]], [[1, 1, 1]], "seq-mean-token-mean")
    assert loss[0, 0].item() == pytest.approx(math.exp((0.6 - 0.4 + 0.1) / 3))
    assert clipped.tolist() == [[False, True, False]]


def test_sapo_is_a_soft_gate_with_ppos_gradient_at_ratio_one():
    loss, clipped, grad = _grad(sapo_policy_loss, [[0.0, 0.0]] * 2, [[1.0], [-2.0]], [[1, 1]] * 2, "token-mean")
    assert loss[0].tolist() == pytest.approx([-2.0, -2.0])  # -A (4 / 1) σ(0)
    assert loss[1].tolist() == pytest.approx([2 * 4 / 1.05 * 0.5] * 2)  # τ = 1.05 for A < 0
    assert grad.flatten().tolist() == pytest.approx([-0.25, -0.25, 0.5, 0.5])  # -A ρ σ'(0) 4 / 4 tokens: PPO's
    assert not clipped.any()
    # Away from ρ = 1 the gradient fades instead of stopping: at ρ = 3 (A > 0) it is -(4) σ'(2) ρ = -1.26.
    logp = torch.tensor([[math.log(3.0)]], requires_grad=True)
    loss, _ = sapo_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[1.0]]), None)
    loss.sum().backward()
    sigmoid = 1 / (1 + math.exp(-2.0))
    assert logp.grad.item() == pytest.approx(-4 * sigmoid * (1 - sigmoid) * 3.0, rel=1e-5)
