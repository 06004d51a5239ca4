"""The generator's KV cache: Megatron-Core's static inference context, and the edits continuous
batching makes to it (models/generation.py). Checked on megatron-core 0.16.1 and 0.19.2, whose
``Attention._adjust_key_value_for_inference`` is the same in what this relies on.

Keys rotated once. Megatron-Core's static path caches keys *before* RoPE and rotates the whole
cached history again in every forward (``_adjust_key_value_for_inference`` hands on
``k_pos_emb[:sequence_end]`` and ``Attention.forward`` applies it to every cached key, computing
cos and sin of every position as it goes): a decode step does elementwise work in proportion to
the positions so far, in every layer, besides attention itself. At RL lengths that outgrows the
step's matrix multiplies. ``keys_rotated_once(model)`` makes each attention rotate only its new
keys, at the positions Megatron-Core would rotate them at, before they are cached, and hand on no
key rotation; same elementwise maths on the same values, so the same numbers. (Megatron-Core's
``flash_decode`` caches rotated keys too, but only with the flash-attn kernels.)

Edits:
- ``close_holes``: finished rows leave; the last live rows move into their places.
- ``shift_back``: the live positions move to the front when the cache's positions run out. Cached
  rotated keys are rotated back by the shift, RoPE(p - s) = RoPE(-s) RoPE(p): attention depends
  only on the distance between query and key, so the moved rows attend as before (to float
  rounding).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def allocate(model, context) -> dict:
    """Every layer's key and value memory in ``context``, zeroed. Megatron-Core would allocate them
    with ``torch.empty`` in each layer's first forward: positions a row never wrote are masked, but a
    masked NaN still poisons attention (0 * NaN)."""
    for attention in _attentions(model):
        weight = attention.linear_qkv.weight
        shape = (context.max_sequence_length, context.max_batch_size, attention.num_query_groups_per_partition)
        context.key_value_memory_dict[attention.layer_number] = tuple(
            torch.zeros(*shape, width, dtype=weight.dtype, device=weight.device)
            for width in (attention.key_hidden_size, attention.val_hidden_size))
    return context.key_value_memory_dict


def close_holes(cache: dict, filled: int, finished: list[int], rows: int) -> list[int]:
    """Drop the finished rows from the first ``rows`` of every layer's cache, moving the last live rows
    into their places (only those rows are copied); returns the order for ``_Rows.keep`` (row i
    becomes what row order[i] was)."""
    gone = set(finished)
    kept = rows - len(gone)
    holes = [row for row in finished if row < kept]
    movers = [row for row in range(kept, rows) if row not in gone]
    order = list(range(kept))
    for hole, mover in zip(holes, movers):
        order[hole] = mover
    if holes:
        to, source = torch.tensor(holes), torch.tensor(movers)
        for memory in cache.values():
            for part in memory:
                part[:filled, to.to(part.device)] = part[:filled, source.to(part.device)]
    return order


def shift_back(cache: dict, filled: int, shift: int, rows: int, back_rotation: torch.Tensor | None = None,
               interleaved: bool = False) -> None:
    """Move positions [shift, filled) of the first ``rows`` rows to [0, filled - shift); rotate the keys
    by ``back_rotation`` (``back_rotation_of``) when they are cached rotated (``interleaved``: the
    model's ``rotary_interleaved``)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    for key, value in cache.values():
        moved = key[shift:filled, :rows]
        if back_rotation is not None:
            moved = _apply_rotary_pos_emb_bshd(moved, back_rotation, rotary_interleaved=interleaved)
        key[:filled - shift, :rows] = moved.clone()
        value[:filled - shift, :rows] = value[shift:filled, :rows].clone()


def back_rotation_of(gpt, shift: int) -> torch.Tensor:
    """RoPE's angles for position ``-shift`` ([1, 1, 1, dim]), from the model's own rotary embedding."""
    return -gpt.rotary_pos_emb(shift + 1)[shift:shift + 1]


def _attentions(model):
    from megatron.core.transformer.attention import Attention

    return [module for module in model.modules() if isinstance(module, Attention)]


def _rotating_once(attention, original):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config

    def adjust(inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        if inference_context is None or not inference_context.is_static_batching() \
                or not isinstance(rotary_pos_emb, tuple) or rotary_pos_emb[1] is None:
            return original(inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        start = inference_context.sequence_len_offset
        key = apply_rotary_pos_emb(key, rotary_pos_emb[1][start:start + key.shape[0]], config=attention.config,
                                   mscale=_yarn_get_concentration_factor_from_config(attention.config),
                                   cp_group=attention.pg_collection.cp)
        query, key, value, (q_pos_emb, _), mask_type, block_table = original(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        return query, key, value, (q_pos_emb, None), mask_type, block_table

    return adjust


@contextmanager
def keys_rotated_once(model):
    """Within the context, ``model``'s attentions cache rotated keys (see the module docstring).
    Yields whether they do: not for a model without RoPE or with flash decoding."""
    attentions = _attentions(model)
    config = attentions[0].config if attentions else None
    # Fused single-QKV RoPE (0.19) rotates query and key together after this step: left as it is.
    if not attentions or config.flash_decode or getattr(model, "position_embedding_type", "rope") != "rope" \
            or config.multi_latent_attention or getattr(config, "fused_single_qkv_rope", False):
        yield False
        return
    for attention in attentions:
        attention._adjust_key_value_for_inference = _rotating_once(attention,
                                                                   attention._adjust_key_value_for_inference)
    try:
        yield True
    finally:
        for attention in attentions:
            del attention._adjust_key_value_for_inference
