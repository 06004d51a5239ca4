"""HF safetensors <-> Megatron-Core torch_dist conversion (``python -m megatron_patch.convert``)."""
