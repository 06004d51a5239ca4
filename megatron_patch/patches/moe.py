"""Two fixes to Megatron-Core's MoE code for running without Transformer-Engine / without CUDA.

``patch_te_general_gemm`` (always): megatron-core 0.16.1 binds
``te_general_gemm`` in ``megatron/core/transformer/moe/moe_utils.py`` only
inside ``try: import transformer_engine``, yet
``RouterGatingLinearFunction.forward`` (L1192) always reads it, so any MoE
router forward without TE raises ``NameError``. 0.19 adds the missing
``else: te_general_gemm = None``; so does this patch. Delete at >= 0.19.

``patch_alltoall_splits_on_cpu`` (CPU only): the alltoall token dispatcher
turns its split sizes into numpy at its device-to-host point through
``moe_utils.maybe_move_tensor_to_cpu``, which converts only CUDA tensors
(``tensor.is_cuda``). On CPU the splits stay tensors and
``torch.distributed.all_to_all_single`` rejects them (token_dispatcher.py
L667, 0.16.1). The patched helper also converts CPU tensors when
``as_numpy=True``. Delete together with ``cuda_on_cpu``.
"""

from __future__ import annotations

_SPLITS_PATCHED = False


def patch_te_general_gemm() -> bool:
    """Set ``moe_utils.te_general_gemm = None`` when undefined; returns True if it patched."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "RouterGatingLinearFunction"):
        raise RuntimeError("patch_te_general_gemm: moe_utils.RouterGatingLinearFunction not found")
    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


def patch_alltoall_splits_on_cpu() -> bool:
    """Make ``maybe_move_tensor_to_cpu(..., as_numpy=True)`` return numpy for CPU tensors too."""
    global _SPLITS_PATCHED
    if _SPLITS_PATCHED:
        return False
    import torch
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    upstream = getattr(token_dispatcher, "maybe_move_tensor_to_cpu", None)
    if upstream is None:
        raise RuntimeError("patch_alltoall_splits_on_cpu: token_dispatcher.maybe_move_tensor_to_cpu not found")

    def move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return upstream(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu
    _SPLITS_PATCHED = True
    return True
