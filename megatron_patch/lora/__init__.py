"""LoRA fine-tuning on Megatron-Core: low-rank adapters on the attention and MLP/expert linears.

- ``config``: the settings (rank, alpha, dropout, targets; HF module names accepted).
- ``layers``: the adapters (one per linear, or stacked per expert for grouped experts).
- ``apply``: freeze the base model, attach adapters, count trainable parameters.
"""
