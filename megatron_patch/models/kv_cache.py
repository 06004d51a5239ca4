"""The generator's KV cache: the key/value memory of Megatron-Core's static inference context,
the forwards the generator makes on it, and the edits continuous batching makes to it
(models/generation.py). Checked on megatron-core 0.16.1 and 0.19.2.

Ragged steps. Megatron-Core's static path takes a rectangular batch [rows, tokens] written at one
shared position range: a prompt admitted beside decoding rows would need a forward of its own
(which reads every weight again), and prompts of different lengths would be padded to the longest.
``ragged_forwards(model, context)`` lets one forward take packed tokens [1, tokens] of several rows,
each at its own cache position (``RaggedStep``: the decoding rows' one token each, then whole new
prompts), by three instance overrides, each a no-op outside a ragged step:
- ``Attention._adjust_key_value_for_inference``: rotates this step's queries and keys at their own
  positions (RoPE) and writes the keys and values into the cache at (position, row). Keys are
  cached rotated, so no step rotates the history again (Megatron-Core's static path caches them
  unrotated and rotates every cached key in every forward);
- the core attention: the decoding rows attend over their rows' cache, the new prompts over their
  own window (causal), each row masked before its first prompt token;
- the output layer: the rows' last tokens only, not every prompt token's logits.
Linears, norms and MoE layers see [tokens, 1, hidden], as in any forward. Not for flash decoding,
MLA or fused single-QKV RoPE (Megatron-Core rotates inside its own step there): Qwen3 uses none.

Edits:
- ``close_holes``: finished rows leave; the last live rows move into their places.
- ``copy_rows``: a row takes another's keys and values (a prompt admitted twice is computed once).
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
        copy_rows(cache, slice(0, filled), movers[:len(holes)], holes)
    return order


def copy_rows(cache: dict, positions: slice, sources: list[int], targets: list[int]) -> None:
    """Rows ``targets`` take rows ``sources``' keys and values at ``positions``, in every layer."""
    to, source = torch.tensor(targets), torch.tensor(sources)
    for memory in cache.values():
        for part in memory:
            part[positions, to.to(part.device)] = part[positions, source.to(part.device)]


def shift_back(cache: dict, filled: int, shift: int, rows: int, back_rotation: torch.Tensor,
               interleaved: bool = False) -> None:
    """Move positions [shift, filled) of the first ``rows`` rows to [0, filled - shift), the keys rotated
    by ``back_rotation`` (``back_rotation_of``; ``interleaved``: the model's ``rotary_interleaved``)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    for key, value in cache.values():
        moved = _apply_rotary_pos_emb_bshd(key[shift:filled, :rows], back_rotation, rotary_interleaved=interleaved)
        key[:filled - shift, :rows] = moved
        value[:filled - shift, :rows] = value[shift:filled, :rows].clone()


def back_rotation_of(gpt, shift: int) -> torch.Tensor:
    """RoPE's angles for position ``-shift`` ([1, 1, 1, dim]), from the model's own rotary embedding."""
    return -gpt.rotary_pos_emb(shift + 1)[shift:shift + 1]


def _attentions(model):
    from megatron.core.transformer.attention import Attention

    return [module for module in model.modules() if isinstance(module, Attention)]


class RaggedStep:
    """One forward of the generator: the first ``decoding`` rows each feed one token at ``position``, and
    the rows from ``first`` on (just admitted) their whole prompts, of ``lengths``, ending at ``position``.
    Its tokens are packed, decode tokens first, then each prompt: no padding in any linear."""

    def __init__(self, decoding: int, position: int, first: int, lengths: list[int], starts: torch.Tensor):
        device = starts.device
        self.decoding, self.position, self.first, self.lengths = decoding, position, first, lengths
        self.width = max(lengths, default=0)
        rows = [torch.arange(decoding, device=device)]
        positions = [torch.full((decoding,), position, device=device)]
        # A prompt's tokens take the right-hand slots of its row in a [prompts, width] block.
        slots = []
        for index, length in enumerate(lengths):
            rows.append(torch.full((length,), first + index, device=device))
            positions.append(torch.arange(position + 1 - length, position + 1, device=device))
            slots.append(torch.arange((index + 1) * self.width - length, (index + 1) * self.width, device=device))
        self.rows, self.positions = torch.cat(rows), torch.cat(positions)
        self.slots = torch.cat(slots) if slots else None
        ends = torch.tensor(lengths, dtype=torch.long, device=device).cumsum(0) + decoding - 1
        self.last_tokens = torch.cat([torch.arange(decoding, device=device), ends])
        # Masks, True = attended. A decode token sees its row from the row's first prompt token on; a
        # prompt token sees its prompt up to itself (a padding slot itself only: all-masked rows give NaN).
        # Decoding rows attend from the earliest first token among them: nothing before it is theirs.
        self.oldest = int(starts[:decoding].min()) if decoding else position
        keys = torch.arange(self.oldest, position + 1, device=device)
        self.decode_mask = (keys >= starts[:decoding, None]).view(decoding, 1, 1, len(keys))
        slot = torch.arange(self.width, device=device)
        firsts = self.width - torch.tensor(lengths, dtype=torch.long, device=device)
        causal = slot[None, :] <= slot[:, None]
        self.prompt_mask = ((causal & (slot >= firsts[:, None, None])) | torch.eye(self.width, dtype=torch.bool,
                                                                                   device=device))[:, None]

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the packed queries [tokens, 1, heads, dim] over a layer's cache [positions, rows,
        groups, dim] (this step's keys already in it); returns [tokens, 1, heads * dim]."""
        import torch.nn.functional as F

        queries, outputs = query[:, 0], []
        gqa = queries.shape[1] != keys.shape[2]

        def cached(memory, positions, rows):  # [positions, rows, groups, dim] -> [rows, groups, positions, dim]
            return memory[positions, rows].permute(1, 2, 0, 3)

        if self.decoding:
            rows = slice(0, self.decoding)
            window = slice(self.oldest, self.position + 1)
            out = F.scaled_dot_product_attention(
                queries[:self.decoding, :, None], cached(keys, window, rows), cached(values, window, rows),
                attn_mask=self.decode_mask, scale=scale, enable_gqa=gqa)
            outputs.append(out[:, :, 0])
        if self.lengths:
            count, heads, dim = len(self.lengths), queries.shape[1], queries.shape[2]
            window, rows = slice(self.position + 1 - self.width, self.position + 1), slice(self.first,
                                                                                          self.first + count)
            block = queries.new_zeros(count * self.width, heads, dim)
            block[self.slots] = queries[self.decoding:]
            out = F.scaled_dot_product_attention(
                block.view(count, self.width, heads, dim).transpose(1, 2), cached(keys, window, rows),
                cached(values, window, rows), attn_mask=self.prompt_mask, scale=scale, enable_gqa=gqa)
            outputs.append(out.transpose(1, 2).reshape(count * self.width, heads, dim)[self.slots])
        return torch.cat(outputs).reshape(query.shape[0], 1, -1)


