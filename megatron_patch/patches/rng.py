"""Back Megatron-Core's "CUDA" RNG tracker with the CPU generator.

``DotProductAttention.forward`` forks ``get_cuda_rng_tracker()`` on every call,
and ``model_parallel_cuda_manual_seed`` seeds the data-, tensor- and
expert-parallel streams through ``torch.cuda.manual_seed`` /
``torch.cuda.get_rng_state`` and ``tensor_parallel.random._get_cuda_rng_state``
/ ``_set_cuda_rng_state`` (megatron-core 0.16.1,
``tensor_parallel/random.py`` L41-L110 and ``CudaRNGStatesTracker.add``).
Pointing these at the CPU default generator lets the stock tracker and
``model_parallel_cuda_manual_seed`` run unchanged: forking swaps the CPU
generator's state in and out, as the CUDA tracker does on a GPU.

Checked on megatron-core 0.16.1 with torch 2.13.0+cpu. Only for machines
without CUDA; delete together with ``cuda_on_cpu``.
"""

from __future__ import annotations

import logging

import torch

_PATCHED = False
_TRACKER_LOGGER = "megatron.core.tensor_parallel.random"


class _DropCpuRngWarning(logging.Filter):
    # The tracker warns when the CPU RNG moves inside a fork; on CPU the fork
    # *is* the CPU RNG, so the warning is expected and meaningless here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _get_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, i.e. back here.
    torch.default_generator.manual_seed(int(seed))


def patch_cuda_rng() -> bool:
    """Redirect CUDA RNG state calls to the CPU generator; idempotent."""
    global _PATCHED
    if _PATCHED:
        return False
    from megatron.core.tensor_parallel import random as mcore_random

    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        if not hasattr(mcore_random, name):
            raise RuntimeError(f"patch_cuda_rng: megatron.core.tensor_parallel.random.{name} not found")
    mcore_random._get_cuda_rng_state = _get_state
    mcore_random._set_cuda_rng_state = _set_state
    torch.cuda.get_rng_state = _get_state
    torch.cuda.set_rng_state = _set_state
    torch.cuda.random.get_rng_state = _get_state
    torch.cuda.manual_seed = _seed
    # torch.manual_seed already seeds the CPU generator, then calls this.
    torch.cuda.manual_seed_all = lambda seed: None
    logging.getLogger(_TRACKER_LOGGER).addFilter(_DropCpuRngWarning())
    _PATCHED = True
    return True
