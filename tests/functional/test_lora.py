"""LoRA fine-tuning end to end on CPU: frozen base, adapters trained, adapter-only checkpoints resumed,
adapters exported merged into HF and as a PEFT adapter."""

import functools
import json
import sys
from pathlib import Path

import pytest
import torch

from megatron_patch.lora.__main__ import main as lora_main
from tests.functional.test_training import (
    converted,
    losses,
    read_metrics,
    saved_weights_of,
    sft_data,
    sft_run_flags,
)
from tests.functional.torchrun import _run, torchrun_batch, torchrun_module

pytestmark = pytest.mark.functional
LORA_FLAGS = ["--lora-rank", 8, "--lora-alpha", 16, "--lora-target-modules", "all", "--lr", "1e-2"]


# Steps of the runs that are compared: the loss falls by > 0.1 in them (lr 1e-2).
STEPS = 4
LAST = f"iter_{STEPS:07d}"

# name: (processes, preset, flags after the common LoRA ones, iterations). Runs of one process
# count run one after another in one torchrun launch (tests/functional/workers/batch.py).
EP2_ADAPTERS_ONLY = ["--expert-model-parallel-size", 2, "--save-lora-only"]
LORA_RUNS = {
    "full-save": (1, "tiny-moe", [], STEPS),
    "dense-1": (1, "tiny-dense", [], STEPS),
    "gate-up": (1, "tiny-moe", ["--lora-target-modules", "gate_proj"], 2),
    "refused": (1, "tiny-moe", ["--save-lora-only"], 1),
    "ep2": (2, "tiny-moe", EP2_ADAPTERS_ONLY, STEPS),
    "resume": (2, "tiny-moe", [*EP2_ADAPTERS_ONLY, "--exit-interval", 2], STEPS),
    "dense-tp2-sp": (2, "tiny-dense", ["--tensor-model-parallel-size", 2, "--sequence-parallel"], STEPS),
    "moe-etp2": (2, "tiny-moe", ["--expert-tensor-parallel-size", 2], STEPS),
    # HF in and out: --load the HF directory itself; the merged model and the PEFT adapter at the end.
    "hf-in-out": (1, "tiny-moe", ["--save-lora-only"], 2),
}


def lora_root(work, name) -> Path:
    return Path(work) / "lora" / name


def lora_flags(work, name, log="log") -> list:
    _, preset, extra, iterations = LORA_RUNS[name]
    hf_dir, mcore = converted(work, preset)
    root = lora_root(work, name)
    start = ["--load", hf_dir, "--save-hf", root / "hf", "--save-peft", root / "peft"] if name == "hf-in-out" \
        else ["--load", mcore]
    return [*sft_run_flags(sft_data(work, 64), hf_dir, root / log, iterations), *LORA_FLAGS,
            *start, "--save", root / "checkpoint", *extra]


# Runs whose tests are in make test-slow, in a batch of their own.
SLOW_RUNS = {"hf-in-out"}


@functools.cache
def _lora_runs(work, nproc, slow: bool = False) -> dict[str, str]:
    jobs = {name: ("train", lora_flags(work, name)) for name, spec in LORA_RUNS.items()
            if spec[0] == nproc and (name in SLOW_RUNS) == slow}
    if slow:
        return torchrun_batch(nproc, jobs, Path(work) / "lora" / f"batch-{nproc}-slow")
    if nproc == 1:
        # After "refused" wrote its adapter-only save: that save given as the base must be refused.
        hf_dir, _ = converted(work, "tiny-moe")
        jobs["refused-as-base"] = ("train", [*sft_run_flags(sft_data(work, 64), hf_dir, lora_root(work, "again"), 1),
                                             *LORA_FLAGS, "--load", lora_root(work, "refused") / "checkpoint"])
    return torchrun_batch(nproc, jobs, Path(work) / "lora" / f"batch-{nproc}")


def lora_run(work, name) -> tuple[Path, str]:
    """(run directory, rank 0's output) of a LoRA SFT run from a converted tiny model."""
    return lora_root(work, name), _lora_runs(work, LORA_RUNS[name][0], name in SLOW_RUNS)[name]


def model_weights(weights: dict) -> dict:
    """Without optimizer state (the distributed optimizer's keys start with optimizer. or chained_N.)."""
    return {k: v for k, v in weights.items() if ".optimizer." not in k and not k.startswith("optimizer.")}


