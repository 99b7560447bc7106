"""LangChain's ContextualCompressionRetriever with SpecPC as its compressor, on the offline Qwen2.5-Coder draft:
the retrieved documents are cut jointly to a quarter, the query kept whole, each keeping its id and metadata."""

from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore

import draftapprox as da
from draftapprox.examples import QUESTION, long_prompt
from draftapprox.integrations.langchain import DraftDocumentCompressor

words = long_prompt().split("\n\nQuestion:")[0].split(" ")
documents = [Document(page_content=" ".join(words[i:i + 200]), id=f"part-{i // 200}", metadata={"offset": i})
             for i in range(0, len(words), 200)]
store = InMemoryVectorStore(DeterministicFakeEmbedding(size=64))  # any store: here every part is retrieved
store.add_documents(documents)

pair = da.load_pair(with_target=False)  # the draft alone scores
compressor = DraftDocumentCompressor(pair=pair, method=da.SpecPC(budget=0.25))
retriever = ContextualCompressionRetriever(base_compressor=compressor,
                                           base_retriever=store.as_retriever(search_kwargs={"k": len(documents)}))
kept = sorted(retriever.invoke(QUESTION), key=lambda d: d.metadata["offset"])
for doc in kept:
    print(f"{doc.id}: kept {doc.metadata['draftapprox_kept_tokens']} of {doc.metadata['draftapprox_tokens']} tokens")
print("the planted fact survives:", "Blue Heron 7421" in " ".join(d.page_content for d in kept))
