"""No silent wrong weights: every output carries checksums.json, every load checks it; --check-finite.

A flipped byte or a truncated file in converter output, a training save or an HF export is refused
with the file named; outputs written before checksums existed still load, with a note.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megatron_patch.checkpoints import MANIFEST_FILE, ChecksumError, load_weights
from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.models.hf_checkpoint import HFCheckpoint
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.patches.compat import common_state_files
from megatron_patch.training.checkpointing import load_checkpoint, save_checkpoint


def convert(*args):
    return convert_main([str(a) for a in args])


@pytest.fixture(scope="module")
def outputs(hf_checkpoints, megatron_world, tmp_path_factory):
    """(arch, HF source, torch_dist output, HF output of it) of a tiny MoE."""
    arch, hf_dir, _ = hf_checkpoints["moe-gqa"]
    root = tmp_path_factory.mktemp("checksums")
    assert convert("--load-dir", hf_dir, "--save-dir", root / "mcore", "--precision", "fp32") == 0
    assert convert("--mg2hf", "--load-dir", root / "mcore", "--save-dir", root / "hf", "--hf-dir", hf_dir,
                   "--precision", "fp32") == 0
    return arch, hf_dir, root / "mcore", root / "hf"


def listed(directory):
    return set(json.loads((directory / MANIFEST_FILE).read_text())["files"])


def flip_byte(path, offset=-100):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def one_error(capsys):
    err = capsys.readouterr().err  # also holds the progress bar
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_every_converter_output_lists_all_its_files(outputs):
    _, _, mcore, hf = outputs
    for directory in (mcore, hf):
        files = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
        assert listed(directory) == files - {MANIFEST_FILE}
    assert "release/.metadata" in listed(mcore) and "model.safetensors" in listed(hf)


def test_a_flipped_byte_in_torch_dist_is_refused_by_every_reader(outputs, hf_checkpoints, tmp_path, capsys):
    arch, hf_dir, mcore, _ = outputs
    copy = tmp_path / "mcore"
    shutil.copytree(mcore, copy)
    damaged = next((copy / "release").glob("*.distcp"))
    flip_byte(damaged)
    assert convert("--mg2hf", "--load-dir", copy, "--save-dir", tmp_path / "hf", "--hf-dir", hf_dir) == 2
    assert f"{damaged}: checksum mismatch" in one_error(capsys)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*incomplete*"))
    model = build_gpt_model(arch, BuildOptions(precision="fp32"))
    with pytest.raises(ChecksumError, match=f"{damaged}: checksum mismatch"):
        load_weights(copy, [model])


def test_a_truncated_or_missing_file_is_named(outputs, tmp_path, capsys):
    _, hf_dir, mcore, _ = outputs
    copy = tmp_path / "mcore"
    shutil.copytree(mcore, copy)
    damaged = next((copy / "release").glob("*.distcp"))
    damaged.write_bytes(damaged.read_bytes()[:-10])
    assert convert("--mg2hf", "--load-dir", copy, "--save-dir", tmp_path / "hf", "--hf-dir", hf_dir) == 2
    assert f"{damaged}: " in (line := one_error(capsys)) and "(truncated or replaced)" in line
    damaged.unlink()
    assert convert("--mg2hf", "--load-dir", copy, "--save-dir", tmp_path / "hf", "--hf-dir", hf_dir) == 2
    assert f"{damaged}: listed in {MANIFEST_FILE} but missing" in one_error(capsys)


def test_our_hf_output_is_checked_when_converted_back(outputs, tmp_path, capsys):
    _, _, _, hf = outputs
    copy = tmp_path / "hf"
    shutil.copytree(hf, copy)
    flip_byte(copy / "model.safetensors")
    assert convert("--load-dir", copy, "--save-dir", tmp_path / "back") == 2
    assert f"{copy / 'model.safetensors'}: checksum mismatch" in one_error(capsys)
    assert not (tmp_path / "back").exists()


def test_outputs_from_before_checksums_load_with_a_note(outputs, tmp_path, capsys):
    arch, hf_dir, mcore, _ = outputs
    copy = tmp_path / "mcore"
    shutil.copytree(mcore, copy)
    (copy / MANIFEST_FILE).unlink()
    assert convert("--mg2hf", "--load-dir", copy, "--save-dir", tmp_path / "hf", "--hf-dir", hf_dir,
                   "--precision", "fp32") == 0
    assert f"note: {copy / 'release'} has no {MANIFEST_FILE}" in capsys.readouterr().out
    expected, written = HFCheckpoint(hf_dir), HFCheckpoint(tmp_path / "hf")
    assert all(torch.equal(expected.get(name), written.get(name)) for name in expected.keys())


def test_a_training_save_is_checked_on_resume(outputs, tmp_path):
    arch, _, mcore, _ = outputs
    model = build_gpt_model(arch, BuildOptions(precision="fp32"))
    load_weights(mcore, [model])
    saved = save_checkpoint(tmp_path / "run", 3, [model], None, None, consumed_samples=12, save_optim=False)
    assert listed(saved) == {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    loaded = load_checkpoint(tmp_path / "run", [model], None, None, load_optim=False)
    assert loaded.source == str(saved)
    holder = saved / common_state_files(saved)[-1]  # common.pt, or the DCP file holding it (megatron-core 0.19+)
    flip_byte(holder, offset=-30)
    with pytest.raises(ChecksumError, match=f"{holder}: checksum mismatch"):
        load_checkpoint(tmp_path / "run", [model], None, None, load_optim=False)


def hf_copy_with(hf_dir, destination, name, change):
    shutil.copytree(hf_dir, destination)
    checkpoint = HFCheckpoint(hf_dir)
    tensors = {key: checkpoint.get(key).clone() for key in checkpoint.keys()}
    change(tensors[name])
    (destination / "model.safetensors").unlink()
    save_file(tensors, destination / "model.safetensors")
    return destination


@pytest.mark.parametrize("precision, value", [("bf16", float("nan")), ("fp16", 1e5)], ids=["nan", "fp16-overflow"])
def test_check_finite_names_the_tensor(precision, value, outputs, tmp_path, capsys):
    _, hf_dir, _, _ = outputs
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    source = hf_copy_with(hf_dir, tmp_path / "src", name, lambda t: t.view(-1)[:3].fill_(value))
    assert convert("--load-dir", source, "--save-dir", tmp_path / "out", "--precision", precision,
                   "--check-finite") == 2
    line = one_error(capsys)
    assert "--check-finite:" in line and "linear_fc1" in line and "layer 1, expert 2" in line, line
    assert "3 of" in line and not (tmp_path / "out").exists()
    assert convert("--load-dir", source, "--save-dir", tmp_path / "out", "--precision", precision) == 0


def test_check_finite_on_export_names_the_hf_tensor(outputs, tmp_path, capsys):
    _, hf_dir, mcore, _ = outputs
    assert convert("--mg2hf", "--load-dir", mcore, "--save-dir", tmp_path / "hf", "--hf-dir", hf_dir,
                   "--precision", "fp32", "--check-finite") == 0
    overflowing = hf_copy_with(hf_dir, tmp_path / "big", "model.norm.weight", lambda t: t.fill_(1e6))
    assert convert("--load-dir", overflowing, "--save-dir", tmp_path / "big-mcore", "--precision", "fp32") == 0
    assert convert("--mg2hf", "--load-dir", tmp_path / "big-mcore", "--save-dir", tmp_path / "hf16",
                   "--hf-dir", hf_dir, "--precision", "fp16", "--check-finite") == 2
    assert "--check-finite: model.norm.weight:" in one_error(capsys)


UNSHARE = shutil.which("unshare")


@pytest.mark.slow
def test_a_full_disk_is_said_in_one_line_and_nothing_is_left(outputs, tmp_path):
    """A 2 MiB tmpfs (in a private mount namespace) as SAVE_DIR's disk."""
    if UNSHARE is None or subprocess.run([UNSHARE, "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare -rm (user and mount namespaces) for a small private filesystem")
    _, hf_dir, _, _ = outputs
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=2m tmpfs {disk} && {sys.executable} -m megatron_patch.convert "
              f"--load-dir {hf_dir} --save-dir {disk}/out --precision fp32; echo status=$?; ls -A {disk}")
    result = subprocess.run([UNSHARE, "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    expected = f"error: no space left on the device writing {disk}/out"
    assert "Traceback" not in result.stderr and len(errors) == 1 and errors[0].startswith(expected), result.stderr
    listing = result.stdout.split("status=")[1].split()
    assert listing == ["2"], result.stdout  # the exit status, then nothing at all on the disk


def test_a_save_beside_converter_output_is_not_judged_by_the_converters_manifest(outputs, tmp_path, capsys):
    """Training that saves into the converter's SAVE_DIR: an old iteration there (no manifest of its
    own) is not in SAVE_DIR/checksums.json, which lists release/ only."""
    arch, _, mcore, _ = outputs
    copy = tmp_path / "mcore"
    shutil.copytree(mcore, copy)
    model = build_gpt_model(arch, BuildOptions(precision="fp32"))
    load_weights(copy, [model])
    saved = save_checkpoint(copy, 2, [model], None, None, consumed_samples=4, save_optim=False)
    (saved / MANIFEST_FILE).unlink()  # as a save from before checksums existed
    capsys.readouterr()
    load_checkpoint(copy, [model], None, None, load_optim=False)
    assert f"note: {saved} has no {MANIFEST_FILE}" in capsys.readouterr().out
