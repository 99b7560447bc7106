"""Check that remembering LongLLMLingua's coarse scores across rates (`remember_coarse_scores` in the llmlingua
worker) leaves every compressed prompt unchanged, and time both ways.

Runs in llmlingua's environment, on requests written by `draftapprox eval llmlingua` (the worker's request file
under docs/results/raw/.peer-work/), taking the first CONTEXTS contexts with all their rates:

    ~/.cache/draftapprox/peers/llmlingua/bin/python scripts/llmlingua_coarse_memo_check.py REQUESTS DRAFT_DIR [CONTEXTS]
"""

import json
import sys
import time
from pathlib import Path

peers = Path(__file__).resolve().parents[1] / "src" / "draftapprox" / "eval" / "peers"
sys.path[:0] = [str(peers), str(peers.parent)]
import llmlingua_worker as worker  # noqa: E402
from common import patch  # noqa: E402

patch()
worker._offline_token_counter(sys.argv[2])
from llmlingua import PromptCompressor  # noqa: E402

requests = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines()]
contexts = list(dict.fromkeys(r["context"] for r in requests))[: int(sys.argv[3]) if len(sys.argv) > 3 else 2]
requests = [r for r in requests if r["context"] in contexts]
outputs, seconds = [], []
for remember in (False, True):
    compressor = PromptCompressor(model_name=sys.argv[2], device_map="cpu")
    if remember:
        worker.remember_coarse_scores(compressor)
    start = time.perf_counter()
    outputs.append([worker.compress(compressor, r)["compressed_prompt"] for r in requests])
    seconds.append(time.perf_counter() - start)
same = sum(a == b for a, b in zip(*outputs, strict=True))
print(f"{same}/{len(requests)} compressed prompts identical ({len(contexts)} contexts, rates "
      f"{sorted({r['rate'] for r in requests})}); {seconds[0]:.0f} s recomputing, {seconds[1]:.0f} s remembering")
