"""SpecKV as a press inside NVIDIA kvpress's own pipeline, on the offline Qwen2.5-Coder pair. kvpress pins
transformers < 5.3: run this where `pip install "draftapprox[kvpress]"` was installed (or in the environment
`draftapprox eval setup-peer kvpress` builds)."""

from kvpress import KVPressTextGenerationPipeline, SnapKVPress
from transformers import DynamicCache

import draftapprox as da
from draftapprox.examples import long_prompt
from draftapprox.integrations.kvpress import SpecKVPress
from draftapprox.models import offline

model, tokenizer = da.load_model(offline.TARGET.name)
draft, _ = da.load_model(offline.DRAFT.name)
pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)

# The question inside the compressed context (kvpress's query-aware evaluation): the draft looks ahead for it.
# Passed as `question=`, it comes after compression, and the draft sees the context alone.
context = long_prompt()
for press in (SpecKVPress(draft=draft, compression_ratio=0.75, lookahead=16), SnapKVPress(compression_ratio=0.75)):
    cache = DynamicCache()
    answer = pipe(context, press=press, max_new_tokens=16, cache=cache)["answer"]
    print(f"{type(press).__name__}: {answer!r} from {cache.get_seq_length()} pairs per head")
