"""The generator's KV cache edits (models/kv_cache.py) on Megatron-Core's static inference context."""

import torch
from torch.profiler import profile

from megatron_patch.models import kv_cache
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from tests.conftest import TINY_DENSE

ARCH = TINY_DENSE.replace(tie_word_embeddings=False)


def _cached_forwards(model, tokens, steps: int):
    """Logits of a prefill of ``tokens`` and then ``steps`` greedy decode steps, and the largest number
    of positions RoPE's cos was taken of in the last step."""
    from megatron.core.inference.contexts import StaticInferenceContext

    context = StaticInferenceContext(max_batch_size=tokens.shape[0], max_sequence_length=tokens.shape[1] + steps)
    outputs, feed, start = [], tokens, 0
    for _ in range(steps + 1):
        positions = torch.arange(start, start + feed.shape[1]).expand_as(feed)
        with profile(record_shapes=True) as trace:
            logits = model(input_ids=feed, position_ids=positions, attention_mask=None, inference_context=context,
                           runtime_gather_output=True)
        context.sequence_len_offset += feed.shape[1]
        start += feed.shape[1]
        outputs.append(logits[:, -1])
        feed = logits[:, -1:].argmax(-1)
    cosines = [event.input_shapes[0][0] for event in trace.events() if event.name == "aten::cos" and event.input_shapes]
    return torch.stack(outputs), max(cosines)


def test_keys_rotated_once_give_the_same_logits_without_rotating_the_history(megatron_world):
    torch.manual_seed(5)
    model = build_gpt_model(ARCH, BuildOptions(aux_loss_coeff=0.0)).eval()
    tokens = torch.randint(0, ARCH.vocab_size, (2, 12))
    with torch.no_grad():
        expected, history_rotated = _cached_forwards(model, tokens, steps=6)
        with kv_cache.keys_rotated_once(model) as rotated:
            got, new_rotated = _cached_forwards(model, tokens, steps=6)
    assert rotated
    assert history_rotated == 12 + 6  # stock: every cached position's angles, again in each step
    assert new_rotated == 1  # the new position only
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert "_adjust_key_value_for_inference" not in vars(model.decoder.layers[0].self_attention)


def test_closing_holes_moves_only_the_last_live_rows():
    key = torch.arange(5.0).view(1, 5, 1, 1).repeat(3, 1, 1, 1)  # [positions, rows, heads, dim]: row i holds i
    cache = {1: (key, key.clone())}
    order = kv_cache.close_holes(cache, filled=3, finished=[1, 4], rows=5)
    assert order == [0, 3, 2]  # row 3 moved into the hole at 1; finished row 4 was last anyway
    assert cache[1][0][0, :3, 0, 0].tolist() == [0.0, 3.0, 2.0]
    assert cache[1][1][0, :3, 0, 0].tolist() == [0.0, 3.0, 2.0]
