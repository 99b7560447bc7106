"""Runs inside the reference implementation's own environment (furiosa-ai/draft-based-approx-llm, which pins
transformers 4.51.3): it must not import draftapprox. For each request, SpecPC's kept prompt positions as the
authors' code computes them (their attention-store patch, aggregation and selection functions, unchanged), timed,
appended as one JSON line.

Request: {"key", "input_ids", "budget", "window", "kernel", "start_layer", "lookahead"}.
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
                     ("--dtype", {"default": "float32"}))
    sys.path.insert(0, args.source)
    read_transformers5_configs()
    import transformers
    from draft_approx_llm import SpecPCConfig
    from draft_approx_llm.specpc.specpc import specpc_select_input_token_indices
    from draft_approx_llm.specpc.specpc_utils import generate_aggregated_attention

    answers = Results(args.answers)
    todo = [r for r in read(args.requests) if r["key"] not in answers.done]
    if not todo:
        return
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=getattr(torch, args.dtype), attn_implementation="sdpa").eval()
    versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    warm = True
    for req in todo:
        config = SpecPCConfig(max_capacity_prompt=req["budget"], window_size=req["window"],
                              kernel_size=req["kernel"], starting_layer_index=req["start_layer"],
                              lookahead_tokens=req["lookahead"])
        ids = torch.tensor([req["input_ids"]])
        for _ in range(2 if warm else 1):  # the first call of a process also pays one-off setup: run it twice
            start = time.perf_counter()
            with torch.inference_mode():
                scores, _ = generate_aggregated_attention(model, config, input_ids=ids,
                                                          attention_mask=torch.ones_like(ids), do_sample=False,
                                                          pad_token_id=model.config.eos_token_id)
                kept = specpc_select_input_token_indices(scores, config)
            seconds = time.perf_counter() - start
        warm = False
        answers.append({"key": req["key"], "kept": kept[0].tolist(), "seconds": seconds, "versions": versions})


if __name__ == "__main__":
    main()
