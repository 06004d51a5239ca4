"""Upstream warnings that say nothing a user can act on, silenced by entry points (never at import).

Call ``silence_upstream_warnings()`` before Megatron-Core is imported: most of these fire while
its modules load.
"""

from __future__ import annotations

import logging
import warnings

# (message prefix, category): checked on megatron-core 0.16.1 and torch 2.13.
UPSTREAM_NOISE = (
    # Every machine without Transformer-Engine/Apex (all of ours but TE GPU builds).
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed", UserWarning),
    ("Transformer Engine is not installed", UserWarning),
    # megatron-core 0.16.1's own TransformerConfig defaults trigger this deprecation.
    ("full scope is deprecated", UserWarning),
    # 0.16.1's distributed optimizer zero_grad reads .grad of its shard views
    # (optimizer.py _zero_grad_group_helper); harmless, fires every step.
    ("The .grad attribute of a Tensor that is not a leaf Tensor", UserWarning),
)


# (logger, message prefix): log records of the same kind.
UPSTREAM_LOG_NOISE = (
    # PyPI's CUDA torch on a machine without CUDA (the Python 3.12 lane here), when megatron-core
    # 0.19 imports torch.utils.cpp_extension: nothing is compiled, so CUDA_HOME does not matter.
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
)


class _DropLogRecords(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_LOG_FILTERS_ADDED = False


def silence_upstream_warnings() -> None:
    """Idempotent: filters are added once per process."""
    global _LOG_FILTERS_ADDED
    for message, category in UPSTREAM_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not _LOG_FILTERS_ADDED:
        _LOG_FILTERS_ADDED = True
        for logger, prefix in UPSTREAM_LOG_NOISE:
            logging.getLogger(logger).addFilter(_DropLogRecords(prefix))
