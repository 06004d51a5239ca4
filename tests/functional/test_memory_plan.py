"""The planner's memory against what Megatron-Core allocates and saves (training/memory.py, activations.py).

- Static memory, byte for byte: the weights (parameters and DDP parameter buffers), gradient buffers
  and optimizer state of runs built as the trainer builds them (``prepare_model``) and stepped once:
  in this process, and (make test-slow) in two processes under torchrun at DP2, EP2, ETP2, dense TP2
  with SP, PP2 (a tied embedding split over the stages), interleaved PP2, with and without the
  distributed optimizer, with LoRA.
- Activations: the bytes one micro-batch saves for backward (distinct storages, through
  ``saved_tensors_hooks``) within 10 % of the plan (they agree to 0.1 %) for AC none, sel and full,
  on a tiny MoE, a tiny dense model and (make test-slow) one A3B-width layer at sequence 1024.
"""

import json
from pathlib import Path

import pytest
import torch

from megatron_patch.models.qwen3.presets import get_preset
from megatron_patch.parallel import ParallelLayout
from megatron_patch.training.activations import Tokens, chunk_bytes
from megatron_patch.training.memory import ModelShape
from tests.functional.torchrun import torchrun_batch

pytestmark = pytest.mark.functional


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    """A raw SFT file: the runs are built, not trained on it, but the trainer checks it exists."""
    path = tmp_path_factory.mktemp("memory") / "train.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    return path


def run_flags(sft_file, *flags) -> list[str]:
    return ["--train-mode", "finetune", "--dataset-type", "raw", "--data-path", str(sft_file), "--device", "cpu",
            "--global-batch-size", "2", *map(str, flags)]


ONE_PROCESS = {
    "moe-bf16": ["--model", "tiny-moe"],
    "moe-bf16-no-distributed-optimizer": ["--model", "tiny-moe", "--no-use-distributed-optimizer"],
    "dense-fp32-lora": ["--model", "tiny-dense", "--precision", "fp32", "--lora-rank", 4],
    "moe-local-lora-experts-only": ["--model", "tiny-moe", "--transformer-impl", "local", "--lora-rank", 4,
                                    "--lora-target-modules", "linear_fc1", "linear_fc2"],
}


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_planned_static_memory_is_what_megatron_allocates_in_one_process(name, sft_file, megatron_world):
    from tests.functional.workers.memory_worker import measure

    report = measure(run_flags(sft_file, *ONE_PROCESS[name]))
    assert report["measured"]["optimizer"] > 0 and report["measured"]["gradients"] > 0
    assert report["planned"] == report["measured"]


TWO_PROCESSES = {
    "moe-dp2": ["--model", "tiny-moe"],
    "moe-dp2-no-distributed-optimizer": ["--model", "tiny-moe", "--no-use-distributed-optimizer"],
    "moe-ep2": ["--model", "tiny-moe", "--expert-model-parallel-size", 2],
    "moe-etp2": ["--model", "tiny-moe", "--expert-tensor-parallel-size", 2],
    "moe-fp32-tp2-sp": ["--model", "tiny-moe", "--precision", "fp32", "--tensor-model-parallel-size", 2,
                        "--sequence-parallel"],
    "dense-tp2-sp": ["--model", "tiny-dense", "--tensor-model-parallel-size", 2, "--sequence-parallel"],
    "dense-tied-pp2": ["--model", "tiny-dense", "--pipeline-model-parallel-size", 2],
    "moe-pp2-interleaved": ["--model", "tiny-moe", "--pipeline-model-parallel-size", 2,
                            "--num-layers-per-virtual-pipeline-stage", 1],
    "moe-ep2-lora": ["--model", "tiny-moe", "--expert-model-parallel-size", 2, "--lora-rank", 4],
}


