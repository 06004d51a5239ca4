"""A user's code (a reward, tools) in a process of its own, so that nothing it does can end or stall the job unseen.

In the trainer's own process a ``custom:`` reward that called ``sys.exit(0)`` or ``os._exit(0)`` ended the
job with status 0 and no step run, and one that never returned held the job for ever. Here the user's
file is imported and called in a child (``python -m MODULE FD SPEC``) that answers over a socket pair:
whatever the code raises (``SystemExit`` and ``KeyboardInterrupt`` included) comes back as an answer the
parent turns into one line; a child that dies (``os._exit``, a crash, the OOM killer) is named with its
exit status; a request that takes longer than ``timeout`` seconds has its child killed. Requests go down
pickled (the trainer's own data, to its own child); answers come back as JSON, so the trainer never
unpickles anything the user's code made. The child dies with the trainer (``PR_SET_PDEATHSIG``) and
ignores Ctrl-C aimed at the job (the trainer stops it).

Requests are pipelined: ``send`` returns at once, ``receive`` reads the oldest answer, and a request's
timeout counts from when the child began it (at the latest when the one before it was answered), not
from when it was queued.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection

from megatron_patch.errors import InputError
from megatron_patch.lifetime import end_with_parent

IMPORT_TIMEOUT = 120.0  # the user's file may import torch or a tokenizer first
POLL_SECONDS = 0.5  # how often a wait checks that the child still lives


class ChildProcess:
    """``python -m module FD *arguments``: the child's first answer (its hello, after importing the user's file)
    is ``hello``. ``name`` and ``error`` make the lines ("reward custom:r.py:f ...", RewardError);
    ``timeout_hint`` says which setting sets the limit."""

    def __init__(self, module: str, arguments: list[str], name: str, timeout: float, timeout_hint: str,
                 error: type[InputError] = InputError):
        self.name, self.timeout, self.timeout_hint, self.error = name, timeout, timeout_hint, error
        ours, theirs = socket.socketpair()
        command = [sys.executable, "-m", module, str(theirs.fileno()), *arguments]
        self.process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                        preexec_fn=end_with_parent)
        theirs.close()
        self.connection = Connection(ours.detach())
        self.waiting: deque[tuple[object, str]] = deque()  # (key, what it is) of the requests sent, oldest first
        self.started = time.monotonic()  # when the oldest waiting request began (at the latest)
        try:
            self.waiting.append((None, "while its file was imported"))
            self.hello = self._wait(max(timeout, IMPORT_TIMEOUT))
            self._done()
        except BaseException:
            self.close()
            raise

    def send(self, key, request: tuple, doing: str) -> None:
        """Queue ``request`` under ``key``; ``doing`` names it in errors ("on prompts.jsonl:3 sample 2")."""
        if not self.waiting:
            self.started = time.monotonic()
        self.waiting.append((key, doing))
        try:
            self.connection.send(request)
        except OSError:  # the child is gone: the answer's read says how
            pass

    def receive(self) -> tuple[object, dict]:
        """(key, answer) of the oldest request, waited for. An answer with "error" raises it."""
        answer = self._wait(self.timeout)
        return self._done(), answer

    def ask(self, request: tuple, doing: str) -> dict:
        """One request, waited for (nothing else may be waiting)."""
        assert not self.waiting, "a waited-for request behind queued ones"
        self.send(None, request, doing)
        return self.receive()[1]

    def ready(self) -> bool:
        return bool(self.waiting) and self.connection.poll(0)

    def check_overdue(self) -> None:
        """Raise (the child killed) when the request in progress has run past the timeout."""
        if self.waiting and time.monotonic() - self.started > self.timeout:
            self._overdue(self.timeout)

    def _done(self):
        key, _ = self.waiting.popleft()
        self.started = time.monotonic()  # the next request begins (at the latest) now
        return key

    def _wait(self, timeout: float) -> dict:
        doing = self.waiting[0][1]
        while not self.connection.poll(min(POLL_SECONDS, max(self.started + timeout - time.monotonic(), 0))):
            if self.process.poll() is not None:
                break
            if time.monotonic() >= self.started + timeout:
                self._overdue(timeout)
        try:
            answer = json.loads(self.connection.recv_bytes())
        except (EOFError, OSError):
            code = self.process.wait()
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise self.error(f"{self.name} ended the process it runs in {doing}: it {how} without answering "
                             "(os._exit, a crash or the out-of-memory killer?)") from None
        if "error" in answer:
            self._done()
            raise self.error(answer["error"])
        return answer

    def _overdue(self, timeout: float) -> None:
        doing = self.waiting[0][1]
        self.close()
        raise self.error(f"{self.name} did not return within {timeout:g} s {doing}; its process (pid "
                         f"{self.process.pid}) was killed ({self.timeout_hint} sets the limit)")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.connection.close()


def failure_text(name: str, err: BaseException, doing: str) -> str:
    """What the child answers for whatever the user's code raised."""
    where = f" {doing}" if doing else ""
    if isinstance(err, SystemExit):
        return f"{name} called sys.exit({err.code!r}){where}"
    detail = f": {err}" if str(err) else ""
    return f"{name} raised {type(err).__name__}{where}{detail}"


def serve(load: Callable[[], tuple[object, dict]], handle: Callable[[object, tuple], dict],
          failure: Callable[[BaseException, tuple | None], str]) -> None:
    """The child's side, run as ``python -m module FD ...``: ``load()`` imports the user's code and returns
    (it, hello); each request gets ``handle(it, request)``'s answer; whatever either raises is answered as
    ``{"error": failure(err, request)}`` (request None: while importing). Ends when the parent closes the
    socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection = Connection(int(sys.argv[1]))

    def reply(answer: dict) -> None:
        connection.send_bytes(json.dumps(answer).encode())

    try:
        loaded, hello = load()
    except BaseException as err:  # noqa: BLE001 - the user's import-time code, whatever it does
        reply({"error": failure(err, None)})
        return
    reply(hello)
    while True:
        try:
            request = connection.recv()
        except EOFError:  # the trainer closed it
            return
        try:
            answer = handle(loaded, request)
        except BaseException as err:  # noqa: BLE001 - see the module text
            answer = {"error": failure(err, request)}
        reply(answer)
