"""`generate`, `compress` and `methods`: one prompt through a method."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import ConfigError, InputError
from .common import (
    BudgetOpt,
    CacheOpt,
    ChatOpt,
    DeviceOpt,
    DraftDtypeOpt,
    DraftOpt,
    DtypeOpt,
    ExampleOpt,
    JsonOpt,
    MethodOpt,
    PromptFileOpt,
    SetOpt,
    SpeculativeOpt,
    TargetOpt,
    ThreadsOpt,
    app,
    method_from,
    pair_for,
)


def _read_prompt(prompt_file: Path | None, example: bool) -> str:
    if example:
        from ..examples import long_prompt

        return long_prompt()
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise InputError(f"prompt file {'is a folder' if prompt_file.is_dir() else 'not found'}: {prompt_file}")
        data = prompt_file.read_bytes()
    else:
        if sys.stdin.isatty():
            raise InputError("no prompt: pass --prompt-file, --example, or pipe the prompt on standard input")
        data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"the prompt is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise InputError("the prompt is empty")
    return text


@app.command()
def generate(
    method: MethodOpt = "speckv",
    budget: BudgetOpt = None,
    knob: SetOpt = None,
    prompt_file: PromptFileOpt = None,
    example: ExampleOpt = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    chat: ChatOpt = False,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string; repeatable.")] = None,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "auto",
    draft_dtype: DraftDtypeOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
    static_decode: Annotated[bool, typer.Option(
        "--static-decode", help="Decode with fixed-shape steps, replayed as a CUDA graph on a GPU.")] = False,
    speculative: SpeculativeOpt = "0",
) -> None:
    """Generate an answer with a method applied to the prompt."""
    from ..generation import Sampling
    from ..generation import generate as run
    from ..speculative import parse

    chosen = method_from(method, budget, knob)
    proposals = parse(speculative)
    if proposals and static_decode:
        raise ConfigError("--speculative feeds several tokens a step; it does not run with --static-decode")
    prompt = _read_prompt(prompt_file, example)
    sampling = Sampling(temperature, top_p, seed)
    pair = pair_for(chosen, draft, target, dtype, draft_dtype, device, threads, cache_dir, speculative=proposals)
    result = run(pair, prompt, chosen, max_new_tokens=max_new_tokens, chat=chat, sampling=sampling, stop=stop,
                 static=static_decode, speculative=proposals)
    if as_json:
        print(json.dumps({"text": result.text, **result.record.to_dict(), "config": chosen.describe()}))
    else:
        print(result.text)


@app.command()
def compress(
    method: MethodOpt = "specpc",
    budget: BudgetOpt = None,
    knob: SetOpt = None,
    prompt_file: PromptFileOpt = None,
    example: ExampleOpt = False,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    chat: ChatOpt = False,
    as_json: JsonOpt = False,
    dtype: DtypeOpt = "auto",
    draft_dtype: DraftDtypeOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Compress a prompt (SpecPC or another prompt method) so that any engine can run the shorter one."""
    from ..generation import compress as run
    from ..generation import require_prompt_method

    chosen = method_from(method, budget, knob)
    require_prompt_method(chosen)
    prompt = _read_prompt(prompt_file, example)
    # only the model that scores the prompt is loaded: the draft (SpecPC), or the target for TargetPC; a prompt
    # method that reads no model (recency, random) loads the draft, the cheaper, for its tokenizer and context
    pair = pair_for(chosen, draft, target, dtype, draft_dtype, device, threads, cache_dir,
                    with_target=chosen.needs_target)
    out = run(pair, prompt, chosen, chat=chat)
    if as_json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "positions": out.positions,
                          "prompt_tokens": out.prompt_tokens, "kept_tokens": len(out.token_ids),
                          "method": out.method, "timings": out.timings}))
    else:
        print(out.text)


@app.command("methods")
def list_methods() -> None:
    """List every method with its knobs and defaults."""
    import dataclasses

    from ..methods import METHODS, knob_fields

    table = Table("method", "kind", "budget", "knobs (defaults)", "what it does")
    for name, cls in METHODS.items():
        default_budget = "-" if name == "fullkv" else next(f.default for f in dataclasses.fields(cls)
                                                             if f.name == "budget")
        knobs = ", ".join(f"{f.name}={f.default if f.default is not dataclasses.MISSING else '...'}"
                          for f in knob_fields(cls))
        table.add_row(name, cls.kind, str(default_budget), knobs or "-", cls.summary)
    Console(width=200).print(table)
