"""A user's reward function in a process of its own, so that nothing it does can end or stall the job unseen.

In the trainer's own process a ``custom:`` reward that calls ``sys.exit(0)`` or ``os._exit(0)`` ended the
job with status 0 and no step run, and one that never returned held the job for ever. Here the function
is imported and called in a child (``python -m megatron_patch.rl.reward_worker``) that answers over a
socket pair: whatever it raises (``SystemExit`` and ``KeyboardInterrupt`` included) comes back as one line
naming the reward and the sample; a child that dies (``os._exit``, a crash, the OOM killer) is named with
its exit status; a call that takes longer than ``timeout`` seconds has its child killed and stops the job
in one line. Requests go down pickled (the trainer's own data, to its own child); answers come back as
JSON (numbers only), so the trainer never unpickles anything the user's code made. The child dies with
the trainer (``PR_SET_PDEATHSIG``) and ignores Ctrl-C aimed at the job (the trainer stops it).

The built-in rewards are the kit's own code and run in the trainer's process (``start_reward``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from megatron_patch.lifetime import end_with_parent
from megatron_patch.rl.rewards import BUILTIN_REWARDS, Reward, RewardError, Score, load_reward

# Per call; a reward that needs longer (a judge model behind a queue) raises it.
DEFAULT_REWARD_TIMEOUT = 300.0
IMPORT_TIMEOUT = 120.0  # the user's file may import torch or a tokenizer first
_POLL_SECONDS = 0.5  # how often a wait checks that the child still lives


class RewardProcess:
    """``Reward``'s call, answered by a child process that imported the user's file (see the module text)."""

    def __init__(self, spec: str, timeout: float = DEFAULT_REWARD_TIMEOUT):
        self.name, self.timeout = spec, timeout
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "megatron_patch.rl.reward_worker", str(theirs.fileno()), spec]
        self.process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                        preexec_fn=end_with_parent)
        theirs.close()
        self.connection = Connection(ours.detach())
        try:
            self.needs_label = self._answer("while its file was imported", max(timeout, IMPORT_TIMEOUT))["needs_label"]
        except BaseException:
            self.close()
            raise

    def __call__(self, prompt: str, response: str, label, where: str = "a sample", data_source: str = "",
                 extra_info=None) -> Score:
        try:
            self.connection.send((prompt, response, label, where, data_source, extra_info))
        except OSError:  # the child is gone: say how
            self._answer(f"on {where}")
        answer = self._answer(f"on {where}")
        return Score(answer["value"], answer["extras"])

    def _answer(self, doing: str, timeout: float | None = None) -> dict:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not self.connection.poll(min(_POLL_SECONDS, max(deadline - time.monotonic(), 0))):
            if self.process.poll() is not None:
                break
            if time.monotonic() >= deadline:
                self.close()
                raise RewardError(f"reward {self.name} did not return within {timeout:g} s {doing}; its "
                                  f"process (pid {self.process.pid}) was killed (--reward-timeout / "
                                  "MP_GRPO_REWARD_TIMEOUT sets the limit)")
        try:
            answer = json.loads(self.connection.recv_bytes())
        except (EOFError, OSError):
            code = self.process.wait()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise RewardError(f"reward {self.name} ended the process it runs in {doing}: it {how} without "
                              "answering (os._exit, a crash or the out-of-memory killer?)") from None
        if "error" in answer:
            raise RewardError(answer["error"])
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.connection.close()


def start_reward(spec: str, timeout: float = DEFAULT_REWARD_TIMEOUT) -> Reward | RewardProcess:
    """A built-in reward in this process, a user's (``custom:...``) in a ``RewardProcess``."""
    return load_reward(spec) if spec in BUILTIN_REWARDS else RewardProcess(spec, timeout)


def check_reward(spec: str, timeout: float = DEFAULT_REWARD_TIMEOUT) -> bool:
    """Whether the reward needs a label, once it loaded (in a child of its own for a user's file); raises
    RewardError naming what is wrong."""
    reward = start_reward(spec, timeout)
    if isinstance(reward, RewardProcess):
        reward.close()
    return reward.needs_label


def _serve(connection: Connection, spec: str) -> None:
    def reply(**answer) -> None:
        connection.send_bytes(json.dumps(answer).encode())

    def failure(err: BaseException, doing: str) -> str:
        if isinstance(err, RewardError):
            return str(err)
        if isinstance(err, SystemExit):
            return f"reward {spec} called sys.exit({err.code!r}) {doing}"
        detail = f": {err}" if str(err) else ""
        return f"reward {spec} raised {type(err).__name__} {doing}{detail}"

    try:
        reward = load_reward(spec)
    except BaseException as err:  # noqa: BLE001 - the user's import-time code, whatever it does
        reply(error=failure(err, "while its file was imported"))
        return
    reply(needs_label=reward.needs_label)
    while True:
        try:
            prompt, response, label, where, data_source, extra_info = connection.recv()
        except EOFError:  # the trainer closed it
            return
        try:
            score = reward(prompt, response, label, where, data_source, extra_info)
        except BaseException as err:  # noqa: BLE001 - see the module text
            reply(error=failure(err, f"on {where}"))
            continue
        reply(value=score.value, extras=score.extras)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(Connection(int(sys.argv[1])), sys.argv[2])
    os._exit(0)  # whatever threads the user's file started
