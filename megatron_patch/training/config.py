"""The training run's settings: one typed dataclass, read from flags and/or a YAML file.

Flag names are Megatron-LM's (``--tensor-model-parallel-size``, ``--micro-batch-size`` ...), so
Pai-Megatron-Patch users read them at a glance; a YAML file (``--config``) uses the field names
(``tensor_model_parallel_size: 2``). Flags given on the command line win over the file.
``TrainConfig.check`` rejects invalid combinations with a message naming the setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch.errors import InputError
from megatron_patch.lora.config import LoraConfigError, LoraSettings
from megatron_patch.models.choices import RECOMPUTE_MODES, TRAINING_PRECISIONS, TRANSFORMER_IMPLS
from megatron_patch.models.layout_check import RunFeatures, virtual_stages
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.outputs import overlaps, within
from megatron_patch.parallel import ParallelLayout


class TrainConfigError(InputError):
    """An invalid setting; the message names it."""


def option(default, help: str, flag: str | None = None, env: str | None = None, **argparse_kwargs):
    """A setting with its help text; a type as ``default`` (``list``) makes a fresh empty value per config.
    ``env``: the launcher variable that sets it (named in the help)."""
    metadata = {"help": help, "flag": flag, "env": env, **argparse_kwargs}
    if isinstance(default, type):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # Model and tokenizer
    model: str = option("tiny-moe", "preset name (0.6B ... 32B, A3B, A22B, tiny-moe, tiny-dense) or an HF model "
                                     "directory")
    tokenizer: str | None = option(None, "HF tokenizer directory (default: the HF model directory, the --load "
                                          "directory if it holds tokenizer files, else the bundled Qwen3 tokenizer)")
    transformer_impl: str = option("auto", "attention/experts modules: transformer_engine (TE spec), torch (SDPA "
                                            "and varlen attention, grouped-GEMM experts), local (Megatron-Core's stock "
                                            "local spec) or auto (TE when importable on CUDA, else torch) "
                                            "(MP_TRANSFORMER_IMPL)",
                                    choices=TRANSFORMER_IMPLS)
    # Parallel layout
    tensor_model_parallel_size: int = option(1, "TP")
    pipeline_model_parallel_size: int = option(1, "PP")
    context_parallel_size: int = option(1, "CP (needs Transformer-Engine attention)")
    expert_model_parallel_size: int = option(1, "EP")
    expert_tensor_parallel_size: int = option(1, "ETP")
    sequence_parallel: bool = option(False, "sequence parallelism (TP > 1)")
    num_layers_per_virtual_pipeline_stage: int | None = option(None, "virtual pipeline: layers per chunk (MP_VP)")
    decoder_first_pipeline_num_layers: int | None = option(None, "layers of the first pipeline stage (MP_PP0_LAYERS)")
    # Batch and sequence
    micro_batch_size: int = option(1, "sequences per micro-batch per data-parallel rank")
    global_batch_size: int = option(8, "sequences per optimizer step (micro-batch x micro-batches x DP)")
    seq_length: int = option(128, "training sequence length")
    max_padding_length: int | None = option(None, "raw JSON SFT: pad/truncate samples to this length "
                                                   "(default seq-length)")
    # Precision, optimizer, schedule
    precision: str = option("bf16", "parameter/compute precision", choices=TRAINING_PRECISIONS)
    lr: float = option(1e-5, "peak learning rate")
    min_lr: float = option(1e-6, "final learning rate of the cosine decay")
    lr_decay_style: str = option("cosine", "learning-rate decay", choices=("cosine", "linear", "constant"))
    lr_warmup_iters: int = option(0, "linear warmup iterations")
    lr_decay_iters: int | None = option(None, "decay iterations (default: train-iters)")
    train_iters: int = option(10, "optimizer steps in total")
    weight_decay: float = option(0.01, "AdamW weight decay")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.95, "Adam beta2")
    clip_grad: float = option(1.0, "gradient-norm clip (0: off)")
    init_method_std: float = option(0.008, "std of the random initialisation (runs without --load)")
    use_distributed_optimizer: bool = option(True, "shard optimizer state over data-parallel ranks")
    optimizer_offload_fraction: float | None = option(None, "offload this fraction of optimizer state to CPU "
                                                             "(GPU runs; implies the distributed optimizer)")
    overlap_grad_reduce: bool = option(True, "overlap the gradient all-reduce/reduce-scatter with the backward pass")
    overlap_param_gather: bool = option(True, "overlap the distributed optimizer's parameter all-gather with the next "
                                               "forward pass (off without the distributed optimizer)")
    moe_aux_loss_coeff: float | None = option(None, "MoE load-balancing loss coefficient (default: the model's, "
                                                     "0.001 for Qwen3-MoE)")
    # LoRA (megatron_patch.lora)
    lora_rank: int = option(0, "LoRA rank; 0 trains every weight (MP_LORA_RANK)")
    lora_alpha: float = option(32.0, "LoRA alpha: the update is scaled by alpha / rank (MP_LORA_ALPHA)")
    lora_dropout: float = option(0.0, "dropout on the adapters' input (MP_LORA_DROPOUT)")
    lora_target_modules: tuple[str, ...] = option(("all",), "linears to adapt: linear_qkv linear_proj linear_fc1 "
                                             "linear_fc2 (experts included), HF names (q_proj ... down_proj) or all "
                                             "(MP_LORA_TARGETS)", nargs="+")
    save_lora_only: bool = option(False, "checkpoints hold the adapters (and their optimizer state) only")
    lora_load: str | None = option(None, "resume from an adapter checkpoint (--save-lora-only); --load gives the base")
    # Recompute
    recompute: str = option("none", "activation recompute: none, sel (core attention), full (whole layers), "
                                     "offload (activations to CPU)", choices=tuple(RECOMPUTE_MODES))
    recompute_num_layers: int = option(1, "full: layers per recompute group; offload: layers offloaded (MP_AC_LAYERS)")
    # Data
    train_mode: str = option("pretrain", "pretrain (every token trained) or finetune (SFT: loss mask, per-token loss)",
                              choices=("pretrain", "finetune"))
    dataset_type: str = option("idxmap", "idxmap (Megatron .bin/.idx from the toolkits) or raw (SFT JSON/JSONL, "
                                          "tokenized on the fly)", choices=("idxmap", "raw"))
    data_path: list[str] = option(list, "idxmap: dataset prefixes, optionally weighted ('0.7 a 0.3 b'); raw: "
                                           "JSON files", nargs="+")
    valid_data_path: list[str] | None = option(None, "raw: validation JSON files (idxmap uses --split)", nargs="+")
    split: str = option("99,1,0", "idxmap pretraining: train,valid,test split of the documents")
    sft_packing: bool = option(False, "SFT data was packed (build_sft --packing): position ids restart per sample and "
                                       "attention never crosses samples (MP_SFT_PACKING)")
    seed: int = option(1234, "random seed (initialisation, data order)")
    # Checkpoints
    load: str | None = option(None, "checkpoint to start from: an HF model directory (its safetensors read "
                                     "straight into this layout) or torch_dist converter output (both start at "
                                     "iteration 0), or one of our saves (resumes)")
    save: str | None = option(None, "checkpoint directory (iter_XXXXXXX/ and latest_checkpointed_iteration.txt)")
    save_interval: int | None = option(None, "save every N iterations (and at the end)")
    save_optim: bool = option(True, "save optimizer state, LR schedule and RNG with the weights "
                                     "(needed for exact resume)")
    load_optim: bool = option(True, "restore optimizer state, LR schedule, RNG and data position when resuming")
    auto_resume: bool = option(True, "when --save already holds a complete checkpoint, continue from the latest one "
                                      "(an interrupted run rerun as it was) instead of starting from --load")
    exit_interval: int | None = option(None, "stop (after saving) once the iteration is a multiple of this")
    save_hf: str | None = option(None, "also write an HF model directory here (config, safetensors, tokenizer, "
                                        "checksums.json) from the final save (needs --save): the converter's "
                                        "torch_dist -> HF of it, in the training precision; LoRA: the merged model "
                                        "(MP_SAVE_HF)")
    save_hf_interval: int | None = option(None, "also write --save-hf at every save whose iteration is a multiple of "
                                                 "this (the newer model replaces the older) (MP_SAVE_HF_INTERVAL)")
    save_peft: str | None = option(None, "LoRA: also write the final adapters here as an HF PEFT adapter "
                                          "(MP_SAVE_PEFT)")
    # Logging and validation
    log_interval: int = option(1, "print/log metrics every N iterations")
    eval_interval: int | None = option(None, "validation loss/perplexity every N iterations (None: off)")
    eval_iters: int = option(10, "validation batches per evaluation")
    tensorboard_dir: str | None = option(None, "TensorBoard event files here")
    log_dir: str | None = option(None, "metrics.jsonl (one JSON line per logged iteration) here")
    peak_tflops: float | None = option(None, "the device's peak dense TFLOP/s for MFU (default: known GPUs' bf16 peak)")
    device: str = option("auto", "cuda, cpu (gloo, for smoke tests) or auto", choices=("auto", "cuda", "cpu"))

    # ----------------------------------------------------------------------------------------------
    def check(self, world_size: int | None = None) -> None:
        """Raise TrainConfigError for an invalid combination, naming the setting."""
        def fail(message):
            raise TrainConfigError(message)

        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size", "expert_tensor_parallel_size", "micro_batch_size",
                     "global_batch_size", "seq_length", "train_iters", "log_interval", "eval_iters"):
            if getattr(self, name) < 1:
                fail(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "init_method_std"):
            if not math.isfinite(getattr(self, name)):
                fail(f"--{_flag(name)} must be a finite number, got {getattr(self, name)}")
        if self.lr_warmup_iters < 0:
            fail("--lr-warmup-iters must be >= 0")
        if self.min_lr > self.lr:
            fail(f"--min-lr {self.min_lr} is above --lr {self.lr}")
        if self.context_parallel_size > 1 and self.sft_packing:
            fail("--sft-packing is not supported with --context-parallel-size > 1")
        if self.dataset_type == "raw" and self.train_mode != "finetune":
            fail("--dataset-type raw is SFT data: it needs --train-mode finetune")
        if self.dataset_type == "raw" and self.max_padding_length not in (None, self.seq_length):
            fail(f"--max-padding-length {self.max_padding_length}: raw JSON samples are padded to --seq-length "
                 f"{self.seq_length}; give the same value")
        if self.sft_packing and self.train_mode != "finetune":
            fail("--sft-packing needs --train-mode finetune")
        if not self.data_path:
            fail("--data-path is required")
        if self.optimizer_offload_fraction is not None and not 0 <= self.optimizer_offload_fraction <= 1:
            fail(f"--optimizer-offload-fraction must be within [0, 1], got {self.optimizer_offload_fraction}")
        if self.save_interval is not None and self.save is None:
            fail("--save-interval needs --save")
        if self.save_interval is not None and self.save_interval < 1:
            fail("--save-interval must be >= 1")
        if (self.save_hf or self.save_peft) and self.save is None:
            fail("--save-hf and --save-peft are written from the final save: they need --save")
        if self.save_hf_interval is not None and (self.save_hf is None or self.save_hf_interval < 1):
            fail("--save-hf-interval needs --save-hf and must be >= 1")
        if self.save_peft and not self.lora_rank:
            fail("--save-peft writes LoRA adapters: it needs --lora-rank > 0 (MP_LORA_RANK)")
        # An output never replaces an input of the same run (links followed): the model directory, the
        # tokenizer, --load, nor another output.
        inputs = {"--model": self.model if Path(self.model).exists() else None, "--tokenizer": self.tokenizer,
                  "--load": self.load}
        hf_outputs = {"--save-hf": self.save_hf, "--save-peft": self.save_peft}
        for label, path in hf_outputs.items():
            for other_label, other in {"--save": self.save, **inputs, **hf_outputs}.items():
                if path and other and other_label != label and overlaps(Path(path), Path(other)):
                    fail(f"{label} {path} is, contains or lies inside {other_label} {other}")
        for label in ("--model", "--tokenizer"):  # a save's side files (config.json, tokenizer) would land there
            other = inputs[label]
            if self.save and other and within(Path(self.save), Path(other)):
                fail(f"--save {self.save} is or lies inside {label} {other}")
        if self.eval_interval is not None and self.dataset_type == "raw" and not self.valid_data_path:
            fail("--eval-interval with --dataset-type raw needs --valid-data-path")
        if self.recompute == "full" and self.recompute_num_layers < 1:
            fail("--recompute-num-layers must be >= 1")
        if self.lora_rank < 0:
            fail(f"--lora-rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank == 0 and (self.save_lora_only or self.lora_load):
            fail("--save-lora-only and --lora-load need --lora-rank > 0 (MP_LORA_RANK)")
        if self.lora_rank:
            try:
                LoraSettings(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_target_modules))
            except LoraConfigError as err:
                fail(str(err))
            if self.lora_load and not self.load:
                fail("--lora-load needs --load (the base model the adapters belong to)")
        if world_size is not None:
            model_parallel = (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                              * self.context_parallel_size)
            # An indivisible world is reported by the layout check (models/layout_check.py).
            dp = max(world_size // model_parallel, 1)
            if self.global_batch_size % (self.micro_batch_size * dp):
                fail(f"--global-batch-size {self.global_batch_size} is not a multiple of "
                     f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp}")

    @property
    def sft(self) -> bool:
        return self.train_mode == "finetune"

    @property
    def weights_precision(self) -> str:
        """The precision the weights are kept (and saved) in: fp8 computes on bf16 weights."""
        return "bf16" if self.precision == "fp8" else self.precision

    @property
    def uses_distributed_optimizer(self) -> bool:
        """The distributed optimizer is on when asked for, and always under optimizer offload (which needs it)."""
        return self.use_distributed_optimizer or self.optimizer_offload_fraction is not None

    def micro_batches(self, data_parallel_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return max(self.global_batch_size // (self.micro_batch_size * data_parallel_size), 1)

    def parallel_layout(self, arch: Qwen3Arch) -> ParallelLayout:
        return ParallelLayout(
            tp=self.tensor_model_parallel_size, pp=self.pipeline_model_parallel_size,
            ep=self.expert_model_parallel_size, etp=self.expert_tensor_parallel_size,
            cp=self.context_parallel_size, sequence_parallel=self.sequence_parallel,
            virtual_pp=virtual_stages(arch.num_layers, self.pipeline_model_parallel_size,
                                      self.num_layers_per_virtual_pipeline_stage),
        )

    def run_features(self) -> RunFeatures:
        """What beyond the parallel sizes decides whether the layout can run (models/layout_check.py)."""
        return RunFeatures(
            precision=self.precision, recompute=self.recompute, recompute_num_layers=self.recompute_num_layers,
            first_stage_layers=self.decoder_first_pipeline_num_layers,
            layers_per_virtual_stage=self.num_layers_per_virtual_pipeline_stage, lora=self.lora_rank > 0,
        )

    def resolved_decay_iters(self) -> int:
        return self.train_iters if self.lr_decay_iters is None else self.lr_decay_iters

    def to_dict(self) -> dict:
        """Plain values (tuples as lists), as YAML writes and --config reads them."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}


