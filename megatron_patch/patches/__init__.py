"""Runtime patches of Megatron-Core, in one place, applied by every entrypoint.

``PATCHES`` lists them in the order ``apply_patches()`` applies them, each with the
Megatron-Core versions it applies to and, for every checked version, why it is applied
there or not (``python -m megatron_patch.patches`` prints the table; docs/architecture.md
carries it):

1. ``te_general_gemm``: a missing name in 0.16.1's MoE router.
2. ``cuda_on_cpu`` (CPU only): CUDA placements, streams and events redirected to CPU.
3. ``cuda_rng`` (CPU only): the CUDA RNG tracker backed by the CPU generator. After (2),
   since seeding runs through the redirected calls.
4. ``alltoall_splits_on_cpu`` (CPU only): the MoE alltoall dispatcher's split sizes become
   host lists on CPU as they do on a GPU.
5. ``distributed_optimizer_loading``: the distributed optimizer on torch's Adam (no
   Apex/TE) can load a checkpoint before its first step, and resumes exactly.
6. ``torch_norm_sequence_parallel``: the local norms accept sequence parallelism (their
   weights' gradients reduced over TP, as TE's are).
7. ``expert_gradient_groups``: with EP = 1 and ETP != TP, expert gradients are reduced over
   the expert-data-parallel group, not the dense one (0.16.1 only; 0.19 does it itself).
8. ``safe_checkpoint_loading``: torch DCP reads a checkpoint's ``.metadata`` and non-tensor
   items through allowlists instead of plain pickle, so no checkpoint runs code when loaded.
9. ``checkpoint_results_manager``: the process the first save starts to collect the writers'
   results dies with the job (it outlived ``kill -9``).

Each patch names the upstream code it works around in its module docstring. All are
idempotent. ``apply_patches`` first silences known upstream warnings (``warnings.py``) and
says once when the installed Megatron-Core is not a version the patches were checked on.
Calls whose *API* moved between versions (not behaviour) go through ``megatron_patch.patches.compat``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megatron_patch.patches.checkpoint_writers import patch_checkpoint_results_manager
from megatron_patch.patches.cuda_on_cpu import patch_cuda_on_cpu
from megatron_patch.patches.expert_grads import patch_expert_gradient_groups
from megatron_patch.patches.moe import patch_alltoall_splits_on_cpu, patch_te_general_gemm
from megatron_patch.patches.optimizer_state import patch_distributed_optimizer_loading
from megatron_patch.patches.rng import patch_cuda_rng
from megatron_patch.patches.safe_checkpoints import patch_safe_checkpoint_loading
from megatron_patch.patches.torch_norm import patch_torch_norm_sequence_parallel
from megatron_patch.patches.warnings import silence_upstream_warnings

CHECKED_MEGATRON_CORE_VERSIONS = ("0.16.1", "0.19.2")


@dataclass(frozen=True)
class Patch:
    """One runtime patch: where it applies, and what was found on each checked version."""

    name: str
    apply: Callable[[], object]
    applies_to: str  # a version specifier over megatron-core releases ("" admits every release)
    checked: dict[str, str]  # checked version -> why it is applied there, or why not
    cpu_only: bool = False

    def applies(self, megatron_core: str) -> bool:
        return Version(megatron_core) in SpecifierSet(self.applies_to)


PATCHES = (
    Patch("te_general_gemm", patch_te_general_gemm, "<0.19", {
        "0.16.1": "moe_utils binds te_general_gemm only when TE imports; the router forward reads it",
        "0.19.2": "moe_utils sets te_general_gemm = None when TE is absent",
    }),
    Patch("cuda_on_cpu", patch_cuda_on_cpu, "", cpu_only=True, checked={
        "0.16.1": "no CPU path: schedules, DDP buffers, optimizer, dispatcher, RoPE allocate on cuda",
        "0.19.2": "still no CPU path (same call sites)",
    }),
    Patch("cuda_rng", patch_cuda_rng, "", cpu_only=True, checked={
        "0.16.1": "the RNG tracker reads and sets CUDA generator states",
        "0.19.2": "_get/_set_cuda_rng_state gained a graph_safe argument, which the stand-ins accept",
    }),
    Patch("alltoall_splits_on_cpu", patch_alltoall_splits_on_cpu, "", cpu_only=True, checked={
        "0.16.1": "maybe_move_tensor_to_cpu converts only CUDA tensors; all_to_all_single wants host splits",
        "0.19.2": "maybe_move_tensor_to_cpu still converts only is_cuda tensors",
    }),
    Patch("distributed_optimizer_loading", patch_distributed_optimizer_loading, "", {
        "0.16.1": "torch Adam has no state before its first step; load_state_dict shares one step tensor",
        "0.19.2": "both faults are still there: without it a resume stops at state_dict's assert len(steps) == 1",
    }),
    Patch("torch_norm_sequence_parallel", patch_torch_norm_sequence_parallel, "", {
        "0.16.1": "WrappedTorchNorm asserts not sequence_parallel",
        "0.19.2": "the assertion is still there (torch_norm.py)",
    }),
    Patch("expert_gradient_groups", patch_expert_gradient_groups, "<0.19", {
        "0.16.1": "expert weights marked allreduce=True at EP = 1 even when ETP != TP",
        "0.19.2": "tensor_parallel/layers.py marks them by EP > 1 or ETP != TP (use_expert_pgs)",
    }),
    Patch("safe_checkpoint_loading", patch_safe_checkpoint_loading, "", {
        "0.16.1": "torch DCP unpickles .metadata and non-tensor items without an allowlist (torch 2.13)",
        "0.19.2": "torch 2.14.1's DCP is unchanged there; 0.19's common_state item is read through it too",
    }),
    Patch("checkpoint_results_manager", patch_checkpoint_results_manager, "", {
        "0.16.1": "filesystem_async starts a spawned multiprocessing Manager at the first save; kill -9 orphans it",
        "0.19.2": "the same, the function now public: get_write_results_queue(mp_mode='spawn')",
    }),
)


_version_reported = False


def unchecked_megatron_core_version() -> str | None:
    """The installed Megatron-Core version when the patches were not checked on it (None when they were)."""
    installed = _installed_version()
    if installed is None:
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
    if cpu is None:
        cpu = not torch.cuda.is_available()
    for patch in patches_for(_installed_version(), cpu):
        patch.apply()


def _installed_version() -> str | None:
    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return None


def patches_for(megatron_core: str | None, cpu: bool) -> list[Patch]:
    """The patches ``apply_patches`` applies, in order, on that release (None: not installed, all of them)."""
    return [p for p in PATCHES if (cpu or not p.cpu_only) and (megatron_core is None or p.applies(megatron_core))]


def patch_table() -> str:
    """Markdown: each patch x each checked version, applied or not, and why."""
    rows = ["| patch | " + " | ".join(f"megatron-core {v}" for v in CHECKED_MEGATRON_CORE_VERSIONS) + " |",
            "|---|" + "---|" * len(CHECKED_MEGATRON_CORE_VERSIONS)]
    for patch in PATCHES:
        cells = [("applied" if patch.applies(v) else "skipped") + f": {patch.checked[v]}"
                 for v in CHECKED_MEGATRON_CORE_VERSIONS]
        rows.append(f"| `{patch.name}`{' (CPU only)' if patch.cpu_only else ''} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


__all__ = [
    "CHECKED_MEGATRON_CORE_VERSIONS",
    "PATCHES",
    "Patch",
    "apply_patches",
    "patch_alltoall_splits_on_cpu",
    "patch_checkpoint_results_manager",
    "patch_cuda_on_cpu",
    "patch_cuda_rng",
    "patch_distributed_optimizer_loading",
    "patch_expert_gradient_groups",
    "patch_safe_checkpoint_loading",
    "patch_table",
    "patch_te_general_gemm",
    "patch_torch_norm_sequence_parallel",
    "patches_for",
    "silence_upstream_warnings",
    "unchecked_megatron_core_version",
]
