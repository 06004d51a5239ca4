"""Output directories that appear only when complete, and the files that travel beside the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from megatron_patch.checkpoints.layout import CheckpointError

# Copied beside converted weights (Pai copies *.json and merges.txt): config, tokenizer, chat template.
SIDE_FILE_PATTERNS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
    "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "*.tiktoken", "*.model",
)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StagedOutput:
    """Build a directory under ``.<name>.incomplete`` and rename it into place only on success.

    A run that fails or is killed never leaves anything at the final path; a
    stale staging directory is removed by the next run. An existing non-empty
    final directory is replaced only with ``force``. Every rank of the default
    group (if any) enters and leaves together; rank 0 does the file work.
    """

    def __init__(self, final: str | Path, force: bool = False, label: str = "output directory"):
        self.final = Path(final).absolute()
        self.staging = self.final.with_name(f".{self.final.name}.incomplete")
        self.force = force
        self.label = label  # how the user named the destination (SAVE_DIR, --peft-out, ...)

    def __enter__(self) -> Path:
        if self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())) and not self.force:
            raise CheckpointError(f"{self.final} is not empty; choose another {self.label} or pass --force "
                                  "to replace it")
        if _is_rank0():
            if self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir(parents=True)
        _barrier()
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            if _is_rank0():
                shutil.rmtree(self.staging, ignore_errors=True)
            return False
        _barrier()
        if _is_rank0():
            replaced = None
            if self.final.exists():
                replaced = self.final.with_name(f".{self.final.name}.replaced")
                shutil.rmtree(replaced, ignore_errors=True)
                self.final.rename(replaced)
            self.staging.rename(self.final)
            if replaced is not None:
                shutil.rmtree(replaced)
        _barrier()
        return False


def copy_side_files(source: str | Path, destination: str | Path, dtype_name: str | None = None) -> list[str]:
    """Copy config/tokenizer files; with ``dtype_name``, config.json records the weights' new dtype."""
    source, destination = Path(source), Path(destination)
    copied = []
    for pattern in SIDE_FILE_PATTERNS:
        for path in sorted(source.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, destination / path.name)
                copied.append(path.name)
    config_path = destination / "config.json"
    if dtype_name and config_path.is_file():
        config = json.loads(config_path.read_text())
        # transformers 4.x writes torch_dtype, 5.x dtype; keep whichever the file uses.
        key = "dtype" if "dtype" in config else "torch_dtype"
        config[key] = dtype_name
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return copied
