"""Evaluation: CMMLU and C-Eval through lm-evaluation-harness, offline, on HF or torch_dist models."""
