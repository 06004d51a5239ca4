"""GRPO's formulas against the reference's check values and hand-computed cases."""

import math

import pytest
import torch

from megatron_patch.rl.objectives import (
    aggregate,
    group_advantages,
    kl_penalty,
    policy_loss,
    rollout_correction,
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
    loss, clipped = policy_loss(ratios.log(), logp_old, advantage, clip_low=0.2, clip_high=0.28)
    # A > 0: -A·min(ρ, 1.28) (the clip only ever lowers the gain); A < 0: A·max(ρ, 0.8)
    assert torch.allclose(loss[0], torch.tensor([-0.5, -1.0, -1.25, -1.28]))
    assert torch.allclose(loss[1], torch.tensor([0.8, 0.8, 1.0, 1.5]))
    assert clipped.tolist() == [[False, False, False, True], [True, True, False, False]]


def test_dual_clip_bounds_the_loss_of_negative_advantages():
    ratio = torch.tensor([[10.0], [10.0]]).log()
    advantage = torch.tensor([[-1.0], [1.0]])
    loss, _ = policy_loss(ratio, torch.zeros(2, 1), advantage, dual_clip=3.0)
    assert loss[:, 0].tolist() == pytest.approx([3.0, -1.2])  # -A·c for A < 0; positive A untouched


def test_the_log_ratio_is_clamped_before_exp():
    loss, _ = policy_loss(torch.tensor([[1000.0]]), torch.zeros(1, 1), torch.tensor([[-1.0]]))
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
