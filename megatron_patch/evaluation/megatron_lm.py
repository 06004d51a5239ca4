"""lm-eval model ``megatron``: a torch_dist checkpoint evaluated in-process on Megatron-Core.

  lm_eval --model megatron --model_args load=CKPT_DIR[,tokenizer=DIR,precision=bf16,
          tensor_model_parallel_size=2,pipeline_model_parallel_size=1,expert_model_parallel_size=1]

CKPT_DIR is a save directory (converter output or a training save, with its tracker file) or one
iteration directory; the model comes from the ``config.json`` beside it, so no HF export is needed.
Under torchrun every rank runs the same requests through one model-parallel model (TP/PP/EP), and
lm-eval sees a single worker.

Scoring follows lm-eval's ``hf`` model: context + continuation, left-truncated to ``max_length``
(the model's positions), the continuation's log-probabilities summed, and "greedy" when every
continuation token is the argmax. Requests are sorted longest first and batched with right padding
(causal attention: padding after a sequence cannot change it); log-softmax is taken only at
continuation positions, not over the whole sequence. Generation (``generate_until``) is greedy
with the kit's KV-cached generator (``models/generation.py``, the one GRPO rollout uses).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from megatron_patch.checkpoints import load_weights
from megatron_patch.data.tokenizer import Qwen3Tokenizer, bundled_qwen3_tokenizer_dir
from megatron_patch.evaluation.tasks import EvalDataError
from megatron_patch.models.choices import resolve_transformer_impl
from megatron_patch.models.generation import Sampling, generate
from megatron_patch.models.layout_check import RunFeatures, layout_problems
from megatron_patch.models.logits import forward_logits
from megatron_patch.models.qwen3.arch import Qwen3Arch
from megatron_patch.models.qwen3.builder import BuildOptions, build_gpt_model
from megatron_patch.parallel import ParallelLayout, initialize_parallel
from megatron_patch.patches import apply_patches


def _model_dir(load: Path) -> Path:
    """The directory holding config.json: the save directory, or the parent of an iteration directory."""
    for candidate in (load, load.parent):
        if (candidate / "config.json").is_file():
            return candidate
    raise EvalDataError(f"{load}: no config.json beside the checkpoint (converter output and training saves "
                        f"write one); copy the HF model's config.json there")


@register_model("megatron")
class MegatronLM(TemplateLM):
    def __init__(self, load: str, tokenizer: str | None = None, batch_size: int | str = 1,
                 max_length: int | None = None,
                 max_gen_toks: int = 256, precision: str = "fp32", tensor_model_parallel_size: int = 1,
                 pipeline_model_parallel_size: int = 1, expert_model_parallel_size: int = 1,
                 device: str | None = None, **_ignored):
        super().__init__()
        load_path = Path(load)
        model_dir = _model_dir(load_path)
        self.arch = Qwen3Arch.from_hf_dir(model_dir)
        tokenizer_dir = Path(tokenizer) if tokenizer else (
            model_dir if (model_dir / "tokenizer.json").is_file() else bundled_qwen3_tokenizer_dir())
        self.tokenizer_dir = tokenizer_dir
        self.qwen_tokenizer = Qwen3Tokenizer.from_dir(tokenizer_dir)
        self._eot = self._eos_id(tokenizer_dir, self.qwen_tokenizer.backend)
        self.batch_size_per_call = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_length = int(max_length) if max_length else self.arch.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)

        cuda = torch.cuda.is_available() and device != "cpu"
        apply_patches(cpu=not cuda)
        layout = ParallelLayout(tp=int(tensor_model_parallel_size), pp=int(pipeline_model_parallel_size),
                                ep=int(expert_model_parallel_size))
        problems = layout_problems(self.arch, layout, resolve_transformer_impl(), RunFeatures(inference=True))
        if problems:
            raise EvalDataError(f"{load_path}: {problems[0]}")
        initialize_parallel(layout, backend="nccl" if cuda else "gloo")
        chunk = build_gpt_model(self.arch, BuildOptions(layout=layout, precision=precision))
        if cuda:
            chunk = chunk.cuda(torch.cuda.current_device())
        self.chunks = [chunk]
        load_weights(load_path, self.chunks)
        chunk.eval()
        self.device_name = "cuda" if cuda else "cpu"

    @staticmethod
    def _eos_id(tokenizer_dir: Path, backend) -> int:
        """The tokenizer's eos token, as lm-eval's hf model takes it (its prefix and padding token)."""
        config_file = tokenizer_dir / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        eos = config.get("eos_token") or "<|endoftext|>"
        eos = eos["content"] if isinstance(eos, dict) else eos
        return backend.token_to_id(eos)

    # --- what lm-eval asks of a TemplateLM --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer_dir).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.qwen_tokenizer.backend.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.qwen_tokenizer.backend.decode(tokens, skip_special_tokens=False)

    @cached_property
    def _chat_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self._chat_tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.qwen_tokenizer.chat_template if chat_template else None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        return self._score_pairs(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for window in utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                          prefix_token=self.prefix_token_id,
                                                          max_seq_len=self.max_length, context_len=1):
                windows.append(utils.make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score_pairs(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding with the kit's KV-cached generator, ``batch_size`` requests at a time.

        Each request runs to its ``max_gen_toks`` or the end-of-text token; its text is then cut at
        the first of its ``until`` strings (what stopping there would have given).
        """
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise EvalDataError("generation tasks (generate_until) need pipeline_model_parallel_size=1: the kit's "
                                "generator keeps the whole model on each rank; use tensor or expert parallelism")
        asked = [request.args for request in requests]
        by_budget: dict[int, list[int]] = {}
        for index, (_, gen_kwargs) in enumerate(asked):
            by_budget.setdefault(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)), []).append(index)
        outputs = [""] * len(asked)
        for budget, indices in by_budget.items():
            sampling = Sampling(max_new_tokens=budget, temperature=0, stop_token_ids=(self.eot_token_id,))
            for start in range(0, len(indices), self.batch_size_per_call):
                batch = indices[start:start + self.batch_size_per_call]
                prompts = [self.tok_encode(asked[i][0])[-(self.max_length - budget):] or [self.prefix_token_id]
                           for i in batch]
                for index, completion in zip(batch, generate(self.chunks[0], prompts, sampling, self.arch.vocab_size)):
                    text = self.tok_decode(completion.tokens[:-1] if completion.stopped else completion.tokens)
                    until = asked[index][1].get("until") or []
                    for stop in [until] if isinstance(until, str) else until:
                        text = text.split(stop)[0]
                    outputs[index] = text
        return outputs

    # --- the model ------------------------------------------------------------------------------------
    def _logits(self, tokens: torch.Tensor, rows: list[int], positions: list[int]) -> torch.Tensor:
        """Logits [len(positions), vocab] at (row, position) pairs of ``tokens``, on every rank.

        The vocabulary projection (most of a small model's cost at Qwen3's 151,936 tokens) runs only
        where a score is read. With PP > 1 the last stage sends the result to the others.
        """
        from megatron.core import parallel_state

        tokens = tokens.to(self.device_name)
        with _project_only(self.chunks[-1], rows, positions):
            logits = forward_logits(self.chunks, tokens, self.arch.vocab_size)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            shape = (1, len(positions), self.arch.vocab_size)
            logits = torch.empty(shape, device=tokens.device) if logits is None else logits.float().contiguous()
            dist.broadcast(logits, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return logits[0]

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is greedy) for each (context, continuation) of token ids.

        Requests with the same input (the choices of one question, when each is one token) share a
        forward pass; the longest inputs go first, batched with right padding.
        """
        inputs: dict[tuple[int, ...], int] = {}  # input tokens -> longest continuation scored on them
        requests = []
        for context, continuation in pairs:
            whole = (context + continuation)[-(self.max_length + 1):]
            key = tuple(whole[:-1])
            inputs[key] = max(inputs.get(key, 0), len(continuation))
            requests.append((key, continuation))
        unique = sorted(inputs, key=len, reverse=True)
        log_probs: dict[tuple[int, ...], torch.Tensor] = {}
        for start in range(0, len(unique), self.batch_size_per_call):
            batch = unique[start:start + self.batch_size_per_call]
            tokens = torch.full((len(batch), len(batch[0])), self.eot_token_id, dtype=torch.long)
            rows, positions = [], []
            for row, key in enumerate(batch):
                tokens[row, :len(key)] = torch.tensor(key)
                scored = range(len(key) - inputs[key], len(key))
                rows += [row] * len(scored)
                positions += list(scored)
            logits = self._logits(tokens, rows, positions).float().log_softmax(dim=-1)
            offset = 0
            for key in batch:
                log_probs[key] = logits[offset:offset + inputs[key]]
                offset += inputs[key]
        results = []
        for key, continuation in requests:
            scores = log_probs[key][inputs[key] - len(continuation):]
            targets = torch.tensor(continuation, device=scores.device)
            logprob = scores.gather(-1, targets.unsqueeze(-1)).sum().item()
            results.append((logprob, bool((scores.argmax(dim=-1) == targets).all())))
        return results


@contextmanager
def _project_only(chunk, rows: list[int], positions: list[int]):
    """Feed the output layer only the hidden states at (row, position) pairs: [seq, batch, h] -> [k, 1, h].

    GPTModel has no "positions to keep"; a forward pre-hook on its output layer is the one place
    that sees the hidden states before the projection, and it leaves the model untouched after.
    """
    if not hasattr(chunk, "output_layer"):  # not the last pipeline stage
        yield
        return
    row_index, position_index = torch.tensor(rows), torch.tensor(positions)

    def select(module, args, kwargs):
        hidden = args[0]
        picked = hidden[position_index.to(hidden.device), row_index.to(hidden.device)].unsqueeze(1)
        return (picked, *args[1:]), kwargs

    handle = chunk.output_layer.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
