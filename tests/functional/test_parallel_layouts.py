"""Real 2-process torchrun (gloo) runs: each parallel layout reproduces the 1-process model.

Layouts: EP=2 (alltoall and allgather dispatchers; DP=2 as well), PP=2 (with
tied embeddings split across the stages), TP=2 on a dense model.
"""

import json

import pytest
import torch

from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint
from tests.conftest import PARITY_CONFIGS
from tests.functional.torchrun import torchrun

pytestmark = pytest.mark.functional

LOGITS_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-4

MODELS = {"moe": PARITY_CONFIGS["moe-mqa-mixed-tied"], "dense": PARITY_CONFIGS["dense-untied-mha"]}
LAYOUTS = [
    ("moe", ["--ep", "2"]),
    ("moe", ["--ep", "2", "--dispatcher", "allgather"]),
    ("moe", ["--pp", "2"]),
    ("dense", ["--tp", "2"]),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """HF checkpoints of both models and their 1-process logits and loss curves."""
    built = {}
    for name, arch in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        save_random_hf_checkpoint(arch, path, seed=3)
        torchrun(1, "logits", "--hf-dir", path, "--out", path / "logits-1.pt")
        torchrun(1, "train", "--hf-dir", path, "--out", path / "losses-1.json")
        built[name] = path
    return built


def _id(layout):
    return f"{layout[0]}-" + "".join(layout[1]).replace("--", "")


@pytest.mark.parametrize("layout", LAYOUTS, ids=_id)
def test_logits_equal_one_process(layout, runs, tmp_path):
    model, flags = layout
    path = runs[model]
    torchrun(2, "logits", "--hf-dir", path, "--out", tmp_path / "logits.pt", *flags)
    reference = torch.load(path / "logits-1.pt")
    logits = torch.load(tmp_path / "logits.pt")
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() <= LOGITS_TOLERANCE


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[3]], ids=_id)
def test_training_curve_equals_one_process(layout, runs, tmp_path):
    """DDP + distributed optimizer + pipeline schedule: same losses as 1 process, and falling."""
    model, flags = layout
    path = runs[model]
    torchrun(2, "train", "--hf-dir", path, "--out", tmp_path / "losses.json", *flags)
    reference = json.loads((path / "losses-1.json").read_text())
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert len(losses) == len(reference) == 5
    assert max(abs(a - b) for a, b in zip(losses, reference)) <= LOSS_TOLERANCE
    assert losses[-1] < losses[0] - 0.3
