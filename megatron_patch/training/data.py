"""Micro-batches for the training loop: datasets from the settings, a resumable data-parallel order.

Sample order is a pure function of (seed, sample number): the global batch of iteration ``i``
holds samples ``i*GBS .. (i+1)*GBS - 1``; data-parallel rank ``r`` takes its contiguous share,
cut into micro-batches. So any layout sees the same global batch, and a resumed run continues
from ``consumed_samples`` with exactly the samples the uninterrupted run would have used.
SFT datasets are reshuffled each epoch (a permutation seeded by seed and epoch); Megatron-Core's
GPTDataset is already shuffled and sized to the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_patch.data.datasets import (
    RawJsonSftDataset,
    SftIdxmapDataset,
    attention_mask_from_cu_seqlens,
    pretrain_datasets,
)
from megatron_patch.errors import InputError


class DataConfigError(InputError):
    """Data settings that do not work; the message names the path or setting."""


def weighted_prefixes(paths: list[str]) -> tuple[list[str], list[float] | None]:
    """'0.7 a 0.3 b' (Megatron's blend syntax) or 'a b'."""
    try:
        weights = [float(p) for p in paths[0::2]]
    except ValueError:
        return list(paths), None
    if len(paths) % 2:
        raise DataConfigError(f"--data-path {' '.join(paths)}: weights and prefixes must alternate")
    return list(paths[1::2]), weights


def _split_range(split: str, count: int, part: int) -> range:
    """Documents [start, end) of part 0/1/2 of a 'train,valid,test' split, as Megatron rounds them."""
    weights = [float(w) for w in split.replace("/", ",").split(",")]
    weights = (weights + [0.0] * 3)[:3]
    total = sum(weights)
    bounds = [0]
    for weight in weights:
        bounds.append(bounds[-1] + int(round(weight / total * count)))
    bounds = [min(b, count) for b in bounds]
    bounds[-1] = count
    return range(bounds[part], bounds[part + 1])


class _Subset(torch.utils.data.Dataset):
    def __init__(self, dataset, indices: range):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]


def build_datasets(config, tokenizer):
    """(train, valid or None) datasets yielding tokens, labels, loss_mask, position_ids, cu_seqlens."""

    if config.dataset_type == "raw":
        train = RawJsonSftDataset(config.data_path, tokenizer, config.seq_length)
        valid = None
        if config.valid_data_path:
            valid = RawJsonSftDataset(config.valid_data_path, tokenizer, config.seq_length)
        return train, valid
    prefixes, weights = weighted_prefixes(config.data_path)  # checked by preflight.check_inputs
    if config.sft:
        if len(prefixes) != 1:
            raise DataConfigError("SFT idxmap training takes one --data-path prefix (build_sft output)")
        full = SftIdxmapDataset(prefixes[0], config.seq_length, tokenizer.pad)
        train = _Subset(full, _split_range(config.split, len(full), 0))
        valid = _Subset(full, _split_range(config.split, len(full), 1))
        return train, (valid if len(valid) else None)
    samples = config.train_iters * config.global_batch_size
    valid_samples = config.eval_iters * config.global_batch_size if config.eval_interval else 0
    train, valid, _ = pretrain_datasets(
        prefixes, weights, config.seq_length, [samples, valid_samples, 0], tokenizer, split=config.split,
        seed=config.seed,
    )
    return train, valid


@dataclass
class BatchOrder:
    """Which dataset index is sample number ``n`` (epoch-wise permutation, or identity)."""

    size: int
    seed: int
    shuffle: bool

    def __post_init__(self):
        if self.size == 0:
            raise DataConfigError("the training dataset is empty")
        self._epoch, self._order = -1, None

    def index(self, number: int) -> int:
        if not self.shuffle:
            return number % self.size
        epoch = number // self.size
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._epoch = epoch
        return int(self._order[number % self.size])


PACKING_MODES = ("none", "mask", "thd")


def collate(samples: list[dict], packing: str = "none") -> dict:
    """A micro-batch of samples. Packed samples keep attention inside each of their segments:

    - "thd": the micro-batch becomes one flat sequence [1, b*s] with ``cu_seqlens`` over all its
      segments, for varlen attention (our torch attention, Transformer-Engine); no s x s mask.
    - "mask": [b, s] with a block-diagonal causal mask, for Megatron-Core's local attention.
    RoPE sees only relative positions, so inside a segment both give what restarted position ids give.
    """
    if packing not in PACKING_MODES:
        raise ValueError(f"packing must be one of {PACKING_MODES}, got {packing!r}")
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask", "position_ids")}
    length = batch["tokens"].shape[1]
    if packing == "thd":
        starts = [s["cu_seqlens"][:-1] + index * length for index, s in enumerate(samples)]
        cu_seqlens = torch.cat([*starts, torch.tensor([len(samples) * length])]).to(torch.int32)
        batch = {key: value.reshape(1, -1) for key, value in batch.items()}
        batch["cu_seqlens"] = cu_seqlens
        batch["max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    elif packing == "mask":
        batch["attention_mask"] = torch.cat([attention_mask_from_cu_seqlens(s["cu_seqlens"], length) for s in samples])
    return batch


class MicroBatches:
    """The micro-batches of this data-parallel rank, iteration after iteration, from ``consumed_samples``."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0, seed: int = 1234, shuffle: bool = True, packing: str = "none",
                 device: str = "cpu"):
        self.dataset, self.order = dataset, BatchOrder(len(dataset), seed, shuffle)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.per_rank = dp_rank, global_batch_size // dp_size
        self.consumed_samples, self.packing, self.device = consumed_samples, packing, device

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.micro_batch_size

    def schedule_shape(self, seq_length: int) -> tuple[int, int]:
        """(sequence length, micro-batch size) for the pipeline schedule's activation shapes."""
        if self.packing == "thd":
            return seq_length * self.micro_batch_size, 1
        return seq_length, self.micro_batch_size

    def next_global_batch(self) -> list[dict]:
        """This rank's micro-batches of the next global batch."""
        first = self.consumed_samples + self.dp_rank * self.per_rank
        numbers = range(first, first + self.per_rank)
        self.consumed_samples += self.global_batch_size
        batches = []
        for start in range(0, self.per_rank, self.micro_batch_size):
            samples = [self.dataset[self.order.index(n)] for n in numbers[start : start + self.micro_batch_size]]
            batch = collate(samples, self.packing)
            batches.append({k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                            for k, v in batch.items()})
        return batches
