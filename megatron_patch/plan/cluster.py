"""The machines a plan is for: per-GPU memory, peak bf16 TFLOP/s and link bandwidths by GPU kind.

Vendor figures (SXM parts); memory is what ``nvidia-smi`` reports as the total, bandwidths are per
GPU and per direction: NVLink within a node, the network (one 400 Gb/s NIC per GPU unless stated)
between nodes. Every one can be overridden on the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class GpuKind:
    memory: int  # bytes
    peak_tflops: float  # dense bf16
    hbm_gbps: float  # GB/s
    nvlink_gbps: float  # GB/s per direction
    network_gbps: float  # GB/s per GPU between nodes


GPU_KINDS = {
    "h100": GpuKind(81559 * MIB, 989.0, 3350.0, 450.0, 50.0),
    "h800": GpuKind(81559 * MIB, 989.0, 3350.0, 200.0, 50.0),
    "h200": GpuKind(143771 * MIB, 989.0, 4800.0, 450.0, 50.0),
    "h20": GpuKind(97871 * MIB, 148.0, 4000.0, 450.0, 50.0),
    "a100": GpuKind(81920 * MIB, 312.0, 2039.0, 300.0, 25.0),
    "b200": GpuKind(183359 * MIB, 2250.0, 8000.0, 900.0, 50.0),
}


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    kind: str
    memory: int
    peak_tflops: float
    hbm_gbps: float
    nvlink_gbps: float
    network_gbps: float
    efficiency: float  # the share of peak the GEMMs reach (an assumption; docs/planner.md)
    headroom: float  # share of memory left free for the allocator's fragmentation

    @classmethod
    def of_kind(cls, kind: str, gpus: int, gpus_per_node: int = 8, efficiency: float = 0.4,
                headroom: float = 0.05) -> Cluster:
        spec = GPU_KINDS[kind]
        return cls(gpus, min(gpus_per_node, gpus), kind, spec.memory, spec.peak_tflops, spec.hbm_gbps,
                   spec.nvlink_gbps, spec.network_gbps, efficiency, headroom)

    @property
    def usable_memory(self) -> int:
        return int(self.memory * (1 - self.headroom))

    def link_gbps(self, span: int) -> float:
        """Bandwidth of a group whose ranks lie within ``span`` consecutive GPUs."""
        return self.nvlink_gbps if span <= self.gpus_per_node else self.network_gbps
