"""Per-file checksums of every output the kit writes, checked when it is read back.

  OUT/checksums.json   {"algorithm": "xxh3_128", "files": {"release/__0_0.distcp": {"size": .., "digest": ..}}}

Written last into a staged output (so it covers every file there) and verified before a load:
a file that changed after it was written (a flipped bit, a truncated copy, an edit) is refused
with its name. xxh3-128 is not a cryptographic hash: it catches corruption, not a forger, who
could rewrite the manifest too. A directory saved before manifests existed loads with a note.

Hashing is split over the processes of the default group when it spans more than one (each
hashes a share of the files); the callers are collective then. A manifest may cover a
directory's parent: converter output keeps one at SAVE_DIR for SAVE_DIR/release too.

``MP_CHECKSUMS=0`` in the environment turns both off (to measure their cost, or on a filesystem
where reading a save back is dear); what is written so then loads later with a note.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist
import xxhash

from megatron_patch.errors import InputError

MANIFEST_FILE = "checksums.json"
ALGORITHM = "xxh3_128"
_BLOCK = 16 << 20
# Directories verified in this process, keyed by the manifest's identity: a job that opens the
# same checkpoint twice (setup, then load) reads its bytes for checking once.
_verified: set[tuple[str, int, int]] = set()
_noted: set[str] = set()  # directories without a manifest, said once


class ChecksumError(InputError):
    """A file whose bytes differ from what its directory's checksums.json recorded."""


def checksums_enabled() -> bool:
    return os.environ.get("MP_CHECKSUMS", "1").strip().lower() not in ("0", "off", "false", "no")


def file_digest(path: Path) -> str:
    digest = xxhash.xxh3_128()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
    return digest.hexdigest()


def _world() -> tuple[int, int]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shared(mine):
    """Every rank's ``mine``, in rank order (just ``[mine]`` in a single process)."""
    rank, world = _world()
    if world == 1:
        return [mine]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def write_manifest(directory: str | Path, made_from: str | None = None) -> Path:
    """Checksum every file under ``directory`` into ``directory/checksums.json`` (collective); ``made_from``
    records what the output was written from (an HF export's save: ``made_from``)."""
    directory = Path(directory)
    rank, world = _world()
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.name != MANIFEST_FILE)
    mine = {name: {"size": (directory / name).stat().st_size, "digest": file_digest(directory / name)}
            for name in files[rank::world]}
    entries = {}
    for part in _shared(mine):
        entries.update(part)
    path = directory / MANIFEST_FILE
    if rank == 0:
        temporary = directory / f".{MANIFEST_FILE}.tmp"
        record = {"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}
        if made_from is not None:
            record["made_from"] = made_from
        temporary.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(temporary, path)
    if world > 1:
        dist.barrier()
    return path


def output_made_from(directory: str | Path) -> str | None:
    """What ``directory`` (an output of the kit) was written from, as its manifest records; None if unknown."""
    try:
        value = json.loads((Path(directory) / MANIFEST_FILE).read_text()).get("made_from")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _find_manifest(directory: Path) -> tuple[Path, str] | None:
    """The manifest covering ``directory`` and the prefix of its files there."""
    if (directory / MANIFEST_FILE).is_file():
        return directory / MANIFEST_FILE, ""
    if (directory.parent / MANIFEST_FILE).is_file():
        return directory.parent / MANIFEST_FILE, directory.name + "/"
    return None


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"expected algorithm {ALGORITHM} and a files object")
        return {name: (int(entry["size"]), str(entry["digest"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ChecksumError(f"{path}: unreadable checksums ({type(err).__name__}: {err})") from None


def _first_problem(directory: Path, names: list[str], expected: dict) -> str | None:
    for name in names:
        path = directory / name
        size, digest = expected[name]
        if not path.is_file():
            return f"{path}: listed in {MANIFEST_FILE} but missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, {MANIFEST_FILE} recorded {size} (truncated or replaced)"
        if file_digest(path) != digest:
            return f"{path}: checksum mismatch (the file changed after it was written: a corrupt copy or disk)"
    return None


def _unverified(directory: Path, quiet: bool) -> bool:
    if not quiet and str(directory) not in _noted:
        _noted.add(str(directory))
        print(f"note: {directory} has no {MANIFEST_FILE} (saved before checksums existed); its files are not "
              "verified", flush=True)
    return False


def verify_manifest(directory: str | Path, only: tuple[str, ...] | None = None) -> bool:
    """Check the files of ``directory`` against their manifest; False when it has none.

    Collective over the default group (the files are shared out), except with ``only``: then this
    process checks just those files (that are listed), e.g. a checkpoint's common state before
    it is read. Raises ChecksumError naming the first file that is missing, resized or changed.
    """
    if not checksums_enabled():
        return False
    directory = Path(directory)
    rank, world = (0, 1) if only is not None else _world()
    found = _find_manifest(directory)
    if found is None:
        return _unverified(directory, quiet=only is not None or rank != 0)
    manifest_path, prefix = found
    stat = manifest_path.stat()
    identity = (str(directory.resolve()), stat.st_mtime_ns, stat.st_size)
    if only is None and identity in _verified:
        return True
    entries = _read_manifest(manifest_path)
    names = sorted(name for name in entries if name.startswith(prefix))
    if prefix and not names:  # the parent's manifest is of another output (e.g. a save beside converter output)
        return _unverified(directory, quiet=only is not None or rank != 0)
    if only is not None:
        names = [prefix + name for name in only if prefix + name in entries]
    problem = _first_problem(manifest_path.parent, names[rank::world], entries)
    problems = [problem] if world == 1 else [p for p in _shared(problem) if p is not None]
    if problems and problems[0] is not None:
        raise ChecksumError(problems[0])
    if only is None:
        _verified.add(identity)
    return True
