"""The GRPO family's formulas, on plain tensors (slime and verl agree on them unless noted).

Shapes: rewards ``[groups, samples]`` (the samples of one prompt form a group); per-token values
``[sequences, tokens]`` with a response ``mask`` of the same shape (1 on response tokens).
"""

from __future__ import annotations

import torch

ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
GRPO_EPSILON = 1e-6  # added to the group's std
LOG_RATIO_LIMIT = 20.0  # log(ρ) clamped before exp (verl), so one wild token cannot overflow
K3_LIMIT = 10.0


def group_advantages(rewards: torch.Tensor, estimator: str = "grpo") -> torch.Tensor:
    """One advantage per sample, ``[groups, samples]``; every token of a response gets its sample's.

    grpo: (r - mean) / (unbiased std + 1e-6); drgrpo: r - mean; rloo: r - mean of the others.
    A group of one sample has advantage 0.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r}: expected one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    rewards = rewards.double()
    count = rewards.shape[-1]
    if count == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    mean = rewards.mean(dim=-1, keepdim=True)
    if estimator == "grpo":
        advantages = (rewards - mean) / (rewards.std(dim=-1, keepdim=True, unbiased=True) + GRPO_EPSILON)
    elif estimator == "drgrpo":
        advantages = rewards - mean
    else:
        others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (count - 1)
        advantages = rewards - others
    return advantages.float()


def importance_ratio(logp: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    return torch.exp((logp - logp_old).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))


def ppo_clip_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                         clip_low: float = 0.2, clip_high: float = 0.2,
                         dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip loss ``max(-A ρ, -A clip(ρ, 1 - clip_low, 1 + clip_high))`` and where it clipped.

    ``advantages`` broadcasts over tokens (``[sequences, 1]``). With ``dual_clip`` c > 1 the loss of
    a negative advantage is at most ``-A c``. ``mask`` is unused (every token stands alone). Returns
    (loss, clipped) per token.
    """
    ratio = importance_ratio(logp, logp_old)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual clip constant must be > 1, got {dual_clip}")
        bounded = torch.minimum(loss, -advantages * dual_clip)
        loss = torch.where(advantages < 0, bounded, loss)
    return loss, clipped


def _sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean over its response tokens, ``[sequences, 1]`` (0 for a sequence without any)."""
    live = mask.to(values.dtype)
    return (values * live).sum(dim=-1, keepdim=True) / live.sum(dim=-1, keepdim=True).clamp(min=1.0)


def gspo_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     clip_low: float = 3e-4, clip_high: float = 4e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO (Qwen team, 2025), its token form: the importance ratio of a whole response,
    s = exp(mean over its tokens of log ρ), clipped PPO-style to [1 - clip_low, 1 + clip_high] (a far
    narrower band than PPO's: a length-normalised ratio moves little). Each token carries
    s_t = sg(s) · ρ_t / sg(ρ_t): its value is s, its gradient A · s · ∇log π_t / |y|-free; with every
    token's advantage the sequence's, this is GSPO's sequence objective. Aggregate with
    seq-mean-token-mean. Returns (loss, clipped) per token."""
    log_ratio = (logp - logp_old).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    sequence = _sequence_mean(log_ratio, mask).detach()
    ratio = torch.exp((sequence + logp - logp.detach()).clamp(max=LOG_RATIO_LIMIT))
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped_loss), clipped_loss > unclipped


