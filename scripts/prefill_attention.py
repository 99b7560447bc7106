"""The compiled prefill attention against CPU SDPA, on the attention shapes of the offline pair, in one process:
GFLOP/s of each beside the GEMM rate measured in the same process, then the draft's SpecPC pass and the
target's prefill with each attention, A/B in pairs. Writes the tables between the generated-table markers of
docs/results/prefill-attention.md (or --out).

    python scripts/prefill_attention.py --lengths 1024,2048,4096 --out docs/results/prefill-attention.md
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from draftapprox import attention, kernels
from draftapprox.cache import head_size, new_cache
from draftapprox.eval import ruler
from draftapprox.forward import forward
from draftapprox.generation import compress_prompt, new_state
from draftapprox.kernels.probe import best
from draftapprox.methods import make
from draftapprox.models.loading import load_pair, precision
from draftapprox.models.rates import gemm_rate
from draftapprox.report_pages import publish, table


def _shapes(model) -> tuple[int, int, int]:
    config = model.config.get_text_config()
    return config.num_attention_heads, config.num_key_value_heads, head_size(config)


def _both(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[float, float]:
    """Seconds of `causal` (the kernel where it reads) and of SDPA as transformers calls it, on the same tensors."""
    r, d = query.shape[1] // key.shape[1], query.shape[-1]
    with torch.inference_mode():
        ours = best(lambda: attention.causal(query, key, value, d**-0.5), 5)
        sdpa = best(lambda: F.scaled_dot_product_attention(query, key.repeat_interleave(r, 1),
                                                            value.repeat_interleave(r, 1), is_causal=True), 5)
    return ours, sdpa


def _kernel_table(pair, lengths: list[int], dtypes: list[torch.dtype]) -> list[list[str]]:
    rows = []
    models = (("draft", pair.draft), ("target", pair.target))
    for dtype, (name, model), n in itertools.product(dtypes, models, lengths):
        h, g, d = _shapes(model)
        query = torch.randn(1, n, h, d, dtype=dtype).transpose(1, 2)  # the layout attention modules pass
        key, value = torch.randn(1, g, n, d, dtype=dtype), torch.randn(1, g, n, d, dtype=dtype)
        flops = 4 * h * d * n * (n + 1) / 2  # causal: scores and weighted values over the keys each query sees
        ours, sdpa = _both(query, key, value)
        kind = str(dtype).removeprefix("torch.")
        rows.append([f"{name} ({h} heads on {g}, head size {d})", kind, str(n), f"{ours * 1e3:.1f}",
                     f"{flops / ours / 1e9:.0f}", f"{sdpa * 1e3:.1f}", f"{flops / sdpa / 1e9:.0f}",
                     f"{ours / sdpa:.2f}x"])
        print(f"{name} in {kind} at {n}: {ours * 1e3:.1f} ms against SDPA's {sdpa * 1e3:.1f}", file=sys.stderr,
              flush=True)
    return rows


def _path_table(pair, lengths: list[int], pairs: int, specpc) -> list[list[str]]:
    """Whole passes with the kernel and with SDPA, alternating, so the machine's drift falls on both."""
    kernel_reads = attention._prefill_kernel_reads
    rows = []
    for n in lengths:
        sample = ruler.generate_sample(pair.tokenizer, "niah_multikey_1", n, 0)
        ids = ruler.encode(pair.tokenizer, sample.context + sample.question, sample.answer_prefix)
        paths = (("draft SpecPC pass", lambda ids=ids: compress_prompt(new_state(pair, ids, 1), specpc)),
                 ("target prefill", lambda ids=ids: forward(pair.target, ids, new_cache(), 0)))
        for path, run in paths:
            run()  # warm-up
            seconds: dict[str, list[float]] = {"kernel": [], "sdpa": []}
            try:
                for _ in range(pairs):
                    for which, reads in (("kernel", kernel_reads), ("sdpa", lambda *tensors: False)):
                        attention._prefill_kernel_reads = reads
                        start = time.perf_counter()
                        run()
                        seconds[which].append(time.perf_counter() - start)
            finally:
                attention._prefill_kernel_reads = kernel_reads
            ratio = statistics.median(k / s for k, s in zip(seconds["kernel"], seconds["sdpa"], strict=True))
            rows.append([path, str(ids.shape[1]), f"{statistics.median(seconds['kernel']):.2f}",
                         f"{statistics.median(seconds['sdpa']):.2f}", f"{ratio:.2f}x"])
            print(f"{path} at {ids.shape[1]}: {rows[-1][2:]}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--pairs", type=int, default=3, help="A/B pairs of each whole pass")
    parser.add_argument("--out", type=Path, default=Path("docs/results/prefill-attention.md"))
    parser.add_argument("--draft", help="draft model (default: the offline pair's)")
    parser.add_argument("--target", help="target model (default: the offline pair's)")
    parser.add_argument("--start-layer", type=int, help="SpecPC's first scored layer (default: the method's)")
    args = parser.parse_args(argv)
    if not kernels.vectorised():
        print("the compiled AVX-512 kernels are not built on this machine: nothing to compare", file=sys.stderr)
        return 1
    lengths = [int(n) for n in args.lengths.split(",")]
    pair = load_pair(args.draft, args.target, dtype="auto")
    dtype = pair.draft.dtype if precision(pair.draft) in ("bfloat16", "float32") else torch.float32
    dtypes = [dtype, *([torch.float32] if dtype != torch.float32 else [])]
    config = pair.draft.config
    gemm = {t: gemm_rate(config.hidden_size, config.intermediate_size, t) for t in dtypes}
    kernel_rows = _kernel_table(pair, lengths, dtypes)
    specpc = make("specpc", 0.25, **({} if args.start_layer is None else {"start_layer": args.start_layer}))
    path_rows = _path_table(pair, lengths, args.pairs, specpc)
    rates = ", ".join(f"{str(t).removeprefix('torch.')} {rate / 1e9:.0f}" for t, rate in gemm.items())
    also = " and in float32" if dtype != torch.float32 else ""
    intro = [f"Attention in {str(dtype).removeprefix('torch.')} (the activations' precision `--dtype auto` gives "
             f"here){also}, {torch.get_num_threads()} threads, torch {torch.__version__}; the draft's GEMM "
             f"in this process, GFLOP/s: {rates}. SDPA is called as transformers calls it (keys and values "
             "repeated per query head, `is_causal`); each time the best of 5 after a warm-up.", ""]
    header = ["shape", "dtype", "tokens", "kernel, ms", "kernel, GFLOP/s", "SDPA, ms", "SDPA, GFLOP/s", "kernel / SDPA"]
    body = [*table(header, kernel_rows), "",
            f"Whole passes of the offline pair (in {str(dtype).removeprefix('torch.')}) on RULER `niah_multikey_1` "
            "prompts, with each attention: the median of "
            f"{args.pairs} A/B pairs after a warm-up, and the median of the pairs' ratios.", "",
            *table(["path", "tokens", "kernel, s", "SDPA, s", "kernel / SDPA"], path_rows), ""]
    publish(args.out, intro, f"python scripts/prefill_attention.py --lengths {args.lengths} --pairs {args.pairs}",
            body)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
