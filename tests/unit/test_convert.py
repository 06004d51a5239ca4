"""The converter: HF <-> torch_dist round trips, a stock Megatron-Core model reading our output, bad inputs."""

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.models.hf_checkpoint import HFCheckpoint
from tests.conftest import PARITY_CONFIGS

ROUND_TRIP_CONFIGS = ["moe-gqa", "moe-mqa-mixed-tied", "dense-tied", "dense-untied-mha"]


def convert(*args):
    return convert_main([str(a) for a in args])


def assert_same_tensors(left, right, cast=None):
    a, b = HFCheckpoint(left), HFCheckpoint(right)
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        expected = a.get(name) if cast is None else a.get(name).to(cast)
        assert torch.equal(expected, b.get(name)), name


@pytest.mark.parametrize("name", ROUND_TRIP_CONFIGS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_round_trip_is_bitwise(name, precision, megatron_world, hf_checkpoints, tmp_path):
    _, hf_dir, _ = hf_checkpoints[name]
    assert convert("--load-dir", hf_dir, "--save-dir", tmp_path / "mcore", "--precision", precision) == 0
    assert (tmp_path / "mcore" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (tmp_path / "mcore" / "release" / "metadata.json").is_file()
    assert convert("--mg2hf", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "hf",
                   "--precision", precision, "--max-shard-size", "200KB") == 0
    # The source is fp32: an fp32 trip is exact, a bf16 trip equals the source rounded once.
    assert_same_tensors(hf_dir, tmp_path / "hf", cast=None if precision == "fp32" else torch.bfloat16)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == {"fp32": "float32", "bf16": "bfloat16"}[precision]


def test_bf16_source_round_trips_bitwise(megatron_world, hf_checkpoints, tmp_path):
    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint

    arch = PARITY_CONFIGS["moe-gqa"]
    save_random_hf_checkpoint(arch, tmp_path / "src", dtype=torch.bfloat16)
    assert convert("--load-dir", tmp_path / "src", "--save-dir", tmp_path / "mcore") == 0  # default bf16
    assert convert("--mg2hf", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "hf") == 0
    assert_same_tensors(tmp_path / "src", tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16


def stock_megatron_model(arch):
    """GPTModel built with Megatron-Core's own APIs only (not our builder), as an independent reader."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    moe = dict(num_moe_experts=arch.num_experts, moe_router_topk=arch.moe_topk,
               moe_ffn_hidden_size=arch.moe_ffn_hidden_size, moe_router_pre_softmax=not arch.norm_topk_prob,
               moe_token_dispatcher_type="allgather") if arch.is_moe else {}
    config = TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups, kv_channels=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=arch.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, qk_layernorm=True, hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True, **moe,
    )
    spec = get_gpt_layer_local_spec(num_experts=arch.num_experts or None, qk_layernorm=True, normalization="RMSNorm")
    if arch.is_moe:
        # Transformer-Engine's MoE layers keep a separate pre_mlp_layernorm; the local spec maps it
        # onto the dense-MLP name. Reading a TE-named checkpoint with the local spec needs this.
        spec.submodules.sharded_state_dict_keys_map.pop("pre_mlp_layernorm.")
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=arch.vocab_size,
                    max_sequence_length=arch.max_position_embeddings, position_embedding_type="rope",
                    rotary_base=int(arch.rope_theta), share_embeddings_and_output_weights=arch.tie_word_embeddings)


@pytest.mark.parametrize("name", ["moe-gqa", "dense-tied"])
def test_stock_megatron_model_reads_our_output(name, megatron_world, hf_checkpoints, tmp_path):
    from megatron.core import dist_checkpointing

    arch, hf_dir, hf_model = hf_checkpoints[name]
    assert convert("--load-dir", hf_dir, "--save-dir", tmp_path / "mcore", "--precision", "fp32") == 0
    model = stock_megatron_model(arch)
    state = dist_checkpointing.load(sharded_state_dict={"model": model.sharded_state_dict()},
                                    checkpoint_dir=str(tmp_path / "mcore" / "release"), strict="raise_all")
    model.load_state_dict(state["model"])
    assert state["iteration"] == 0 and state["checkpoint_version"] == 3.0
    tokens = torch.randint(0, arch.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(32).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        ours = model.eval()(input_ids=tokens, position_ids=position_ids, attention_mask=None)
        assert (ours - hf_model(input_ids=tokens).logits).abs().max().item() <= 1e-4


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def broken_copy(source, destination, edit):
    """A copy of an HF checkpoint with its tensors changed by ``edit(dict)``."""
    shutil.copytree(source, destination)
    checkpoint = HFCheckpoint(source)
    tensors = {name: checkpoint.get(name) for name in checkpoint.keys()}
    edit(tensors)
    (destination / "model.safetensors").unlink()
    save_file(tensors, destination / "model.safetensors")
    return destination


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("model.layers.1.mlp.experts.3.down_proj.weight"),
         "missing tensor model.layers.1.mlp.experts.3.down_proj.weight"),
        (lambda t: t.update({"model.layers.1.mlp.experts.99.down_proj.weight": torch.zeros(1)}),
         "unexpected tensor model.layers.1.mlp.experts.99.down_proj.weight"),
        (lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(32, 64)}),
         r"tensor model.layers.2.self_attn.k_proj.weight has shape \(32, 64\), the config needs \(64, 64\)"),
    ],
    ids=["missing", "extra", "wrong-shape"],
)
def test_bad_tensors_are_named_and_nothing_is_written(edit, message, megatron_world, hf_checkpoints, tmp_path, capsys):
    _, hf_dir, _ = hf_checkpoints["moe-gqa"]
    source = broken_copy(hf_dir, tmp_path / "src", edit)
    assert convert("--load-dir", source, "--save-dir", tmp_path / "out") == 2
    error = error_lines(capsys)
    assert len(error) == 1 and re.search(message, error[0]), error
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.incomplete").exists()


def test_safetensors_whose_tensors_share_bytes_are_refused(megatron_world, hf_checkpoints, tmp_path, capsys):
    """A header pointing model.norm.weight at another tensor's bytes (it would be silently replaced)."""
    _, hf_dir, _ = hf_checkpoints["moe-gqa"]
    source = tmp_path / "src"
    shutil.copytree(hf_dir, source)
    path = source / "model.safetensors"
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + size]), raw[8 + size:]
    norm = header["model.norm.weight"]
    twin = next(name for name, info in header.items() if name not in ("model.norm.weight", "__metadata__")
                and info["shape"] == norm["shape"] and info["dtype"] == norm["dtype"])
    norm["data_offsets"] = header[twin]["data_offsets"]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    assert convert("--load-dir", source, "--save-dir", tmp_path / "out") == 2
    error = error_lines(capsys)
    assert len(error) == 1 and str(path) in error[0] and "overlaps the tensor stored before it" in error[0], error
    assert not (tmp_path / "out").exists()


def test_bad_directories(megatron_world, hf_checkpoints, tmp_path, capsys):
    _, hf_dir, _ = hf_checkpoints["dense-tied"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    assert convert("--load-dir", hf_dir, "--save-dir", tmp_path / "full") == 2
    assert "is not empty; choose another SAVE_DIR or pass --force" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    assert convert("--load-dir", hf_dir, "--save-dir", tmp_path / "full", "--force") == 0
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "release").is_dir()

    # SAVE_DIR at, inside or around the model being read would delete it: refused even with --force.
    source = tmp_path / "source"
    shutil.copytree(hf_dir, source)
    for save_dir in (source, source / "out", tmp_path):
        assert convert("--load-dir", source, "--save-dir", save_dir, "--force") == 2
        assert "writing there would destroy what is being read" in capsys.readouterr().err
    assert_same_tensors(hf_dir, source)

    llama = tmp_path / "llama"
    shutil.copytree(hf_dir, llama)
    config = json.loads((llama / "config.json").read_text())
    llama_config = config | {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (llama / "config.json").write_text(json.dumps(llama_config))
    assert convert("--load-dir", llama, "--save-dir", tmp_path / "x") == 2
    assert "unsupported architecture ['LlamaForCausalLM']" in capsys.readouterr().err

    assert convert("--mg2hf", "--load-dir", hf_dir, "--save-dir", tmp_path / "x") == 2
    assert "not a torch_dist checkpoint" in capsys.readouterr().err
    assert convert("--load-dir", hf_dir, "--save-dir", tmp_path / "x", "--model-size", "8B") == 2
    assert "MODEL_SIZE 8B does not match" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_torch_dist_of_another_model_is_refused(megatron_world, hf_checkpoints, tmp_path, capsys):
    _, dense_dir, _ = hf_checkpoints["dense-tied"]
    _, moe_dir, _ = hf_checkpoints["moe-gqa"]
    assert convert("--load-dir", dense_dir, "--save-dir", tmp_path / "mcore") == 0
    assert convert("--mg2hf", "--load-dir", tmp_path / "mcore", "--hf-dir", moe_dir, "--save-dir", tmp_path / "hf") == 2
    (error,) = error_lines(capsys)
    # The dense checkpoint has no MoE tensors; the first one the MoE config needs is named.
    assert error == (f"error: {tmp_path / 'mcore' / 'release'}: tensor decoder.layers.pre_mlp_layernorm.weight "
                     "is missing (checkpoint of another model?)")
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".hf.incomplete").exists()


def test_verify_prints_the_logit_difference(megatron_world, hf_checkpoints, tmp_path, capsys):
    _, hf_dir, _ = hf_checkpoints["moe-mqa-mixed-tied"]
    assert convert("--load-dir", hf_dir, "--save-dir", tmp_path / "mcore", "--precision", "fp32", "--verify") == 0
    assert "verify: fp32: max |dlogits| = " in capsys.readouterr().out


@pytest.mark.slow
def test_two_conversions_into_one_save_dir_leave_one_complete_output(hf_checkpoints, tmp_path):
    """Two writers race for SAVE_DIR: one converts, the other stops with one line; the output verifies."""
    _, hf_dir, _ = hf_checkpoints["moe-gqa"]
    command = [sys.executable, "-m", "megatron_patch.convert", "--load-dir", str(hf_dir), "--save-dir",
               str(tmp_path / "mcore"), "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    results = [(w.wait(timeout=300), w.stderr.read()) for w in writers]
    assert sorted(status for status, _ in results) == [0, 2], results
    (refusal,) = [err for status, err in results if status == 2]
    assert refusal.count("\n") == 1 and ("is being written by another process" in refusal
                                          or "is not empty" in refusal), refusal
    assert not list(tmp_path.glob(".mcore.incomplete*"))
    assert convert_main(["--mg2hf", "--load-dir", str(tmp_path / "mcore"), "--save-dir", str(tmp_path / "hf"),
                         "--precision", "fp32"]) == 0
    assert_same_tensors(hf_dir, tmp_path / "hf")
