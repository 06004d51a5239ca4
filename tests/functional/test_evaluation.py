"""CMMLU / C-Eval through real lm-eval, offline: our megatron model on torch_dist vs lm-eval's hf model."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir
from megatron_patch.evaluation.run import main as run_main
from tests.functional.torchrun import REPO, torchrun_batch

pytestmark = pytest.mark.functional
SCRIPT = REPO / "LM-Evaluation-Harness" / "run_eval.sh"
DATA = REPO / "megatron_patch" / "resources" / "eval_data"
TASKS = "cmmlu,ceval-valid"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Qwen3-MoE as an HF directory (fp32, with the Qwen3 tokenizer) and its torch_dist conversion."""
    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint
    from megatron_patch.models.qwen3.presets import get_preset

    root = tmp_path_factory.mktemp("eval-models")
    hf_dir, mcore_dir = root / "hf", root / "mcore"
    save_random_hf_checkpoint(get_preset("tiny-moe").replace(num_layers=2), hf_dir)
    for path in Path(bundled_qwen3_tokenizer_dir()).iterdir():
        if path.is_file():
            shutil.copy(path, hf_dir / path.name)
    subprocess.run([sys.executable, "-m", "megatron_patch.convert", "--load-dir", hf_dir, "--save-dir", mcore_dir,
                    "--precision", "fp32"], check=True, capture_output=True, cwd=REPO)
    return hf_dir, mcore_dir


def offline_env(**extra) -> dict:
    # No hub: a dead endpoint makes any download attempt fail instead of silently succeeding.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "2", **extra}


# The same options in our spelling and in lm-eval's own (run_eval.sh takes both).
OPTIONS = {"ours": ["--num-fewshot", "2", "--batch-size", "4", "--output-path", "{out}", "--log-samples"],
           "lm-eval": ["--num_fewshot", "2", "-b", "4", "-o", "{out}", "--log_samples", "--model_args", "",
                       "--seed", "0"]}


