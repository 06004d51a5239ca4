"""Training-side samples: per-sample shifts, restarted positions, boundaries, masks; raw JSON equals idxmap."""

import json

import pytest
import torch

from megatron_patch.data.build_sft import main as build_sft
from megatron_patch.data.datasets import (
    RawJsonSftDataset,
    SftIdxmapDataset,
    attention_mask_from_cu_seqlens,
    pack_samples,
)
from megatron_patch.data.show_sample import TRAINED_CLOSE, TRAINED_OPEN
from megatron_patch.data.show_sample import main as inspect_main
from megatron_patch.data.tokenizer import bundled_qwen3_tokenizer_dir
from tests.unit.test_build_sft import records, write_jsonl

SEQ = 192


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    source = write_jsonl(root / "train.jsonl", records(40, seed=7))
    for name, extra in (("packed", ["--packing"]), ("single", [])):
        assert build_sft(["--tokenizer", str(bundled_qwen3_tokenizer_dir()), "--input", str(source),
                          "--seq-length", str(SEQ), "--output-prefix", str(root / name), *extra]) == 0
    return root, source


def test_packed_sequence_keeps_samples_apart(tokenizer, sft_data):
    root, _ = sft_data
    dataset = SftIdxmapDataset(root / "packed", SEQ, tokenizer.pad)
    for index in range(len(dataset)):
        sample, parts = dataset[index], dataset.samples(index)
        assert all(sample[key].shape == (SEQ,) for key in ("tokens", "labels", "loss_mask", "position_ids"))
        bounds = sample["cu_seqlens"].tolist()
        assert bounds[0] == 0 and bounds[-1] == SEQ
        for (start, end), (ids, mask) in zip(zip(bounds, bounds[1:]), parts):
            assert sample["tokens"][start:end].tolist() == ids[:-1]
            assert sample["labels"][start:end].tolist() == ids[1:]  # never the next sample's first token
            assert sample["loss_mask"][start:end].tolist() == mask[1:]
            assert sample["position_ids"][start:end].tolist() == list(range(end - start))
        used = bounds[len(parts)]
        assert sample["loss_mask"][used:].sum() == 0  # padding is never trained


def test_trained_labels_are_the_assistant_answers(tokenizer, sft_data):
    root, source = sft_data
    answers = []
    for record in map(json.loads, source.read_text().splitlines()):
        if "output" in record:
            answers.append(record["output"])
        elif "conversations" in record:
            answers.append(record["conversations"][-1]["value"])
        else:
            answers.append(record["messages"][-1]["content"])
    dataset = SftIdxmapDataset(root / "single", SEQ, tokenizer.pad)
    trained = []
    for index in range(len(dataset)):
        sample = dataset[index]
        chosen = sample["labels"][sample["loss_mask"].bool()].tolist()
        trained.append(tokenizer.decode(chosen))
    assert sorted(trained) == sorted(answer + "<|im_end|>" for answer in answers)


def test_raw_json_gives_the_same_samples_as_the_idxmap(tokenizer, sft_data):
    root, source = sft_data
    raw = RawJsonSftDataset(source, tokenizer, SEQ)
    built = SftIdxmapDataset(root / "single", SEQ, tokenizer.pad)
    assert len(raw) == len(built) == 40
    for index in range(len(raw)):
        a, b = raw[index], built[index]
        assert all(torch.equal(a[key], b[key]) for key in a), index


def test_exact_fill_has_no_padding_segment(tokenizer):
    ids, mask = [1, 2, 3, 4, 5], [0, 0, 1, 1, 1]
    sample = pack_samples([(ids, mask)], seq_length=4, pad_id=0)
    assert sample["cu_seqlens"].tolist() == [0, 4] and sample["loss_mask"].tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="do not fit"):
        pack_samples([(ids, mask)], seq_length=3, pad_id=0)


def test_attention_mask_is_causal_within_segments_only():
    mask = attention_mask_from_cu_seqlens(torch.tensor([0, 2, 5]), 5)[0, 0]
    allowed = ~mask
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_pretraining_samples_use_the_same_keys(tokenizer, tmp_path):
    from megatron_patch.data.build_pretrain import main as build_pretrain
    from megatron_patch.data.datasets import pretrain_datasets

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    assert build_pretrain(["--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(bundled_qwen3_tokenizer_dir()),
                           "--output-prefix", str(tmp_path / "corpus")]) == 0
    train, valid, _ = pretrain_datasets([str(tmp_path / "corpus")], None, 32, [10, 2, 0], tokenizer,
                                        split="90,10,0", cache_dir=str(tmp_path / "cache"))
    sample = train[0]
    assert sorted(sample) == ["cu_seqlens", "labels", "loss_mask", "position_ids", "tokens"]
    assert sample["tokens"][1:].tolist() == sample["labels"][:-1].tolist()
    assert sample["cu_seqlens"].tolist() == [0, 32] and len(valid) >= 2


def test_inspect_prints_the_sample_and_marks_the_trained_text(tokenizer, sft_data, capsys):
    root, source = sft_data
    assert inspect_main([str(root / "packed"), "--index", "0", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    sample = SftIdxmapDataset(root / "packed", SEQ, tokenizer.pad)
    parts = sample.samples(0)
    assert len(shown["sequences"]) == len(parts)
    assert shown["loss_mask"] == [m for ids, mask in parts for m in mask[1:]]
    assert inspect_main([str(source), "--tokenizer", str(bundled_qwen3_tokenizer_dir()), "--index", "1",
                         "--decode"]) == 0
    text = capsys.readouterr().out
    answer = json.loads(source.read_text().splitlines()[1])["conversations"][-1]["value"]
    assert f"{TRAINED_OPEN}{answer}<|im_end|>{TRAINED_CLOSE}" in text
    assert inspect_main([str(root / "packed"), "--index", "999"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_tool_conversations_go_through_preprocessing_and_raw_json_alike(tmp_path, capsys):
    """{"messages", "tools"} in the HF chat convention: the idxmap build and raw JSON give the same tokens and
    mask; show_sample marks the tool calls as trained and neither the schemas nor the tool results."""
    weather = {"type": "function", "function": {"name": "weather", "description": "Weather in a city.",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}
    record = {"tools": [weather], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "weather", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "Sunny, 21 °C."}]}
    source = write_jsonl(tmp_path / "tools.jsonl", [record, record])
    tokenizer_dir = str(bundled_qwen3_tokenizer_dir())
    assert build_sft(["--tokenizer", tokenizer_dir, "--input", str(source), "--seq-length", "512",
                      "--output-prefix", str(tmp_path / "tools")]) == 0
    capsys.readouterr()
    assert inspect_main([str(tmp_path / "tools"), "--index", "0", "--tokenizer", tokenizer_dir, "--decode"]) == 0
    built = capsys.readouterr().out
    assert inspect_main([str(source), "--tokenizer", tokenizer_dir, "--index", "0", "--decode"]) == 0
    raw = capsys.readouterr().out
    assert built == raw
    trained = [piece.split(TRAINED_CLOSE)[0] for piece in raw.split(TRAINED_OPEN)[1:]]
    assert trained == ['<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                       "Sunny, 21 °C.<|im_end|>"]
    assert '"name": "weather", "description": "Weather in a city."' in raw and "sunny, 21 C" in raw
