"""GRPO end to end on CPU: python -m megatron_patch.rl on a tiny model with the real Qwen3 tokenizer."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.functional.test_training import converted, read_metrics
from tests.functional.torchrun import torchrun_batch

pytestmark = pytest.mark.functional

STEPS = 2


def prompt_file(work: str) -> Path:
    path = Path(work) / "rl" / "prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"Write {n} words.", "label": "letters"}) + "\n" for n in range(8)))
    return path


def rl_flags(work: str, name: str, steps: int = STEPS, *extra) -> list:
    hf_dir, mcore = converted(work, "tiny-dense")
    root = Path(work) / "rl" / name
    return ["--model", hf_dir, "--load", mcore, "--precision", "fp32", "--data-path", prompt_file(work),
            "--reward", "letters", "--global-batch-size", 2, "--samples-per-prompt", 4, "--micro-batch-size", 2,
            "--seq-length", 64, "--max-prompt-length", 32, "--max-response-length", 8, "--lr", "3e-3",
            "--min-lr", "3e-3", "--train-iters", steps, "--updates-per-rollout", 2, "--kl-coef", 0.01,
            "--tis", "--mis", "--mis-level", "sequence", "--log-dir", root / "log", "--save", root / "checkpoint",
            *extra]


@functools.cache
def _rl_runs(work: str) -> dict[str, str]:
    hf_dir, _ = converted(work, "tiny-dense")
    # The uninterrupted run starts from the HF directory itself (its reference too) and writes HF at
    # the end; the halves start from its torch_dist conversion (the same bf16 weights).
    # The whole run's HF output is written by a rerun that finds its training finished (as after a kill during
    # the HF write): the HF output of the final save, which the first run never wrote.
    whole = rl_flags(work, "whole", STEPS, "--load", hf_dir, "--rollout-log", Path(work) / "rl" / "whole-rollouts")
    jobs = {
        "whole": ("rl", whole),
        "first-half": ("rl", rl_flags(work, "halves", STEPS, "--exit-interval", 1)),
        "second-half": ("rl", rl_flags(work, "halves")),
        "whole-rerun": ("rl", [*whole, "--save-hf", Path(work) / "rl" / "whole-hf"]),
    }
    return torchrun_batch(1, jobs, Path(work) / "rl" / "batch-1")


def step_values(work: str, name: str) -> dict[int, dict]:
    return {r["iteration"]: r for r in read_metrics(Path(work) / "rl" / name / "log") if "reward_mean" in r}


def test_grpo_steps_report_their_metrics_and_resume_exactly(work):
    outputs = _rl_runs(work)
    whole, halves = step_values(work, "whole"), step_values(work, "halves")
    assert sorted(whole) == sorted(halves) == list(range(1, STEPS + 1)), outputs["second-half"][-2000:]
    assert "resuming at iteration 1" in outputs["second-half"]
    for step in whole:
        for key in ("reward_mean", "loss", "kl", "entropy", "response_length_mean", "grad_norm"):
            assert halves[step][key] == pytest.approx(whole[step][key], abs=1e-6), (step, key)
    record = whole[STEPS]
    for key in ("reward_std", "truncated_share", "clip_fraction", "max_ratio_drift", "seconds_rollout",
                "seconds_log_probs", "seconds_reference", "seconds_update", "generated_tokens_per_second"):
        assert key in record, key
    assert 0 <= record["reward_mean"] <= 1 and record["response_length_max"] <= 8
    assert record["kl"] > 0  # the policy moved away from the reference
    assert whole[1]["max_ratio_drift"] <= 1e-5  # rollout log-probs are the training forward's
    # The embedded engine is the training model: no mismatch to correct, nothing masked out.
    for values in whole.values():
        assert values["rollout_kl"] <= 1e-9 and values["rollout_beyond_cap"] == values["mis_dropped"] == 0
    checkpoint = Path(work) / "rl" / "whole" / "checkpoint"
    assert (checkpoint / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)
    # HF out: the converter's HF of the final save, byte for byte, written by the rerun (nothing trained).
    assert "HF model directory, read from its safetensors" in outputs["whole"]
    rerun = outputs["whole-rerun"]
    assert "step " not in rerun and "the HF outputs are not from the final save" in rerun
    from megatron_patch.convert.__main__ import main as convert  # in this process: no second start-up

    converted_back = Path(work) / "rl" / "whole-converted"
    assert convert([str(a) for a in ("--mg2hf", "--load-dir", checkpoint, "--precision", "fp32",
                                     "--save-dir", converted_back)]) == 0
    hf_out = Path(work) / "rl" / "whole-hf"
    assert (hf_out / "model.safetensors").read_bytes() == (converted_back / "model.safetensors").read_bytes()


def test_the_rollout_log_holds_what_each_step_sampled_and_trained_on(work, tokenizer):
    """--rollout-log: a record per sequence of each step, its prompt part the template's rendering of its
    messages, its loss mask 1 exactly on the response, its rewards those the metrics report."""
    from megatron_patch.data.chat import Message, generation_prompt
    from megatron_patch.rl.rollout_log import log_file

    _rl_runs(work)
    logged = Path(work) / "rl" / "whole-rollouts"
    whole = step_values(work, "whole")
    for step in range(1, STEPS + 1):
        records = [json.loads(line) for line in log_file(logged, step).read_text().splitlines()]
        assert len(records) == 2 * 4  # prompts per step x samples per prompt
        for record in records:
            prompt_messages = record["messages"][:-1]
            rendered = generation_prompt([Message(m["role"], m["content"]) for m in prompt_messages])
            prompt_tokens = tokenizer.backend.encode(rendered, add_special_tokens=False).ids
            assert record["tokens"][:len(prompt_tokens)] == prompt_tokens and record["prompt"].startswith(
                str(prompt_file(work)) + ":")
            response = record["tokens"][len(prompt_tokens):]
            assert record["loss_mask"] == [0] * len(prompt_tokens) + [1] * len(response)
            assert len(record["log_probs"]) == len(response) and all(lp <= 0 for lp in record["log_probs"])
            assert record["messages"][-1]["role"] == "assistant" and record["policy_version"] == step - 1
            assert record["engine"] == "megatron"
        mean = sum(r["reward"] for r in records) / len(records)
        assert mean == pytest.approx(whole[step]["reward_mean"], abs=1e-6)
    assert not list(logged.glob(".*"))  # nothing half-written left


# The demo task (reward "letters"): a tiny model whose random initialisation is peaked enough
# (std 0.6: entropy ~3 nats instead of ln 151936) to sample a few tokens per context, so GRPO can
# reinforce the letter-only ones; at std 0.02 a 151,936-way uniform policy samples nothing twice.
LEARN_FLAGS = ["--model", "tiny-dense", "--precision", "fp32", "--init-method-std", 0.6, "--reward", "letters",
               "--global-batch-size", 4, "--samples-per-prompt", 8, "--micro-batch-size", 8, "--seq-length", 64,
               "--max-prompt-length", 32, "--max-response-length", 8, "--lr", "1e-2", "--min-lr", "1e-2",
               "--kl-coef", 0]
# LoRA adapters (rank 8, alpha 16) need a larger step than full fine-tuning: 1.0 by step 11 at 3e-2.
LORA_FLAGS = ["--lora-rank", 8, "--lora-alpha", 16, "--lr", "3e-2", "--min-lr", "3e-2"]
LEARN_STEPS = 12
# The policy losses beside PPO-clip, each learning the demo task with its paper's clip and aggregation.
NEW_POLICY_LOSSES = ("gspo", "cispo", "gmpo", "sapo")


def _slow_root(work: str) -> Path:
    return Path(work) / "rl-slow"


@functools.cache
def _learning_runs(work: str) -> dict[str, str]:
    demo = Path(__file__).resolve().parents[2] / "megatron_patch" / "resources" / "demo_rl_prompts.jsonl"
    jobs = {name: ("rl", [*LEARN_FLAGS, "--data-path", demo, "--train-iters", LEARN_STEPS,
                          "--log-dir", _slow_root(work) / name / "log", *extra])
            # Rollouts of 8 of the step's 32 sequences at a time (--rollout-batch), as a memory-bound run would.
            for name, extra in (("learn-lora", [*LORA_FLAGS, "--rollout-batch", 8]),
                                *((f"learn-{loss}", ["--policy-loss", loss]) for loss in NEW_POLICY_LOSSES))}
    return torchrun_batch(1, jobs, _slow_root(work) / "batch-learn")


@functools.cache
def peaked_moe(work: str) -> tuple[Path, Path]:
    """(HF dir, its conversion) of a tiny MoE initialised with std 0.6: near-uniform policies over
    151,936 tokens put a token boundary within 1e-6 of many draws, peaked ones do not."""
    from megatron_patch.models.qwen3.hf_model import save_random_hf_checkpoint
    from megatron_patch.models.qwen3.presets import get_preset

    hf_dir, mcore = _slow_root(work) / "moe-hf", _slow_root(work) / "moe-mcore"
    save_random_hf_checkpoint(get_preset("tiny-moe").replace(initializer_range=0.6), hf_dir)
    subprocess.run([sys.executable, "-m", "megatron_patch.convert", "--load-dir", hf_dir, "--save-dir", mcore],
                   check=True, capture_output=True)
    return hf_dir, mcore


@functools.cache
def _expert_parallel_run(work: str, nproc: int) -> str:
    """The same start at EP=1 and EP=2: samples are seeded by their place in the batch."""
    hf_dir, mcore = peaked_moe(work)
    name = f"moe-ep{nproc}"
    # One small update per rollout: Adam turns the 1e-7 differences of EP's expert GEMMs into
    # whole-step differences for entries whose gradients are near zero, and one sample drawn
    # differently then moves the curves apart by 1/32 of a reward.
    flags = [*rl_flags(work, name, 2), "--model", hf_dir, "--load", mcore, "--expert-model-parallel-size", nproc,
             "--lr", "1e-4", "--min-lr", "1e-4", "--updates-per-rollout", 1]
    return torchrun_batch(nproc, {name: ("rl", flags)}, _slow_root(work) / f"batch-{name}")[name]


def rewards(log_dir: Path) -> list[float]:
    return [r["reward_mean"] for r in read_metrics(log_dir) if "reward_mean" in r]


@pytest.mark.slow
def test_the_grpo_demo_learns_through_the_script(tmp_path):
    """make demo-rl: run_mcore_qwen3_grpo.sh from / with a bare PATH, full fine-tuning of a tiny model."""
    result = subprocess.run([sys.executable, "-m", "megatron_patch.demo", "--grpo", "--iterations", "16",
                             "--work-dir", tmp_path / "demo"],
                            capture_output=True, text=True, timeout=900, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if "mean reward" in line)
    before, after = (float(x) for x in line.split("step 1 ")[1].split(" -> last 3 steps "))
    assert after >= 0.9 or after >= before + 0.4, line
    (plot,) = (tmp_path / "demo" / "run").rglob("reward.png")
    assert plot.stat().st_size > 1000


@pytest.mark.slow
def test_lora_grpo_learns_the_demo_task(work):
    _learning_runs(work)
    curve = rewards(_slow_root(work) / "learn-lora" / "log")
    assert len(curve) == LEARN_STEPS
    start, end = curve[0], max(curve[-5:])
    assert end >= 0.9 or end >= start + 0.4, curve


@pytest.mark.slow
@pytest.mark.parametrize("loss", NEW_POLICY_LOSSES)
def test_each_policy_loss_learns_the_demo_task(work, loss):
    _learning_runs(work)
    curve = rewards(_slow_root(work) / f"learn-{loss}" / "log")
    assert len(curve) == LEARN_STEPS
    start, end = curve[0], max(curve[-5:])
    assert end >= 0.9 or end >= start + 0.3, (loss, curve)


@pytest.mark.slow
def test_expert_parallel_grpo_follows_the_one_process_curve(work):
    """Step 1 (rollout, rewards, gradient) and step 2 (after an update) agree to 1e-5.

    Later steps part: EP's expert GEMMs see tokens of both ranks at once (1e-7 differences), Adam
    makes near-zero gradients into whole steps, and by step 3 or 4 one of 32 samples is drawn
    differently (measured: reward 0.7608 vs 0.7599 at step 3, 0.73 vs 0.76 at step 4).
    """
    _expert_parallel_run(work, 1)
    _expert_parallel_run(work, 2)
    one, two = step_values(work, "moe-ep1"), step_values(work, "moe-ep2")
    assert sorted(one) == sorted(two) == [1, 2]
    assert one[2]["kl"] > 1e-3  # the update moved the policy
    for step in one:
        for key in ("reward_mean", "loss", "kl", "entropy", "response_length_mean"):
            assert two[step][key] == pytest.approx(one[step][key], abs=1e-5), (step, key, one[step], two[step])
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-5)


VERL_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature and dict return; the extras say what reached the function."""
    import re

    answer = re.search("#### (\\\\-?[0-9\\\\.\\\\,]+)", extra_info["answer"]).group(1).replace(",", "")
    return {"score": min(len(solution_str), 40) / 40, "from_gsm8k": float(data_source == "openai/gsm8k"),
            "truth_matches": float(ground_truth == answer), "index": float(extra_info["index"])}
