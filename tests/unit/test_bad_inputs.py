"""Bad input off the happy path, table-driven: each case through its real entry point gives one
``error:`` line naming the setting, file or line, exit status 2, no traceback, and leaves
nothing behind but its inputs."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from megatron_patch.convert.__main__ import main as convert_main
from megatron_patch.data.build_pretrain import main as build_pretrain_main
from megatron_patch.data.build_sft import main as build_sft_main
from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir
from megatron_patch.evaluation.prepare import main as prepare_main
from megatron_patch.evaluation.run import main as evaluate_main
from megatron_patch.plan.__main__ import main as plan_main
from megatron_patch.rl.__main__ import main as rl_main
from megatron_patch.rl.launch import GRPO
from megatron_patch.train import main as train_main
from megatron_patch.training.launch import main as launch_main
from tests.helpers import build_pretrain_data
from tests.unit.test_launch import arguments


def _config_with(hf_dir, folder, **fields):
    shutil.copytree(hf_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | fields))
    return folder


def _hf_config_list(hf_dir, folder):
    shutil.copytree(hf_dir, folder)
    (folder / "config.json").write_text("[1, 2]")
    return folder


def _garbage_tracker(hf_dir, folder):
    folder.mkdir()
    (folder / "latest_checkpointed_iteration.txt").write_text("soon\n")
    return folder


def _hf_with_a_missing_shard(hf_dir, folder):
    """An HF directory whose index names a second shard that is not there (an interrupted download)."""
    shutil.copytree(hf_dir, folder)
    from megatron_patch.models.hf_checkpoint import HFCheckpoint

    names = sorted(HFCheckpoint(folder).keys())
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + (n == names[-1])}-of-00002.safetensors" for n in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def _hf_with_tensor(hf_dir, folder, name, shape):
    """An HF directory (config unchanged) with ``name`` replaced by a tensor of another shape."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = torch.zeros(shape)
    save_file(tensors, folder / "model.safetensors")
    return folder


def _start_from(d, checkpoint, model="tiny-dense"):
    """The trainer's flags for a 1-step pretraining run on fresh data from ``checkpoint``."""
    data = build_pretrain_data(d / "data")
    return ["--model", model, "--precision", "fp32", "--data-path", data, "--seq-length", "64",
            "--global-batch-size", "1", "--train-iters", "1", "--load", checkpoint, "--save", d / "out"]


def _lines(folder, text):
    folder.mkdir()
    (folder / "train.jsonl").write_text(text)
    return folder / "train.jsonl"


EVAL_DATA = Path(__file__).resolve().parents[2] / "megatron_patch" / "resources" / "eval_data"


def _eval_data_with(folder, content: bytes):
    """A copy of the bundled eval data whose cmmlu agronomy test file holds ``content``."""
    shutil.copytree(EVAL_DATA, folder)
    (folder / "cmmlu" / "test" / "agronomy.csv").write_bytes(content)
    return folder


def _tar_with_a_link_outside(folder):
    folder.mkdir()
    path = folder / "cmmlu.tar"
    with tarfile.open(path, "w") as archive:
        link = tarfile.TarInfo("cmmlu/test/agronomy.csv")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        readme = tarfile.TarInfo("cmmlu/README")
        readme.size = 2
        archive.addfile(readme, io.BytesIO(b"hi"))
    return path


def _hf_with_index(hf_dir, folder, weight_map):
    """An HF directory whose model.safetensors.index.json holds ``weight_map`` (given the real tensor names)."""
    from megatron_patch.models.hf_checkpoint import HFCheckpoint

    shutil.copytree(hf_dir, folder)
    names = sorted(HFCheckpoint(folder).keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map(names)}))
    return folder


def _hf_with_int_weight(hf_dir, folder):
    """model.norm.weight stored as int32 (1.07e9 as a float): refused, not cast."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], 1 << 30, dtype=torch.int32)
    save_file(tensors, folder / "model.safetensors")
    return folder


def _kit_written_model(hf_dir, folder, link=None):
    """A copy of the HF model with the kit's checksums.json (as if the kit wrote it); ``link``: a symlink to it."""
    from megatron_patch.checkpoints.manifest import write_manifest

    shutil.copytree(hf_dir, folder)
    write_manifest(folder)
    if link is not None:
        link.symlink_to(folder)
    return folder