@pytest.fixture(scope="module")
def two_process_reports(sft_file, tmp_path_factory) -> dict[str, list[dict]]:
    folder = tmp_path_factory.mktemp("memory-2")
    jobs = {name: ("memory", run_flags(sft_file, *flags)) for name, flags in TWO_PROCESSES.items()}
    outputs = torchrun_batch(2, jobs, folder)
    return {name: json.loads(output.strip().splitlines()[-1]) for name, output in outputs.items()}


@pytest.mark.slow  # one two-process launch of nine runs (about 25 s): make test-slow
@pytest.mark.parametrize("name", TWO_PROCESSES)
def test_planned_static_memory_is_what_megatron_allocates_on_each_of_two_ranks(name, two_process_reports):
    for rank, report in enumerate(two_process_reports[name]):
        assert report["planned"] == report["measured"], f"rank {rank}"
    if name == "dense-tied-pp2":  # the stages differ (embedding, output layer copy), and so do their plans
        first, last = two_process_reports[name]
        assert first["measured"] != last["measured"]


def saved_for_backward(model, tokens: torch.Tensor) -> tuple[int, int]:
    """(bytes of every distinct storage the forward saves for backward, of those saved by the decoder
    layers), parameters aside."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, in_layers, inside = {}, {}, [False]
    hooks = [model.decoder.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
             model.decoder.final_layernorm.register_forward_pre_hook(lambda *_: inside.__setitem__(0, False))]

    def pack(tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in parameters and pointer not in saved and storage.nbytes():
            saved[pointer] = storage.nbytes()
            if inside[0]:
                in_layers[pointer] = storage.nbytes()
        return tensor

    positions = torch.arange(tokens.shape[1])[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens, positions, None, labels=tokens)
    for hook in hooks:
        hook.remove()
    return sum(saved.values()), sum(in_layers.values())


def check_activations(arch, sequence: int, impl: str = "torch") -> None:
    from megatron_patch.models.choices import RECOMPUTE_MODES
    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model

    state, ratios, kept_by_layers = None, {}, {}
    tokens = torch.randint(0, arch.vocab_size, (1, sequence), generator=torch.Generator().manual_seed(0))
    shape = ModelShape(arch, ParallelLayout(), "bf16", impl)
    layers = list(range(arch.num_layers))
    for recompute in ("none", "sel", "full"):
        options = BuildOptions(precision="bf16", transformer_impl=impl, recompute=RECOMPUTE_MODES[recompute])
        model = build_gpt_model(arch, options, calculate_per_token_loss=True, perform_initialization=state is None)
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)  # the same routing in every mode
        measured, kept_by_layers[recompute] = saved_for_backward(model, tokens)
        planned = chunk_bytes(shape, layers, Tokens(sequence), recompute, 1, pre_process=True, post_process=True)
        planned_layers = chunk_bytes(shape, layers, Tokens(sequence), recompute, 1, False, False)
        ratios[recompute] = (planned / measured, planned_layers / kept_by_layers[recompute])
    for recompute, (whole, layers_only) in ratios.items():
        assert abs(whole - 1) < 0.10 and abs(layers_only - 1) < 0.10, (recompute, ratios)
    assert kept_by_layers["full"] < kept_by_layers["none"] / 10  # what full recompute is for


@pytest.mark.parametrize("preset,impl", [("tiny-moe", "torch"), ("tiny-moe", "local"), ("tiny-dense", "torch")])
def test_planned_activations_match_the_saved_tensors_of_a_tiny_model(preset, impl, megatron_world):
    # A small vocabulary: the loss's softmax would otherwise be nearly all of the sum.
    check_activations(get_preset(preset).replace(vocab_size=2048), 256, impl)


@pytest.mark.slow  # builds a 1.3B-parameter layer on CPU (about 30 s): make test-slow
def test_planned_activations_match_the_saved_tensors_of_an_a3b_width_layer(megatron_world):
    # One layer of Qwen3-30B-A3B's width (128 experts, top-8); a small vocabulary keeps the loss from
    # dominating the sum.
    check_activations(get_preset("A3B").replace(num_layers=1, vocab_size=8192), 1024)
