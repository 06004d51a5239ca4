"""The generator's KV cache edits (models/kv_cache.py) on Megatron-Core's static inference context."""

import torch

from megatron_patch.models import kv_cache
from megatron_patch.models.logits import forward_logits
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from tests.conftest import TINY_DENSE

ARCH = TINY_DENSE.replace(tie_word_embeddings=False)


def test_a_ragged_step_gives_every_row_its_whole_sequence_logits(megatron_world):
    """Two rows decode while two new prompts are prefilled beside them, in one forward of packed tokens:
    each row's logits are a whole-sequence forward's. The cache starts as noise: what a row did not write
    (before its first token, other rows' places) must not be read."""
    from megatron.core.inference.contexts import StaticInferenceContext

    torch.manual_seed(5)
    model = build_gpt_model(ARCH, BuildOptions(aux_loss_coeff=0.0)).eval()
    a, b, c, d = (torch.randint(0, ARCH.vocab_size, (n,)) for n in (5, 9, 3, 7))
    context = StaticInferenceContext(max_batch_size=4, max_sequence_length=12)
    context.enable_prefill_mode()
    for memory in kv_cache.allocate(model, context).values():
        for part in memory:
            part.normal_(std=30.0)

    def run(step, tokens):
        context.ragged = step
        logits = model(input_ids=tokens[None], position_ids=step.positions[None], attention_mask=None,
                       inference_context=context, runtime_gather_output=True)
        context.ragged = None
        return logits[0]

    with torch.no_grad(), kv_cache.ragged_forwards(model, context):
        starts = torch.tensor([9 - 5, 9 - 9])  # rows 0 and 1 end at position 8
        first = run(kv_cache.RaggedStep(0, 8, 0, [5, 9], starts), torch.cat([a, b]))
        fed = first.argmax(-1)
        starts = torch.cat([starts, torch.tensor([10 - 3, 10 - 7])])  # rows 2 and 3 join, ending at 9
        second = run(kv_cache.RaggedStep(2, 9, 2, [3, 7], starts), torch.cat([fed, c, d]))
        assert first.shape[0] == 2 and second.shape[0] == 4  # the rows' last tokens only
        sequences = [a, b, torch.cat([a, fed[:1]]), torch.cat([b, fed[1:]]), c, d]
        expected = [forward_logits(model, sequence[None], ARCH.vocab_size)[0, -1] for sequence in sequences]
    got = [first[0], first[1], second[0], second[1], second[2], second[3]]
    for index, (mine, whole) in enumerate(zip(got, expected)):
        torch.testing.assert_close(mine[:ARCH.vocab_size], whole, rtol=0, atol=1e-5, msg=f"sequence {index}")
    assert "_adjust_key_value_for_inference" not in vars(model.decoder.layers[0].self_attention)
    assert "forward" not in vars(model.output_layer)


def test_closing_holes_moves_only_the_last_live_rows():
    key = torch.arange(5.0).view(1, 5, 1, 1).repeat(3, 1, 1, 1)  # [positions, rows, heads, dim]: row i holds i
    cache = {1: (key, key.clone())}
    order = kv_cache.close_holes(cache, filled=3, finished=[1, 4], rows=5)
    assert order == [0, 3, 2]  # row 3 moved into the hole at 1; finished row 4 was last anyway
    assert cache[1][0][0, :3, 0, 0].tolist() == [0.0, 3.0, 2.0]
    assert cache[1][1][0, :3, 0, 0].tolist() == [0.0, 3.0, 2.0]
