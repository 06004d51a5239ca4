"""Training on Megatron-Core: DDP, optimizers and steps."""

import warnings

# megatron-core 0.16.1's distributed optimizer zero_grad reads .grad of its
# shard views (optimizer.py _zero_grad_group_helper); harmless, fires every step.
warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf Tensor")
