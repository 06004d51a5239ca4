"""oneDNN matrix multiplies for the parallel linears while the kit generates on a CPU.

A decode step multiplies a few rows (one per sequence) by every weight of the model. torch's
``F.linear`` on a CPU sends that to a GEMM that is slow for so few rows; oneDNN's matmul, which
torch's own inductor calls for CPU linears (``mkldnn::_linear_pointwise``), takes the same dense
weight, copies nothing and keeps nothing between calls. Measured on 2 cores, fp32, by Qwen3's
151,936 x 1,024 output layer: 16 rows 209 ms against 68 ms, 1 row 48 against 21 ms; 2-3x on the
other projections of a 0.6B-shaped model at decode sizes and 1.1-1.4x at prefill sizes
(docs/benchmarks.md). Results differ from ``F.linear``'s by float rounding only (about 1e-6
relative in fp32): another summation order.

``onednn_linears(model)`` routes every Megatron-Core Column/RowParallelLinear of ``model`` there
until the context ends, where nothing else is asked of the linear: no gradient, no sequence-
parallel gather, a CPU tensor in fp32 (or bf16 where oneDNN has bf16 instructions). Elsewhere,
and on a GPU, the linear's own forward runs unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise")


def _onednn_suits(input: torch.Tensor, weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dim() != 2 or input.dtype != weight.dtype:
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _onednn_forward(original):
    """A replacement for a parallel linear's ``_forward_impl`` (input, weight, bias, ..., sequence_parallel)."""

    def forward_impl(input, weight, bias=None, *args, sequence_parallel=False, **kwargs):
        if args or sequence_parallel or torch.is_grad_enabled() or not _onednn_suits(input, weight):
            return original(input, weight, bias, *args, sequence_parallel=sequence_parallel, **kwargs)
        return torch.ops.mkldnn._linear_pointwise(input, weight, bias, "none", [], "")

    return forward_impl


@contextmanager
def onednn_linears(model, enabled: bool = True):
    """Within the context, ``model``'s parallel linears multiply through oneDNN where they can (see
    the module docstring). A nested context leaves the outer one in charge."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    if not enabled or not onednn_available() or not linears or "_forward_impl" in vars(linears[0]):
        yield
        return
    for linear in linears:
        linear._forward_impl = _onednn_forward(linear._forward_impl)
    try:
        yield
    finally:
        for linear in linears:
            del linear._forward_impl