def adapters(weights: dict) -> dict:
    return {k: v for k, v in weights.items() if ".adapter." in k}


def test_lora_trains_adapters_and_leaves_every_base_weight_bitwise_unchanged(work, megatron_world):
    root, output = lora_run(work, "full-save")
    assert "LoRA rank 8, alpha 16, dropout 0 on linear_qkv linear_proj linear_fc1 linear_fc2" in output
    curve = losses(root / "log")
    assert curve[STEPS] < curve[1] - 0.1, curve
    start = saved_weights_of(Path(converted(work, "tiny-moe")[1]) / "release")
    saved = saved_weights_of(root / "checkpoint" / LAST)
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
    full_root, _ = lora_run(work, "ep2")
    one_root, _ = lora_run(work, "full-save")
    full = losses(full_root / "log")
    assert full == pytest.approx(losses(one_root / "log"), abs=1e-5)
    saved = model_weights(saved_weights_of(full_root / "checkpoint" / LAST))
    assert saved and set(saved) == set(adapters(saved))  # adapters only: no base weight written
    assert not (full_root / "checkpoint" / "config.json").exists()  # not an HF-convertible model
    reference = adapters(saved_weights_of(one_root / "checkpoint" / LAST))
    assert sorted(reference) == sorted(saved)
    for key, tensor in reference.items():
        # Adam divides by sqrt(v): for the few entries whose gradients are near zero, the other
        # reduction order of EP moves the update by up to 1.3e-5 (of weights ~0.15) in 5 steps.
        # A wrong reduction (e.g. stale or unreduced shards) is off by ~1e-2.
        torch.testing.assert_close(saved[key], tensor, rtol=0, atol=1e-4, msg=key)

    root, _ = lora_run(work, "resume")
    flags = lora_flags(work, "resume")
    del flags[flags.index("--exit-interval"):flags.index("--exit-interval") + 2]
    result = torchrun_module(2, "megatron_patch.train", *flags, "--lora-load", root / "checkpoint")
    assert "resuming at iteration 2" in result.stdout
    resumed = losses(root / "log")
    assert list(resumed) == list(range(1, STEPS + 1))
    for iteration in range(3, STEPS + 1):
        assert abs(resumed[iteration] - full[iteration]) < 1e-6, (iteration, resumed, full)


def test_an_adapter_checkpoint_is_refused_as_base(work):
    output = _lora_runs(work, 1)["refused-as-base"]
    assert "error: --load " in output and "holds LoRA adapters only; give the base model as --load" in output


def first_grad_norm(root) -> float:
    return next(r["grad_norm"] for r in read_metrics(root / "log") if "grad_norm" in r)


@pytest.mark.parametrize("baseline, name", [("dense-1", "dense-tp2-sp"), ("full-save", "moe-etp2")])
def test_tensor_parallel_lora_trains_like_one_process(work, baseline, name):
    """Dense TP=2 with SP: A whole and B split by rows on qkv/fc1, A split by columns and B whole
    on proj/fc2; expert TP=2: the experts' adapters split the same way, their whole factor's
    gradient summed over expert TP. The gradient norm sees every reduction."""
    one, _ = lora_run(work, baseline)
    two, _ = lora_run(work, name)
    expected, got = losses(one / "log"), losses(two / "log")
    assert expected[STEPS] < expected[1] - 0.1
    assert got == pytest.approx(expected, abs=1e-4)
    assert first_grad_norm(two) == pytest.approx(first_grad_norm(one), rel=1e-6)


# id: (LoRA run whose adapters are loaded, layout of the 2-process load)
ADAPTER_LAYOUTS = {
    "dense-tp2": ("dense-1", ["--tp", 2]),
    "moe-tp2-ep2-sp": ("full-save", ["--tp", 2, "--ep", 2, "--sp"]),
    "moe-tp2-etp2-sp-grouped": ("full-save", ["--tp", 2, "--etp", 2, "--sp"]),
    "moe-tp2-etp2-sp-sequential": ("full-save", ["--tp", 2, "--etp", 2, "--sp", "--transformer-impl", "local"]),
}


def _adapter_check_flags(work, run) -> list:
    hf_dir, mcore = converted(work, LORA_RUNS[run][1])
    return ["--hf-dir", hf_dir, "--torch-dist", mcore, "--lora-checkpoint", lora_root(work, run) / "checkpoint"]


