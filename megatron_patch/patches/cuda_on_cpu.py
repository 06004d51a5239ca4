"""Run Megatron-Core's CUDA-only code paths unchanged on a CPU-only machine.

Megatron-Core has no CPU path: its schedules, DDP grad buffers, optimizers,
MoE dispatchers, RoPE and dist_checkpointing allocate on ``device="cuda"``,
create CUDA streams and events, and compare ``Tensor.type()`` with
``"torch.cuda.FloatTensor"``. All of these go through a handful of entry
points, so instead of forking those files we redirect the entry points:

* a ``TorchFunctionMode`` rewrites a CUDA ``device=`` (or a positional device
  in ``Tensor.to``) to CPU, makes ``Tensor.cuda()``/``pin_memory()``/
  ``record_stream()`` inert, and reports CUDA type names from ``Tensor.type()``;
* ``torch.cuda.current_device/synchronize/Stream/Event/current_stream/...``
  become inert stand-ins.

Checked on megatron-core 0.16.1 with torch 2.13.0+cpu. Upstream places it
covers (0.16.1): ``pipeline_parallel/schedules.py`` (``torch.zeros(...,
device="cuda")``), ``distributed/param_and_grad_buffer.py``
(``torch.cuda.current_stream``), ``optimizer/optimizer.py`` and
``clip_grads.py`` (``device='cuda'``, ``param.type()`` checks),
``transformer/moe/token_dispatcher.py`` (``torch.cuda.Stream``),
``models/common/embeddings/rotary_pos_embedding.py``
(``torch.cuda.current_device``), ``transformer/utils.py``
(``get_default_causal_mask``), ``dist_checkpointing/strategies/
filesystem_async.py`` (``torch.cuda.synchronize``).
Delete when Megatron-Core grows a device-agnostic path (not planned upstream:
"There is no CPU-only path in Megatron Core").
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_DTYPE_TO_CUDA_TYPE = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer device means a CUDA ordinal to torch factories.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made while active."""

    _INERT_METHODS = (torch.Tensor.cuda, torch.Tensor.pin_memory)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Runs on every torch call while active: copy kwargs only when something is rewritten.
        kwargs = kwargs or {}
        if func in self._INERT_METHODS:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            return _DTYPE_TO_CUDA_TYPE.get(tensor.dtype, torch.Tensor.type(tensor))
        rewrite = {}
        if _is_cuda_device(kwargs.get("device")):
            rewrite["device"] = "cpu"
        if kwargs.get("pin_memory"):
            rewrite["pin_memory"] = False
        if rewrite:
            kwargs = {**kwargs, **rewrite}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class InertStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else InertEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class InertEvent:
    """Stands in for ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


_DEFAULT_STREAM = InertStream()
_MODE: CudaToCpuMode | None = None


def _cuda_stand_ins() -> dict:
    return {
        "current_device": lambda: "cpu",
        "synchronize": lambda device=None: None,
        "Stream": InertStream,
        "Event": InertEvent,
        "current_stream": lambda device=None: _DEFAULT_STREAM,
        "default_stream": lambda device=None: _DEFAULT_STREAM,
        "stream": lambda stream=None: contextlib.nullcontext(stream),
        "set_stream": lambda stream: None,
        "set_device": lambda device: None,
    }


def patch_cuda_on_cpu() -> bool:
    """Install the CUDA-to-CPU redirection; returns False if it was already active."""
    global _MODE
    if _MODE is not None:
        return False
    for name, stand_in in _cuda_stand_ins().items():
        if not hasattr(torch.cuda, name):
            raise RuntimeError(f"patch_cuda_on_cpu: torch.cuda.{name} is missing in torch {torch.__version__}")
        setattr(torch.cuda, name, stand_in)
    _MODE = CudaToCpuMode()
    # Pushed for the life of the process: Megatron-Core allocates on "cuda" from
    # many call sites (model build, schedules, optimizer, checkpointing).
    _MODE.__enter__()
    return True


def cuda_on_cpu_active() -> bool:
    return _MODE is not None


@contextlib.contextmanager
def cuda_on_cpu_paused():
    """The redirection off for code that places nothing on CUDA: the generator's forwards (dense, MoE,
    TP, EP; tests/unit/test_generation.py and the two-process rollout checks run them so). The mode
    costs a Python call per torch call, 4-5 % of a CPU decode step. Where another mode is on top of
    the stack, nothing is paused."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if _MODE is None or not stack or stack[-1] is not _MODE:
        yield
        return
    with _pop_mode_temporarily():
        yield
