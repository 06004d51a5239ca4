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
8. ``patch_safe_checkpoint_loading`` (always): torch DCP reads a checkpoint's
   ``.metadata`` and non-tensor items through allowlists instead of plain pickle,
   so no checkpoint runs code when it is loaded.

Each patch names the upstream code it works around in its module docstring.
All are idempotent. ``apply_patches`` first silences known upstream warnings
(``warnings.py``) and says once when the installed Megatron-Core is not a version
the patches were checked on.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

import torch

from megatron_patch.patches.cuda_on_cpu import patch_cuda_on_cpu
from megatron_patch.patches.expert_grads import patch_expert_gradient_groups
from megatron_patch.patches.moe import patch_alltoall_splits_on_cpu, patch_te_general_gemm
from megatron_patch.patches.optimizer_state import patch_distributed_optimizer_loading
from megatron_patch.patches.rng import patch_cuda_rng
from megatron_patch.patches.safe_checkpoints import patch_safe_checkpoint_loading
from megatron_patch.patches.torch_norm import patch_torch_norm_sequence_parallel
from megatron_patch.patches.warnings import silence_upstream_warnings

CHECKED_MEGATRON_CORE_VERSIONS = ("0.16.1",)


_version_reported = False


def unchecked_megatron_core_version() -> str | None:
    """The installed Megatron-Core version when the patches were not checked on it (None when they were)."""
    try:
        installed = version("megatron-core")
    except PackageNotFoundError:
        return "not installed"
    return None if installed in CHECKED_MEGATRON_CORE_VERSIONS else installed


def apply_patches(cpu: bool | None = None) -> None:
    """Apply every patch this process needs; ``cpu=None`` means "when CUDA is absent"."""
    global _version_reported
    silence_upstream_warnings()
    unchecked = unchecked_megatron_core_version()
    if unchecked and not _version_reported:
        _version_reported = True
        print(f"warning: megatron-core {unchecked}: megatron_patch's patches were checked on "
              f"{', '.join(CHECKED_MEGATRON_CORE_VERSIONS)}; each patch checks its target, but a changed "
              "upstream may need a changed patch (megatron_patch/patches/)", file=sys.stderr, flush=True)
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
    patch_safe_checkpoint_loading()


__all__ = [
    "CHECKED_MEGATRON_CORE_VERSIONS",
    "apply_patches",
    "patch_alltoall_splits_on_cpu",
    "patch_cuda_on_cpu",
    "patch_cuda_rng",
    "patch_distributed_optimizer_loading",
    "patch_expert_gradient_groups",
    "patch_safe_checkpoint_loading",
    "patch_te_general_gemm",
    "patch_torch_norm_sequence_parallel",
    "silence_upstream_warnings",
    "unchecked_megatron_core_version",
]
