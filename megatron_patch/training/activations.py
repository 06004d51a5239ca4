"""Activation memory of one micro-batch: the bytes each layer saves for its backward pass.

Term by term, from what each operation of the kit's modules saves for backward (measured with
``torch.autograd.graph.saved_tensors_hooks`` on CPU; tests/functional/test_memory_plan.py checks the
sum on a tiny MoE and on an A3B-width layer). Bytes per token of one layer, for the torch spec:
- RMSNorm (torch.nn.RMSNorm: fp32 weight, so fp32 math): its input upcast, the normalised values
  (both fp32) and 1/rms: 8h + 4 per norm; q/k norms the same per head.
- Each linear saves its bf16 input; the core attention (SDPA's flash kernel) its q, k, v, output and
  log-sum-exp, with v (and the k of GQA before its norm) views of the fused QKV output.
- The router its logits-derived scores, top-k indices and probabilities; the token dispatcher its
  routing map; the grouped experts their permuted input and six ffn-wide bf16 tensors per routed token.
- The loss the fp32 softmax over the vocabulary.
The dense MLP's SwiGLU keeps two fc1-wide tensors besides fc2's input.
Selective recompute (core attention) then keeps q, k, v and the output anyway (the output is the
projection's input): it frees only the log-sum-exp with a flash kernel, and the s x s scores with
the local spec's unfused attention. Full recompute keeps each recomputed group's input.
The Transformer-Engine spec is modelled, not measured (no TE here): bf16 norms fused into the
linears (input and output kept), q/k norms on views of the QKV output, fused RoPE, SwiGLU keeping
fc1's output and fc2's input, and its fused cross entropy keeping only the bf16 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_patch.models.qwen3.arch import padded_vocab_size
from megatron_patch.training.memory import FP32, ModelShape

BF16 = 2
INT64 = 8


@dataclass(frozen=True)
class Tokens:
    """The tokens of one micro-batch on one rank, and how TP/SP/CP split them."""

    sequence: int  # tokens of one sequence on this rank (seq-length / CP)
    batch: int = 1  # micro-batch size
    sequence_parallel: bool = False
    tp: int = 1

    @property
    def count(self) -> int:
        return self.sequence * self.batch

    @property
    def hidden_share(self) -> int:
        """Tokens whose hidden-sized tensors this rank keeps: all of them, or 1/TP with sequence parallelism."""
        return self.count // self.tp if self.sequence_parallel else self.count


def _norm(width: int) -> int:
    """torch.nn.RMSNorm with an fp32 weight on a bf16 input: fp32 input copy and output, and 1/rms."""
    return 2 * FP32 * width + FP32


def _norm_te(width: int) -> int:
    """Transformer-Engine's RMSNorm: its bf16 input and 1/rms (its bf16 output is the next linear's input)."""
    return BF16 * width + FP32


def attention_bytes(shape: ModelShape, tokens: Tokens, recompute: str) -> int:
    """What the attention block (input norm to output projection) saves for ``tokens``."""
    arch, tp, impl = shape.arch, shape.layout.tp, shape.impl
    h, head = arch.hidden_size, arch.head_dim
    q_heads, kv_heads = arch.num_attention_heads // tp, arch.num_query_groups // tp
    q, kv = q_heads * head, kv_heads * head
    te = impl == "transformer_engine"
    hidden_part = (_norm_te if te else _norm)(h) + BF16 * h  # input norm, QKV projection's input
    if te:  # q/k norms save their input (views of the QKV output) and 1/rms; fused RoPE only its table
        heads_part, rope = FP32 * (q_heads + kv_heads), 0
    else:
        heads_part = (_norm(q) - FP32 + FP32 * q_heads) + (_norm(kv) - FP32 + FP32 * kv_heads)
        rope = 4 * BF16 * head  # cos and sin, for q and for k
    if impl == "local" and recompute != "sel":
        # Unfused attention: GQA-expanded q, k and v, the output, and per pair of tokens the fp32
        # softmax, its bf16 copy and the mask.
        core = 4 * BF16 * q + tokens.sequence * ((FP32 + BF16) * q_heads + 1)
    else:
        # q and k (fresh after their norms), the fused QKV output (v is a view of it), the output.
        core = BF16 * (q + 2 * kv) + BF16 * q + BF16 * kv + BF16 * q
        if recompute != "sel":
            core += FP32 * q_heads  # flash attention's log-sum-exp
    per_token = heads_part + rope + core
    return hidden_part * tokens.hidden_share + per_token * tokens.count


def mlp_bytes(shape: ModelShape, layer: int, tokens: Tokens) -> int:
    """What the MLP block (pre-MLP norm to the experts' or the dense MLP's output) saves."""
    arch, layout = shape.arch, shape.layout
    h, te = arch.hidden_size, shape.impl == "transformer_engine"
    norm = (_norm_te if te else _norm)(h)
    # Per token of an ffn-wide layer: fc1's output and fc2's input (TE); our SwiGLU keeps two fc1-wide
    # tensors besides fc2's input (dense MLP), the grouped experts six ffn-wide ones.
    if not arch.layer_is_moe(layer):
        ffn = arch.ffn_hidden_size // layout.tp
        return (norm + BF16 * h) * tokens.hidden_share + (3 if te else 5) * BF16 * ffn * tokens.count
    experts, topk, ffn = arch.num_experts, arch.moe_topk, arch.moe_ffn_hidden_size // layout.etp
    router = BF16 * h + topk * (INT64 + FP32) + experts * FP32
    dispatch = experts * (1 + FP32) + topk * INT64
    # Tokens routed to this rank's experts per local token: top-k, gathered over the expert-TP group.
    routed = topk * layout.etp
    expert_inputs = routed * (BF16 * h + FP32)
    expert_ffn = (3 if te else 6) * BF16 * ffn * routed
    return (norm + router + dispatch + expert_inputs + expert_ffn) * tokens.hidden_share


def layer_bytes(shape: ModelShape, layer: int, tokens: Tokens, recompute: str) -> int:
    """What one layer saves for backward; under full recompute only its share of the group's input."""
    if recompute == "full":
        return 0  # counted per recompute group (recompute_group_bytes)
    return attention_bytes(shape, tokens, recompute) + mlp_bytes(shape, layer, tokens)


