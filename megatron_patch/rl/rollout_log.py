"""``--rollout-log DIR``: each step's trajectories, to read what the policy did and replay what it was trained on.

``DIR/step_NNNNNN.jsonl``, a record per sequence of the step (every data-parallel rank's, gathered to
global rank 0, which writes; written under a temporary name and renamed when complete, as every output):

  prompt          where the prompt came from (file:line, file:row N)
  messages        the conversation as the model saw it: the prompt's turns, then the assistant's, as generated
  tokens          prompt and response token ids, one list
  loss_mask       as long as tokens: 1 on the response tokens the loss trained on (0 on the prompt, and on a
                  whole response that dynamic sampling left out)
  log_probs       the rollout's log-prob of each response token (the engine's, temperature-scaled)
  reward          after the overlong penalty; reward_extras: the reward's other numbers
  policy_version  the optimizer steps taken before the weights that sampled it (0: the starting weights)
  engine          megatron or vllm

A reader that wants the rendered prompt re-renders ``messages`` with the tokenizer's template, or decodes
``tokens``; both are kept so that neither has to be trusted alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist

from megatron_patch.outputs import check_writable


def log_file(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:06d}.jsonl"


class RolloutLog:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        check_writable(self.directory, "--rollout-log")

    def write(self, step: int, records: list[dict], contributes: bool) -> Path | None:
        """Every rank calls this with its records; ``contributes``: whether its records count (tensor-parallel
        rank 0: its tensor-parallel peers hold the same sequences). Global rank 0 writes."""
        mine = records if contributes else []
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(mine, gathered, dst=0)
            if dist.get_rank() != 0:
                return None
            mine = [record for part in gathered for record in part]
        path = log_file(self.directory, step)
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial.{os.getpid()}")
        with open(partial, "w", encoding="utf-8") as out:
            for record in mine:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, path)
        return path