def _damaged_parquet(folder):
    """A verl-style prompt parquet whose middle pages are damaged."""
    import pyarrow
    import pyarrow.parquet

    folder.mkdir()
    path = folder / "train.parquet"
    rows = range(3000)
    table = pyarrow.table({"prompt": [f"question {i} " * 30 for i in rows], "label": [str(i) for i in rows]})
    pyarrow.parquet.write_table(table, path, row_group_size=500)
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 3000, 7):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _a_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's notes\n")
    return path


def _pretraining_run(d, **changes):
    data = build_pretrain_data(d / "data")
    return arguments(DATASET_PATH=data, VALID_DATASET_PATH=data, **changes)


# id: (entry point, arguments given the work folder and an HF model, environment, expected message)
CASES = {
    "launcher LR=nan": (launch_main, lambda d, hf: arguments(LR="nan"), {},
                        "LR (argument 5) must be a finite number, got 'nan'"),
    "launcher WORLD_SIZE=abc": (launch_main, lambda d, hf: arguments(ENV="dlc"), {"WORLD_SIZE": "abc"},
                                "WORLD_SIZE must be an integer, got 'abc'"),
    "trainer --lr nan": (train_main, lambda d, hf: ["--lr", "nan", "--data-path", "x", "--print-config"], {},
                         "--lr must be a finite number, got nan"),
    "config.json: a string for a number": (
        convert_main, lambda d, hf: ["--load-dir", _config_with(hf, d / "hf", num_hidden_layers="four"),
                                     "--save-dir", d / "out"], {},
        "config.json: num_hidden_layers must be an integer, got 'four'"),
    "config.json: not an object": (
        convert_main, lambda d, hf: ["--load-dir", _hf_config_list(hf, d / "hf"), "--save-dir", d / "out"], {},
        "config.json: expected a JSON object of settings, got list"),
    "garbage tracker": (
        convert_main, lambda d, hf: ["--mg2hf", "--load-dir", _garbage_tracker(hf, d / "run"), "--hf-dir", hf,
                                     "--save-dir", d / "out"], {},
        "latest_checkpointed_iteration.txt: expected an iteration number or 'release', got 'soon'"),
    "garbage --iteration": (
        convert_main, lambda d, hf: ["--mg2hf", "--load-dir", _garbage_tracker(hf, d / "run"), "--hf-dir", hf,
                                     "--iteration", "last", "--save-dir", d / "out"], {},
        "--iteration: expected an iteration number or 'release', got 'last'"),
    "empty SFT input": (
        build_sft_main, lambda d, hf: ["--input", _lines(d / "data", ""), "--tokenizer",
                                       bundled_qwen3_tokenizer_dir(), "--seq-length", "64", "--output-prefix",
                                       d / "out" / "sft"], {},
        "train.jsonl: no usable sample"),
    "eval CSV with other columns": (
        evaluate_main, lambda d, hf: [hf, _eval_data_with(d / "eval", "题目,甲,乙\n1,2,3\n".encode()),
                                      "cmmlu_agronomy", "--limit", "1"], {},
        "agronomy.csv: columns ['题目', '甲', '乙'], expected ['Question', 'A', 'B', 'C', 'D', 'Answer']"),
    "eval CSV not UTF-8": (
        evaluate_main, lambda d, hf: [hf, _eval_data_with(d / "eval", ",Question,A,B,C,D,Answer\n0,人体,皮,肝,心,肺,A\n"
                                                          .encode("gbk")), "cmmlu_agronomy", "--limit", "1"], {},
        "agronomy.csv: not UTF-8 (byte 27"),
    "tar member refused by the data filter": (
        prepare_main, lambda d, hf: [d / "data", "--cmmlu", _tar_with_a_link_outside(d / "download")], {},
        "cmmlu.tar: unsafe member 'cmmlu/test/agronomy.csv'"),
    "DATASET_PATH missing, before launch": (
        launch_main, lambda d, hf: arguments(DATASET_PATH=d / "nothing", VALID_DATASET_PATH=d / "nothing"), {},
        "--data-path (DATASET_PATH (argument 22)) "),
    "truncated .idx, before launch": (
        launch_main, lambda d, hf: arguments(DATASET_PATH=(p := build_pretrain_data(d / "data", truncate_idx=True)),
                                             VALID_DATASET_PATH=p), {},
        "corpus.idx: 182 bytes, its header needs 202 (truncated)"),
    "PRETRAIN_CHECKPOINT_PATH missing, before launch": (
        launch_main, lambda d, hf: arguments(DATASET_PATH=(p := build_pretrain_data(d / "data")), VALID_DATASET_PATH=p,
                                             PRETRAIN_CHECKPOINT_PATH=d / "no-checkpoint"), {},
        "no-checkpoint: no such directory"),
    "PRETRAIN_CHECKPOINT_PATH an HF directory missing a shard, before launch": (
        launch_main, lambda d, hf: arguments(DATASET_PATH=(p := build_pretrain_data(d / "data")), VALID_DATASET_PATH=p,
                                             MODEL_SIZE=hf,
                                             PRETRAIN_CHECKPOINT_PATH=_hf_with_a_missing_shard(hf, d / "hf")), {},
        "model-00002-of-00002.safetensors: listed in model.safetensors.index.json but missing"),
    "PRETRAIN_CHECKPOINT_PATH an HF directory of another MODEL_SIZE, before launch": (
        launch_main, lambda d, hf: arguments(DATASET_PATH=(p := build_pretrain_data(d / "data")), VALID_DATASET_PATH=p,
                                             PRETRAIN_CHECKPOINT_PATH=hf), {},
        "config.json: not the model being trained (vocab_size: 151936 != 512; the run's value first)"),
    "PRETRAIN_CHECKPOINT_PATH an HF directory of another architecture, before launch": (
        launch_main, lambda d, hf: arguments(DATASET_PATH=(p := build_pretrain_data(d / "data")), VALID_DATASET_PATH=p,
                                             MODEL_SIZE=hf,
                                             PRETRAIN_CHECKPOINT_PATH=_config_with(hf, d / "hf", model_type="llama",
                                                                                   architectures=["LlamaForCausalLM"])),
        {}, "config.json: unsupported architecture ['LlamaForCausalLM']"),
    "--output-prefix that would overwrite the input": (
        build_pretrain_main, lambda d, hf: ["--input", _lines(d / "data", '{"text": "a"}\n').rename(d / "x.bin"),
                                            "--tokenizer", bundled_qwen3_tokenizer_dir(), "--output-prefix",
                                            d / "x"], {},
        "x would overwrite the input"),
    "GRPO --seq-length below prompt + response": (
        rl_main, lambda d, hf: ["--data-path", "p.jsonl", "--seq-length", "64", "--max-prompt-length", "48",
                                "--max-response-length", "32", "--print-config"], {},
        "--seq-length 64 is below --max-prompt-length 48 + --max-response-length 32"),
    "GRPO prompt line without a label": (
        rl_main, lambda d, hf: ["--model", hf, "--data-path", _lines(d / "data", '{"prompt": "2 + 2?"}\n'),
                                "--seq-length", "1024"], {},
        'train.jsonl:1: expected a string "label"'),
    "GRPO launcher MP_GRPO_N=0": (
        lambda argv: launch_main(argv, job=GRPO), lambda d, hf: arguments(DATASET_PATH="p.jsonl"), {"MP_GRPO_N": "0"},
        "--samples-per-prompt (MP_GRPO_N) must be >= 1, got 0"),
    "GRPO reward file missing": (
        rl_main, lambda d, hf: ["--data-path", "p.jsonl", "--seq-length", "1024", "--reward",
                                f"custom:{d / 'mine.py'}:score"], {},
        "mine.py not found"),
    "HF index whose weight_map is a list, before launch": (
        launch_main, lambda d, hf: _pretraining_run(d, MODEL_SIZE=hf, PRETRAIN_CHECKPOINT_PATH=_hf_with_index(
            hf, d / "hf", lambda names: names)), {},
        "model.safetensors.index.json: weight_map is a list; expected an object of tensor name -> file name"),
    "HF index with a number for a file, before launch": (
        launch_main, lambda d, hf: _pretraining_run(d, MODEL_SIZE=hf, PRETRAIN_CHECKPOINT_PATH=_hf_with_index(
            hf, d / "hf", lambda names: dict.fromkeys(names, 1))), {},
        "model.safetensors.index.json: weight_map entry 'model.embed_tokens.weight' is 1; expected a file name"),
    "HF index naming a file outside its directory, before launch": (
        launch_main, lambda d, hf: _pretraining_run(d, MODEL_SIZE=hf, PRETRAIN_CHECKPOINT_PATH=_hf_with_index(
            hf, d / "hf", lambda names: dict.fromkeys(names, "../elsewhere/model.safetensors"))), {},
        "names '../elsewhere/model.safetensors', which is not a file in the index's own directory"),
    "HF weight stored as int32, before launch": (
        launch_main, lambda d, hf: _pretraining_run(d, MODEL_SIZE=hf, PRETRAIN_CHECKPOINT_PATH=_hf_with_int_weight(
            hf, d / "hf")), {},
        "model.safetensors: tensor model.norm.weight is stored as torch.int32; model weights are floating point"),
    "MP_SAVE_HF the kit-written model directory of MODEL_SIZE": (
        launch_main, lambda d, hf: arguments(MODEL_SIZE=_kit_written_model(hf, d / "model")),
        {"MP_SAVE_HF": "{d}/model"},
        "--save-hf (MP_SAVE_HF) {d}/model is, contains or lies inside --model (MODEL_SIZE (argument 2))"),
    "MP_SAVE_HF a link to the model directory of MODEL_SIZE": (
        launch_main, lambda d, hf: arguments(MODEL_SIZE=_kit_written_model(hf, d / "model", link=d / "link")),
        {"MP_SAVE_HF": "{d}/link"}, "{d}/link is, contains or lies inside --model (MODEL_SIZE (argument 2))"),
    "MP_SAVE_HF an existing file, before launch": (
        launch_main, lambda d, hf: _pretraining_run(d) if _a_file(d / "notes.txt") else None,
        {"MP_SAVE_HF": "{d}/notes.txt"},
        "--save-hf (MP_SAVE_HF) {d}/notes.txt is a file, not a directory; the kit never replaces a file"),
    "MP_SAVE_HF under a file, before launch": (
        launch_main, lambda d, hf: _pretraining_run(d) if _a_file(d / "notes.txt") else None,
        {"MP_SAVE_HF": "{d}/notes.txt/hf"}, "{d}/notes.txt is a file, so nothing can be written under it"),
    "MP_SAVE_HF where nothing can be written, before launch": (
        launch_main, lambda d, hf: _pretraining_run(d), {"MP_SAVE_HF": "/proc/mp-hf"},
        "--save-hf (MP_SAVE_HF) /proc/mp-hf: cannot write in /proc"),
    "GRPO prompt parquet with damaged pages": (
        rl_main, lambda d, hf: ["--model", hf, "--data-path", _damaged_parquet(d / "data"), "--seq-length", "1024"],
        {}, "train.parquet: cannot read the rows after row"),
    "GRPO --vllm-python a directory": (
        rl_main, lambda d, hf: ["--data-path", "p.jsonl", "--seq-length", "1024", "--rollout-engine", "vllm",
                                "--vllm-python", d], {},
        "is a directory; give the interpreter of vLLM's environment"),
    "MP_* typo, before anything starts": (
        launch_main, lambda d, hf: arguments(), {"MP_SFT_PACKNG": "true"},
        "MP_SFT_PACKNG (did you mean MP_SFT_PACKING?): no setting of this kit reads it; unset it or fix the name"),
    "MP_GRPO_* typo in the GRPO launcher": (
        lambda argv: launch_main(argv, job=GRPO), lambda d, hf: arguments(DATASET_PATH="p.jsonl"),
        {"MP_GRPO_REWRAD": "gsm8k"}, "MP_GRPO_REWRAD (did you mean MP_GRPO_REWARD?): no setting of this kit reads it"),
    "a newer kit's MP_* setting": (
        launch_main, lambda d, hf: arguments(), {"MP_ROLLOUT_ENGINES_PER_NODE": "2"},
        "MP_ROLLOUT_ENGINES_PER_NODE: no setting of this kit reads it"),
    "planner unknown preset": (
        plan_main, lambda d, hf: ["A4B", "--gpus", 8, "--seq-length", 4096, "--global-batch-size", 8], {},
        "MODEL_SIZE 'A4B': not a directory and not a preset"),
    "planner impossible constraint": (
        plan_main, lambda d, hf: ["tiny-moe", "--gpus", 4, "--seq-length", 128, "--global-batch-size", 8, "--tp", 3],
        {}, "--tensor-model-parallel-size 3 does not divide the 4 attention heads"),
    "planner memory that does not parse": (
        plan_main, lambda d, hf: ["tiny-moe", "--gpus", 4, "--seq-length", 128, "--global-batch-size", 8,
                                  "--gpu-memory", "80XB"], {},
        "--gpu-memory: not a size: '80XB'"),
    "dry run MP_GPU_MEMORY=lots": (
        launch_main, lambda d, hf: arguments(), {"MP_DRY_RUN": "true", "MP_GPU_MEMORY": "lots"},
        "MP_GPU_MEMORY: not a size: 'lots'"),
    "JSON line nested 100k deep": (
        build_sft_main, lambda d, hf: ["--input", _lines(d / "data", "[" * 100_000 + "\n"), "--tokenizer",
                                       bundled_qwen3_tokenizer_dir(), "--seq-length", "64", "--output-prefix",
                                       d / "out" / "sft", "--skip-bad-lines"], {},
        "nested too deeply"),
}


