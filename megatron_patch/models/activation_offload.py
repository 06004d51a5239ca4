"""``AC=offload`` without Transformer-Engine: the first N layers' saved activations go to host memory.

Megatron-Core's activation offload (``cpu_offloading``) is Transformer-Engine's, and TE has no PyTorch
wheel on PyPI. PyTorch's own saved-tensor hooks do the same for any module:
``torch.autograd.graph.save_on_cpu`` moves every tensor a layer's forward saves for backward to the host
(pinned on CUDA, so the copies are asynchronous) and brings it back when backward needs it. The
arithmetic is unchanged, so the loss curve is ``AC=none``'s exactly; the device holds those layers'
activations only while they run. Which layers: the first ``layers`` of this rank's chunks, in order,
as TE's offload (``cpu_offloading_num_layers``) and the planner (training/memory_plan.py) count them.
"""

from __future__ import annotations

import functools

import torch


def offload_activations(chunks, layers: int) -> list[int]:
    """Run the forward of the first ``layers`` transformer layers of ``chunks`` under ``save_on_cpu``; returns
    their layer numbers (1-based, Megatron-Core's)."""
    offloaded = []
    for chunk in chunks:
        decoder = getattr(getattr(chunk, "module", chunk), "decoder", None)
        for layer in [] if decoder is None else decoder.layers:
            if len(offloaded) == layers:
                return offloaded
            layer.forward = _saved_on_host(layer.forward)
            offloaded.append(layer.layer_number)
    return offloaded


def _saved_on_host(forward):
    @functools.wraps(forward)
    def offloaded(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return forward(*args, **kwargs)
    return offloaded
