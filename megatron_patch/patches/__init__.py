"""Runtime patches of Megatron-Core, in one place, applied by every entrypoint.

``apply_patches()`` applies, in this order:

1. ``patch_te_general_gemm`` (always): a missing name in 0.16.1's MoE router.
2. ``patch_cuda_on_cpu`` (no CUDA, or ``cpu=True``): CUDA placements, streams
   and events redirected to CPU.
3. ``patch_cuda_rng`` (same condition): the CUDA RNG tracker backed by the CPU
   generator. After (2), since seeding runs through the redirected calls.
4. ``patch_alltoall_splits_on_cpu`` (same condition): the MoE alltoall
   dispatcher's split sizes become host lists on CPU as they do on a GPU.
5. ``patch_distributed_optimizer_loading`` (always): the distributed optimizer on
   torch's Adam (no Apex/TE) can load a checkpoint before its first step.
6. ``patch_torch_norm_sequence_parallel`` (always): the local norms accept
   sequence parallelism (their weights' gradients reduced over TP, as TE's are).
7. ``patch_expert_gradient_groups`` (always): with EP = 1 and ETP != TP, expert
   gradients are reduced over the expert-data-parallel group, not the dense one.

Each patch names the upstream code it works around in its module docstring.
All are idempotent.
"""

from __future__ import annotations

import torch

from megatron_patch.patches.cuda_on_cpu import cuda_on_cpu_active, patch_cuda_on_cpu
from megatron_patch.patches.expert_grads import patch_expert_gradient_groups
from megatron_patch.patches.moe import patch_alltoall_splits_on_cpu, patch_te_general_gemm
from megatron_patch.patches.optimizer_state import patch_distributed_optimizer_loading
from megatron_patch.patches.rng import patch_cuda_rng
from megatron_patch.patches.torch_norm import patch_torch_norm_sequence_parallel

CHECKED_MEGATRON_CORE_VERSIONS = ("0.16.1",)


def apply_patches(cpu: bool | None = None) -> None:
    """Apply every patch this process needs; ``cpu=None`` means "when CUDA is absent"."""
    patch_te_general_gemm()
    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        patch_cuda_on_cpu()
        patch_cuda_rng()
        patch_alltoall_splits_on_cpu()
    patch_distributed_optimizer_loading()
    patch_torch_norm_sequence_parallel()
    patch_expert_gradient_groups()


def running_on_cpu() -> bool:
    """True when Megatron-Core's CUDA calls are being redirected to the CPU."""
    return cuda_on_cpu_active()


__all__ = [
    "CHECKED_MEGATRON_CORE_VERSIONS",
    "apply_patches",
    "patch_alltoall_splits_on_cpu",
    "patch_cuda_on_cpu",
    "patch_cuda_rng",
    "patch_distributed_optimizer_loading",
    "patch_expert_gradient_groups",
    "patch_te_general_gemm",
    "patch_torch_norm_sequence_parallel",
    "running_on_cpu",
]
