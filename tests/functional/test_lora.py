"""LoRA fine-tuning end to end on CPU: frozen base, adapters trained, adapter-only checkpoints resumed."""

from pathlib import Path

import pytest
import torch

from tests.functional.test_training import converted, losses, saved_weights_of, sft_data, sft_run_flags
from tests.functional.torchrun import torchrun_module

pytestmark = pytest.mark.functional
LORA_FLAGS = ["--lora-rank", 8, "--lora-alpha", 16, "--lora-target-modules", "all", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lora"))


def lora_run(work, name, nproc=1, extra=(), iterations=5):
    hf_dir, mcore = converted(work, "tiny-moe")
    root = Path(work) / name
    flags = [*sft_run_flags(sft_data(work, 64), hf_dir, root / "log", iterations), *LORA_FLAGS,
             "--load", mcore, "--save", root / "checkpoint", *extra]
    return root, torchrun_module(nproc, "megatron_patch.train", *flags)


def model_weights(weights: dict) -> dict:
    """Without optimizer state (the distributed optimizer's keys start with optimizer. or chained_N.)."""
    return {k: v for k, v in weights.items() if ".optimizer." not in k and not k.startswith("optimizer.")}


def adapters(weights: dict) -> dict:
    return {k: v for k, v in weights.items() if ".adapter." in k}


def test_lora_trains_adapters_and_leaves_every_base_weight_bitwise_unchanged(work, megatron_world):
    root, result = lora_run(work, "full-save")
    assert "LoRA rank 8, alpha 16, dropout 0 on linear_qkv linear_proj linear_fc1 linear_fc2" in result.stdout
    curve = losses(root / "log")
    assert curve[5] < curve[1] - 0.1, curve
    start = saved_weights_of(Path(converted(work, "tiny-moe")[1]) / "release")
    saved = saved_weights_of(root / "checkpoint" / "iter_0000005")
    trained = adapters(saved)
    # q/k/v, o, and each of 8 experts' fc1/fc2 in each of 4 layers: layers and experts are axes of one key.
    assert len(trained) == 2 * 2 + 2 * 2
    for key, tensor in start.items():
        assert torch.equal(saved[key], tensor), key
    assert set(saved) - set(start) == set(trained)
    # B starts at zero; training moved every B.
    for key, tensor in trained.items():
        if key.endswith("linear_out.weight"):
            assert tensor.abs().amax() > 0, key
    # A model without adapters (e.g. evaluation's) must not load it as if it were the base model.
    from megatron_patch.models.qwen3.builder import build_gpt_model
    from megatron_patch.models.qwen3.presets import get_preset
    from megatron_patch.training.checkpointing import CheckpointError, load_weights

    with pytest.raises(CheckpointError, match="a LoRA checkpoint .rank 8 on linear_qkv"):
        load_weights(root / "checkpoint", [build_gpt_model(get_preset("tiny-moe"))])


def test_adapter_only_checkpoints_resume_exactly_and_ep2_trains_like_ep1(work):
    """EP=2: adapters sharded over experts; stop at 2 with an adapter-only save, resume, compare."""
    ep2 = ["--expert-model-parallel-size", 2, "--save-lora-only"]
    full_root, _ = lora_run(work, "ep2", nproc=2, extra=ep2)
    one_root, _ = lora_run(work, "ep1")
    full = losses(full_root / "log")
    assert full == pytest.approx(losses(one_root / "log"), abs=1e-5)
    saved = model_weights(saved_weights_of(full_root / "checkpoint" / "iter_0000005"))
    assert saved and set(saved) == set(adapters(saved))  # adapters only: no base weight written
    assert not (full_root / "checkpoint" / "config.json").exists()  # not an HF-convertible model
    reference = adapters(saved_weights_of(one_root / "checkpoint" / "iter_0000005"))
    assert sorted(reference) == sorted(saved)
    for key, tensor in reference.items():
        # Adam divides by sqrt(v): for the few entries whose gradients are near zero, the other
        # reduction order of EP moves the update by up to 1.3e-5 (of weights ~0.15) in 5 steps.
        # A wrong reduction (e.g. stale or unreduced shards) is off by ~1e-2.
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=1e-4, msg=key)

    root, _ = lora_run(work, "resume", nproc=2, extra=[*ep2, "--exit-interval", 2])
    hf_dir, mcore = converted(work, "tiny-moe")
    flags = [*sft_run_flags(sft_data(work, 64), hf_dir, root / "log"), *LORA_FLAGS, *ep2, "--load", mcore,
             "--lora-load", root / "checkpoint", "--save", root / "checkpoint"]
    result = torchrun_module(2, "megatron_patch.train", *flags)
    assert "resuming at iteration 2" in result.stdout
    resumed = losses(root / "log")
    assert list(resumed) == [1, 2, 3, 4, 5]
    for iteration in (3, 4, 5):
        assert abs(resumed[iteration] - full[iteration]) < 1e-6, (iteration, resumed, full)


def test_an_adapter_checkpoint_is_refused_as_base(work):
    root, _ = lora_run(work, "refused", extra=["--save-lora-only"], iterations=1)
    hf_dir, _ = converted(work, "tiny-moe")
    flags = [*sft_run_flags(sft_data(work, 64), hf_dir, root / "again", 1), *LORA_FLAGS, "--load", root / "checkpoint"]
    with pytest.raises(AssertionError, match="holds LoRA adapters only; give the base model as --load"):
        torchrun_module(1, "megatron_patch.train", *flags)
