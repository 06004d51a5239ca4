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
from collections import deque
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as connection_wait

from megatron_patch.lifetime import end_with_parent
from megatron_patch.rl.rewards import BUILTIN_REWARDS, RewardError, Score, load_reward

# Per call; a reward that needs longer (a judge model behind a queue) raises it.
DEFAULT_REWARD_TIMEOUT = 300.0
IMPORT_TIMEOUT = 120.0  # the user's file may import torch or a tokenizer first
_POLL_SECONDS = 0.5  # how often a wait checks that the child still lives


class RewardProcess:
    """A child process that imported the user's file and scores the requests sent to it, in order (see the
    module text). ``send`` returns at once; ``receive`` reads the oldest request's answer."""

    def __init__(self, spec: str, timeout: float = DEFAULT_REWARD_TIMEOUT):
        self.name, self.timeout = spec, timeout
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", "megatron_patch.rl.reward_worker", str(theirs.fileno()), spec]
        self.process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                        preexec_fn=end_with_parent)
        theirs.close()
        self.connection = Connection(ours.detach())
        self.waiting: deque[tuple[object, str]] = deque()  # (key, where) of the requests sent, oldest first
        self.started = time.monotonic()  # when the oldest waiting request (at the latest) began
        try:
            self.waiting.append((None, "while its file was imported"))
            self.needs_label = self._wait(max(timeout, IMPORT_TIMEOUT))["needs_label"]
            self._done()
        except BaseException:
            self.close()
            raise

    def __call__(self, prompt: str, response: str, label, where: str = "a sample", data_source: str = "",
                 extra_info=None) -> Score:
        """The score of one response, waited for (nothing else may be waiting)."""
        assert not self.waiting, "a waited-for call behind queued requests"
        self.send(None, (prompt, response, label, where, data_source, extra_info))
        return self.receive()[1]

    def send(self, key, request: tuple) -> None:
        """Queue ``request`` (prompt, response, label, where, data_source, extra_info) under ``key``."""
        if not self.waiting:
            self.started = time.monotonic()
        self.waiting.append((key, f"on {request[3]}"))
        try:
            self.connection.send(request)
        except OSError:  # the child is gone: the answer's read says how
            pass

    def receive(self) -> tuple[object, Score]:
        """(key, score) of the oldest request, waited for (its timeout counted from when it began)."""
        answer = self._wait(self.timeout)
        return self._done(), Score(answer["value"], answer["extras"])

    def ready(self) -> bool:
        return bool(self.waiting) and self.connection.poll(0)

    def check_overdue(self) -> None:
        """Raise (the process killed) when the request in progress has run past the timeout."""
        if self.waiting and time.monotonic() - self.started > self.timeout:
            self._overdue(self.timeout)

    def _done(self):
        key, _ = self.waiting.popleft()
        self.started = time.monotonic()  # the next request begins (at the latest) now
        return key

    def _wait(self, timeout: float) -> dict:
        doing = self.waiting[0][1]
        while not self.connection.poll(min(_POLL_SECONDS, max(self.started + timeout - time.monotonic(), 0))):
            if self.process.poll() is not None:
                break
            if time.monotonic() >= self.started + timeout:
                self._overdue(timeout)
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

    def _overdue(self, timeout: float) -> None:
        self.close()
        raise RewardError(f"reward {self.name} did not return within {timeout:g} s {self.waiting[0][1]}; its "
                          f"process (pid {self.process.pid}) was killed (--reward-timeout / "
                          "MP_GRPO_REWARD_TIMEOUT sets the limit)")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.connection.close()


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
        worker.send(key, (prompt, response, label, where, data_source, extra_info))

    def collect(self) -> dict:
        """Every submitted score by its key, waited for; then forgotten."""
        while any(process.waiting for process in self.processes):
            busy = [process for process in self.processes if process.waiting]
            connection_wait([process.connection for process in busy], timeout=_POLL_SECONDS)
            self._drain()
            for process in busy:
                process.check_overdue()
        scores, self.scores = self.scores, {}
        return scores

    def _drain(self) -> None:
        """Read every answer already there (a dead process's EOF raises its line)."""
        for process in self.processes:
            while process.ready():
                key, score = process.receive()
                self.scores[key] = score

    def close(self) -> None:
        for process in self.processes:
            process.close()


def start_reward(spec: str, timeout: float = DEFAULT_REWARD_TIMEOUT, workers: int = 1) -> Scorer:
    """The run's scorer: a built-in reward in this process, a user's (``custom:...``) in ``workers`` processes."""
    return Scorer(spec, timeout, workers)


def check_reward(spec: str, timeout: float = DEFAULT_REWARD_TIMEOUT) -> bool:
    """Whether the reward needs a label, once it loaded (in a child of its own for a user's file); raises
    RewardError naming what is wrong."""
    scorer = start_reward(spec, timeout)
    scorer.close()
    return scorer.needs_label


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
