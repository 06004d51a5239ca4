import pytest
import torch
from safetensors.torch import save_file

from megatron_patch.models.hf_checkpoint import HFCheckpoint, HFCheckpointError
from megatron_patch.models.qwen3.mapping import bound_qwen3_mappings
from megatron_patch.models.weight_mapping import (
    FuseQKV,
    MappingError,
    check_hf_names,
    hf_tensors_from_megatron,
    megatron_tensors_from_hf,
)
from tests.conftest import PARITY_CONFIGS


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_every_hf_tensor_is_mapped_exactly_once(name, hf_checkpoints):
    arch, path, _ = hf_checkpoints[name]
    checkpoint = HFCheckpoint(path)
    bound = bound_qwen3_mappings(arch)
    check_hf_names(bound, checkpoint.keys())  # raises on a missing, extra or doubly used name
    used = [n for b in bound for n in b.hf_names]
    assert sorted(used) == sorted(checkpoint.keys())
    addresses = [b.address for b in bound]
    assert len(set(addresses)) == len(addresses)


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_hf_to_megatron_to_hf_is_bitwise(name, hf_checkpoints):
    arch, path, _ = hf_checkpoints[name]
    checkpoint = HFCheckpoint(path)
    bound = bound_qwen3_mappings(arch)
    megatron = dict(megatron_tensors_from_hf(bound, checkpoint.get))
    back = dict(hf_tensors_from_megatron(bound, megatron.__getitem__))
    assert back.keys() == set(checkpoint.keys())
    for key, tensor in back.items():
        assert torch.equal(tensor, checkpoint.get(key)), key


def test_qkv_layout_is_per_query_group():
    heads, groups, head_dim, hidden = 4, 2, 3, 5
    q = torch.arange(heads * head_dim * hidden, dtype=torch.float32).reshape(heads * head_dim, hidden)
    k = -torch.arange(groups * head_dim * hidden, dtype=torch.float32).reshape(groups * head_dim, hidden) - 1
    v = k - 1000
    fused = FuseQKV(heads, groups, head_dim).to_megatron([q, k, v])
    d = head_dim
    # group 0: q heads 0,1 then k0, v0; group 1: q heads 2,3 then k1, v1.
    expected = torch.cat([q[: 2 * d], k[:d], v[:d], q[2 * d :], k[d:], v[d:]])
    assert torch.equal(fused, expected)


def test_vocab_is_padded_with_zero_rows(hf_checkpoints):
    arch, path, _ = hf_checkpoints["moe-mqa-mixed-tied"]
    bound = {b.address.key: b for b in bound_qwen3_mappings(arch)}
    embedding = bound["embedding.word_embeddings.weight"].to_megatron(HFCheckpoint(path).get)
    assert embedding.shape == (512, arch.hidden_size)
    assert torch.count_nonzero(embedding[arch.vocab_size :]) == 0
    assert "output_layer.weight" not in bound  # tied


def test_missing_and_unexpected_tensors_are_named(hf_checkpoints):
    arch, path, _ = hf_checkpoints["moe-gqa"]
    bound = bound_qwen3_mappings(arch)
    names = HFCheckpoint(path).keys()
    dropped = "model.layers.2.mlp.experts.5.up_proj.weight"
    with pytest.raises(MappingError, match=f"missing tensor {dropped}"):
        check_hf_names(bound, [n for n in names if n != dropped])
    with pytest.raises(MappingError, match="unexpected tensor model.layers.9.mlp.gate.weight"):
        check_hf_names(bound, [*names, "model.layers.9.mlp.gate.weight"])


def test_hf_checkpoint_reads_sharded_index_and_refuses_pickles(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "part-1.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "part-2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}'
    )
    checkpoint = HFCheckpoint(tmp_path)
    assert sorted(checkpoint.keys()) == ["a", "b"] and checkpoint.shape("b") == (3,)
    assert torch.equal(checkpoint.get("a"), torch.ones(2))
    with pytest.raises(HFCheckpointError, match="no tensor named c"):
        checkpoint.get("c")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"a": torch.ones(1)}, pickled / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError, match="never pickles"):
        HFCheckpoint(pickled)