def _hf_with_nan(hf_dir, folder):
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    tensors["model.layers.1.mlp.up_proj.weight"][4, 5] = float("inf")
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("broken, message", [
    (lambda hf, d: _hf_with_tensor(hf, d, "model.layers.1.self_attn.k_proj.weight", (8, 64)),
     "model.safetensors: tensor model.layers.1.self_attn.k_proj.weight has shape (8, 64), the model needs (64, 64)"),
    (_hf_with_nan, "model.safetensors: tensor model.layers.1.mlp.up_proj.weight holds 2 NaN or Inf values of "),
], ids=["wrong shape", "NaN and Inf"])
def test_an_hf_directory_with_a_bad_tensor_stops_before_the_first_step(broken, message, hf_checkpoints, tmp_path):
    """Shapes and values are checked by each rank as it loads (no launcher-side read of every weight): a
    real trainer process, one line naming the file and the tensor, no step and no save. Before, a NaN weight
    gave a 40-line traceback from the gradient norm naming no tensor."""
    _, hf_dir, _ = hf_checkpoints["dense-tied"]
    start = broken(hf_dir, tmp_path / "hf")
    result = subprocess.run([sys.executable, "-m", "megatron_patch.train", *map(str, _start_from(tmp_path, start,
                                                                                           model=hf_dir))],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert message in errors[0]
    assert "iteration" not in result.stdout and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_leaves_nothing(case, hf_checkpoints, tmp_path, capsys, monkeypatch):
    entry, make_arguments, environment, message = CASES[case]
    for name, value in environment.items():
        monkeypatch.setenv(name, value.format(d=tmp_path))
    message = message.format(d=tmp_path)
    _, hf_dir, _ = hf_checkpoints["dense-tied"]
    status = entry([str(a) for a in make_arguments(tmp_path, hf_dir)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*incomplete*"))