@functools.cache
def _adapter_layout_checks(work) -> Path:
    """Each run's adapters loaded in one process, then at each 2-process layout: two launches in all."""
    folder = Path(work) / "adapter-layouts"
    one = {run: ("check", ["lora", *_adapter_check_flags(work, run), "--out", folder / run / "logits.pt",
                           "--save-dir", folder / run / "saved"])
           for run in {run for run, _ in ADAPTER_LAYOUTS.values()}}
    two = {name: ("check", ["lora", *_adapter_check_flags(work, run), *layout, "--out", folder / name / "logits.pt",
                            "--save-dir", folder / name / "saved"])
           for name, (run, layout) in ADAPTER_LAYOUTS.items()}
    for name in (*one, *two):
        (folder / name).mkdir(parents=True, exist_ok=True)
    for run in one:
        lora_run(work, run)
    torchrun_batch(1, one, folder / "batch-1")
    torchrun_batch(2, two, folder / "batch-2")
    return folder


@pytest.mark.slow  # loads at four TP/ETP layouts in 2-process batches (~45 s): make test-slow
@pytest.mark.parametrize("layout", ADAPTER_LAYOUTS)
def test_trained_adapters_load_and_save_at_tensor_parallel_layouts(work, layout):
    """Adapters trained in one process, loaded at TP/ETP=2: the same logits, and saved again
    they are the same tensors ([gate; up] halves of fc1's B and the TP splits in place)."""
    run = ADAPTER_LAYOUTS[layout][0]
    folder = _adapter_layout_checks(work)
    one, two = folder / run, folder / layout
    torch.testing.assert_close(torch.load(two / "logits.pt"), torch.load(one / "logits.pt"), rtol=0, atol=1e-4)
    source = adapters(saved_weights_of(lora_root(work, run) / "checkpoint" / LAST))
    for where in (one, two):
        again = model_weights(saved_weights_of(where / "saved" / "iter_0000001"))
        assert sorted(again) == sorted(source)
        for key, tensor in source.items():
            assert torch.equal(again[key], tensor), (where.name, key)


def export_lora(*args) -> str:
    """python -m megatron_patch.lora as a process of its own: what a user runs."""
    return _run([sys.executable, "-m", "megatron_patch.lora", *map(str, args)], timeout=300).stdout


def export_lora_here(capsys, *args) -> str:
    """The same entry point in this process (saves a process start per export); raises on failure."""
    status = lora_main([str(a) for a in args])
    out, err = capsys.readouterr()
    if status:
        raise AssertionError(f"python -m megatron_patch.lora exited {status}: {err}")
    return out


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


