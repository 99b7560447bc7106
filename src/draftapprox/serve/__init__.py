"""`draftapprox serve`: an OpenAI-compatible HTTP server whose scheduler batches requests on compressed caches.

Layers, top down: `app` (FastAPI app, errors, lifetime) -> `routes` (one module per group) -> `responses` (a
request's method, job and answer) -> `scheduler` (the engine thread: admission by memory, interleaved prefill,
batched decode) -> `generation`. `proxy` is the other server, `serve --upstream`: cuts prompts on the draft in
front of another engine and passes everything else through.
"""
