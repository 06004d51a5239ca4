"""The training loop end to end on CPU: torchrun/gloo processes, the real trainer, real data files."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir
from tests.functional.torchrun import REPO, torchrun_batch, torchrun_module

pytestmark = pytest.mark.functional
DEMO_DATA = REPO / "megatron_patch" / "resources" / "demo_sft.jsonl"


def _build(module, *args):
    subprocess.run([sys.executable, "-m", module, *map(str, args)], check=True, capture_output=True, cwd=REPO)


@functools.cache
def sft_data(root: str, records: int, packing: bool = True) -> str:
    """build_sft output (seq 128) of the first ``records`` bundled conversations; the JSONL is beside it."""
    folder = Path(root) / f"sft{records}{'' if packing else '-unpacked'}"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "train.jsonl"
    source.write_text("".join(DEMO_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:records]))
    _build("megatron_patch.data.build_sft", "--input", source, "--tokenizer", bundled_qwen3_tokenizer_dir(),
           "--seq-length", 128, "--output-prefix", folder / "sft", *(["--packing"] if packing else []))
    return str(folder / "sft")


def read_metrics(log_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(log_dir) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(log_dir) if "loss" in r}


LAYOUT_FLAGS = {
    "moe-1": (1, "tiny-moe", []),
    "moe-dp2": (2, "tiny-moe", []),
    "moe-ep2": (2, "tiny-moe", ["--expert-model-parallel-size", 2]),
    # Expert TP without TP: expert gradients reduce over their own data-parallel group
    # (patches/expert_grads.py), which Megatron-Core 0.16.1 would take for the dense one.
    "moe-etp2": (2, "tiny-moe", ["--expert-tensor-parallel-size", 2]),
    "moe-pp2": (2, "tiny-moe", ["--pipeline-model-parallel-size", 2]),
    # Two chunks of one layer per stage (interleaved schedule), and stages of 1 and 3 layers.
    "moe-pp2-vp": (2, "tiny-moe", ["--pipeline-model-parallel-size", 2, "--num-layers-per-virtual-pipeline-stage", 1]),
    "moe-pp2-first1": (2, "tiny-moe", ["--pipeline-model-parallel-size", 2, "--decoder-first-pipeline-num-layers", 1]),
    "moe-recompute": (1, "tiny-moe", ["--recompute", "full", "--recompute-num-layers", 2]),
    "moe-sel": (1, "tiny-moe", ["--recompute", "sel"]),
    # AC=offload without Transformer-Engine: PyTorch's save_on_cpu around the first 2 layers (exactly AC=none).
    "moe-offload": (1, "tiny-moe", ["--recompute", "offload", "--recompute-num-layers", 2]),
    # The default overlaps the distributed optimizer's parameter all-gather; this one does not.
    "moe-dp2-sync": (2, "tiny-moe", ["--no-overlap-param-gather", "--no-overlap-grad-reduce"]),
    # Two samples per micro-batch (the aux loss is per micro-batch, so this is its own baseline).
    "moe-mbs2": (1, "tiny-moe", ["--micro-batch-size", 2]),
    # Megatron-Core's stock local spec (DotProductAttention with a block mask, SequentialMLP) against
    # the default torch modules (THD varlen attention, grouped experts).
    "moe-local-mbs2": (1, "tiny-moe", ["--transformer-impl", "local", "--micro-batch-size", 2]),
    # Two packed samples flattened into one THD sequence, sent between pipeline stages.
    "moe-pp2-mbs2": (2, "tiny-moe", ["--pipeline-model-parallel-size", 2, "--micro-batch-size", 2]),
    "dense-1": (1, "tiny-dense", []),
    "dense-tp2": (2, "tiny-dense", ["--tensor-model-parallel-size", 2]),
    # Sequence parallelism on the local norms (patches/torch_norm.py); MoE with TP and EP requires it.
    "dense-tp2-sp": (2, "tiny-dense", ["--tensor-model-parallel-size", 2, "--sequence-parallel"]),
    "moe-tp2-ep2-sp": (2, "tiny-moe", ["--tensor-model-parallel-size", 2, "--expert-model-parallel-size", 2,
                                       "--sequence-parallel"]),
}


# The layouts whose saved weights a test reads (the others skip the save).
SAVED_LAYOUTS = ("moe-dp2", "moe-dp2-sync")

# Top-k routing is discrete: TP's reductions add in another order, a few near-tied tokens pick
# another expert (seen: 2 of 16 micro-batch losses differ by 1e-6 at step 1) and the curves drift
# apart by up to 2e-3 in 5 steps. So MoE with TP gets a looser bound than layouts that compute
# every token's arithmetic the same way.
ROUTING_DRIFT = 5e-3

# Layouts checked in make test-slow (CI), each against its baseline in batches of their own; the
# others keep make test under 10 minutes. name: baseline.
SLOW_LAYOUTS = {"moe-pp2-vp": "moe-1", "moe-pp2-first1": "moe-1", "moe-sel": "moe-1", "moe-local-mbs2": "moe-mbs2",
                "moe-pp2-mbs2": "moe-mbs2", "dense-tp2": "dense-1"}
# The layouts make test runs: those compared there, and the synchronous one the overlap test reads.
FAST_LAYOUTS = [("moe-dp2", "moe-1", 1e-4), ("moe-ep2", "moe-1", 1e-4), ("moe-etp2", "moe-1", 1e-4),
                ("moe-pp2", "moe-1", 1e-4), ("moe-recompute", "moe-1", 1e-4), ("moe-offload", "moe-1", 1e-12),
                ("moe-tp2-ep2-sp", "moe-1", ROUTING_DRIFT), ("dense-tp2-sp", "dense-1", 1e-4)]
# Runs started from the HF directory itself (--load HF): the same curve as from its torch_dist
# conversion, exactly (the HF weights are bf16, so the conversion loses nothing).
HF_START_LAYOUTS = ("moe-1", "moe-pp2", "moe-tp2-ep2-sp")
_FAST_BATCH = {*(name for pair in FAST_LAYOUTS for name in pair[:2]), "moe-dp2-sync",
               *(f"{name}-hf" for name in HF_START_LAYOUTS)}

# Enough steps for curves to separate if a layout computed anything differently (the first gradient
# norm, compared too, sees every reduction); each step costs ~1 s per run.
ITERATIONS = 2
# The resume test's first half stops here; the rerun continues to ITERATIONS.
RESUME_AFTER = 1


def sft_run_flags(data, model, log_dir, iterations=ITERATIONS):
    return ["--model", model, "--precision", "fp32", "--train-mode", "finetune", "--data-path", data, "--sft-packing",
            "--seq-length", 128, "--global-batch-size", 2, "--micro-batch-size", 1, "--lr", "3e-3", "--min-lr", "3e-4",
            "--train-iters", iterations, "--split", "100,0,0", "--log-dir", log_dir]


@functools.cache
def converted(work: str, preset: str) -> tuple[str, str]:
    """(HF dir, its torch_dist conversion): a start that is the same in every layout.

    Random initialisation is not layout-independent in Megatron-Core (expert and pipeline-stage
    weights draw from per-rank RNG streams), so the layouts start from the same checkpoint.
    """
    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint
    from megatron_patch.models.qwen3.presets import get_preset

    hf_dir, mcore = Path(work) / f"{preset}-hf", Path(work) / f"{preset}-mcore"
    save_random_hf_checkpoint(get_preset(preset), hf_dir, dtype=torch.bfloat16)
    _build("megatron_patch.convert", "--load-dir", hf_dir, "--save-dir", mcore)
    return str(hf_dir), str(mcore)


def _layout_folder(work: str, slow: bool) -> Path:
    return Path(work) / ("layouts-slow" if slow else "layouts")


@functools.cache
def _layout_runs(work: str, nproc: int, slow: bool) -> dict[str, str]:
    """Every job of ``nproc`` processes, one after another in one torchrun launch: the layouts, and
    the other runs of that size below (raw JSON vs idxmap, pretraining, the first half of a resume).
    ``slow``: the SLOW_LAYOUTS and their baselines instead."""
    in_batch = {*SLOW_LAYOUTS, *SLOW_LAYOUTS.values()} if slow else _FAST_BATCH
    folder = _layout_folder(work, slow)
    jobs = {}
    for name, (procs, preset, extra) in LAYOUT_FLAGS.items():
        hf_dir, mcore = converted(work, preset)
        for run, load in ((name, mcore), (f"{name}-hf", hf_dir)):
            if procs == nproc and run in in_batch:
                save = ["--save", folder / run / "checkpoint", "--no-save-optim"] if run in SAVED_LAYOUTS else []
                jobs[run] = ("train", [*sft_run_flags(sft_data(work, 64), hf_dir, folder / run), "--load", load,
                                       *save, *extra])
    if nproc == 1:
        jobs.update(raw_and_idxmap_jobs(work) if slow else {"pretrain": pretraining_job(work)})
    elif not slow:
        jobs["resume-first-half"] = resume_job(work, True)
    return torchrun_batch(nproc, jobs, folder / f"batch-{nproc}")


def layout_curve(work: str, name: str, slow: bool = False) -> dict[int, float]:
    _layout_runs(work, LAYOUT_FLAGS[name.removesuffix("-hf")][0], slow)
    return losses(_layout_folder(work, slow) / name)


def saved_weights(work: str, name: str) -> dict:
    """Every model tensor of the layout run's final checkpoint."""
    return saved_weights_of(Path(work) / "layouts" / name / "checkpoint" / f"iter_{ITERATIONS:07d}")


