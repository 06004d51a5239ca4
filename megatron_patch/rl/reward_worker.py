"""A user's reward in processes of their own (``rl/child_process.py``), and the step's scorer over them.

A ``custom:`` reward is imported and called in ``python -m megatron_patch.rl.reward_worker`` children: a
reward that exits, crashes, hangs past ``--reward-timeout`` or raises (``SystemExit`` and
``KeyboardInterrupt`` included) stops the job in one line naming it and the sample. The built-in rewards
are the kit's own code and run in the trainer's process.
"""

from __future__ import annotations

from multiprocessing.connection import wait as connection_wait

from megatron_patch.rl.child_process import POLL_SECONDS, ChildProcess, failure_text, serve
from megatron_patch.rl.rewards import BUILTIN_REWARDS, Reward, RewardError, Score, load_reward

# Per call; a reward that needs longer (a judge model behind a queue) raises it.
DEFAULT_REWARD_TIMEOUT = 300.0


class RewardProcess(ChildProcess):
    """A child that imported the user's reward file and scores what it is sent, in order."""

    def __init__(self, spec: str, timeout: float = DEFAULT_REWARD_TIMEOUT):
        super().__init__("megatron_patch.rl.reward_worker", [spec], f"reward {spec}", timeout,
                         "--reward-timeout / MP_GRPO_REWARD_TIMEOUT", RewardError)
        self.needs_label = self.hello["needs_label"]

    def __call__(self, prompt: str, response: str, label, where: str = "a sample", data_source: str = "",
                 extra_info=None) -> Score:
        """The score of one response, waited for."""
        answer = self.ask((prompt, response, label, where, data_source, extra_info), f"on {where}")
        return Score(answer["value"], answer["extras"])

    def submit(self, key, request: tuple) -> None:
        """Queue (prompt, response, label, where, data_source, extra_info) under ``key``."""
        self.send(key, request, f"on {request[3]}")

    def receive_score(self) -> tuple[object, Score]:
        key, answer = self.receive()
        return key, Score(answer["value"], answer["extras"])


class Scorer:
    """A step's rewards, scored while the rollout goes on: ``submit`` each finished response (it returns at
    once), ``collect`` the scores. A built-in reward scores in this process as it is submitted; a user's is
    shared out over ``workers`` processes (``--reward-workers``), the one with the fewest waiting requests
    taking the next, so a slow or remote reward runs beside generation and beside itself."""

    def __init__(self, spec: str, timeout: float = DEFAULT_REWARD_TIMEOUT, workers: int = 1):
        self.inline = load_reward(spec) if spec in BUILTIN_REWARDS else None
        self.processes: list[RewardProcess] = []
        try:
            for _ in range(0 if self.inline else workers):
                self.processes.append(RewardProcess(spec, timeout))
        except BaseException:
            self.close()
            raise
        self.needs_label = (self.inline or self.processes[0]).needs_label
        self.scores: dict = {}

    def __call__(self, prompt: str, response: str, label, where: str = "a sample", data_source: str = "",
                 extra_info=None) -> Score:
        """One score, waited for (validation)."""
        return (self.inline or self.processes[0])(prompt, response, label, where, data_source, extra_info)

    def submit(self, key, prompt: str, response: str, label, where: str = "a sample", data_source: str = "",
               extra_info=None) -> None:
        if self.inline is not None:
            self.scores[key] = self.inline(prompt, response, label, where, data_source, extra_info)
            return
        self._drain()
        worker = min(self.processes, key=lambda process: len(process.waiting))
        worker.submit(key, (prompt, response, label, where, data_source, extra_info))

    def collect(self) -> dict:
        """Every submitted score by its key, waited for; then forgotten."""
        while any(process.waiting for process in self.processes):
            busy = [process for process in self.processes if process.waiting]
            connection_wait([process.connection for process in busy], timeout=POLL_SECONDS)
            self._drain()
            for process in busy:
                process.check_overdue()
        scores, self.scores = self.scores, {}
        return scores

    def _drain(self) -> None:
        """Read every answer already there (a dead process's EOF raises its line)."""
        for process in self.processes:
            while process.ready():
                key, score = process.receive_score()
                self.scores[key] = score

    def close(self) -> None:
        for process in self.processes:
            process.close()


def check_reward(spec: str, timeout: float = DEFAULT_REWARD_TIMEOUT) -> bool:
    """Whether the reward needs a label, once it loaded (in a child of its own for a user's file); raises
    RewardError naming what is wrong."""
    scorer = Scorer(spec, timeout)
    scorer.close()
    return scorer.needs_label


def _load(spec: str) -> tuple[Reward, dict]:
    reward = load_reward(spec)
    return reward, {"needs_label": reward.needs_label}


def _score(reward: Reward, request: tuple) -> dict:
    score = reward(*request)
    return {"value": score.value, "extras": score.extras}


def _failure(spec: str, err: BaseException, request: tuple | None) -> str:
    if isinstance(err, RewardError):
        return str(err)
    return failure_text(f"reward {spec}", err, "while its file was imported" if request is None else f"on {request[3]}")


if __name__ == "__main__":
    import os
    import sys

    spec = sys.argv[2]
    serve(lambda: _load(spec), _score, lambda err, request: _failure(spec, err, request))
    os._exit(0)  # whatever threads the user's file started