def cispo_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_low: float = 1.0, clip_high: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, 2025): ``-sg(clip(ρ, 1 - clip_low, 1 + clip_high)) · A · log π``. The importance
    weight is clipped and its gradient stopped, so a token beyond the band still gives its gradient
    (PPO's clip would drop it), at the clipped weight. MiniMax-M1 sets no lower bound (clip_low 1: the
    weight may fall to 0) and tunes the upper one. Returns (loss, clipped) per token."""
    ratio = importance_ratio(logp, logp_old).detach()
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return -weight * advantages * logp, weight != ratio


def gmpo_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     clip_low: float = 0.4, clip_high: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """GMPO (2025): the geometric mean of the tokens' ratios instead of their arithmetic mean. Each token's
    log ρ is clipped to [-clip_low, clip_high] (log space: ρ in [e^-0.4, e^0.4] by default) on the side
    where it would raise the objective (the sign of A, as PPO's min), and the response's loss is
    -A · exp(mean of the clipped log ρ). Every token carries its response's loss, so
    seq-mean-token-mean gives the mean over responses. Returns (loss, clipped) per token."""
    log_ratio = (logp - logp_old).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    sign = torch.sign(advantages).expand_as(log_ratio)
    bounded = torch.minimum(sign * log_ratio, sign * log_ratio.clamp(-clip_low, clip_high)) * sign
    loss = -advantages * torch.exp(_sequence_mean(bounded, mask))
    return loss.expand_as(logp), bounded != log_ratio


SAPO_TAU_POSITIVE, SAPO_TAU_NEGATIVE = 1.0, 1.05


def sapo_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                     tau_positive: float = SAPO_TAU_POSITIVE,
                     tau_negative: float = SAPO_TAU_NEGATIVE) -> tuple[torch.Tensor, torch.Tensor]:
    """SAPO (Qwen team, 2025): a soft gate instead of a hard clip, ``-A · (4 / τ) · σ(τ (ρ - 1))``, τ by the
    sign of A (negative advantages a little steeper). At ρ = 1 its gradient is PPO's; as ρ leaves 1 the
    gradient fades smoothly instead of stopping at a bound. Nothing is clipped. Returns (loss, clipped)."""
    ratio = importance_ratio(logp, logp_old)
    tau = torch.where(advantages > 0, torch.full_like(advantages, tau_positive),
                      torch.full_like(advantages, tau_negative))
    loss = -advantages * (4.0 / tau) * torch.sigmoid(tau * (ratio - 1.0))
    return loss, torch.zeros_like(ratio, dtype=torch.bool)


# --policy-loss: name -> (function, default (clip_low, clip_high), default aggregation). SAPO's two
# numbers are its temperatures for positive and negative advantages.
POLICY_LOSSES = {
    "ppo-clip": (ppo_clip_policy_loss, (0.2, 0.2), "token-mean"),
    "gspo": (gspo_policy_loss, (3e-4, 4e-4), "seq-mean-token-mean"),
    "cispo": (cispo_policy_loss, (1.0, 4.0), "token-mean"),
    "gmpo": (gmpo_policy_loss, (0.4, 0.4), "seq-mean-token-mean"),
    "sapo": (sapo_policy_loss, (SAPO_TAU_POSITIVE, SAPO_TAU_NEGATIVE), "seq-mean-token-mean"),
}


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from Δ = logp - logp_ref.

    k1 = Δ; k2 = Δ²/2; k3 ("low_var_kl") = exp(-Δ) - 1 + Δ, clamped to ±10.
    """
    delta = logp - logp_ref
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * delta.square()
    if estimator == "k3":
        return (torch.exp(-delta) - 1.0 + delta).clamp(-K3_LIMIT, K3_LIMIT)
    raise ValueError(f"KL estimator {estimator!r}: expected one of {', '.join(KL_ESTIMATORS)}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              norm: float | None = None) -> torch.Tensor:
    """One loss from per-token ``values`` over the response ``mask``.

    token-mean: over all response tokens of the batch; seq-mean-token-mean: each sequence's token
    mean, then the mean over sequences; seq-mean-token-sum: each sequence's sum, then the mean;
    seq-mean-token-sum-norm (Dr.GRPO): the batch's sum divided by ``norm`` (default: the padded
    response length), so long and short answers weigh by their tokens without a length bias.
    """
    mask = mask.to(values.dtype)
    masked = values * mask
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    per_sequence = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        return (per_sequence / mask.sum(dim=-1).clamp(min=1.0)).mean()
    if mode == "seq-mean-token-sum":
        return per_sequence.mean()
    if mode == "seq-mean-token-sum-norm":
        return per_sequence.sum() / (norm if norm is not None else mask.shape[-1])
    raise ValueError(f"loss aggregation {mode!r}: expected one of {', '.join(AGGREGATIONS)}")


def aggregate_parts(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
                    norm: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(numerator, integer denominator) of the loss over a micro-batch, for a loss over many.

    Megatron-Core's schedules (``calculate_per_token_loss``) sum the numerators of every micro-batch
    of every data-parallel rank and divide by the summed denominators, so the step's loss is the
    global batch's: token-mean over all response tokens; seq-mean-* over all sequences (each
    sequence's token mean or sum); seq-mean-token-sum-norm each sequence's sum / ``norm`` (default
    the padded response length), averaged over sequences (Dr.GRPO).
    """
    mask = mask.to(values.dtype)
    masked = values * mask
    tokens = mask.sum(dim=-1)
    sequences = (tokens > 0).sum()
    if mode == "token-mean":
        return masked.sum(), tokens.sum().to(torch.int)
    if mode == "seq-mean-token-mean":
        return (masked.sum(dim=-1) / tokens.clamp(min=1.0)).sum(), sequences.to(torch.int)
    if mode == "seq-mean-token-sum":
        return masked.sum(), sequences.to(torch.int)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum(), (sequences * (norm if norm is not None else mask.shape[-1])).to(torch.int)
    raise ValueError(f"loss aggregation {mode!r}: expected one of {', '.join(AGGREGATIONS)}")


def rollout_correction(logp_old: torch.Tensor, logp_rollout: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weight ``clamp(exp(logp_old - logp_rollout), 0, cap)`` (TIS) per token, for
    a rollout engine whose log-probs differ from the training model's."""
    return importance_ratio(logp_old, logp_rollout).clamp(0.0, cap)


MIS_LEVELS = ("token", "sequence")


def masked_importance_keep(logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor,
                           low: float = 0.5, high: float = 2.0, level: str = "token") -> torch.Tensor:
    """Masked importance sampling: 1 where a response token stays in the loss, 0 where it drops out.

    ρ = exp(logp_old - logp_rollout) per token. ``token``: a token whose ρ leaves [low, high] drops
    out; ``sequence``: a whole sequence drops out when its geometric-mean ρ (exp of the mean log-ratio
    over its response tokens) leaves [low, high]. Unlike TIS, which caps the weight, the dropped tokens
    give no gradient at all. Returns a mask of ``mask``'s shape and dtype.
    """
    if not 0 < low <= 1 <= high:
        raise ValueError(f"masked importance sampling bounds [{low}, {high}] must hold 1, with low > 0")
    if level not in MIS_LEVELS:
        raise ValueError(f"masked importance sampling level {level!r}: expected one of {', '.join(MIS_LEVELS)}")
    live = mask > 0
    log_ratio = (logp_old - logp_rollout).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if level == "token":
        ratio = log_ratio.exp()
        keep = (ratio >= low) & (ratio <= high)
    else:
        tokens = live.sum(dim=-1).clamp(min=1)
        mean = torch.where(live, log_ratio, torch.zeros_like(log_ratio)).sum(dim=-1) / tokens
        ratio = mean.exp()
        keep = ((ratio >= low) & (ratio <= high)).unsqueeze(-1).expand_as(live)
    return (keep & live).to(mask.dtype)


def rollout_mismatch(logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor,
                     cap: float = 2.0) -> dict[str, torch.Tensor]:
    """Sums over response tokens of what separates the rollout engine's log-probs from the training
    forward's (divide by ``tokens`` for means):

    ``rollout_kl``: k3 = exp(Δ) - 1 - Δ with Δ = logp_rollout - logp_train, an estimate of
    KL(train || rollout) that is >= 0 per token; ``beyond_cap``: tokens whose ratio
    exp(logp_train - logp_rollout) is above ``cap`` or below 1 / ``cap``; ``tokens``: the count.
    """
    live = mask > 0
    delta = (logp_rollout - logp_train).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    k3 = (delta.exp() - 1.0 - delta).clamp(max=K3_LIMIT)
    ratio = (-delta).exp()
    beyond = (ratio > cap) | (ratio < 1.0 / cap)
    zero = torch.zeros_like(k3)
    return {"rollout_kl": torch.where(live, k3, zero).sum(), "beyond_cap": (beyond & live).sum().to(k3.dtype),
            "tokens": live.sum().to(k3.dtype)}
