"""The server's Prometheus metrics, in a registry of its own (so that several servers in one process, as in the
tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("draftapprox_requests", "Requests answered, by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("draftapprox_prompt_tokens", "Prompt tokens received (whole prompts)",
                                     registry=r)
        self.kept_tokens = Counter("draftapprox_kept_tokens", "Prompt tokens kept (prompt methods) or KV positions "
                                   "kept per head (KV methods) after compression", registry=r)
        self.generation_tokens = Counter("draftapprox_generation_tokens", "Tokens generated", registry=r)
        self.token_mismatch = Counter("draftapprox_upstream_token_mismatch", "Forwarded prompts (text mode) whose "
                                      "upstream count differs from ours by more than 1%", registry=r)
        self.compress_failures = Counter("draftapprox_compress_failures", "Prompts the proxy could not compress "
                                         "(the draft failed, took longer than --compress-timeout, or its queue was "
                                         "full), by reason; each went uncut, or failed with --on-compress-error "
                                         "fail", ["reason"], registry=r)
        self.upstream_up = Gauge("draftapprox_upstream_up", "1 while the proxy's upstream answers, else 0",
                                 registry=r)
        self.kv_bytes = Gauge("draftapprox_kv_cache_bytes", "KV bytes held now by running requests", registry=r)
        self.queue_depth = Gauge("draftapprox_queue_depth", "Requests waiting for admission (the proxy: prompts "
                                 "waiting for or in the draft)", registry=r)
        self.running = Gauge("draftapprox_running_requests", "Requests prefilled and decoding", registry=r)
        self.ttft = Histogram("draftapprox_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("draftapprox_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=_LATENCY, registry=r)
        self.decode_step = Histogram("draftapprox_decode_step_seconds", "One decode step of the running batch, by "
                                     "its size (tokens per second of decoding = batch x count / sum)", ["batch"],
                                     buckets=_LATENCY, registry=r)
        self.e2e = Histogram("draftapprox_e2e_request_latency_seconds", "From arrival to the last token",
                             buckets=_LATENCY, registry=r)

        self.proposed = Counter("draftapprox_speculative_proposed_tokens", "Draft tokens proposed to the target by "
                                "speculative decoding (finished requests)", registry=r)
        self.accepted = Counter("draftapprox_speculative_accepted_tokens", "Proposed draft tokens the target "
                                "accepted (finished requests)", registry=r)
        self.acceptance = Gauge("draftapprox_speculative_acceptance_rate", "Accepted over proposed draft tokens "
                                "since the server started (0 before any proposal)", registry=r)
        self._speculated = [0, 0]  # proposed, accepted: the gauge's own totals

    def speculated(self, proposed: int, accepted: int) -> None:
        """Count a finished request's proposals, and update the acceptance rate."""
        if proposed:
            self.proposed.inc(proposed)
            self.accepted.inc(accepted)
            self._speculated = [self._speculated[0] + proposed, self._speculated[1] + accepted]
            self.acceptance.set(self._speculated[1] / self._speculated[0])

    def render(self) -> bytes:
        return generate_latest(self.registry)
