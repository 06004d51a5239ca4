"""Pai-Megatron-Patch's 27 positional arguments -> validated settings -> torchrun of megatron_patch.train.

``examples/qwen3/run_mcore_qwen3.sh`` hands its arguments here. Everything is checked in this one
process before torchrun starts; an error names the positional argument (and its number). The
meaning of each argument, the MP_* variables and the tokens-vs-iterations arithmetic follow
Pai-Megatron-Patch's ``run_mcore_qwen3.sh`` (see examples/qwen3/README.md). Differences:
optimizer state is saved by default (``MP_SAVE_OPTIM=false`` skips it), ``log/`` receives
metrics.jsonl, ``PR=fp32`` is accepted, and without a GPU the job runs on CPU with gloo and
``MP_NPROC`` processes (default 1).

  python -m megatron_patch.training.launch ENV MODEL_SIZE ... OUTPUT_BASEPATH   (27 arguments)
  MP_DRY_RUN=true: print the torchrun command and the planned memory per GPU (training/memory_plan.py),
  warn when it exceeds the GPU's (or MP_GPU_MEMORY, e.g. 80GiB), do not start.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import math
import os
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_patch.errors import InputError
from megatron_patch.models.choices import RECOMPUTE_MODES, TRAINING_PRECISIONS, TRANSFORMER_IMPLS
from megatron_patch.parallel import free_port
from megatron_patch.patches.warnings import silence_upstream_warnings
from megatron_patch.training.config import TrainConfigError, parse_config
from megatron_patch.training.memory_plan import GIB, MemoryPlan, plan_memory
from megatron_patch.training.preflight import check_inputs, check_run, resolve_model, resolved_transformer_impl
from megatron_patch.units import parse_size

POSITIONALS = (
    "ENV", "MODEL_SIZE", "BATCH_SIZE", "GLOBAL_BATCH_SIZE", "LR", "MIN_LR", "SEQ_LEN", "PAD_LEN", "PR",
    "TP", "PP", "CP", "ETP", "EP", "SP", "DO", "FL", "SFT", "AC", "OPTIMIZER_OFFLOAD", "SAVE_INTERVAL",
    "DATASET_PATH", "VALID_DATASET_PATH", "PRETRAIN_CHECKPOINT_PATH", "TRAIN_TOKENS_OR_ITERS",
    "WARMUP_TOKENS_OR_ITERS", "OUTPUT_BASEPATH",
)
USAGE = "usage: run_mcore_qwen3.sh " + " ".join(POSITIONALS)

# Which positional argument (or variable) a train flag comes from, to name it in errors.
FLAG_SOURCES = {
    "--micro-batch-size": "BATCH_SIZE", "--global-batch-size": "GLOBAL_BATCH_SIZE", "--lr": "LR",
    "--min-lr": "MIN_LR", "--seq-length": "SEQ_LEN", "--max-padding-length": "PAD_LEN", "--precision": "PR",
    "--tensor-model-parallel-size": "TP", "--pipeline-model-parallel-size": "PP",
    "--context-parallel-size": "CP", "--expert-tensor-parallel-size": "ETP",
    "--expert-model-parallel-size": "EP", "--sequence-parallel": "SP", "--recompute-num-layers": "MP_AC_LAYERS",
    "--recompute": "AC", "--optimizer-offload-fraction": "OPTIMIZER_OFFLOAD", "--save-interval": "SAVE_INTERVAL",
    "--data-path": "DATASET_PATH", "--valid-data-path": "VALID_DATASET_PATH",
    "--train-iters": "TRAIN_TOKENS_OR_ITERS", "--lr-warmup-iters": "WARMUP_TOKENS_OR_ITERS",
    "--num-layers-per-virtual-pipeline-stage": "MP_VP", "--decoder-first-pipeline-num-layers": "MP_PP0_LAYERS",
    "--sft-packing": "MP_SFT_PACKING", "--dataset-type": "MP_DATASET_TYPE", "--train-mode": "SFT",
    "--model": "MODEL_SIZE", "--load": "PRETRAIN_CHECKPOINT_PATH", "--transformer-impl": "MP_TRANSFORMER_IMPL",
    "--lora-rank": "MP_LORA_RANK", "--lora-alpha": "MP_LORA_ALPHA", "--lora-dropout": "MP_LORA_DROPOUT",
    "--lora-target-modules": "MP_LORA_TARGETS", "--save-hf": "MP_SAVE_HF", "--save-hf-interval": "MP_SAVE_HF_INTERVAL",
    "--save-peft": "MP_SAVE_PEFT",
}
# HF outputs written from the saves (training and GRPO alike).
HF_OUTPUT_VARIABLES = {"MP_SAVE_HF": "--save-hf", "MP_SAVE_HF_INTERVAL": "--save-hf-interval",
                       "MP_SAVE_PEFT": "--save-peft"}


class LaunchError(InputError):
    """A bad argument; the message names it."""


# Every MP_* variable the training launcher and what it starts read. Any other MP_* name is refused before
# anything starts (see ``unknown_variables``).
KIT_VARIABLES = frozenset({
    "MP_NPROC", "MP_DRY_RUN", "MP_GPU_MEMORY", "MP_CHECKSUMS", "MP_TRANSFORMER_IMPL", "MP_DATASET_TYPE",
    "MP_SFT_PACKING", "MP_AC_LAYERS", "MP_VP", "MP_PP0_LAYERS", "MP_SAVE_OPTIM", "MP_SAVE_LORA_ONLY",
    "MP_LORA_RANK", "MP_LORA_ALPHA", "MP_LORA_DROPOUT", "MP_LORA_TARGETS", *HF_OUTPUT_VARIABLES,
})
# The GRPO launcher's own variables: beside a training launch they are another job's, not typos.
GRPO_PREFIX = "MP_GRPO_"


def unknown_variables(env: dict, job_variables: frozenset) -> str | None:
    """One line naming an MP_* variable no launcher of the kit reads (a typo such as MP_GRPO_REWRAD, or a newer
    kit's setting), with the nearest known name; None when all are known.

    A refusal, not a warning: a misspelt variable leaves the run on the default the user meant to change, and
    a warning scrolls away in the first seconds of a job that then trains for days."""
    known = KIT_VARIABLES | job_variables
    foreign = () if any(name.startswith(GRPO_PREFIX) for name in job_variables) else (GRPO_PREFIX,)
    unknown = sorted(name for name in env if name.startswith("MP_") and name not in known
                     and not name.startswith(foreign))
    if not unknown:
        return None
    lines = []
    for name in unknown:
        nearest = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        lines.append(f"{name}" + (f" (did you mean {nearest[0]}?)" if nearest else ""))
    return (f"{', '.join(lines)}: no setting of this kit reads {'it' if len(lines) == 1 else 'them'}; unset "
            f"{'it' if len(lines) == 1 else 'them'} or fix the name (examples/qwen3/README.md lists the MP_* "
            "variables)")


def _name(position: str) -> str:
    return f"{position} (argument {POSITIONALS.index(position) + 1})" if position in POSITIONALS else position


def _bool(values: dict, position: str) -> bool:
    value = values[position].lower()
    if value not in ("true", "false"):
        raise LaunchError(f"{_name(position)} must be true or false, got {values[position]!r}")
    return value == "true"


def _int(values: dict, position: str, minimum: int = 1) -> int:
    try:
        number = int(values[position])
    except ValueError:
        raise LaunchError(f"{_name(position)} must be an integer, got {values[position]!r}") from None
    if number < minimum:
        raise LaunchError(f"{_name(position)} must be >= {minimum}, got {number}")
    return number


def _float(values: dict, position: str) -> float:
    try:
        number = float(values[position])
    except ValueError:
        raise LaunchError(f"{_name(position)} must be a number, got {values[position]!r}") from None
    if not math.isfinite(number):
        raise LaunchError(f"{_name(position)} must be a finite number, got {values[position]!r}")
    return number


def _env_int(env: dict, name: str) -> int | None:
    if not env.get(name):
        return None
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"{name} must be an integer, got {env[name]!r}") from None


@dataclass
class Launch:
    flags: list[str]
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    name: str
    device: str
    module: str = "megatron_patch.train"


def _train_data_flags(values: dict, env: dict, pad: int) -> list:
    """SFT or pretraining data: idxmap prefixes (with the split), or raw JSON (MP_DATASET_TYPE=raw)."""
    validation = ["--eval-interval", 10000, "--eval-iters", 10]
    if (env.get("MP_DATASET_TYPE") or "idxmap") == "raw":
        return ["--data-path", *values["DATASET_PATH"].split(), "--valid-data-path",
                *values["VALID_DATASET_PATH"].split(), "--max-padding-length", pad, *validation]
    return ["--data-path", *values["DATASET_PATH"].split(), "--split", "99,1,0", *validation]


def _train_run(flags: list[str]):
    """(settings, architecture, transformer implementation) of the trainer's flags."""
    config, _ = parse_config(flags)
    arch, _ = resolve_model(config.model)
    return config, arch, resolved_transformer_impl(config)


def _train_check(flags: list[str], world_size: int) -> None:
    check_run(*_train_run(flags), world_size)


def _train_inputs(flags: list[str]) -> None:
    check_inputs(parse_config(flags)[0])


def _train_memory(flags: list[str], world_size: int) -> MemoryPlan:
    return plan_memory(*_train_run(flags), world_size)


@dataclass(frozen=True)
class Job:
    """What the 27 arguments launch, and how that job reads the ones whose meaning differs."""

    module: str = "megatron_patch.train"
    label: str | None = None  # the run name's first word (default: finetune or pretrain, from SFT)
    steps: bool = False  # TRAIN_TOKENS_OR_ITERS and WARMUP_TOKENS_OR_ITERS count steps whatever SFT says
    data_flags: Callable[[dict, dict, int], list] = _train_data_flags  # (arguments, environment, PAD_LEN)
    extra_flags: Callable[[dict], list] = lambda env: []  # from the job's own MP_* variables
    check: Callable[[list[str], int], None] = _train_check  # the job's own checks; raise TrainConfigError
    check_inputs: Callable[[list[str]], None] = _train_inputs  # data and checkpoint present (not for a dry run)
    memory: Callable[[list[str], int], MemoryPlan] = _train_memory  # planned per-GPU memory (for a dry run)
    flag_sources: dict = field(default_factory=dict)  # the job's flags -> the variable that sets them
    usage: str = USAGE

    @property
    def variables(self) -> frozenset:
        """The job's own MP_* variables."""
        return frozenset(name for name in self.flag_sources.values() if name.startswith("MP_"))


TRAINING = Job()


def plan(arguments: list[str], env: dict | None = None, cuda_devices: int | None = None,
         job: Job = TRAINING) -> Launch:
    """Translate and check the 27 arguments (and MP_* variables); raise LaunchError naming the bad one."""
    env = dict(os.environ if env is None else env)
    unknown = unknown_variables(env, job.variables)
    if unknown:
        raise LaunchError(unknown)
    if len(arguments) != len(POSITIONALS):
        raise LaunchError(f"expected {len(POSITIONALS)} arguments, got {len(arguments)}")
    v = dict(zip(POSITIONALS, arguments))
    if v["ENV"] not in ("dsw", "dlc"):
        raise LaunchError(f"{_name('ENV')} must be dsw (one node) or dlc (multi-node), got {v['ENV']!r}")
    if v["PR"] not in TRAINING_PRECISIONS:
        raise LaunchError(f"{_name('PR')} must be one of {', '.join(TRAINING_PRECISIONS)}, got {v['PR']!r}")
    ac = "none" if v["AC"] == "false" else v["AC"]
    if ac not in RECOMPUTE_MODES:
        raise LaunchError(f"{_name('AC')} must be one of {', '.join(RECOMPUTE_MODES)}, got {v['AC']!r}")
    micro, gbs, seq = _int(v, "BATCH_SIZE"), _int(v, "GLOBAL_BATCH_SIZE"), _int(v, "SEQ_LEN")
    pad = _int(v, "PAD_LEN")
    lr, min_lr = _float(v, "LR"), _float(v, "MIN_LR")
    tp, pp, cp, etp, ep = (_int(v, k) for k in ("TP", "PP", "CP", "ETP", "EP"))
    sp, do, fl, sft = (_bool(v, k) for k in ("SP", "DO", "FL", "SFT"))
    offload = None
    if v["OPTIMIZER_OFFLOAD"] != "false":
        offload = _float(v, "OPTIMIZER_OFFLOAD")
        if not do:
            print("warning: OPTIMIZER_OFFLOAD needs the distributed optimizer; DO set to true", file=sys.stderr)
            do = True
    save_interval = _int(v, "SAVE_INTERVAL")
    train_arg, warmup_arg = _int(v, "TRAIN_TOKENS_OR_ITERS"), _int(v, "WARMUP_TOKENS_OR_ITERS", minimum=0)
    if sft or job.steps:
        train_iters, warmup_iters = train_arg, warmup_arg
        decay_iters = train_iters - warmup_iters
    else:  # tokens, with Pai's integer division
        train_iters, warmup_iters = train_arg // gbs // seq, warmup_arg // gbs // seq
        decay_iters = train_iters
    if train_iters < 1:
        raise LaunchError(f"{_name('TRAIN_TOKENS_OR_ITERS')} {train_arg} gives {train_iters} iterations "
                          f"(tokens / GLOBAL_BATCH_SIZE / SEQ_LEN when SFT=false)")
    if decay_iters < 1:
        raise LaunchError(f"{_name('WARMUP_TOKENS_OR_ITERS')}: warmup {warmup_iters} leaves no decay iterations "
                          f"of {train_iters}")
    dataset_type = env.get("MP_DATASET_TYPE", "idxmap") or "idxmap"
    dataset_type = "raw" if dataset_type == "raw" else "idxmap"
    packing = env.get("MP_SFT_PACKING", "false").lower() == "true"
    ac_layers = _env_int(env, "MP_AC_LAYERS") or 1
    vp, pp0 = _env_int(env, "MP_VP"), _env_int(env, "MP_PP0_LAYERS")
    if pp0 is not None and pp == 1:
        raise LaunchError("MP_PP0_LAYERS needs PP (argument 11) > 1")

    model = v["MODEL_SIZE"]
    model_label = os.path.basename(os.path.normpath(model)) if os.sep in model or os.path.isdir(model) else model
    label = job.label or ("finetune" if sft else "pretrain")
    prefix = (f"{label}-mcore-qwen3-moe-megatron-{model_label}-lr-{v['LR']}-minlr-"
              f"{v['MIN_LR']}-bs-{micro}-gbs-{gbs}-seqlen-{seq}")
    name = (f"{prefix}-pr-{v['PR']}-tp-{tp}-pp-{pp}-cp-{cp}-ac-{ac}-do-{str(do).lower()}-sp-{str(sp).lower()}"
            f"-ti-{train_iters}-wi-{warmup_iters}")
    out = v["OUTPUT_BASEPATH"]
    stamp = datetime.datetime.now().strftime("%Y.%m.%d-%H.%M.%S")

    cuda_devices = _cuda_device_count() if cuda_devices is None else cuda_devices
    device = "cuda" if cuda_devices > 0 else "cpu"
    if device == "cuda":
        per_node = cuda_devices
        if v["ENV"] == "dlc":
            per_node = int(env.get("KUBERNETES_CONTAINER_RESOURCE_GPU") or cuda_devices)
    else:
        per_node = _env_int(env, "MP_NPROC") or 1
    if v["ENV"] == "dlc":
        nnodes, node_rank = _env_int(env, "WORLD_SIZE") or 1, _env_int(env, "RANK") or 0
        master_addr, master_port = env.get("MASTER_ADDR", "localhost"), _env_int(env, "MASTER_PORT") or 29500
    else:
        nnodes, node_rank, master_addr, master_port = 1, 0, "localhost", free_port()

    flags = [
        "--model", model, "--micro-batch-size", micro, "--global-batch-size", gbs, "--lr", lr, "--min-lr", min_lr,
        "--seq-length", seq, "--precision", v["PR"], "--tensor-model-parallel-size", tp,
        "--pipeline-model-parallel-size", pp, "--context-parallel-size", cp, "--expert-tensor-parallel-size", etp,
        "--expert-model-parallel-size", ep, "--recompute", ac, "--recompute-num-layers", ac_layers,
        "--train-iters", train_iters, "--lr-warmup-iters", warmup_iters, "--lr-decay-iters", decay_iters,
        "--lr-decay-style", "cosine", "--weight-decay", 0.01, "--adam-beta1", 0.9, "--adam-beta2", 0.95,
        "--clip-grad", 1.0, "--init-method-std", 0.008, "--log-interval", 1, "--save-interval", save_interval,
        "--save", os.path.join(out, "checkpoint", name),
        "--tensorboard-dir", os.path.join(out, "tensorboard", f"{name}_{stamp}"),
        "--log-dir", os.path.join(out, "log", name), "--train-mode", "finetune" if sft else "pretrain",
        "--dataset-type", dataset_type, "--device", device,
        "--sequence-parallel" if sp and tp > 1 else "--no-sequence-parallel",
        "--use-distributed-optimizer" if do else "--no-use-distributed-optimizer",
        "--save-optim" if env.get("MP_SAVE_OPTIM", "true").lower() != "false" else "--no-save-optim",
    ]
    flags += job.data_flags(v, env, pad)
    flags += job.extra_flags(env)
    if packing:
        flags.append("--sft-packing")
    lora_rank = _env_int(env, "MP_LORA_RANK")
    if lora_rank:
        targets = (env.get("MP_LORA_TARGETS") or "all").replace(",", " ").split()
        flags += ["--lora-rank", lora_rank, "--lora-alpha", env.get("MP_LORA_ALPHA") or 32,
                  "--lora-dropout", env.get("MP_LORA_DROPOUT") or 0.0, "--lora-target-modules", *targets]
        if env.get("MP_SAVE_LORA_ONLY", "false").lower() == "true":
            flags.append("--save-lora-only")
    for variable, flag_name in HF_OUTPUT_VARIABLES.items():
        if env.get(variable):
            flags += [flag_name, env[variable]]
    impl = env.get("MP_TRANSFORMER_IMPL") or "auto"
    if impl not in TRANSFORMER_IMPLS:
        raise LaunchError(f"MP_TRANSFORMER_IMPL must be one of {', '.join(TRANSFORMER_IMPLS)}, got {impl!r}")
    flags += ["--transformer-impl", impl]
    if offload is not None:
        flags += ["--optimizer-offload-fraction", offload]
    if vp is not None:
        flags += ["--num-layers-per-virtual-pipeline-stage", vp]
    if pp0 is not None:
        flags += ["--decoder-first-pipeline-num-layers", pp0]
    if v["PRETRAIN_CHECKPOINT_PATH"] != "none":
        flags += ["--load", v["PRETRAIN_CHECKPOINT_PATH"]]
    if fl:
        print("note: FL=true: Transformer-Engine's flash attention when TE is installed; otherwise the torch "
              "attention (SDPA) already picks PyTorch's flash kernel on CUDA", file=sys.stderr)
    flags = [str(f) for f in flags]
    # The job's own checks, run here before anything starts, with Pai's argument names.
    try:
        job.check(flags, nnodes * per_node)
    except TrainConfigError as err:
        raise LaunchError(_with_positional_names(str(err), job)) from None
    return Launch(flags, per_node, nnodes, node_rank, master_addr, master_port, name, device, job.module)


def _with_positional_names(message: str, job: Job = TRAINING) -> str:
    sources = {**FLAG_SOURCES, **job.flag_sources}

    def replace(match):
        flag = match.group(0)
        return f"{flag} ({_name(sources[flag])})" if flag in sources else flag

    return re.sub(r"--[a-z0-9-]+", replace, message)


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun_command(launch: Launch) -> list[str]:
    return [
        sys.executable, "-m", "megatron_patch.torchrun", "--nproc_per_node", str(launch.nproc_per_node),
        "--nnodes", str(launch.nnodes), "--node_rank", str(launch.node_rank), "--master_addr", launch.master_addr,
        "--master_port", str(launch.master_port), "-m", launch.module, *launch.flags,
    ]


def _gpu_memory(device: str) -> int | None:
    """MP_GPU_MEMORY (e.g. 80GiB), else the visible GPU's; None on a machine without one."""
    if os.environ.get("MP_GPU_MEMORY"):
        try:
            return parse_size(os.environ["MP_GPU_MEMORY"])
        except argparse.ArgumentTypeError as err:
            raise LaunchError(f"MP_GPU_MEMORY: {err}") from None
    if device != "cuda":
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def _report_memory(launch: Launch, job: Job) -> int:
    """The dry run's memory plan; a warning (not a failure) when it exceeds the GPU."""
    try:
        plan = job.memory(launch.flags, launch.nnodes * launch.nproc_per_node)
        capacity = _gpu_memory(launch.device)
    except InputError as err:
        print(f"error: {_with_positional_names(str(err), job)}", file=sys.stderr)
        return 2
    print("planned memory per GPU (docs/planner.md):")
    print("\n".join(plan.lines()))
    if capacity is not None and plan.peak > capacity:
        print(f"warning: the plan ({plan.peak / GIB:.1f} GiB) exceeds the GPU's {capacity / GIB:.1f} GiB; see "
              "python -m megatron_patch.plan for layouts that fit", file=sys.stderr)
    return 0


def main(argv=None, job: Job = TRAINING) -> int:
    silence_upstream_warnings()
    arguments = sys.argv[1:] if argv is None else argv
    try:
        launch = plan(arguments, job=job)
    except LaunchError as err:
        print(f"{job.usage}\nerror: {err}", file=sys.stderr)
        return 2
    command = torchrun_command(launch)
    print(f"{launch.device}: {launch.nnodes} node(s) x {launch.nproc_per_node} process(es); run {launch.name}")
    print(shlex.join(command), flush=True)
    if os.environ.get("MP_DRY_RUN", "false").lower() == "true":
        return _report_memory(launch, job)
    try:
        job.check_inputs(launch.flags)
    except InputError as err:  # missing or truncated data, no checkpoint at PRETRAIN_CHECKPOINT_PATH
        print(f"error: {_with_positional_names(str(err), job)}", file=sys.stderr)
        return 2
    env = {**os.environ, "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    if launch.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc_per_node)))
    # This process becomes torchrun: a kill of the launcher (or its process group) reaches torchrun,
    # and each worker dies with it (train.py asks the kernel to end it when its parent ends).
    sys.stdout.flush()
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    raise SystemExit(main())
