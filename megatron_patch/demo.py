"""`make demo`: the whole job on the embedded default (tiny Qwen3-MoE, bundled SFT data, CPU).

Each stage runs the command a user would run:
1. a random tiny Qwen3-MoE HF checkpoint with the real Qwen3 tokenizer (transformers, no download);
2. toolkits' SFT preprocessing of the bundled conversations (megatron_patch/resources) into a
   packed idxmap dataset;
3. HF -> torch_dist with the converter;
4. SFT with examples/qwen3/run_mcore_qwen3.sh (CPU, gloo), starting from the converted weights;
5. torch_dist -> HF with the converter;
6. the HF model's loss on the training conversations (transformers, loss mask applied), before
   and after: it must have fallen;
7. the loss and expert-load plots of the run (python -m megatron_patch.plot).

``--grpo`` (``make demo-rl``) runs GRPO instead:
1. a random tiny dense Qwen3 HF checkpoint whose initialisation is peaked (std 0.6), so that it
   samples a few tokens per context rather than all 151,936 evenly;
2. HF -> torch_dist;
3. GRPO with examples/qwen3/run_mcore_qwen3_grpo.sh on the bundled prompts and the bundled
   ``letters`` reward (the share of the response's characters that are ASCII letters);
4. the mean reward of the first step and of the last steps, and the reward plot.

Everything stays in the work directory (default ``runs/demo/``, replaced by the next demo run)
and the last lines say where.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from megatron_patch.data.chat import messages_from_record, tokenize_conversations
from megatron_patch.data.tokenizer import Qwen3Tokenizer, bundled_qwen3_tokenizer_dir
from megatron_patch.models.qwen3.hf_model import load_hf_model, save_random_hf_checkpoint
from megatron_patch.models.qwen3.presets import get_preset
from megatron_patch.patches.warnings import silence_upstream_warnings
from megatron_patch.plot import plot_run

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = Path(__file__).resolve().parent / "resources" / "demo_sft.jsonl"
DEMO_PROMPTS = Path(__file__).resolve().parent / "resources" / "demo_rl_prompts.jsonl"
DEFAULT_WORK_DIR = Path("runs/demo")
# Marks a directory the demo made, so that the next demo run may replace it (and nothing else).
MARKER = ".megatron_patch-demo"


def _run(stage: str, command: list[str], env: dict | None = None) -> None:
    print(f"[demo] {stage}: {' '.join(map(str, command))}", flush=True)
    result = subprocess.run([str(c) for c in command], env={**os.environ, **(env or {})}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wanted = [line for line in result.stdout.splitlines()
              if line.startswith(("iteration", "step", "validation", "wrote", "saved", "loaded", "error", "done",
                                  "converted"))]
    for line in wanted[-12:]:
        print(f"        {line}")
    if result.returncode != 0:
        print(result.stdout[-4000:])
        raise SystemExit(f"[demo] {stage} failed with exit status {result.returncode}")


def sft_loss(hf_dir: Path, records_path: Path, tokenizer_dir: Path) -> float:
    """Per-token loss of an HF model on the assistant tokens of the given conversations."""
    tokenizer = Qwen3Tokenizer.from_dir(tokenizer_dir)
    records = [json.loads(line) for line in records_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    samples = tokenize_conversations(tokenizer, [messages_from_record(r) for r in records])
    model = load_hf_model(hf_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in samples:
            ids_t = torch.tensor([ids])
            logits = model(input_ids=ids_t[:, :-1]).logits[0].float()
            losses = torch.nn.functional.cross_entropy(logits, ids_t[0, 1:], reduction="none")
            weights = torch.tensor(mask[1:], dtype=torch.float32)
            total += float((losses * weights).sum())
            count += int(weights.sum())
    return total / count


def _fresh_work_dir(parser: argparse.ArgumentParser, work: Path) -> Path:
    work = work.absolute()
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            parser.error(f"--work-dir {work} is not empty and not a previous demo's directory")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).touch()
    return work


def write_random_hf_model(arch, hf_dir: Path) -> None:
    """A random HF checkpoint of ``arch`` with the bundled Qwen3 tokenizer files beside it."""
    save_random_hf_checkpoint(arch, hf_dir)
    for path in bundled_qwen3_tokenizer_dir().iterdir():
        if path.is_file() and path.name != "config.json":
            shutil.copy(path, hf_dir / path.name)


def grpo_demo(args) -> int:
    """GRPO through run_mcore_qwen3_grpo.sh on a tiny model; the reward must rise."""
    work, steps = args.work_dir, args.iterations
    started = time.perf_counter()
    hf_dir, mcore, run = work / "hf", work / "mcore", work / "run"
    arch = get_preset("tiny-dense").replace(initializer_range=0.6)
    write_random_hf_model(arch, hf_dir)
    print(f"[demo] 1. random tiny dense HF checkpoint (init std 0.6) with the Qwen3 tokenizer: {hf_dir}")
    _run("2. HF -> torch_dist", [sys.executable, "-m", "megatron_patch.convert", "--load-dir", hf_dir,
                                 "--save-dir", mcore, "--force"])
    # 4 prompts x 8 samples of 8 tokens a step; micro-batches of 8 sequences; lr 1e-2, no KL.
    _run("3. GRPO", ["bash", REPO / "examples/qwen3/run_mcore_qwen3_grpo.sh", "dsw", hf_dir, 8, 4, "1e-2", "1e-2",
                     64, 64, "fp32", 1, 1, 1, 1, args.nproc, "false", "true", "false", "true", "none", "false",
                     steps, DEMO_PROMPTS, "none", mcore, steps, 0, run],
         env={"MP_NPROC": str(args.nproc), "MP_SAVE_OPTIM": "false", "MP_GRPO_N": "8", "MP_GRPO_REWARD": "letters",
              "MP_GRPO_MAX_PROMPT_LENGTH": "32", "MP_GRPO_MAX_RESPONSE_LENGTH": "8", "MP_GRPO_KL_COEF": "0"})
    (metrics,) = run.rglob("metrics.jsonl")
    rewards = [json.loads(line)["reward_mean"] for line in metrics.read_text().splitlines() if "reward_mean" in line]
    before, after = rewards[0], sum(rewards[-3:]) / len(rewards[-3:])
    print(f"[demo] 4. mean reward ('letters'): step 1 {before:.3f} -> last 3 steps {after:.3f}")
    plots = plot_run(metrics)
    print(f"[demo]    plots: {', '.join(str(p) for p in plots)}")
    print(f"[demo] done in {time.perf_counter() - started:.0f}s; everything is in {work}:")
    for label, path in (("HF start", hf_dir), ("torch_dist start", mcore),
                        ("GRPO run (checkpoints, log, tensorboard)", run)):
        print(f"[demo]   {label}: {path}")
    return 0 if after > before + 0.1 else 1


def main(argv=None) -> int:
    silence_upstream_warnings()
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", default="tiny-moe", help="a preset name (default: tiny-moe)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="SFT iterations in stage 4 (default 40), or GRPO steps (default 20)")
    parser.add_argument("--nproc", type=int, default=1, help="CPU processes for training (MP_NPROC; EP = nproc)")
    parser.add_argument("--grpo", action="store_true", help="the GRPO demo (make demo-rl) instead of SFT")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help=f"keep everything here (default {DEFAULT_WORK_DIR}); a previous demo's is replaced")
    args = parser.parse_args(argv)
    args.work_dir = _fresh_work_dir(parser, args.work_dir)
    if args.grpo:
        args.iterations = args.iterations or 20
        return grpo_demo(args)
    args.iterations = args.iterations or 40
    work = args.work_dir

    arch = get_preset(args.model_size)
    counts = arch.parameter_counts()
    print(f"[demo] model {args.model_size}: {counts['total']:,} parameters, {counts['active']:,} active per token")
    started = time.perf_counter()
    python = sys.executable
    tokenizer_dir = bundled_qwen3_tokenizer_dir()
    hf_dir, data, mcore, run, hf_out = (work / n for n in ("hf", "data", "mcore", "run", "hf-trained"))
    write_random_hf_model(arch, hf_dir)
    print(f"[demo] 1. random HF checkpoint with the Qwen3 tokenizer: {hf_dir}")
    _run("2. SFT data", ["bash", REPO / "toolkits/sft_data_preprocessing/run_build_idxmap_sft_dataset.sh",
                         DEMO_DATA, "Qwen3Tokenizer", 128, data / "sft", hf_dir, "true"])
    _run("3. HF -> torch_dist", [python, "-m", "megatron_patch.convert", "--load-dir", hf_dir,
                                 "--save-dir", mcore, "--force"])
    nproc = args.nproc
    _run("4. SFT", ["bash", REPO / "examples/qwen3/run_mcore_qwen3.sh", "dsw", hf_dir, 1, 4, "3e-3", "3e-4",
                    128, 128, "fp32", 1, 1, 1, 1, nproc, "false", "true", "false", "true", "none", "false",
                    args.iterations, data / "sft", data / "sft", mcore, args.iterations, 2, run],
         env={"MP_SFT_PACKING": "true", "MP_NPROC": str(nproc), "MP_SAVE_OPTIM": "false"})
    checkpoints = sorted((run / "checkpoint").iterdir())
    _run("5. torch_dist -> HF", [python, "-m", "megatron_patch.convert", "--mg2hf", "--load-dir", checkpoints[-1],
                                 "--save-dir", hf_out, "--hf-dir", hf_dir, "--force"])
    before = sft_loss(hf_dir, DEMO_DATA, tokenizer_dir)
    after = sft_loss(hf_out, DEMO_DATA, tokenizer_dir)
    print(f"[demo] 6. HF model's loss on the training conversations (assistant tokens): "
          f"before {before:.4f} -> after {after:.4f}")
    plots = [image for path in sorted(run.rglob("metrics.jsonl")) for image in plot_run(path)]
    print(f"[demo] 7. plots: {', '.join(str(p) for p in plots)}")
    print(f"[demo] done in {time.perf_counter() - started:.0f}s; everything is in {work}:")
    for label, path in (("HF start", hf_dir), ("SFT data", data), ("torch_dist start", mcore),
                        ("training run (checkpoints, log, tensorboard)", run), ("trained HF model", hf_out)):
        print(f"[demo]   {label}: {path}")
    return 0 if after < before else 1


if __name__ == "__main__":
    raise SystemExit(main())
