"""Converter checkpoints across parallel layouts, with real 2-process torchrun (gloo) jobs.

- A torch_dist checkpoint written once (the converter's canonical layout) loads at EP=2, PP=2
  and TP=2 and gives the HF model's logits.
- A checkpoint saved by training at EP=2 (model + distributed-optimizer state) converts to HF,
  optimizer ignored, and the HF model computes the trained model's logits.
- 2-process conversion, both directions, gives the same bytes as the HF source.
"""

import pytest
import torch

from megatron_patch.models.hf_checkpoint import HFCheckpoint
from megatron_patch.models.qwen3.hf_model import load_hf_model, save_random_hf_checkpoint
from tests.conftest import PARITY_CONFIGS
from tests.functional.torchrun import torchrun, torchrun_module

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


@pytest.mark.parametrize("model, flags", [("moe", ["--ep", "2"]), ("moe", ["--pp", "2"]), ("dense", ["--tp", "2"])],
                         ids=["moe-ep2", "moe-pp2", "dense-tp2"])
def test_converted_checkpoint_loads_at_another_layout(model, flags, converted, tmp_path):
    root, reference = converted[model]
    torchrun(2, "logits", "--hf-dir", root / "hf", "--torch-dist", root / "mcore" / "release",
             "--out", tmp_path / "logits.pt", *flags)
    assert (torch.load(tmp_path / "logits.pt") - reference).abs().max().item() <= 1e-4


def test_training_checkpoint_with_optimizer_converts_to_hf(converted, tmp_path):
    root, _ = converted["moe"]
    torchrun(2, "train-save", "--hf-dir", root / "hf", "--torch-dist", root / "mcore" / "release",
             "--save-dir", tmp_path / "run", "--out", tmp_path / "trained.pt", "--ep", "2")
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == "5"
    convert(1, "--mg2hf", "--load-dir", tmp_path / "run", "--hf-dir", root / "hf", "--save-dir", tmp_path / "hf")
    model = load_hf_model(tmp_path / "hf")
    with torch.no_grad():
        logits = model(input_ids=worker_tokens(MODELS["moe"])).logits
    trained = torch.load(tmp_path / "trained.pt")
    assert (logits - trained).abs().max().item() <= 1e-4
    # Training really changed the weights: the converted model is not the starting one.
    assert (logits - converted["moe"][1]).abs().max().item() > 1e-2
