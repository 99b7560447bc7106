"""SpecKV inside a transformers model's own `generate`, on the offline Qwen2.5-Coder pair: the stock decode loop
(here greedy, with a streamer) over a cache a quarter of the prompt's size."""

from transformers import TextStreamer

import draftapprox as da
from draftapprox.examples import long_prompt
from draftapprox.models import offline

target, tokenizer = da.load_model(offline.TARGET.name)
draft, _ = da.load_model(offline.DRAFT.name)
messages = [{"role": "user", "content": long_prompt()}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True)["input_ids"]

with da.patched(target, draft, da.SpecKV(budget=0.25), tokenizer):
    out = target.generate(ids, max_new_tokens=16, do_sample=False, return_dict_in_generate=True,
                          streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
record = out["draftapprox"]
print(f"{record.method}: kept {record.kv_bytes_kept / record.kv_bytes_full:.0%} of the KV cache "
      f"of a {record.prompt_tokens}-token prompt")
