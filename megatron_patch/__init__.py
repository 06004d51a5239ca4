"""megatron_patch: Qwen3 / Qwen3-MoE on NVIDIA Megatron-Core."""

__version__ = "0.1.0"
