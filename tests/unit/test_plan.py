"""The planner (python -m megatron_patch.plan): the public facts it must reproduce, the launcher's
agreement with what it enumerates and prints, and the dry run's memory report.

Memory figures against real allocations: tests/functional/test_memory_plan.py.
"""

import json
import shlex

import pytest

from megatron_patch.models.qwen3.presets import get_preset
from megatron_patch.plan.__main__ import main as plan_main
from megatron_patch.plan.cluster import Cluster
from megatron_patch.plan.search import Request, search
from megatron_patch.training.config import TrainConfig
from megatron_patch.training.launch import POSITIONALS, LaunchError
from megatron_patch.training.launch import main as launch_main
from megatron_patch.training.launch import plan as launch_plan
from megatron_patch.training.memory_plan import GIB
from tests.unit.test_launch import arguments

BRIDGE_16_H100 = ["A3B", "--gpus", "16", "--gpu", "h100", "--mode", "pretrain", "--transformer-impl",
                  "transformer_engine", "--seq-length", "4096", "--global-batch-size", "1024", "--micro-batch-size",
                  "1", "--tp", "1", "--pp", "1", "--cp", "1", "--ep", "16", "--etp", "1", "--ac", "none",
                  "--optimizer-offload", "false"]
# slime's Qwen3-30B-A3B GRPO example (scripts/run-qwen3-30B-A3B.sh): 8 prompts x 4 samples a step,
# responses up to 8192 tokens, TP4 + SP, EP8, ETP1, full recompute, micro-batches of up to 20480 tokens
# (--max-tokens-per-gpu; here 2 x 10240); prompts taken as up to 1024 tokens.
SLIME_8_H800 = ["A3B", "--gpus", "8", "--gpu", "h800", "--mode", "grpo", "--tp", "4", "--sp", "true", "--ep", "8",
                "--etp", "1", "--ac", "full", "--seq-length", "10240", "--global-batch-size", "8",
                "--samples-per-prompt", "4", "--max-prompt-length", "1024", "--max-response-length", "8192",
                "--micro-batch-size", "2", "--kl-coef", "0"]


def planned(argv, capsys) -> tuple[int, dict]:
    status = plan_main([*argv, "--json"])
    return status, json.loads(capsys.readouterr().out)


def test_the_published_bridge_a3b_layout_plans_under_its_65_gib_gate(capsys):
    status, report = planned(BRIDGE_16_H100, capsys)
    (layout,) = report["layouts"]
    # Megatron-Bridge's card gates peak allocated memory (torch.cuda.max_memory_allocated) at 65 GiB.
    assert status == 0 and layout["fits"] and layout["allocated_bytes"] < 65 * GIB
    assert layout["allocated_bytes"] > 50 * GIB  # not trivially under: static memory alone is 40 GiB


def test_full_fine_tuning_of_a3b_does_not_fit_one_80gb_gpu_and_lora_fits_one_141gb_gpu(capsys):
    common = ["--gpus", "1", "--seq-length", "4096", "--global-batch-size", "8", "--micro-batch-size", "1"]
    status, full = planned(["A3B", "--gpu", "h100", "--mode", "sft", *common], capsys)
    assert status == 1 and not any(layout["fits"] for layout in full["layouts"])
    assert min(layout["peak_bytes"] for layout in full["layouts"]) > 150 * GIB  # weights and gradients alone
    status, lora = planned(["A3B", "--gpu", "h200", "--mode", "lora", *common], capsys)
    assert status == 0 and lora["layouts"][0]["fits"]


def test_slimes_a3b_grpo_layout_on_eight_h800_fits_only_with_optimizer_offload(capsys):
    # As slime computes them: log-probs over a whole micro-batch's vocabulary at once.
    whole = [*SLIME_8_H800, "--log-prob-chunk", "20480"]
    status, without = planned([*whole, "--optimizer-offload", "false"], capsys)
    assert status == 1 and not without["layouts"][0]["fits"]
    status, offloaded = planned([*whole, "--optimizer-offload", "1"], capsys)
    assert status == 0 and offloaded["layouts"][0]["fits"]
    assert offloaded["layouts"][0]["host_bytes"]["optimizer (offloaded)"] > 40 * GIB
    # The kit's own log-probs, in 1024-token chunks, leave room for the optimizer on the GPU.
    status, chunked = planned([*SLIME_8_H800, "--optimizer-offload", "false"], capsys)
    assert status == 0 and chunked["layouts"][0]["fits"]