@pytest.mark.slow  # one more LoRA run and two exports: make test-slow
def test_a_lora_run_from_an_hf_directory_writes_the_merged_model_and_peft_adapter_at_the_end(work, capsys):
    """--load HF, --save-lora-only, --save-hf, --save-peft: the outputs equal, byte for byte, what the
    export makes of the final adapter-only save on that HF base, and compute what peft computes."""
    root, output = lora_run(work, "hf-in-out")
    hf_dir, _ = converted(work, "tiny-moe")
    assert f"loaded {hf_dir} (HF model directory" in output
    assert f"saved HF model {root / 'hf'}" in output and f"saved PEFT adapter {root / 'peft'}" in output
    merged, peft_dir = Path(work) / "hf-in-out-merged", Path(work) / "hf-in-out-peft"
    # The adapter-only save records the HF directory as its base: the export reads it from there.
    export_lora_here(capsys, "--adapter", root / "checkpoint", "--merged-out", merged, "--peft-out", peft_dir,
                     "--precision", "fp32", "--hf-dir", hf_dir)
    assert (root / "hf" / "model.safetensors").read_bytes() == (merged / "model.safetensors").read_bytes()
    assert (root / "peft" / "adapter_model.safetensors").read_bytes() == \
        (peft_dir / "adapter_model.safetensors").read_bytes()
    from megatron_patch.models.qwen3.presets import get_preset

    tokens = torch.randint(0, get_preset("tiny-moe").vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with_peft = hf_logits(hf_dir, tokens, root / "peft")
    assert (with_peft - hf_logits(hf_dir, tokens)).abs().max() > 1e-3  # the adapters change the model
    torch.testing.assert_close(hf_logits(root / "hf", tokens), with_peft, rtol=0, atol=1e-4)


def test_peft_adapter_of_expert_gate_up_only_loads(work, base_hf, megatron_world, capsys):
    """peft 0.21.2 mis-keys gate/up adapters of fused experts unless down_proj is adapted too:
    the export adds a zero down_proj adapter, so these adapters are applied, not silently dropped."""
    from megatron_patch.models.qwen3.presets import get_preset

    root, _ = lora_run(work, "gate-up")
    peft_dir = Path(work) / "peft-gate-up"
    export_lora_here(capsys, "--adapter", root / "checkpoint", "--peft-out", peft_dir, "--precision", "fp32")
    tokens = torch.randint(0, get_preset("tiny-moe").vocab_size, (1, 24), generator=torch.Generator().manual_seed(4))
    ours = megatron_logits_with_adapters(work, root / "checkpoint", tokens, targets=("linear_fc1",))
    assert (ours - hf_logits(base_hf, tokens)).abs().max() > 1e-3
    torch.testing.assert_close(hf_logits(base_hf, tokens, peft_dir), ours, rtol=0, atol=1e-4)


def test_an_adapter_trained_at_ep2_exports_as_at_ep1(work, megatron_world, capsys):
    """The EP=2 save holds adapters only: its base is the --load recorded at training time."""
    from safetensors.torch import load_file

    exports = {}
    for name in ("ep2", "full-save"):
        root, _ = lora_run(work, name)
        out = Path(work) / f"export-{name}"
        export_lora_here(capsys, "--adapter", root / "checkpoint", "--merged-out", out / "merged",
                         "--peft-out", out / "peft", "--precision", "fp32")
        exports[name] = {part: load_file(next((out / part).glob("*.safetensors"))) for part in ("merged", "peft")}
    for part in ("merged", "peft"):
        ep2, ep1 = exports["ep2"][part], exports["full-save"][part]
        assert sorted(ep2) == sorted(ep1)
        for name, tensor in ep1.items():
            # The adapters themselves differ by reduction order only (see the EP=2 training test).
            torch.testing.assert_close(ep2[name], tensor, rtol=0, atol=1e-4, msg=name)


def test_two_adapters_of_one_base_export_and_load_side_by_side(work, base_hf, megatron_world, capsys):
    """Two adapter-only saves trained from the same base (one at EP=2): each exports with the base
    it recorded, and peft holds both on one HF base, each giving its own Megatron logits."""
    from peft import PeftModel

    from megatron_patch.models.qwen3.hf_model import load_hf_model
    from megatron_patch.models.qwen3.presets import get_preset

    runs = {"task_a": lora_run(work, "ep2")[0], "task_b": lora_run(work, "refused")[0]}
    for name, root in runs.items():
        export_lora_here(capsys, "--adapter", root / "checkpoint", "--peft-out", Path(work) / f"side-{name}",
                         "--precision", "fp32")
    model = PeftModel.from_pretrained(load_hf_model(base_hf), str(Path(work) / "side-task_a"), adapter_name="task_a")
    model.load_adapter(str(Path(work) / "side-task_b"), adapter_name="task_b")
    tokens = torch.randint(0, get_preset("tiny-moe").vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    expected = {name: megatron_logits_with_adapters(work, root / "checkpoint", tokens) for name, root in runs.items()}
    assert (expected["task_a"] - expected["task_b"]).abs().max() > 1e-2
    for name in runs:
        model.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=tokens).logits, expected[name], rtol=0, atol=1e-4, msg=name)


def test_export_refuses_what_it_cannot_export(work, megatron_world, capsys):
    _, mcore = converted(work, "tiny-moe")
    with pytest.raises(AssertionError, match="not a LoRA checkpoint"):
        export_lora_here(capsys, "--adapter", mcore, "--peft-out", Path(work) / "never")
    root, _ = lora_run(work, "refused")
    with pytest.raises(AssertionError, match="base checkpoint .*missing-base does not exist"):
        export_lora_here(capsys, "--adapter", root / "checkpoint", "--merged-out", Path(work) / "never",
                         "--base", Path(work) / "missing-base")
    assert not (Path(work) / "never").exists()
