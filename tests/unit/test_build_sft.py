"""SFT idxmap: every sample written once, boundaries and masks intact, packing within SEQ_LEN."""

import json
import random

import pytest

from megatron_patch.data.build_sft import MASK_SUFFIX
from megatron_patch.data.build_sft import main as build_main
from megatron_patch.data.chat import messages_from_record, tokenize_conversation
from megatron_patch.data.packing import first_fit_decreasing
from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir


def records(count, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta 你好 世界 数据".split()
    out = []
    for i in range(count):
        question = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        if i % 3 == 0:
            out.append({"instruction": f"Q{i}: {question}", "output": answer})
        elif i % 3 == 1:
            out.append({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
        else:
            out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
    return path


def read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, masks = IndexedDataset(str(prefix)), IndexedDataset(f"{prefix}{MASK_SUFFIX}")
    documents = []
    for d in range(len(tokens.document_indices) - 1):
        first, last = tokens.document_indices[d], tokens.document_indices[d + 1]
        assert (first, last) == (masks.document_indices[d], masks.document_indices[d + 1])
        documents.append([(tokens[s].tolist(), masks[s].tolist()) for s in range(first, last)])
    return documents


def build(*args):
    return build_main(["--tokenizer", str(bundled_qwen3_tokenizer_dir()), *map(str, args)])


@pytest.mark.parametrize("packing", [False, True])
def test_every_sample_is_written_once_with_its_mask(packing, tokenizer, tmp_path):
    items = records(60)
    source = write_jsonl(tmp_path / "train.jsonl", items)
    args = ["--input", source, "--seq-length", 256, "--output-prefix", tmp_path / "sft"]
    assert build(*args, *(["--packing"] if packing else [])) == 0
    expected = sorted(
        tuple(map(tuple, tokenize_conversation(tokenizer, messages_from_record(r)))) for r in items
    )
    documents = read_back(tmp_path / "sft")
    written = sorted((tuple(ids), tuple(mask)) for document in documents for ids, mask in document)
    assert written == expected
    for document in documents:
        assert sum(len(ids) - 1 for ids, _ in document) <= 256
        for ids, _ in document:
            assert ids[0] == tokenizer.im_start  # each sequence is one whole sample
    if packing:
        assert len(documents) < len(items) // 3  # really packed
    else:
        assert len(documents) == len(items)


def test_exact_fill_truncation_and_skips_are_counted(tokenizer, tmp_path, capsys):
    sample = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    length = len(tokenize_conversation(tokenizer, messages_from_record(sample))[0])
    long_answer = {"instruction": "long", "output": " ".join(["word"] * 400)}
    long_prompt = {"instruction": " ".join(["word"] * 400), "output": "short"}
    source = write_jsonl(tmp_path / "train.jsonl", [sample, long_answer, long_prompt])
    # SEQ_LEN = length - 1: the first sample fills a sequence exactly.
    assert build("--input", source, "--seq-length", length - 1, "--output-prefix", tmp_path / "a", "--packing") == 0
    out = capsys.readouterr().out
    assert "samples read 3, written 2" in out and "truncated 2" in out and "1 without a target" in out
    documents = read_back(tmp_path / "a")
    assert [len(ids) for document in documents for ids, _ in document] == [length, length]
    assert build("--input", source, "--seq-length", length - 1, "--output-prefix", tmp_path / "b",
                 "--overlong", "skip") == 0
    out = capsys.readouterr().out
    assert "written 1 in 1 sequences" in out and "2 over-long" in out


def test_bad_records_are_named(tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    good = json.dumps(records(1)[0])
    source.write_text(f'{good}\n{{"conversations": [{{"from": "robot", "value": "x"}}]}}\n{good}\n')
    assert build("--input", source, "--seq-length", 64, "--output-prefix", tmp_path / "x") == 2
    assert f"error: {source}:2: conversations[0]: unknown role 'robot'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*x*"))
    assert build("--input", source, "--seq-length", 64, "--output-prefix", tmp_path / "x", "--skip-bad-lines") == 0
    assert "written 2" in capsys.readouterr().out


def test_first_fit_decreasing_places_each_item_once():
    rng = random.Random(3)
    sizes = [rng.randint(0, 100) for _ in range(500)] + [100, 100]
    bins = first_fit_decreasing(sizes, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in b) <= 100 for b in bins)
    # Replay in placement order (longest first): no earlier open bin had room for the item.
    bin_of = {i: b for b, items in enumerate(bins) for i in items}
    free, opened = [100] * len(bins), set()
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        assert all(free[b] < sizes[i] for b in opened if b < bin_of[i])
        opened.add(bin_of[i])
        free[bin_of[i]] -= sizes[i]
    assert sorted(opened) == list(range(len(bins)))
    with pytest.raises(ValueError):
        first_fit_decreasing([101], 100)


@pytest.mark.slow
def test_toolkit_script(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "toolkits/sft_data_preprocessing/run_build_idxmap_sft_dataset.sh"
    write_jsonl(tmp_path / "train.jsonl", records(12))
    result = subprocess.run(["bash", str(script), "train.jsonl", "Qwen3Tokenizer", "128", "out/sft",
                             str(bundled_qwen3_tokenizer_dir()), "true"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sum(len(document) for document in read_back(tmp_path / "out" / "sft")) == 12
    result = subprocess.run(["bash", str(script), "a", "GPT2Tokenizer", "128", "b", "c"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "TOKENIZER must be Qwen3Tokenizer" in result.stderr


def test_script_arguments_match_readme():
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "toolkits" / "sft_data_preprocessing"
    script = (folder / "run_build_idxmap_sft_dataset.sh").read_text()
    positionals = [name for name, _ in re.findall(r"^([A-Z][A-Z0-9_]*)=\$\{?(\d)", script, re.MULTILINE)]
    readme = re.findall(r"^\| \d \| ([A-Z][A-Z0-9_]*) \|", (folder / "README.md").read_text(), re.MULTILINE)
    usage = re.search(r"usage: run_build_idxmap_sft_dataset.sh (.*)", script).group(1)
    assert positionals == readme == usage.replace("[", "").replace("]", "").split()


def test_two_workers_write_the_same_bytes(tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", records(2100, seed=11))  # two batches with two workers
    common = ["--input", source, "--seq-length", 256, "--packing"]
    assert build(*common, "--output-prefix", tmp_path / "one") == 0
    assert build(*common, "--output-prefix", tmp_path / "two", "--workers", 2) == 0
    for name in ("{}.bin", "{}.idx", "{}_loss_mask.bin", "{}_loss_mask.idx"):
        assert (tmp_path / name.format("one")).read_bytes() == (tmp_path / name.format("two")).read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("count", [3, 0])
def test_a_bad_tokenizer_directory_is_named(workers, count, tmp_path, capsys):
    # With workers the tokenizer loads only in them; its error must still reach the user, also for
    # an input without records.
    source = write_jsonl(tmp_path / "train.jsonl", records(count))
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    assert build_main(["--tokenizer", str(not_a_model), "--input", str(source), "--seq-length", "64",
                       "--output-prefix", str(tmp_path / "out" / "sft"), "--workers", str(workers)]) == 2
    assert f"error: {not_a_model / 'tokenizer.json'}: not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_a_huge_line_is_a_counted_skip_in_bounded_memory(tmp_path):
    """One 50 MB record took 6.4 GB while tokenized; over --max-record-bytes it is never held whole."""
    import subprocess
    import sys

    source = tmp_path / "train.jsonl"
    normal = json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\n"
    with open(source, "w") as handle:
        handle.write(normal)
        handle.write(json.dumps({"instruction": "x " * (25 << 20), "output": "y"}) + "\n")  # 50 MiB
        handle.write(normal)
    arguments = ["--input", str(source), "--tokenizer", str(bundled_qwen3_tokenizer_dir()), "--seq-length", "64",
                 "--output-prefix", str(tmp_path / "sft")]
    # The builder's own peak RSS (RUSAGE_CHILDREN would report this test process's largest child ever).
    measured = ("import resource, runpy, sys\n"
                "sys.argv = ['build_sft', *sys.argv[1:]]\n"
                "try:\n"
                "    runpy.run_module('megatron_patch.data.build_sft', run_name='__main__')\n"
                "finally:\n"
                "    print(f'peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n")
    refused = subprocess.run([sys.executable, "-c", measured, *arguments], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"error: {source}:2: 50.0 MiB on one line, over the limit of 8 MiB per record" in refused.stderr
    assert not list(tmp_path.glob("*sft*"))
    skipped = subprocess.run([sys.executable, "-c", measured, *arguments, "--skip-bad-lines"], capture_output=True,
                             text=True, timeout=300)
    assert skipped.returncode == 0, skipped.stderr
    assert f"skipped: {source}:2: 50.0 MiB on one line" in skipped.stderr
    assert "samples read 3, written 2" in skipped.stdout and "1 bad" in skipped.stdout, skipped.stdout
    small = tmp_path / "small.jsonl"
    small.write_text(normal * 2)
    baseline = subprocess.run([sys.executable, "-c", measured, "--input", str(small), *arguments[2:6],
                               "--output-prefix", str(tmp_path / "small")], capture_output=True, text=True, timeout=300)
    assert baseline.returncode == 0, baseline.stderr

    def peak_mib(result):
        return int(result.stderr.split("peak_rss_kib=")[1].split()[0]) / 1024

    # The 50 MiB line adds no more than a few read buffers to what the builder needs anyway.
    assert peak_mib(skipped) < peak_mib(baseline) + 64, (peak_mib(skipped), peak_mib(baseline))
