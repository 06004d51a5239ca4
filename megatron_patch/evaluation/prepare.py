"""Check (and set up) DATA_DIR for CMMLU and C-Eval from the user's own download.

  python -m megatron_patch.evaluation.prepare DATA_DIR [--cmmlu SRC] [--ceval SRC]

SRC is a folder or an archive (.zip, .tar, .tar.gz) of the official release: CMMLU's ``dev/`` and
``test/`` (``<subject>.csv``; GitHub haonan-li/CMMLU keeps them under ``data/``), C-Eval's ``dev/``
and ``val/`` (``<subject>_dev.csv`` / ``<subject>_val.csv``; the ``ceval-exam`` zip). The CSV files
are copied into DATA_DIR/cmmlu and DATA_DIR/ceval; C-Eval's test split (no answers) is not needed.
Then every subject of lm-eval's ``cmmlu`` (67) and ``ceval-valid`` (52) groups is checked: missing
files, and files without the official header, are listed by name. Exit status 0 when complete.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from megatron_patch.evaluation.tasks import SUITES, EvalDataError, Suite, builtin_subjects, csv_problem
from megatron_patch.patches.warnings import silence_upstream_warnings


def _unpack(source: Path, scratch: Path) -> Path:
    """A folder for SRC: itself, or the archive unpacked (members that would land outside are refused)."""
    if source.is_dir():
        return source
    if not source.is_file():
        raise EvalDataError(f"{source}: not found (give the downloaded folder or archive)")
    target = scratch / source.name
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for member in archive.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise EvalDataError(f"{source}: unsafe member path {member!r}; unpack it yourself")
            archive.extractall(target)
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as archive:
            try:
                archive.extractall(target, filter="data")
            except tarfile.FilterError as err:  # a link or path leading outside, a device file, ...
                raise EvalDataError(f"{source}: unsafe member {err.tarinfo.name!r} ({err}); unpack it yourself") \
                    from None
    else:
        raise EvalDataError(f"{source}: neither a folder nor a .zip/.tar archive")
    return target


def _find_root(folder: Path, suite: Suite) -> Path:
    """The folder holding the suite's split directories, searched downwards from ``folder``."""
    splits = [pattern.split("/")[0] for pattern in suite.splits.values()]
    candidates = [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]
    for candidate in candidates:
        if all(any((candidate / split).glob("*.csv")) for split in splits):
            return candidate
    raise EvalDataError(f"{folder}: no {' and '.join(s + '/' for s in splits)} folders of .csv files inside; "
                        f"is this the {suite.group} download?")


def install(source: Path, data_dir: Path, suite: Suite) -> int:
    """Copy the suite's split CSV files from ``source`` into DATA_DIR; returns how many were copied."""
    copied = 0
    with tempfile.TemporaryDirectory() as scratch:
        root = _find_root(_unpack(source, Path(scratch)), suite)
        for pattern in suite.splits.values():
            split = pattern.split("/")[0]
            destination = data_dir / suite.folder / split
            destination.mkdir(parents=True, exist_ok=True)
            for path in sorted((root / split).glob("*.csv")):
                shutil.copy2(path, destination / path.name)
                copied += 1
    return copied


def problems(data_dir: Path, suite: Suite) -> list[str]:
    """One line per missing subject file or file without the official columns."""
    found = []
    for subject in builtin_subjects(suite):
        for path in suite.files(data_dir, subject).values():
            if not path.is_file():
                found.append(f"missing {path}")
                continue
            problem = csv_problem(path, suite.group)
            if problem is not None:
                found.append(problem)
    return found


def main(argv=None) -> int:
    silence_upstream_warnings()
    parser = argparse.ArgumentParser(prog="python -m megatron_patch.evaluation.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--cmmlu", type=Path, help="CMMLU download: folder or archive")
    parser.add_argument("--ceval", type=Path, help="C-Eval download: folder or archive")
    args = parser.parse_args(argv)
    try:
        for source, suite in ((args.cmmlu, SUITES["cmmlu"]), (args.ceval, SUITES["ceval-valid"])):
            if source is not None:
                print(f"{suite.group}: copied {install(source, args.data_dir, suite)} files into "
                      f"{args.data_dir / suite.folder}")
    except EvalDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    complete = True
    for suite in SUITES.values():
        found = problems(args.data_dir, suite)
        total = len(builtin_subjects(suite))
        if not found:
            print(f"{suite.group}: all {total} subjects ready")
            continue
        complete = False
        print(f"{suite.group}: {len(found)} problem(s) over {total} subjects:")
        for line in found:
            print(f"  {line}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
