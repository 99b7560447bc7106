"""LangChain: `DraftDocumentCompressor`, a `BaseDocumentCompressor` for `ContextualCompressionRetriever`.

The retrieved documents are compressed jointly, under one budget over the documents alone, with the query
protected and scored last (where SpecPC's window reads it), so the draft keeps what the query needs wherever it is.
Each document keeps its id and metadata, with its token counts added (`draftapprox_tokens`,
`draftapprox_kept_tokens`); a document cut to nothing is dropped. LangChain's own `LLMLinguaCompressor` also takes
`integrations.llmlingua.PromptCompressor` as its `lingua` (it imports llmlingua itself to validate its fields).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
    from pydantic import ConfigDict, Field
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("draftapprox.integrations.langchain needs langchain-core: "
                      "pip install 'draftapprox[langchain]'") from error

from .. import parts


class DraftDocumentCompressor(BaseDocumentCompressor):
    """`pair`: a loaded `draftapprox.Pair` (its draft scores; `load_pair(with_target=False)` loads only that);
    `method`: a prompt method or its name (default SpecPC keeping a quarter of the documents' tokens)."""

    pair: Any
    method: Any = Field(default=None)
    model_config = ConfigDict(arbitrary_types_allowed=True)

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        if not documents:
            return []
        method = parts.prompt_method(self.method)
        done = parts.compress_documents(self.pair, [d.page_content for d in documents], method, query)
        return [Document(page_content=out.text, id=doc.id,
                         metadata={**doc.metadata, "draftapprox_tokens": out.tokens,
                                   "draftapprox_kept_tokens": out.kept})
                for doc, out in zip(documents, done, strict=True) if out.text.strip()]
