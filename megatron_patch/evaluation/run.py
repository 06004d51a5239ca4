"""Evaluate a model on CMMLU / C-Eval with lm-eval, offline (what run_eval.sh calls).

  python -m megatron_patch.evaluation MODEL_PATH DATA_DIR TASKS [options]

MODEL_PATH: an HF model directory (lm-eval's ``hf`` model) or a torch_dist checkpoint directory
(our ``megatron`` model, in-process on Megatron-Core; no conversion). DATA_DIR: ``cmmlu/`` and
``ceval/`` in their official CSV layouts. TASKS: ``cmmlu``, ``ceval-valid`` (or ``ceval``), or
subject tasks such as ``cmmlu_agronomy``, comma-separated. Nothing is fetched from a hub: the
HF offline switches are set and datasets' cache goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from megatron_patch.errors import InputError, report_input_error
from megatron_patch.evaluation.tasks import EvalDataError, check_data, select, write_task_configs
from megatron_patch.models.choices import DTYPE_NAMES, PRECISIONS
from megatron_patch.patches.warnings import silence_upstream_warnings

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def model_kind(path: str | Path) -> str:
    """'hf' or 'megatron' for a model directory; an error naming what each would need otherwise."""
    path = Path(path)
    if path.is_dir():
        if (path / "latest_checkpointed_iteration.txt").is_file() or (path / "metadata.json").is_file():
            return "megatron"
        if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
            return "hf"
    raise EvalDataError(f"MODEL_PATH {path}: neither an HF model directory (config.json and *.safetensors) nor a "
                        f"torch_dist checkpoint (latest_checkpointed_iteration.txt or metadata.json)")


@dataclass
class EvalConfig:
    model_path: str
    data_dir: str
    tasks: str
    num_fewshot: int | None = None
    batch_size: int = 8
    limit: float | None = None
    output_path: str | None = None
    log_samples: bool = False
    apply_chat_template: bool = False
    device: str = "auto"
    precision: str = "fp32"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    tokenizer: str | None = None
    allow_missing_subjects: bool = False
    seed: int = 0
    model_args: dict = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_path", help="HF model directory or torch_dist checkpoint directory")
    parser.add_argument("data_dir", help="directory with cmmlu/ and ceval/ (official CSV layouts)")
    parser.add_argument("tasks", help="cmmlu, ceval-valid (ceval), or subject tasks, comma-separated")
    parser.add_argument("--num-fewshot", "--num_fewshot", "-f", type=int,
                        help="few-shot examples from the dev split (default 0, as lm-eval)")
    parser.add_argument("--batch-size", "--batch_size", "-b", type=int, default=8,
                        help="requests per forward pass (default 8)")
    parser.add_argument("--limit", "-L", type=float, help="at most this many questions per subject (a fraction if < 1)")
    parser.add_argument("--output-path", "--output_path", "-o",
                        help="write results.json (and samples with --log-samples) here")
    parser.add_argument("--log-samples", "--log_samples", "-s", action="store_true",
                        help="also write every request and its scores")
    parser.add_argument("--apply-chat-template", "--apply_chat_template", action="store_true",
                        help="prompt through the chat template")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS))
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="torch_dist models (torchrun)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="torch_dist models (torchrun)")
    parser.add_argument("--expert-model-parallel-size", type=int, default=1, help="torch_dist models (torchrun)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: beside the model, else the bundled Qwen3)")
    parser.add_argument("--allow-missing-subjects", action="store_true",
                        help="evaluate the subjects that have data files instead of stopping at the first gap")
    parser.add_argument("--seed", type=int, default=0, help="random seed of lm-eval's samplers")
    parser.add_argument("--model-args", "--model_args", default="", help="extra k=v,k=v for the lm-eval model")
    return parser


def parse_args(argv=None) -> EvalConfig:
    args = vars(build_parser().parse_args(argv))
    extra = args.pop("model_args")
    pairs = [item.split("=", 1) for item in extra.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise EvalDataError(f"--model-args {extra!r}: expected k=v,k=v")
    return EvalConfig(**args, model_args=dict(pairs))


def _model(config: EvalConfig, kind: str):
    """lm-eval model name and arguments for MODEL_PATH."""
    dtype = DTYPE_NAMES[config.precision]
    if kind == "hf":
        args = {"pretrained": config.model_path, "dtype": dtype}
    else:
        import megatron_patch.evaluation.megatron_lm  # noqa: F401  (registers "megatron")

        args = {"load": config.model_path, "precision": config.precision,
                "tensor_model_parallel_size": config.tensor_model_parallel_size,
                "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
                "expert_model_parallel_size": config.expert_model_parallel_size}
    if config.tokenizer:
        args["tokenizer"] = config.tokenizer
    args.update(config.model_args)
    return kind, args


def evaluate(config: EvalConfig) -> dict:
    """Run lm-eval on the selection; returns its results dict (on every rank)."""
    kind = model_kind(config.model_path)
    selection = check_data(config.data_dir, select(config.tasks), config.allow_missing_subjects)
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)
    device = config.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="megatron_patch_eval_") as scratch:
        # datasets writes an arrow cache even for local CSVs; keep it out of the user's HF cache.
        os.environ["HF_DATASETS_CACHE"] = str(Path(scratch) / "datasets")
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        tasks_dir = write_task_configs(config.data_dir, selection, Path(scratch) / "tasks")
        model, model_args = _model(config, kind)
        results = simple_evaluate(
            model=model, model_args=model_args, tasks=selection.task_names, num_fewshot=config.num_fewshot,
            batch_size=config.batch_size, device=device, limit=config.limit, log_samples=config.log_samples,
            apply_chat_template=config.apply_chat_template, fewshot_as_multiturn=config.apply_chat_template,
            task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
            random_seed=config.seed, numpy_random_seed=config.seed, torch_random_seed=config.seed,
            fewshot_random_seed=config.seed,
        )
    return results


def write_results(results: dict, output_path: str | Path) -> Path:
    """OUTPUT/results.json (and samples_<task>.jsonl), each written whole under a temporary name first."""
    output = Path(output_path)
    output.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    for task, records in samples.items():
        _write_atomically(output / f"samples_{task}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))
    target = output / "results.json"
    _write_atomically(target, json.dumps(results, ensure_ascii=False, indent=2, default=str) + "\n")
    if samples:
        results["samples"] = samples
    return target


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def main(argv=None) -> int:
    silence_upstream_warnings()
    try:
        config = parse_args(argv)
        results = evaluate(config)
    except InputError as err:
        return report_input_error(err)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    from lm_eval.utils import make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if config.output_path:
        print(f"results: {write_results(results, config.output_path)}")
    return 0
