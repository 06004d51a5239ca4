"""GRPO reinforcement learning on the kit's engine (issue: RL), built in increments.

- ``objectives``: advantages (GRPO, Dr.GRPO, RLOO), the clipped policy loss, KL estimators, loss
  aggregation, the rollout-correction weight: the formulas slime and verl agree on.
- ``rewards``: gsm8k (strict and flexible, verl's rules) and user functions
  (``custom:PATH.py:FUNCTION``), whose failures name the function and the sample.
- ``gsm8k``: the official GSM8K release -> prompt JSONL (``{"prompt", "label"}``).

Still to come: rollout on the training model (Megatron-Core's KV cache), the loop, the script.
"""
