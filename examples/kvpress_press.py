"""SpecKV as a press inside NVIDIA kvpress's own pipeline, on the offline Qwen2.5-Coder pair. kvpress pins
transformers < 5.3: run this where `pip install "draftapprox[kvpress]"` was installed (or in the environment
`draftapprox eval setup-peer kvpress` builds)."""

from kvpress import KVPressTextGenerationPipeline, SnapKVPress
from transformers import DynamicCache

import draftapprox as da
from draftapprox.examples import long_prompt
from draftapprox.integrations.kvpress import SpecKVPress, pipeline_tail
from draftapprox.models import offline

model, tokenizer = da.load_model(offline.TARGET.name)
draft, _ = da.load_model(offline.DRAFT.name)
pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tokenizer)

# The question inside the compressed context (kvpress's query-aware evaluation): the draft looks ahead for it,
# from the assistant's turn the pipeline opens after compression (`tail`). Passed as `question=`, a question comes
# after compression, and the draft sees the context alone.
context = long_prompt()
speckv = SpecKVPress(draft=draft, compression_ratio=0.75, lookahead=16, tail=pipeline_tail(pipe))
for press in (speckv, SnapKVPress(compression_ratio=0.75)):
    cache = DynamicCache()
    answer = pipe(context, press=press, max_new_tokens=16, cache=cache)["answer"]
    print(f"{type(press).__name__}: {answer!r} from {cache.get_seq_length()} pairs per head")
