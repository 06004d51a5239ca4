"""Each runtime patch of Megatron-Core does what its docstring says, and applying twice is harmless."""

import importlib.metadata
from pathlib import Path

import torch

from megatron_patch import patches
from megatron_patch.patches import apply_patches, patch_cuda_on_cpu, patch_cuda_rng, patch_te_general_gemm
from megatron_patch.patches.cuda_on_cpu import cuda_on_cpu_active

REPO = Path(__file__).resolve().parents[2]


def test_apply_patches_is_idempotent(megatron_world):
    apply_patches()
    apply_patches()
    assert patch_cuda_on_cpu() is False and patch_cuda_rng() is False and patch_te_general_gemm() is False
    assert cuda_on_cpu_active() == (not torch.cuda.is_available())


def test_cuda_placements_land_on_cpu(megatron_world):
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.empty(3, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(1, device=torch.cuda.current_device()).device.type == "cpu"
    t = torch.ones(2)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.type() == "torch.cuda.FloatTensor"
    assert t.bfloat16().type() == "torch.cuda.BFloat16Tensor"
    assert t.type(torch.float64).dtype == torch.float64  # conversions still convert


def test_streams_and_events_are_inert(megatron_world):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    event = torch.cuda.Event()
    event.record()
    with torch.cuda.stream(stream):
        x = torch.ones(2) * 2
    torch.cuda.synchronize()
    assert x.sum().item() == 4.0


def test_rng_tracker_forks_the_cpu_generator(megatron_world):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draws():
        model_parallel_cuda_manual_seed(seed=7)
        torch.manual_seed(99)
        outside_before = torch.rand(3)
        with get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
        outside_after = torch.rand(3)
        return outside_before, inside, outside_after

    first, second = draws(), draws()
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # deterministic given the seeds
    torch.manual_seed(99)
    plain = torch.rand(6)
    # The fork neither consumed nor disturbed the outer stream.
    assert torch.equal(torch.cat([first[0], first[2]]), plain)
    assert not torch.equal(first[1], plain[:3])


def test_alltoall_split_sizes_become_host_arrays(megatron_world):
    import numpy as np
    from megatron.core.transformer.moe import token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 5]), as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [3, 5]
    counts = torch.tensor([1, 2])
    assert token_dispatcher.maybe_move_tensor_to_cpu(counts) is counts  # as_numpy=False: untouched


def test_apply_patches_says_when_megatron_core_is_not_a_checked_version(monkeypatch, capsys):

    installed = importlib.metadata.version("megatron-core")
    assert patches.unchecked_megatron_core_version() is None  # the pinned version is a checked one
    monkeypatch.setattr(patches, "CHECKED_MEGATRON_CORE_VERSIONS", ("0.0.0",))
    monkeypatch.setattr(patches, "_version_reported", False)
    assert patches.unchecked_megatron_core_version() == installed
    patches.apply_patches()
    patches.apply_patches()
    err = capsys.readouterr().err
    assert err.count(f"megatron-core {installed}: megatron_patch's patches were checked on 0.0.0") == 1


def test_safe_checkpoint_loading_replaces_both_dcp_readers_once():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    from megatron_patch.patches.safe_checkpoints import patch_safe_checkpoint_loading

    assert patch_safe_checkpoint_loading() and patch_safe_checkpoint_loading()
    reader, loader = FileSystemReader.read_metadata, DefaultLoadPlanner.load_bytes
    assert reader.__module__ == loader.__module__ == "megatron_patch.patches.safe_checkpoints"
    patch_safe_checkpoint_loading()
    assert FileSystemReader.read_metadata is reader and DefaultLoadPlanner.load_bytes is loader


def test_every_patch_says_what_it_does_on_every_checked_version():
    for patch in patches.PATCHES:
        assert set(patch.checked) == set(patches.CHECKED_MEGATRON_CORE_VERSIONS), patch.name
    table = patches.patch_table()
    assert table.count("\n") == len(patches.PATCHES) + 1
    assert all(f"`{patch.name}`" in table for patch in patches.PATCHES)
    assert table in (REPO / "docs" / "architecture.md").read_text()  # the docs carry the current table


def test_the_patches_fixed_upstream_in_0_19_are_skipped_there_only():
    def applied(release, cpu):
        return [patch.name for patch in patches.patches_for(release, cpu)]

    everything = [patch.name for patch in patches.PATCHES]
    assert applied("0.16.1", cpu=True) == everything == applied(None, cpu=True)
    assert set(everything) - set(applied("0.19.2", cpu=True)) == {"te_general_gemm", "expert_gradient_groups"}
    assert "cuda_on_cpu" not in applied("0.19.2", cpu=False)


def test_the_router_gemm_name_exists_on_the_installed_version(megatron_world):
    # The router forward reads it. On 0.16.1 the patch defines it without TE; on 0.19+, where the
    # patch is skipped, upstream must, or every MoE forward fails.
    from megatron.core.transformer.moe import moe_utils

    assert hasattr(moe_utils, "te_general_gemm")


def test_the_checkpoint_results_manager_dies_with_its_job(tmp_path):
    """Megatron-Core's first save spawns a multiprocessing manager that outlived kill -9 of its job (~300 MB per
    rank, for good). Patched, it ends with the process that started it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("from megatron_patch.patches import patch_checkpoint_results_manager\n"
              "patch_checkpoint_results_manager()\n"
              "from megatron.core.dist_checkpointing.strategies import filesystem_async\n"
              "from megatron_patch.patches.checkpoint_writers import results_queue_function\n"
              "make = getattr(filesystem_async, results_queue_function(filesystem_async))\n"
              "queue = make()\n"
              "assert make() is queue\n"
              "import multiprocessing, time\n"
              "print(*[child.pid for child in multiprocessing.active_children()], flush=True)\n"
              "time.sleep(600)\n")
    job = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        (manager,) = map(int, job.stdout.readline().split())
        os.kill(manager, 0)  # running
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(manager, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(manager, signal.SIGKILL)
    raise AssertionError(f"the manager (pid {manager}) outlived kill -9 of its job")
