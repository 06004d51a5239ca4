
# Which modules implement attention and the experts (``--transformer-impl``):
#   transformer_engine  Megatron-Core's TE spec (fused kernels; needs TE on CUDA)
#   torch               the local spec with our SDPA/varlen attention and grouped-GEMM experts
#   local               Megatron-Core's local spec unchanged (DotProductAttention, SequentialMLP)
# "auto" is transformer_engine when TE is importable on CUDA, else torch.
TRANSFORMER_IMPLS = ("auto", "transformer_engine", "torch", "local")
