"""megatron_patch: Qwen3 / Qwen3-MoE on NVIDIA Megatron-Core."""

import warnings

__version__ = "0.1.0"

# Expected on every machine without Transformer-Engine/Apex, and a deprecation
# that megatron-core 0.16.1's own TransformerConfig defaults trigger; they say
# nothing a user can act on. Set before Megatron-Core is imported.
for _message in (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "full scope is deprecated",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
