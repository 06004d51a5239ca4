"""Sizes as people write them on a command line: 5GB, 500MB, 80GiB."""

from __future__ import annotations

import argparse
import re

_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes of "5GB", "500MB", "80GiB", "1.5T" (binary multiples, as HF's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(float(match.group(1)) * _SCALE[match.group(2).upper()])
