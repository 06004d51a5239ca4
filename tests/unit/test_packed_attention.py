"""A packed SFT sequence through Megatron-Core's GPTModel: each sample sees only itself."""

import torch

from megatron_patch.data.datasets import pack_samples
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.models.qwen3.loading import load_hf_weights
from megatron_patch.training.data import collate


def logits(model, tokens, position_ids, attention_mask=None):
    with torch.no_grad():
        return model(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask)


def test_packed_samples_give_the_logits_they_give_alone(megatron_world, hf_checkpoints):
    arch, path, _ = hf_checkpoints["moe-gqa"]
    model = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0))
    load_hf_weights(model, path)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, arch.vocab_size, (n,), generator=generator).tolist() for n in (7, 12, 5)]
    packed = pack_samples([(ids, [1] * len(ids)) for ids in samples], seq_length=24, pad_id=0)
    batch = collate([packed], packing="mask")
    together = logits(model, batch["tokens"], batch["position_ids"], batch["attention_mask"])[0]
    start = 0
    for ids in samples:
        alone_tokens = torch.tensor([ids[:-1]])
        alone = logits(model, alone_tokens, torch.arange(len(ids) - 1).unsqueeze(0))[0]
        delta = (together[start : start + len(ids) - 1] - alone).abs().max().item()
        assert delta < 1e-4, (start, delta)
        start += len(ids) - 1
    # Without the mask the later samples attend to the earlier ones: the check can fail.
    leaking = logits(model, batch["tokens"], batch["position_ids"])[0]
    assert (leaking[6:17] - together[6:17]).abs().max() > 1e-2