def saved_weights_of(path) -> dict:
    from megatron_patch.checkpoints import TorchDistCheckpoint

    checkpoint = TorchDistCheckpoint(path)
    weights = {}
    for key, entry in checkpoint.tensors.items():
        if not key.startswith("optimizer."):
            shape = tuple(entry.size)
            weights[key] = checkpoint.read(key, (0,) * len(shape), shape, torch.float32)
    return weights



@pytest.mark.parametrize("name, baseline, tolerance", [
    *FAST_LAYOUTS,
    *(pytest.param(name, baseline, 1e-4, marks=pytest.mark.slow) for name, baseline in SLOW_LAYOUTS.items()),
])
def test_parallel_layouts_give_the_one_process_loss_curve(work, name, baseline, tolerance):
    slow = name in SLOW_LAYOUTS
    expected, got = layout_curve(work, baseline, slow), layout_curve(work, name, slow)
    assert sorted(got) == sorted(expected) == list(range(1, ITERATIONS + 1))
    assert expected[ITERATIONS] < expected[1]
    for iteration in expected:
        assert abs(got[iteration] - expected[iteration]) < tolerance, (iteration, got, expected)
    if tolerance < ROUTING_DRIFT:
        # The first gradient norm sees every gradient reduction (e.g. norm weights under SP, which
        # Adam's normalised step would hide from the losses).
        norms = [first_grad_norm(_layout_folder(work, slow) / n) for n in (name, baseline)]
        assert norms[0] == pytest.approx(norms[1], rel=1e-6), norms