'''


@pytest.mark.slow
def test_verls_gsm8k_parquet_and_reward_function_train_through_the_script(work, tmp_path):
    """A parquet file in verl's gsm8k layout and a verl compute_score (dict return) through
    run_mcore_qwen3_grpo.sh, started from an HF directory and writing HF at the end."""
    from tests.helpers import gsm8k_problems, write_verl_gsm8k_parquet

    parquet = write_verl_gsm8k_parquet(tmp_path / "test.parquet", gsm8k_problems("test", 8))
    reward = tmp_path / "verl_reward.py"
    reward.write_text(VERL_REWARD)
    hf_dir, _ = converted(work, "tiny-dense")
    script = Path(__file__).resolve().parents[2] / "examples" / "qwen3" / "run_mcore_qwen3_grpo.sh"
    arguments = ["dsw", hf_dir, 4, 2, "1e-3", "1e-3", 328, 328, "fp32", 1, 1, 1, 1, 1, "false", "true", "false",
                 "true", "none", "false", 2, parquet, "none", hf_dir, 2, 0, tmp_path / "run"]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2", "MP_NPROC": "1", "MP_GRPO_N": "4",
           "MP_GRPO_REWARD": f"custom:{reward}:compute_score", "MP_GRPO_MAX_PROMPT_LENGTH": "320",
           "MP_GRPO_MAX_RESPONSE_LENGTH": "8", "MP_GRPO_KL_COEF": "0", "MP_SAVE_HF": str(tmp_path / "hf")}
    result = subprocess.run(["bash", script, *map(str, arguments)], capture_output=True, text=True, timeout=600,
                            cwd="/", env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    (metrics,) = (tmp_path / "run").rglob("metrics.jsonl")
    steps = [r for r in read_metrics(metrics.parent) if "reward_mean" in r]
    assert [r["iteration"] for r in steps] == [1, 2]
    for record in steps:
        assert record["reward_extra/from_gsm8k"] == 1.0 and record["reward_extra/truth_matches"] == 1.0
        assert 0 <= record["reward_extra/index"] <= 7 and 0 < record["reward_mean"] <= 1
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "checksums.json").is_file()


@pytest.mark.slow
def test_routing_replay_makes_the_training_forward_take_the_rollouts_experts(work):
    """bf16 MoE: the KV-cached rollout and the whole-sequence training forward round differently, and a few
    near-tied router scores fall the other way (fp32 here: 0 of them differ, docs/rl.md). --routing-replay
    makes the training forwards take the rollout's experts: 0 differ by construction, and it is measured."""
    root = Path(work) / "rl" / "routing"
    flags = ["--model", "tiny-moe", "--precision", "bf16", "--data-path", prompt_file(work), "--reward", "letters",
             "--global-batch-size", 2, "--samples-per-prompt", 8, "--micro-batch-size", 8, "--seq-length", 64,
             "--max-prompt-length", 32, "--max-response-length", 8, "--kl-coef", 0.01, "--lr", "1e-2",
             "--min-lr", "1e-2", "--train-iters", 2]
    outputs = torchrun_batch(1, {name: ("rl", [*flags, "--log-dir", root / name, *extra])
                                 for name, extra in (("plain", []), ("replay", ["--routing-replay"]))},
                             root / "batch")
    plain, replay = ({r["iteration"]: r for r in read_metrics(root / name) if "reward_mean" in r}
                     for name in ("plain", "replay"))
    assert "routing mismatch 0.0000" in outputs["replay"]
    assert all(values["routing_mismatch"] == 0 for values in replay.values()), replay
    assert sum(values["routing_mismatch"] for values in plain.values()) > 0, plain
    # The first rollout is the same in both (replay changes the training forwards only).
    assert replay[1]["reward_mean"] == plain[1]["reward_mean"]


@pytest.mark.slow
def test_grpo_with_tools_trains_on_the_models_turns_only(tmp_path, tokenizer):
    """A tiny model SFT'd for 40 steps on tool conversations (HF chat convention) makes tool calls, valid or not;
    GRPO with --tools runs them, inserts the tool turns and trains on the model's tokens only. Every logged
    trajectory: the prompt is the template's rendering with the tools, each inserted run is exactly the
    template's tool turn for the logged results, the loss mask is 1 exactly on the model's tokens."""
    import random

    from megatron_patch.data.chat import Conversation, Message, generation_prompt
    from megatron_patch.rl.rollout_log import log_file
    from megatron_patch.rl.tool_rollout import tool_turn_text
    from megatron_patch.rl.tools import tool_schemas
    from tests.helpers import TOOL_FUNCTIONS

    (tmp_path / "tools.py").write_text(TOOL_FUNCTIONS)
    spec = f"{tmp_path / 'tools.py'}:add,multiply"
    schemas = tool_schemas(spec)
    rows, generator = [], random.Random(0)
    for index in range(64):
        a, b, name = generator.randint(1, 9), generator.randint(1, 9), ("add", "multiply")[index % 2]
        result = str(a + b if name == "add" else a * b)
        rows.append({"tools": list(schemas), "messages": [
            {"role": "user", "content": f"What is {a} and {b}?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": name, "arguments": {"a": a, "b": b}}}]},
            {"role": "tool", "content": result}, {"role": "assistant", "content": result}]})
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What is {a} and {b}?"}) + "\n"
                                                    for a in range(1, 5) for b in range(1, 5)))
    sft = [sys.executable, "-m", "megatron_patch.train", "--model", "tiny-dense", "--precision", "fp32",
           "--train-mode", "finetune", "--dataset-type", "raw", "--data-path", tmp_path / "sft.jsonl",
           "--valid-data-path", tmp_path / "sft.jsonl", "--seq-length", 512, "--max-padding-length", 512,
           "--global-batch-size", 8, "--micro-batch-size", 8, "--lr", "1e-2", "--min-lr", "1e-3",
           "--lr-warmup-iters", 0, "--train-iters", 40, "--save", tmp_path / "sft", "--no-save-optim",
           "--log-dir", tmp_path / "sft-log"]
    subprocess.run([str(a) for a in sft], check=True, capture_output=True, timeout=900)
    (tmp_path / "reward.py").write_text("def multiplied(prompt, response):\n"
                                        "    return float('\"name\": \"multiply\"' in response)\n")
    logged = tmp_path / "rollouts"
    grpo = ["--model", "tiny-dense", "--precision", "fp32", "--load", tmp_path / "sft", "--data-path",
            tmp_path / "prompts.jsonl", "--reward", f"custom:{tmp_path / 'reward.py'}:multiplied",
            "--global-batch-size", 4, "--samples-per-prompt", 8, "--micro-batch-size", 8, "--seq-length", 512,
            "--max-prompt-length", 400, "--max-response-length", 64, "--train-iters", 1, "--tools", spec,
            "--rollout-log", logged, "--kl-coef", 0, "--lr", "1e-2", "--log-dir", tmp_path / "grpo-log"]
    result = torchrun_batch(1, {"tools": ("rl", grpo)}, tmp_path / "batch")["tools"]
    (record,) = [r for r in read_metrics(tmp_path / "grpo-log") if "reward_mean" in r]
    assert record["tool_calls"] > 0, result[-3000:]
    assert record["max_ratio_drift"] < 1e-3  # rollout log-probs of the model's tokens are the training forward's
    with_tools = 0
    for line in log_file(logged, 1).read_text().splitlines():
        trajectory = json.loads(line)
        user = trajectory["messages"][0]
        prompt = tokenizer.backend.encode(generation_prompt(Conversation([Message("user", user["content"])],
                                                                         schemas)), add_special_tokens=False).ids
        assert trajectory["tokens"][:len(prompt)] == prompt
        response, mask = trajectory["tokens"][len(prompt):], trajectory["loss_mask"][len(prompt):]
        assert trajectory["loss_mask"][:len(prompt)] == [0] * len(prompt)
        inserted, run, runs = [], [], []
        for token, trained in zip(response, mask):
            if not trained:
                run.append(token)
            elif run:
                runs.append(run)
                run = []
        runs += [run] if run else []
        results = [m["content"] for m in trajectory["messages"] if m["role"] == "tool"]
        turns = [m for m in trajectory["messages"][1:] if m["role"] == "assistant"]
        with_tools += bool(runs)
        # Each inserted run is the template's tool turn for the results of the assistant turn before it.
        pieces = []
        for message in trajectory["messages"][1:]:
            if message["role"] == "assistant":
                if pieces:
                    inserted.append(tool_turn_text(pieces, True))
                pieces = []
            else:
                pieces.append(message["content"])
        assert [tokenizer.backend.decode(r, skip_special_tokens=False) for r in runs] == inserted, trajectory
        assert len(results) >= len(runs) and len(turns) == len(runs) + 1
        assert all(lp is None for lp, m in zip(trajectory["log_probs"], mask) if not m)
    assert with_tools > 0
