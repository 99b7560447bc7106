"""One module per group of routes: completions, chat completions, and the server's own (models, health, metrics)."""
