"""CMMLU and C-Eval as lm-eval tasks over local CSV files: the built-in definitions, redirected.

lm-eval's own ``cmmlu`` and ``ceval-valid`` tasks read their data from the Hugging Face hub.
Here the same task names, prompts, few-shot splits, metrics and group averages are generated
from the installed lm-eval package's own YAML files (so they follow the installed version), with
only the data source changed to the official CSV layout in a local directory:

  DATA_DIR/cmmlu/dev/<subject>.csv, DATA_DIR/cmmlu/test/<subject>.csv          (CMMLU, 67 subjects)
  DATA_DIR/ceval/dev/<subject>_dev.csv, DATA_DIR/ceval/val/<subject>_val.csv  (C-Eval, 52 subjects)

C-Eval's dev files carry an ``explanation`` column its val files lack; ``usecols`` keeps the
columns the prompts use so the two splits load together.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from megatron_patch.errors import InputError


class EvalDataError(InputError):
    """Missing or unusable evaluation data; the message says what is missing and what to do."""


@dataclass(frozen=True)
class Suite:
    group: str  # lm-eval's group task name
    folder: str  # under DATA_DIR, and lm-eval's tasks/<folder>
    group_file: str
    template: str
    splits: dict[str, str]  # lm-eval split name -> file pattern under DATA_DIR/<folder>
    usecols: tuple[str, ...] | None = None

    def task_name(self, subject: str) -> str:
        return f"{self.group}_{subject}"

    def files(self, data_dir: Path, subject: str) -> dict[str, Path]:
        return {split: Path(data_dir) / self.folder / pattern.format(subject=subject)
                for split, pattern in self.splits.items()}


SUITES = {
    "cmmlu": Suite("cmmlu", "cmmlu", "_cmmlu.yaml", "_default_template_yaml",
                   {"test": "test/{subject}.csv", "dev": "dev/{subject}.csv"}),
    "ceval-valid": Suite("ceval-valid", "ceval", "_ceval-valid.yaml", "_default_ceval_yaml",
                         {"val": "val/{subject}_val.csv", "dev": "dev/{subject}_dev.csv"},
                         usecols=("id", "question", "A", "B", "C", "D", "answer")),
}
ALIASES = {"ceval": "ceval-valid"}


def _builtin_dir(suite: Suite) -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / suite.folder


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise EvalDataError(f"{path}: lm-eval's task definition is missing ({err}); reinstall lm-eval") from None


def builtin_subjects(suite: Suite) -> dict[str, str]:
    """subject -> its few-shot description, in lm-eval's group order (do not mutate: cached)."""
    return _builtin_subjects(suite.group)


@cache
def _builtin_subjects(group: str) -> dict[str, str]:
    # Read once per process: 67 / 52 YAML files, asked for by every task name and data check.
    suite = SUITES[group]
    folder = _builtin_dir(suite)
    subjects = {}
    for task in _read_yaml(folder / suite.group_file)["task"]:
        config = _read_yaml(folder / f"{task}.yaml")
        subjects[config["dataset_name"]] = config["description"]
    return subjects


@dataclass(frozen=True)
class Selection:
    """What ``--tasks`` asked for: whole groups and single subjects, per suite."""

    groups: tuple[str, ...]
    subjects: dict[str, tuple[str, ...]]  # suite group -> subjects asked for (a whole group: all)

    @property
    def task_names(self) -> list[str]:
        names = list(self.groups)
        for group, subjects in self.subjects.items():
            if group not in self.groups:
                names += [SUITES[group].task_name(s) for s in subjects]
        return names