def run_eval(model_dir, out_dir, *extra, nproc=1, spelling="ours") -> dict:
    options = [option.format(out=out_dir) for option in OPTIONS[spelling]]
    result = subprocess.run(
        ["bash", str(SCRIPT), str(model_dir), str(DATA), TASKS, "--allow-missing-subjects", *options,
         *map(str, extra)],
        capture_output=True, text=True, timeout=600, cwd="/", env=offline_env(MP_NPROC=str(nproc)),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cmmlu" in result.stdout and "acc" in result.stdout  # the table
    return json.loads((Path(out_dir) / "results.json").read_text())


def request_scores(out_dir) -> dict:
    scores = {}
    for path in sorted(Path(out_dir).glob("samples_*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            for choice, response in enumerate(record["resps"]):
                scores[(path.name, record["doc_id"], choice)] = float(response[0][0])
    return scores


def accuracies(results) -> dict:
    return {task: values["acc,none"] for task, values in results["results"].items()}


def test_megatron_model_on_torch_dist_matches_hf_model_on_its_export(models, tmp_path):
    hf_dir, mcore_dir = models
    hf = run_eval(hf_dir, tmp_path / "hf")
    ours = run_eval(mcore_dir, tmp_path / "megatron")
    assert set(accuracies(ours)) == {"cmmlu", "ceval-valid", "cmmlu_agronomy", "cmmlu_elementary_mathematics",
                                     "ceval-valid_computer_network", "ceval-valid_high_school_mathematics"}
    assert accuracies(ours) == accuracies(hf)
    # Group averages weigh subjects by size, as lm-eval's built-in groups do (8 and 10 questions).
    per_subject = accuracies(ours)
    expected = (8 * per_subject["cmmlu_agronomy"] + 10 * per_subject["cmmlu_elementary_mathematics"]) / 18
    assert per_subject["cmmlu"] == pytest.approx(expected)
    hf_scores, our_scores = request_scores(tmp_path / "hf"), request_scores(tmp_path / "megatron")
    assert len(our_scores) == 4 * (8 + 10 + 8 + 9) and set(our_scores) == set(hf_scores)
    worst = max(abs(our_scores[k] - hf_scores[k]) for k in hf_scores)
    assert worst < 1e-4, worst
    # The prompts are lm-eval's built-in ones: description, 2 dev examples, "答案：" and " A".
    sample = json.loads((tmp_path / "megatron" / "samples_cmmlu_agronomy.jsonl").read_text().splitlines()[0])
    context, continuation = sample["arguments"][0]
    assert context.startswith("以下是关于农学的单项选择题") and context.endswith("答案：") and continuation == " A"
    assert context.count("答案：") == 3


@pytest.fixture(scope="module")
def one_process(models, tmp_path_factory):
    """(results, per-request scores) of the megatron model in one process, options in lm-eval's spelling."""
    out_dir = tmp_path_factory.mktemp("eval-one-process")
    return run_eval(models[1], out_dir, spelling="lm-eval"), request_scores(out_dir)


PARALLEL_LAYOUTS = {"pp2": ["--pipeline-model-parallel-size", 2], "tp2": ["--tensor-model-parallel-size", 2],
                    "ep2": ["--expert-model-parallel-size", 2]}


@pytest.fixture(scope="module")
def parallel_runs(models, tmp_path_factory) -> Path:
    """The megatron model evaluated at each 2-process layout, one layout after another in one launch."""
    folder = tmp_path_factory.mktemp("eval-parallel")
    jobs = {name: ("eval", [models[1], DATA, TASKS, "--allow-missing-subjects",
                            *[option.format(out=folder / name) for option in OPTIONS["ours"]], *flags])
            for name, flags in PARALLEL_LAYOUTS.items()}
    torchrun_batch(2, jobs, folder / "batch", env=offline_env())
    return folder


@pytest.mark.slow  # a batch of 2-process evaluations (~30 s): make test-slow
@pytest.mark.parametrize("layout", PARALLEL_LAYOUTS)
def test_megatron_model_gives_the_same_scores_in_parallel_layouts(one_process, parallel_runs, layout):
    results, single = one_process
    parallel = json.loads((parallel_runs / layout / "results.json").read_text())
    assert accuracies(parallel) == accuracies(results)
    scores = request_scores(parallel_runs / layout)
    assert set(scores) == set(single) and max(abs(scores[k] - single[k]) for k in single) < 1e-4


@pytest.mark.parametrize("arguments, message", [
    (["{model}", "/nonexistent/data", TASKS], "DATA_DIR /nonexistent/data: not a directory"),
    (["{model}", str(DATA), "cmmlu"], "missing 130 data file(s): "),
    (["{model}", str(DATA), "cmmlu_nonsense"], "unknown task 'cmmlu_nonsense'"),
    (["/tmp", str(DATA), TASKS], "MODEL_PATH /tmp: neither an HF model directory"),
])
def test_bad_inputs_give_one_clear_line(models, capsys, arguments, message):
    hf_dir, _ = models
    status = run_main([a.format(model=hf_dir) for a in arguments])
    error = capsys.readouterr().err
    assert status == 2 and message in error, error
    assert len(error.strip().splitlines()) == 1


def test_prepare_installs_a_download_and_names_what_is_missing(tmp_path):
    from megatron_patch.evaluation.prepare import main as prepare

    # A CMMLU download as GitHub ships it (data/dev, data/test) in a zip; C-Eval as a folder.
    archive = tmp_path / "cmmlu.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in (DATA / "cmmlu").rglob("*.csv"):
            handle.write(path, f"CMMLU-master/data/{path.relative_to(DATA / 'cmmlu')}")
    data_dir = tmp_path / "data"
    status = prepare([str(data_dir), "--cmmlu", str(archive), "--ceval", str(DATA / "ceval")])
    assert status == 1  # 2 of 67 and 2 of 52 subjects
    copied = (data_dir / "cmmlu" / "test" / "agronomy.csv").read_bytes()
    assert copied == (DATA / "cmmlu/test/agronomy.csv").read_bytes()
    assert (data_dir / "ceval" / "val" / "computer_network_val.csv").is_file()


def test_prepare_names_missing_files_bad_headers_and_unsafe_archives(tmp_path, capsys):
    from megatron_patch.evaluation.prepare import main as prepare

    shutil.copytree(DATA, tmp_path / "data")
    (tmp_path / "data" / "cmmlu" / "dev" / "agronomy.csv").write_text("q,a\n1,2\n", encoding="utf-8")
    assert prepare([str(tmp_path / "data")]) == 1
    out = capsys.readouterr().out
    assert "cmmlu: 131 problem(s) over 67 subjects:" in out  # 65 subjects x 2 files, and the bad header
    assert "agronomy.csv: columns ['q', 'a'], expected" in out
    assert f"missing {tmp_path / 'data' / 'ceval' / 'val' / 'accountant_val.csv'}" in out
    unsafe = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(unsafe, "w") as handle:
        handle.writestr("../escape/dev/x.csv", "a")
    assert prepare([str(tmp_path / "other"), "--cmmlu", str(unsafe)]) == 2
    assert "unsafe member path" in capsys.readouterr().err


GENERATION_CHECK = """
import json, sys
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from megatron_patch.evaluation.megatron_lm import MegatronLM

hf_dir, mcore_dir = sys.argv[1:3]
ours = MegatronLM(load=mcore_dir, batch_size=2, device="cpu")
reference = HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=2)
prompts = ["以下是关于农学的单项选择题。\\n一年有多少个月？\\n答案：", "The capital of France is"]
generate = [Instance("generate_until", {}, (p, {"until": ["\\n\\n"], "max_gen_toks": 8, "do_sample": False}), i)
            for i, p in enumerate(prompts)]
rolling = [Instance("loglikelihood_rolling", {}, (p * 3,), i) for i, p in enumerate(prompts)]
print(json.dumps({
    "generated": [ours.generate_until(generate), reference.generate_until(generate)],
    "rolling": [ours.loglikelihood_rolling(rolling), reference.loglikelihood_rolling(rolling)],
}))
"""


def test_generation_and_rolling_loglikelihood_match_the_hf_model(models):
    hf_dir, mcore_dir = models
    result = subprocess.run([sys.executable, "-c", GENERATION_CHECK, str(hf_dir), str(mcore_dir)], capture_output=True,
                            text=True, timeout=600, cwd=REPO, env=offline_env(HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ours, reference = report["generated"]
    assert ours == reference and all(ours), report  # greedy text, cut at the stop string
    ours, reference = report["rolling"]
    assert ours == pytest.approx(reference, abs=1e-4) and all(v < 0 for v in ours), report
