"""The process Megatron-Core starts for checkpoint writes ends with the job, even after ``kill -9``.

megatron-core 0.16.1 and 0.19.2 ``dist_checkpointing/strategies/filesystem_async.py``
(``_get_write_results_queue``, public ``get_write_results_queue`` in 0.19): the first torch_dist save
starts a ``multiprocessing`` manager (``ctx.Manager().Queue()``, spawn context) to collect the writers'
results, and keeps it for the life of the process. A spawned process is a fork and an exec: neither the
parent-death signal the kit's workers ask for (``parallel.die_with_launcher``) nor their fork hooks
reach it, and a manager does not watch its parent. So ``kill -9`` of a job that had saved left one
~300 MB Python process per rank for good (seen after the vLLM killed-job test).
``patch_checkpoint_results_manager`` starts the same manager with ``end_with_parent`` as its
initializer. Delete when Megatron-Core ends the manager with its parent.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.managers import SyncManager

from megatron_patch.lifetime import end_with_parent

_PATCHED = False


def results_queue_function(filesystem_async) -> str:
    """The name of the function that starts the manager: ``_get_write_results_queue`` (0.16), public from 0.19."""
    for name in ("_get_write_results_queue", "get_write_results_queue"):
        if hasattr(filesystem_async, name):
            return name
    raise RuntimeError("megatron-core's filesystem_async has no (_)get_write_results_queue: "
                       "patches/checkpoint_writers.py needs a look at this version")


def patch_checkpoint_results_manager() -> bool:
    """Start the checkpoint writers' results manager so that it dies with this process; True if it patched."""
    global _PATCHED
    if _PATCHED:
        return False
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    name = results_queue_function(filesystem_async)

    def results_queue(mp_mode: str = "spawn"):
        # 0.16.1 defines the module's _results_queue = None; 0.19.2 only assigns it in the function.
        if getattr(filesystem_async, "_results_queue", None) is None:
            manager = SyncManager(ctx=multiprocessing.get_context(mp_mode))
            manager.start(initializer=end_with_parent)
            filesystem_async._results_queue = manager.Queue()  # the queue's proxy keeps the manager alive
        return filesystem_async._results_queue

    setattr(filesystem_async, name, results_queue)
    _PATCHED = True
    return True
