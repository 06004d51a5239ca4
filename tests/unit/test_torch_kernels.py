"""SdpaAttention and GroupedGemmExperts against the Megatron-Core modules they replace."""

import pytest
import torch

from megatron_patch.models.attention import SdpaAttention
from megatron_patch.models.experts import GroupedGemmExperts, grouped_mm_usable
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model, build_transformer_config
from tests.conftest import TINY_MOE

FP32_TOLERANCE = 1e-5


def config_for(arch=TINY_MOE, precision="fp32", **overrides):
    return build_transformer_config(arch, BuildOptions(precision=precision, aux_loss_coeff=0.0), **overrides)


def attention_inputs(seq, batch, config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    heads, groups, dim = config.num_attention_heads, config.num_query_groups, config.kv_channels
    return [torch.randn(seq, batch, n, dim, generator=generator, requires_grad=True) for n in (heads, groups, groups)]


def run(module, inputs, **kwargs):
    out = module(*inputs, None, **kwargs)
    grad_out = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


def core_attentions(config):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    return DotProductAttention(**args), SdpaAttention(**args)


def test_attention_equals_dot_product_attention(megatron_world):
    config = config_for()
    stock, ours = core_attentions(config)
    inputs = attention_inputs(seq=11, batch=3, config=config)
    expected, expected_grads = run(stock, inputs)
    got, got_grads = run(ours, inputs)
    assert got.shape == expected.shape == (11, 3, config.num_attention_heads * config.kv_channels)
    assert (got - expected).abs().max() < FP32_TOLERANCE
    for name, a, b in zip("qkv", got_grads, expected_grads):
        assert (a - b).abs().max() < FP32_TOLERANCE, name


def test_packed_attention_equals_each_sample_alone(megatron_world):
    from megatron.core.packed_seq_params import PackedSeqParams

    config = config_for()
    _, ours = core_attentions(config)
    lengths = [5, 1, 9, 4]
    cu = torch.tensor([0, 5, 6, 15, 19], dtype=torch.int32)
    q, k, v = (x.detach()[:, 0].requires_grad_() for x in attention_inputs(seq=19, batch=1, config=config))
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    packed, packed_grads = run(ours, [q, k, v], packed_seq_params=params)
    assert packed.shape == (19, config.num_attention_heads * config.kv_channels)
    grad_out = torch.randn_like(packed, generator=torch.Generator().manual_seed(7))
    start = 0
    for length in lengths:
        piece = [x.detach()[start : start + length].unsqueeze(1).requires_grad_() for x in (q, k, v)]
        alone = ours(*piece, None)
        grads = torch.autograd.grad(alone, piece, grad_out[start : start + length].unsqueeze(1))
        assert (packed[start : start + length] - alone[:, 0]).abs().max() < FP32_TOLERANCE
        for a, b in zip(packed_grads, grads):
            assert (a[start : start + length] - b[:, 0]).abs().max() < FP32_TOLERANCE
        start += length
    # Across-sample attention would change every sample after the first: the check can fail.
    unpacked = ours(*(x.detach().unsqueeze(1) for x in (q, k, v)), None)[:, 0]
    assert (unpacked[6:] - packed.detach()[6:]).abs().max() > 1e-3


def expert_modules(config, num_experts):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    groups = ProcessGroupCollection.use_mpu_process_groups()
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    stock = SequentialMLP(num_experts, config, submodules, pg_collection=groups)
    ours = GroupedGemmExperts(num_experts, config, submodules, pg_collection=groups)
    ours.load_state_dict(stock.state_dict())  # SequentialMLP's per-expert keys
    return stock, ours


def expert_inputs(config, counts, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(sum(counts), config.hidden_size, generator=generator).to(dtype).requires_grad_()
    probs = torch.rand(sum(counts), generator=generator)
    return hidden, torch.tensor(counts), probs


def expert_grads(module, hidden, counts, probs):
    out, bias = module(hidden, counts, probs)
    assert bias is None
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    out.backward(grad_out)
    return out.detach(), hidden.grad


@pytest.mark.parametrize("precision, tolerance", [("fp32", FP32_TOLERANCE), ("bf16", 3e-2)])
def test_experts_equal_sequential_mlp(megatron_world, precision, tolerance):
    config = config_for(precision=precision)
    dtype = config.params_dtype
    stock, ours = expert_modules(config, num_experts=4)
    counts = [3, 0, 6, 2]  # an expert without tokens too
    hidden, tokens_per_expert, probs = expert_inputs(config, counts, dtype)
    # bf16 runs torch's grouped GEMM kernel (as on an H100); fp32 the per-expert fallback.
    assert grouped_mm_usable(hidden) == (precision == "bf16")
    expected, expected_dx = expert_grads(stock, hidden, tokens_per_expert, probs)
    hidden.grad = None
    got, got_dx = expert_grads(ours, hidden, tokens_per_expert, probs)
    scale = expected.abs().max().item()
    assert (got.float() - expected.float()).abs().max() <= tolerance * scale
    assert (got_dx.float() - expected_dx.float()).abs().max() <= tolerance * expected_dx.abs().max()
    for expert, mlp in enumerate(stock.local_experts):
        for ours_grad, stock_weight in ((ours.weight1.grad[expert], mlp.linear_fc1.weight),
                                        (ours.weight2.grad[expert], mlp.linear_fc2.weight)):
            reference = stock_weight.grad if stock_weight.grad is not None else torch.zeros_like(stock_weight)
            bound = tolerance * max(reference.abs().max().item(), 1e-6)
            assert (ours_grad.float() - reference.float()).abs().max() <= bound, expert


def sharded_layout(model):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    layout = set()
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensor):
            layout.add((value.key, value.global_shape, value.global_offset, value.local_shape, value.replica_id,
                        value.data.float().sum().item()))
        elif isinstance(value, ShardedObject):
            layout.add((value.key, value.global_shape, value.global_offset, value.replica_id))
    return layout


def test_experts_checkpoint_like_sequential_mlp(megatron_world, hf_checkpoints, tmp_path):
    """Same sharded tensors (keys, offsets, values) as the stock module; a checkpoint moves both ways."""
    from megatron.core import dist_checkpointing

    from megatron_patch.models.logits import forward_logits
    from megatron_patch.models.qwen3.loading import load_hf_weights

    arch, path, _ = hf_checkpoints["moe-gqa"]
    stock = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0, transformer_impl="local"))
    ours = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0, transformer_impl="torch"))
    assert any(isinstance(m, GroupedGemmExperts) for m in ours.modules())
    load_hf_weights(stock, path)
    load_hf_weights(ours, path)
    assert sharded_layout(ours) == sharded_layout(stock)
    tokens = torch.randint(0, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = forward_logits(stock, tokens, vocab_size=arch.vocab_size)
    for source, target, name in ((stock, "torch", "from_stock"), (ours, "local", "from_ours")):
        directory = tmp_path / name
        directory.mkdir()
        dist_checkpointing.save(source.sharded_state_dict(), str(directory))
        fresh = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0, transformer_impl=target))
        fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(directory)))
        got = forward_logits(fresh, tokens, vocab_size=arch.vocab_size)
        assert (got - expected).abs().max() < 1e-4, name


def test_grouped_weights_carry_megatron_parallel_attributes(megatron_world):
    config = config_for()
    _, ours = expert_modules(config, num_experts=2)
    assert [p.shape for p in ours.parameters()] == [
        (2, 2 * config.moe_ffn_hidden_size, config.hidden_size), (2, config.hidden_size, config.moe_ffn_hidden_size)]
    assert ours.weight1.tensor_model_parallel and ours.weight1.partition_dim == 1
    assert ours.weight2.partition_dim == 2
    assert ours.weight1.allreduce  # EP = 1: reduced with the dense parameters
    with pytest.raises(KeyError, match="local_experts.1.linear_fc1.weight missing"):
        ours.load_state_dict({"local_experts.0.linear_fc1.weight": ours.weight1[0].detach(),
                              "local_experts.0.linear_fc2.weight": ours.weight2[0].detach(),
                              "local_experts.1.linear_fc2.weight": ours.weight2[1].detach()})
