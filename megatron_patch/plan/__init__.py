"""The planner: per-GPU memory and speed of every layout before a launch (python -m megatron_patch.plan)."""
