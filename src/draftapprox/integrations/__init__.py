"""Our methods inside the tools people already use, one module per tool: `transformers` (a patched model's own
`generate`). Each imports its tool lazily, so the core installs without them."""
