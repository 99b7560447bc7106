"""One module per group of routes: completions, chat completions, tokenize, and the server's own (models, health,
metrics)."""
