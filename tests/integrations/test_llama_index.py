"""LlamaIndex calling our postprocessor: a `RetrieverQueryEngine` whose LLM echoes its prompt shows what reached
it: the compressed node texts, not the cut ones; the source nodes keep their ids, metadata and scores."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import TextNode

import draftapprox as da
from draftapprox.integrations.llama_index import DraftNodePostprocessor
from tests.conftest import prompt_ids


def words(n: int, seed: int) -> str:
    return " ".join(f"w{int(i)}" for i in prompt_ids(n, seed=seed)[0])


def engine(nodes: list[TextNode], postprocessor: DraftNodePostprocessor) -> RetrieverQueryEngine:
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))
    return RetrieverQueryEngine.from_args(index.as_retriever(similarity_top_k=len(nodes)), llm=MockLLM(),
                                          node_postprocessors=[postprocessor])


def test_the_llm_reads_the_compressed_nodes_and_sources_keep_their_metadata(qwen_pair):
    nodes = [TextNode(text=words(n, s), id_=f"node-{s}", metadata={"source": f"file{s}.txt"})
             for n, s in ((120, 1), (80, 2), (100, 3))]
    method = da.SpecPC(budget=0.25, window=8, kernel=5, start_layer=1)
    response = engine(nodes, DraftNodePostprocessor(pair=qwen_pair, method=method)).query(words(10, 4))
    prompt = str(response)  # MockLLM answers with the prompt it was given
    originals = {n.id_: n for n in nodes}
    assert response.source_nodes
    for source in response.source_nodes:
        original = originals[source.node.node_id]
        assert source.node.metadata["source"] == original.metadata["source"] and source.score is not None
        assert source.node.text in prompt and original.text not in prompt  # the cut text, not the whole
        assert source.node.metadata["draftapprox_kept_tokens"] == len(source.node.text.split())
        assert "draftapprox_tokens" not in prompt  # our counts are records, not text for the model
    kept = sum(s.node.metadata["draftapprox_kept_tokens"] for s in response.source_nodes)
    assert 75 - 8 <= kept <= 75  # a quarter of the nodes' 300 tokens
    assert all(n.text == originals[n.id_].text for n in nodes)  # the retrieved nodes are left as they were


def test_postprocess_nodes_takes_a_query_string(qwen_pair):
    from llama_index.core.schema import NodeWithScore

    nodes = [NodeWithScore(node=TextNode(text=words(90, s), id_=str(s)), score=0.5) for s in (5, 6)]
    out = DraftNodePostprocessor(pair=qwen_pair, method=da.SpecPC(budget=40, window=8, kernel=5, start_layer=1)) \
        .postprocess_nodes(nodes, query_str=words(8, 7))
    assert 32 <= sum(n.node.metadata["draftapprox_kept_tokens"] for n in out) <= 40
    assert [n.score for n in out] == [0.5] * len(out)
