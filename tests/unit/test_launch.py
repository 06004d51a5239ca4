"""run_mcore_qwen3.sh's arguments: Pai's arithmetic and names, and an error naming each bad argument."""

import re
import subprocess
from pathlib import Path

import pytest

from megatron_patch.training.launch import POSITIONALS, LaunchError, plan

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "qwen3" / "run_mcore_qwen3.sh"


def arguments(**changes):
    values = dict(
        ENV="dsw", MODEL_SIZE="tiny-moe", BATCH_SIZE="1", GLOBAL_BATCH_SIZE="8", LR="1e-5", MIN_LR="1e-6",
        SEQ_LEN="128", PAD_LEN="128", PR="fp32", TP="1", PP="1", CP="1", ETP="1", EP="1", SP="false", DO="true",
        FL="false", SFT="false", AC="none", OPTIMIZER_OFFLOAD="false", SAVE_INTERVAL="100",
        DATASET_PATH="/data/a_text_document", VALID_DATASET_PATH="/data/a_text_document",
        PRETRAIN_CHECKPOINT_PATH="none", TRAIN_TOKENS_OR_ITERS="1000000", WARMUP_TOKENS_OR_ITERS="10240",
        OUTPUT_BASEPATH="/tmp/out",
    )
    values.update(changes)
    return [values[name] for name in POSITIONALS]


def flag(launch, name):
    return launch.flags[launch.flags.index(name) + 1]