def _launcher_accepts(config, gpus: int) -> bool:
    values = dict(zip(POSITIONALS, arguments(
        TP=config.tensor_model_parallel_size, PP=config.pipeline_model_parallel_size,
        EP=config.expert_model_parallel_size, ETP=config.expert_tensor_parallel_size,
        SP=str(config.sequence_parallel).lower(), GLOBAL_BATCH_SIZE=config.global_batch_size,
        BATCH_SIZE=config.micro_batch_size, AC=config.recompute, PR="bf16", SFT="true")))
    try:
        launch_plan(list(map(str, values.values())), env={"MP_TRANSFORMER_IMPL": "torch"}, cuda_devices=gpus)
    except LaunchError:
        return False
    return True


def test_the_planner_enumerates_exactly_the_layouts_the_launcher_accepts():
    gpus, arch = 4, get_preset("tiny-moe")
    cluster = Cluster.of_kind("h100", gpus, gpus_per_node=4)
    fixed = {"ac": "none", "optimizer_offload": None, "micro_batch_size": 1}
    candidates, _ = search(Request("tiny-moe", arch, cluster, 128, 8, "sft", fixed=fixed))
    planned_layouts = {(c.config.tensor_model_parallel_size, c.config.pipeline_model_parallel_size,
                        c.config.expert_model_parallel_size, c.config.expert_tensor_parallel_size,
                        c.config.sequence_parallel) for c in candidates}
    assert all(_launcher_accepts(c.config, gpus) for c in candidates)
    # Every layout of the searched sizes that the launcher accepts is among them (SP on with TP > 1).
    accepted = set()
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            for ep in (1, 2, 4, 8):
                for etp in {1, tp}:
                    config = TrainConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                         expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                         sequence_parallel=tp > 1, global_batch_size=8, micro_batch_size=1,
                                         data_path=["x"])
                    if _launcher_accepts(config, gpus):
                        accepted.add((tp, pp, ep, etp, tp > 1))
    assert planned_layouts == accepted and len(accepted) > 10


def test_the_printed_command_is_the_best_layout_and_the_launcher_takes_it(capsys, monkeypatch, tmp_path):
    assert plan_main(["tiny-moe", "--gpus", "2", "--seq-length", "128", "--global-batch-size", "8",
                      "--optimizer-offload", "false"]) == 0
    output = capsys.readouterr().out
    command = output.strip().splitlines()[-1]
    assert "examples/qwen3/run_mcore_qwen3.sh" in command, output
    words = shlex.split(command)
    settings = dict(word.split("=", 1) for word in words[:words.index("bash")])
    positional = words[words.index("bash") + 2:]
    filled = {"DATASET_PATH": tmp_path / "data", "VALID_DATASET_PATH": tmp_path / "data",
              "PRETRAIN_CHECKPOINT_PATH": "none", "TRAIN_TOKENS_OR_ITERS": 10, "WARMUP_TOKENS_OR_ITERS": 0,
              "OUTPUT_BASEPATH": tmp_path / "out"}  # the user's to fill in
    positional = [str(filled.get(word, word)) for word in positional]
    for name, value in {**settings, "MP_DRY_RUN": "true", "MP_NPROC": "2"}.items():
        monkeypatch.setenv(name, value)
    assert launch_main(positional) == 0
    dry_run = capsys.readouterr().out
    # The launch's dry run plans the same memory, part by part, as the planner did for its best layout.
    parts = [line for line in output.splitlines() if line.endswith("GiB") or "GiB (pipeline" in line]
    assert parts and all(line in dry_run.splitlines() for line in parts), (output, dry_run)


@pytest.mark.parametrize("memory, warned", [("1GiB", True), ("1TiB", False)])
def test_the_dry_run_warns_when_the_plan_exceeds_the_gpu(memory, warned, capsys, monkeypatch):
    monkeypatch.setenv("MP_DRY_RUN", "true")
    monkeypatch.setenv("MP_GPU_MEMORY", memory)
    assert launch_main(arguments(MODEL_SIZE="tiny-moe")) == 0
    captured = capsys.readouterr()
    assert "planned memory per GPU" in captured.out
    assert ("exceeds the GPU's" in captured.err) == warned
