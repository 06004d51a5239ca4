"""Sequence parallelism with the local (non-Transformer-Engine) norms.

megatron-core 0.16.1 ``megatron/core/transformer/torch_norm.py`` (L32): ``WrappedTorchNorm``, the
norm of the local layer spec when neither Transformer-Engine nor Apex is installed, asserts
``not config.sequence_parallel``. Yet a per-token norm (RMSNorm, LayerNorm) computes the same on a
sequence shard; what sequence parallelism needs from it is only that its weights be marked
``sequence_parallel``, so ``finalize_model_grads`` all-reduces their gradients over the tensor-
parallel group, as ``TENorm`` and ``FusedLayerNorm`` mark theirs. Without this, TP>1 with MoE and
EP>1 (which Megatron-Core requires to use SP) cannot run without Transformer-Engine.

``patch_torch_norm_sequence_parallel`` builds the torch norm with the assertion side-stepped
and marks its parameters. Checked against 0.16.1.
"""

from __future__ import annotations

_PATCHED = False


def patch_torch_norm_sequence_parallel() -> bool:
    """Let ``WrappedTorchNorm`` serve sequence-parallel models; returns True if it patched."""
    global _PATCHED
    if _PATCHED:
        return False
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    build = WrappedTorchNorm.__new__

    def new(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return build(cls, config, hidden_size, *args, **kwargs)
        config.sequence_parallel = False  # only the assertion reads it
        try:
            norm = build(cls, config, hidden_size, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for parameter in norm.parameters():
            parameter.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = new
    _PATCHED = True
    return True
