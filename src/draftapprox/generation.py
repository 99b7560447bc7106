"""Prefill, apply a method, decode: the only place that sequences phases and records what happened.

Timings and byte counts are taken here alone, so the CLI, the evaluation harness, the benchmark and the server
all report the same quantities. Decoding is a plain loop of single-token forwards with explicit positions, which
is what a compressed cache needs: it holds fewer entries than the position decoding continues from.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from . import speculative as speculation
from .cache import (
    BatchLayer,
    batch_caches,
    cache_length,
    compress_cache,
    kv_bytes,
    kv_bytes_per_token,
    new_cache,
    reserve,
    rewind_cache,
    shallow_copy,
)
from .capture import QueryCapture, check_captured
from .errors import ConfigError, InputError
from .forward import forward
from .methods import METHODS, FullKV, KVMethod, Method, PromptMethod, SpecKVPC
from .models.loading import Pair
from .prompt_state import PromptState
from .speculative import Drafter
from .static_decode import StaticDecode


@dataclass
class Sampling:
    """Greedy when `temperature` is 0; otherwise temperature + nucleus (top-p) sampling from a seeded generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    def sampler(self) -> Picker:
        return Picker(self)


class Picker:
    """Picks tokens by a `Sampling` from a seeded generator, and applies the rejection rule to a speculative
    decoder's proposals (`accepts`, then a pick that `exclude`s the rejected token)."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.generator = torch.Generator()
        self.generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling distribution `(b, vocab)` (on the CPU) of `logits (b, vocab)`: temperature, then top-p."""
        probs = (logits.float() / self.sampling.temperature).softmax(-1).cpu()
        if self.sampling.top_p < 1:
            sorted_probs, order = probs.sort(-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.sampling.top_p
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0))
            probs /= probs.sum(-1, keepdim=True)
        return probs

    def __call__(self, logits: torch.Tensor, exclude: int | None = None) -> torch.Tensor:
        """The next token `(b, 1)`. `exclude`: a proposal just rejected at these logits; the token then comes from
        the distribution without it (greedy needs nothing: a rejected proposal was not the argmax)."""
        if self.sampling.temperature == 0:
            return logits.argmax(-1, keepdim=True)
        probs = self.probs(logits)
        if exclude is not None:
            probs[:, exclude] = 0
        return torch.multinomial(probs, 1, generator=self.generator).to(logits.device)

    def accepts(self, logits: torch.Tensor, token: int) -> bool:
        """Whether the token the target writes after `logits (1, vocab)` is the proposed `token`: the argmax when
        greedy, else with the probability the target gives it (a certain proposal's rejection rule)."""
        if self.sampling.temperature == 0:
            return int(logits[0].argmax()) == token
        return float(torch.rand(1, generator=self.generator)) < float(self.probs(logits)[0, token])


@dataclass
class Record:
    """What a generation did: sizes before/after compression and seconds per phase."""

    method: str
    prompt_tokens: int
    budget_tokens: int | None
    kept_tokens: int | None  # prompt tokens the target saw (prompt methods and cascades)
    kv_bytes_full: int  # the target's KV cache of the whole prompt
    kv_bytes_kept: int  # the KV cache decoding started from
    new_tokens: int = 0
    stop_reason: str = "length"
    timings: dict[str, float] = field(default_factory=dict)
    first_token_seconds: float = 0.0  # wall time until the first new token's logits, all phases included
    budget_note: str | None = None  # what became of the budget when not applied as asked (`Method.budget_note`)
    decode_batch: int = 1  # sequences decoded together with this one (`generate_batched`)
    speculative: int | str = 0  # tokens the draft proposed per step ("auto": chosen each step; 0: none)
    proposed_tokens: int = 0  # the draft's proposals the target checked while decoding
    accepted_tokens: int = 0  # those it took
    kv_bytes_draft: int = 0  # the draft's cache decoding started from (speculative decoding keeps it)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Result:
    text: str
    tokens: list[int]
    record: Record
    kept_ids: torch.Tensor | None = None  # `(1, C)`: the prompt the target was given, when a prompt method cut it