def recompute_group_bytes(shape: ModelShape, tokens: Tokens) -> int:
    """Full recompute: each group of layers keeps its bf16 input hidden states."""
    return BF16 * shape.arch.hidden_size * tokens.hidden_share


def rope_table_bytes(shape: ModelShape, tokens: Tokens) -> int:
    """Full recompute: the fp32 rotary table handed to every group, kept once per chunk."""
    return FP32 * shape.arch.head_dim * tokens.sequence


def loss_bytes(shape: ModelShape, tokens: Tokens) -> int:
    """The last stage's final norm, output-layer input and what the loss keeps over its vocabulary shard:
    the fp32 softmax, or with Transformer-Engine's fused cross entropy the bf16 logits that its gradient
    overwrites; and the labels and loss mask."""
    arch, te = shape.arch, shape.impl == "transformer_engine"
    vocab = padded_vocab_size(arch.vocab_size) // shape.layout.tp
    norm = (_norm_te if te else _norm)(arch.hidden_size)
    kept = BF16 if te else FP32
    return (norm + BF16 * arch.hidden_size) * tokens.hidden_share + (kept * vocab + INT64 + 1) * tokens.count


def logits_transient_bytes(shape: ModelShape, tokens: Tokens) -> int:
    """Live only around the unfused loss: the bf16 logits and the fp32 gradient of the softmax."""
    if shape.impl == "transformer_engine":
        return 0  # the fused loss writes its gradient into the logits
    vocab = padded_vocab_size(shape.arch.vocab_size) // shape.layout.tp
    return (BF16 + FP32) * vocab * tokens.count


def chunk_bytes(shape: ModelShape, layers: list[int], tokens: Tokens, recompute: str, recompute_layers: int,
                pre_process: bool, post_process: bool) -> int:
    """What one micro-batch leaves saved in one model chunk until its backward pass."""
    total = INT64 * tokens.count if pre_process else 0  # the token ids the embedding keeps
    if recompute == "full":
        groups = -(-len(layers) // recompute_layers)
        total += groups * recompute_group_bytes(shape, tokens) + rope_table_bytes(shape, tokens)
    else:
        total += sum(layer_bytes(shape, layer, tokens, recompute) for layer in layers)
    if post_process:
        total += loss_bytes(shape, tokens)
    return total


def recompute_working_bytes(shape: ModelShape, layers: list[int], tokens: Tokens, recompute_layers: int) -> int:
    """Full recompute: one group's activations, rebuilt during its backward pass."""
    group = layers[:recompute_layers]
    return sum(layer_bytes(shape, layer, tokens, "none") for layer in group)
