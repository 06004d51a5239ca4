"""Pretraining JSONL -> Megatron indexed dataset, read back by Megatron-Core's IndexedDataset and GPTDataset."""

import json

import pytest

from megatron_patch.data.build_pretrain import main as build_main
from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir

DOCUMENTS = ["Hello world.", "第二篇文档：你好，世界！", "  leading spaces\nand lines\n", "x" * 300, "Short."]


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)))
    return path


def build(*args):
    return build_main(["--tokenizer", str(bundled_qwen3_tokenizer_dir()), *map(str, args)])


def test_documents_read_back_through_megatron(tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    first = write_jsonl(tmp_path / "a.jsonl", DOCUMENTS[:3])
    second = write_jsonl(tmp_path / "b.jsonl", DOCUMENTS[3:])
    assert build("--input", first, second, "--output-prefix", tmp_path / "out" / "corpus") == 0
    dataset = IndexedDataset(str(tmp_path / "out" / "corpus"))
    assert len(dataset) == len(DOCUMENTS) and len(dataset.document_indices) == len(DOCUMENTS) + 1
    for index, text in enumerate(DOCUMENTS):
        assert dataset[index].tolist() == tokenizer.encode(text) + [tokenizer.eod]
        assert tokenizer.decode(dataset[index].tolist()) == text + "<|endoftext|>"


def test_two_workers_write_the_same_bytes(tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl", DOCUMENTS * 500)  # two batches for each of two workers
    assert build("--input", source, "--output-prefix", tmp_path / "one") == 0
    assert build("--input", source, "--output-prefix", tmp_path / "two", "--workers", "2") == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"one{suffix}").read_bytes() == (tmp_path / f"two{suffix}").read_bytes()


def test_gpt_dataset_samples_follow_the_documents(tokenizer, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    source = write_jsonl(tmp_path / "a.jsonl", DOCUMENTS * 4)
    assert build("--input", source, "--output-prefix", tmp_path / "corpus") == 0
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=16, blend=([str(tmp_path / "corpus")], None), split="100,0,0",
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [8, 0, 0], lambda: True, config).build()
    documents = [tokenizer.encode(d) for d in DOCUMENTS]
    assert len(train) >= 8
    for index in range(len(train)):
        sample = train[index]
        tokens, labels = sample["tokens"].tolist(), sample["labels"].tolist()
        assert tokens[1:] == labels[:-1]
        # GPTDataset shuffles whole documents and cuts windows across them: between two EODs
        # there is a whole document, before the first a document's end, after the last its start.
        pieces = _split(tokens + labels[-1:], tokenizer.eod)
        if len(pieces) == 1:  # inside one document
            assert any(_contains(d, pieces[0]) for d in documents)
            continue
        for piece in pieces[1:-1]:
            assert piece in documents
        assert any(d[len(d) - len(pieces[0]):] == pieces[0] for d in documents)
        assert any(d[: len(pieces[-1])] == pieces[-1] for d in documents)


def _contains(sequence, window):
    return any(sequence[i : i + len(window)] == window for i in range(len(sequence) - len(window) + 1))


def _split(tokens, separator):
    pieces, current = [], []
    for token in tokens:
        if token == separator:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    return pieces + [current]


def test_bad_lines_are_named_or_skipped(tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b'{"text": "ok"}\n{"text": broken}\n{"content": "no text key"}\n\xff\xfe\n{"text": "also ok"}\n')
    assert build("--input", source, "--output-prefix", tmp_path / "out") == 2
    assert f"error: {source}:2: invalid JSON" in capsys.readouterr().err
    assert not list(tmp_path.glob("*out*"))
    assert build("--input", source, "--output-prefix", tmp_path / "out", "--skip-bad-lines") == 0
    captured = capsys.readouterr()
    assert "2 documents" in captured.out and "3 skipped" in captured.out
    assert f"{source}:3: no string field 'text'" in captured.err and f"{source}:4: not UTF-8" in captured.err


@pytest.mark.slow
def test_toolkit_script_runs_on_a_directory(tokenizer, tmp_path):
    import subprocess
    from pathlib import Path

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    toolkit = Path(__file__).resolve().parents[2] / "toolkits" / "pretrain_data_preprocessing"
    script = toolkit / "run_make_pretraining_dataset_megatron.sh"
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", DOCUMENTS[:2], key="content")
    write_jsonl(tmp_path / "in" / "b.jsonl", DOCUMENTS[2:], key="content")
    arguments = ["in", str(bundled_qwen3_tokenizer_dir()), "out/corpus", "content", "2"]
    result = subprocess.run(["bash", str(script), *arguments],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(IndexedDataset(str(tmp_path / "out" / "corpus"))) == len(DOCUMENTS)
    result = subprocess.run(["bash", str(script), "in"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: run_make_pretraining_dataset_megatron.sh INPUT" in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_tokenizer_directory_is_named(workers, tmp_path, capsys):
    source = write_jsonl(tmp_path / "a.jsonl", DOCUMENTS)
    assert build_main(["--tokenizer", str(tmp_path), "--input", str(source), "--output-prefix", str(tmp_path / "out"),
                       "--workers", str(workers)]) == 2
    assert f"error: {tmp_path / 'tokenizer.json'}: not found" in capsys.readouterr().err
    assert not list(tmp_path.glob("out*"))
