"""Runs inside the reference implementation's own environment (furiosa-ai/draft-based-approx-llm, which pins
transformers 4.51.3): it must not import draftapprox. For each request, the selection the authors' code makes (their
patches, aggregation and selection functions, unchanged), appended as one JSON line.

SpecPC request: {"key", "method": "specpc", "input_ids", "budget", "window", "kernel", "start_layer", "lookahead"}
-> the kept prompt positions, timed (`--model` is the draft).
SpecKV request: {"key", "method": "speckv", "input_ids", "lookahead_ids", "budget", "window", "kernel", "pool",
"reduction"} -> the draft tokens the reference's own draft call writes, and per (layer, KV head) the top-k positions
its `compress_kv` keeps besides the window, when the target prefills the prompt plus the given `lookahead_ids`
(`--model` is the draft, `--target` the target).
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the answer log, without draftapprox
from answer_log import Results, read
from common import arguments
from common import patch as read_transformers5_configs


def main() -> None:
    args = arguments(("--source", {"required": True, "help": "checkout of the reference implementation"}),
                     ("--target", {"default": None}), ("--dtype", {"default": "float32"}))
    sys.path.insert(0, args.source)
    read_transformers5_configs()
    import transformers

    answers = Results(args.answers)
    todo = [r for r in read(args.requests) if r["key"] not in answers.done]
    if not todo:
        return

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=getattr(torch, args.dtype), attn_implementation="sdpa").eval()

    draft = load(args.model)
    target = load(args.target) if any(r["method"] == "speckv" for r in todo) else None
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    warm = True
    for req in todo:
        if req["method"] == "speckv":
            row = speckv(draft, target, req)
        else:
            row = specpc(draft, req, repeats=2 if warm else 1)
            warm = False
        answers.append({"key": req["key"], **row, "versions": versions})


def specpc(model, req: dict, repeats: int) -> dict:
    from draft_approx_llm import SpecPCConfig
    from draft_approx_llm.specpc.specpc import specpc_select_input_token_indices
    from draft_approx_llm.specpc.specpc_utils import generate_aggregated_attention

    config = SpecPCConfig(max_capacity_prompt=req["budget"], window_size=req["window"], kernel_size=req["kernel"],
                          starting_layer_index=req["start_layer"], lookahead_tokens=req["lookahead"])
    ids = torch.tensor([req["input_ids"]])
    for _ in range(repeats):  # the first call of a process also pays one-off setup: run it twice
        start = time.perf_counter()
        with torch.inference_mode():
            scores, _ = generate_aggregated_attention(model, config, input_ids=ids, attention_mask=torch.ones_like(ids),
                                                      do_sample=False, pad_token_id=model.config.eos_token_id)
            kept = specpc_select_input_token_indices(scores, config)
        seconds = time.perf_counter() - start
    return {"kept": kept[0].tolist(), "seconds": seconds}


def speckv(draft, target, req: dict) -> dict:
    from draft_approx_llm import SpecKVConfig
    from draft_approx_llm.speckv import llama_util, qwen2_util, qwen3_util, util
    from draft_approx_llm.speckv.speckv import speckv_generate_from_lookahead_ids

    picked = []

    def recording(*a, **k):  # the reference's own compress_kv; only its top-k indices are noted
        out = util.compress_kv(*a, **k)
        picked.append(out[2])
        return out

    for module in (llama_util, qwen2_util, qwen3_util):
        module.compress_kv = recording
    ids = torch.tensor([req["input_ids"]])
    mask = torch.ones_like(ids)
    length = len(req["lookahead_ids"])
    start = time.perf_counter()
    with torch.inference_mode():
        # the reference's draft call (speckv_generate), to report whether it writes our draft's tokens
        written = draft.generate(ids, attention_mask=mask, max_new_tokens=length, do_sample=False,
                                 pad_token_id=draft.config.eos_token_id)[0, ids.shape[1]:].tolist()
        config = SpecKVConfig(max_capacity_prompt=req["budget"], window_size=req["window"],
                              kernel_size=req["kernel"], pool_type=req["pool"], reduction_type=req["reduction"],
                              lookahead_tokens=length)
        lookahead = torch.cat([ids, torch.tensor([req["lookahead_ids"]])], dim=1)
        speckv_generate_from_lookahead_ids(target, config, ids, mask, lookahead, max_new_tokens=1, do_sample=False,
                                           pad_token_id=target.config.eos_token_id)
    kept = req["budget"] - req["window"]
    layers = [[sorted(head[:kept].tolist()) for head in indices[0]] for indices in picked]
    return {"lookahead_ids": written, "kept": layers, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    main()