def select(tasks: str | list[str]) -> Selection:
    """Parse 'cmmlu,ceval-valid' / 'cmmlu_agronomy' / 'ceval' into a Selection, naming unknown tasks."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    groups, subjects = [], {}
    for raw in (n.strip() for n in names):
        if not raw:
            continue
        name = ALIASES.get(raw, raw)
        if name in SUITES:
            groups.append(name)
            subjects[name] = tuple(builtin_subjects(SUITES[name]))
            continue
        for suite in SUITES.values():
            prefix = f"{suite.group}_"
            if name.startswith(prefix) and name[len(prefix):] in builtin_subjects(suite):
                if name[len(prefix):] not in subjects.get(suite.group, ()):
                    subjects[suite.group] = subjects.get(suite.group, ()) + (name[len(prefix):],)
                break
        else:
            raise EvalDataError(f"unknown task {raw!r}: use cmmlu, ceval-valid (or ceval), or one subject such as "
                                f"cmmlu_agronomy / ceval-valid_accountant")
    if not subjects:
        raise EvalDataError("no task given: use cmmlu, ceval-valid, or subject tasks")
    return Selection(tuple(dict.fromkeys(groups)), subjects)


def missing_files(data_dir: str | Path, selection: Selection) -> list[Path]:
    return [path for group, subjects in selection.subjects.items() for subject in subjects
            for path in SUITES[group].files(Path(data_dir), subject).values() if not path.is_file()]


# The columns lm-eval's task definitions read, as the official releases spell them.
HEADERS = {
    "cmmlu": ["Question", "A", "B", "C", "D", "Answer"],
    "ceval-valid": ["question", "A", "B", "C", "D", "answer"],
}


def csv_problem(path: Path, group: str) -> str | None:
    """Why lm-eval could not read ``path`` as a ``group`` data file (not UTF-8, other columns), or None."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"{path}: not UTF-8 (byte {err.start}: {raw[err.start:err.start + 4]!r}); save it as UTF-8"
    header = next(csv.reader(io.StringIO(text)), [])
    if not set(HEADERS[group]) <= set(header):
        return f"{path}: columns {header[:8]}, expected {HEADERS[group]}"
    return None


def check_data(data_dir: str | Path, selection: Selection, allow_missing: bool = False) -> Selection:
    """The selection restricted to subjects with data (with ``allow_missing``), or an error listing the gaps.

    Every file used must be UTF-8 with the official columns: lm-eval would otherwise fail deep
    inside ``datasets`` (or score the wrong column)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise EvalDataError(f"DATA_DIR {data_dir}: not a directory; it should hold cmmlu/ and ceval/ in their "
                            f"official layouts (python -m megatron_patch.evaluation.prepare sets it up)")
    missing = missing_files(data_dir, selection)
    if missing and not allow_missing:
        shown = ", ".join(str(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise EvalDataError(f"missing {len(missing)} data file(s): {shown}; run python -m "
                            "megatron_patch.evaluation.prepare to check the download, or pass "
                            "--allow-missing-subjects to evaluate the subjects that are there")
    kept = {}
    for group, subjects in selection.subjects.items():
        present = tuple(s for s in subjects if all(p.is_file() for p in SUITES[group].files(data_dir, s).values()))
        if present:
            kept[group] = present
    if not kept:
        raise EvalDataError(f"DATA_DIR {data_dir}: none of the requested subjects has data files")
    unreadable = [problem for group, subjects in kept.items() for subject in subjects
                  for path in SUITES[group].files(data_dir, subject).values()
                  if (problem := csv_problem(path, group)) is not None]
    if unreadable:
        more = f" (and {len(unreadable) - 1} more files)" if len(unreadable) > 1 else ""
        raise EvalDataError(unreadable[0] + more)
    return Selection(tuple(g for g in selection.groups if g in kept), kept)


def write_task_configs(data_dir: str | Path, selection: Selection, out_dir: str | Path) -> Path:
    """lm-eval task YAMLs for the selection, reading DATA_DIR's CSV files; returns ``out_dir``."""
    data_dir, out_dir = Path(data_dir).resolve(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for group, subjects in selection.subjects.items():
        suite = SUITES[group]
        template = _read_yaml(_builtin_dir(suite) / suite.template)
        template.update(dataset_path="csv", dataset_name=None)
        template_name = f"_{suite.folder}_local_template"
        (out_dir / template_name).write_text(yaml.safe_dump(template, allow_unicode=True), encoding="utf-8")
        descriptions = builtin_subjects(suite)
        for subject in subjects:
            kwargs = {"data_files": {split: str(path) for split, path in suite.files(data_dir, subject).items()}}
            if suite.usecols:
                kwargs["usecols"] = list(suite.usecols)
            task = {"include": template_name, "task": suite.task_name(subject),
                    "description": descriptions[subject], "dataset_kwargs": kwargs}
            (out_dir / f"{suite.task_name(subject)}.yaml").write_text(
                yaml.safe_dump(task, allow_unicode=True), encoding="utf-8")
        if group in selection.groups:
            config = _read_yaml(_builtin_dir(suite) / suite.group_file)
            config["task"] = [suite.task_name(s) for s in subjects]
            (out_dir / f"_{group}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return out_dir
