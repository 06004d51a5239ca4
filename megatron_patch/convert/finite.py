"""``--check-finite``: refuse a conversion whose weights hold NaN or Inf, naming the tensors.

Checked after the cast to the output precision, so a value that overflows it (an fp32 weight
above 65504 written as fp16) is caught too. The check records and the job raises after writing
(into staging, which is then removed): torch DCP would wrap an error raised mid-save.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_patch.convert.config import ConversionError


class FiniteCheck:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.found: list[str] = []

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if not self.enabled or not tensor.is_floating_point():
            return
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            self.found.append(f"{name}: {bad} of {tensor.numel()} values are NaN or Inf")

    def raise_if_found(self) -> None:
        """Collective over the default group: every rank raises the same one line, or none does."""
        found = list(self.found)
        if self.enabled and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, found)
            found = [line for part in gathered for line in part]
        if found:
            more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
            raise ConversionError(f"--check-finite: {found[0]}{more}")