def encode(pair: Pair, prompt: str, chat: bool = False, max_new_tokens: int = 0) -> torch.Tensor:
    """Token ids `(1, n)` of a prompt, through the chat template when asked; rejects what cannot be run."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty")
    if chat:
        return encode_messages(pair, [{"role": "user", "content": prompt}], max_new_tokens)
    ids = pair.tokenizer(prompt, add_special_tokens=True, return_tensors="pt").input_ids
    return check_ids(pair, ids, max_new_tokens)


def encode_messages(pair: Pair, messages: list[dict], max_new_tokens: int = 0) -> torch.Tensor:
    """Token ids `(1, n)` of a conversation rendered by the tokenizer's chat template, generation prompt added."""
    tokenizer = pair.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("a chat was asked for but this tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return check_ids(pair, ids, max_new_tokens)


def check_ids(pair: Pair, ids: torch.Tensor, max_new_tokens: int = 0) -> torch.Tensor:
    """`ids (1, n)` if the target can run them with `max_new_tokens` more; else an `InputError` saying why."""
    if ids.shape[1] == 0:
        raise InputError("the prompt is empty")
    vocab = pair.target.get_input_embeddings().num_embeddings
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise InputError(f"token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
    limit = pair.context_length
    if limit and ids.shape[1] + max_new_tokens > limit:
        raise InputError(f"the prompt has {ids.shape[1]} tokens; with {max_new_tokens} new tokens that exceeds the "
                         f"target's context of {limit}")
    return ids


def new_state(pair: Pair, input_ids: torch.Tensor, max_new_tokens: int) -> PromptState:
    return PromptState(pair.draft, pair.target, input_ids, max_new_tokens, pair.eos_ids)


def prefill(state: PromptState, rows: int) -> None:
    """Dense target prefill of the prompt, capturing its last `rows` queries per layer; shared by KV methods.

    Runs again only if an earlier prefill captured fewer rows than now needed.
    """
    if state.cache is not None and (rows == 0 or (state.queries and state.queries.rows >= rows)):
        return
    target = state.target
    capture = QueryCapture(rows=min(rows, state.n)) if rows else None
    state.cache = new_cache()
    with state.timings.phase("target_prefill", target.device):
        state.logits = forward(target, state.input_ids, state.cache, 0, capture=capture)
    if capture is not None:
        check_captured(target, capture)
    state.queries = capture


def _check_method(pair: Pair, method: Method) -> None:
    if not isinstance(method, Method):
        raise ConfigError(f"method must be a draftapprox method instance, got {method!r}")
    if method.needs_draft and pair.draft is None:
        raise ConfigError(f"{method.name} needs a draft model; load the pair with a draft")


def apply_kv(state: PromptState, method: KVMethod) -> tuple[DynamicCache, torch.Tensor, int]:
    """Prefill (if not done, and unless the method runs its own), compress, and return (cache, logits of the first
    new token, bytes kept)."""
    if method.is_noop(state.n):
        prefill(state, 0)
        cache = shallow_copy(state.cache)
        return cache, state.logits, kv_bytes(cache)
    if method.prefills(state.n):
        prefill(state, method.rows)
    selection = method.select(state)
    target = state.target
    with state.timings.phase("compression", target.device):
        cache = compress_cache(state.cache if selection.cache is None else selection.cache, selection.keep)
    kept = kv_bytes(cache)
    logits = state.logits
    if selection.refeed:
        with state.timings.phase("refeed", target.device):
            logits = forward(target, state.input_ids[:, -1:], cache, state.n - 1, compressed=True)
    return cache, logits, kept


def compress_prompt(state: PromptState, method: PromptMethod) -> torch.Tensor:
    """Kept positions `(b, C)` of the prompt, in order (all of them when the budget covers the prompt), on the
    prompt's device so they index it directly."""
    if method.is_noop(state.n):
        return torch.arange(state.n, device=state.input_ids.device).expand(state.input_ids.shape[0], -1)
    return method.select(state).to(state.input_ids.device)


def _cut(text: str, stop: list[str]) -> int | None:
    """Where the first stop string begins, ignoring leading whitespace (so a reply that opens with a blank line
    is not cut to nothing); None if there is none."""
    body = len(text) - len(text.lstrip())
    hits = [i for i in (text.find(s, body) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _finish_text(tokenizer, tokens: list[int], stop: list[str]) -> str:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    end = _cut(text, stop) if stop else None
    return text if end is None else text[:end]


@dataclass
class Prepared:
    """A request up to its first new token: the cache decoding starts from, that token's logits, the position it
    is fed at, and the record so far (sizes, and the seconds of every phase before decoding)."""

    state: PromptState
    cache: DynamicCache
    logits: torch.Tensor
    position: int
    record: Record
    max_new_tokens: int
    sampling: Sampling
    stop: list[str]
    ignore_eos: bool
    kept_ids: torch.Tensor | None = None
    drafter: Drafter | None = None  # the draft's side of speculative decoding, when asked for


def prepare(pair: Pair, prompt: str | torch.Tensor, method: Method | None = None, *, max_new_tokens: int = 64,
            chat: bool = False, sampling: Sampling | None = None, stop: list[str] | None = None,
            state: PromptState | None = None, ignore_eos: bool = False,
            speculative: int | str | None = 0) -> Prepared:
    """Everything `generate` does before decoding: prefill, select, compress (and, with `speculative`, ready the
    draft's cache of the prompt)."""
    began = time.perf_counter()
    method = method if method is not None else FullKV()
    _check_method(pair, method)
    speculative = speculation.parse(speculative)
    if speculative and pair.draft is None:
        raise ConfigError("speculative decoding needs a draft model; load the pair with a draft")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling, stop = sampling or Sampling(), [s for s in (stop or []) if s]
    owned = state is None  # a state of our own is released once compressed; a caller's is shared with others
    if state is None:
        ids = prompt if isinstance(prompt, torch.Tensor) else encode(pair, prompt, chat, max_new_tokens)
        state = new_state(pair, ids, max_new_tokens)
    n, per_token = state.n, kv_bytes_per_token(pair.target)
    budget = None if isinstance(method, FullKV) else min(method.tokens(n), n)
    kept_tokens = kept_ids = None
    start = dict(state.timings.seconds)
    if isinstance(method, KVMethod):
        cache, logits, kept_bytes = apply_kv(state, method)
        position = n
    else:
        kv_stage = None
        if isinstance(method, SpecKVPC):
            pc, kv_stage = method.stages(max_new_tokens)
        else:
            pc = method
        positions = compress_prompt(state, pc)
        kept_ids = state.input_ids.gather(1, positions)
        kept_tokens = kept_ids.shape[1]
        if kv_stage is not None:
            # The cascade's KV stage runs on the kept prompt, reusing the draft tokens written on the full one;
            # when the prompt stage kept everything, it is the full prompt's state, prefill included.
            sub = state if kept_tokens == n else new_state(pair, kept_ids, max_new_tokens)
            sub.timings, sub._lookahead = state.timings, state._lookahead
            cache, logits, kept_bytes = apply_kv(sub, kv_stage)
            state._lookahead = sub._lookahead
            position = kept_tokens
        else:
            keep_positions = isinstance(pc, PromptMethod) and pc.keep_positions
            cache = new_cache()
            with state.timings.phase("target_prefill", pair.target.device):
                # Kept tokens re-indexed 0..C-1 (the reference), or at their original positions.
                logits = forward(pair.target, kept_ids, cache,
                                 positions if keep_positions else 0)
            kept_bytes = kv_bytes(cache)
            position = n if keep_positions else kept_tokens
    reserve(cache, max_new_tokens)
    drafter = speculation.Drafter.start(state) if speculative else None
    if owned:
        state.release()
    timings = {k: v - start.get(k, 0.0) for k, v in state.timings.seconds.items() if v - start.get(k, 0.0) > 0}
    record = Record(method.name, n, budget, kept_tokens, per_token * n, kept_bytes, timings=timings,
                    first_token_seconds=time.perf_counter() - began, budget_note=method.budget_note(n),
                    speculative=speculative, kv_bytes_draft=drafter.kv_bytes() if drafter else 0)
    return Prepared(state, cache, logits, position, record, max_new_tokens, sampling, stop, ignore_eos,
                    None if kept_tokens == n else kept_ids, drafter)


def finish(pair: Pair, prepared: Prepared, tokens: list[int], reason: str, decode_seconds: float,
           batch: int = 1, proposed: int = 0, accepted: int = 0) -> Result:
    record = dataclasses.replace(prepared.record, new_tokens=len(tokens), stop_reason=reason, decode_batch=batch,
                                 timings={**prepared.record.timings, "decode": decode_seconds},
                                 proposed_tokens=proposed, accepted_tokens=accepted)
    return Result(_finish_text(pair.tokenizer, tokens, prepared.stop), tokens, record, prepared.kept_ids)


def twin(p: Prepared) -> Prepared:
    """Another request identical to `p`, with a copy of its cache (a batch takes over the cache of what joins it)
    and of its drafter: how a benchmark fills a batch from one prepared prompt."""
    return dataclasses.replace(p, cache=batch_caches([p.cache]), drafter=p.drafter and p.drafter.copy())


def generate(pair: Pair, prompt: str | torch.Tensor, method: Method | None = None, *, max_new_tokens: int = 64,
             chat: bool = False, sampling: Sampling | None = None, stop: list[str] | None = None,
             state: PromptState | None = None, ignore_eos: bool = False, static: bool = False,
             speculative: int | str | None = 0) -> Result:
    """Generate from `prompt` with `method` (default FullKV); returns the text and a `Record`.

    `prompt` may be text or token ids `(1, n)`. Pass a `state` from `new_state` to share the target prefill and
    the draft lookahead between several methods on the same prompt (its timings then accumulate).
    `static`: decode with fixed-shape steps, replayed as a CUDA graph on a GPU (`static_decode`).
    `speculative`: the draft proposes this many tokens per step and the target checks them in one forward
    (`speculative.py`); "auto" chooses the number each step, 0 decodes without the draft. Greedy tokens are those
    of decoding without it; sampled ones follow the same distribution.
    """
    return generate_prepared(pair, prepare(pair, prompt, method, max_new_tokens=max_new_tokens, chat=chat,
                                           sampling=sampling, stop=stop, state=state, ignore_eos=ignore_eos,
                                           speculative=speculative),
                             static=static)


def generate_batched(pair: Pair, prepared: list[Prepared], max_batch: int = 32,
                     static: bool = False) -> Iterator[tuple[int, Result]]:
    """Decode prepared requests of one target together, yielding `(index, result)` as each one finishes.

    Requests are sorted by cache length and grouped, at most `max_batch` to a group; each step is one forward of
    the group's live sequences, which reads the weights once for all of them (on a CPU, decoding is bound by reading
    the weights: twenty sequences cost a few times one sequence's step, not twenty times). A group's caches are
    padded to its longest, so a group closes before its padded KV bytes would outgrow the weights: past that, a
    separate pass over the weights is the cheaper way. A request's `decode` seconds run from its group's start
    until it finished, and its record names the group's size. `static`: as for `generate`; each departure from a
    group then re-captures its step.
    """
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
    weights = _weight_bytes(pair.target)
    per_token = kv_bytes_per_token(pair.target)
    lengths = [cache_length(p.cache) for p in prepared]
    group: list[int] = []
    for i in sorted(range(len(prepared)), key=lambda i: lengths[i]):
        if group and (len(group) == max_batch or (len(group) + 1) * lengths[i] * per_token > weights):
            yield from _decode_group(pair, prepared, group, static)
            group = []
        group.append(i)
    if group:
        yield from _decode_group(pair, prepared, group, static)


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters: what a decode step reads."""
    return sum(t.numel() * t.element_size() for t in model.parameters())


def _decode_group(pair: Pair, prepared: list[Prepared], group: list[int],
                  static: bool) -> Iterator[tuple[int, Result]]:
    batch = DecodeBatch(pair, static)
    for i in group:
        batch.join(prepared[i], key=i)
    while batch:
        for step in batch.step():
            if step.result is not None:
                yield step.key, dataclasses.replace(step.result, record=dataclasses.replace(
                    step.result.record, decode_batch=len(group)))


def generate_prepared(pair: Pair, p: Prepared, static: bool = False) -> Result:
    """Decode one prepared request on its own (`static`: as for `generate`)."""
    batch = DecodeBatch(pair, static)
    batch.join(p)
    while True:
        for step in batch.step():
            if step.result is not None:
                p.state.timings.seconds["decode"] = (p.state.timings.seconds.get("decode", 0.0)
                                                     + step.result.record.timings["decode"])
                return step.result


@dataclass
class Step:
    """One sequence's part of a `DecodeBatch.step`: the tokens it got (one, or more where the target took the
    draft's proposals), and its result when they ended it."""

    key: object
    tokens: list[int]
    result: Result | None = None


@dataclass
class _Member:
    key: object
    prepared: Prepared
    pick: Picker
    logits: torch.Tensor
    joined: float
    tokens: list[int] = field(default_factory=list)
    fed: torch.Tensor | None = None  # `(1, 1)`: the token the next forward feeds
    exclude: int | None = None  # the proposal the target rejected at `logits`: the next pick is without it
    acceptance: speculation.Acceptance = field(default_factory=speculation.Acceptance)
    proposed: int = 0
    accepted: int = 0


class DecodeBatch:
    """Sequences of one target decoding together, each on its own (compressed) cache, one forward per step for all
    of them; sequences join and leave between steps, which is what a server's iteration-level scheduler needs.

    A lone sequence decodes on its own cache, exactly as it would alone. With several, their caches are stacked
    into `BatchLayer`s (`batch_caches`), once per change of membership: a join re-stacks the running rows with the
    newcomer's cache (which the batch then owns: `Prepared.cache` is released), a departure only drops rows.
    `static`: steps run over fixed-shape storage (`static_decode.StaticDecode`), replayed as a CUDA graph on a GPU,
    made anew at each change of membership.
    Sequences prepared with `speculative` also feed the draft's proposals: a step then feeds every sequence the
    same number of tokens (its own token, its proposals, padding), and each takes back the positions its target
    did not accept (`BatchLayer.forget`; re-stacked away once they would be most of a tail).
    """

    def __init__(self, pair: Pair, static: bool = False):
        self.pair = pair
        self._per_token = kv_bytes_per_token(pair.target)
        self._draft_per_token = kv_bytes_per_token(pair.draft) if pair.draft is not None else 0
        self.members: list[_Member] = []
        self._cache: DynamicCache | None = None  # the first `_stacked` members' sequences, in order
        self._stacked = 0  # members joined later are stacked in before the next forward
        self._static_steps = static
        self._static: StaticDecode | None = None  # holds `_cache`'s sequences while the membership stays
        self._costs: speculation.Costs | None = None
        self._quiet = 0  # steps `auto` has gone without proposing

    def __len__(self) -> int:
        return len(self.members)

    def join(self, p: Prepared, key: object = None) -> None:
        """Add a prepared request; it gets its first token (from its prefill's logits) in the next `step`."""
        if p.drafter is not None and self._static_steps:
            raise ConfigError("speculative decoding feeds several tokens a step; it does not run with static "
                              "(CUDA-graph) decode steps")
        self.members.append(_Member(key, p, p.sampling.sampler(), p.logits, time.perf_counter()))

    def leave(self, key: object) -> bool:
        """Drop a sequence (its client went away) and free its rows; False if no member has that key."""
        slot = next((i for i, m in enumerate(self.members) if m.key == key), None)
        if slot is None:
            return False
        self._drop([slot])
        return True

    @property
    def captured(self) -> bool:
        """Whether the step now replays a CUDA graph (`static` on a GPU, once warmed up)."""
        return self._static is not None and self._static.captured

    def kv_bytes(self) -> int:
        """Bytes the members' caches hold logically: each compressed prompt plus one position per token decoded,
        and the draft's cache of each speculating sequence."""
        return sum(m.prepared.record.kv_bytes_kept + len(m.tokens) * self._per_token
                   + (m.prepared.record.kv_bytes_draft + len(m.tokens) * self._draft_per_token
                      if m.prepared.drafter is not None else 0)
                   for m in self.members)

    def step(self) -> list[Step]:
        """Pick every member's next token; finished members leave, the rest advance by one forward (which also
        checks the draft's proposals of those that speculate, and may give them more tokens)."""
        steps, done = [], []
        for slot, m in enumerate(self.members):
            token = m.pick(m.logits, m.exclude)
            m.exclude, m.fed = None, token
            step = Step(m.key, [])
            steps.append(step)
            if self._commit(m, int(token[0, 0]), step):
                done.append(slot)
        self._drop(done)
        if self.members:
            self._advance([step for slot, step in enumerate(steps) if slot not in done])
        return steps

    def _commit(self, m: _Member, token: int, step: Step) -> bool:
        """Add a token to a member's output; True (its result in `step`) when that token ends it."""
        m.tokens.append(token)
        step.tokens.append(token)
        reason = _stopped(m.prepared, m.tokens, self.pair.tokenizer)
        if reason is None:
            return False
        if self.pair.target.device.type == "cuda":
            torch.cuda.synchronize(self.pair.target.device)
        step.result = finish(self.pair, m.prepared, m.tokens, reason, time.perf_counter() - m.joined,
                             proposed=m.proposed, accepted=m.accepted)
        return True

    def _drop(self, slots: list[int]) -> None:
        if not slots:
            return
        self._thaw()
        stacked = [i for i in range(self._stacked) if i not in slots]
        if self._cache is not None and len(stacked) < self._stacked:
            if not stacked:
                self._cache = None
            elif isinstance(self._cache.layers[0], BatchLayer):
                rows = torch.tensor(stacked, device=self.pair.target.device)
                for layer in self._cache.layers:
                    layer.select(rows)
            self._stacked = len(stacked)
        self.members = [m for i, m in enumerate(self.members) if i not in slots]

    def _proposals(self) -> list[list[int]]:
        """Each member's draft proposals for this step (none for those that do not speculate)."""
        members = self.members
        speculating = [m for m in members if m.prepared.drafter is not None]
        if not speculating:
            return [[] for _ in members]
        if self._costs is None:
            self._costs = speculation.Costs(_weight_bytes(self.pair.draft) / _weight_bytes(self.pair.target))
        room = [m.prepared.max_new_tokens - len(m.tokens) for m in members]
        width = 0
        if any(m.prepared.record.speculative == speculation.AUTO for m in speculating):
            candidates = [(m.acceptance.rate, m.prepared.drafter.free(m.tokens), most,
                           None if m.prepared.record.speculative == speculation.AUTO
                           else m.prepared.record.speculative)
                          for m, most in zip(members, room, strict=True) if m.prepared.drafter is not None]
            width = speculation.choose_width(self._costs, len(members), candidates)
            self._quiet = self._quiet + 1 if width == 0 else 0
            if self._quiet > speculation.PROBE_EVERY:
                width, self._quiet = 1, 0
        out = []
        for m, most in zip(members, room, strict=True):
            drafter, setting = m.prepared.drafter, m.prepared.record.speculative
            if drafter is None:
                out.append([])
                continue
            k = min(width if setting == speculation.AUTO else setting, most)
            forwards, seconds = drafter.forwards, drafter.seconds
            out.append(drafter.propose(m.tokens, k))
            self._costs.saw_draft(drafter.forwards - forwards, drafter.seconds - seconds)
        return out

    def _advance(self, steps: list[Step]) -> None:
        """One forward of every member (`steps`: theirs, in order), and the check of their proposals."""
        members = self.members
        proposals = self._proposals()
        width = 1 + max(len(p) for p in proposals)
        if self._stacked < len(members):
            self._restack()
        device = self.pair.target.device
        fed = torch.cat([torch.cat([m.fed, torch.tensor([p + [int(m.fed)] * (width - 1 - len(p))], device=device,
                                                        dtype=m.fed.dtype)], dim=1)
                         for m, p in zip(members, proposals, strict=True)])
        positions = torch.tensor([[m.prepared.position + len(m.tokens) - 1] for m in members], device=device)
        positions = positions + torch.arange(width, device=device)
        began = time.perf_counter()
        if width > 1:
            out = forward(self.pair.target, fed, self._cache, positions, compressed=True, every=True, rows_apart=True)
        elif self._static_steps:
            if self._static is None:  # every forward this membership can still need
                steps_left = max(m.prepared.max_new_tokens - len(m.tokens) for m in members)
                self._static = StaticDecode(self.pair.target, self._cache, steps_left)
            out = self._static(fed, positions)[:, None]
        else:
            out = forward(self.pair.target, fed, self._cache, positions, compressed=True)[:, None]
        if self._costs is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self._costs.saw_step(len(members), width, time.perf_counter() - began)
        done = []
        for row, (m, proposal) in enumerate(zip(members, proposals, strict=True)):
            taken = 0
            for token in proposal:
                if not m.pick.accepts(out[row, taken][None], token):
                    m.exclude = token
                    break
                taken += 1
                if self._commit(m, token, steps[row]):
                    done.append(row)
                    break
            m.logits = out[row, taken][None]
            if proposal:
                m.proposed, m.accepted = m.proposed + len(proposal), m.accepted + taken
                m.acceptance.update(taken, len(proposal))
            self._take_back(row, width - 1 - taken)
        self._drop(done)
        self._compact()

    def _take_back(self, row: int, count: int) -> None:
        """Forget a member's newest `count` positions (proposals the target rejected, padding)."""
        if count <= 0:
            return
        if isinstance(self._cache.layers[0], BatchLayer):
            for layer in self._cache.layers:
                layer.forget(row, count)
        else:  # a lone sequence's own cache
            rewind_cache(self._cache, count)

    def _compact(self) -> None:
        """Re-stack a batch once most of its tails would be holes left by rejected proposals."""
        if self._cache is None or not isinstance(self._cache.layers[0], BatchLayer):
            return
        layer = self._cache.layers[0]
        if layer.holes() > max(speculation.MAX_AUTO, layer.keys.shape[2] // 2):
            self._cache = batch_caches([self._cache] * len(self.members), list(range(len(self.members))))
            reserve(self._cache, max(m.prepared.max_new_tokens - len(m.tokens) for m in self.members))

    def _thaw(self) -> None:
        """Before the membership changes: the static step's cache back as an ordinary one (the step's shapes
        were those of the old membership)."""
        if self._static is not None:
            self._cache, self._static = self._static.written(), None

    def _restack(self) -> None:
        self._thaw()
        members = self.members
        if len(members) == 1:
            self._cache = members[0].prepared.cache
        else:
            caches = [self._cache] * self._stacked + [m.prepared.cache for m in members[self._stacked:]]
            rows = list(range(self._stacked)) + [0] * (len(members) - self._stacked)
            self._cache = batch_caches(caches, rows)
        for m in members:
            m.prepared.cache = None  # the batch owns the sequence now; the stacked copy is the only one kept
        reserve(self._cache, max(m.prepared.max_new_tokens - len(m.tokens) for m in members))
        self._stacked = len(members)


def _stopped(p: Prepared, tokens: list[int], tokenizer) -> str | None:
    """Why decoding of `tokens` ends here (EOS, a stop string, the length), or None: the rules of `decode`."""
    if tokens[-1] in p.state.eos_ids and not p.ignore_eos:
        return "eos"
    if p.stop and _cut(tokenizer.decode(tokens, skip_special_tokens=True), p.stop) is not None:
        return "stop"
    return "length" if len(tokens) >= p.max_new_tokens else None


@dataclass
class Compression:
    """A compressed prompt: the kept token ids, their positions in the original prompt, and the text."""

    text: str
    token_ids: list[int]
    positions: list[int]
    prompt_tokens: int
    method: str
    timings: dict[str, float]


def require_prompt_method(method: Method) -> None:
    """Only prompt methods produce a shorter prompt; the CLI calls this before loading any model."""
    if not isinstance(method, PromptMethod):
        names = ", ".join(name for name, cls in METHODS.items() if issubclass(cls, PromptMethod))
        raise ConfigError(f"{getattr(method, 'name', method)} is not a prompt-compression method (choose {names})")


def compress(pair: Pair, prompt: str, method: PromptMethod, *, chat: bool = False) -> Compression:
    """Compress a prompt for any engine: only the kept tokens, in their original order."""
    require_prompt_method(method)
    _check_method(pair, method)
    state = new_state(pair, encode(pair, prompt, chat), 1)
    positions = compress_prompt(state, method)
    ids = state.input_ids.gather(1, positions)[0].tolist()
    return Compression(pair.tokenizer.decode(ids), ids, positions[0].tolist(), state.n, method.name,
                       dict(state.timings.seconds))
