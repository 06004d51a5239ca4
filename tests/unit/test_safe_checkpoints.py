"""No code runs from a checkpoint: a planted pickle is refused on every path that opens torch_dist.

Each path gets a converted tiny model whose ``.metadata`` (or one non-tensor item) is replaced by
a pickle that would create a marker file when unpickled; the load must stop with one line that
names the file and the class, and the marker must never appear.
"""

import os
import pickle
import shutil

import pytest
import torch

from megatron_patch.checkpoints import TorchDistCheckpoint
from megatron_patch.checkpoints.manifest import write_manifest
from megatron_patch.checkpoints.weights import load_sharded
from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.evaluation.run import main as evaluate_main
from megatron_patch.lora.__main__ import main as lora_main
from megatron_patch.patches.safe_checkpoints import UnsafeCheckpointError
from megatron_patch.training.config import parse_config
from megatron_patch.training.loop import train
from tests.helpers import build_pretrain_data

REFUSED = "refused to load posix.system"


class Planted:
    """Unpickling this runs a shell command: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def converted(hf_checkpoints, megatron_world, tmp_path_factory):
    """(HF dir, a converter output directory) of a tiny MoE."""
    _, hf_dir, _ = hf_checkpoints["moe-gqa"]
    out = tmp_path_factory.mktemp("safe") / "mcore"
    assert convert_main(["--load-dir", str(hf_dir), "--save-dir", str(out), "--precision", "fp32"]) == 0
    return hf_dir, out


def planted_copy(converted, tmp_path, record=None):
    """A copy of the converter output whose .metadata runs ``touch MARKER``; returns (dir, marker)."""
    _, source = converted
    target, marker = tmp_path / "planted", tmp_path / "marker"
    shutil.copytree(source, target)
    (target / "release" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    # Our record in common.pt (a LoRA save's), so export gets as far as the metadata. Where the common
    # state lives inside the DCP files (megatron-core 0.19+), reading it already opens the planted .metadata.
    if record is not None and (target / "release" / "common.pt").is_file():
        common = torch.load(target / "release" / "common.pt", weights_only=True)
        torch.save({**common, "megatron_patch": record}, target / "release" / "common.pt")
    write_manifest(target)  # a forger rewrites the checksums too: the unpickler is what stops this
    return target, marker


def test_the_planted_pickle_would_run(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Planted(marker)))
    assert marker.exists()  # so its absence below means it was refused, not harmless


def test_converter_refuses(converted, tmp_path, capsys):
    hf_dir, _ = converted
    planted, marker = planted_copy(converted, tmp_path)
    status = convert_main(["--mg2hf", "--load-dir", str(planted), "--save-dir", str(tmp_path / "hf"),
                           "--hf-dir", str(hf_dir)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert f"{planted / 'release' / '.metadata'}: {REFUSED}" in err
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_training_load_refuses(converted, tmp_path):
    # The trainer itself (train.py's main would also end this process's world, which others share).
    hf_dir, _ = converted
    planted, marker = planted_copy(converted, tmp_path)
    data = build_pretrain_data(tmp_path / "data")  # real data: the inputs are checked before the load
    config, _ = parse_config(["--model", str(hf_dir), "--load", str(planted), "--data-path", data,
                              "--precision", "fp32", "--seq-length", "32", "--global-batch-size", "1",
                              "--train-iters", "1"])
    with pytest.raises(UnsafeCheckpointError, match=f"{planted / 'release' / '.metadata'}: {REFUSED}"):
        train(config)
    assert not marker.exists()


def test_evaluation_refuses(converted, tmp_path, capsys):
    planted, marker = planted_copy(converted, tmp_path)
    data = tmp_path / "eval-data"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "..", "..", "megatron_patch", "resources", "eval_data"),
                    data)
    status = evaluate_main([str(planted), str(data), "cmmlu_agronomy", "--limit", "1"])
    err = capsys.readouterr().err
    assert status == 2 and REFUSED in err and ".metadata" in err, err
    assert not marker.exists()


def test_lora_export_refuses(converted, tmp_path, capsys):
    lora = {"lora": {"rank": 4, "alpha": 8.0, "targets": ["linear_qkv"], "adapters_only": True, "base": None}}
    planted, marker = planted_copy(converted, tmp_path, record=lora)
    status = lora_main(["--adapter", str(planted), "--peft-out", str(tmp_path / "peft")])
    err = capsys.readouterr().err
    assert status == 2 and f"{planted / 'release' / '.metadata'}: {REFUSED}" in err, err
    assert not marker.exists() and not (tmp_path / "peft").exists()
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        TorchDistCheckpoint(planted / "release")


def test_a_planted_item_is_refused_and_legitimate_items_load(megatron_world, tmp_path):
    """Non-tensor items (RNG states, optimizer groups) are unpickled too: the same gate."""
    import numpy as np
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    marker = tmp_path / "marker"
    (tmp_path / "ok").mkdir()
    (tmp_path / "planted").mkdir()
    legit = {"numpy": np.random.get_state(), "torch": torch.get_rng_state(), "plain": (1, 2.0, "three", None)}
    dist_checkpointing.save({"rng": ShardedObject("rng", legit, (1,), (0,), replica_id=0)}, str(tmp_path / "ok"))
    loaded = dist_checkpointing.load({"rng": ShardedObject("rng", None, (1,), (0,), replica_id=0)},
                                     str(tmp_path / "ok"))["rng"]
    assert np.array_equal(loaded["numpy"][1], legit["numpy"][1]) and torch.equal(loaded["torch"], legit["torch"])
    dist_checkpointing.save({"rng": ShardedObject("rng", Planted(marker), (1,), (0,), replica_id=0)},
                            str(tmp_path / "planted"))
    with pytest.raises(UnsafeCheckpointError, match=r"planted/__0_0.distcp \(item rng/shard_0_1\): refused to load "
                                                     r"posix.system"):
        load_sharded(tmp_path / "planted", {"rng": ShardedObject("rng", None, (1,), (0,), replica_id=0)})
    assert not marker.exists()
