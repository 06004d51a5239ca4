"""Converter checkpoints across parallel layouts, with real 2-process torchrun (gloo) jobs.

- A torch_dist checkpoint written once (the converter's canonical layout) loads at EP=2 (alltoall
  and allgather dispatchers), PP=2 (tied embeddings split across the stages) and TP=2 and gives
  the HF model's logits: every layout computes what one process does.
- Training's --load of the HF directory itself gives the same tensors at those layouts.
- A checkpoint saved by training at EP=2 (model + distributed-optimizer state) converts to HF,
  optimizer ignored, and the HF model computes the trained model's logits.
- 2-process conversion, both directions, gives the same bytes as the HF source.
- The kit's generator samples on the model at EP=2 and at TP=2 with SP, and the log-probs it
  records equal the training forward's.
"""

import json

import pytest
import torch

from megatron_patch.models.hf_checkpoint import HFCheckpoint
from megatron_patch.models.qwen3.hf_model import load_hf_model, save_random_hf_checkpoint
from tests.conftest import PARITY_CONFIGS
from tests.functional.torchrun import torchrun_batch, torchrun_module

pytestmark = pytest.mark.functional

MODELS = {"moe": PARITY_CONFIGS["moe-mqa-mixed-tied"], "dense": PARITY_CONFIGS["dense-untied-mha"]}


def convert(nproc, *args):
    return torchrun_module(nproc, "megatron_patch.convert", "--precision", "fp32", *args)


def worker_tokens(arch):
    # The worker's batch (tests/functional/workers/parallel_worker.py).
    return torch.randint(0, arch.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))[:, :32]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (HF dir, torch_dist dir written by a 2-process conversion, HF logits of the worker batch)."""
    built = {}
    for name, arch in MODELS.items():
        root = tmp_path_factory.mktemp(f"convert-{name}")
        model = save_random_hf_checkpoint(arch, root / "hf", seed=5)
        convert(2, "--load-dir", root / "hf", "--save-dir", root / "mcore")
        with torch.no_grad():
            built[name] = (root, model(input_ids=worker_tokens(arch)).logits)
    return built


def test_two_process_conversion_round_trips_bitwise(converted, tmp_path):
    root, _ = converted["moe"]
    assert sorted(p.name for p in (root / "mcore" / "release").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    convert(2, "--mg2hf", "--load-dir", root / "mcore", "--save-dir", tmp_path / "hf", "--max-shard-size", "300KB")
    source, back = HFCheckpoint(root / "hf"), HFCheckpoint(tmp_path / "hf")
    assert sorted(source.keys()) == sorted(back.keys())
    for name in source.keys():
        assert torch.equal(source.get(name), back.get(name)), name


# name: (model, layout) of a 2-process load of the converted checkpoint; every dispatcher and split.
LOAD_LAYOUTS = {
    "moe-ep2": ("moe", ["--ep", "2"]),
    "moe-ep2-allgather": ("moe", ["--ep", "2", "--dispatcher", "allgather"]),
    "moe-pp2": ("moe", ["--pp", "2"]),
    "dense-tp2": ("dense", ["--tp", "2"]),
}


@pytest.fixture(scope="module")
def two_process_checks(converted, tmp_path_factory):
    """The converted checkpoints loaded at each layout, and a training save at EP=2: one launch."""
    folder = tmp_path_factory.mktemp("two-process-checks")
    jobs = {name: ("check", ["logits", "--hf-dir", converted[model][0] / "hf", "--torch-dist",
                             converted[model][0] / "mcore" / "release", "--out", folder / f"{name}.pt", *flags])
            for name, (model, flags) in LOAD_LAYOUTS.items()}
    root = converted["moe"][0]
    jobs["train-save"] = ("check", ["train-save", "--hf-dir", root / "hf", "--torch-dist", root / "mcore" / "release",
                                    "--save-dir", folder / "run", "--out", folder / "trained.pt", "--ep", "2"])
    for name, (model, flags) in LOAD_LAYOUTS.items():
        jobs[f"hf-start-{name}"] = ("check", ["hf-start", "--hf-dir", converted[model][0] / "hf", "--torch-dist",
                                              converted[model][0] / "mcore", "--out", folder / f"hf-start-{name}.json",
                                              *flags])
    for name, (model, flags) in ROLLOUT_LAYOUTS.items():
        jobs[name] = ("check", ["rollout", "--hf-dir", converted[model][0] / "hf", "--torch-dist",
                                converted[model][0] / "mcore" / "release", "--out", folder / f"{name}.json", *flags])
    torchrun_batch(2, jobs, folder / "batch")
    return folder


@pytest.mark.parametrize("name", LOAD_LAYOUTS)
def test_converted_checkpoint_loads_at_another_layout(name, converted, two_process_checks):
    _, reference = converted[LOAD_LAYOUTS[name][0]]
    assert (torch.load(two_process_checks / f"{name}.pt") - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", LOAD_LAYOUTS)
def test_training_loads_an_hf_directory_as_it_loads_the_converters_output(name, two_process_checks):
    """--load of the HF directory (each rank reading its own shards' tensors) gives, tensor for tensor,
    the model --load of its torch_dist conversion gives, at EP2, PP2 and TP2."""
    report = json.loads((two_process_checks / f"hf-start-{name}.json").read_text())
    assert report["tensors"] >= 10 and report["different"] == 0, report


# Sampling on the model in its training layout (models/generation.py): the log-probs recorded while
# generating are the ones the training forward computes, with the vocabulary split over TP ranks
# (and 500 of 512 columns real) or the experts over EP ranks.
ROLLOUT_LAYOUTS = {"rollout-moe-ep2": ("moe", ["--ep", "2"]), "rollout-dense-tp2-sp": ("dense", ["--tp", "2", "--sp"])}


@pytest.mark.parametrize("name", ROLLOUT_LAYOUTS)
def test_rollout_log_probs_equal_the_training_forwards_in_a_parallel_layout(name, two_process_checks):
    report = json.loads((two_process_checks / f"{name}.json").read_text())
    assert report["gap"] <= 1e-5 and report["tokens"] >= 96, report


def test_training_checkpoint_with_optimizer_converts_to_hf(converted, two_process_checks, tmp_path):
    root, _ = converted["moe"]
    run = two_process_checks / "run"
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "5"
    convert(1, "--mg2hf", "--load-dir", run, "--hf-dir", root / "hf", "--save-dir", tmp_path / "hf")
    model = load_hf_model(tmp_path / "hf")
    with torch.no_grad():
        logits = model(input_ids=worker_tokens(MODELS["moe"])).logits
    trained = torch.load(two_process_checks / "trained.pt")
    assert (logits - trained).abs().max().item() <= 1e-4
    # Training really changed the weights: the converted model is not the starting one.
    assert (logits - converted["moe"][1]).abs().max().item() > 1e-2
