"""``--rollout-engine vllm``: vLLM in its own environment as a child process of the trainer.

The trainer starts ``rl/vllm_driver.py`` with ``.venv-vllm/bin/python`` (``make setup-vllm``), waits
until the engine is up, syncs the current weights into it before every rollout and asks it for
completions; ``close()`` stops it. The child asks Linux to kill it when the trainer ends
(``PR_SET_PDEATHSIG``), so a killed job (even ``kill -9``) leaves no vLLM process, and a crashed
engine stops the job with one line naming it and its last error (its whole log is kept beside the
run's metrics). vLLM starts from ``load_format=dummy`` on the run's config.json: the first sync
gives it the weights, so no checkpoint is converted or written for it.

Weights travel in HF names, made from the training model by the converter's mapping
(``models/qwen3/mapping.py``), a bucket at a time (about 1 GiB: rank 0 never holds the whole model)
as safetensors files in shared memory (``/dev/shm``) that the driver's weight-transfer backend
loads, all within one vLLM weight update: no restart, no checkpoint directory. LoRA adapters go
merged into their weights. In a parallel layout the engine runs beside global rank 0: every rank
sends it its shards for a sync and its prompts for a rollout, and gets its completions back.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from multiprocessing.connection import Listener
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patch.errors import InputError
from megatron_patch.lifetime import end_with_parent
from megatron_patch.models.generation import Completion, Sampling
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.hf_model import hf_config
from megatron_patch.models.qwen3.mapping import bound_qwen3_mappings
from megatron_patch.models.routing import ROUTE_DTYPE
from megatron_patch.models.sharded_state import assemble_full_tensors, global_shape, host_piece, main_replicas
from megatron_patch.models.weight_mapping import BoundMapping, MegatronAddress, hf_tensors_from_megatron

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("vllm_driver.py")
SHARED_MEMORY = Path("/dev/shm")
# The engine's folder in shared memory: config, socket, a weight bucket mid-sync. Named by the trainer's pid, so
# that the next start can tell a killed job's folder (kill -9 runs no cleanup) from a running job's.
FOLDER_PREFIX = "mp-vllm-"


def remove_stale_folders(base: Path = SHARED_MEMORY) -> list[str]:
    """Remove the engine folders of trainers that no longer run (shared memory is RAM: a killed job's bucket
    of up to 1 GiB stays until reboot otherwise); returns a line for each, to be said."""
    said = []
    for folder in sorted(base.glob(f"{FOLDER_PREFIX}*")):
        pid = folder.name.removeprefix(FOLDER_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        said.append(f"removed {folder} ({size / 2**20:.1f} MiB of shared memory), left by a killed job (pid {pid})")
    return said


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        pass
    return True


# An engine that neither answers nor uses any CPU for this long is stopped or deadlocked (--engine-timeout).
DEFAULT_ENGINE_TIMEOUT = 600.0


class VllmEngineError(InputError):
    """The vLLM engine ended or failed: one line naming it, its last error and its log (the engine is outside
    the trainer, so its traceback would say nothing; what to change is in its log and the vLLM settings)."""


def vllm_python(configured: str | None) -> Path:
    """The interpreter of vLLM's environment: ``configured``, else the repository's ``.venv-vllm``."""
    python = Path(configured) if configured else REPO / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        raise InputError(f"--rollout-engine vllm needs vLLM's own environment, and {python} does not exist: "
                         "run `make setup-vllm` (or set --vllm-python / MP_GRPO_VLLM_PYTHON)")
    if python.is_dir() or not os.access(python, os.X_OK):
        what = "a directory" if python.is_dir() else "not executable"
        raise InputError(f"--vllm-python {python} is {what}; give the interpreter of vLLM's environment "
                         "(e.g. .venv-vllm/bin/python)")
    return python


# Weights a sync hands over at a time: rank 0 holds one bucket, never the whole model (Qwen3-235B-A22B is
# 470 GB in bf16), and the shared-memory file is as large.
SYNC_BUCKET_BYTES = 1 << 30


def _buckets(bound: list[BoundMapping], sizes: dict[str, int], limit: int) -> Iterator[list[BoundMapping]]:
    """Consecutive mapping rows of at most ``limit`` bytes together (a larger tensor alone)."""
    bucket, total = [], 0
    for row in bound:
        size = sizes[row.address.key]
        if bucket and total + size > limit:
            yield bucket
            bucket, total = [], 0
        bucket.append(row)
        total += size
    if bucket:
        yield bucket


def _adapter_addresses(address: MegatronAddress) -> tuple[MegatronAddress, MegatronAddress]:
    """(A, B) of the LoRA adapter on a base weight: same layer and expert, the adapter's keys."""
    stem = address.key.removesuffix("weight") + "adapter."
    return (MegatronAddress(stem + "linear_in.weight", address.layer, address.expert),
            MegatronAddress(stem + "linear_out.weight", address.layer, address.expert))


