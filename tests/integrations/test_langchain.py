"""LangChain calling our compressor: `ContextualCompressionRetriever` over `DraftDocumentCompressor` (ids and
metadata kept, one budget over the documents, the query protected), and LangChain's own `LLMLinguaCompressor`
with our LLMLingua-compatible compressor as its `lingua`."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_classic")

from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore

import draftapprox as da
from draftapprox.integrations.langchain import DraftDocumentCompressor
from tests.conftest import prompt_ids


def retriever(documents: list[Document]):
    """LangChain's in-memory store; every document is retrieved (the compressor, not the ranking, is tested)."""
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    store.add_documents(documents)
    return store.as_retriever(search_kwargs={"k": len(documents)})


def words(n: int, seed: int) -> str:
    return " ".join(f"w{int(i)}" for i in prompt_ids(n, seed=seed)[0])


def test_documents_keep_ids_and_metadata_under_one_budget(qwen_pair):
    documents = [Document(page_content=words(n, s), id=f"doc-{s}", metadata={"source": f"file{s}.txt"})
                 for n, s in ((120, 1), (80, 2), (100, 3))]
    method = da.SpecPC(budget=0.25, window=8, kernel=5, start_layer=1)
    compressor = DraftDocumentCompressor(pair=qwen_pair, method=method)
    pipeline = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=retriever(documents))
    out = pipeline.invoke(words(10, 4))
    originals = {d.id: d for d in documents}
    assert out and all(d.id in originals for d in out)
    for doc in out:
        original = originals[doc.id]
        assert doc.metadata["source"] == original.metadata["source"]
        assert doc.metadata["draftapprox_tokens"] == len(original.page_content.split())
        assert doc.metadata["draftapprox_kept_tokens"] == len(doc.page_content.split())
        assert set(doc.page_content.split()) <= set(original.page_content.split())
    kept = sum(d.metadata["draftapprox_kept_tokens"] for d in out)
    assert 75 - 8 <= kept <= 75  # a quarter of the documents' 300 tokens; the query is not counted


def test_a_kv_method_is_refused(qwen_pair):
    with pytest.raises(da.ConfigError, match="prompt method"):
        DraftDocumentCompressor(pair=qwen_pair, method="snapkv").compress_documents([Document("w1 w2")], "w3")


def split(text: str, pieces: int) -> list[str]:
    words_ = text.split(" ")
    size = -(-len(words_) // pieces)
    return [" ".join(words_[i:i + size]) for i in range(0, len(words_), size)]


@pytest.mark.real
def test_the_retrieved_example_keeps_the_fact_and_the_target_answers(real_pair):
    from draftapprox.examples import ANSWER, QUESTION, long_prompt

    document = long_prompt().split("\n\nQuestion:")[0]
    documents = [Document(page_content=t, id=f"part-{i}", metadata={"part": i})
                 for i, t in enumerate(split(document, 6))]
    compressor = DraftDocumentCompressor(pair=real_pair, method=da.SpecPC(budget=0.25))
    out = ContextualCompressionRetriever(base_compressor=compressor,
                                         base_retriever=retriever(documents)).invoke(QUESTION)
    assert {d.metadata["part"] for d in out} <= set(range(6)) and all(d.id == f"part-{d.metadata['part']}"
                                                                       for d in out)
    total = sum(len(real_pair.tokenizer.encode(d.page_content, add_special_tokens=False)) for d in documents)
    assert sum(d.metadata["draftapprox_kept_tokens"] for d in out) <= 0.25 * total  # documents cut out included
    joined = "\n\n".join(d.page_content for d in sorted(out, key=lambda d: d.metadata["part"]))
    assert ANSWER in joined
    answer = da.generate(real_pair, f"{joined}\n\nQuestion: {QUESTION}", max_new_tokens=12, chat=True).text
    assert ANSWER in answer, answer


@pytest.mark.real
def test_langchains_llmlingua_compressor_takes_ours_as_its_lingua(real_pair):
    pytest.importorskip("llmlingua")  # LangChain's compressor imports it to validate its fields
    from langchain_community.document_compressors import LLMLinguaCompressor

    from draftapprox.examples import ANSWER, QUESTION, long_prompt
    from draftapprox.integrations.llmlingua import PromptCompressor

    document = long_prompt().split("\n\nQuestion:")[0]
    documents = [Document(page_content=t, metadata={"part": i}) for i, t in enumerate(split(document, 6))]
    lingua = PromptCompressor(pair=real_pair)
    out = LLMLinguaCompressor(lingua=lingua, target_token=400).compress_documents(documents, QUESTION)
    assert out and all("part" in d.metadata for d in out)  # found again from the reference tags kept whole
    assert ANSWER in " ".join(d.page_content for d in out)