@pytest.mark.parametrize("name", HF_START_LAYOUTS)
def test_a_run_started_from_the_hf_directory_equals_one_started_from_its_conversion(work, name):
    from_hf, from_torch_dist = layout_curve(work, f"{name}-hf"), layout_curve(work, name)
    assert sorted(from_hf) == list(range(1, ITERATIONS + 1))
    assert from_hf == from_torch_dist
    folder = _layout_folder(work, False)
    assert first_grad_norm(folder / f"{name}-hf") == first_grad_norm(folder / name)
    assert "HF model directory, read from its safetensors" in (folder / f"batch-{LAYOUT_FLAGS[name][0]}" /
                                                               f"{name}-hf.out").read_text()


def first_grad_norm(log_dir: Path) -> float:
    return read_metrics(log_dir)[0]["grad_norm"]


def test_overlapped_parameter_gather_trains_and_saves_like_the_synchronous_one(work):
    """With overlap each rank holds stale weights between the step and the next forward; saves must not."""
    overlapped, synchronous = layout_curve(work, "moe-dp2"), layout_curve(work, "moe-dp2-sync")
    assert overlapped == pytest.approx(synchronous, abs=1e-6)
    got, expected = saved_weights(work, "moe-dp2"), saved_weights(work, "moe-dp2-sync")
    assert sorted(got) == sorted(expected) and len(got) > 10
    start = saved_weights_of(Path(converted(work, "tiny-moe")[1]) / "release")
    moved = 0
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-6, msg=key)
        moved += not torch.equal(tensor, start[key])
    assert moved > len(expected) // 2  # the saves hold trained weights, not the starting ones


def resume_job(work: str, first_half: bool) -> tuple[str, list]:
    """EP=2 on 2 processes, HF in and out: stop after step RESUME_AFTER (first half), or rerun to continue
    from its save."""
    hf_dir, _ = converted(work, "tiny-moe")
    root = Path(work) / "resume"
    flags = [*sft_run_flags(sft_data(work, 64), hf_dir, root / "log"), "--expert-model-parallel-size", 2,
             "--save", root / "checkpoint", "--save-hf", root / "hf"]
    # Both halves start from the HF directory (--load): the rerun continues from its own save.
    return "train", [*flags, "--load", hf_dir, *(["--exit-interval", RESUME_AFTER] if first_half else [])]


