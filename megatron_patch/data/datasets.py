"""Training samples, one interface for every data kind: tokens, labels, loss_mask, position_ids, cu_seqlens.

- ``SftIdxmapDataset``: the output of ``build_sft`` (packed or not).
- ``RawJsonSftDataset``: the same formats, read as JSON and tokenized when a sample is asked for.
- ``pretrain_datasets``: Megatron-Core's ``GPTDataset`` over ``build_pretrain`` output (blends,
  splits), with the same keys.

Every sample is ``seq_length`` long. Inside a packed sequence each sample is shifted on its own
(labels never cross a boundary), position ids restart at each sample, and ``cu_seqlens`` lists
the boundaries ([0, end_1, ..., seq_length]; padding is a segment of its own), which is what
varlen/THD attention needs, or, on CPU, ``attention_mask_from_cu_seqlens``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_patch.data.build_sft import MASK_SUFFIX
from megatron_patch.data.chat import SampleError, messages_from_record, tokenize_conversation
from megatron_patch.data.records import ReadStats, RecordError, iter_records


def pack_samples(samples: list[tuple[list[int], list[int]]], seq_length: int, pad_id: int) -> dict:
    """One training sequence from whole samples (ids, target mask), each shifted on its own, padded."""
    tokens, labels, loss_mask, position_ids, boundaries = [], [], [], [], [0]
    for ids, mask in samples:
        tokens += ids[:-1]
        labels += ids[1:]
        loss_mask += mask[1:]
        position_ids += range(len(ids) - 1)
        boundaries.append(len(tokens))
    if len(tokens) > seq_length:
        raise ValueError(f"samples of {len(tokens)} positions do not fit seq_length {seq_length}")
    padding = seq_length - len(tokens)
    if padding:
        tokens += [pad_id] * padding
        labels += [pad_id] * padding
        loss_mask += [0] * padding
        position_ids += range(padding)
        boundaries.append(seq_length)
    return {
        "tokens": torch.tensor(tokens, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "loss_mask": torch.tensor(loss_mask, dtype=torch.float),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        "cu_seqlens": torch.tensor(boundaries, dtype=torch.int32),
    }


def attention_mask_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[1, 1, S, S] boolean mask (True = masked): causal and never across segments.

    For paths without varlen attention.
    """
    segment = torch.zeros(seq_length, dtype=torch.long)
    for index, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        segment[start:end] = index
    causal = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    same = segment.unsqueeze(0) == segment.unsqueeze(1)
    return ~(causal & same).view(1, 1, seq_length, seq_length)


class SftIdxmapDataset(torch.utils.data.Dataset):
    """``build_sft`` output: one training sequence per document."""

    def __init__(self, prefix: str | Path, seq_length: int, pad_id: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.tokens = IndexedDataset(str(prefix))
        self.masks = IndexedDataset(f"{prefix}{MASK_SUFFIX}")
        if len(self.tokens) != len(self.masks):
            raise ValueError(f"{prefix}: tokens and {MASK_SUFFIX} hold different numbers of samples")
        self.seq_length, self.pad_id = seq_length, pad_id

    def __len__(self) -> int:
        return len(self.tokens.document_indices) - 1

    def samples(self, index: int) -> list[tuple[list[int], list[int]]]:
        first, last = self.tokens.document_indices[index], self.tokens.document_indices[index + 1]
        return [(self.tokens[i].tolist(), self.masks[i].tolist()) for i in range(first, last)]

    def __getitem__(self, index: int) -> dict:
        return pack_samples(self.samples(index), self.seq_length, self.pad_id)


class RawJsonSftDataset(torch.utils.data.Dataset):
    """Alpaca / ShareGPT / messages records tokenized when asked for (``MP_DATASET_TYPE=raw``).

    Records are parsed and checked up front (bad ones raise with file:line); over-long samples are
    truncated to ``seq_length + 1`` tokens, and one left without a target yields an all-zero loss mask.
    """

    def __init__(self, paths, tokenizer, seq_length: int, fmt: str = "auto", enable_thinking: bool = True,
                 last_turn_only: bool = False):

        self.conversations = []
        for path in paths if isinstance(paths, (list, tuple)) else [paths]:
            for where, record in iter_records(path, ReadStats()):
                try:
                    self.conversations.append(messages_from_record(record, fmt))
                except SampleError as err:
                    raise RecordError(f"{where}: {err}") from None
        self.tokenizer, self.seq_length = tokenizer, seq_length
        self.enable_thinking, self.last_turn_only = enable_thinking, last_turn_only

    def __len__(self) -> int:
        return len(self.conversations)

    def samples(self, index: int) -> list[tuple[list[int], list[int]]]:
        ids, mask = tokenize_conversation(
            self.tokenizer, self.conversations[index], self.enable_thinking, self.last_turn_only
        )
        return [(ids[: self.seq_length + 1], mask[: self.seq_length + 1])]

    def __getitem__(self, index: int) -> dict:
        return pack_samples(self.samples(index), self.seq_length, self.tokenizer.pad)


class _WithBoundaries(torch.utils.data.Dataset):
    def __init__(self, dataset, seq_length: int):
        self.dataset, self.seq_length = dataset, seq_length

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        return {
            "tokens": sample["tokens"], "labels": sample["labels"], "loss_mask": sample["loss_mask"],
            "position_ids": sample["position_ids"],
            "cu_seqlens": torch.tensor([0, self.seq_length], dtype=torch.int32),
        }


def pretrain_datasets(prefixes: list[str], weights: list[float] | None, seq_length: int, sizes: list[int],
                      tokenizer, split: str = "99,1,0", seed: int = 1234, cache_dir: str | None = None):
    """(train, valid, test) Megatron-Core GPTDatasets over ``build_pretrain`` output, in this module's keys."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split, tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, path_to_cache=cache_dir,
    )
    built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
    return tuple(None if d is None else _WithBoundaries(d, seq_length) for d in built)
