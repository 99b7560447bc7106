"""LLMLingua's `PromptCompressor` call, answered by SpecPC on the offline Qwen2.5-Coder draft: code written for
llmlingua 0.2.2 runs with one import changed, and the question is kept whole."""

from draftapprox.examples import QUESTION, long_prompt
from draftapprox.integrations.llmlingua import PromptCompressor

document = long_prompt().split("\n\nQuestion:")[0]
llm_lingua = PromptCompressor()  # model_name: the draft (default: the offline Qwen2.5-Coder 0.5B)
result = llm_lingua.compress_prompt([document], instruction="", question=QUESTION, rate=0.25)
print(next(line for line in result["compressed_prompt"].splitlines() if "code name" in line))  # the planted fact
print(f"{result['origin_tokens']} -> {result['compressed_tokens']} tokens ({result['rate']})")
