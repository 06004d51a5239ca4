"""GRPO reinforcement learning on the kit's engine (issue: RL), built in increments.

- ``objectives``: advantages (GRPO, Dr.GRPO, RLOO), the clipped policy loss, KL estimators, loss
  aggregation, the rollout-correction weight: the formulas slime and verl agree on.
- ``rewards``: gsm8k (strict and flexible, verl's rules), the ``letters`` demo task, and user
  functions (``custom:PATH.py:FUNCTION``), whose failures name the function and the sample.
- ``gsm8k``: the official GSM8K release -> prompt JSONL (``{"prompt", "label"}``).
- ``prompts``: prompt JSONL -> Qwen3 chat prompts, tokenized; bad lines named by file:line.
- ``config``: the GRPO settings beside the training ones, and their checks.
- ``loop``: rollout on the training model (``models/generation.py``) -> rewards -> advantages ->
  old and reference log-probs -> updates with the kit's DDP and optimizer -> metrics -> checkpoints.
- ``__main__``: ``python -m megatron_patch.rl``.

Still to come: ``run_mcore_qwen3_grpo.sh`` (the 27 arguments + MP_GRPO_*), ``make demo-rl``,
``benchmarks/rollout.py``.
"""