def _ragged_key_values(attention, context, original):
    """``_adjust_key_value_for_inference`` for a ``RaggedStep``: rotate this step's queries and keys at
    their positions, write the keys and values into the cache, and hand on no rotation."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config

    def adjust(inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        step = getattr(context, "ragged", None)
        if inference_context is not context or step is None:
            return original(inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        rotated = []
        for tensor, angles in zip((query, key), rotary_pos_emb):
            rotated.append(apply_rotary_pos_emb(tensor, angles[step.positions], config=attention.config,
                                                mscale=_yarn_get_concentration_factor_from_config(attention.config),
                                                cp_group=attention.pg_collection.cp))
        query, key = rotated
        keys, values = context.key_value_memory_dict[attention.layer_number]
        keys[step.positions, step.rows] = key[:, 0]
        values[step.positions, step.rows] = value[:, 0]
        return query, key, value, None, attention.attn_mask_type, None

    return adjust


def _ragged_core_attention(attention, context, original):
    scale = getattr(attention.core_attention, "softmax_scale", None) or attention.hidden_size_per_attention_head ** -0.5

    def core_attention(query, key, value, *args, **kwargs):
        step = getattr(context, "ragged", None)
        if step is None:
            return original(query, key, value, *args, **kwargs)
        return step.attend(query, *context.key_value_memory_dict[attention.layer_number], scale)

    return core_attention


def _last_tokens_only(context, original):
    def output_layer(hidden_states, *args, **kwargs):
        step = getattr(context, "ragged", None)
        return original(hidden_states if step is None else hidden_states[step.last_tokens], *args, **kwargs)

    return output_layer


def ragged_supported(model) -> bool:
    """Whether ``ragged_forwards`` can run ``model``: RoPE'd self-attention the kit builds (not flash
    decoding, MLA or fused single-QKV RoPE, which rotate inside Megatron-Core's own step)."""
    attentions = _attentions(model)
    config = attentions[0].config if attentions else None
    return bool(attentions) and getattr(model, "position_embedding_type", "rope") == "rope" and not (
        config.flash_decode or config.multi_latent_attention or getattr(config, "fused_single_qkv_rope", False))


@contextmanager
def ragged_forwards(model, context):
    """Within the context, a forward of ``model`` with ``context`` (a static inference context whose
    ``ragged`` attribute holds a ``RaggedStep``) takes packed tokens [1, tokens] of several rows at
    their own positions: each attention writes and reads the cache itself (``RaggedStep.attend``), and
    the output layer computes the rows' last tokens only."""
    if not ragged_supported(model):
        raise ValueError("the generator needs RoPE self-attention without flash decoding, MLA or fused QKV RoPE")
    context.materialize_only_last_token_logits = False
    context.ragged = None
    attentions = _attentions(model)
    for attention in attentions:
        attention._adjust_key_value_for_inference = _ragged_key_values(
            attention, context, attention._adjust_key_value_for_inference)
        attention.core_attention.forward = _ragged_core_attention(attention, context, attention.core_attention.forward)
    model.output_layer.forward = _last_tokens_only(context, model.output_layer.forward)
    try:
        yield
    finally:
        for attention in attentions:
            del attention._adjust_key_value_for_inference
            del attention.core_attention.forward
        del model.output_layer.forward