def _flag(name: str, settings_class=None) -> str:
    spec = {f.name: f for f in dataclasses.fields(settings_class or TrainConfig)}[name]
    return (spec.metadata.get("flag") or name.replace("_", "-")).lstrip("-")


def add_flags(parser: argparse.ArgumentParser, settings_class) -> None:
    """One flag per field of a settings dataclass (``option`` fields), with its help and default."""
    for spec in dataclasses.fields(settings_class):
        flag = "--" + _flag(spec.name, settings_class)
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        env = spec.metadata.get("env")
        help_text = f"{spec.metadata['help']}{f' ({env})' if env else ''} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kwargs = {k: v for k, v in spec.metadata.items() if k not in ("help", "flag", "env")}
        parser.add_argument(flag, dest=spec.name, type=_scalar_type(spec), help=help_text, **kwargs)


def build_parser(prog: str = "python -m megatron_patch.train", description: str | None = None,
                 settings_classes: tuple = (TrainConfig,)) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description or "Pretrain or fine-tune Qwen3 / Qwen3-MoE on Megatron-Core (GPU, or CPU with "
                                   "gloo). Run under torchrun for more than one process. Settings come from these "
                                   "flags and/or --config FILE.yaml (keys are the flag names with underscores); "
                                   "flags win.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", type=Path, help="YAML file of settings")
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    for settings_class in settings_classes:
        add_flags(parser, settings_class)
    return parser