def test_pretrain_counts_tokens_and_sft_counts_iterations():
    launch = plan(arguments(), env={}, cuda_devices=0)
    assert flag(launch, "--train-iters") == str(1000000 // 8 // 128)  # 976
    assert flag(launch, "--lr-warmup-iters") == str(10240 // 8 // 128)  # 10
    assert flag(launch, "--lr-decay-iters") == "976"
    assert flag(launch, "--train-mode") == "pretrain"
    sft = plan(arguments(SFT="true", TRAIN_TOKENS_OR_ITERS="500", WARMUP_TOKENS_OR_ITERS="50"), env={}, cuda_devices=0)
    assert (flag(sft, "--train-iters"), flag(sft, "--lr-warmup-iters"), flag(sft, "--lr-decay-iters")) == ("500", "50", "450")
    assert sft.name.startswith("finetune-mcore-qwen3-moe-megatron-tiny-moe-lr-1e-5-minlr-1e-6-bs-1-gbs-8-seqlen-128")
    assert sft.name.endswith("-pr-fp32-tp-1-pp-1-cp-1-ac-none-do-true-sp-false-ti-500-wi-50")
    assert flag(sft, "--save") == f"/tmp/out/checkpoint/{sft.name}"
    assert flag(sft, "--log-dir") == f"/tmp/out/log/{sft.name}"


def test_environment_knobs_and_cpu_processes():
    env = {"MP_DATASET_TYPE": "raw", "MP_SFT_PACKING": "false", "MP_NPROC": "2", "MP_SAVE_OPTIM": "false"}
    launch = plan(arguments(SFT="true", EP="2", TRAIN_TOKENS_OR_ITERS="10", WARMUP_TOKENS_OR_ITERS="1",
                            DATASET_PATH="train.json", VALID_DATASET_PATH="valid.json"), env=env, cuda_devices=0)
    assert (launch.device, launch.nproc_per_node, launch.nnodes) == ("cpu", 2, 1)
    assert flag(launch, "--dataset-type") == "raw" and flag(launch, "--valid-data-path") == "valid.json"
    assert "--no-save-optim" in launch.flags
    assert flag(launch, "--transformer-impl") == "auto"
    stock = plan(arguments(), env={"MP_TRANSFORMER_IMPL": "local"}, cuda_devices=0)
    assert flag(stock, "--transformer-impl") == "local"
    dlc = plan(arguments(ENV="dlc", GLOBAL_BATCH_SIZE="16"), env={"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "node0",
                                          "MASTER_PORT": "6000", "KUBERNETES_CONTAINER_RESOURCE_GPU": "8"},
               cuda_devices=8)
    assert (dlc.nnodes, dlc.node_rank, dlc.master_addr, dlc.master_port, dlc.nproc_per_node) == (2, 1, "node0", 6000, 8)


@pytest.mark.parametrize("changes, env, message", [
    (dict(ENV="local"), {}, "ENV (argument 1) must be dsw"),
    (dict(PR="int8"), {}, "PR (argument 9)"),
    (dict(AC="most"), {}, "AC (argument 19)"),
    (dict(SP="yes"), {}, "SP (argument 15) must be true or false"),
    (dict(TP="two"), {}, "TP (argument 10) must be an integer"),
    (dict(TRAIN_TOKENS_OR_ITERS="1000"), {}, "TRAIN_TOKENS_OR_ITERS (argument 25) 1000 gives 0 iterations"),
    (dict(PP="3"), {"MP_NPROC": "3"}, "--pipeline-model-parallel-size (PP (argument 11)) 3 does not divide the 4 layers"),
    (dict(TP="2", EP="2"), {"MP_NPROC": "2"}, "needs --sequence-parallel (SP (argument 15))"),
    (dict(TP="2"), {"MP_NPROC": "2"}, "MoE with --tensor-model-parallel-size (TP (argument 10)) > 1 needs --sequence-parallel"),
    (dict(TP="4", SP="true"), {"MP_NPROC": "4"}, "(TP (argument 10)) 4 does not divide the 4 attention heads / 2 KV heads"),
    (dict(EP="3", GLOBAL_BATCH_SIZE="6"), {"MP_NPROC": "3"}, "--expert-model-parallel-size (EP (argument 14)) 3 does not divide the 8 experts"),
    (dict(TP="2", SP="true"), {}, "1 processes (GPUs per node x nodes; MP_NPROC on CPU) are not divisible by TP*PP*CP = 2"),
    (dict(GLOBAL_BATCH_SIZE="3"), {"MP_NPROC": "2"}, "--global-batch-size (GLOBAL_BATCH_SIZE (argument 4)) 3 is not a multiple"),
    (dict(), {"MP_PP0_LAYERS": "1"}, "MP_PP0_LAYERS needs PP (argument 11) > 1"),
    (dict(PP="3", GLOBAL_BATCH_SIZE="6"), {"MP_NPROC": "3", "MP_PP0_LAYERS": "1"}, "the other 3 layers must split evenly"),
    (dict(AC="full", PP="2"), {"MP_NPROC": "2", "MP_AC_LAYERS": "3"}, "--recompute-num-layers (MP_AC_LAYERS) 3 must divide the 2 layers"),
    (dict(CP="2"), {"MP_NPROC": "2"}, "needs Transformer-Engine attention"),
    (dict(), {"MP_TRANSFORMER_IMPL": "flash"}, "MP_TRANSFORMER_IMPL must be one of auto, transformer_engine"),
    (dict(), {"MP_TRANSFORMER_IMPL": "transformer_engine"}, "(MP_TRANSFORMER_IMPL) transformer_engine needs Transformer-Engine"),
    (dict(OPTIMIZER_OFFLOAD="0.5"), {}, "this run has no GPU"),
    (dict(MODEL_SIZE="70B"), {}, "--model (MODEL_SIZE (argument 2)) '70B': not a directory and not a preset"),
])
def test_each_invalid_argument_is_named(changes, env, message):
    with pytest.raises(LaunchError) as caught:
        plan(arguments(**changes), env=env, cuda_devices=0)
    assert message in str(caught.value)


@pytest.mark.slow
def test_script_checks_the_count_and_shows_usage_from_any_directory(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "dsw", "A3B"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "expected 27 arguments, got 2" in result.stderr
    usage = re.search(r"usage: \S+ (.*)", result.stderr).group(1).split()
    assert usage == list(POSITIONALS)
    bad = subprocess.run(["bash", str(SCRIPT), *arguments(AC="most")], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "AC (argument 19)" in bad.stderr


def test_readme_lists_the_27_arguments_in_order():
    readme = (REPO / "examples" / "qwen3" / "README.md").read_text()
    table = re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", readme, re.MULTILINE)
    assert [name for _, name in table] == list(POSITIONALS)


def test_the_grpo_script_reads_the_same_arguments_with_rl_meanings():
    """run_mcore_qwen3_grpo.sh: steps whatever SFT says, prompt files, MP_GRPO_* as GRPO flags."""
    from megatron_patch.rl.launch import GRPO

    env = {"MP_GRPO_N": "4", "MP_GRPO_REWARD": "gsm8k-flexible", "MP_GRPO_THINKING": "false",
           "MP_GRPO_EVAL_INTERVAL": "5", "MP_NPROC": "2", "MP_GRPO_MAX_PROMPT_LENGTH": "64",
           "MP_GRPO_MAX_RESPONSE_LENGTH": "64"}
    launch = plan(arguments(BATCH_SIZE="4", GLOBAL_BATCH_SIZE="2", TRAIN_TOKENS_OR_ITERS="30",
                            WARMUP_TOKENS_OR_ITERS="3", DATASET_PATH="/data/prompts.jsonl",
                            VALID_DATASET_PATH="/data/test.jsonl"), env=env, cuda_devices=0, job=GRPO)
    assert launch.module == "megatron_patch.rl" and launch.name.startswith("grpo-mcore-qwen3")
    assert (flag(launch, "--train-iters"), flag(launch, "--lr-warmup-iters")) == ("30", "3")  # steps, SFT=false
    assert flag(launch, "--samples-per-prompt") == "4" and flag(launch, "--reward") == "gsm8k-flexible"
    assert "--no-enable-thinking" in launch.flags and flag(launch, "--eval-interval") == "5"
    assert flag(launch, "--valid-data-path") == "/data/test.jsonl" and "--split" not in launch.flags
    with pytest.raises(LaunchError, match=r"--samples-per-prompt \(MP_GRPO_N\) must be >= 1, got 0"):
        plan(arguments(DATASET_PATH="/data/p.jsonl"), env={**env, "MP_GRPO_N": "0"}, cuda_devices=0, job=GRPO)
    with pytest.raises(LaunchError, match=r"--seq-length \(SEQ_LEN \(argument 7\)\) 128 is below"):
        plan(arguments(DATASET_PATH="/data/p.jsonl"), env={**env, "MP_GRPO_MAX_RESPONSE_LENGTH": "100"},
             cuda_devices=0, job=GRPO)
    with pytest.raises(LaunchError, match="MP_GRPO_THINKING must be true or false, got 'no'"):
        plan(arguments(), env={**env, "MP_GRPO_THINKING": "no"}, cuda_devices=0, job=GRPO)


def test_hf_output_and_prompt_key_variables_become_flags():
    from megatron_patch.rl.launch import GRPO

    env = {"MP_SAVE_HF": "/out/hf", "MP_SAVE_HF_INTERVAL": "50", "MP_GRPO_INPUT_KEY": "question",
           "MP_GRPO_LABEL_KEY": "answer", "MP_GRPO_SKIP_BAD_LINES": "true", "MP_GRPO_MAX_PROMPT_LENGTH": "64",
           "MP_GRPO_MAX_RESPONSE_LENGTH": "64"}
    launch = plan(arguments(DATASET_PATH="/data/train.parquet"), env=env, cuda_devices=0, job=GRPO)
    assert (flag(launch, "--save-hf"), flag(launch, "--save-hf-interval")) == ("/out/hf", "50")
    assert (flag(launch, "--input-key"), flag(launch, "--label-key")) == ("question", "answer")
    assert "--skip-bad-lines" in launch.flags
    with pytest.raises(LaunchError, match=r"--save-peft \(MP_SAVE_PEFT\) writes LoRA adapters"):
        plan(arguments(), env={"MP_SAVE_PEFT": "/out/peft"}, cuda_devices=0)


def test_every_variable_the_kit_documents_is_known_and_another_jobs_are_not_typos():
    """examples/qwen3/README.md's MP_* table is what unknown_variables() accepts: no documented name is refused."""
    import re
    from pathlib import Path

    from megatron_patch.rl.launch import GRPO
    from megatron_patch.training.launch import KIT_VARIABLES, unknown_variables

    readme = (Path(__file__).resolve().parents[2] / "examples" / "qwen3" / "README.md").read_text()
    documented = set(re.findall(r"`(MP_[A-Z0-9_]+)`", readme))
    assert documented and unknown_variables(dict.fromkeys(documented, "1"), GRPO.variables) is None
    assert KIT_VARIABLES <= documented | {"MP_CHECKSUMS"}, KIT_VARIABLES - documented
    # A GRPO setting left in the shell does not stop an SFT launch; in the GRPO launcher a misspelt one does.
    plan(arguments(), env={"MP_GRPO_N": "4"}, cuda_devices=0)
    assert "MP_GRPO_NN (did you mean MP_GRPO_N?)" in unknown_variables({"MP_GRPO_NN": "4"}, GRPO.variables)