def test_stop_and_resume_continues_with_the_same_losses_and_writes_hf_at_the_end(work, tmp_path):
    """Optimizer state sharded over DP=2: the interrupted run's command, run again in a new launch,
    continues from the latest checkpoint of its --save (not from its HF --load) with the same losses;
    --save-hf is written once, at the end, and equals the converter's HF of the final save."""
    full = layout_curve(work, "moe-ep2")
    root = Path(work) / "resume"
    assert (root / "checkpoint" / "latest_checkpointed_iteration.txt").read_text() == str(RESUME_AFTER)
    assert not (root / "hf").exists()  # a stop before the end is not the end
    result = torchrun_module(2, "megatron_patch.train", *resume_job(work, first_half=False)[1])
    assert f"resuming from {root / 'checkpoint'} (iteration {RESUME_AFTER})" in result.stdout
    assert f"resuming at iteration {RESUME_AFTER}" in result.stdout
    resumed = losses(root / "log")  # the log holds both runs: 1, 2, then the rest
    assert list(resumed) == list(range(1, ITERATIONS + 1))
    for iteration in range(RESUME_AFTER + 1, ITERATIONS + 1):
        assert abs(resumed[iteration] - full[iteration]) < 1e-6, (iteration, resumed, full)
    hf_dir, _ = converted(work, "tiny-moe")
    from megatron_patch.convert.__main__ import main as convert  # in this process: no second start-up

    assert convert([str(a) for a in ("--mg2hf", "--load-dir", root / "checkpoint", "--hf-dir", hf_dir,
                                     "--precision", "fp32", "--save-dir", tmp_path / "converted")]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (root / "hf" / name).read_bytes() == (tmp_path / "converted" / name).read_bytes(), name
    assert (root / "hf" / "tokenizer.json").is_file() and (root / "hf" / "checksums.json").is_file()
    start = saved_weights_of(Path(converted(work, "tiny-moe")[1]) / "release")
    trained = saved_weights_of(root / "checkpoint" / f"iter_{ITERATIONS:07d}")
    assert any(not torch.equal(trained[k], start[k]) for k in start if k in trained)  # trained weights were written

    # kill -9 during the HF write leaves its staging and lock, and maybe an earlier --save-hf-interval output
    # that looks complete: the identical command, finding training finished, writes the final save's HF.
    final_hf = (root / "hf" / "model.safetensors").read_bytes()
    manifest = json.loads((root / "hf" / "checksums.json").read_text())
    assert manifest["made_from"] == str((root / "checkpoint" / f"iter_{ITERATIONS:07d}").resolve())
    manifest["made_from"] = str((root / "checkpoint" / f"iter_{RESUME_AFTER:07d}").resolve())
    (root / "hf" / "checksums.json").write_text(json.dumps(manifest))
    (root / ".hf.incomplete.999999").mkdir()
    (root / ".hf.incomplete.999999" / "model.safetensors").write_bytes(final_hf[:100])
    (root / ".hf.lock").write_text("")
    rerun = torchrun_module(2, "megatron_patch.train", *resume_job(work, first_half=False)[1])
    assert "the HF outputs are not from the final save" in rerun.stdout
    assert losses(root / "log") == resumed  # nothing trained again
    assert (root / "hf" / "model.safetensors").read_bytes() == final_hf
    assert json.loads((root / "hf" / "checksums.json").read_text())["made_from"].endswith(f"iter_{ITERATIONS:07d}")
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def raw_and_idxmap_jobs(work: str) -> dict[str, tuple[str, list]]:
    prefix = sft_data(work, 32, packing=False)
    hf_dir, mcore = converted(work, "tiny-moe")
    jobs = {}
    for name, data in (("idxmap", ["--data-path", prefix]),
                       ("raw", ["--dataset-type", "raw", "--data-path", Path(prefix).parent / "train.jsonl"])):
        log_dir = Path(work) / "raw-vs-idxmap" / name
        flags = [f for f in sft_run_flags(prefix, hf_dir, log_dir) if f != "--sft-packing"]
        flags[flags.index("--data-path"):flags.index("--data-path") + 2] = data
        jobs[name] = ("train", [*flags, "--load", mcore])
    return jobs


@pytest.mark.slow  # two more one-process runs: make test-slow
def test_raw_json_sft_trains_like_its_preprocessed_idxmap(work):
    """MP_DATASET_TYPE=raw tokenizes on the fly: same samples, masks and order as build_sft's output."""
    _layout_runs(work, 1, True)
    curves = {name: losses(Path(work) / "raw-vs-idxmap" / name) for name in ("idxmap", "raw")}
    assert sorted(curves["raw"]) == list(range(1, ITERATIONS + 1)) and curves["raw"][ITERATIONS] < curves["raw"][1]
    assert curves["raw"] == pytest.approx(curves["idxmap"], abs=1e-6)


def pretraining_job(work: str) -> tuple[str, list]:
    root = Path(work) / "pretrain"
    root.mkdir(exist_ok=True)
    texts = [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()]
    documents = root / "docs.jsonl"
    documents.write_text("".join(json.dumps({"text": json.dumps(r, ensure_ascii=False)}) + "\n" for r in texts))
    _build("megatron_patch.data.build_pretrain", "--input", documents, "--tokenizer", bundled_qwen3_tokenizer_dir(),
           "--output-prefix", root / "corpus_text_document")
    return "train", ["--model", "tiny-dense", "--precision", "fp32", "--data-path", root / "corpus_text_document",
                     "--split", "80,20,0", "--seq-length", 64, "--global-batch-size", 2, "--micro-batch-size", 1,
                     "--lr", "3e-3", "--train-iters", 4, "--eval-interval", 2, "--eval-iters", 2,
                     "--log-dir", root / "log"]


def test_pretraining_on_idxmap_reports_validation(work):
    _layout_runs(work, 1, False)
    records = read_metrics(Path(work) / "pretrain" / "log")
    valid = {r["iteration"]: r["valid_loss"] for r in records if "valid_loss" in r}
    assert sorted(valid) == [2, 4] and valid[4] < valid[2]
    assert all(r["valid_ppl"] > 1 for r in records if "valid_ppl" in r)


@pytest.mark.slow
def test_demo_runs_the_script_end_to_end_and_lowers_the_hf_models_loss(tmp_path):
    """HF -> torch_dist -> SFT through run_mcore_qwen3.sh -> HF; the HF model's loss on the data falls.

    Run from / with a bare PATH: the scripts find the repository and its Python themselves.
    """
    work = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "megatron_patch.demo", "--iterations", "12", "--work-dir", work],
        capture_output=True, text=True, timeout=900, cwd="/",
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if "before" in line and "after" in line)
    before, after = (float(x) for x in line.split("before ")[1].split(" -> after "))
    assert after < before - 1.0, line
    # The script's run: metrics, TensorBoard, the last checkpoint with the HF side files.
    (log_dir,) = (work / "run" / "log").iterdir()
    records = read_metrics(log_dir)
    assert [r["iteration"] for r in records] == list(range(1, 13))
    for key in ("lr", "grad_norm", "tokens_per_second", "tflops_per_device", "aux_loss", "expert_load"):
        assert key in records[-1], key
    assert len(records[-1]["expert_load"]) == 4 and abs(sum(records[-1]["expert_load"][0]) - 1) < 1e-4
    (board,) = (work / "run" / "tensorboard").iterdir()
    assert any(p.name.startswith("events.out.tfevents") for p in board.iterdir())
    (checkpoint,) = (work / "run" / "checkpoint").iterdir()
    assert (checkpoint / "latest_checkpointed_iteration.txt").read_text() == "12"
    assert (checkpoint / "iter_0000012" / "metadata.json").is_file()
    assert (checkpoint / "config.json").is_file() and (checkpoint / "tokenizer.json").is_file()
    assert not [p for p in checkpoint.iterdir() if p.name.endswith(".incomplete")]
    # The demo keeps what it made where it says, with the run's plots.
    for folder in ("hf", "mcore", "run", "hf-trained"):
        assert str(work / folder) in result.stdout and any((work / folder).iterdir()), folder
    for image in ("loss.png", "expert_load.png"):
        assert (log_dir / image).stat().st_size > 1000 and str(log_dir / image) in result.stdout


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
def test_killing_the_launch_kills_every_worker(work, tmp_path):
    """kill -9 of the launcher's process group mid-training: no worker trains on or saves."""
    out = tmp_path / "killed-run"
    data = sft_data(work, 64)
    process = subprocess.Popen(
        ["bash", str(REPO / "examples/qwen3/run_mcore_qwen3.sh"), "dsw", "tiny-moe", "1", "2", "3e-3", "3e-4", "128",
         "128", "fp32", "1", "1", "1", "1", "1", "false", "true", "false", "true", "none", "false", "1", data, data,
         "none", "1000", "2", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MP_SFT_PACKING": "true", "MP_NPROC": "2"},
    )
    deadline = time.monotonic() + 180
    # Killed once a save has completed and training goes on (it saves every iteration).
    while not list(out.glob("checkpoint/*/latest_checkpointed_iteration.txt")) and time.monotonic() < deadline \
            and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed"
    assert len(_processes_mentioning(str(out))) >= 3  # launcher (now torchrun) and two workers
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 20
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(str(out))
    (checkpoints,) = (out / "checkpoint").iterdir()
    saved = sorted(checkpoints.glob("iter_*"))
    time.sleep(2)
    assert sorted(checkpoints.glob("iter_*")) == saved  # nobody is still saving
