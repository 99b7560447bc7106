"""LlamaIndex: SpecPC as a node postprocessor of a query engine, on the offline Qwen2.5-Coder draft. The LLM here is
LlamaIndex's MockLLM, which answers with the prompt it was given: what reached it is the compressed context."""

from llama_index.core import VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import TextNode

import draftapprox as da
from draftapprox.examples import QUESTION, long_prompt
from draftapprox.integrations.llama_index import DraftNodePostprocessor

words = long_prompt().split("\n\nQuestion:")[0].split(" ")
nodes = [TextNode(text=" ".join(words[i:i + 200]), id_=f"part-{i // 200}") for i in range(0, len(words), 200)]
index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))
postprocessor = DraftNodePostprocessor(pair=da.load_pair(with_target=False), method=da.SpecPC(budget=0.25))
engine = RetrieverQueryEngine.from_args(index.as_retriever(similarity_top_k=len(nodes)), llm=MockLLM(),
                                        node_postprocessors=[postprocessor])
response = engine.query(QUESTION)
kept = sum(n.node.metadata["draftapprox_kept_tokens"] for n in response.source_nodes)
total = sum(n.node.metadata["draftapprox_tokens"] for n in response.source_nodes)
print(f"the LLM read {kept} of the surviving nodes' {total} tokens; Blue Heron in it: {'Blue Heron' in str(response)}")
