"""Model definitions: Qwen3 presets, config translation, weight mapping, Megatron-Core builders."""