def hf_weight_buckets(model_chunks, arch: Qwen3Arch, bucket_bytes: int = SYNC_BUCKET_BYTES,
                      lora_scale: float | None = None) -> Iterator[dict[str, torch.Tensor] | None]:
    """The current weights in HF names (the converter's mapping), about ``bucket_bytes`` at a time, on global
    rank 0; None on the others. Every rank of the job iterates them together: for each bucket every rank
    sends rank 0 the main replica of its shards of the bucket's tensors (TP slices, its experts), and rank 0
    puts the full tensors together. With LoRA adapters (``lora_scale``: alpha / r) each adapted weight goes
    merged, W + scale * B @ A in fp32, as the merged HF export writes it: vLLM serves the policy being trained."""
    parallel = dist.is_initialized() and dist.get_world_size() > 1
    shards = main_replicas(model_chunks)
    # Bytes of each full tensor, by key (the same at every layer and expert): from every rank, since with
    # pipeline stages none holds every key, and every rank must cut the same buckets. (A key every rank
    # holds only as another's replica has its main replica somewhere, so it is counted there.)
    sizes = {address.key: math.prod(global_shape(shard)) * shard.data.element_size() for address, shard in shards}
    if parallel:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sizes)
        sizes = {key: size for part in everyone for key, size in part.items()}
    adapted = lora_scale is not None and any("adapter" in key for key in sizes)
    for bucket in _buckets(bound_qwen3_mappings(arch), sizes, bucket_bytes):
        wanted = {row.address for row in bucket}
        if adapted:
            wanted |= {part for row in bucket for part in _adapter_addresses(row.address) if part.key in sizes}
        pieces = [host_piece(address, shard) for address, shard in shards if address in wanted]
        if parallel:
            gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(pieces, gathered, dst=0)
            if dist.get_rank() != 0:
                yield None
                continue
            pieces = [piece for part in gathered for piece in part]
        full = assemble_full_tensors(pieces)
        if adapted:
            for row in bucket:
                a, b = _adapter_addresses(row.address)
                if a in full:
                    weight = full[row.address]
                    full[row.address] = (weight.float() + lora_scale * (full.pop(b).float() @ full.pop(a).float())
                                         ).to(weight.dtype)
        yield dict(hf_tensors_from_megatron(bucket, full.__getitem__))


def generate_on_rank_zero(engine: VllmEngine | None, prompts: list[list[int]], seeds: list[int],
                          sampling: Sampling, share: tuple[int, bool]) -> list[Completion]:
    """This rank's completions from the engine beside global rank 0, every rank of the job calling.

    ``share``: (this rank's data-parallel rank, whether it is the one of its data-parallel group that
    sends the prompts). Ranks of one data-parallel rank (tensor and expert parallel peers) hold the
    same prompts and receive the same completions.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return engine.generate(prompts, seeds, sampling)
    rank, world = dist.get_rank(), dist.get_world_size()
    asked = [None] * world if rank == 0 else None
    dist.gather_object((share[0], (prompts, seeds) if share[1] else None), asked, dst=0)
    answers = None
    if rank == 0:
        senders = {dp: request for dp, request in asked if request is not None}
        order = sorted(senders)
        flat_prompts = [p for dp in order for p in senders[dp][0]]
        flat_seeds = [seed for dp in order for seed in senders[dp][1]]
        made = engine.generate(flat_prompts, flat_seeds, sampling)
        by_dp, start = {}, 0
        for dp in order:
            by_dp[dp] = made[start:start + len(senders[dp][0])]
            start += len(senders[dp][0])
        answers = [by_dp[dp] for dp, _ in asked]
    received = [None]
    dist.scatter_object_list(received, answers, src=0)
    return received[0]


# What each request asks, in the timeout's words.
_ASKED = {"update_begin": "begin a weight sync", "update_weights": "load a bucket of weights",
          "update_end": "finish a weight sync", "generate": "generate a rollout",
          "forget_prefixes": "drop its prefix cache"}


def _tree_cpu_ticks(pid: int) -> int:
    """User + system CPU ticks of ``pid`` and its descendants, from /proc (0 where there is none)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))  # fields[1]: the parent's pid
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime, stime
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += ticks.get(current, 0)
        todo += children.get(current, [])
    return total


