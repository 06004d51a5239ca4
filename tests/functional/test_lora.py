"""LoRA fine-tuning end to end on CPU: frozen base, adapters trained, adapter-only checkpoints resumed,
adapters exported merged into HF and as a PEFT adapter."""

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.functional.test_training import (
    converted,
    losses,
    read_metrics,
    saved_weights_of,
    sft_data,
    sft_run_flags,
)
from tests.functional.torchrun import _run, torchrun, torchrun_module

pytestmark = pytest.mark.functional
LORA_FLAGS = ["--lora-rank", 8, "--lora-alpha", 16, "--lora-target-modules", "all", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lora"))


_RUNS: dict = {}


def lora_run(work, name, nproc=1, extra=(), iterations=5, preset="tiny-moe"):
    """A LoRA SFT run from a converted tiny model, once per name (later tests export its checkpoint)."""
    if (work, name) not in _RUNS:
        hf_dir, mcore = converted(work, preset)
        root = Path(work) / name
        flags = [*sft_run_flags(sft_data(work, 64), hf_dir, root / "log", iterations), *LORA_FLAGS,
                 "--load", mcore, "--save", root / "checkpoint", *extra]
        _RUNS[work, name] = root, torchrun_module(nproc, "megatron_patch.train", *flags)
    return _RUNS[work, name]


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
    from megatron_patch.checkpoints import CheckpointError, load_weights
    from megatron_patch.models.qwen3.builder import build_gpt_model
    from megatron_patch.models.qwen3.presets import get_preset

    with pytest.raises(CheckpointError, match="a LoRA checkpoint .rank 8 on linear_qkv"):
        load_weights(root / "checkpoint", [build_gpt_model(get_preset("tiny-moe"))])


def test_adapter_only_checkpoints_resume_exactly_and_ep2_trains_like_ep1(work):
    """EP=2: adapters sharded over experts; stop at 2 with an adapter-only save, resume, compare."""
    ep2 = ["--expert-model-parallel-size", 2, "--save-lora-only"]
    full_root, _ = lora_run(work, "ep2", nproc=2, extra=ep2)
    one_root, _ = lora_run(work, "full-save")
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


def first_grad_norm(root) -> float:
    return next(r["grad_norm"] for r in read_metrics(root / "log") if "grad_norm" in r)


@pytest.mark.parametrize("preset, baseline, name, layout", [
    ("tiny-dense", "dense-1", "dense-tp2-sp", ["--tensor-model-parallel-size", 2, "--sequence-parallel"]),
    ("tiny-moe", "full-save", "moe-etp2", ["--expert-tensor-parallel-size", 2]),
])
def test_tensor_parallel_lora_trains_like_one_process(work, preset, baseline, name, layout):
    """Dense TP=2 with SP: A whole and B split by rows on qkv/fc1, A split by columns and B whole
    on proj/fc2; expert TP=2: the experts' adapters split the same way, their whole factor's
    gradient summed over expert TP. The gradient norm sees every reduction."""
    one, _ = lora_run(work, baseline, preset=preset)
    two, _ = lora_run(work, name, nproc=2, preset=preset, extra=layout)
    expected, got = losses(one / "log"), losses(two / "log")
    assert expected[5] < expected[1] - 0.1
    assert got == pytest.approx(expected, abs=1e-4)
    assert first_grad_norm(two) == pytest.approx(first_grad_norm(one), rel=1e-6)


@pytest.mark.parametrize("preset, run, layout", [
    ("tiny-dense", "dense-1", ["--tp", 2]),
    ("tiny-moe", "full-save", ["--tp", 2, "--ep", 2, "--sp"]),
    ("tiny-moe", "full-save", ["--tp", 2, "--etp", 2, "--sp"]),
    ("tiny-moe", "full-save", ["--tp", 2, "--etp", 2, "--sp", "--transformer-impl", "local"]),
], ids=["dense-tp2", "moe-tp2-ep2-sp", "moe-tp2-etp2-sp-grouped", "moe-tp2-etp2-sp-sequential"])
def test_trained_adapters_load_and_save_at_tensor_parallel_layouts(work, tmp_path, preset, run, layout):
    """Adapters trained in one process, loaded at TP/ETP=2: the same logits, and saved again
    they are the same tensors ([gate; up] halves of fc1's B and the TP splits in place)."""
    root, _ = lora_run(work, run, preset=preset)
    hf_dir, mcore = converted(work, preset)
    flags = ["--hf-dir", hf_dir, "--torch-dist", mcore, "--lora-checkpoint", root / "checkpoint"]
    torchrun(1, "lora", *flags, "--out", tmp_path / "one.pt", "--save-dir", tmp_path / "one")
    torchrun(2, "lora", *flags, *layout, "--out", tmp_path / "two.pt", "--save-dir", tmp_path / "two")
    torch.testing.assert_close(torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt"), rtol=0, atol=1e-4)
    source = adapters(saved_weights_of(root / "checkpoint" / "iter_0000005"))
    for name in ("one", "two"):
        again = model_weights(saved_weights_of(tmp_path / name / "iter_0000001"))
        assert sorted(again) == sorted(source)
        for key, tensor in source.items():
            assert torch.equal(again[key], tensor), (name, key)


def export_lora(*args) -> str:
    return _run([sys.executable, "-m", "megatron_patch.lora", *map(str, args)], timeout=300).stdout


@pytest.fixture(scope="module")
def base_hf(work):
    """The converted base model back in HF form, fp32: the exact weights the adapters were trained on."""
    path = Path(work) / "base-hf"
    if not path.exists():
        _run([sys.executable, "-m", "megatron_patch.convert", "--mg2hf", "--load-dir", converted(work, "tiny-moe")[1],
              "--save-dir", path, "--precision", "fp32"], timeout=300)
    return path


def megatron_logits_with_adapters(work, checkpoint, tokens, targets=("all",)):
    """The training path's model: base from the converted checkpoint, adapters from the LoRA save."""
    from megatron_patch.lora.apply import apply_lora, is_adapter_key
    from megatron_patch.lora.config import LoraSettings
    from megatron_patch.models.logits import forward_logits
    from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
    from megatron_patch.models.qwen3.presets import get_preset
    from megatron_patch.training.checkpointing import load_checkpoint

    arch = get_preset("tiny-moe")
    model = build_gpt_model(arch, BuildOptions(precision="fp32", aux_loss_coeff=0.0))
    apply_lora([model], LoraSettings(8, 16.0, targets=targets))
    load_checkpoint(converted(work, "tiny-moe")[1], [model], None, None, load_optim=False,
                    keep=lambda key: not is_adapter_key(key))
    load_checkpoint(checkpoint, [model], None, None, load_optim=False, keep=is_adapter_key)
    return forward_logits([model.eval()], tokens, vocab_size=arch.vocab_size)


def hf_logits(path, tokens, peft_dir=None):
    from megatron_patch.models.qwen3.hf_model import load_hf_model

    model = load_hf_model(path)
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(peft_dir))
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_merged_hf_model_and_peft_adapter_give_the_megatron_logits(work, base_hf, megatron_world):
    root, _ = lora_run(work, "full-save")
    merged, peft_dir = Path(work) / "merged", Path(work) / "peft"
    printed = export_lora("--adapter", root / "checkpoint", "--merged-out", merged, "--peft-out", peft_dir,
                          "--precision", "fp32", "--hf-dir", base_hf, "--verify")
    assert "verify merged: fp32" in printed and "verify PEFT: fp32" in printed
    from megatron_patch.models.qwen3.presets import get_preset

    tokens = torch.randint(0, get_preset("tiny-moe").vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    ours = megatron_logits_with_adapters(work, root / "checkpoint", tokens)
    assert (ours - hf_logits(base_hf, tokens)).abs().max() > 0.1  # the adapters change the model
    torch.testing.assert_close(hf_logits(merged, tokens), ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(hf_logits(base_hf, tokens, peft_dir), ours, rtol=0, atol=1e-4)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    # Only the adapted weights changed in the merge.
    from safetensors.torch import load_file

    before, after = load_file(base_hf / "model.safetensors"), load_file(merged / "model.safetensors")
    assert sorted(before) == sorted(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= {name for name in before if name.endswith("_proj.weight")}  # not norms, router, embeddings
    assert {name for name in before if ".self_attn." in name and name.endswith("_proj.weight")} <= changed


def test_peft_adapter_of_expert_gate_up_only_loads(work, base_hf, megatron_world):
    """peft 0.21.2 mis-keys gate/up adapters of fused experts unless down_proj is adapted too:
    the export adds a zero down_proj adapter, so these adapters are applied, not silently dropped."""
    from megatron_patch.models.qwen3.presets import get_preset

    root, _ = lora_run(work, "gate-up", iterations=2, extra=["--lora-target-modules", "gate_proj"])
    peft_dir = Path(work) / "peft-gate-up"
    export_lora("--adapter", root / "checkpoint", "--peft-out", peft_dir, "--precision", "fp32")
    tokens = torch.randint(0, get_preset("tiny-moe").vocab_size, (1, 24), generator=torch.Generator().manual_seed(4))
    ours = megatron_logits_with_adapters(work, root / "checkpoint", tokens, targets=("linear_fc1",))
    assert (ours - hf_logits(base_hf, tokens)).abs().max() > 1e-3
    torch.testing.assert_close(hf_logits(base_hf, tokens, peft_dir), ours, rtol=0, atol=1e-4)


def test_an_adapter_trained_at_ep2_exports_as_at_ep1(work):
    """The EP=2 save holds adapters only: its base is the --load recorded at training time."""
    from safetensors.torch import load_file

    exports = {}
    for name, nproc, extra in (("ep2", 2, ["--expert-model-parallel-size", 2, "--save-lora-only"]),
                               ("full-save", 1, [])):
        root, _ = lora_run(work, name, nproc=nproc, extra=extra)
        out = Path(work) / f"export-{name}"
        export_lora("--adapter", root / "checkpoint", "--merged-out", out / "merged", "--peft-out", out / "peft",
                    "--precision", "fp32")
        exports[name] = {part: load_file(next((out / part).glob("*.safetensors"))) for part in ("merged", "peft")}
    for part in ("merged", "peft"):
        ep2, ep1 = exports["ep2"][part], exports["full-save"][part]
        assert sorted(ep2) == sorted(ep1)
        for name, tensor in ep1.items():
            # The adapters themselves differ by reduction order only (see the EP=2 training test).
            torch.testing.assert_close(ep2[name], tensor, rtol=0, atol=1e-4, msg=name)


def test_two_adapters_of_one_base_export_and_load_side_by_side(work, base_hf, megatron_world):
    """Two adapter-only saves trained from the same base (one at EP=2): each exports with the base
    it recorded, and peft holds both on one HF base, each giving its own Megatron logits."""
    from peft import PeftModel

    from megatron_patch.models.qwen3.hf_model import load_hf_model
    from megatron_patch.models.qwen3.presets import get_preset

    runs = {"task_a": lora_run(work, "ep2", nproc=2, extra=["--expert-model-parallel-size", 2, "--save-lora-only"])[0],
            "task_b": lora_run(work, "refused", extra=["--save-lora-only"], iterations=1)[0]}
    for name, root in runs.items():
        export_lora("--adapter", root / "checkpoint", "--peft-out", Path(work) / f"side-{name}", "--precision", "fp32")
    model = PeftModel.from_pretrained(load_hf_model(base_hf), str(Path(work) / "side-task_a"), adapter_name="task_a")
    model.load_adapter(str(Path(work) / "side-task_b"), adapter_name="task_b")
    tokens = torch.randint(0, get_preset("tiny-moe").vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    expected = {name: megatron_logits_with_adapters(work, root / "checkpoint", tokens) for name, root in runs.items()}
    assert (expected["task_a"] - expected["task_b"]).abs().max() > 1e-2
    for name in runs:
        model.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=tokens).logits, expected[name], rtol=0, atol=1e-4, msg=name)


def test_export_refuses_what_it_cannot_export(work):
    _, mcore = converted(work, "tiny-moe")
    with pytest.raises(AssertionError, match="not a LoRA checkpoint"):
        export_lora("--adapter", mcore, "--peft-out", Path(work) / "never")
    root, _ = lora_run(work, "refused", extra=["--save-lora-only"], iterations=1)
    with pytest.raises(AssertionError, match="base checkpoint .*missing-base does not exist"):
        export_lora("--adapter", root / "checkpoint", "--merged-out", Path(work) / "never",
                    "--base", Path(work) / "missing-base")
    assert not (Path(work) / "never").exists()
