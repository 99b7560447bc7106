"""What every peer worker shares: its command line, and reading our model directories (written by transformers
5) with the older transformers some peers pin. Standard library, torch and transformers only: the workers run
without draftapprox and import this file from their own directory.

transformers 5 stores RoPE's base frequency under `rope_parameters`; 4.x does not know that key and silently falls
back to `rope_theta = 10000`, while the Qwen2.5 models use 1e6. The model then loads without a warning and
computes different attention: a peer would be judged on a broken model. `patch()` puts the value back on every
config 4.x loads.
"""

import argparse


def arguments(*extra: tuple[str, dict]) -> argparse.Namespace:
    """Parse `--model --requests --answers [--threads]` plus a worker's own `(flag, add_argument options)`, and set
    torch's thread count."""
    parser = argparse.ArgumentParser()
    for flag in ("--model", "--requests", "--answers"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--threads", type=int, default=0)
    for flag, options in extra:
        parser.add_argument(flag, **options)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def patch() -> None:
    import transformers

    original = transformers.AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        loaded = original(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict) and "rope_theta" in params:
            config.rope_theta = params["rope_theta"]
        return loaded

    transformers.AutoConfig.from_pretrained = from_pretrained
