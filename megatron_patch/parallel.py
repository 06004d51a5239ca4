"""Process groups and seeds: the one place that starts torch.distributed and Megatron-Core's model parallelism."""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_patch.lifetime import end_with_parent


@dataclass(frozen=True)
class ParallelLayout:
    """How a model is split: tensor, pipeline, expert, expert-tensor and context parallel sizes."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    virtual_pp: int | None = None

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by TP*PP*CP = {self.model_parallel_size}"
            )
        return world_size // self.model_parallel_size

    def expert_data_parallel_size(self, world_size: int) -> int:
        """The group that reduces expert gradients: Megatron-Core lays experts over each stage's ranks."""
        return world_size // (self.pp * self.ep * self.etp)

    def megatron_sizes(self) -> dict[str, int | None]:
        """The layout in the parameter names that both ``initialize_model_parallel`` and ``TransformerConfig`` use."""
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.virtual_pp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.etp,
        )

    def world_problems(self, world_size: int) -> list[str]:
        """Why ``world_size`` processes cannot hold this layout (empty when they can)."""
        if world_size % self.model_parallel_size:
            return [f"{world_size} processes (GPUs per node x nodes; MP_NPROC on CPU) are not divisible by "
                    f"TP*PP*CP = {self.model_parallel_size}"]
        # Megatron-Core lays experts over the DP*CP*TP ranks of a pipeline stage.
        expert_ranks = world_size // self.pp
        if expert_ranks % (self.ep * self.etp):
            return [f"EP*ETP = {self.ep * self.etp} does not divide the {expert_ranks} ranks of a pipeline stage"]
        return []

    def validate(self, world_size: int) -> None:
        problems = self.world_problems(world_size)
        if problems:
            raise ValueError(problems[0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Start torch.distributed from torchrun's environment, or as a world of one."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ:
        # A world of one on a free local port. The environment is left alone, so processes
        # this one starts (a converter, torchrun) do not inherit a rendezvous that is in use.
        init_method = f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(backend=backend, init_method=init_method, rank=0, world_size=1, timeout=timeout)
        return
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timeout)


def initialize_parallel(layout: ParallelLayout, seed: int = 1234, backend: str | None = None) -> None:
    """Start torch.distributed (if needed), build Megatron-Core's process groups and seed every RNG stream."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_distributed(backend)
    layout.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**layout.megatron_sizes())
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed=seed)


def die_with_launcher() -> None:
    """Under torchrun, end this worker when torchrun ends, however it ends (even kill -9), and the
    processes it forks with it.

    torch elastic starts workers in sessions of their own (torch 2.13), so a kill of the launch's
    process group does not reach them; without this a worker trained on and kept saving. The
    request is not inherited by forked children (Megatron-Core forks its checkpoint writers), so
    each child makes it again: an orphaned writer would otherwise finish, or hang, after a kill.
    """
    if "LOCAL_RANK" not in os.environ:
        return
    end_with_parent()
    os.register_at_fork(after_in_child=end_with_parent)
