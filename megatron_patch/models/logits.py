"""Full-vocabulary logits from Megatron-Core model chunks, through Megatron's own pipeline schedules."""

from __future__ import annotations

import torch


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


@torch.no_grad()
def forward_logits(model_chunks, tokens: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor | None:
    """Logits [batch, seq, vocab] on the last pipeline stage (gathered over TP); None on other stages.

    ``vocab_size`` trims the padded vocabulary. Works for any TP/PP/EP layout:
    the forward runs through ``get_forward_backward_func(forward_only=True)``.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    for chunk in chunks:
        chunk.eval()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(input_ids=batch, position_ids=position_ids_for(batch), attention_mask=None)

        def collect(output_tensor):
            logits = gather_from_tensor_model_parallel_region(output_tensor)
            return torch.zeros((), device=logits.device), {"logits": logits}

        return output, collect

    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter([tokens]) for _ in chunks] if len(chunks) > 1 else iter([tokens]),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = results[0]["logits"]
    return logits[..., :vocab_size] if vocab_size is not None else logits
