"""The authors' API (`patch_model` with their config classes) over draftapprox's methods, on the offline
Qwen2.5-Coder pair: their README's SpecPC snippet with one import changed and a budget for this prompt."""

import draftapprox as da
from draftapprox.examples import long_prompt
from draftapprox.models import offline
from draftapprox.reference_api import SpecPCConfig, patch_model

model, tokenizer = da.load_model(offline.TARGET.name)
draft_model, _ = da.load_model(offline.DRAFT.name)
inputs = tokenizer.apply_chat_template([{"role": "user", "content": long_prompt()}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)["input_ids"]

specpc_config = SpecPCConfig(max_capacity_prompt=512, window_size=64, pool_type="max", kernel_size=64,
                             reduction_type="max", lookahead_tokens=1, neighbor_tokens=64, starting_layer_index=8,
                             weighted_query=True)
model = patch_model(model, draft_model, specpc_config)
out = model.generate(inputs, max_new_tokens=16, return_dict_in_generate=True)
print(tokenizer.decode(out.output_ids[0], skip_special_tokens=True))
print(f"specpc: the target read {out.input_size} of the prompt's {inputs.shape[1]} tokens")