class VllmEngine:
    """One vLLM engine for this process's rollouts."""

    def __init__(self, arch: Qwen3Arch, python: Path, *, max_model_len: int, dtype: str, log_path: Path,
                 max_num_seqs: int = 256, tensor_parallel_size: int = 1, memory_fraction: float = 0.5,
                 kv_cache_gib: float = 1.0, enforce_eager: bool = True, routing: bool = False,
                 sleep: bool = False, gpus: tuple[int, ...] = (), startup_timeout: float = 600.0,
                 idle_timeout: float = DEFAULT_ENGINE_TIMEOUT):
        """``sleep``: colocated with training on the same GPU, vLLM sleeps between rollouts (its sleep mode);
        ``gpus``: disaggregated, the engine sees only these GPUs (CUDA_VISIBLE_DEVICES)."""
        self.routing, self.sleep, self.log_path, self.idle_timeout = routing, sleep, log_path, idle_timeout
        base = SHARED_MEMORY if SHARED_MEMORY.is_dir() else Path(tempfile.gettempdir())
        for line in remove_stale_folders(base):
            print(line, flush=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=base))
        hf_config(arch).to_json_file(str(self.folder / "config.json"))
        key = secrets.token_bytes(32)
        self.listener = Listener(str(self.folder / "socket"), family="AF_UNIX", authkey=key)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        command = [str(python), str(DRIVER), "--socket", str(self.folder / "socket"), "--model", str(self.folder),
                   "--dtype", dtype, "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
                   "--tensor-parallel-size", str(tensor_parallel_size), "--memory-fraction", str(memory_fraction)]
        command += ["--enforce-eager"] * enforce_eager + ["--routing"] * routing + ["--sleep"] * sleep
        # The driver's environment is vLLM's: none of the trainer's torchrun, thread or Python settings.
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("PYTHON", "TORCHELASTIC", "MASTER_", "LOCAL_", "GROUP_", "ROLE_"))
               and name not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "VIRTUAL_ENV")}
        env |= {"MP_VLLM_AUTHKEY": key.hex(), "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib))),
                "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, preexec_fn=end_with_parent)
        self.connection = None
        try:
            self.connection = self._accept(startup_timeout)
            self.startup_seconds = self._reply("start", startup_timeout)["seconds"]
        except BaseException:
            self.close()
            raise

    # --- the channel ------------------------------------------------------------------------------------
    def _accept(self, timeout: float):
        accepted = {}

        def accept():
            try:
                accepted["connection"] = self.listener.accept()
            except Exception as error:  # closed, or a peer without the key
                accepted["error"] = error

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while thread.is_alive():
            thread.join(0.5)
            self._check_alive()
            if time.monotonic() > deadline:
                raise VllmEngineError(f"vLLM engine (pid {self.process.pid}) did not connect in {timeout:.0f} s; "
                                      f"its log: {self.log_path}")
        if "connection" not in accepted:
            raise VllmEngineError(f"vLLM engine (pid {self.process.pid}) could not connect: {accepted.get('error')}")
        return accepted["connection"]

    def _check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise VllmEngineError(f"vLLM engine (pid {self.process.pid}) exited with code {code}: "
                                  f"{self.last_error()} (log: {self.log_path})")

    def last_error(self) -> str:
        """The last line of the engine's log that reads like an error (else its last line)."""
        self._log.flush()
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line]
        return (errors or lines or ["(no output)"])[-1][-500:]

    def _reply(self, asked: str, timeout: float | None = None) -> dict:
        """The engine's answer to ``asked``. Without an answer, ``timeout`` bounds the whole wait and
        ``idle_timeout`` the time without progress (CPU used by the engine's processes, or log written):
        a stopped (SIGSTOP) or deadlocked engine ends the job in one line instead of holding it for ever."""
        deadline = None if timeout is None else time.monotonic() + timeout
        progress, progress_at = None, time.monotonic()  # read only once an answer is late: most come at once
        while not self.connection.poll(0.5):
            self._check_alive()
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise VllmEngineError(f"vLLM engine (pid {self.process.pid}) gave no answer in {timeout:.0f} s "
                                      f"while asked to {asked} (log: {self.log_path})")
            current = self._progress()
            if current != progress:
                progress, progress_at = current, now
            elif now - progress_at > self.idle_timeout:
                raise VllmEngineError(f"vLLM engine (pid {self.process.pid}) neither answered nor did any work for "
                                      f"{self.idle_timeout:g} s while asked to {asked} (stopped or deadlocked?); "
                                      f"--engine-timeout / MP_GRPO_ENGINE_TIMEOUT sets the limit (log: "
                                      f"{self.log_path})")
        try:
            reply = json.loads(self.connection.recv_bytes())
        except (EOFError, OSError):
            self.process.wait(timeout=30)
            self._check_alive()
            raise
        if "error" in reply:
            raise VllmEngineError(f"vLLM engine (pid {self.process.pid}): {reply['error']} (log: {self.log_path})")
        return reply

    def _request(self, message: dict) -> dict:
        self._check_alive()
        self.connection.send_bytes(json.dumps(message).encode())
        return self._reply(_ASKED.get(message["op"], message["op"]))

    def _progress(self) -> tuple[int, int]:
        """(CPU ticks used by the engine and every process under it, bytes of its log): what moves while it
        works, and stands still while it is stopped or waits on something that never comes."""
        return _tree_cpu_ticks(self.process.pid), self.log_path.stat().st_size if self.log_path.exists() else 0

    # --- what the trainer asks ----------------------------------------------------------------------------
    def sync(self, buckets: Iterable[dict[str, torch.Tensor]]) -> float:
        """Give the engine these weights (HF names), a bucket at a time (``hf_weight_buckets``) within one
        weight update; returns the seconds from the first bucket's gathering to loaded."""
        from safetensors.torch import save_file

        start = time.perf_counter()
        self._request({"op": "update_begin", "asleep": self.sleep})
        staged, path = self.folder / "weights.safetensors.partial", self.folder / "weights.safetensors"
        self.synced_buckets = 0
        for weights in buckets:
            save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(staged))
            staged.rename(path)
            try:
                self._request({"op": "update_weights", "path": str(path)})
            finally:
                path.unlink(missing_ok=True)
            self.synced_buckets += 1
        self._request({"op": "update_end", "asleep": self.sleep})
        return time.perf_counter() - start

    def forget_prefixes(self) -> None:
        """Drop vLLM's cached prompt prefixes (a sync does it too), so that a timed rollout prefills its
        prompts as the first rollout after a sync would (benchmarks/rollout.py)."""
        self._request({"op": "forget_prefixes"})

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling) -> list[Completion]:
        """Completions as the embedded generator gives them: tokens (a stop token included), the sampled
        tokens' log-probs of the temperature-scaled distribution, and (``routing``) each input's experts."""
        # The experts come back as a file in shared memory: as JSON they would be most of the reply.
        routing_path = self.folder / "routing.safetensors" if self.routing else None
        reply = self._request({
            "op": "generate", "prompts": prompts, "seeds": seeds, "sleep_after": self.sleep,
            "routing": None if routing_path is None else str(routing_path),
            "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                         "max_tokens": sampling.max_new_tokens, "stop_token_ids": list(sampling.stop_token_ids)}})
        routes = [None] * len(prompts)
        if routing_path is not None:
            from safetensors.torch import load_file

            try:
                experts = load_file(str(routing_path))["experts"].to(ROUTE_DTYPE)
                routes = [part.clone() for part in experts.split(reply["routing_lengths"])]  # not views of all
            finally:
                routing_path.unlink(missing_ok=True)
        return [Completion(tokens, log_probs, stopped, route)
                for tokens, log_probs, stopped, route in zip(reply["tokens"], reply["log_probs"], reply["stopped"],
                                                             routes)]

    def close(self) -> None:
        """Stop the engine (asked, then killed after 30 s) and remove its shared-memory folder."""
        try:
            if self.connection is not None and self.process.poll() is None:
                self.connection.send_bytes(json.dumps({"op": "stop"}).encode())
                self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            if self.connection is not None:
                self.connection.close()
            self.listener.close()
            self._log.close()
            shutil.rmtree(self.folder, ignore_errors=True)
