"""Training on Megatron-Core: settings, pre-flight checks, run setup, steps, the loop, resume checkpoints."""
