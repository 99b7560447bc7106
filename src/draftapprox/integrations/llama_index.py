"""LlamaIndex: `DraftNodePostprocessor`, a node postprocessor (`node_postprocessors=[...]` of a query engine).

The retrieved nodes are compressed jointly against the query, under one budget over the nodes alone, the query
protected and scored last. Each node keeps its id, metadata, relationships and score (LongLLMLingua's
postprocessor returns new nodes without them), with its token counts added to its metadata
(`draftapprox_tokens`, `draftapprox_kept_tokens`, kept out of what the LLM and the embedder read); a node cut
to nothing is dropped.
"""

from __future__ import annotations

from typing import Any

try:
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
    from pydantic import Field
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("draftapprox.integrations.llama_index needs llama-index-core: "
                      "pip install 'draftapprox[llama-index]'") from error

from .. import parts

COUNTS = ("draftapprox_tokens", "draftapprox_kept_tokens")


class DraftNodePostprocessor(BaseNodePostprocessor):
    """`pair`: a loaded `draftapprox.Pair` (its draft scores; `load_pair(with_target=False)` loads only that);
    `method`: a prompt method or its name (default SpecPC keeping a quarter of the nodes' tokens)."""

    pair: Any
    method: Any = Field(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "DraftNodePostprocessor"

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if not nodes:
            return []
        method = parts.prompt_method(self.method)
        texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        done = parts.compress_documents(self.pair, texts, method, query_bundle.query_str if query_bundle else None)
        kept = []
        for scored, out in zip(nodes, done, strict=True):
            if not out.text.strip():
                continue
            node = scored.node.model_copy(deep=True)  # the caller's node stays as it was retrieved
            node.set_content(out.text)
            node.metadata = {**node.metadata, COUNTS[0]: out.tokens, COUNTS[1]: out.kept}
            for excluded in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
                excluded.extend(k for k in COUNTS if k not in excluded)  # records, not text for the model
            kept.append(NodeWithScore(node=node, score=scored.score))
        return kept
