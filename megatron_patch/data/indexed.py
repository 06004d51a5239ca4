"""Write Megatron-Core indexed datasets under temporary names; rename them into place only when complete."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def staged_indexed_datasets(output_prefix: str | Path, dtypes: dict[str, type]):
    """Yield ``{suffix: IndexedDatasetBuilder}`` for ``PREFIX<suffix>.bin/.idx``, one per entry of ``dtypes``.

    On success every dataset is finalized and renamed into place; on any error nothing is left.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    staging = output_prefix.with_name(f".{output_prefix.name}.incomplete")
    builders = {suffix: IndexedDatasetBuilder(f"{staging}{suffix}.bin", dtype=dtype)
                for suffix, dtype in dtypes.items()}
    try:
        yield builders
        for suffix, builder in builders.items():
            builder.finalize(f"{staging}{suffix}.idx")
    except BaseException:
        for suffix, builder in builders.items():
            builder.data_file.close()
            for extension in (".bin", ".idx"):
                Path(f"{staging}{suffix}{extension}").unlink(missing_ok=True)
        raise
    for suffix in builders:
        for extension in (".bin", ".idx"):
            os.replace(f"{staging}{suffix}{extension}", f"{output_prefix}{suffix}{extension}")