def _scalar_type(spec):
    text = str(spec.type)
    for name, kind in (("float", float), ("int", int)):
        if text.startswith(name):
            return kind
    return str


def load_yaml(path: Path, settings_classes: tuple = (TrainConfig,)) -> dict:
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise TrainConfigError(f"{path}: {err}") from None
    if not isinstance(values, dict):
        raise TrainConfigError(f"{path}: expected a mapping of settings")
    known = {f.name for settings_class in settings_classes for f in dataclasses.fields(settings_class)}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TrainConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return values


def parse_settings(argv, parser: argparse.ArgumentParser, settings_classes: tuple) -> tuple[list, bool]:
    """(one instance per settings class, print_only) from the command line and its --config file."""
    args = vars(parser.parse_args(argv))
    print_only = args.pop("print_config", False)
    values = load_yaml(args.pop("config"), settings_classes) if "config" in args else {}
    values.update(args)
    if isinstance(values.get("data_path"), str):
        values["data_path"] = values["data_path"].split()
    settings = []
    for settings_class in settings_classes:
        names = {f.name for f in dataclasses.fields(settings_class)}
        try:
            settings.append(settings_class(**{k: v for k, v in values.items() if k in names}))
        except TypeError as err:
            raise TrainConfigError(str(err)) from None
    return settings, print_only


def parse_config(argv=None) -> tuple[TrainConfig, bool]:
    """(config, print_only) from the command line (and its --config file)."""
    (config,), print_only = parse_settings(argv, build_parser(), (TrainConfig,))
    return config, print_only
