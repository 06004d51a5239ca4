"""Named Qwen3 sizes: the published configs of the Pai-Megatron-Patch size table, plus tiny CPU sizes.

Published values shared by every size: head_dim 128, vocab 151936, RoPE base
1e6, RMSNorm eps 1e-6, 40960 positions. The tiny presets exist for tests and
the CPU demo; they keep the features that make Qwen3 differ from a plain GPT
(head_dim != hidden/heads, GQA, qk-norm, top-k routing) and Qwen3's real vocabulary, so they
train on text from the real tokenizer (tests that need speed shrink the vocabulary).
"""

from __future__ import annotations

from megatron_patch.models.qwen3.arch import Qwen3Arch


def _dense(layers, hidden, heads, kv_heads, ffn, tied):
    return Qwen3Arch(
        hidden_size=hidden, num_layers=layers, num_attention_heads=heads, num_query_groups=kv_heads,
        head_dim=128, ffn_hidden_size=ffn, tie_word_embeddings=tied,
    )


def _moe(layers, hidden, heads, kv_heads, ffn, moe_ffn, experts, topk):
    return Qwen3Arch(
        hidden_size=hidden, num_layers=layers, num_attention_heads=heads, num_query_groups=kv_heads,
        head_dim=128, ffn_hidden_size=ffn, num_experts=experts, moe_topk=topk, moe_ffn_hidden_size=moe_ffn,
        norm_topk_prob=True, router_aux_loss_coef=0.001,
    )


PRESETS: dict[str, Qwen3Arch] = {
    #                 layers hidden heads kv  ffn    tied
    "0.6B": _dense(28, 1024, 16, 8, 3072, True),
    "1.7B": _dense(28, 2048, 16, 8, 6144, True),
    "4B": _dense(36, 2560, 32, 8, 9728, True),
    "8B": _dense(36, 4096, 32, 8, 12288, False),
    "14B": _dense(40, 5120, 40, 8, 17408, False),
    "32B": _dense(64, 5120, 64, 8, 25600, False),
    #               layers hidden heads kv  ffn   moe_ffn experts topk
    "A3B": _moe(48, 2048, 32, 4, 6144, 768, 128, 8),
    "A22B": _moe(94, 4096, 64, 4, 12288, 1536, 128, 8),
    # CPU-sized models for tests and `make demo`.
    "tiny-moe": Qwen3Arch(
        hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2, head_dim=32,
        ffn_hidden_size=128, max_position_embeddings=4096, num_experts=8, moe_topk=2,
        moe_ffn_hidden_size=48, norm_topk_prob=True, router_aux_loss_coef=0.001,
    ),
    "tiny-dense": Qwen3Arch(
        hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2, head_dim=32,
        ffn_hidden_size=128, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
}

ALIASES = {"Qwen3-30B-A3B": "A3B", "Qwen3-235B-A22B": "A22B"}


def get_preset(name: str) -> Qwen3Arch:
    key = ALIASES.get(name, name)
    try:
        return PRESETS[key]
    except KeyError:
        raise KeyError(f"unknown model size {name!r}; known: {', '.join(PRESETS)}") from None
