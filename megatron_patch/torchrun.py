"""python -m megatron_patch.torchrun: torchrun (``torch.distributed.run``, same arguments) that ends a
failed job with one line instead of its ChildFailedError report.

The kit's scripts start training, conversion and evaluation through it. A worker that met bad
input has already said so (rank 0 prints the line; see ``errors.report_input_error``): then
nothing is added, or the first worker's line when rank 0 did not print one. A worker that
crashed or was killed is named with its exit status; its traceback is above, as the worker
printed it. The exit status is 2 for bad input, else 1.
"""

from __future__ import annotations

import logging
import sys

from megatron_patch.errors import INPUT_ERROR_STATUS, TORCHRUN_MARK


def _ours(failure) -> tuple[dict, str] | None:
    """Our record in a worker's error file ({"printed": bool}) and its line, or None."""
    data = getattr(failure, "error_file_data", None) or {}
    message = data.get("message")
    if isinstance(message, dict):
        mark = (message.get("extraInfo") or {}).get(TORCHRUN_MARK)
        if isinstance(mark, dict):
            return mark, str(message.get("message", ""))
    return None


def summary(failures: dict) -> tuple[str | None, int]:
    """(the line to print or None, the exit status) for torchrun's failures {rank: ProcessFailure}."""
    marked = {rank: ours for rank, failure in failures.items() if (ours := _ours(failure)) is not None}
    if marked:
        if any(mark.get("printed") for mark, _ in marked.values()):
            return None, INPUT_ERROR_STATUS
        return f"error: {marked[min(marked)][1]}", INPUT_ERROR_STATUS
    rank = min(failures, key=lambda r: failures[r].timestamp)
    failure = failures[rank]
    how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit status {failure.exitcode}"
    others = f" ({len(failures) - 1} more workers failed after it)" if len(failures) > 1 else ""
    status = INPUT_ERROR_STATUS if failure.exitcode == INPUT_ERROR_STATUS else 1  # argparse's status, too
    return f"error: worker rank {rank} ended with {how}{others}; its own output above says why", status


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    # The agent's own log lines on a failure ("failed (exitcode: 2)", closing signals) say less than
    # the summary below; the OMP_NUM_THREADS banner is torchrun's default, not a problem.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.run").setLevel(logging.ERROR)
    try:
        run(args)
    except ChildFailedError as err:
        line, status = summary(err.failures)
        if line:
            print(line, file=sys.stderr, flush=True)
        return status
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
