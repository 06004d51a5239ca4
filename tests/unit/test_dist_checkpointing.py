"""Megatron-Core's dist_checkpointing (torch_dist) saves and loads our models on CPU, bitwise, keys strict."""

import torch

from megatron_patch.models.qwen3.builder import build_gpt_model
from megatron_patch.models.sharded_state import read_full_tensors
from tests.conftest import PARITY_CONFIGS


def test_torch_dist_round_trip_is_bitwise(megatron_world, tmp_path):
    from megatron.core import dist_checkpointing

    arch = PARITY_CONFIGS["moe-mqa-mixed-tied"]  # MoE + dense layers, tied, padded vocab
    torch.manual_seed(0)
    saved = build_gpt_model(arch)
    dist_checkpointing.save(sharded_state_dict=saved.sharded_state_dict(), checkpoint_dir=str(tmp_path))
    assert (tmp_path / "metadata.json").is_file() and (tmp_path / ".metadata").is_file()

    torch.manual_seed(1)
    loaded = build_gpt_model(arch)
    assert not torch.equal(loaded.embedding.word_embeddings.weight, saved.embedding.word_embeddings.weight)
    state = dist_checkpointing.load(
        sharded_state_dict=loaded.sharded_state_dict(), checkpoint_dir=str(tmp_path), strict="raise_all"
    )
    loaded.load_state_dict(state)
    expected, actual = read_full_tensors(saved), read_full_tensors(loaded)
    assert expected.keys() == actual.keys()
    for address, tensor in expected.items():
        assert torch.equal(tensor, actual[address]), address
