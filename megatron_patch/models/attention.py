"""Core attention on PyTorch's scaled_dot_product_attention, for Megatron-Core's local layer spec.

Megatron-Core's local ``DotProductAttention`` (0.16.1) materialises the [b*np, s, s] score matrix
(O(s^2) memory, no flash kernel) and refuses packed sequences. ``SdpaAttention`` takes its place in
the spec's ``core_attention`` slot, with the same constructor and call arguments:

- unpacked batches ([s, b, np, hn]): one causal SDPA call with grouped-query heads, which on CUDA
  picks the flash, cuDNN or memory-efficient kernel and on CPU the math kernel;
- packed batches (``PackedSeqParams`` with qkv_format "thd", [t, np, hn]): attention inside each
  [cu_seqlens[i], cu_seqlens[i+1]) segment only, through ``torch.nn.attention.varlen.varlen_attn``
  on CUDA where this torch has it, else one SDPA call per segment (CPU, and the reference).

Queries are grouped as Megatron groups them (head i uses key/value head i // (np / ng)), which is
also SDPA's ``enable_gqa`` order, so no head is repeated in memory. Parameter-free: checkpoints do
not change. Context parallelism is not supported (it needs Transformer-Engine's ring attention).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


def _varlen_attention():
    """torch.nn.attention.varlen.varlen_attn and how this torch version spells causal and GQA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in parameters:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in parameters


class SdpaAttention(MegatronModule):
    """Drop-in ``core_attention``: causal (or masked) grouped-query attention through torch SDPA."""

    use_varlen_kernel = True  # class switch: off forces the per-segment path on CUDA too

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, **unused):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SdpaAttention does not support context parallelism; it needs Transformer-Engine")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal, AttnMaskType.no_mask):
            raise ValueError(f"SdpaAttention: attention mask type {attn_mask_type} is not supported")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SdpaAttention does not take an attention bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params)
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        causal = (attn_mask_type or self.attn_mask_type) != AttnMaskType.no_mask
        if attention_mask is not None:
            # Megatron's masks are True where attention is *not* allowed; SDPA's the opposite.
            out = self._sdpa(q, k, v, attn_mask=~attention_mask, is_causal=False)
        else:
            out = self._sdpa(q, k, v, is_causal=causal)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _sdpa(self, q, k, v, **kwargs):
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=self._dropout(), scale=self.softmax_scale, enable_gqa=q.shape[-3] != k.shape[-3],
            **kwargs,
        )

    def _packed(self, query, key, value, params):
        """[t, heads, hn] packed segments -> [t, heads * hn], no attention across a segment boundary."""
        cu_q, cu_k = params.cu_seqlens_q, params.cu_seqlens_kv
        if params.cu_seqlens_q_padded is not None and not torch.equal(params.cu_seqlens_q_padded, cu_q):
            raise ValueError("SdpaAttention: padded cu_seqlens (context-parallel packing) are not supported")
        varlen = _varlen_attention() if self.use_varlen_kernel else None
        if (varlen is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
                and self._dropout() == 0.0):
            kernel, causal, takes_gqa = varlen
            if not takes_gqa and key.shape[1] != query.shape[1]:
                repeat = query.shape[1] // key.shape[1]
                key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
            extra = {"enable_gqa": True} if takes_gqa else {}
            out = kernel(query, key, value, cu_q.int(), cu_k.int(), int(params.max_seqlen_q),
                         int(params.max_seqlen_kv), scale=self.softmax_scale, **causal, **extra)
            return out.reshape(out.shape[0], -1)
        bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
        outputs = []
        for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
            # [len, heads, hn] -> [heads, len, hn]
            q, k, v = (x.transpose(0, 1) for x in (query[q0:q1], key[k0:k1], value[k0:k1]))
            outputs.append(self._sdpa(q, k, v, is_causal=True).transpose(0, 1))
        out = torch.cat(outputs)
        return out.reshape(out.shape[0], -1)
