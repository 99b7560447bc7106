"""Check that the kvpress worker's shared prefill (`answer_shared`) gives kvpress's pipeline's own answers.

Runs in kvpress's environment, on requests written by `draftapprox eval kvpress` (the worker's request file under
docs/results/raw/.peer-work/), and prints, per context, both sides' time and how many answers are identical:

    ~/.cache/draftapprox/peers/kvpress/bin/python scripts/kvpress_shared_prefill_check.py REQUESTS MODEL_DIR [GROUPS]
"""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import pipeline
from transformers.utils import logging

peers = Path(__file__).resolve().parents[1] / "src" / "draftapprox" / "eval" / "peers"
sys.path[:0] = [str(peers), str(peers.parent)]
import kvpress  # noqa: E402, F401  (registers the pipeline)
import kvpress_worker  # noqa: E402

logging.disable_progress_bar()
requests = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]
pipe = pipeline("kv-press-text-generation", model=sys.argv[2], device="cpu",
                model_kwargs={"dtype": torch.bfloat16, "attn_implementation": "sdpa"})
groups: dict[tuple, list[dict]] = {}
for r in requests:
    if r["press"] != "kvzip":
        groups.setdefault((r["context"], r["question"], r["query_aware"], r["max_new_tokens"]), []).append(r)
for group in list(groups.values())[: int(sys.argv[3]) if len(sys.argv) > 3 else None]:
    start = time.perf_counter()
    shared = list(kvpress_worker.answer_shared(pipe, group))
    middle = time.perf_counter()
    alone = [kvpress_worker.answer_pipeline(pipe, r) for r in group]
    end = time.perf_counter()
    same = sum(a["answer"] == b["answer"] for a, b in zip(shared, alone, strict=True))
    print(f"{group[0]['key'].split('|')[0]} query_aware={group[0]['query_aware']}: {same}/{len(group)} identical; "
          f"shared {middle - start:.0f} s, pipeline {end - middle:.0f} s", flush=True)
    for a, b in zip(shared, alone, strict=True):
        if a["answer"] != b["answer"]:
            print(f"  differs: {a['key']}: {a['answer'][:60]!r} against {b['answer'][:60]!r}")
