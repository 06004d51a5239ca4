"""Per-token log-probabilities and entropy from vocabulary-parallel logits, a chunk of tokens at a time.

RL needs log p(token) for every response token, with gradients, and the entropy as a metric. At
Qwen3's 151,936-token vocabulary a whole [tokens, vocab] fp32 copy is 0.6 MB per token (one user
report: a 23.9 GiB allocation), so:

- the logits stay as the model produced them (bf16 in a bf16 run, split over TP ranks by vocabulary);
- each chunk of tokens is upcast to fp32 on its own, reduced over TP with Megatron-Core's
  ``vocab_parallel_cross_entropy``, and, when gradients are wanted, recomputed in the backward pass
  (activation checkpointing) instead of keeping its fp32 softmax;
- the padded vocabulary columns (the model's vocabulary is padded for TP) are masked out, so the
  distribution is the one sampling draws from.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 1024


def _tensor_parallel() -> tuple[int, int, object | None]:
    """(this rank's place in its TP group, the group's size, the group; None outside Megatron-Core)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group())


def _scaled(chunk: torch.Tensor, temperature: float, vocab_size: int | None) -> torch.Tensor:
    """fp32 logits / temperature with the padded vocabulary at -inf (always a new tensor: the
    cross-entropy below works in place)."""
    scaled = chunk.float() / temperature
    if vocab_size is not None:
        shard = scaled.shape[-1]
        rank = _tensor_parallel()[0]
        first_padded = vocab_size - rank * shard
        if first_padded < shard:
            scaled[..., max(first_padded, 0):] = float("-inf")
    return scaled


def _chunk_log_probs(chunk: torch.Tensor, targets: torch.Tensor, temperature: float,
                     vocab_size: int | None) -> torch.Tensor:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(_scaled(chunk, temperature, vocab_size), targets)


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    vocab_size: int | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """log p(targets) [...] in fp32 from this rank's vocabulary shard of ``logits`` [..., vocab / TP].

    Differentiable; ``vocab_size`` masks the padded vocabulary columns.
    """
    width = logits.shape[-1]
    flat, flat_targets = logits.reshape(-1, width), targets.reshape(-1)
    recompute = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for start in range(0, flat.shape[0], chunk_tokens):
        arguments = (flat[start:start + chunk_tokens], flat_targets[start:start + chunk_tokens], temperature,
                     vocab_size)
        pieces.append(checkpoint(_chunk_log_probs, *arguments, use_reentrant=False) if recompute
                      else _chunk_log_probs(*arguments))
    return torch.cat(pieces).view(targets.shape)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, temperature: float = 1.0, vocab_size: int | None = None,
                  chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Entropy [...] of each token's distribution (a metric: no gradient), vocabulary-parallel like the above."""
    import torch.distributed as dist

    _, tp, group = _tensor_parallel()
    width = logits.shape[-1]
    flat = logits.reshape(-1, width)
    pieces = []
    for start in range(0, flat.shape[0], chunk_tokens):
        scaled = _scaled(flat[start:start + chunk_tokens], temperature, vocab_size)
        top = scaled.max(dim=-1).values
        if tp > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        weights = torch.exp(scaled - top.unsqueeze(-1))
        # H = log Z - E[x], with Z = sum exp(x - top) (the top added back) and E[x] = sum w x / Z.
        finite = torch.where(torch.isfinite(scaled), scaled, torch.zeros_like(scaled))
        sums = torch.stack([weights.sum(dim=-1), (weights * finite).sum(dim=-1)])
        if tp > 1:
            dist.all_reduce(sums, group=group)
        pieces.append(torch.log(sums[0]) + top - sums[1] / sums[0])
    return torch.cat(pieces).view(logits.shape[:-1])
